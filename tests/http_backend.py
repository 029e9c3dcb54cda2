"""Real HTTP/1.1 backends on loopback for proxy tests (h11 over Trio sockets).

A :class:`Backend` answers, by path:

- ``/`` and anything unknown: 200, body ``<name>\\n``
- ``/status/<code>``: that status (body ``<name> <code>\\n``)
- ``/sleep/<seconds>``: waits, then 200
- ``/echo``: the request body back (streamed; Content-Length when the request had one)
- ``/bytes/<n>``: ``n`` bytes, chunked, in 64 KiB pieces
- ``/count``: reads the request body, answers ``<bytes> <sha256>``
- ``/headers``: the request head as JSON ``[[name, value], ...]``
- ``/close``: 200 with ``Connection: close``
- ``/reset``: closes the connection without answering

``backend.status`` overrides every answer's status (e.g. 503 to fail it);
``backend.hits`` counts requests; ``backend.connections`` counts accepted
connections.
"""

from __future__ import annotations

import hashlib
import json
import socket

import h11
import trio


class Backend:
    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = 0
        self.status: int | None = None
        self.hits = 0
        self.connections = 0
        self.paths: list[str] = []

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((self.host, self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        listeners = [trio.SocketListener(listener)]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                event = await self._next(conn, stream)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    return
                assert isinstance(event, h11.Request)
                self.hits += 1
                path = event.target.decode()
                self.paths.append(path)
                if not await self._answer(conn, stream, event, path):
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            await stream.aclose()

    async def _next(self, conn: h11.Connection, stream: trio.SocketStream) -> h11.Event | None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(64 * 1024)
                conn.receive_data(data)
                continue
            return event  # type: ignore[return-value]

    async def _body(self, conn: h11.Connection, stream: trio.SocketStream):  # type: ignore[no-untyped-def]
        while True:
            event = await self._next(conn, stream)
            if isinstance(event, h11.Data):
                yield event.data
            else:
                return

    async def _send(
        self, conn: h11.Connection, stream: trio.SocketStream, event: h11.Event
    ) -> None:
        data = conn.send(event)
        if data:
            await stream.send_all(data)

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream,
                      req: h11.Request, path: str) -> bool:  # fmt: skip
        parts = path.split("?")[0].strip("/").split("/")
        status = 200
        headers: list[tuple[str, str]] = [("X-Backend", self.name)]
        if parts[0] == "reset":
            return False
        if parts[0] == "echo":
            length = dict(req.headers).get(b"content-length")
            if self.status is None and length is not None:
                headers.append(("Content-Length", length.decode()))
            await self._send(conn, stream, h11.Response(status_code=self.status or 200,
                                                        headers=headers))  # fmt: skip
            async for chunk in self._body(conn, stream):
                await self._send(conn, stream, h11.Data(data=chunk))
            await self._send(conn, stream, h11.EndOfMessage())
            return True
        body_len = 0
        digest = hashlib.sha256()
        async for chunk in self._body(conn, stream):
            body_len += len(chunk)
            digest.update(chunk)
        body = f"{self.name}\n".encode()
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
            body = f"{self.name} {status}\n".encode()
        elif parts[0] == "sleep" and len(parts) > 1:
            await trio.sleep(float(parts[1]))
        elif parts[0] == "count":
            body = f"{body_len} {digest.hexdigest()}\n".encode()
        elif parts[0] == "headers":
            body = json.dumps([[k.decode(), v.decode()] for k, v in req.headers]).encode()
        elif parts[0] == "close":
            headers.append(("Connection", "close"))
        elif parts[0] == "bytes" and len(parts) > 1:
            n = int(parts[1])
            await self._send(conn, stream, h11.Response(status_code=self.status or 200,
                                                        headers=headers))  # fmt: skip
            piece = b"x" * (64 * 1024)
            while n > 0:
                await self._send(conn, stream, h11.Data(data=piece[: min(n, len(piece))]))
                n -= len(piece)
            await self._send(conn, stream, h11.EndOfMessage())
            return True
        if self.status is not None:
            status = self.status
        if req.method == b"HEAD":
            headers.append(("Content-Length", str(len(body))))
            body = b""
        else:
            headers.append(("Content-Length", str(len(body))))
        await self._send(conn, stream, h11.Response(status_code=status, headers=headers))
        if body:
            await self._send(conn, stream, h11.Data(data=body))
        await self._send(conn, stream, h11.EndOfMessage())
        return True

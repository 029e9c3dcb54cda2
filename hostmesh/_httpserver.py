"""A small HTTP/1.1 server for the control-plane APIs (agent API, server API).

h11 holds the protocol state machine; this module is the Trio adapter around
it plus the bounds every listener here needs: a deadline for request headers
(slow clients), a cap on header and body sizes, and a cap on concurrent
connections. Handlers get a whole :class:`Request` and return a whole
:class:`Response`; these APIs carry small JSON bodies. (The data-plane proxy
streams and has its own parser.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from ._log import get_logger

__all__ = ["HttpLimits", "Request", "Response", "clamp_wait", "serve_connection", "serve_http"]

log = get_logger("hostmesh.http")

#: Bytes read from the socket per receive.
RECV_SIZE = 64 * 1024
#: Request line plus headers above this get 431 (Go's default is 1 MB; these APIs need < 8 KiB).
MAX_HEADER_BYTES = 32 * 1024
#: After an error response, read and discard at most this much for at most this long.
LINGER_SECONDS = 1.0
LINGER_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class HttpLimits:
    """Bounds for one HTTP listener."""

    max_body: int = 1024 * 1024  # bytes; larger request bodies get 413
    max_connections: int = 256  # concurrent connections; more get 503 and are closed
    header_timeout: float = 10.0  # s to receive a request's line and headers
    body_timeout: float = 30.0  # s to receive a request's body
    idle_timeout: float = 75.0  # s a keep-alive connection may sit idle


@dataclass
class Request:
    """One HTTP request, body read whole (bounded by :attr:`HttpLimits.max_body`)."""

    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes = b""
    peer: str = ""
    # the TLS client certificate's verified node identity (a hostmesh._pki.NodeIdentity)
    # on the server's TLS listener; None without TLS or when the client sent none
    peer_identity: Any = None

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name`` ("" for a bare ``?passing``)."""
        values = self.query.get(name)
        return values[0] if values else default

    def has(self, name: str) -> bool:
        return name in self.query

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            ValueError: a one-line reason.
        """
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"invalid JSON body: {exc}") from None


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def json(
        cls, obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, body, headers or [], "application/json")

    @classmethod
    def text(
        cls, text: str, status: int = 200, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        if text and not text.endswith("\n"):
            text += "\n"
        return cls(status, text.encode(), headers or [])


Handler = Callable[[Request], Awaitable[Response]]


class _Closed(Exception):
    """The peer went away or broke the protocol; close the connection."""


def _parse_target(target: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(target)
    return unquote(parts.path), parse_qs(parts.query, keep_blank_values=True)


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: HttpLimits | None = None,
    name: str = "api",
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; never returns otherwise.

    Binds first, then reports the bound ``(host, port)`` through ``task_status``
    (port 0 picks a free port).
    """
    limits = limits or HttpLimits()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    active = 0

    async def on_connection(stream: trio.SocketStream) -> None:
        nonlocal active
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        if active >= limits.max_connections:
            with trio.move_on_after(1):
                await stream.send_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n"
                    b"content-length: 21\r\n\r\ntoo many connections\n"
                )
            await stream.aclose()
            return
        active += 1
        try:
            await _serve_connection(stream, handler, limits, peer)
        finally:
            active -= 1
            await stream.aclose()

    log.info("listening", listener=name, address=f"{bound[0]}:{bound[1]}")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started((bound[0], bound[1]))


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream, deadline: float) -> Any:
    with trio.move_on_at(deadline):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Closed() from None
            conn.receive_data(bytes(data))
    raise TimeoutError


async def _send(conn: h11.Connection, stream: trio.abc.Stream, response: Response) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        *response.headers,
    ]
    try:
        reason = HTTPStatus(response.status).phrase.encode()
    except ValueError:
        reason = b""
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    body = conn.send(h11.Data(data=response.body)) if response.body else b""
    end = conn.send(h11.EndOfMessage())
    await stream.send_all((data or b"") + (body or b"") + (end or b""))


async def _send_error(
    conn: h11.Connection, stream: trio.abc.Stream, status: int, reason: str
) -> None:
    """Best effort: answer a broken request with ``status`` and close."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    response = Response.text(reason, status, [("connection", "close")])
    try:
        with trio.move_on_after(LINGER_SECONDS):
            await _send(conn, stream, response)
            # Lingering close: closing with unread input makes the kernel send
            # RST, which can destroy the error response before the client reads it.
            if isinstance(stream, trio.abc.HalfCloseableStream):  # TLS has no half-close
                await stream.send_eof()
            drained = 0
            while drained < LINGER_MAX_BYTES and (chunk := await stream.receive_some(RECV_SIZE)):
                drained += len(chunk)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: HttpLimits,
    peer: str,
    peer_identity: Any = None,
) -> None:
    """Serve HTTP/1.1 requests on one accepted ``stream`` (plain or TLS) until it ends.

    The caller owns ``stream`` and closes it; ``peer_identity`` is put on every
    :class:`Request`.
    """
    await _serve_connection(stream, handler, limits, peer, peer_identity)


async def _serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    limits: HttpLimits,
    peer: str,
    peer_identity: Any = None,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    first = True
    while True:
        try:
            # An idle keep-alive connection waits idle_timeout for the next
            # request to start, then header_timeout for it to complete.
            wait = limits.header_timeout if first else limits.idle_timeout
            event = await _next_event(conn, stream, trio.current_time() + wait)
            first = False
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            request = event
            size = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
            if size > MAX_HEADER_BYTES:
                # h11 bounds an incomplete head; a complete one can arrive in one read.
                await _send_error(conn, stream, 431, "request header fields too large")
                return
            # h11 has already checked that Content-Length is a number.
            declared = dict(request.headers).get(b"content-length")
            if declared is not None and int(declared) > limits.max_body:
                await _send_error(conn, stream, 413, "request body too large")
                return
            body = bytearray()
            body_deadline = trio.current_time() + limits.body_timeout
            while True:
                event = await _next_event(conn, stream, body_deadline)
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limits.max_body:
                        await _send_error(conn, stream, 413, "request body too large")
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if "exceeded maximum size" in str(exc) or "too long" in str(exc):
                status = 431
            await _send_error(conn, stream, status, f"bad request: {exc}")
            return
        except TimeoutError:
            # Silence for an idle keep-alive connection; 408 for a half-sent request.
            if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                await _send_error(conn, stream, 408, "request timeout")
            return
        except _Closed:
            return

        target = request.target.decode("latin-1")
        path, query = _parse_target(target)
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.headers:
            hname = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            headers[hname] = f"{headers[hname]}, {value}" if hname in headers else value
        req = Request(
            method=request.method.decode("ascii", "replace"),
            target=target,
            path=path,
            query=query,
            headers=headers,
            body=bytes(body),
            peer=peer,
            peer_identity=peer_identity,
        )
        try:
            response = await handler(req)
        except Exception as exc:  # a handler bug must not kill the listener
            log.exception("handler failed", path=path, error=repr(exc))
            response = Response.text(f"internal error: {type(exc).__name__}", 500)
        try:
            await _send(conn, stream, response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


def clamp_wait(value: float, maximum: float) -> float:
    """Clamp a blocking-query wait to ``[0, maximum]`` (non-finite -> maximum)."""
    if not math.isfinite(value):
        return maximum
    return max(0.0, min(value, maximum))

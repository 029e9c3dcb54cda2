"""The proxy's express lane against its general path, through a real agent.

The usual keep-alive exchange is proxied in one frame (the express lane in
``Proxy._client``); anything unusual is handed to the general path, before routing or in the
middle of the first try. Either way the backend must receive, and the client
get, the same bytes as through the general path alone. The backend here
answers with fixed bytes in one write, as nginx does, so that responses can
be compared byte for byte; the trace id, new per request, is the one part
compared by its form.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import trio
from conftest import trio_test
from proxy_env import Mesh, mesh

from hostmesh._routes import Route
from hostmesh.agent import _routing
from hostmesh.catalog import Node, NodeRecord, ServiceInstance

NGINX = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 15:58:35 GMT\r\n"
         b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n"
         b"\r\nok\n")  # fmt: skip
ANSWERS = {
    b"/nginx": [NGINX],
    b"/plain": [b"HTTP/1.1 404 Not Found\r\ncontent-length: 5\r\nX-A: b\r\n\r\nnope\n"],
    b"/empty": [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    b"/chunked": [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nok\n\r\n0\r\n\r\n"],
    b"/split": [NGINX[:-3], NGINX[-3:]],  # the body in a second write
    b"/keepalive": [b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\n\r\nok\n"],
    b"/503": [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy\n"],
    b"/hang": [],  # no answer at all
}
TRACE = re.compile(rb"\r\ntraceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-01")


class RawBackend:
    """Answers each request head with ``ANSWERS[path]``, each piece one write."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket() as listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            self.port = listener.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._conn, sock)

    async def _conn(self, sock: trio.socket.SocketType) -> None:
        buf = b""
        with sock:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.heads.append(head + b"\r\n\r\n")
                for piece in ANSWERS[head.split(b" ")[1]]:
                    await sock.send(piece)
                    await trio.sleep(0.01)


@asynccontextmanager
async def express_mesh(tmp_path: Path) -> AsyncIterator[tuple[Mesh, RawBackend]]:
    async with mesh(tmp_path) as m:
        backend = RawBackend()
        await m.nursery.start(backend.serve)
        m.agent.catalog.merge(NodeRecord(
            Node("n1", "127.0.0.1", az="dev-1a"), generation=2, version=1,
            services=(ServiceInstance("web-0", "web", "127.0.0.1", backend.port, (), {}),),
        ))  # fmt: skip
        await m.refresh()
        yield m, backend


async def exchange(m: Mesh, heads: list[bytes]) -> list[bytes]:
    """Send each head on one keep-alive connection; the bytes of each answer."""
    sock = trio.socket.socket()
    await sock.connect(m.addrs.proxy)
    answers = []
    buf = b""
    with sock:
        for head in heads:
            await sock.send(head)
            while not _complete(buf):
                data = await sock.recv(65536)
                assert data, "the proxy closed the connection"
                buf += data
            end = _complete(buf)
            answers.append(buf[:end])
            buf = buf[end:]
    return answers


def _complete(buf: bytes) -> int:
    """Length of the whole response at the start of ``buf``, or 0."""
    end = buf.find(b"\r\n\r\n") + 4
    if end < 4:
        return 0
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buf[:end])
    if length is not None:
        total = end + int(length.group(1))
        return total if len(buf) >= total else 0
    last = buf.find(b"\r\n0\r\n\r\n", end - 2)
    return last + 7 if last >= 0 else 0


def request(path: bytes, *lines: bytes) -> bytes:
    return (
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: web\r\n"
        + b"".join(x + b"\r\n" for x in lines)
        + b"\r\n"
    )


CURL = (b"User-Agent: curl/7.88.1", b"Accept: */*")
HTTPX = (b"Accept: */*", b"Accept-Encoding: gzip, deflate", b"Connection: keep-alive",
         b"User-Agent: python-httpx/0.27.0")  # fmt: skip


async def through(
    m: Mesh, heads: list[bytes], *, general: bool
) -> tuple[list[bytes], dict[str, int]]:
    """The answers to ``heads`` (after one request that teaches the proxy the Host), and
    how often the general path's entry points were called for them."""
    proxy = m.agent.proxy
    calls = {"_exchange": 0, "_forward": 0}
    await exchange(m, [request(b"/nginx")])  # the Host is learnt on the general path
    with ExitStack() as patched:
        for name in calls:
            real = getattr(proxy, name)

            async def counted(*args: Any, _real: Any = real, _name: str = name,
                              **kwargs: Any) -> Any:  # fmt: skip
                calls[_name] += 1
                return await _real(*args, **kwargs)

            patched.enter_context(mock.patch.object(proxy, name, counted))
        if general:
            patched.enter_context(mock.patch.object(proxy, "express", False))
        answers = await exchange(m, heads)
    return answers, calls


def normalised(head: bytes) -> bytes:
    """A head the backend received, its trace id (new per request) checked and blanked."""
    assert len(TRACE.findall(head)) == 1, head
    return TRACE.sub(b"\r\ntraceparent: <new>", head)


@trio_test(30)
async def test_usual_exchanges_take_the_express_lane_and_match_the_general_path(
    tmp_path: Path,
) -> None:
    async with express_mesh(tmp_path) as (m, backend):
        heads = [request(path, *lines) for path in (b"/nginx", b"/plain", b"/empty", b"/503")
                 for lines in ((), CURL, HTTPX)] * 2  # fmt: skip
        backend.heads.clear()
        fast, calls = await through(m, heads, general=False)
        assert calls == {"_exchange": 0, "_forward": 0}  # every one in one frame
        fast_seen = [normalised(h) for h in backend.heads[1:]]
        backend.heads.clear()
        slow, calls = await through(m, heads, general=True)
        assert calls == {"_exchange": len(heads), "_forward": len(heads)}
        assert fast == slow
        assert fast_seen == [normalised(h) for h in backend.heads[1:]]
        assert fast[0] == NGINX.replace(b"Connection: keep-alive\r\n", b"")
        assert b"\r\nConnection: keep-alive" not in fast_seen[2]  # httpx's line is not forwarded
        assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in fast_seen[0]


@trio_test(30)
async def test_unusual_exchanges_are_handed_to_the_general_path_and_answered_the_same(
    tmp_path: Path,
) -> None:
    """Before routing (a hop-by-hop field, framing, a trace to keep), or after the request
    was sent (a chunked answer, one split in two writes, a hop-by-hop field): the same."""
    async with express_mesh(tmp_path) as (m, backend):
        late = [request(p, *CURL) for p in (b"/chunked", b"/split", b"/keepalive")]
        early = [request(b"/nginx", b"TE: trailers"), request(b"/nginx", b"Content-Length: 0"),
                 request(b"/nginx", b"traceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
                 request(b"/nginx", b"Connection: close, x-a")]  # fmt: skip
        cases = ((late, {"_exchange": 0, "_forward": len(late)}),
                 (early, {"_exchange": len(early), "_forward": len(early)}))  # fmt: skip
        for heads, handed in cases:
            backend.heads.clear()
            fast, calls = await through(m, heads, general=False)
            assert calls == handed
            fast_seen = backend.heads[1:]
            backend.heads.clear()
            slow, _ = await through(m, heads, general=True)
            assert fast == slow
            assert [TRACE.sub(b"", h) for h in fast_seen] == [
                TRACE.sub(b"", h) for h in backend.heads[1:]
            ]
            assert len(fast) == len(heads)
        assert fast[-1].endswith(b"\r\nConnection: close\r\n\r\nok\n")


@trio_test(30)
async def test_the_express_lanes_own_waits_still_end_at_their_deadlines(tmp_path: Path) -> None:
    """The express lane yields its two waits to the loop itself (``Deadline.trap``), not
    through ``Deadline.wait``. An upstream that never answers still gets the client a 504
    at the route's timeout, and an idle keep-alive connection is still closed at the
    idle timeout."""
    quick = Route(name="default", timeout=0.5)
    async with express_mesh(tmp_path) as (m, _):
        proxy = m.agent.proxy
        briefly = dataclasses.replace(proxy.config, idle_timeout=0.7)
        with mock.patch.object(_routing, "DEFAULT_ROUTE", quick), \
                mock.patch.object(proxy, "config", briefly):  # fmt: skip
            await m.refresh()  # lanes are made again, with the quick route
            _, calls = await through(m, [request(b"/nginx")], general=False)
            assert calls == {"_exchange": 0, "_forward": 0}  # the express lane took it
            sock = trio.socket.socket()
            await sock.connect(m.addrs.proxy)
            with sock:
                await sock.send(request(b"/nginx"))  # the Host is known: the express lane
                first = await sock.recv(65536)
                assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first
                t0 = trio.current_time()
                await sock.send(request(b"/hang"))
                answer = await sock.recv(65536)
                assert answer.startswith(b"HTTP/1.1 504 "), answer
                assert b"\r\nhostmesh-error: timeout\r\n" in answer
                assert 0.4 < trio.current_time() - t0 < 2.0
                t0 = trio.current_time()
                assert await sock.recv(65536) == b""  # closed while idle, after 0.7 s
                assert 0.6 < trio.current_time() - t0 < 2.5

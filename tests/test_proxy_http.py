"""The outbound HTTP proxy on real sockets: request forms, keep-alive, bodies, WebSocket, abuse.

Clients are httpx, curl and raw TCP streams (for bytes no well-behaved
client sends); upstreams are the h11 :class:`~http_backend.Backend`, a
trio-websocket server, and tiny raw servers defined here for answers the h11
backend never gives (trailers, 204/304, malformed or truncated responses,
keep-alive connections closed under the proxy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
import trio_websocket
from conftest import trio_test
from proxy_env import Mesh
from proxy_env import mesh as _mesh

from hostmesh import ProxyConfig
from hostmesh.catalog import Node, NodeRecord, ServiceInstance

pytestmark = pytest.mark.sockets

MB = 1024 * 1024
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01")
#: A valid W3C trace context (the example from the spec, §3.2.2.1).
SPEC_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# --- raw client -----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]  # (lowercase name, value), in order
    body: bytes
    trailers: bytes = b""  # raw trailer section of a chunked body

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None


class Conn:
    """A raw TCP connection to the proxy that reads responses byte-exactly."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, m: Mesh) -> Conn:
        host, port = m.addrs.proxy
        conn = cls(await trio.open_tcp_stream(host, port))
        _RAW_CONNS.append(conn)
        return conn

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> None:
        data = await self.stream.receive_some(64 * 1024)
        if not data:
            raise EOFError(f"connection closed; unparsed: {bytes(self.buf[:200])!r}")
        self.buf += data

    async def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            await self._more()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    async def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def head(self) -> tuple[int, list[tuple[str, str]]]:
        status_line = await self._line()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers = []
        while line := await self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.lower(), value.strip()))
        return int(status_line.split()[1]), headers

    async def response(self, method: str = "GET") -> Reply:
        """The next final response (interim 1xx skipped), its body read by its framing."""
        status, headers = await self.head()
        while status < 200:
            status, headers = await self.head()
        reply = Reply(status, headers, b"")
        if method == "HEAD" or status in (204, 304):
            return reply
        if (reply.header("transfer-encoding") or "").lower() == "chunked":
            body = bytearray()
            while size := int((await self._line()).split(b";")[0], 16):
                body += await self._exactly(size)
                assert await self._exactly(2) == b"\r\n"
            trailers = bytearray()
            while line := await self._line():
                trailers += line + b"\r\n"
            reply.body, reply.trailers = bytes(body), bytes(trailers)
        elif (length := reply.header("content-length")) is not None:
            reply.body = await self._exactly(int(length))
        else:
            reply.body = await self.rest()
        return reply

    async def rest(self) -> bytes:
        """Everything until the proxy closes the connection."""
        while True:
            data = await self.stream.receive_some(64 * 1024)
            if not data:
                out = bytes(self.buf)
                self.buf.clear()
                return out
            self.buf += data

    async def aclose(self) -> None:
        await self.stream.aclose()


_RAW_CONNS: list[Conn] = []


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, **overrides: Any) -> AsyncIterator[Mesh]:
    """proxy_env's mesh; raw connections a failed test left open are closed with it."""
    async with _mesh(tmp_path, **overrides) as m:
        try:
            yield m
        finally:
            with trio.CancelScope(shield=True):
                while _RAW_CONNS:
                    await _RAW_CONNS.pop().aclose()


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def get(path: str = "/", host: str = "udvr", *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- upstreams ------------------------------------------------------------------------------


async def add_instance(m: Mesh, service: str, port: int) -> None:
    """Put one instance of ``service`` at 127.0.0.1:``port`` in the catalog, as gossip would."""
    m._generation += 1
    node = f"raw-{service}"
    instance = ServiceInstance(f"{node}-0", service, "127.0.0.1", port)
    record = NodeRecord(Node(node, "127.0.0.1", az="dev-1a"), generation=m._generation,
                        version=1, services=(instance,))  # fmt: skip
    m.agent.catalog.merge(record)
    await m.refresh()


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def raw_service(m: Mesh, service: str, handler: Handler) -> None:
    """Serve ``handler`` per connection on a free port and register it as ``service``."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    listeners = await m.nursery.start(trio.serve_tcp, run, 0)
    await add_instance(m, service, listeners[0].socket.getsockname()[1])


async def read_request(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """One request head (and its Content-Length body, dropped) from ``buf`` + ``stream``."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(64 * 1024)
        if not data:
            return None
        buf += data
    head = bytes(buf[: end + 4])
    del buf[: end + 4]
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    left = int(length.group(1)) if length else 0
    while left:
        if not buf:
            data = await stream.receive_some(64 * 1024)
            if not data:
                return None
            buf += data
        take = min(left, len(buf))
        del buf[:take]
        left -= take
    return head


def answering(*responses: bytes, byte_at_a_time: bool = False) -> Handler:
    """A handler that answers successive requests on a connection with ``responses``."""

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        for response in responses:
            if await read_request(stream, buf) is None:
                return
            if byte_at_a_time:
                for i in range(len(response)):
                    await stream.send_all(response[i : i + 1])
            else:
                await stream.send_all(response)
        await stream.receive_some(1)  # the proxy hangs up first

    return handler


def answer_then_hang_up(response: bytes) -> Handler:
    """A handler that answers the first request with ``response``, then hangs up."""

    async def handler(stream: trio.SocketStream) -> None:
        if await read_request(stream, bytearray()) is not None:
            await stream.send_all(response)

    return handler


async def metrics(m: Mesh) -> str:
    host, port = m.addrs.api
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://{host}:{port}/metrics")).text


def metric_sum(text: str, name: str) -> float:
    """The sum of a metric's samples over all label sets (0 when it has none)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))  # fmt: skip


async def serves(m: Mesh) -> None:
    """The proxy still answers a normal request on a new connection."""
    async with m.client() as c:
        r = await c.get("/", headers={"Host": "udvr"})
    assert r.status_code == 200
    assert r.text.startswith("n1-udvr-")


async def until(predicate: Callable[[], bool]) -> None:
    """Wait until the proxy has caught up with a socket event (bounded by the test's fail_after)."""
    while not predicate():
        await trio.sleep(0.01)


async def backend_headers(m: Mesh, *headers: str) -> list[tuple[str, str]]:
    """The head the backend received for GET /headers sent raw with ``headers``."""
    conn = await Conn.open(m)
    await conn.send(get("/headers", "udvr", *headers))
    reply = await conn.response()
    await conn.aclose()
    assert reply.status == 200, reply
    return [(k, v) for k, v in json.loads(reply.body)]


# --- 1. request forms -----------------------------------------------------------------------


@trio_test(10)
async def test_origin_form_host_names_the_service(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        await m.add_node("n2", "dev-1a", "other")
        async with m.client() as c:
            for host in ("udvr", "udvr:80", "udvr.svc.mesh", "UDVR.svc.mesh:8080",
                         "udvr.svc.mesh.:8080"):  # fmt: skip
                r = await c.get("/headers", headers={"Host": host})
                assert r.status_code == 200, host
                assert r.headers["x-backend"] == "n1-udvr-0", host
                assert ["host", host] in r.json(), host  # forwarded as the client sent it
            r = await c.get("/", headers={"Host": "other.svc.mesh"})
            assert r.text == "n2-other-0\n"
        assert m.backends["n1-udvr-0"].paths == ["/headers"] * 5


def curl_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return {**env, **extra}


@trio_test(15)
async def test_absolute_form_through_curl_proxy_option(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        done = await trio.run_process(
            ["curl", "-sS", "--max-time", "10", "-x", m.proxy_url, "http://udvr/"],
            capture_stdout=True, env=curl_env(),
        )  # fmt: skip
        assert done.stdout == b"n1-udvr-0\n"
        done = await trio.run_process(
            ["curl", "-sS", "--max-time", "10", "-x", m.proxy_url,
             "-H", "Proxy-Authorization: Basic c2VjcmV0", "http://udvr:8080/headers?q=1"],
            capture_stdout=True, env=curl_env(),
        )  # fmt: skip
        headers = dict(json.loads(done.stdout))
        assert headers["host"] == "udvr:8080"
        # curl sends Proxy-Connection with -x; neither it nor the credentials go upstream.
        assert "proxy-connection" not in headers
        assert "proxy-authorization" not in headers
        # The upstream gets origin form.
        assert m.backends["n1-udvr-0"].paths == ["/", "/headers?q=1"]


@trio_test(15)
async def test_absolute_form_through_http_proxy_env(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        done = await trio.run_process(
            ["curl", "-sS", "--max-time", "10", "http://udvr.svc.mesh/headers"],
            capture_stdout=True, env=curl_env(http_proxy=m.proxy_url),
        )  # fmt: skip
        assert dict(json.loads(done.stdout))["host"] == "udvr.svc.mesh"
        assert m.backends["n1-udvr-0"].paths == ["/headers"]


@trio_test(10)
async def test_unknown_service_is_502_and_keeps_the_connection(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        conn = await Conn.open(m)
        await conn.send(get("/", "nope.svc.mesh"))
        reply = await conn.response()
        assert reply.status == 502
        assert reply.header("hostmesh-error") == "unknown-service"
        assert reply.body.endswith(b"\n")
        assert reply.body.count(b"\n") == 1
        assert b"nope" in reply.body
        assert m.agent.proxy.stats.refused == {"unknown-service": 1}
        await conn.send(get())
        assert (await conn.response()).body == b"n1-udvr-0\n"
        await conn.aclose()


@trio_test(10)
async def test_http_1_0_clients(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        # No keep-alive: the body is delimited by the close (never chunked to HTTP/1.0).
        conn = await Conn.open(m)
        await conn.send(b"GET /bytes/100000 HTTP/1.0\r\nHost: udvr\r\n\r\n")
        _status, headers = await conn.head()
        assert ("transfer-encoding", "chunked") not in headers
        assert await conn.rest() == b"x" * 100_000
        # Keep-alive asked for: the connection carries a second request.
        conn = await Conn.open(m)
        for _ in range(2):
            await conn.send(head("GET / HTTP/1.0", "Host: udvr", "Connection: keep-alive"))
            assert (await conn.response()).body == b"n1-udvr-0\n"
        await conn.aclose()


# --- 2. keep-alive --------------------------------------------------------------------------


@trio_test(10)
async def test_one_client_connection_reuses_one_upstream_connection(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        (backend,) = await m.add_node("n1", "dev-1a", "udvr")
        conn = await Conn.open(m)
        for i in range(10):
            await conn.send(get(f"/?i={i}"))
            reply = await conn.response()
            assert reply.status == 200
            assert reply.header("connection") is None  # still keep-alive
        # Pipelined: two requests in one write.
        await conn.send(get("/?a") + get("/?b"))
        assert (await conn.response()).status == 200
        assert (await conn.response()).status == 200
        await conn.aclose()
        assert backend.hits == 12
        assert backend.connections == 1
        assert m.agent.proxy.stats.upstream_connections == 1


@trio_test(10)
async def test_upstream_closing_after_connection_close_is_not_an_error(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        (backend,) = await m.add_node("n1", "dev-1a", "udvr")
        async with m.client() as c:
            for _ in range(3):
                assert (await c.get("/close", headers={"Host": "udvr"})).status_code == 200
                assert (await c.get("/", headers={"Host": "udvr"})).status_code == 200
                r = await c.post("/count", headers={"Host": "udvr"}, content=b"x" * 200_000)
                assert r.text.startswith("200000 ")
        assert backend.connections == 4
        assert m.agent.proxy.stats.refused == {}


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


class ClosesAfterOne:
    """Answers one request per connection keep-alive, then closes the connection:
    at once (a server with a short idle timeout), or when the next request
    arrives (the race no liveness check can see)."""

    def __init__(self, *, on_next_request: bool) -> None:
        self.on_next_request = on_next_request
        self.closed = 0  # connections this server has hung up

    async def __call__(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        if await read_request(stream, buf) is not None:
            await stream.send_all(OK)
            if self.on_next_request:
                await read_request(stream, buf)
        await stream.aclose()
        self.closed += 1


@pytest.mark.parametrize("on_next_request", [False, True], ids=["idle-close", "close-on-request"])
@trio_test(10)
async def test_pooled_connection_closed_by_upstream_is_never_an_error(
    tmp_path: Path, on_next_request: bool
) -> None:
    server = ClosesAfterOne(on_next_request=on_next_request)
    small_post = head("POST /up HTTP/1.1", "Host: flaky", "Content-Length: 5") + b"hello"
    big_post = head("POST /up HTTP/1.1", "Host: flaky", "Content-Length: 200000") + b"x" * 200_000
    # A small body is held whole, so a request that met a dead pooled connection
    # is sent again on a fresh one; a streamed body cannot be, so a big one only
    # goes where the pool can see that the upstream has closed.
    requests = [small_post, get("/1", "flaky"), small_post, get("/2", "flaky")]
    if not on_next_request:
        requests += [big_post, big_post]

    async def hung_up(n: int) -> None:
        await until(lambda: server.closed == n)

    async with mesh(tmp_path) as m:
        await raw_service(m, "flaky", server)
        conn = await Conn.open(m)
        for i, request in enumerate(requests):
            await conn.send(request)
            reply = await conn.response()
            assert (reply.status, reply.body) == (200, b"ok\n"), i
            if not on_next_request:
                await hung_up(i + 1)
        await conn.aclose()
        assert m.agent.proxy.stats.refused == {}


# --- 3. bodies ------------------------------------------------------------------------------


@trio_test(15)
async def test_content_length_and_chunked_uploads_echo(tmp_path: Path) -> None:
    payload = random.Random(1).randbytes(3 * MB)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        async with m.client() as c:
            for size in (0, 1, 1000, 64 * 1024, 64 * 1024 + 1, len(payload)):
                r = await c.post("/echo", headers={"Host": "udvr"}, content=payload[:size])
                assert r.status_code == 200
                assert r.content == payload[:size], size
            r = await c.post("/echo", headers={"Host": "udvr"}, content=pieces())
            assert r.request.headers["transfer-encoding"] == "chunked"
            assert r.content == payload
        # A hand-made chunked body with an extension and a trailer, whole and byte by byte.
        body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n"
        start = head("POST /echo HTTP/1.1", "Host: udvr", "Transfer-Encoding: chunked")
        conn = await Conn.open(m)
        await conn.send(start + body)
        assert (await conn.response()).body == b"hello world"
        await conn.send(start)
        for i in range(len(body)):
            await conn.send(body[i : i + 1])
        assert (await conn.response()).body == b"hello world"
        await conn.aclose()


TRAILED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
    b"5;name=first\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 3e25960a\r\nX-Count: 2\r\n\r\n"
)


@pytest.mark.parametrize("byte_at_a_time", [False, True], ids=["whole", "bytewise"])
@trio_test(10)
async def test_chunked_response_trailers_pass_through(tmp_path: Path, byte_at_a_time: bool) -> None:
    async with mesh(tmp_path) as m:
        await raw_service(m, "trailers", answering(TRAILED, OK, byte_at_a_time=byte_at_a_time))
        conn = await Conn.open(m)
        await conn.send(get("/", "trailers", "TE: trailers"))
        reply = await conn.response()
        assert reply.status == 200
        assert reply.body == b"hello world"
        assert reply.trailers == b"X-Checksum: 3e25960a\r\nX-Count: 2\r\n"
        # The body's end was found exactly: the next response on both connections is intact.
        await conn.send(get("/", "trailers"))
        assert (await conn.response()).body == b"ok\n"
        await conn.aclose()


@trio_test(10)
async def test_bodiless_responses_carry_no_body(tmp_path: Path) -> None:
    not_modified = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n'
    no_content = b"HTTP/1.1 204 No Content\r\nX-Done: 1\r\n\r\n"
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        await raw_service(m, "empty", answering(not_modified, no_content, OK))
        conn = await Conn.open(m)
        await conn.send(b"HEAD / HTTP/1.1\r\nHost: udvr\r\n\r\n")
        reply = await conn.response("HEAD")
        assert (reply.status, reply.header("content-length")) == (200, "10")
        await conn.send(get("/", "empty", 'If-None-Match: "v1"'))
        reply = await conn.response()
        assert (reply.status, reply.header("etag")) == (304, '"v1"')
        await conn.send(get("/", "empty"))
        reply = await conn.response()
        assert (reply.status, reply.header("x-done")) == (204, "1")
        # Had any body bytes followed, they would now sit in front of this response.
        await conn.send(get("/", "empty"))
        assert (await conn.response()).body == b"ok\n"
        await conn.send(get())
        assert (await conn.response()).body == b"n1-udvr-0\n"
        await conn.aclose()


@trio_test(20)
async def test_expect_100_continue_upload_with_curl(tmp_path: Path) -> None:
    data = random.Random(2).randbytes(2 * MB)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        t0 = trio.current_time()
        done = await trio.run_process(
            ["curl", "-sS", "-v", "--max-time", "15", "--expect100-timeout", "10",
             "-H", "Host: udvr", "-H", "Expect: 100-continue",
             "--data-binary", f"@{path}", f"{m.proxy_url}/count"],
            capture_stdout=True, capture_stderr=True, env=curl_env(),
        )  # fmt: skip
        assert done.stdout.decode() == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"
        assert b"< HTTP/1.1 100 Continue" in done.stderr
        assert trio.current_time() - t0 < 5  # curl did not sit out its expect timeout


async def continue_then_count(stream: trio.SocketStream) -> None:
    """A server that sends 100 Continue itself, then answers with the body's length."""
    buf = bytearray()
    while True:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            data = await stream.receive_some(64 * 1024)
            if not data:
                return
            buf += data
        request = bytes(buf[: end + 4])
        del buf[: end + 4]
        if b"\r\nExpect: 100-continue\r\n" in request:
            await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        found = re.search(rb"(?i)\r\ncontent-length: (\d+)", request)
        length = int(found.group(1)) if found else 0
        while len(buf) < length:
            buf += await stream.receive_some(64 * 1024)
        del buf[:length]
        answer = b"%d\n" % length
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
        )


@trio_test(10)
async def test_expect_100_continue_from_the_upstream_is_relayed_once(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await raw_service(m, "up", continue_then_count)
        conn = await Conn.open(m)
        t0 = trio.current_time()
        await conn.send(head("POST /up HTTP/1.1", "Host: up", "Content-Length: 100000",
                             "Expect: 100-continue"))  # fmt: skip
        assert (await conn.head())[0] == 100
        assert trio.current_time() - t0 < 0.5  # the upstream's, not the proxy's own
        await conn.send(b"y" * 100_000)
        reply = await conn.response()
        assert (reply.status, reply.body) == (200, b"100000\n")
        await conn.send(get("/", "up"))
        assert (await conn.head())[0] == 200  # no second 100 was left in the stream
        await conn.aclose()


async def refuse_before_body(stream: trio.SocketStream) -> None:
    """A server that answers 417 as soon as it has the head, then would read the body."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(64 * 1024)
    await stream.send_all(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
    while await stream.receive_some(64 * 1024):
        pass


@pytest.mark.xfail(reason="early final answer to Expect keeps the connections", strict=True)
@trio_test(10)
async def test_early_final_answer_to_expect_closes_both_connections(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await raw_service(m, "strict", refuse_before_body)
        conn = await Conn.open(m)
        await conn.send(head("POST /up HTTP/1.1", "Host: strict", "Content-Length: 100000",
                             "Expect: 100-continue"))  # fmt: skip
        reply = await conn.response()
        assert reply.status == 417
        # The body was never read: neither connection can carry another request
        # (RFC 9110 §10.1.1), or the body would be parsed as the next one.
        assert reply.header("connection") == "close"
        await conn.aclose()
        await until(lambda: m.agent.proxy.stats.upstream_connections == 0)


@trio_test(10)
async def test_hop_by_hop_headers_are_removed(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        got = await backend_headers(
            m,
            "Connection: X-Foo, keep-alive",
            "X-Foo: 1",
            "Keep-Alive: timeout=5",
            "Proxy-Authorization: Basic c2VjcmV0",
            "Proxy-Connection: keep-alive",
            "TE: trailers",
            "Upgrade: h2c",
            "X-Kept: yes",
        )
        names = {k for k, _ in got}
        assert names.isdisjoint({"connection", "x-foo", "keep-alive", "proxy-authorization",
                                 "proxy-connection", "te", "upgrade"}), got  # fmt: skip
        assert ("x-kept", "yes") in got


@trio_test(10)
async def test_response_hop_by_hop_headers_are_removed(tmp_path: Path) -> None:
    response = (b"HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Kept: yes\r\n"
                b"Content-Length: 3\r\n\r\nok\n")  # fmt: skip
    async with mesh(tmp_path) as m:
        await raw_service(m, "hop", answering(response, response))
        conn = await Conn.open(m)
        for _ in range(2):
            await conn.send(get("/", "hop"))
            reply = await conn.response()
            names = {k for k, _ in reply.headers}
            assert names.isdisjoint({"x-secret", "keep-alive", "proxy-authenticate", "connection"})
            assert (reply.header("x-kept"), reply.body) == ("yes", b"ok\n")
        await conn.aclose()


@trio_test(10)
async def test_x_forwarded_for_is_added_or_appended(tmp_path: Path) -> None:
    def xff(headers: list[tuple[str, str]]) -> str:
        return ", ".join(v for k, v in headers if k == "x-forwarded-for")

    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        assert xff(await backend_headers(m)) == "127.0.0.1"
        assert xff(await backend_headers(m, "X-Forwarded-For: 10.0.0.1")) == "10.0.0.1, 127.0.0.1"
        two = await backend_headers(m, "X-Forwarded-For: 10.0.0.1", "x-forwarded-for: 10.0.0.2")
        assert xff(two) == "10.0.0.1, 10.0.0.2, 127.0.0.1"


@trio_test(10)
async def test_traceparent_is_created_or_propagated(tmp_path: Path) -> None:
    def traces(headers: list[tuple[str, str]]) -> list[str]:
        return [v for k, v in headers if k == "traceparent"]

    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        (first,) = traces(await backend_headers(m))
        (second,) = traces(await backend_headers(m))
        assert TRACEPARENT.fullmatch(first)
        assert TRACEPARENT.fullmatch(second)
        assert first[3:35] != second[3:35]  # a new trace per request
        got = await backend_headers(m, f"traceparent: {SPEC_TRACEPARENT}")
        assert traces(got) == [SPEC_TRACEPARENT]
        got = await backend_headers(m, f"Traceparent: {SPEC_TRACEPARENT}",
                                    f"traceparent: {first}")  # fmt: skip
        assert traces(got) == [SPEC_TRACEPARENT]
        invalid = [
            "garbage",
            "00-" + "0" * 32 + "-b7ad6b7169203331-01",  # all-zero trace id
            "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",  # all-zero parent id
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # uppercase
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0",  # short
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
        ]
        for value in invalid:
            (new,) = traces(await backend_headers(m, f"traceparent: {value}"))
            assert TRACEPARENT.fullmatch(new), value


@trio_test(10)
async def test_client_mesh_headers_are_stripped(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        got = await backend_headers(
            m, "hostmesh-source: spiffe://mesh/evil", "Hostmesh-Error: none", "X-Hostmesh: kept"
        )
        assert [k for k, _ in got if k.startswith("hostmesh-")] == []
        assert ("x-hostmesh", "kept") in got


# --- 4. big bodies stream ---------------------------------------------------------------------


class RssWatch:
    """The peak resident set size of this process (agent included) while it runs."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            await trio.sleep(0.005)

    @property
    def growth(self) -> int:
        return self.peak - self.base


BIG = 100 * MB
RSS_LIMIT = 30 * MB


@trio_test(40)
async def test_100mb_upload_streams(tmp_path: Path) -> None:
    block = random.Random(3).randbytes(MB)
    expected = hashlib.sha256()
    for _ in range(BIG // MB):
        expected.update(block)

    async def content() -> AsyncIterator[bytes]:
        for _ in range(BIG // MB):
            for i in range(0, MB, 64 * 1024):
                yield block[i : i + 64 * 1024]

    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        async with m.client() as c, trio.open_nursery() as nursery:
            await c.get("/", headers={"Host": "udvr"})  # warm up
            watch = RssWatch()
            nursery.start_soon(watch.run)
            r = await c.post("/count", content=content(),
                             headers={"Host": "udvr", "Content-Length": str(BIG)})  # fmt: skip
            nursery.cancel_scope.cancel()
        assert r.text == f"{BIG} {expected.hexdigest()}\n"
        assert watch.growth < RSS_LIMIT, f"RSS grew {watch.growth / MB:.1f} MB"


@trio_test(40)
async def test_100mb_download_streams(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        async with m.client() as c, trio.open_nursery() as nursery:
            await c.get("/", headers={"Host": "udvr"})  # warm up
            watch = RssWatch()
            nursery.start_soon(watch.run)
            received = 0
            async with c.stream("GET", f"/bytes/{BIG}", headers={"Host": "udvr"}) as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    assert chunk.count(b"x") == len(chunk)
                    received += len(chunk)
            nursery.cancel_scope.cancel()
        assert received == BIG
        assert watch.growth < RSS_LIMIT, f"RSS grew {watch.growth / MB:.1f} MB"


# --- 5. WebSocket -----------------------------------------------------------------------------


async def ws_echo(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except trio_websocket.ConnectionClosed:
        pass


@trio_test(10)
async def test_websocket_upgrade_echoes_text_and_binary(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        server = await m.nursery.start(trio_websocket.serve_websocket, ws_echo, "127.0.0.1", 0,
                                       None)  # fmt: skip
        await add_instance(m, "echo", server.port)
        host, port = m.addrs.proxy
        messages: list[str | bytes] = [
            "hello", "héllo wörld ✓", "", bytes(range(256)) * 1000, b"", b"\x00\xff" * 7,
        ]  # fmt: skip
        async with trio.open_nursery() as nursery:
            stream = await trio.open_tcp_stream(host, port)
            ws = await trio_websocket.wrap_client_stream(nursery, stream, host="echo",
                                                         resource="/chat")  # fmt: skip
            for message in messages:
                await ws.send_message(message)
                got = await ws.get_message()
                assert type(got) is type(message)
                assert got == message
            await ws.aclose()
            assert ws.closed is not None
            assert ws.closed.code == 1000
        stats = m.agent.proxy.stats
        await until(lambda: stats.open_connections == 0 and stats.upstream_connections == 0)
        await serves(m)


# --- 6. abuse ---------------------------------------------------------------------------------


ABUSE = [
    ("cl-and-te", head("POST /echo HTTP/1.1", "Host: udvr", "Content-Length: 5",
                       "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400, "bad-framing"),
    ("two-content-lengths", head("POST /echo HTTP/1.1", "Host: udvr", "Content-Length: 5",
                                 "Content-Length: 6") + b"hello!", 400, "bad-framing"),
    ("content-length-list", head("POST /echo HTTP/1.1", "Host: udvr", "Content-Length: 5, 6")
     + b"hello!", 400, "bad-framing"),
    ("content-length-sign", head("POST /echo HTTP/1.1", "Host: udvr", "Content-Length: +5")
     + b"hello", 400, "bad-framing"),
    ("te-gzip", head("POST /echo HTTP/1.1", "Host: udvr", "Transfer-Encoding: gzip"),
     400, "bad-framing"),
    # Chunked twice, or after another coding: codings the proxy cannot frame (RFC 9112 §6.1).
    ("te-chunked-twice", head("POST /echo HTTP/1.1", "Host: udvr", "Transfer-Encoding: chunked",
                              "Transfer-Encoding: chunked"), 501, "unsupported-transfer-coding"),
    ("te-gzip-chunked", head("POST /echo HTTP/1.1", "Host: udvr",
                             "Transfer-Encoding: gzip, chunked"),
     501, "unsupported-transfer-coding"),
    ("invalid-header-name", head("GET / HTTP/1.1", "Host: udvr", "X Foo: 1"), 400, "bad-header"),
    ("space-before-colon", head("GET / HTTP/1.1", "Host: udvr", "X-Foo : 1"), 400, "bad-header"),
    ("obs-fold", head("GET / HTTP/1.1", "Host: udvr", "X-Foo: a", " b"), 400, "bad-header"),
    ("nul-in-value", head("GET / HTTP/1.1", "Host: udvr", "X-Foo: a\x00b"), 400, "bad-header"),
    ("bare-cr-in-value", head("GET / HTTP/1.1", "Host: udvr", "X-Foo: a\rb"), 400, "bad-header"),
    ("bare-lf-line", head("GET / HTTP/1.1", "Host: udvr\nX-Foo: 1"), 400, "bad-header"),
    ("request-line-too-long", head("GET /" + "a" * 9000 + " HTTP/1.1", "Host: udvr"),
     414, "uri-too-long"),
    ("request-line-unended", b"GET /" + b"a" * 20000, 414, "uri-too-long"),
    ("headers-too-large", head("GET / HTTP/1.1", "Host: udvr",
                               *(f"X-H{i}: {'v' * 1000}" for i in range(40))),
     431, "headers-too-large"),
    ("too-many-headers", head("GET / HTTP/1.1", "Host: udvr", *(f"X-H{i}: 1" for i in range(101))),
     431, "headers-too-large"),
    ("garbage", random.Random(4).randbytes(300).replace(b"\r", b"") + b"\r\n\r\n",
     400, "bad-request-line"),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad-request-line"),
    ("lowercase-version", head("GET / http/1.1", "Host: udvr"), 400, "bad-request-line"),
    ("missing-host", head("GET / HTTP/1.1"), 400, "missing-host"),
    ("te-in-http-1.0", head("POST /echo HTTP/1.0", "Host: udvr", "Transfer-Encoding: chunked")
     + b"0\r\n\r\n", 400, "bad-framing"),
    ("userinfo-in-uri", head("GET http://user:pw@udvr/ HTTP/1.1", "Host: udvr"),
     400, "bad-request-target"),
    ("asterisk-target", head("OPTIONS * HTTP/1.1", "Host: udvr"), 400, "bad-request-target"),
    ("https-uri", head("GET https://udvr/ HTTP/1.1", "Host: udvr"), 501, "unsupported-method"),
    ("connect", head("CONNECT udvr:443 HTTP/1.1", "Host: udvr:443"), 501, "unsupported-method"),
    ("bad-expect", head("POST /echo HTTP/1.1", "Host: udvr", "Content-Length: 2",
                        "Expect: 200-ok") + b"hi", 417, "bad-expect"),
    ("bad-chunk-size", head("POST /echo HTTP/1.1", "Host: udvr", "Transfer-Encoding: chunked")
     + b"zz\r\nhello\r\n0\r\n\r\n", 400, "bad-chunk"),
    ("chunk-longer-than-size", head("POST /echo HTTP/1.1", "Host: udvr",
                                    "Transfer-Encoding: chunked")
     + b"2\r\nhello\r\n0\r\n\r\n", 400, "bad-chunk"),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status", "reason"),
                         [case[1:] for case in ABUSE], ids=[case[0] for case in ABUSE])  # fmt: skip
@trio_test(10)
async def test_malformed_request_is_refused(
    tmp_path: Path, request_bytes: bytes, status: int, reason: str
) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        conn = await Conn.open(m)
        await conn.send(request_bytes)
        reply = await conn.response()
        assert (reply.status, reply.header("hostmesh-error")) == (status, reason)
        assert reply.header("connection") == "close"
        assert reply.body.startswith(b"hostmesh: ")
        assert reply.body.count(b"\n") == 1
        assert await conn.rest() == b""  # and the connection is closed
        await conn.aclose()
        stats = m.agent.proxy.stats
        assert stats.refused == {reason: 1}
        await until(lambda: stats.upstream_connections == 0)  # nothing half-sent stays open
        await serves(m)


@trio_test(10)
async def test_slow_client_gets_408(tmp_path: Path) -> None:
    async with mesh(tmp_path, proxy=ProxyConfig(bind="127.0.0.1:0", header_timeout=0.5)) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        # Half a head, then nothing; and a slowloris trickling a byte every 100 ms.
        stalled = await Conn.open(m)
        await stalled.send(b"GET / HTTP/1.1\r\nHost: ud")
        trickle = await Conn.open(m)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def drip() -> None:
                for byte in b"GET / HTTP/1.1\r\nHost: udvr\r\nX-Slow: " + b"z" * 100:
                    await trickle.send(bytes([byte]))
                    await trio.sleep(0.1)

            nursery.start_soon(drip)
            for conn in (stalled, trickle):
                reply = await conn.response()
                assert (reply.status, reply.header("hostmesh-error")) == (408, "header-timeout")
                assert trio.current_time() - t0 < 2
            nursery.cancel_scope.cancel()
        for conn in (stalled, trickle):
            await conn.aclose()
        assert m.agent.proxy.stats.refused == {"header-timeout": 2}
        await serves(m)


@trio_test(10)
async def test_an_upstream_stalling_mid_body_is_cut_after_the_idle_timeout(tmp_path: Path) -> None:
    cfg = ProxyConfig(bind="127.0.0.1:0", idle_timeout=0.5)
    async with mesh(tmp_path, proxy=cfg) as m:
        await m.add_node("n1", "dev-1a", "udvr")

        async def stall(stream: trio.SocketStream) -> None:
            if await read_request(stream, bytearray()) is not None:
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                await trio.sleep_forever()

        await raw_service(m, "stall", stall)
        conn = await Conn.open(m)
        await conn.send(get("/", "stall"))
        t0 = trio.current_time()
        status, _ = await conn.head()
        assert status == 200
        assert await conn.rest() == b"0123456789"  # then the proxy hangs up
        assert 0.4 < trio.current_time() - t0 < 2
        await conn.aclose()
        assert m.agent.proxy.stats.refused == {"body-timeout": 1}
        await until(lambda: m.agent.proxy.stats.upstream_connections == 0)
        await serves(m)


@trio_test(10)
async def test_an_unanswered_connect_fails_over_after_the_connect_timeout(tmp_path: Path) -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, so a
    # connect to it hangs, as to a host that went dark.
    dark = socket.socket()
    dark.bind(("127.0.0.1", 0))
    dark.listen(0)
    fillers = []
    try:
        while True:  # fill the queue until a connect no longer completes at once
            s = socket.socket()
            s.setblocking(False)
            fillers.append(s)
            if s.connect_ex(dark.getsockname()) != 0:
                break
        cfg = ProxyConfig(bind="127.0.0.1:0", connect_timeout=0.3)
        async with mesh(tmp_path, proxy=cfg) as m:
            await add_instance(m, "darkness", dark.getsockname()[1])
            conn = await Conn.open(m)
            t0 = trio.current_time()
            await conn.send(get("/", "darkness"))
            reply = await conn.response()
            assert (reply.status, reply.header("hostmesh-error")) == (502, "connect-failed")
            assert b"timed out" in reply.body
            # Three tries (the default route retries connect failures twice), 0.3 s each.
            assert 0.8 < trio.current_time() - t0 < 3
            await conn.aclose()
            await m.add_node("n1", "dev-1a", "udvr")
            await serves(m)
    finally:
        for s in fillers:
            s.close()
        dark.close()


@trio_test(10)
async def test_drain_answers_what_was_sent_and_closes_idle_connections(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        idle, racing, busy = await Conn.open(m), await Conn.open(m), await Conn.open(m)
        for conn in (idle, racing):
            await conn.send(get())
            assert (await conn.response()).status == 200  # now idle on keep-alive
        await busy.send(get("/sleep/0.5"))
        await trio.sleep(0.05)
        m.agent.proxy.begin_drain()
        # Sent before the proxy task hears of the drain: it must be answered.
        os.write(racing.stream.socket.fileno(), get())
        async with trio.open_nursery() as nursery:
            done: list[bool] = []

            async def drain() -> None:
                with trio.move_on_after(5):
                    await m.agent.proxy.drain()
                done.append(m.agent.proxy.drained)

            nursery.start_soon(drain)
            for conn in (racing, busy):
                reply = await conn.response()
                assert (reply.status, reply.header("connection")) == (200, "close")
                assert await conn.rest() == b""
            assert await idle.rest() == b""  # closed without a word: it had asked nothing
        assert done == [True]
        with pytest.raises(OSError):
            await trio.open_tcp_stream(*m.addrs.proxy)  # no longer accepting
        for conn in (idle, racing, busy):
            await conn.aclose()


@trio_test(10)
async def test_connection_cap_refuses_the_extra_connection(tmp_path: Path) -> None:
    async with mesh(tmp_path, proxy=ProxyConfig(bind="127.0.0.1:0", max_connections=2)) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        stats = m.agent.proxy.stats
        held = [await Conn.open(m), await Conn.open(m)]
        for conn in held:
            await conn.send(get())
            assert (await conn.response()).status == 200  # accepted and kept open
        extra = await Conn.open(m)
        reply = await extra.response()
        assert (reply.status, reply.header("hostmesh-error")) == (503, "too-many-connections")
        assert await extra.rest() == b""
        await extra.aclose()
        assert stats.connections_refused == 1
        # The held connections still work; once one closes, a new one is served.
        await held[0].send(get())
        assert (await held[0].response()).status == 200
        await held[1].aclose()
        await until(lambda: stats.open_connections < 2)
        await serves(m)
        await held[0].aclose()


@trio_test(10)
async def test_client_disconnecting_mid_body(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        (backend,) = await m.add_node("n1", "dev-1a", "udvr")
        stats = m.agent.proxy.stats
        for size, sent in ((1000, 10), (MB, 300_000)):  # held whole; streamed
            conn = await Conn.open(m)
            await conn.send(head("POST /count HTTP/1.1", "Host: udvr",
                                 f"Content-Length: {size}") + b"x" * sent)  # fmt: skip
            await conn.aclose()
        await until(lambda: stats.open_connections == 0)
        await until(lambda: stats.upstream_connections == 0)
        assert stats.refused == {"incomplete-request": 2}
        await serves(m)
        assert backend.paths == ["/count", "/"]


@trio_test(20)
async def test_clients_resetting_mid_upload_do_not_fail_the_upstream(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backends = await m.add_node("n1", "dev-1a", "udvr", 2)
        stats = m.agent.proxy.stats

        async def arrived(n: int) -> None:
            await until(lambda: sum(b.hits for b in backends) == n)

        for i in range(12):  # more than the 5 consecutive failures that eject an instance
            conn = await Conn.open(m)
            await conn.send(head("POST /count HTTP/1.1", "Host: udvr",
                                 f"Content-Length: {MB}") + b"x" * 200_000)  # fmt: skip
            await arrived(i + 1)  # the proxy is streaming the body
            conn.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await conn.aclose()  # RST
        await until(lambda: stats.open_connections == 0 and stats.upstream_connections == 0)
        assert stats.refused == {"incomplete-request": 12}
        text = await metrics(m)
        assert metric_sum(text, "hostmesh_proxy_instance_failures_total") == 0
        assert metric_sum(text, "hostmesh_proxy_ejections_total") == 0


# Upstream answers the proxy must not pass on as if they were valid.
BAD_UPSTREAM = [
    ("bad-status-line", b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n"),
    ("bad-header", b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 0\r\n\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n"),
    ("two-lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab"),
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("te-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx"),
    ("not-http", b"SSH-2.0-OpenSSH_9.6\r\n"),
    ("endless-head", b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 10_000),
]


@pytest.mark.parametrize("response", [r for _, r in BAD_UPSTREAM], ids=[i for i, _ in BAD_UPSTREAM])
@trio_test(10)
async def test_malformed_upstream_response_is_502(tmp_path: Path, response: bytes) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        await raw_service(m, "broken", answer_then_hang_up(response))
        conn = await Conn.open(m)
        await conn.send(get("/", "broken"))
        reply = await conn.response()
        assert (reply.status, reply.header("hostmesh-error")) == (502, "bad-upstream-response")
        assert reply.body.count(b"\n") == 1
        await conn.aclose()
        stats = m.agent.proxy.stats
        assert stats.refused == {"bad-upstream-response": 1}
        await until(lambda: stats.upstream_connections == 0)
        await serves(m)


TRUNCATED = [
    ("short-content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
    ("bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"),
    ("unended-chunks", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
]


@pytest.mark.parametrize("response", [r for _, r in TRUNCATED], ids=[i for i, _ in TRUNCATED])
@trio_test(10)
async def test_upstream_failing_mid_body_cuts_the_client_connection(
    tmp_path: Path, response: bytes
) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr")
        await raw_service(m, "cut", answer_then_hang_up(response))
        conn = await Conn.open(m)
        await conn.send(get("/", "cut"))
        status, _headers = await conn.head()
        assert status == 200  # already on its way when the body failed
        rest = await conn.rest()
        # The client sees a truncated body and a closed connection, never a
        # second response glued onto the first.
        assert b"HTTP/1.1" not in rest
        assert not rest.endswith(b"0\r\n\r\n")
        assert len(rest) < 100
        await conn.aclose()
        await until(lambda: m.agent.proxy.stats.upstream_connections == 0)
        await serves(m)

"""The outbound HTTP/1.1 proxy on 127.0.0.1:4140.

A program on the host sends ``GET /path`` with ``Host: udvr`` (or
``udvr.svc.mesh``, or an absolute URI through ``http_proxy``); the proxy picks
an instance of ``udvr`` through the :class:`~hostmesh.agent._routing.Router`
(routes, splits, zone-aware balancing, ejection, limits), forwards the
request over a pooled keep-alive connection, and streams the response back.

Heads are validated by :mod:`._http1` and forwarded as the original lines
minus hop-by-hop fields plus ``X-Forwarded-For`` and ``traceparent``; bodies
stream in both directions. Retries happen only before anything of the
response has reached the client, for requests whose body is held whole in a
small replay buffer. Every refusal answers with a status, a
``hostmesh-error`` header naming the reason, and a one-line body.

Error statuses: 400/414/431 malformed request, 408 slow client, 404 no route
matched, 417 unsupported Expect, 429 rate limited, 502 unknown service,
connect failure or bad upstream response, 503 no healthy instance or
overloaded, 504 timeout.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import time
import types
from collections.abc import Callable, Collection, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio

from hostmesh._config import ProxyConfig
from hostmesh._log import get_logger

from ._deadline import Deadline, DeadlineExceeded, Timer
from ._http1 import (
    HOP_BY_HOP,
    MAX_HEAD_BYTES,
    MAX_REQUEST_LINE,
    MESH_PREFIX,
    ChunkedScanner,
    Head,
    HttpError,
    body_framing,
    parse_request_head,
    parse_response_head,
    response_framing,
    usual_request,
    usual_response,
)
from ._loop import Driven, Loop, checkpoint, to_trio
from ._pool import CHECKPOINT_EVERY, RECV_SIZE, ConnectError, Pool, Stream, connect
from ._resilience import REPLAY_BUFFER, may_retry
from ._routing import Endpoint, Lane, Router

if TYPE_CHECKING:
    from hostmesh._routes import Route

    from ._intentions import Intentions
    from ._mtls import MeshTls

__all__ = [
    "Proxy",
    "ProxyStats",
    "RouteLike",
    "error_response",
    "kept_lines",
    "response_fields",
    "without_keep_alive",
]

_log = get_logger(__name__)

_PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
#: Errors an inbound agent answers for the instance it was asked for (it is
#: down or gone) that the calling agent handles as a failed try: retried on
#: another instance and counted for ejection. (reason, the request reached it)
_HOP_FAILURES = {b"connect-failed": False, b"no-instance": False, b"upstream-reset": True}
#: A version-00 traceparent; all-zero trace and parent ids are invalid (W3C
#: Trace Context §3.2.2). Anything else is replaced by a new trace.
#: How long an ``Expect: 100-continue`` request waits for the upstream's 100
#: before the body is sent anyway (RFC 9110 §10.1.1: many servers never send
#: one); curl's and Go's http.Transport's default is also 1 s.
EXPECT_CONTINUE_WAIT = 1.0
#: How long a draining proxy keeps an idle keep-alive connection open. A
#: client that has just had an answer sends its next request within this;
#: closing at once would race that request (RFC 9112 §9.6), which the client
#: would see as a failure. Requests arriving meanwhile are answered, with
#: ``Connection: close``.
DRAIN_IDLE_GRACE = 1.0
#: Distinct Host values whose service name is remembered (a client sending
#: random ones only fills it once).
_HOSTS_CACHED = 4096
_TRACEPARENT = re.compile(rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def _drop_pattern(names: Iterable[bytes], *extra: bytes) -> re.Pattern[bytes]:
    """Matches the field lines named ``names`` (or an ``extra`` pattern) in a
    :attr:`~._http1.Head.section`, each with the CRLF before it."""
    alternatives = [re.escape(n) for n in sorted(names)] + list(extra)
    return re.compile(rb"\r\n(?:" + b"|".join(alternatives) + rb"):[^\r]*+", re.IGNORECASE)


#: What a request head loses on its way upstream: hop-by-hop and mesh fields
#: (and, in absolute form, Host); a response head: hop-by-hop fields.
_REQUEST_DROP = _drop_pattern(HOP_BY_HOP, re.escape(MESH_PREFIX) + rb"[^:]*+")
_REQUEST_DROP_ABSOLUTE = _drop_pattern(HOP_BY_HOP | {b"host"}, re.escape(MESH_PREFIX) + rb"[^:]*+")
_RESPONSE_DROP = _drop_pattern(HOP_BY_HOP)
_XFF = b"\r\nx-forwarded-for:"
#: The one hop-by-hop line a usual head may have (:data:`~._http1.USUAL_REQUEST`).
_KEEP_ALIVE_LINE = b"\r\nConnection: keep-alive\r\n"
_NOT_TRIED: frozenset[str] = frozenset()
_TRACE = b"\r\ntraceparent:"


def without_keep_alive(data: bytes, end: int) -> bytes | None:
    """``data``, a usual head (:func:`~._http1.usual_request`, :func:`~._http1.usual_response`)
    ending at ``end`` and what follows it, without its ``Connection: keep-alive`` line, as
    it is forwarded; None when it has two (left to the general path)."""
    cut = data.find(_KEEP_ALIVE_LINE, 0, end)
    if cut < 0:
        return data
    if data.find(_KEEP_ALIVE_LINE, cut + 2, end) >= 0:
        return None
    return data[:cut] + data[cut + len(_KEEP_ALIVE_LINE) - 2 :]


def response_fields(resp: Head, tokens: frozenset[bytes]) -> bytes:
    """The field lines of ``resp`` a client gets (each after a CRLF): all but the
    hop-by-hop ones and those its Connection fields (``tokens``) name."""
    if not tokens or _names_absent(resp, tokens):
        return _RESPONSE_DROP.sub(b"", resp.section)
    return kept_lines(resp, HOP_BY_HOP | tokens)


def kept_lines(head: Head, drop: frozenset[bytes]) -> bytes:
    """The field lines of ``head`` whose names are not in ``drop``, each after a CRLF
    (line by line: the reference the byte-level edits are tested against)."""
    return b"".join([b"\r\n" + line for (name, _), line in zip(head.fields, head.lines, strict=True)
                     if name not in drop])  # fmt: skip


def _names_absent(head: Head, tokens: frozenset[bytes]) -> bool:
    """Does no field named by ``tokens`` (Connection's) exist beyond the hop-by-hop ones?"""
    if tokens <= HOP_BY_HOP:  # keep-alive, upgrade: one set comparison
        return True
    return all(t in HOP_BY_HOP or not head.has(t) for t in tokens)


def _one_valid_trace(req: Head) -> bool:
    values = req.get_all(b"traceparent")
    return len(values) == 1 and _TRACEPARENT.fullmatch(values[0]) is not None


#: traceparent lines made per os.urandom call.
TRACE_BATCH = 512


class _TraceLines:
    """New ``traceparent`` field lines (each with the CRLF before it), made
    :data:`TRACE_BATCH` at a time.

    One batch is one ``os.urandom`` call, spread into copies of the line
    with one slice assignment per hex digit position, so that a request pays
    for one slice instead of formatting two numbers (a third of the
    express lane's routing cost). A batch holding an all-zero trace or
    parent id, which the format forbids (a chance of 2^-64 per line), is
    drawn again.
    """

    __slots__ = ("_at", "_lines")

    _PREFIX = b"\r\ntraceparent: 00-"
    _LINE = _PREFIX + b"0" * 32 + b"-" + b"0" * 16 + b"-01"
    #: where the 48 hex digits (trace id, then parent id) sit in _LINE
    _DIGITS = tuple(range(len(_PREFIX), len(_PREFIX) + 32)) + tuple(
        range(len(_PREFIX) + 33, len(_PREFIX) + 49)
    )

    def __init__(self) -> None:
        self._lines = b""
        self._at = 0  # the next line ends here; 0: the batch is used up

    def take(self) -> bytes:
        at = self._at
        if at == 0:
            self._lines = self._batch()
            at = len(self._lines)
        self._at = at = at - _TRACE_LINE_LENGTH
        return self._lines[at : at + _TRACE_LINE_LENGTH]

    def _batch(self) -> bytes:
        step = len(self._LINE)
        while True:
            digits = os.urandom(24 * TRACE_BATCH).hex().encode()
            lines = bytearray(self._LINE * TRACE_BATCH)
            for i, at in enumerate(self._DIGITS):
                lines[at::step] = digits[i::48]
            if b"-" + b"0" * 32 + b"-" not in lines and b"-" + b"0" * 16 + b"-01" not in lines:
                return bytes(lines)


_TRACE_LINE_LENGTH = len(_TraceLines._LINE)  # (a global: read twice per request)
#: A ``traceparent`` field line (with the CRLF before it) starting a new trace:
#: random ids, as W3C Trace Context asks.
_new_traceparent = _TraceLines().take


def _head_tail(req: Head, *, chunked: bool, upgrade: bool) -> bytes:
    """The framing and upgrade fields the proxy sets, and the blank line."""
    if not chunked and not upgrade:
        return b"\r\n\r\n"
    tail = b"\r\nTransfer-Encoding: chunked" if chunked else b""
    if upgrade:
        tail += b"\r\nConnection: Upgrade\r\nUpgrade: " + (req.get(b"upgrade") or b"")
    return tail + b"\r\n\r\n"


def error_response(status: int, reason: str, detail: str, *, close: bool) -> bytes:
    """A complete small response naming the reason in ``hostmesh-error``."""
    body = f"hostmesh: {detail}\n".encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b"Error")),
        b"content-type: text/plain; charset=utf-8",
        b"content-length: %d" % len(body),
        b"hostmesh-error: " + reason.encode(),
    ]
    if close:
        head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@dataclass
class ProxyStats:
    """Counters of the proxy's own decisions (rendered by the agent's /metrics)."""

    refused: dict[str, int]  # reason -> client requests answered with an error
    open_connections: int = 0
    upstream_connections: int = 0
    connections_refused: int = 0  # over max_connections


class RouteLike(Protocol):
    """What one request's forwarding needs of its route (:class:`~._routing.RouteState`,
    or the inbound agent's fixed local instance)."""

    @property
    def route(self) -> Route: ...
    def admit(self, now: float) -> None: ...
    def release(self) -> None: ...
    def deposit(self, now: float) -> None: ...
    def withdraw(self, now: float) -> bool: ...
    def pick(self, tried: Collection[str], now: float) -> Endpoint: ...
    def finish(self, endpoint: Endpoint, ok: bool, latency: float, now: float) -> None: ...
    def count_response(self, status: int, duration: float) -> None: ...


class Conn:
    """One client connection's facts, learnt once: its address and who it is."""

    __slots__ = ("addr", "forwarded", "identity", "peer", "stream")

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.peer = addr[0]  # for X-Forwarded-For
        self.forwarded = b"X-Forwarded-For: " + self.peer.encode()  # the line a usual head gets
        # Workload identity, looked up once (with the mesh); the inbound side sets
        # the peer node's, from its certificate.
        self.identity: str | None = None
        self.stream: Stream | None = None


class _Attempt(Exception):
    """One try failed before anything reached the client; maybe retry."""

    def __init__(self, status: int, reason: str, detail: str, *, connected: bool) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.connected = connected  # the request may have reached the upstream


def _service_from_host(host: bytes, domain_suffix: bytes) -> bytes:
    """``udvr``, ``udvr:80``, ``udvr.svc.mesh``, ``UDVR.svc.mesh.:8080`` -> ``udvr``."""
    name = host.rsplit(b":", 1)[0] if b":" in host and not host.endswith(b"]") else host
    name = name.rstrip(b".").lower()
    if name.endswith(domain_suffix):
        name = name[: -len(domain_suffix)]
    return name


class Proxy:
    """Accepts local clients and proxies their requests. One per agent."""

    def __init__(
        self,
        config: ProxyConfig,
        router: Router,
        *,
        domain: str = "mesh",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.router = router
        self._suffix = f".svc.{domain}".encode()
        # Host value -> service name, as bytes and str (bounded)
        self._hosts: dict[bytes, tuple[bytes, str]] = {}
        self.stats = ProxyStats(refused={})
        self.pool = Pool(
            max_idle=config.pool_max_idle,
            max_per_upstream=config.pool_max_per_instance,
            idle_timeout=config.pool_idle_timeout,
            on_open=self._count_upstream,
        )
        self._clock = clock
        self._sem_free = config.max_connections
        self.timer = Timer()  # every client connection's deadline
        self.loop = Loop()  # drives the client connections (each escapes to Trio when it must)
        self.draining = False
        #: Usual exchanges take the express lane (see _client); False: all take _exchange.
        self.express = True
        self._accepting = trio.CancelScope()
        self._idle: set[Deadline] = set()  # connections waiting for their next request
        self._drained = trio.Event()  # set once draining and no connection is left
        # The mTLS hop (set by the agent when it has a node certificate authority):
        # instances of other nodes are reached through their agent, callers are
        # identified and intentions enforced. None: every instance is dialled directly.
        self.node = ""  # this node's name: its instances are dialled directly
        self.mesh: MeshTls | None = None
        # The caller's identity: ``identify_now`` may answer at once (sock_diag), else
        # ``identify`` runs in a thread (it may read /proc/net/tcp).
        self.identify_now: Callable[[tuple[str, int], tuple[str, int]], str | None] | None = None
        self.identify: Callable[[tuple[str, int], tuple[str, int]], str] | None = None
        self.intentions: Callable[[], Intentions] | None = None

    def _count_upstream(self, delta: int) -> None:
        self.stats.upstream_connections += delta

    def _refuse(self, reason: str) -> None:
        self.stats.refused[reason] = self.stats.refused.get(reason, 0) + 1

    # --- listening ---------------------------------------------------------------------

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``listener`` (bound, listening; this function closes it). Never returns."""
        listener.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_idle)
                nursery.start_soon(self.timer.run)
                nursery.start_soon(self.loop.run, nursery)
                task_status.started(listener.getsockname()[:2])
                with self._accepting:
                    await self._accept(listener, nursery)
                listener.close()  # drain(): new connections are refused from here
        finally:
            listener.close()
            self.pool.close()

    async def _accept(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        """Accept clients until cancelled (by :meth:`drain` or the agent's shutdown)."""
        while True:
            await trio.lowlevel.wait_readable(listener)
            while True:  # drain the accept queue per wake-up
                try:
                    sock, peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # EMFILE and friends: back off briefly
                    _log.warning("proxy accept failed", error=exc)
                    await trio.sleep(0.1)
                    break
                if self.stats.open_connections >= self.config.max_connections:
                    self.stats.connections_refused += 1
                    self._reject_connection(sock)
                    continue
                # (a generator: types.coroutine types it as an Awaitable)
                self.loop.spawn(cast(Driven, self._client(sock, peer)))

    async def drain(self) -> None:
        """Stop accepting, finish requests in flight, close idle connections.

        Responses from here carry ``Connection: close``; a connection waiting
        for its next request is closed at once (and one whose request is
        already in its socket gets it answered). Returns once no client
        connection is left; the caller bounds it (``proxy.drain_timeout``)
        and then cancels whatever is left.
        """
        self.begin_drain()
        await self._drained.wait()

    @property
    def drained(self) -> bool:
        """Draining, and no client connection left."""
        return self._drained.is_set()

    def begin_drain(self) -> None:
        """The part of :meth:`drain` that does not wait (a second call does nothing).

        Only the first call may move the idle deadlines: moving one again
        between its firing and its owner waking would clear ``fired``.
        """
        if self.draining:
            return
        self.draining = True
        self._accepting.cancel()
        close_at = self.timer.now() + DRAIN_IDLE_GRACE
        for dl in list(self._idle):
            if dl.at > close_at:
                dl.set(close_at)  # an idle connection that times out closes quietly
        if self.stats.open_connections == 0:
            self._drained.set()

    def _reject_connection(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(False)
            sock.send(error_response(503, "too-many-connections", "too many connections",
                                     close=True))  # fmt: skip
        except OSError:
            pass
        sock.close()

    async def _expire_idle(self) -> None:
        while True:
            await trio.sleep(max(1.0, self.config.pool_idle_timeout / 2))
            self.pool.expire(self._clock())

    # --- one client connection -------------------------------------------------------

    async def _open_client(self, sock: socket.socket, dl: Deadline, conn: Conn) -> Stream | None:
        """The client's stream (the inbound listener shakes hands here); None: refused."""
        return Stream(sock)

    @types.coroutine
    def _client(self, sock: socket.socket, addr: tuple[str, int]) -> Generator[Any, Any, None]:
        """One client connection, to its end.

        A generator (:func:`types.coroutine`): the usual waits, for the next request
        and for the upstream's answer, are yielded to the loop directly
        (:meth:`Deadline.trap`).

        The express lane proxies the usual exchange here, in this frame (a generator
        per request was 1.5% of one). Usual: a request
        :func:`~._http1.usual_request` matches (no body, nothing to drop), a Host
        seen before, a route, an idle pooled connection to the picked instance, and
        an answer that arrives with its head in one read, matches
        :func:`~._http1.usual_response`, has its whole body and is not to be
        retried. Each step does what :meth:`_exchange`'s helpers do for such a
        message, in fewer calls. The first step that finds anything else hands
        over: before routing, to :meth:`_exchange` (``keep`` None); after it, to
        :meth:`_forward` (:meth:`_hand_over`), where the request is in the middle
        of its first try. Used without the mesh only (no caller identity or
        intentions), for a plain (not TLS) client, while ``express`` is set.
        """
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dl = self.timer.deadline()
        self.stats.open_connections += 1
        client: Stream | None = None
        try:
            conn = Conn(addr)
            opened: Stream | None = yield from self._open_client(sock, dl, conn)
            client = conn.stream = opened
            if client is None:
                return
            idle_timeout = self.config.idle_timeout
            plain = type(client) is Stream  # not TLS: its socket is read and written directly
            express = plain and self.mesh is None and self.express
            first = True
            while True:
                head = None
                inline = plain and not (first or client.buf or self.draining)
                if inline:
                    # The usual keep-alive wait after an answer, inline (_read_head's
                    # first round): the next request usually comes in one read.
                    dl.set(self.timer.now() + idle_timeout)
                    self._idle.add(dl)
                    try:
                        trap = dl.trap(sock)
                        if trap is None:  # escaped to Trio (a tunnel, a 100-continue wait)
                            yield from dl.wait(sock)
                        else:
                            try:
                                yield trap
                            finally:
                                dl.waiting = None
                    except DeadlineExceeded:
                        # Draining closes idle connections; one whose request is
                        # already in the socket still gets it answered.
                        if not (self.draining and client.fill_nowait()):
                            return
                    finally:
                        self._idle.discard(dl)
                    if not client.buf:
                        try:
                            data = sock.recv(RECV_SIZE)
                        except BlockingIOError:
                            data = None  # woken without data: _read_head waits again
                        if data == b"":
                            return  # the client is done
                        if data is not None and data.find(b"\r\n\r\n") == len(data) - 4:
                            head = data  # one whole head, nothing after it
                        elif data is not None:
                            client.buf += data
                if head is None:  # anything else, and the rest of a head begun above
                    head = yield from self._read_head(client, dl, first)
                    if head is None:
                        return
                first = False
                keep: bool | None = None  # None: not usual, _exchange takes it
                while express:  # the express lane (see above); each way out is a break
                    m = usual_request(head)
                    if m is None:
                        break
                    method, host = m.group(1, 3)
                    known = self._hosts.get(host)
                    if known is None:
                        break  # its first request: _destination reads and caches the name
                    kept = without_keep_alive(head, len(head))
                    if kept is None:
                        break
                    service, name = known
                    lane = self.router.lane(name)
                    if lane is None:
                        break  # routes to match, or no such service: _exchange
                    now = self._clock()
                    endpoint = lane.begin(now)
                    if endpoint is None:
                        break  # refused, or no instance to take it at once: _exchange
                    up_head = kept[:-2] + conn.forwarded + _new_traceparent() + b"\r\n\r\n"
                    upstream = self.pool.take_idle(endpoint.key, now, peek=False)
                    if upstream is None:
                        keep = yield from self._hand_over(client, dl, method, up_head, lane,
                                                          service, endpoint)  # fmt: skip
                        break
                    dl.set(self.timer.now() + lane.first_try)
                    usock = upstream.sock
                    try:
                        whole = usock.send(up_head) == len(up_head)
                    except OSError:  # reset while idle, or a full buffer (not when idle)
                        whole = False
                    if not whole:  # nothing usable was sent: a new try, as for a stale one
                        self.pool.discard(upstream)
                        keep = yield from self._hand_over(client, dl, method, up_head, lane,
                                                          service, endpoint)  # fmt: skip
                        break
                    try:
                        trap = dl.trap(usock)
                        if trap is None:  # escaped to Trio earlier (a tunnel, a 100-continue)
                            yield from dl.wait(usock)
                        else:
                            try:
                                yield trap
                            finally:
                                dl.waiting = None
                        data = usock.recv(RECV_SIZE)
                    except (OSError, DeadlineExceeded):
                        data = b""  # _forward meets the same again and handles it
                    except BaseException:  # the loop closing us: the only wait before end()
                        lane.release()
                        raise
                    resp = usual_response(data)
                    out = None  # the answer as _respond forwards it: no hop-by-hop lines
                    if resp is not None:
                        code, length = resp.group(1, 2)
                        status = int(code)
                        end = resp.end()
                        if not (
                            len(data) != end + int(length)  # the whole body, nothing more
                            or status == 204
                            or status == 304
                            or (status in lane.route.retries.retry_statuses
                                and may_retry(method, body_replayable=True))
                        ):  # fmt: skip
                            out = without_keep_alive(data, end)
                    if out is None:
                        upstream.buf += data
                        keep = yield from self._hand_over(client, dl, method, up_head, lane,
                                                          service, endpoint, upstream)  # fmt: skip
                        break
                    done = self._clock()
                    lane.end(endpoint, status, done - now, done)
                    if self.draining:
                        cut = out.find(b"\r\n\r\n") + 2
                        out = out[:cut] + b"Connection: close\r\n" + out[cut:]
                    try:
                        try:
                            sent = client.sock.send(out)
                        except BlockingIOError:
                            sent = 0
                        if sent != len(out):  # a full socket buffer: Stream.send waits
                            dl.after(self.config.idle_timeout)  # (the next wait sets its own)
                            yield from client.send(memoryview(out)[sent:], dl)
                    except DeadlineExceeded:
                        self.pool.discard(upstream)
                        self._refuse("body-timeout")
                        keep = False
                        break
                    except BaseException:
                        self.pool.discard(upstream)
                        raise
                    self.pool.release(upstream, done)
                    keep = not self.draining
                    break
                if keep is None:
                    keep = yield from self._exchange(client, dl, head, conn)
                if not keep:
                    return
        except HttpError as exc:
            self._refuse(exc.reason)
            dl.after(self.config.header_timeout)  # a client that does not read its error
            if client is not None:
                with contextlib.suppress(OSError, DeadlineExceeded):
                    yield from client.send(error_response(exc.status, exc.reason, exc.detail,
                                                          close=True), dl)  # fmt: skip
        except OSError:
            self._refuse("client-reset")
        except DeadlineExceeded:
            self._refuse("client-timeout")
        finally:
            self.stats.open_connections -= 1
            self._idle.discard(dl)
            dl.close()
            if client is not None:
                client.close()
            else:
                sock.close()
            if self.draining and self.stats.open_connections == 0:
                self._drained.set()

    async def _read_head(self, client: Stream, dl: Deadline, first: bool) -> bytes | None:
        """The next request head, or None when the client is done (EOF or idle).

        Raises:
            HttpError: 408 slow head, 414/431 too long.
        """
        cfg = self.config
        idle = not client.buf
        if idle and self.draining:
            return None  # draining: no new request on this connection
        dl.after(cfg.idle_timeout if idle else cfg.header_timeout)
        # Just after a response the next request cannot be here yet: wait before reading.
        wait_first = idle and not first
        searched = 0
        if idle:
            self._idle.add(dl)
        try:
            while True:
                end = client.buf.find(b"\r\n\r\n", max(0, searched - 3))
                if end >= 0:
                    head = bytes(client.buf[: end + 4])
                    del client.buf[: end + 4]
                    return head
                searched = len(client.buf)
                if searched > MAX_HEAD_BYTES or (
                    searched > MAX_REQUEST_LINE and client.buf.find(b"\r\n") < 0
                ):
                    raise (
                        HttpError(414, "uri-too-long", "request line too long")
                        if client.buf.find(b"\r\n") < 0
                        else HttpError(431, "headers-too-large", "request headers too large")
                    )
                try:
                    more = await client.fill(dl, wait_first=wait_first)
                except DeadlineExceeded:
                    # Draining closes idle connections; one whose request is
                    # already in the socket still gets it answered.
                    if not (idle and self.draining and client.fill_nowait()):
                        raise
                    more = True
                if not more:
                    if client.buf:
                        raise HttpError(400, "incomplete-request", "connection closed mid-head")
                    return None
                wait_first = False
                if idle:  # the first bytes of a request: the header timeout starts
                    idle = False
                    self._idle.discard(dl)
                    dl.after(cfg.header_timeout)
        except DeadlineExceeded:
            if idle and not client.buf:
                return None  # an idle keep-alive connection: close quietly
            raise HttpError(408, "header-timeout", "request headers not received in time") from None
        finally:
            self._idle.discard(dl)

    def _destination(self, req: Head) -> tuple[bytes, bytes]:
        """(service name, origin-form target) of a request."""
        target = req.target
        if target[:1] == b"/":
            host = req.get(b"host")
            if host is None:
                raise HttpError(400, "missing-host", "no Host header")
            known = self._hosts.get(host)
            if known is None:
                service = _service_from_host(host, self._suffix)
                known = (service, service.decode("ascii", "replace"))
                if len(self._hosts) < _HOSTS_CACHED:
                    self._hosts[host] = known
            return known[0], target
        if target[:7].lower() == b"http://":
            rest = target[7:]
            slash = rest.find(b"/")
            authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
            if b"@" in authority or not authority:
                raise HttpError(400, "bad-request-target", "invalid absolute URI")
            return _service_from_host(authority, self._suffix), path
        if req.method == b"CONNECT" or target[:8].lower() == b"https://":
            raise HttpError(501, "unsupported-method", "CONNECT and https:// are not proxied")
        raise HttpError(400, "bad-request-target", "invalid request target")

    def _upstream_head(self, req: Head, path: bytes, peer: str, *, chunked: bool,
                       upgrade: bool) -> bytes:  # fmt: skip
        """The request head sent upstream: the original field lines minus hop-by-hop
        and mesh fields, plus ``X-Forwarded-For`` and ``traceparent``.

        The usual head is edited as bytes (:data:`_REQUEST_DROP`); one whose
        Connection names other fields present, or with several
        ``X-Forwarded-For`` fields, or a ``traceparent`` that is not one valid
        field goes through :meth:`_upstream_head_lines`, which gives the same
        bytes for the usual head line by line.
        """
        low = req.low
        tokens = req.connection_tokens()
        xff = low.find(_XFF)
        trace = low.find(_TRACE)
        if (
            (tokens and not _names_absent(req, tokens))
            or (xff >= 0 and low.find(_XFF, xff + 1) >= 0)
            or (trace >= 0 and not _one_valid_trace(req))
        ):
            return self._upstream_head_lines(req, path, peer, chunked=chunked, upgrade=upgrade)
        origin = req.target[:1] == b"/"
        raw = req.raw
        base = req.line_end
        at = xff
        if at >= 0:  # the peer is appended to it
            end = low.find(b"\r\n", at + len(_XFF))
            value = raw[at + len(_XFF) : end].strip(b" \t")
            section = (raw[base:at] + b"\r\nX-Forwarded-For: " + (value + b", " if value else b"")
                       + peer.encode() + raw[end:-4])  # fmt: skip
        else:
            section = raw[base:-4]
        out = [req.method, b" ", path, b" ", req.version,
               (_REQUEST_DROP if origin else _REQUEST_DROP_ABSOLUTE).sub(b"", section)]  # fmt: skip
        if not origin:  # absolute form: Host comes from the URI (RFC 9112 §3.2.2)
            out.append(b"\r\nHost: " + req.target[7:].split(b"/", 1)[0])
        if at < 0:
            out.append(b"\r\nX-Forwarded-For: " + peer.encode())
        if trace < 0:
            out.append(_new_traceparent())
        out.append(_head_tail(req, chunked=chunked, upgrade=upgrade))
        return b"".join(out)

    def _upstream_head_lines(self, req: Head, path: bytes, peer: str, *, chunked: bool,
                             upgrade: bool) -> bytes:  # fmt: skip
        """:meth:`_upstream_head`, built line by line (any head)."""
        drop = HOP_BY_HOP | req.connection_tokens()
        lines = [req.method + b" " + path + b" " + req.version]
        xff: tuple[int, bytes] | None = None  # (index, value) of the last X-Forwarded-For
        trace = False
        for (name, value), line in zip(req.fields, req.lines, strict=True):
            if name in drop or name.startswith(MESH_PREFIX):
                continue
            if name == b"x-forwarded-for":
                xff = (len(lines), value)  # the peer is appended to the last one only
            elif name == b"traceparent":
                if trace or _TRACEPARENT.fullmatch(value) is None:
                    continue  # invalid or repeated: replaced below
                trace = True
            elif name == b"host" and req.target[:1] != b"/":
                continue  # absolute form: Host comes from the URI (RFC 9112 §3.2.2)
            lines.append(line)
        if req.target[:1] != b"/":
            lines.append(b"Host: " + req.target[7:].split(b"/", 1)[0])
        if xff is None:
            lines.append(b"X-Forwarded-For: " + peer.encode())
        else:
            at, value = xff
            lines[at] = b"X-Forwarded-For: " + (value + b", " if value else b"") + peer.encode()
        head = b"\r\n".join(lines)
        if not trace:
            head += _new_traceparent()
        return head + _head_tail(req, chunked=chunked, upgrade=upgrade)

    def _route(self, req: Head, service: bytes, path: bytes, conn: Conn,
               now: float) -> tuple[RouteLike, bytes]:  # fmt: skip
        """The request's route and the caller's identity for the mesh headers
        (``conn.identity``: looked up by :meth:`_exchange` first).

        Raises:
            HttpError: no such service or route; 403 when intentions deny the caller.
        """
        name = service.decode("ascii", "replace")
        state = self.router.route(name, req.method, path, req.pairs, now)
        if self.mesh is None:
            return state, b""
        source = conn.identity
        assert source is not None
        if self.intentions is not None:
            # Enforced by the destination's agent; refused here at once when we know.
            decision = self.intentions().decide(source, name, req.method.decode("ascii"),
                                                _path_only(path))  # fmt: skip
            if not decision.allowed:
                _log.info("request denied", source=source, destination=name,
                          reason=decision.reason)  # fmt: skip
                raise HttpError(403, "intention-denied", decision.reason)
        return state, source.encode()

    async def _identify(self, addr: tuple[str, int], sock: socket.socket) -> str:
        """The workload identity of the local client ``addr`` of ``sock`` (the accepted
        socket): sock_diag at once, else /proc/net/tcp in a thread."""
        if self.identify is None:
            return f"host:{self.node}"
        local = sock.getsockname()
        if self.identify_now is not None:
            name = self.identify_now(addr, local)
            if name is not None:
                return name
        await to_trio()
        return await trio.to_thread.run_sync(self.identify, addr, local)

    async def _exchange(self, client: Stream, dl: Deadline, head_bytes: bytes, conn: Conn) -> bool:
        """Proxy one request; True when the client connection may carry another."""
        req = parse_request_head(head_bytes)
        service, path = self._destination(req)
        framing, length = body_framing(req)
        tokens = req.connection_tokens()
        client_close = b"close" in tokens or (
            req.version == b"HTTP/1.0" and b"keep-alive" not in tokens
        )
        upgrade = b"upgrade" in tokens and req.get(b"upgrade") is not None
        expect = req.get(b"expect")
        if expect is not None and expect.lower() != b"100-continue":
            raise HttpError(417, "bad-expect", "only Expect: 100-continue is supported")
        now = self._clock()
        try:
            if conn.identity is None and self.mesh is not None:
                assert conn.stream is not None
                conn.identity = await self._identify(conn.addr, conn.stream.sock)
            state, source = self._route(req, service, path, conn, now)
        except HttpError as exc:
            return await self._refuse_request(client, dl, exc, framing, length, client_close)
        # A body held whole can be replayed on a retry; a larger one streams once.
        body: bytes | None = None
        if framing == "none":
            body = b""
        elif framing == "length" and length <= REPLAY_BUFFER and expect is None:
            if len(client.buf) < length:
                await self._read_small_body(client, dl, length)
            body = bytes(client.buf[:length])
            del client.buf[:length]
        try:
            state.admit(now)
        except HttpError as exc:
            return await self._refuse_request(client, dl, exc, framing,
                                              length - len(body or b""),
                                              client_close and body is not None)  # fmt: skip
        try:
            head = self._upstream_head(req, path, conn.peer, chunked=framing == "chunked",
                                       upgrade=upgrade)  # fmt: skip
            return await self._forward(client, dl, req.method, head, state, body, framing,
                                       length, client_close=client_close, upgrade=upgrade,
                                       expect=expect is not None,
                                       hop=(source, service))  # fmt: skip
        finally:
            state.release()

    async def _hand_over(self, client: Stream, dl: Deadline, method: bytes, head: bytes,
                         lane: Lane, service: bytes, endpoint: Endpoint,
                         sent: Stream | None = None) -> bool:  # fmt: skip
        """:meth:`_forward` for an express request past routing: ``endpoint`` is picked,
        and the request was ``sent`` to it on that connection if one is given."""
        state = lane.state()
        try:
            return await self._forward(client, dl, method, head, state, b"", "none", 0,
                                       client_close=False, upgrade=False, expect=False,
                                       hop=(b"", service), picked=endpoint,
                                       sent=sent)  # fmt: skip
        finally:
            state.release()

    async def _read_small_body(self, client: Stream, dl: Deadline, length: int) -> None:
        """Read until ``client.buf`` holds ``length`` bytes, within ``idle_timeout``.

        Raises:
            HttpError: 400 the client closed first, 408 it was too slow.
        """
        dl.after(self.config.idle_timeout)
        try:
            while len(client.buf) < length:
                if not await client.fill(dl):
                    raise HttpError(400, "incomplete-request", "connection closed mid-body")
        except DeadlineExceeded:
            raise HttpError(408, "body-timeout", "request body not received in time") from None

    async def _refuse_request(self, client: Stream, dl: Deadline, exc: HttpError, framing: str,
                              length: int, client_close: bool) -> bool:  # fmt: skip
        """Answer an error before the body was read; keep the connection if it can be."""
        self._refuse(exc.reason)
        keep = not client_close and framing in ("none", "length") and length <= REPLAY_BUFFER
        if keep and framing == "length" and len(client.buf) < length:
            # Skip a small body so that the next request parses.
            try:
                await self._read_small_body(client, dl, length)
            except HttpError:
                return False
        if keep and framing == "length":
            del client.buf[:length]
        dl.after(self.config.header_timeout)
        await client.send(error_response(exc.status, exc.reason, exc.detail, close=not keep), dl)
        return keep

    async def _forward(self, client: Stream, dl: Deadline, method: bytes, head: bytes,
                       state: RouteLike, body: bytes | None, framing: str, length: int, *,
                       client_close: bool, upgrade: bool, expect: bool,
                       hop: tuple[bytes, bytes], picked: Endpoint | None = None,
                       sent: Stream | None = None) -> bool:  # fmt: skip
        """Send the request (``head`` as it goes upstream) to an instance, with the route's
        retries and timeouts, and the response back; True if the client connection stays.

        ``picked``: the caller (the express lane in :meth:`_client`) has counted the
        request in the retry budget and picked the first instance; ``sent``: and sent
        the request to it on this connection, so the first try reads its answer.
        """
        route = state.route
        policy = route.retries
        replayable = body is not None and may_retry(method, body_replayable=True)
        clock = self._clock
        start = t0 = clock()
        deadline = self.timer.now() + route.timeout if route.timeout > 0 else math.inf
        tried: set[str] = set()
        retries = 0
        if picked is None:
            state.deposit(start)
        while True:
            if picked is not None:
                endpoint, picked = picked, None
            else:
                endpoint = state.pick(tried, t0)
            tried.add(endpoint.uid)
            try_deadline = deadline
            if route.per_try_timeout > 0:
                try_deadline = min(deadline, self.timer.now() + route.per_try_timeout)
            dl.set(try_deadline)
            try:
                try:
                    upstream, resp = await self._attempt(client, dl, endpoint, head, body,
                                                         framing, length, expect, hop,
                                                         sent)  # fmt: skip
                except DeadlineExceeded:  # the attempt discarded its connection
                    raise _Attempt(504, "timeout", "upstream timed out", connected=True) from None
            except _Attempt as failure:
                sent = None
                now = clock()
                state.finish(endpoint, False, now - t0, now)
                timed_out_total = self.timer.now() >= deadline
                can_retry = (
                    not timed_out_total
                    and retries < policy.max
                    and (replayable or (not failure.connected and body is not None))
                    and (
                        (not failure.connected and policy.retry_on_connection_error)
                        or (failure.reason == "timeout" and route.per_try_timeout > 0)
                        or (failure.reason == "upstream-reset" and policy.retry_on_connection_error)
                    )
                )
                if can_retry and state.withdraw(now):
                    retries += 1
                    t0 = clock()
                    continue
                if can_retry:
                    failure.reason = "retry-budget-exhausted"
                    failure.detail = f"{failure.detail}; retry budget exhausted"
                state.count_response(failure.status, now - start)
                self._refuse(failure.reason)
                keep = not client_close and body is not None
                dl.after(self.config.header_timeout)
                await client.send(error_response(failure.status, failure.reason, failure.detail,
                                                 close=not keep), dl)  # fmt: skip
                return keep
            sent = None
            status = resp.status
            now = clock()
            state.finish(endpoint, status < 500, now - t0, now)
            exhausted = False
            if (
                status in policy.retry_statuses
                and replayable
                and retries < policy.max
                and self.timer.now() < deadline
            ):
                if state.withdraw(now):
                    retries += 1
                    self.pool.discard(upstream)  # its response body is not read
                    t0 = clock()
                    continue
                exhausted = True
            return await self._respond(client, dl, upstream, method, resp, state, now - start,
                                       client_close=client_close, upgrade=upgrade,
                                       exhausted=exhausted)  # fmt: skip

    def _via_hop(self, endpoint: Endpoint) -> bool:
        """Is ``endpoint`` reached through its node's agent (mTLS) rather than dialled?"""
        return self.mesh is not None and endpoint.node != self.node and not endpoint.external

    async def _attempt(self, client: Stream, dl: Deadline, endpoint: Endpoint, head: bytes,
                       body: bytes | None, framing: str, length: int, expect: bool,
                       hop: tuple[bytes, bytes],
                       sent: Stream | None = None) -> tuple[Stream, Head]:  # fmt: skip
        """Send the request on a pooled or new connection and read the response head.

        A reused connection that fails before any response byte is retried
        once on a fresh one (the peer closed it while idle): never the
        client's problem. An instance on another node is asked through its
        agent: the head gets the mesh headers (caller, service, instance).
        ``sent``: the request went out on this (pooled) connection already.

        Raises:
            _Attempt: connect failure, reset, or a malformed response.
            DeadlineExceeded: ``dl`` (the try's deadline) passed.
        """
        via_hop = self._via_hop(endpoint)
        key = endpoint.key
        if via_hop:
            key = endpoint.inbound
            source, service = hop
            head = (head[:-2] + b"hostmesh-source: " + source + b"\r\nhostmesh-destination: "
                    + service + b"\r\nhostmesh-instance: " + endpoint.id.encode()
                    + b"\r\n\r\n")  # fmt: skip
        for fresh in (False, True):
            upstream: Stream | None = sent
            if upstream is None:
                upstream = None if fresh else self.pool.take_idle(key, self._clock(),
                                                                  peek=body is None)  # fmt: skip
            if upstream is not None and via_hop and _peer_node(upstream) != endpoint.node:
                self.pool.discard(upstream)  # that address is another node's now
                upstream = None
            if upstream is None:
                upstream = await self._connect(dl, endpoint, via_hop)
            try:
                if sent is not None:
                    sent = None
                    got = await self._read_response_head(upstream, dl)
                else:
                    got = await self._send_and_read(client, dl, upstream, head, body, framing,
                                                    length, expect)  # fmt: skip
            except HttpError as exc:
                self.pool.discard(upstream)
                if exc.status >= 500:
                    raise _Attempt(502, exc.reason, exc.detail, connected=True) from None
                raise  # the client's body was bad: answered by _client
            except OSError:
                got = None
            except BaseException:
                self.pool.discard(upstream)  # cancelled (timeout): the connection is unusable
                raise
            if got is not None:
                if via_hop and got.status >= 500:
                    self._hop_failure(upstream, got)
                return upstream, got
            self.pool.discard(upstream)
            if not (upstream.reused and body is not None):
                raise _Attempt(502, "upstream-reset",
                               f"{endpoint.id} closed the connection", connected=True)  # fmt: skip
        raise AssertionError("unreachable")

    def _hop_failure(self, upstream: Stream, resp: Head) -> None:
        """An inbound agent's error for its instance: raise it as a failed try.

        Raises:
            _Attempt: the instance was down or gone (connect-failed, no-instance)
                or reset; another instance may take the request.
        """
        reason = resp.get(b"hostmesh-error")
        if reason not in _HOP_FAILURES:
            return
        framing, length = response_framing(resp, b"GET")
        if framing == "length" and length <= len(upstream.buf):
            del upstream.buf[:length]  # its one-line body: the connection stays usable
            self.pool.release(upstream, self._clock())
        else:
            self.pool.discard(upstream)
        text = reason.decode("ascii", "replace")
        raise _Attempt(resp.status, text, f"the instance's agent answered {resp.status} {text}",
                       connected=_HOP_FAILURES[reason])  # fmt: skip

    async def _connect(self, dl: Deadline, endpoint: Endpoint, via_hop: bool = False) -> Stream:
        """A new connection to ``endpoint`` (or its agent) within ``connect_timeout``.

        Raises:
            _Attempt: refused, unreachable, pool full, connect_timeout passed,
                or the peer agent's TLS refused.
            DeadlineExceeded: ``dl`` passed first.
        """
        try_deadline = dl.at
        dl.set(min(try_deadline, self.timer.now() + self.config.connect_timeout))
        try:
            if via_hop:
                upstream = await self._connect_hop(dl, endpoint)
            else:
                upstream = await self.pool.open(endpoint.host, endpoint.port, dl)
        except ConnectError as exc:
            raise _Attempt(502, "connect-failed", f"connect to {endpoint.id} failed: "
                           f"{exc.strerror or exc}", connected=False) from None  # fmt: skip
        except DeadlineExceeded:
            if self.timer.now() >= try_deadline:
                raise
            raise _Attempt(502, "connect-failed", f"connect to {endpoint.id} timed out",
                           connected=False) from None  # fmt: skip
        dl.set(try_deadline)
        return upstream

    async def caller(self, sock: socket.socket, addr: tuple[str, int]) -> str:
        """The workload identity of a local client socket (TCP upstreams ask once each)."""
        return await self._identify(addr, sock)

    def decide(self, source: str, service: str, method: str | None = None,
               path: str | None = None) -> tuple[bool, str]:  # fmt: skip
        """(allowed, reason) of the intentions for a call; always allowed without the mesh."""
        if self.mesh is None or self.intentions is None:
            return True, ""
        decision = self.intentions().decide(source, service, method, path)
        return decision.allowed, decision.reason

    async def open_tcp(self, endpoint: Endpoint, service: str, source: str, dl: Deadline) -> Stream:
        """A TCP stream to ``endpoint`` for a TCP upstream: dialled, or through its node's
        agent (``CONNECT`` with the mesh headers, answered 200 before any stream byte).

        Raises:
            ConnectError: connect or TLS failed, or the agent refused (``strerror`` says why).
            HttpError: 403, the destination's intentions deny ``source``.
            DeadlineExceeded: ``dl`` passed.
        """
        if not self._via_hop(endpoint):
            return await connect(endpoint.host, endpoint.port, dl)
        try:
            stream = await self._connect_hop(dl, endpoint)
        except _Attempt as exc:
            raise ConnectError(0, exc.detail) from None
        try:
            await stream.send(b"CONNECT " + endpoint.id.encode() + b" HTTP/1.1\r\n"
                              b"hostmesh-source: " + source.encode() + b"\r\n"
                              b"hostmesh-destination: " + service.encode() + b"\r\n"
                              b"hostmesh-instance: " + endpoint.id.encode() + b"\r\n\r\n",
                              dl)  # fmt: skip
            resp = await self._read_response_head(stream, dl)
        except (OSError, HttpError) as exc:
            stream.close()
            raise ConnectError(0, f"{endpoint.node}'s agent: {exc}") from None
        except BaseException:
            stream.close()
            raise
        if resp is not None and resp.status == 200:
            return stream
        stream.close()
        if resp is None:
            raise ConnectError(0, f"{endpoint.node}'s agent closed the connection")
        reason = (resp.get(b"hostmesh-error") or b"").decode("ascii", "replace")
        if resp.status == 403:
            raise HttpError(
                403, reason or "forbidden", f"{endpoint.node}'s agent refused: {reason}"
            )
        raise ConnectError(0, f"{endpoint.node}'s agent answered {resp.status} {reason}")

    async def _connect_hop(self, dl: Deadline, endpoint: Endpoint) -> Stream:
        """A TLS connection to the agent of ``endpoint``'s node, its certificate checked."""
        from hostmesh._errors import CertificateError

        from ._mtls import HopRefused, tls_connect

        assert self.mesh is not None
        host, port = endpoint.inbound
        mesh = self.mesh
        try:
            ctx, domain = mesh.client()
        except CertificateError as exc:
            raise _Attempt(503, "no-certificate", str(exc), connected=False) from None

        async def dial() -> Stream:
            return await tls_connect(host, port, ctx, dl, mesh=domain, node=endpoint.node,
                                     revocations=mesh.revocations)  # fmt: skip

        try:
            return await self.pool.open(host, port, dl, dial=dial)
        except HopRefused as exc:
            self._refuse(f"mtls-{exc.reason}")
            _log.warning("mTLS hop refused", node=endpoint.node, peer=f"{host}:{port}",
                         reason=exc.reason, error=exc.detail)  # fmt: skip
            raise _Attempt(502, "connect-failed", f"mTLS to {endpoint.node}'s agent refused: "
                           f"{exc.detail}", connected=False) from None  # fmt: skip

    async def _send_and_read(self, client: Stream, dl: Deadline, upstream: Stream, head: bytes,
                             body: bytes | None, framing: str, length: int,
                             expect: bool) -> Head | None:  # fmt: skip
        """Send one request and read its response head (None: closed before one)."""
        if body is not None:
            if len(body) < 16384:
                await upstream.send(head + body, dl)
            else:
                await upstream.send(head, dl)
                await upstream.send(body, dl)
            return await self._read_response_head(upstream, dl, wait_first=True)
        await upstream.send(head, dl)
        if expect:
            await to_trio()  # the wait for the upstream's 100 is a cancel scope
            interim: Head | None = None
            with trio.move_on_after(EXPECT_CONTINUE_WAIT) as wait:
                interim = await self._read_response_head(upstream, dl, wait_first=True)
            if not wait.cancelled_caught and (interim is None or interim.status != 100):
                return interim  # a final answer without the body (417, 401, ...)
            await client.send(b"HTTP/1.1 100 Continue\r\n\r\n", dl)
        await self._stream_body(client, upstream, dl, framing, length)
        got = await self._read_response_head(upstream, dl)
        while expect and got is not None and got.status == 100:  # late, after our own 100
            got = await self._read_response_head(upstream, dl)
        return got

    async def _read_response_head(self, upstream: Stream, dl: Deadline, *,
                                  wait_first: bool = False) -> Head | None:  # fmt: skip
        """The next response head (100 and 101 included), or None if the upstream closed first.

        ``wait_first``: the request was just sent, so nothing can be there to read yet.
        """
        while True:
            end = upstream.buf.find(b"\r\n\r\n")
            if end >= 0:
                raw = bytes(upstream.buf[: end + 4])
                del upstream.buf[: end + 4]
                resp = parse_response_head(raw)
                if 100 < resp.status < 200 and resp.status != 101:
                    continue  # 102/103 interim responses: dropped (never forwarded blindly)
                if resp.status >= 200:  # conflicting framing fails the attempt, not the client
                    try:
                        body_framing(resp, status_error=502)
                    except HttpError as exc:
                        raise HttpError(502, "bad-upstream-response",
                                        f"upstream: {exc.detail}") from None  # fmt: skip
                return resp
            if len(upstream.buf) > MAX_HEAD_BYTES:
                raise HttpError(502, "bad-upstream-response", "upstream head too large")
            filled = await upstream.fill(dl, wait_first=wait_first and not upstream.buf)
            wait_first = False
            if not filled:
                if upstream.buf:
                    raise HttpError(502, "bad-upstream-response", "upstream closed mid-head")
                return None

    async def _stream_body(self, client: Stream, upstream: Stream, dl: Deadline, framing: str,
                           length: int) -> None:  # fmt: skip
        """Forward the client's request body (not held in memory) upstream, within ``dl``."""
        if framing == "length":
            await _copy_length(client, upstream, length, "request", dl)
        elif framing == "chunked":
            await _copy_chunked(client, upstream, "request", dl)

    async def _respond(self, client: Stream, dl: Deadline, upstream: Stream, method: bytes,
                       resp: Head, state: RouteLike, duration: float, *, client_close: bool,
                       upgrade: bool, exhausted: bool) -> bool:  # fmt: skip
        """Forward the response head and body; True if both sides stay open.

        The route's timeout ends with the response head; from here each read or
        write of the body may stall up to ``idle_timeout``.
        """
        framing, length = response_framing(resp, method)
        tokens = resp.connection_tokens()
        upstream_close = b"close" in tokens or resp.version == b"HTTP/1.0" or framing == "close"
        switching = upgrade and resp.status == 101
        close = client_close or framing == "close" or self.draining
        out = resp.start + response_fields(resp, tokens)
        if switching:
            out += b"\r\nConnection: Upgrade\r\nUpgrade: " + (resp.get(b"upgrade") or b"")
        elif framing == "chunked":
            out += b"\r\nTransfer-Encoding: chunked"
        if close and not switching:
            out += b"\r\nConnection: close"
        if exhausted:  # a retryable status we could not retry: say why it is passed on
            out += b"\r\nhostmesh-error: retry-budget-exhausted"
            self._refuse("retry-budget-exhausted")
        out += b"\r\n\r\n"
        stall = self.config.idle_timeout
        dl.after(stall)
        if framing == "length" and 0 < length <= len(upstream.buf):
            # The whole body came with the head (the usual small response): one write.
            out += upstream.buf[:length]
            del upstream.buf[:length]
            length = 0
        state.count_response(resp.status, duration)
        if switching:
            await client.send(out, dl)
            dl.clear()  # a tunnel lives as long as both ends want
            self.pool.detach(upstream)  # owned by the tunnel from here (discard closed it)
            self.stats.upstream_connections += 1
            try:
                await tunnel(client, upstream)
            finally:
                self.stats.upstream_connections -= 1
                upstream.close()
            return False
        try:
            await client.send(out, dl)
            if framing == "length":
                if length:
                    await _copy_length(upstream, client, length, "response", dl, stall)
            elif framing == "chunked":
                await _copy_chunked(upstream, client, "response", dl, stall)
            elif framing == "close":
                await _copy_until_eof(upstream, client, dl, stall)
        except HttpError as exc:  # the head is out: cut the client off, never answer twice
            self.pool.discard(upstream)
            self._refuse(exc.reason)
            return False
        except DeadlineExceeded:
            self.pool.discard(upstream)
            self._refuse("body-timeout")
            return False
        except BaseException:
            self.pool.discard(upstream)
            raise
        if upstream_close or upgrade:
            self.pool.discard(upstream)
        else:
            self.pool.release(upstream, self._clock())
        return not close and not upgrade


def _path_only(target: bytes) -> str:
    """The path of an origin-form target, without its query (for intentions' prefixes)."""
    return target.split(b"?", 1)[0].decode("latin-1")


def _peer_node(stream: Stream) -> str | None:
    peer = getattr(stream, "peer", None)
    return None if peer is None else str(peer.node)


async def _copy_length(src: Stream, dst: Stream, length: int, what: str,
                       dl: Deadline | None = None, stall: float = 0) -> None:  # fmt: skip
    """Forward exactly ``length`` bytes from ``src`` to ``dst``.

    Waits are bounded by ``dl``; with ``stall`` each read and write may take
    that long (``dl`` re-armed per piece), else ``dl`` bounds the whole copy.
    """
    left = length
    n = 0
    while left > 0:
        if stall and dl is not None:
            dl.after(stall)
        if src.buf:
            chunk = bytes(src.buf[:left])
            del src.buf[: len(chunk)]
        else:
            chunk = await _recv(src, what, dl)
            if len(chunk) > left:
                src.buf += chunk[left:]
                chunk = chunk[:left]
        left -= len(chunk)
        await dst.send(chunk, dl)
        n += 1
        if n % CHECKPOINT_EVERY == 0:
            await checkpoint()


async def _copy_chunked(src: Stream, dst: Stream, what: str, dl: Deadline | None = None,
                        stall: float = 0) -> None:  # fmt: skip
    """Forward a chunked body, untouched, up to its end (``dl``, ``stall``: as above)."""
    scanner = ChunkedScanner()
    n = 0
    while not scanner.done:
        if stall and dl is not None:
            dl.after(stall)
        chunk = await _recv(src, what, dl)
        try:
            used = scanner.feed(chunk)
        except HttpError as exc:
            if what == "response":
                raise HttpError(502, "bad-upstream-response", exc.detail) from None
            raise
        if used < len(chunk):
            src.buf += chunk[used:]
            chunk = chunk[:used]
        await dst.send(chunk, dl)
        n += 1
        if n % CHECKPOINT_EVERY == 0:
            await checkpoint()


async def _copy_until_eof(src: Stream, dst: Stream, dl: Deadline | None = None,
                          stall: float = 0) -> None:  # fmt: skip
    n = 0
    while True:
        if stall and dl is not None:
            dl.after(stall)
        chunk = await src.recv(dl)
        if not chunk:
            return
        await dst.send(chunk, dl)
        n += 1
        if n % CHECKPOINT_EVERY == 0:
            await checkpoint()


async def _recv(src: Stream, what: str, dl: Deadline | None = None) -> bytes:
    """The next piece of a body. EOF or a reset ends it early: the sender's
    fault (:func:`_closed`), never blamed on the other side."""
    try:
        chunk = await src.recv(dl)
    except OSError:
        chunk = b""
    if not chunk:
        raise _closed(what)
    return chunk


def _closed(what: str) -> HttpError:
    if what == "request":
        return HttpError(400, "incomplete-request", "client closed mid-body")
    return HttpError(502, "upstream-reset", "upstream closed mid-body")


async def tunnel(a: Stream, b: Stream) -> None:
    """Copy bytes both ways until both directions are closed (half-close aware)."""

    async def one_way(src: Stream, dst: Stream) -> None:
        with contextlib.suppress(OSError):
            await _copy_until_eof(src, dst)
        dst.shutdown_write()

    await to_trio()  # two tasks, one per direction
    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, a, b)
        nursery.start_soon(one_way, b, a)

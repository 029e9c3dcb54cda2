"""The Trio adapter: UDP and TCP listeners around :class:`DnsCore`, and recursion.

UDP is the hot path: one non-blocking socket, and on every wake-up the loop
drains up to :data:`UDP_BATCH` datagrams with plain ``recvfrom`` calls before
waiting again (the per-packet cost of a Trio round trip is what makes naive
servers slow). TCP carries length-prefixed messages (RFC 1035 4.2.2, RFC 7766),
several per connection, with an idle timeout and a per-message deadline.
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import struct
from collections.abc import Callable
from typing import Any

import trio

from hostmesh._log import get_logger
from hostmesh._net import bind_udp_tcp

from ._resolver import DnsCore, Forward
from ._wire import HEADER_SIZE, MAX_QUERY_SIZE, Rcode

__all__ = ["Recursor", "serve_dns"]

log = get_logger("hostmesh.dns")

#: Datagrams handled per wake-up before yielding to other tasks.
UDP_BATCH = 256
#: Largest UDP datagram we read (anything above MAX_QUERY_SIZE is dropped by the core).
UDP_RECV = 4096
#: Largest reply we accept from a recursor over UDP (EDNS0 maximum we advertise upstream).
RECURSOR_UDP_MAX = 4096


class Recursor:
    """Forwards queries to upstream resolvers, in order, with a timeout each.

    Args:
        servers: ``(host, port)`` in the order to try.
        timeout: seconds per server.
        max_inflight: forwarded queries in flight; beyond it callers get None.
        observe: called with (seconds, result) per attempt for metrics.
    """

    def __init__(
        self,
        servers: list[tuple[str, int]],
        timeout: float,
        max_inflight: int,
        observe: Callable[[float, str], None] = lambda s, r: None,
    ) -> None:
        self.servers = servers
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.inflight = 0
        self._observe = observe

    async def resolve(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The first valid reply from a server, with the client's ID; None if all failed."""
        client_id = data[:2]
        upstream_id = struct.pack("!H", random.getrandbits(16))
        query = upstream_id + data[2:]
        self.inflight += 1
        try:
            for server in self.servers:
                start = trio.current_time()
                reply = None
                with trio.move_on_after(self.timeout):
                    try:
                        if tcp:
                            reply = await _tcp_exchange(server, query)
                        else:
                            reply = await _udp_exchange(server, query)
                    except OSError:
                        reply = None
                ok = reply is not None and _matches(reply, query)
                self._observe(trio.current_time() - start, "ok" if ok else "failed")
                if ok and reply is not None:
                    return client_id + reply[2:]
            return None
        finally:
            self.inflight -= 1


def _matches(reply: bytes, query: bytes) -> bool:
    """A reply to ``query``: same ID, QR set, same question section."""
    if len(reply) < HEADER_SIZE or reply[:2] != query[:2] or not reply[2] & 0x80:
        return False
    end = query.find(b"\x00", HEADER_SIZE) + 5  # name, type, class
    return end > 5 and reply[HEADER_SIZE:end].lower() == query[HEADER_SIZE:end].lower()


async def _udp_exchange(server: tuple[str, int], query: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect(server)  # a fresh socket: a random source port per query
        await sock.send(query)
        while True:
            reply = await sock.recv(RECURSOR_UDP_MAX)
            if reply[:2] == query[:2]:
                return reply


async def _tcp_exchange(server: tuple[str, int], query: bytes) -> bytes:
    stream = await trio.open_tcp_stream(*server)
    async with stream:
        await stream.send_all(struct.pack("!H", len(query)) + query)
        head = await _receive_exactly(stream, 2)
        (length,) = struct.unpack("!H", head)
        return await _receive_exactly(stream, length)


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError("connection closed mid-message")
        buf += chunk
    return bytes(buf)


async def serve_dns(
    core: DnsCore,
    host: str,
    port: int,
    *,
    recursor: Recursor,
    tcp_idle_timeout: float,
    max_tcp_connections: int,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DNS on UDP and TCP ``host:port`` until cancelled.

    Binds UDP first (port 0 picks a free port) and TCP on the same port, then
    reports the bound ``(host, port)``.
    """
    udp, raw_tcp = bind_udp_tcp(host, port)
    tcp = trio.socket.from_stdlib_socket(raw_tcp)
    try:
        bound = udp.getsockname()[:2]
        listener = trio.SocketListener(tcp)
        clients = _TcpClients(core, recursor, tcp_idle_timeout, max_tcp_connections)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_udp_loop, core, udp, recursor, nursery)
            nursery.start_soon(trio.serve_listeners, clients.handle, [listener])
            upstream = ",".join(f"{h}:{p}" for h, p in recursor.servers) or "-"
            log.info("listening", listener="dns", address=f"{bound[0]}:{bound[1]}",
                     recursors=upstream)  # fmt: skip
            task_status.started((bound[0], bound[1]))
    finally:
        udp.close()
        tcp.close()


async def _udp_loop(
    core: DnsCore, sock: socket.socket, recursor: Recursor, nursery: trio.Nursery
) -> None:
    handle = core.handle_udp
    recvfrom = sock.recvfrom
    sendto = sock.sendto
    stats = core.stats
    catalog = core.catalog
    cache = core.udp_cache  # cleared in place, never replaced
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(UDP_BATCH):
            try:
                data, addr = recvfrom(UDP_RECV)
            except BlockingIOError:
                break
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                continue
            # The hottest case, a current single-answer entry, without a call;
            # everything else (and every rule) is in DnsCore.handle_udp.
            entry = cache.get(data[2:]) if catalog.index == core.cache_index else None
            if entry is not None and entry.n == 1:
                entry.hits += 1
                try:
                    sendto(data[:2] + entry.first, addr)
                except OSError:
                    stats.drop("send_failed")
                continue
            out = handle(data)
            if out is None:
                continue
            if type(out) is bytes:
                try:
                    sendto(out, addr)
                except OSError as exc:
                    stats.drop("send_failed" if exc.errno != errno.EAGAIN else "send_busy")
                continue
            assert isinstance(out, Forward)
            if recursor.inflight >= recursor.max_inflight:
                stats.drop("recursion_busy")
                _send_quietly(sock, core.reply(out.query, Rcode.SERVFAIL), addr)
                continue
            nursery.start_soon(_forward_udp, core, sock, recursor, out, addr)


def _send_quietly(sock: socket.socket, data: bytes, addr: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):
        sock.sendto(data, addr)


async def _forward_udp(
    core: DnsCore, sock: socket.socket, recursor: Recursor, fwd: Forward, addr: tuple[Any, ...]
) -> None:
    _send_quietly(sock, await _recurse(core, recursor, fwd, tcp=False), addr)


class _TcpClients:
    """Serves TCP connections: framing, deadlines and the connection cap."""

    def __init__(
        self, core: DnsCore, recursor: Recursor, idle_timeout: float, max_connections: int
    ) -> None:
        self.core = core
        self.recursor = recursor
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.active = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        stats = self.core.stats
        if self.active >= self.max_connections:
            stats.drop("tcp_too_many")
            await stream.aclose()
            return
        self.active += 1
        try:
            async with stream:
                while (data := await self._next_message(stream)) is not None:
                    out = self.core.handle(data, tcp=True)
                    if out is None:
                        return
                    if isinstance(out, Forward):
                        out = await _recurse(self.core, self.recursor, out, tcp=True)
                    with trio.move_on_after(self.idle_timeout):
                        await stream.send_all(struct.pack("!H", len(out)) + out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.active -= 1

    async def _next_message(self, stream: trio.SocketStream) -> bytes | None:
        """The next framed query, or None to close (EOF, timeout, bad length).

        The whole message must arrive within the idle timeout: a client that
        trickles bytes cannot hold the connection open.
        """
        stats = self.core.stats
        with trio.move_on_after(self.idle_timeout):
            try:
                (length,) = struct.unpack("!H", await _receive_exactly(stream, 2))
                if length < HEADER_SIZE or length > MAX_QUERY_SIZE:
                    stats.drop("tcp_bad_length")
                    return None
                return await _receive_exactly(stream, length)
            except EOFError:
                return None
        stats.drop("tcp_timeout")
        return None


async def _recurse(core: DnsCore, recursor: Recursor, fwd: Forward, *, tcp: bool) -> bytes:
    reply = await recursor.resolve(fwd.data, tcp=tcp)
    if reply is None:
        return core.reply(fwd.query, Rcode.SERVFAIL)
    core.stats.count(fwd.query.qtype, reply[3] & 0x0F)
    return reply

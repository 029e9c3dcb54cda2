"""Raw non-blocking sockets for the data plane, and per-instance upstream pools.

Trio's socket methods pass through the scheduler twice per call even when
data is already waiting; the proxy instead calls ``recv``/``send`` on a
non-blocking socket and only parks (:func:`~._loop.wait_socket`: in the
proxy's own loop, or in Trio) when the kernel has nothing (the same trick that
lets the DNS server keep up with dnsmasq). Loops that may never block call
:func:`~._loop.checkpoint` every few iterations so one busy stream cannot
starve the others or dodge a timeout.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections import deque
from collections.abc import Awaitable, Callable

from ._deadline import Deadline
from ._loop import quiet, wait_socket

__all__ = ["CHECKPOINT_EVERY", "RECV_SIZE", "ConnectError", "Pool", "Stream", "connect"]

#: Bytes asked of the kernel per read; 64 KiB moves bulk bodies in few syscalls.
RECV_SIZE = 64 * 1024
#: Reads or writes between forced scheduler checkpoints in streaming loops.
CHECKPOINT_EVERY = 16


class ConnectError(OSError):
    """The upstream could not be reached (refused, unreachable, timed out)."""


class Stream:
    """A non-blocking TCP socket with a read buffer. The owner closes it."""

    __slots__ = ("buf", "eof", "idle_since", "key", "reused", "sock")

    def __init__(self, sock: socket.socket, key: tuple[str, int] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.key = key  # pool key for upstream connections
        self.reused = False  # taken from a pool at least once
        self.idle_since = 0.0

    async def fill(self, dl: Deadline | None = None, *, wait_first: bool = False) -> bool:
        """Read what is available (waiting if nothing is) into ``buf``; False at EOF.

        ``wait_first`` skips the first, speculative read when the peer cannot
        have answered yet (just after sending it a request or a response).

        Raises:
            DeadlineExceeded: ``dl`` passed while waiting.
        """
        if wait_first:
            await self._wait(dl)
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                await self._wait(dl)
                continue
            if not data:
                self.eof = True
                return False
            self.buf += data
            return True

    def fill_nowait(self) -> bool:
        """Read what the kernel holds into ``buf`` without waiting; True if anything came."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, OSError):
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def recv(self, dl: Deadline | None = None) -> bytes:
        """The buffered bytes, or the next read from the socket (b"" at EOF)."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                await self._wait(dl)
                continue
            if not data:
                self.eof = True
            return data

    async def send(self, data: bytes | bytearray | memoryview, dl: Deadline | None = None) -> None:
        """Send all of ``data``, waiting for the socket to drain as needed."""
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await self._wait(dl, writable=True)
                continue
            view = view[sent:]

    def _wait(self, dl: Deadline | None, *, writable: bool = False) -> Awaitable[None]:
        # The wait itself, not a coroutine around it: one frame less per wait.
        if dl is not None:
            return dl.wait(self.sock, writable=writable)
        return wait_socket(self.sock, writable=writable)

    def shutdown_write(self) -> None:
        """Half-close: tell the peer we are done sending."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def looks_alive(self, *, peek: bool = True) -> bool:
        """An idle pooled socket the peer has not closed and sent nothing on.

        ``peek=False`` believes the proxy loop when it saw no event on the
        socket since its last wait (as of its last poll: a close in the
        meantime shows as EOF on the request, which the caller retries on a
        new connection); else, and outside the loop, the kernel is asked.
        """
        if self.buf or self.eof:
            return False
        if not peek and quiet(self.sock):
            return True
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF (b""), or bytes nobody asked for: unusable either way

    def close(self) -> None:
        self.sock.close()


async def connect(host: str, port: int, dl: Deadline | None = None) -> Stream:
    """Open a TCP connection, bounded by ``dl`` or the caller's cancel scope.

    Raises:
        ConnectError: refused, unreachable or reset while connecting.
        DeadlineExceeded: ``dl`` passed first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            if dl is not None:
                await dl.wait(sock, writable=True)
            else:
                await wait_socket(sock, writable=True)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
    except BaseException:
        sock.close()
        raise
    return Stream(sock, (host, port))


class Pool:
    """Idle keep-alive connections per upstream ``(host, port)``.

    Newest idle connection first (LIFO keeps few connections warm); a
    connection idle longer than ``idle_timeout`` or closed by its peer is
    discarded on the way out. At most ``max_idle`` idle connections per
    upstream are kept; ``max_per_upstream`` caps open ones (idle + in use).
    """

    def __init__(
        self,
        *,
        max_idle: int,
        max_per_upstream: int,
        idle_timeout: float,
        on_open: Callable[[int], None] = lambda delta: None,
    ) -> None:
        self.max_idle = max_idle
        self.max_per_upstream = max_per_upstream
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[str, int], deque[Stream]] = {}
        self._open: dict[tuple[str, int], int] = {}
        self._on_open = on_open

    def open_count(self, key: tuple[str, int]) -> int:
        return self._open.get(key, 0)

    def take_idle(self, key: tuple[str, int], now: float, *, peek: bool = True) -> Stream | None:
        """A live idle connection to ``key``, or None (``peek``: see :meth:`Stream.looks_alive`)."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.idle_timeout and (
                # looks_alive(peek=False)'s usual answer without its call (per request)
                (not peek and not conn.buf and not conn.eof and quiet(conn.sock))
                or conn.looks_alive(peek=peek)
            ):
                conn.reused = True
                return conn
            self.discard(conn)
        return None

    async def open(
        self,
        host: str,
        port: int,
        dl: Deadline | None = None,
        *,
        dial: Callable[[], Awaitable[Stream]] | None = None,
    ) -> Stream:
        """A new connection counted against the upstream's cap.

        ``dial`` replaces the plain TCP connect (the mTLS hop's handshake); its
        stream's ``key`` must be ``(host, port)``.

        Raises:
            ConnectError: at the cap, or the connect failed.
        """
        key = (host, port)
        if self._open.get(key, 0) >= self.max_per_upstream:
            raise ConnectError(errno.EAGAIN, f"{host}:{port}: connection pool full")
        conn = await (dial() if dial is not None else connect(host, port, dl))
        self._open[key] = self._open.get(key, 0) + 1
        self._on_open(1)
        return conn

    def release(self, conn: Stream, now: float) -> None:
        """Give back a connection that finished a response cleanly."""
        assert conn.key is not None
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        if len(idle) >= self.max_idle or conn.buf or conn.eof:
            self.discard(conn)
            return
        conn.idle_since = now
        idle.append(conn)

    def discard(self, conn: Stream) -> None:
        """Close a connection that must not be reused (a second call does nothing more)."""
        conn.close()
        self.detach(conn)

    def detach(self, conn: Stream) -> None:
        """Stop counting ``conn`` against its upstream; the caller now owns and closes it."""
        if conn.key is not None:
            left = self._open.get(conn.key, 1) - 1
            if left <= 0:
                self._open.pop(conn.key, None)
            else:
                self._open[conn.key] = left
            self._on_open(-1)
            conn.key = None

    def expire(self, now: float) -> None:
        """Close idle connections past ``idle_timeout`` (call every few seconds)."""
        for key in list(self._idle):
            idle = self._idle[key]
            while idle and now - idle[0].idle_since >= self.idle_timeout:
                self.discard(idle.popleft())
            if not idle:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                self.discard(conn)
        self._idle.clear()

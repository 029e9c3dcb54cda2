"""The Trio adapter around :class:`Swim`: transports, timers, push-pull, join.

A :class:`Transport` carries UDP-like packets and TCP-like streams; the real
one (:class:`UdpTcpTransport`) binds one UDP and one TCP socket on the same
port, the simulator's runs in memory. Every packet is framed (version + CRC)
and, with a keyring, sealed with AES-256-GCM; what fails to open or decode is
dropped and counted.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import functools
import random
import struct
from collections.abc import Awaitable, Callable, Iterable

import trio

from hostmesh._config import parse_hostport
from hostmesh._log import get_logger
from hostmesh._net import bind_udp_tcp

from ._codec import FRAME_OVERHEAD, MAX_TCP_FRAME, DecodeError, decode, encode, frame, unframe
from ._keyring import SEAL_OVERHEAD, DecryptError, Keyring, KeyringError
from ._messages import Ack, KeyringOp, KeyringRequest, KeyringResponse, Ping, PushPull
from ._swim import KeyringWork, Send, StartPushPull, Swim, TcpPing

__all__ = [
    "DEFAULT_PORT",
    "KEYRING_WAIT",
    "GossipNode",
    "Transport",
    "UdpTcpTransport",
    "normalize_addr",
]

log = get_logger("hostmesh.gossip")

#: The gossip port (Serf's LAN port).
DEFAULT_PORT = 7946
#: Largest UDP datagram read; bigger ones are not ours (packets stay under the budget).
UDP_RECV = 65536
#: Seconds a push-pull may take end to end before it is abandoned.
PUSH_PULL_TIMEOUT = 10.0
#: Largest frame read from a push-pull stream: a message plus frame and seal.
MAX_STREAM_FRAME = MAX_TCP_FRAME + FRAME_OVERHEAD + SEAL_OVERHEAD
#: Seconds a keyring operation waits for every member's answer.
KEYRING_WAIT = 5.0
#: Push-pulls running at once (each holds a TCP connection and a full state).
MAX_PUSH_PULLS = 8

StreamHandler = Callable[[trio.abc.Stream], Awaitable[None]]


def normalize_addr(addr: str) -> str:
    """``host`` or ``host:port`` -> ``host:port`` (default port 7946)."""
    if addr.count(":") == 1 or addr.startswith("["):
        host, port = parse_hostport(addr)
    else:
        host, port = addr, DEFAULT_PORT
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Transport(abc.ABC):
    """Packets and streams between members, addressed by ``host:port``."""

    @abc.abstractmethod
    async def send(self, addr: str, data: bytes) -> None:
        """Send one packet; failures are swallowed (UDP semantics)."""

    @abc.abstractmethod
    async def receive(self) -> tuple[bytes, str]:
        """The next packet and its sender's address."""

    @abc.abstractmethod
    async def connect(self, addr: str) -> trio.abc.Stream:
        """A stream to ``addr``. Raises OSError when unreachable."""

    @abc.abstractmethod
    async def serve(
        self,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``handler`` for every incoming stream until cancelled."""


class UdpTcpTransport(Transport):
    """Real sockets: UDP and TCP on the same ``host:port``. Call :meth:`bind` first."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._udp: trio.socket.SocketType | None = None
        self._tcp: trio.socket.SocketType | None = None

    async def bind(self) -> str:
        """Bind both sockets (port 0: a free one); returns ``host:port``."""
        udp, tcp = bind_udp_tcp(self.host, self.port)
        self._udp = trio.socket.from_stdlib_socket(udp)
        self._tcp = trio.socket.from_stdlib_socket(tcp)
        self.port = udp.getsockname()[1]
        return normalize_addr(f"{self.host}:{self.port}")

    @property
    def udp(self) -> trio.socket.SocketType:
        assert self._udp is not None, "bind() first"
        return self._udp

    def close(self) -> None:
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    async def send(self, addr: str, data: bytes) -> None:
        with contextlib.suppress(OSError):  # UDP: a lost packet is normal
            await self.udp.sendto(data, parse_hostport(addr))

    async def receive(self) -> tuple[bytes, str]:
        while True:
            try:
                data, peer = await self.udp.recvfrom(UDP_RECV)
            except OSError:  # ICMP errors surface on the socket; not a packet
                continue
            return data, normalize_addr(f"{peer[0]}:{peer[1]}")

    async def connect(self, addr: str) -> trio.abc.Stream:
        host, port = parse_hostport(addr)
        return await trio.open_tcp_stream(host, port)

    async def serve(
        self,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            assert self._tcp is not None, "bind() first"
            await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(self._tcp)])
            task_status.started()


async def _send_frame(stream: trio.abc.Stream, data: bytes) -> None:
    await stream.send_all(struct.pack("!I", len(data)) + data)


async def _receive_frame(stream: trio.abc.Stream) -> bytes:
    async def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await stream.receive_some(min(n - len(buf), 65536))
            if not chunk:
                raise DecodeError("stream closed mid-frame")
            buf += chunk
        return bytes(buf)

    (length,) = struct.unpack("!I", await exactly(4))
    if length > MAX_STREAM_FRAME:
        raise DecodeError(f"frame of {length} bytes exceeds {MAX_STREAM_FRAME}")
    return await exactly(length)


class GossipNode:
    """Runs one :class:`Swim` over a :class:`Transport`.

    The caller owns the transport. ``on_change`` is called after anything that
    may have changed the catalog or membership (to wake blocking queries).
    """

    def __init__(
        self,
        swim: Swim,
        transport: Transport,
        keyring: Keyring | None = None,
        *,
        on_change: Callable[[], None] = lambda: None,
        on_keyring_change: Callable[[Keyring], None] = lambda keyring: None,
        rng: random.Random | None = None,
    ) -> None:
        self.swim = swim
        self.transport = transport
        self.keyring = keyring or Keyring()
        self.on_change = on_change
        self.rng = rng or random.Random()
        self.dropped: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._push_pulls = trio.Semaphore(MAX_PUSH_PULLS)
        self.on_keyring_change = on_keyring_change
        self._keyring_answers: dict[int, dict[str, KeyringResponse]] = {}
        self._keyring_event = trio.Event()

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _seal(self, payload: bytes) -> bytes:
        return self.keyring.seal(frame(payload))

    def _open(self, data: bytes) -> bytes | None:
        try:
            return unframe(self.keyring.open(data))
        except DecodeError as exc:
            self._drop("undecryptable" if isinstance(exc, DecryptError) else "malformed")
            return None

    async def _execute(
        self, outputs: Iterable[Send | StartPushPull | KeyringWork | TcpPing]
    ) -> None:
        for out in outputs:
            if isinstance(out, Send):
                await self.transport.send(out.addr, self._seal(out.payload))
            elif isinstance(out, TcpPing):
                if self._nursery is not None:
                    self._nursery.start_soon(self._tcp_ping, out)
            elif isinstance(out, KeyringWork):
                msg = out.message
                if isinstance(msg, KeyringRequest):
                    answer = self._apply_keyring(msg)
                    await self.transport.send(msg.origin_addr, self._seal(encode(answer)))
                elif msg.id in self._keyring_answers:
                    self._keyring_answers[msg.id][msg.node] = msg
                    self._keyring_event.set()
            elif self._nursery is not None:
                self._nursery.start_soon(self.push_pull, out.addr, out.join)

    # --- keyring rotation ------------------------------------------------------------

    def _apply_keyring(self, request: KeyringRequest) -> KeyringResponse:
        """Apply one keyring operation here; persisted through ``on_keyring_change``."""
        ok, error = True, ""
        try:
            key = base64.b64decode(request.key, validate=True) if request.key else b""
            if request.op is KeyringOp.INSTALL:
                self.keyring.install(key)
            elif request.op is KeyringOp.USE:
                self.keyring.use(key)
            elif request.op is KeyringOp.REMOVE:
                self.keyring.remove(key)
            if request.op is not KeyringOp.LIST:
                self.on_keyring_change(self.keyring)
        except (KeyringError, ValueError) as exc:
            ok, error = False, str(exc)[:200]
        return KeyringResponse(request.id, self.swim.name, ok, error,
                               tuple(self.keyring.to_base64()))  # fmt: skip

    async def keyring_operation(
        self, op: KeyringOp, key: str, *, wait: float = KEYRING_WAIT
    ) -> tuple[list[KeyringResponse], int]:
        """Roll ``op`` across the cluster; returns the answers and the members expected.

        Applied here at once, gossiped to every member, each of which applies it
        and answers; returns when every live member answered or after ``wait``.
        """
        request = self.swim.keyring_request(op, key)
        answers = {self.swim.name: self._apply_keyring(request)}
        self._keyring_answers[request.id] = answers
        expected = self.swim.num_live
        try:
            with trio.move_on_after(wait):
                while len(answers) < expected:
                    await self._keyring_event.wait()
                    self._keyring_event = trio.Event()
        finally:
            del self._keyring_answers[request.id]
        return list(answers.values()), expected

    # --- the loop ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; started once the stream listener runs."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(functools.partial(self.transport.serve, self._answer_push_pull))
            nursery.start_soon(self._loop)
            task_status.started()

    async def _loop(self) -> None:
        swim = self.swim
        while True:
            deadline = swim.next_deadline()
            if trio.current_time() >= deadline:
                await self._execute(swim.tick(trio.current_time()))
                self.on_change()
                await (
                    trio.lowlevel.checkpoint()
                )  # a timer that fails to advance must not starve others
                continue
            received = None
            with trio.move_on_at(deadline):
                received = await self.transport.receive()
            if received is None:
                continue  # the next timer is due
            # Handled outside the deadline's scope: a cancel in the middle would drop
            # the packet's other outputs (a keyring answer after an ack: lost).
            data, addr = received
            payload = self._open(data)
            if payload is not None:
                await self._execute(swim.receive(payload, addr, trio.current_time()))
                self.on_change()

    # --- push-pull ----------------------------------------------------------------------

    async def push_pull(self, addr: str, join: bool = False) -> bool:
        """One push-pull with ``addr``; True when it completed."""
        async with self._push_pulls:
            with trio.move_on_after(PUSH_PULL_TIMEOUT):
                try:
                    stream = await self.transport.connect(addr)
                    async with stream:
                        await _send_frame(
                            stream, self._seal(encode(self.swim.push_pull_state(join)))
                        )
                        reply = self._decode_push_pull(await _receive_frame(stream))
                        if reply is None:
                            return False
                        rest = self.swim.finish_push_pull(reply, trio.current_time())
                        self.on_change()
                        await _send_frame(stream, self._seal(encode(rest)))
                        return True
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    self._drop("push_pull_unreachable")
                    return False
                except DecodeError:
                    self._drop("push_pull_malformed")
                    return False
        self._drop("push_pull_timeout")
        return False

    def _decode_push_pull(self, data: bytes) -> PushPull | None:
        msg = self._decode_stream(data)
        if msg is not None and not isinstance(msg, PushPull):
            self._drop("unexpected")
            return None
        return msg

    def _decode_stream(self, data: bytes) -> PushPull | Ping | Ack | None:
        """A stream frame: a push-pull leg, or a TCP ping and its ack."""
        payload = self._open(data)
        if payload is None:
            return None
        try:
            msg = decode(payload)
        except DecodeError:
            self._drop("malformed")
            return None
        if not isinstance(msg, PushPull | Ping | Ack):
            self._drop("unexpected")
            return None
        return msg

    async def _tcp_ping(self, ping: TcpPing) -> None:
        """memberlist's TCP fallback probe: a ping on a new stream, its ack by ``deadline``."""
        with trio.move_on_at(ping.deadline):
            try:
                stream = await self.transport.connect(ping.addr)
                async with stream:
                    await _send_frame(stream, self._seal(ping.payload))
                    answer = self._decode_stream(await _receive_frame(stream))
                    if isinstance(answer, Ack) and answer.seq == ping.seq:
                        self.swim.tcp_acked(ping.seq, trio.current_time())
                        return
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, DecodeError):
                pass
        self._drop("tcp_ping_failed")

    async def _answer_push_pull(self, stream: trio.abc.Stream) -> None:
        async with stream:
            with trio.move_on_after(PUSH_PULL_TIMEOUT):
                try:
                    request = self._decode_stream(await _receive_frame(stream))
                    if isinstance(request, Ping):  # a TCP fallback probe
                        ack = self.swim.answer_ping(request)
                        if ack is not None:
                            await _send_frame(stream, self._seal(encode(ack)))
                        return
                    if not isinstance(request, PushPull):
                        if request is not None:
                            self._drop("unexpected")
                        return
                    reply = self.swim.answer_push_pull(request, trio.current_time())
                    self.on_change()
                    await _send_frame(stream, self._seal(encode(reply)))
                    rest = self._decode_push_pull(await _receive_frame(stream))
                    if rest is not None:
                        self.swim.take_records(rest)
                        self.on_change()
                except (trio.BrokenResourceError, trio.ClosedResourceError, DecodeError):
                    self._drop("push_pull_malformed")

    # --- join and leave -------------------------------------------------------------------

    async def join(self, seeds: Iterable[str], *, retries: int, backoff: float) -> int:
        """Push-pull with every seed, retrying each with jittered exponential backoff.

        Returns how many seeds were reached (0: we are alone, for now).
        """
        reached = 0
        for seed in seeds:
            addr = normalize_addr(seed)
            if addr == self.swim.addr:
                continue
            delay = backoff
            for attempt in range(retries):
                if await self.push_pull(addr, join=True):
                    reached += 1
                    break
                if attempt + 1 < retries:
                    await trio.sleep(delay * self.rng.uniform(0.5, 1.5))
                    delay *= 2
            else:
                log.warning("could not join through seed", seed=addr, attempts=retries)
        return reached

    async def leave(self) -> None:
        """Announce a graceful leave (best effort, returns at once)."""
        await self._execute(self.swim.leave(trio.current_time()))

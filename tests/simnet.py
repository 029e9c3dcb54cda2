"""An in-memory network for gossip simulations in one ``trio.run`` (MockClock).

Packets are delivered after ``latency`` seconds unless lost (``loss``
probability), blocked by a partition, or addressed to a killed member.
Streams (push-pull, TCP pings) are in-memory stream pairs handled in the
destination's nursery; an unreachable destination raises OSError like a refused
connect. Loss delays a stream rather than dropping bytes, as TCP's
retransmissions do: a lost SYN costs Linux's initial RTO (1 s, RFC 6298), a lost
segment its minimum RTO (200 ms), each with probability ``loss``.
"""

from __future__ import annotations

import heapq
import random

import trio
import trio.testing

from hostmesh.catalog._gossip import StreamHandler, Transport

#: Packets waiting in one member's inbox; more are dropped (a full socket buffer).
INBOX = 4096
#: s a lost SYN delays a connect (Linux's initial retransmission timeout).
SYN_RTO = 1.0
#: s a lost segment delays a stream write (Linux's minimum retransmission timeout).
MIN_RTO = 0.2


class _LossyStream(trio.abc.Stream):
    """A stream whose writes are late by ``MIN_RTO`` with the network's loss rate."""

    def __init__(self, inner: trio.abc.Stream, net: SimNetwork) -> None:
        self._inner = inner
        self._net = net

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        while self._net.rng.random() < self._net.loss:
            await trio.sleep(MIN_RTO)
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


class SimNetwork:
    def __init__(self, *, latency: float = 0.001, loss: float = 0.0, seed: int = 0,
                 send_delay: float = 0.0) -> None:  # fmt: skip
        self.latency = latency
        self.send_delay = send_delay  # s each send takes its sender, as on a loaded host
        self.loss = loss
        self.rng = random.Random(seed)
        self.members: dict[str, SimTransport] = {}
        self.groups: dict[str, int] = {}  # addr -> partition group; absent = group 0
        self.killed: set[str] = set()
        self.udp_blocked: set[str] = set()  # members whose UDP is dropped (a firewall); TCP works
        self.sent = 0
        self.bytes_sent = 0  # payload bytes posted (bench: bytes per second per node)
        self.delivered = 0
        self._heap: list[tuple[float, int, str, bytes, str]] = []
        self._seq = 0
        self._wake = trio.Event()

    def transport(self, addr: str) -> SimTransport:
        t = SimTransport(self, addr)
        self.members[addr] = t
        return t

    def reachable(self, src: str, dst: str) -> bool:
        return (
            dst in self.members
            and src not in self.killed
            and dst not in self.killed
            and self.groups.get(src, 0) == self.groups.get(dst, 0)
        )

    def partition(self, *groups: set[str]) -> None:
        """Members in different groups cannot reach each other."""
        self.groups = {addr: i + 1 for i, group in enumerate(groups) for addr in group}

    def heal(self) -> None:
        self.groups = {}

    def post(self, src: str, dst: str, data: bytes) -> None:
        self.sent += 1
        self.bytes_sent += len(data)
        if not self.reachable(src, dst) or self.rng.random() < self.loss:
            return
        if src in self.udp_blocked or dst in self.udp_blocked:
            return
        self._seq += 1
        heapq.heappush(self._heap, (trio.current_time() + self.latency, self._seq, dst, data, src))
        self._wake.set()

    async def run(self) -> None:
        """Deliver packets until cancelled."""
        while True:
            while self._heap and self._heap[0][0] <= trio.current_time():
                _, _, dst, data, src = heapq.heappop(self._heap)
                member = self.members.get(dst)
                if member is not None and dst not in self.killed:
                    try:
                        member.inbox_send.send_nowait((data, src))
                        self.delivered += 1
                    except trio.WouldBlock:
                        pass
            if self._heap:
                with trio.move_on_at(self._heap[0][0]):
                    await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake = trio.Event()


class SimTransport(Transport):
    def __init__(self, net: SimNetwork, addr: str) -> None:
        self.net = net
        self.addr = addr
        self.inbox_send, self.inbox = trio.open_memory_channel[tuple[bytes, str]](INBOX)
        self._handler: StreamHandler | None = None
        self._nursery: trio.Nursery | None = None

    async def send(self, addr: str, data: bytes) -> None:
        if self.net.send_delay:
            await trio.sleep(self.net.send_delay)
        self.net.post(self.addr, addr, data)

    async def receive(self) -> tuple[bytes, str]:
        return await self.inbox.receive()

    async def connect(self, addr: str) -> trio.abc.Stream:
        peer = self.net.members.get(addr)
        if not self.net.reachable(self.addr, addr) or peer is None or peer._nursery is None:
            raise ConnectionRefusedError(f"{addr} unreachable")
        while self.net.rng.random() < self.net.loss:
            await trio.sleep(SYN_RTO)  # the SYN (or its SYN-ACK) was lost
        await trio.sleep(self.net.latency)
        if not self.net.reachable(self.addr, addr):
            raise ConnectionRefusedError(f"{addr} unreachable")
        client, server = trio.testing.memory_stream_pair()
        assert peer._handler is not None
        peer._nursery.start_soon(peer._handler, _LossyStream(server, self.net))
        return _LossyStream(client, self.net)

    async def serve(
        self,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._handler = handler
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

"""SWIM membership with the Lifeguard extensions: a sans-IO state machine.

Inputs are decoded UDP payloads (``receive``), push-pull states (TCP, through
the adapter) and the passage of time (``tick``); outputs are :class:`Send`
(a UDP payload to an address) and :class:`StartPushPull` (open a TCP
exchange). Nothing here reads a clock or touches a socket.

Behaviour follows SWIM (Das et al., 2002), Lifeguard (Dadgar et al., 2017) and
memberlist (state.go):

- Every probe interval (scaled by the awareness score) one member, in a
  shuffled round-robin order, is pinged. No ack within the probe timeout:
  ``indirect_checks`` other members are asked to ping it and to nack if it
  does not answer, and it is pinged over TCP as well (memberlist's fallback:
  lost UDP rarely stops a stream, which TCP retransmits; :class:`TcpPing`). No
  ack by the end of the interval: it is suspected.
- A suspicion lasts between min = mult x max(1, log10 N) x probe interval and
  max = 6 x min, shrinking with independent confirmations; then the member is
  declared dead. A member refutes a suspicion or death of itself by gossiping
  a higher incarnation. A ping to a suspect carries the suspicion (buddy
  system) so the suspect learns of it at once.
- Membership changes and catalog records are broadcast: piggybacked on pings
  and acks and sent every gossip interval to ``gossip_nodes`` members, each
  message up to mult x ceil(log10(N+1)) times.
- Push-pull over TCP every push-pull interval (scaled above 32 members)
  exchanges membership and catalog digests, then only the newer records.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from hostmesh._config import GossipConfig

from ._awareness import Awareness
from ._broadcast import BroadcastQueue
from ._catalog import Catalog
from ._codec import (
    COMPOUND_HEADER,
    COMPOUND_OVERHEAD,
    FRAME_OVERHEAD,
    MAX_TCP_FRAME,
    DecodeError,
    decode,
    decode_compound,
    encode,
    encode_compound,
    encode_record,
)
from ._keyring import SEAL_OVERHEAD
from ._messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    KeyringOp,
    KeyringRequest,
    KeyringResponse,
    MemberState,
    MemberStatus,
    Message,
    MsgType,
    Nack,
    Ping,
    PushPull,
    Records,
    Suspect,
)
from ._model import NodeRecord
from ._suspicion import Suspicion, expected_confirmations, suspicion_timeout_bounds

__all__ = ["KeyringWork", "Member", "Send", "StartPushPull", "Swim", "TcpPing"]

#: Bytes of a UDP packet that are not messages: the frame (version, CRC) and,
#: with a keyring, the seal (version, nonce, tag); reserved whether or not
#: encryption is on, so a packet never outgrows the budget.
PACKET_OVERHEAD = FRAME_OVERHEAD + SEAL_OVERHEAD
#: Encoded records one push-pull leg carries at most (the frame limit, with room
#: for the membership); the rest goes in the next push-pull.
MAX_PUSH_PULL_RECORD_BYTES = MAX_TCP_FRAME // 2
_COMPOUND = bytes((MsgType.COMPOUND,))
#: Messages that are broadcast, so arrive many times with identical bytes (the
#: encoding is deterministic); handling a duplicate again changes nothing.
_BROADCAST_TYPES = frozenset(
    bytes((t,)) for t in (MsgType.ALIVE, MsgType.SUSPECT, MsgType.DEAD, MsgType.RECORDS)
)
#: Decoded broadcasts remembered, so that the many copies of one broadcast are
#: decoded once (messages are immutable values; the memo is per process).
DECODED_MEMO = 16384
_decoded: dict[bytes, Message] = {}
#: Keyring request ids remembered so that each is applied once.
SEEN_KEYRING_REQUESTS = 1024
#: Seconds between sweeps for members to forget.
REAP_INTERVAL = 1.0
#: Queued broadcasts kept at most (memberlist bounds its queue the same way).
MAX_QUEUED_BROADCASTS = 4096


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``payload`` (an encoded message or compound) over UDP to ``addr``."""

    addr: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class StartPushPull:
    """Open a TCP push-pull with ``addr`` (``join``: as part of joining)."""

    addr: str
    join: bool = False


@dataclass(frozen=True, slots=True)
class TcpPing:
    """Ping ``addr`` over TCP beside the indirect probes (memberlist's fallback: UDP
    loss rarely stops a stream, whose packets are retransmitted).

    The adapter sends ``payload`` (an encoded :class:`Ping`) on a new stream and
    hands an :class:`Ack` that comes back before ``deadline`` to :meth:`Swim.tcp_acked`.
    """

    addr: str
    payload: bytes
    seq: int
    deadline: float


@dataclass(frozen=True, slots=True)
class KeyringWork:
    """A keyring request or response for the adapter (which owns the keyring)."""

    message: KeyringRequest | KeyringResponse


Output = Send | StartPushPull | KeyringWork | TcpPing


@dataclass
class Member:
    name: str
    addr: str
    incarnation: int
    status: MemberStatus
    meta: Mapping[str, str] = field(default_factory=dict)
    changed: float = 0.0  # when the status last changed


@dataclass
class _Probe:
    seq: int
    target: str
    direct_deadline: float
    end: float
    acked: bool = False
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass
class _Relay:
    """An indirect ping we run for another member."""

    origin_seq: int
    origin_addr: str
    deadline: float
    nack: bool


class Swim:
    """One member's view of the cluster.

    Args:
        config: gossip settings.
        name: this node's name (the catalog's node name).
        addr: ``host:port`` of this node's gossip listener.
        catalog: merged with gossiped records; liveness is written into it.
        now: the current time (the adapter's clock).
        meta: small facts gossiped with our alive message (az, region).
        rng: randomness (seeded in simulations).
    """

    def __init__(
        self,
        config: GossipConfig,
        name: str,
        addr: str,
        catalog: Catalog,
        *,
        now: float,
        meta: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.addr = addr
        self.catalog = catalog
        self.rng = rng or random.Random()
        self.me = Member(name, addr, 0, MemberStatus.ALIVE, dict(meta or {}), now)
        self.members: dict[str, Member] = {name: self.me}
        self.awareness = Awareness(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue(config.retransmit_mult)
        self.leaving = False
        self.stats: dict[str, int] = {}
        self._seq = self.rng.randrange(1 << 30)
        self._next_reap = now + REAP_INTERVAL
        self._keyring_seen: dict[int, None] = {}
        self._live = 1  # members alive or suspect, ourselves included
        self._peers: list[str] = []  # every member but us, for random picks
        self._peers_dirty = True
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._next_probe = now + self.rng.uniform(0, config.probe_interval)
        self._next_gossip = now + self.rng.uniform(0, config.gossip_interval)
        self._next_push_pull = now + self.rng.uniform(0, config.push_pull_interval)
        self._next_reconnect = now + self.rng.uniform(0, config.reconnect_interval)
        self._queue_alive()

    # --- bookkeeping --------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    @property
    def num_live(self) -> int:
        """Members alive or suspect, ourselves included."""
        return self._live

    def _queue(self, key: str, msg: Message) -> None:
        self.broadcasts.queue(key, encode(msg))
        if len(self.broadcasts) > MAX_QUEUED_BROADCASTS:
            self.broadcasts.prune(MAX_QUEUED_BROADCASTS)

    def _queue_alive(self) -> None:
        me = self.me
        self._queue(f"m:{me.name}", Alive(me.incarnation, me.name, me.addr, me.meta))

    def _packet(self, first: list[Message]) -> bytes:
        """``first`` plus as many queued broadcasts as fit in one UDP packet."""
        parts = [encode(m) for m in first]
        used = COMPOUND_HEADER + sum(len(p) + COMPOUND_OVERHEAD for p in parts)
        room = self.config.packet_budget - PACKET_OVERHEAD - used
        if room > 0:
            parts += self.broadcasts.get(COMPOUND_OVERHEAD, room, self.num_live)
        if len(parts) == 1:
            return parts[0]
        return encode_compound(parts)

    def _set_status(self, member: Member, status: MemberStatus, now: float) -> None:
        if member.status is status:
            return
        self._live += _is_live(status) - _is_live(member.status)
        member.status = status
        member.changed = now
        self._count(f"status_{status.name.lower()}")
        dead = status in (MemberStatus.DEAD, MemberStatus.LEFT)
        if member.name != self.name:
            self.catalog.set_node_dead(member.name, dead)
        if status is not MemberStatus.SUSPECT:
            self._suspicions.pop(member.name, None)

    # --- the local node -------------------------------------------------------------

    def record_changed(self, record: NodeRecord) -> None:
        """Our own record has a new version: gossip it."""
        self._queue(f"r:{record.node.name}", Records((record,)))

    def keyring_request(self, op: KeyringOp, key: str) -> KeyringRequest:
        """Start a cluster-wide keyring operation; the adapter applies it here too."""
        request = KeyringRequest(self._next_seq(), op, key, self.addr)
        self._keyring_seen[request.id] = None
        self._queue(f"k:{request.id}", request)
        return request

    def leave(self, now: float) -> list[Output]:
        """Gracefully leave: tell up to ``gossip_nodes`` members at once and gossip it."""
        self.leaving = True
        me = self.me
        self._set_status(me, MemberStatus.LEFT, now)
        msg = Dead(me.incarnation, me.name, me.name)
        self._queue(f"m:{me.name}", msg)
        return [Send(m.addr, self._packet([msg])) for m in self._gossip_targets(now)]

    def join(self, seeds: Iterable[str]) -> list[Output]:
        """Push-pull with every seed (the adapter retries with backoff)."""
        return [StartPushPull(seed, join=True) for seed in seeds if seed != self.addr]

    # --- receiving --------------------------------------------------------------------

    def receive(self, payload: bytes, from_addr: str, now: float) -> list[Output]:
        """Handle one UDP payload (already unframed and decrypted)."""
        try:
            parts = decode_compound(payload) if payload[:1] == _COMPOUND else [payload]
            messages = [_decode_part(part) for part in parts]
        except DecodeError:
            self._count("dropped_malformed")
            return []
        out: list[Output] = []
        for msg in messages:
            out.extend(self._handle(msg, from_addr, now))
        return out

    def _handle(self, msg: Message, from_addr: str, now: float) -> list[Output]:
        if isinstance(msg, Ping):
            ack = self.answer_ping(msg)
            return [] if ack is None else [Send(from_addr, self._packet([ack]))]
        if isinstance(msg, IndirectPing):
            seq = self._next_seq()
            self._relays[seq] = _Relay(
                msg.seq, msg.source_addr, now + self.config.probe_timeout, msg.nack
            )
            ping = Ping(seq, msg.target, self.name, self.addr)
            return [Send(msg.target_addr, self._packet([ping]))]
        if isinstance(msg, Ack):
            return self._on_ack(msg.seq, now)
        if isinstance(msg, Nack):
            probe = self._probe
            if probe is not None and probe.seq == msg.seq:
                probe.nacks += 1
            return []
        if isinstance(msg, KeyringRequest):
            if msg.id in self._keyring_seen:
                return []
            self._keyring_seen[msg.id] = None
            if len(self._keyring_seen) > SEEN_KEYRING_REQUESTS:
                del self._keyring_seen[next(iter(self._keyring_seen))]
            self._queue(f"k:{msg.id}", msg)  # pass it on, like membership news
            return [KeyringWork(msg)]
        if isinstance(msg, KeyringResponse):
            return [KeyringWork(msg)]
        if isinstance(msg, Suspect):
            self._on_suspect(msg, now)
        elif isinstance(msg, Alive):
            self._on_alive(msg, now)
        elif isinstance(msg, Dead):
            self._on_dead(msg, now)
        elif isinstance(msg, Records):
            self._merge_records(msg.records)
        else:  # PushPull only travels over TCP
            self._count("dropped_unexpected")
        return []

    def _on_ack(self, seq: int, now: float) -> list[Output]:
        if self._ack_probe(seq):
            self.awareness.apply_delta(-1)
            return []
        relay = self._relays.pop(seq, None)
        if relay is not None:
            return [Send(relay.origin_addr, encode(Ack(relay.origin_seq)))]
        return []

    def _ack_probe(self, seq: int) -> bool:
        """Mark the running probe answered if ``seq`` is its ping; True if it was."""
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return False
        probe.acked = True
        return True

    def tcp_acked(self, seq: int, now: float) -> None:
        """The target of probe ``seq`` answered our TCP ping: the probe succeeded."""
        if self._ack_probe(seq):
            self._count("tcp_fallback_acks")  # UDP failed where TCP got through

    def answer_ping(self, msg: Ping) -> Ack | None:
        """The answer to a ping, over UDP or a stream (None: not addressed to us)."""
        if msg.target != self.name:
            self._count("dropped_wrong_target")
            return None
        return Ack(msg.seq)

    def _refute(self, incarnation: int) -> None:
        """Someone thinks we are suspect or dead: outbid them."""
        self.me.incarnation = max(self.me.incarnation, incarnation) + 1
        self.awareness.apply_delta(1)
        self._count("refutations")
        self._queue_alive()

    def _on_suspect(self, msg: Suspect, now: float) -> None:
        if msg.node == self.name:
            if not self.leaving and msg.incarnation >= self.me.incarnation:
                self._refute(msg.incarnation)
            return
        member = self.members.get(msg.node)
        if member is None or msg.incarnation < member.incarnation:
            return
        if member.status is MemberStatus.SUSPECT:
            timer = self._suspicions.get(msg.node)
            if timer is not None and timer.confirm(msg.source, now):
                self._queue(f"m:{msg.node}", msg)  # spread the confirmation
            return
        if member.status is not MemberStatus.ALIVE:
            return
        member.incarnation = msg.incarnation
        self._set_status(member, MemberStatus.SUSPECT, now)
        n = self.num_live
        low, high = suspicion_timeout_bounds(
            self.config.suspicion_mult,
            self.config.suspicion_max_timeout_mult,
            n,
            self.config.probe_interval,
        )
        k = expected_confirmations(self.config.suspicion_mult, n)
        self._suspicions[msg.node] = Suspicion(msg.source, k, low, high, now)
        self._queue(f"m:{msg.node}", msg)

    def _on_alive(self, msg: Alive, now: float) -> None:
        if msg.node == self.name:
            if msg.incarnation > self.me.incarnation and not self.leaving:
                self._refute(msg.incarnation)  # a stale self from before a restart
            return
        member = self.members.get(msg.node)
        if member is None:
            self.members[msg.node] = Member(
                msg.node, msg.addr, msg.incarnation, MemberStatus.ALIVE, dict(msg.meta), now
            )
            self._live += 1
            self._peers_dirty = True
            self.catalog.set_node_dead(msg.node, False)
            self._count("status_alive")
            self._queue(f"m:{msg.node}", msg)
            return
        if member.addr != msg.addr:
            gone = member.status in (MemberStatus.DEAD, MemberStatus.LEFT)
            if not (gone and now - member.changed >= self.config.dead_node_reclaim_time):
                self._count("dropped_address_conflict")
                return
            member.addr = msg.addr  # reclaimed: the name came back on a new address
        elif msg.incarnation <= member.incarnation:
            return
        member.incarnation = msg.incarnation
        member.meta = dict(msg.meta)
        self._set_status(member, MemberStatus.ALIVE, now)
        self._queue(f"m:{msg.node}", msg)

    def _on_dead(self, msg: Dead, now: float) -> None:
        if msg.node == self.name:
            if not self.leaving and msg.incarnation >= self.me.incarnation:
                self._refute(msg.incarnation)
            return
        member = self.members.get(msg.node)
        if member is None or msg.incarnation < member.incarnation:
            return
        if member.status in (MemberStatus.DEAD, MemberStatus.LEFT):
            return
        member.incarnation = msg.incarnation
        left = msg.source == msg.node
        self._set_status(member, MemberStatus.LEFT if left else MemberStatus.DEAD, now)
        self._queue(f"m:{msg.node}", msg)

    def _merge_records(self, records: Iterable[NodeRecord]) -> int:
        taken = 0
        for record in records:
            if record.node.name == self.name:
                continue  # we own our record; stale copies of it are ignored
            if self.catalog.merge(record):
                taken += 1
                self._queue(f"r:{record.node.name}", Records((record,)))
        self._count("records_merged", taken)
        return taken

    # --- push-pull --------------------------------------------------------------------

    def push_pull_state(self, join: bool = False) -> PushPull:
        """What we send when we open a push-pull."""
        members = tuple(
            MemberState(m.name, m.addr, m.incarnation, m.status, m.meta)
            for m in self.members.values()
        )
        return PushPull(join, members, self.catalog.digest())

    def _records_newer_than(self, digest: Mapping[str, tuple[int, int]]) -> tuple[NodeRecord, ...]:
        out = []
        size = 0
        for record in self.catalog:
            theirs = digest.get(record.node.name)
            if theirs is None or record.key > tuple(theirs):
                size += len(encode_record(record))
                if size > MAX_PUSH_PULL_RECORD_BYTES:
                    break  # the rest goes in the next push-pull
                out.append(record)
        return tuple(out)

    def _merge_members(self, members: Iterable[MemberState], now: float) -> None:
        for m in members:
            known = m.name in self.members
            if m.status is MemberStatus.ALIVE:
                self._on_alive(Alive(m.incarnation, m.name, m.addr, m.meta), now)
            elif m.status is MemberStatus.SUSPECT:
                if not known:
                    self._on_alive(Alive(m.incarnation, m.name, m.addr, m.meta), now)
                self._on_suspect(Suspect(m.incarnation, m.name, "push-pull"), now)
            elif not known:
                continue  # never learn a member from news of its death (no resurrection)
            elif m.status is MemberStatus.LEFT:
                self._on_dead(Dead(m.incarnation, m.name, m.name), now)
            else:
                # memberlist: a remote "dead" is only a suspicion here, so a
                # partitioned node gets its chance to refute.
                self._on_suspect(Suspect(m.incarnation, m.name, "push-pull"), now)

    def answer_push_pull(self, msg: PushPull, now: float) -> PushPull:
        """A peer opened a push-pull: merge its state, answer with ours and what it lacks."""
        self._count("push_pull_answered")
        self._merge_members(msg.members, now)
        self._merge_records(msg.records)
        state = self.push_pull_state(msg.join)
        return PushPull(msg.join, state.members, state.digest,
                        self._records_newer_than(msg.digest))  # fmt: skip

    def finish_push_pull(self, reply: PushPull, now: float) -> PushPull:
        """We opened a push-pull and got ``reply``: merge it; returns the records the peer lacks
        (sent back on the same connection, an empty-member PushPull)."""
        self._count("push_pull_done")
        self._merge_members(reply.members, now)
        self._merge_records(reply.records)
        return PushPull(False, (), {}, self._records_newer_than(reply.digest))

    def take_records(self, msg: PushPull) -> None:
        """The last leg of a push-pull we answered: the records we lacked."""
        self._merge_records(msg.records)

    # --- time -------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """The earliest time :meth:`tick` has something to do (never, once leaving)."""
        if self.leaving:
            return math.inf
        times = [self._next_probe, self._next_gossip, self._next_push_pull, self._next_reconnect]
        if self._probe is not None:
            times.append(self._probe.end if self._probe.indirect else self._probe.direct_deadline)
        times.extend(r.deadline for r in self._relays.values())
        times.extend(s.deadline for s in self._suspicions.values())
        return min(times)

    def tick(self, now: float) -> list[Output]:
        """Run every timer that is due."""
        out: list[Output] = []
        if self.leaving:
            return out
        for seq, relay in list(self._relays.items()):
            if relay.deadline <= now:
                del self._relays[seq]
                if relay.nack:
                    out.append(Send(relay.origin_addr, encode(Nack(relay.origin_seq))))
        for name, timer in list(self._suspicions.items()):
            if timer.expired(now):
                member = self.members[name]
                del self._suspicions[name]
                msg = Dead(member.incarnation, name, self.name)
                self._on_dead(msg, now)
                self._count("declared_dead")
        if self._probe is not None:
            out.extend(self._advance_probe(now))
        if self._probe is None and now >= self._next_probe:
            out.extend(self._start_probe(now))
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval
            out.extend(self._gossip(now))
        if now >= self._next_push_pull:
            self._next_push_pull = now + self._push_pull_interval()
            peers = self._random_peers(1, lambda m: m.status is MemberStatus.ALIVE)
            if peers:
                out.append(StartPushPull(peers[0].addr))
        if now >= self._next_reconnect:
            self._next_reconnect = now + self.config.reconnect_interval
            failed = self._random_peers(1, lambda m: m.status is MemberStatus.DEAD)
            if failed:
                self._count("reconnects")
                out.append(StartPushPull(failed[0].addr))
        self._reap(now)
        return out

    def _push_pull_interval(self) -> float:
        """memberlist: x (ceil(log2 N - 5) + 1) above 32 members."""
        n = self.num_live
        scale = 1 if n <= 32 else math.ceil(math.log2(n) - 5) + 1
        return self.config.push_pull_interval * scale

    def _start_probe(self, now: float) -> list[Output]:
        target = self._next_probe_target()
        interval = self.awareness.scale(self.config.probe_interval)
        self._next_probe = now + interval
        if target is None:
            return []
        probe = _Probe(
            self._next_seq(), target.name, now + self.config.probe_timeout, now + interval
        )
        self._probe = probe
        first: list[Message] = [Ping(probe.seq, target.name, self.name, self.addr)]
        if target.status is MemberStatus.SUSPECT:
            # Buddy system: tell the suspect directly so it can refute at once.
            first.append(Suspect(target.incarnation, target.name, self.name))
        self._count("probes")
        return [Send(target.addr, self._packet(first))]

    def _next_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_order:
                member = self.members.get(self._probe_order.pop())
                if member is not None and member.status in (
                    MemberStatus.ALIVE, MemberStatus.SUSPECT):  # fmt: skip
                    return member
            self._probe_order = [n for n in self.members if n != self.name]
            self.rng.shuffle(self._probe_order)
        return None

    def _advance_probe(self, now: float) -> list[Output]:
        probe = self._probe
        assert probe is not None
        target = self.members.get(probe.target)
        if probe.acked or target is None or target.status in (
            MemberStatus.DEAD, MemberStatus.LEFT):  # fmt: skip
            self._probe = None
            return []
        if not probe.indirect:
            if now < probe.direct_deadline:
                return []
            probe.indirect = True
            chosen = self._random_peers(
                self.config.indirect_checks,
                lambda m: m.name != target.name and m.status is MemberStatus.ALIVE,
            )
            probe.expected_nacks = len(chosen)
            msg = IndirectPing(probe.seq, target.name, target.addr, self.name, self.addr, True)
            self._count("indirect_probes")
            out: list[Output] = [Send(m.addr, encode(msg)) for m in chosen]
            ping = Ping(probe.seq, target.name, self.name, self.addr)
            out.append(TcpPing(target.addr, encode(ping), probe.seq, probe.end))
            return out
        if now < probe.end:
            return []
        # No ack at all: suspect it. Lifeguard: missing nacks mean our own trouble.
        self._probe = None
        missed = probe.expected_nacks - probe.nacks
        self.awareness.apply_delta(missed if probe.expected_nacks else 1)
        self._count("probes_failed")
        self._on_suspect(Suspect(target.incarnation, target.name, self.name), now)
        return []

    def _random_peers(self, k: int, eligible: Callable[[Member], bool]) -> list[Member]:
        """Up to ``k`` distinct random members (not us) for which ``eligible`` holds.

        Random picks with a bounded number of tries: O(k), not O(N), per call.
        """
        if self._peers_dirty:
            self._peers = [n for n in self.members if n != self.name]
            self._peers_dirty = False
        peers = self._peers
        chosen: dict[str, Member] = {}
        if not peers:
            return []
        if len(peers) <= 4 * k:
            pool = [self.members[n] for n in peers if eligible(self.members[n])]
            return self.rng.sample(pool, min(k, len(pool)))
        for _ in range(8 * k):
            member = self.members[peers[self.rng.randrange(len(peers))]]
            if member.name not in chosen and eligible(member):
                chosen[member.name] = member
                if len(chosen) == k:
                    break
        return list(chosen.values())

    def _gossip_targets(self, now: float) -> list[Member]:
        window = self.config.gossip_to_the_dead_time

        def eligible(m: Member) -> bool:
            return bool(_is_live(m.status)) or now - m.changed < window

        return self._random_peers(self.config.gossip_nodes, eligible)

    def _gossip(self, now: float) -> list[Output]:
        if not len(self.broadcasts):
            return []
        out: list[Output] = []
        for member in self._gossip_targets(now):
            room = self.config.packet_budget - PACKET_OVERHEAD - COMPOUND_HEADER
            parts = self.broadcasts.get(COMPOUND_OVERHEAD, room, self.num_live)
            if not parts:
                break
            payload = parts[0] if len(parts) == 1 else encode_compound(parts)
            out.append(Send(member.addr, payload))
        return out

    def _reap(self, now: float) -> None:
        """Forget members that left more than gossip_to_the_dead_time ago, and failed
        ones after reconnect_timeout (until then they are retried, see tick)."""
        if now < self._next_reap:
            return
        self._next_reap = now + REAP_INTERVAL
        keep = {
            MemberStatus.LEFT: self.config.gossip_to_the_dead_time,
            MemberStatus.DEAD: self.config.reconnect_timeout,
        }
        for name in [
            n for n, m in self.members.items()
            if n != self.name and m.status in keep and now - m.changed > keep[m.status]
        ]:  # fmt: skip
            del self.members[name]
            self._peers_dirty = True


def _is_live(status: MemberStatus) -> int:
    return 1 if status in (MemberStatus.ALIVE, MemberStatus.SUSPECT) else 0


def _decode_part(part: bytes) -> Message:
    """Decode one message; broadcasts come from a bounded memo when seen before."""
    if part[:1] not in _BROADCAST_TYPES:
        return decode(part)
    msg = _decoded.get(part)
    if msg is None:
        msg = decode(part)
        if len(_decoded) >= DECODED_MEMO:
            del _decoded[next(iter(_decoded))]  # oldest first (dicts keep insertion order)
        _decoded[part] = msg
    return msg

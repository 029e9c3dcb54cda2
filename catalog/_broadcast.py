"""The gossip broadcast queue (memberlist queue.go's TransmitLimitedQueue).

Every state change a member learns (alive, suspect, dead, a new node record)
is queued here as an encoded message and piggybacked on outgoing probes and
gossip packets until it has been sent ``retransmit_limit`` times, which is
enough for it to reach every member with high probability in O(log N) rounds
(SWIM section 4.1; memberlist config.go ``RetransmitMult``).

Rules:

- Messages carry a key (``"member:<node>"``, ``"record:<node>"``). A new message
  supersedes a queued one with the same key: a newer ``alive`` makes the older
  ``suspect`` pointless, so it is never sent again.
- :meth:`BroadcastQueue.get` sends the least-transmitted messages first (new
  news travels first); among equally transmitted ones, the newest first.
- Messages that do not fit in the packet are skipped; smaller ones further
  down the order may still fill the space.

memberlist also prefers the longest message that fits within one transmit
count; here the order inside a count is by age only, which is simpler to
reason about and packs nearly as well when messages are of similar size.

Sans-IO: no I/O, no clock.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Broadcast", "BroadcastQueue", "retransmit_limit"]


def retransmit_limit(mult: int, num_nodes: int) -> int:
    """How many times each broadcast is sent: ``mult * ceil(log10(num_nodes + 1))``, at least 1.

    memberlist util.go ``retransmitLimit``. ``ceil(log10(n + 1))`` is the number
    of decimal digits of ``n`` (0 for ``n = 0``), computed here exactly rather
    than through floating point (``log10(1000)`` must give 3, not 3.0000001).

    Raises:
        ValueError: ``num_nodes`` is negative.
    """
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0, got {num_nodes}")
    node_scale = len(str(num_nodes)) if num_nodes else 0
    return max(1, mult * node_scale)


@dataclass(slots=True)
class Broadcast:
    """One queued message.

    ``seq`` orders messages by age (larger is newer); it is assigned by the queue.
    """

    key: str  # messages with the same key supersede each other
    payload: bytes  # already encoded
    transmits: int = 0  # times sent so far
    seq: int = field(default=0, compare=False)


#: The age key for bisect; attrgetter runs in C (a Python function here was the
#: queue's main cost in 1,000-member simulations).
_seq = operator.attrgetter("seq")


class BroadcastQueue:
    """Messages waiting to be piggybacked, each sent a limited number of times.

    Layout: one bucket per transmit count, each a list sorted by ``seq``
    (oldest first), plus a map from key to the queued message. :meth:`get`
    walks the buckets from the fewest transmits and each bucket from its end
    (newest), so it never sorts the queue and stops as soon as no queued
    message could fit in what is left of the packet. Moving a sent message to
    the next bucket is a binary search and a list insert.

    Args:
        retransmit_mult: the ``mult`` of :func:`retransmit_limit`.
    """

    def __init__(self, retransmit_mult: int) -> None:
        self.retransmit_mult = retransmit_mult
        self._by_key: dict[str, Broadcast] = {}
        self._buckets: dict[int, list[Broadcast]] = {}
        # payload length -> how many queued messages have it; gives the
        # smallest queued message for get()'s early exit.
        self._lengths: dict[int, int] = {}
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[Broadcast]:
        """The queued messages in send order (fewest transmits, then newest first).

        For inspection and tests; the messages are the queue's own, do not modify them.
        """
        for transmits in sorted(self._buckets):
            yield from reversed(self._buckets[transmits])

    def queue(self, key: str, payload: bytes) -> None:
        """Queue ``payload`` for broadcast, superseding any queued message with ``key``."""
        old = self._by_key.get(key)
        if old is not None:
            self._remove(old)
        self._next_seq += 1
        b = Broadcast(key=key, payload=payload, transmits=0, seq=self._next_seq)
        self._by_key[key] = b
        # The newest message always goes at the end of bucket 0.
        self._buckets.setdefault(0, []).append(b)
        self._count_length(len(payload), +1)

    def get(self, overhead: int, limit: int, num_nodes: int) -> list[bytes]:
        """Take messages for one packet of at most ``limit`` bytes.

        Each message costs ``overhead + len(payload)`` bytes (``overhead`` is
        the per-message framing of a compound packet). Returned messages have
        their transmit count raised by one and are dropped from the queue once
        it reaches ``retransmit_limit(retransmit_mult, num_nodes)``. A message
        bigger than ``limit - overhead`` is never returned; it stays queued
        until superseded or pruned.

        Returns:
            Payloads in send order; empty when nothing fits.

        Raises:
            ValueError: ``overhead`` is negative.
        """
        if overhead < 0:
            raise ValueError(f"overhead must be >= 0, got {overhead}")
        if not self._by_key:
            return []
        free = limit
        smallest = overhead + min(self._lengths)
        taken: list[Broadcast] = []
        for transmits in sorted(self._buckets):
            if free < smallest:
                break
            for b in reversed(self._buckets[transmits]):
                cost = overhead + len(b.payload)
                if cost <= free:
                    taken.append(b)
                    free -= cost
                    if free < smallest:
                        break

        max_transmits = retransmit_limit(self.retransmit_mult, num_nodes)
        for b in taken:
            self._remove(b)
            b.transmits += 1
            if b.transmits < max_transmits:
                self._insert(b)
        return [b.payload for b in taken]

    def prune(self, max_queued: int) -> None:
        """Keep only the ``max_queued`` least-transmitted messages (bounds memory).

        The most transmitted go first, the oldest first among equals
        (memberlist ``Prune``): they have done the most of their spreading.

        Raises:
            ValueError: ``max_queued`` is negative.
        """
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        excess = len(self._by_key) - max_queued
        for transmits in sorted(self._buckets, reverse=True):
            if excess <= 0:
                break
            bucket = self._buckets[transmits]
            dropped, keep = bucket[:excess], bucket[excess:]
            for b in dropped:
                del self._by_key[b.key]
                self._count_length(len(b.payload), -1)
            excess -= len(dropped)
            if keep:
                self._buckets[transmits] = keep
            else:
                del self._buckets[transmits]

    # --- internals --------------------------------------------------------------

    def _insert(self, b: Broadcast) -> None:
        self._by_key[b.key] = b
        bisect.insort(self._buckets.setdefault(b.transmits, []), b, key=_seq)
        self._count_length(len(b.payload), +1)

    def _remove(self, b: Broadcast) -> None:
        del self._by_key[b.key]
        bucket = self._buckets[b.transmits]
        i = bisect.bisect_left(bucket, b.seq, key=_seq)
        assert bucket[i] is b, "broadcast queue bucket out of order"
        del bucket[i]
        if not bucket:
            del self._buckets[b.transmits]
        self._count_length(len(b.payload), -1)

    def _count_length(self, length: int, delta: int) -> None:
        count = self._lengths.get(length, 0) + delta
        if count:
            self._lengths[length] = count
        else:
            del self._lengths[length]

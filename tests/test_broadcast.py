"""The gossip broadcast queue: superseding, send order, packet budget, retransmit limit, prune."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.catalog._broadcast import BroadcastQueue, retransmit_limit

BIG = 64 * 1024  # a packet budget nothing in these tests fills
MANY = 1000  # a cluster size whose retransmit limit (mult x 4) no test reaches by accident


def p(name: str, size: int = 10) -> bytes:
    """A recognisable payload of exactly ``size`` bytes."""
    return name.encode().ljust(size, b".")


def state(q: BroadcastQueue) -> list[tuple[str, bytes, int]]:
    return [(b.key, b.payload, b.transmits) for b in q]


# --- retransmit_limit ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mult", "num_nodes", "expected"),
    [
        (4, 0, 1),  # log10(1) = 0, but always at least once
        (4, 1, 4),
        (4, 9, 4),  # ceil(log10(10)) = 1
        (4, 10, 8),  # ceil(log10(11)) = 2
        (4, 99, 8),
        (4, 100, 12),
        (4, 999, 12),  # ceil(log10(1000)) = 3 exactly, no float creep
        (4, 1000, 16),
        (2, 5, 2),  # memberlist's Local profile
        (0, 50, 1),
    ],
)
def test_retransmit_limit(mult: int, num_nodes: int, expected: int) -> None:
    assert retransmit_limit(mult, num_nodes) == expected


def test_retransmit_limit_rejects_negative_cluster() -> None:
    with pytest.raises(ValueError, match="num_nodes"):
        retransmit_limit(4, -1)


# --- queueing and superseding -----------------------------------------------------------


def test_empty_queue_gives_nothing() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    assert len(q) == 0
    assert q.get(overhead=2, limit=BIG, num_nodes=MANY) == []


def test_same_key_supersedes_queued_message() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("member:a", p("suspect-a"))
    q.queue("member:b", p("alive-b"))
    q.queue("member:a", p("alive-a"))
    assert len(q) == 2
    assert "member:a" in q
    assert q.get(overhead=0, limit=BIG, num_nodes=MANY) == [p("alive-a"), p("alive-b")]


def test_superseding_resets_transmits_and_makes_it_newest() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("record:a", p("a1"))
    q.queue("record:b", p("b1"))
    q.get(overhead=0, limit=BIG, num_nodes=MANY)  # both sent once
    q.queue("record:a", p("a2"))
    assert state(q) == [("record:a", p("a2"), 0), ("record:b", p("b1"), 1)]
    # Room for one: the fresh message goes first.
    assert q.get(overhead=0, limit=10, num_nodes=MANY) == [p("a2")]


def test_superseding_a_message_that_was_sent_several_times() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("k", p("old"))
    for _ in range(3):
        q.get(overhead=0, limit=BIG, num_nodes=MANY)
    q.queue("k", p("new"))
    assert state(q) == [("k", p("new"), 0)]
    assert q.get(overhead=0, limit=BIG, num_nodes=MANY) == [p("new")]


# --- send order -------------------------------------------------------------------------


def test_newest_first_among_equally_transmitted() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    for name in ("a", "b", "c"):
        q.queue(name, p(name))
    assert q.get(overhead=0, limit=BIG, num_nodes=MANY) == [p("c"), p("b"), p("a")]


def test_least_transmitted_first() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("old", p("old"))
    q.get(overhead=0, limit=BIG, num_nodes=MANY)  # old: 1 transmit
    q.queue("new", p("new"))
    # With room for one message only the untransmitted one goes.
    assert q.get(overhead=0, limit=10, num_nodes=MANY) == [p("new")]
    # Both have one transmit now; newest first again.
    assert q.get(overhead=0, limit=BIG, num_nodes=MANY) == [p("new"), p("old")]


def test_room_for_one_rotates_through_the_queue() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    for name in ("a", "b", "c"):
        q.queue(name, p(name))
    sent = [q.get(overhead=0, limit=10, num_nodes=MANY) for _ in range(6)]
    assert sent == [[p("c")], [p("b")], [p("a")], [p("c")], [p("b")], [p("a")]]


def test_age_order_survives_messages_reaching_a_count_out_of_order() -> None:
    """b (newer) reaches one transmit before a; a must not jump ahead of it there."""
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("a", p("a"))
    q.queue("b", p("b"))
    assert q.get(overhead=0, limit=10, num_nodes=MANY) == [p("b")]
    assert q.get(overhead=0, limit=10, num_nodes=MANY) == [p("a")]
    assert state(q) == [("b", p("b"), 1), ("a", p("a"), 1)]
    assert q.get(overhead=0, limit=BIG, num_nodes=MANY) == [p("b"), p("a")]


def test_order_across_three_transmit_counts() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("x", p("x"))
    q.get(overhead=0, limit=BIG, num_nodes=MANY)
    q.queue("y", p("y"))
    q.get(overhead=0, limit=BIG, num_nodes=MANY)
    q.queue("z", p("z"))
    assert state(q) == [("z", p("z"), 0), ("y", p("y"), 1), ("x", p("x"), 2)]
    assert q.get(overhead=0, limit=BIG, num_nodes=MANY) == [p("z"), p("y"), p("x")]


# --- byte budget ------------------------------------------------------------------------


def test_overhead_counts_per_message() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    for name in ("a", "b", "c"):
        q.queue(name, p(name, 10))
    # 2 x (3 + 10) = 26 fits exactly; a third would need 39.
    assert q.get(overhead=3, limit=26, num_nodes=MANY) == [p("c"), p("b")]
    q2 = BroadcastQueue(retransmit_mult=4)
    for name in ("a", "b", "c"):
        q2.queue(name, p(name, 10))
    assert q2.get(overhead=3, limit=25, num_nodes=MANY) == [p("c")]


def test_message_too_big_is_skipped_for_smaller_ones_behind_it() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("small-old", p("s1", 10))
    q.queue("small", p("s2", 10))
    q.queue("big", p("big", 100))
    assert q.get(overhead=2, limit=30, num_nodes=MANY) == [p("s2", 10), p("s1", 10)]
    # The big one was not sent, so it is still the least transmitted.
    assert state(q)[0] == ("big", p("big", 100), 0)
    assert q.get(overhead=2, limit=102, num_nodes=MANY) == [p("big", 100)]


def test_skipping_takes_a_smaller_message_from_a_later_transmit_count() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("small", p("small", 10))
    q.get(overhead=0, limit=BIG, num_nodes=MANY)  # small: 1 transmit
    q.queue("big", p("big", 50))
    assert q.get(overhead=0, limit=20, num_nodes=MANY) == [p("small", 10)]
    assert state(q) == [("big", p("big", 50), 0), ("small", p("small", 10), 2)]


def test_message_larger_than_any_packet_stays_queued() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("huge", p("huge", 2000))
    for _ in range(20):
        assert q.get(overhead=3, limit=1400, num_nodes=MANY) == []
    assert state(q) == [("huge", p("huge", 2000), 0)]


def test_zero_or_negative_budget_gives_nothing() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("a", b"")
    assert q.get(overhead=1, limit=0, num_nodes=MANY) == []
    assert q.get(overhead=0, limit=-5, num_nodes=MANY) == []
    # An empty payload costs only its framing.
    assert q.get(overhead=1, limit=1, num_nodes=MANY) == [b""]


def test_negative_overhead_is_refused() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("a", p("a"))
    with pytest.raises(ValueError, match="overhead"):
        q.get(overhead=-1, limit=BIG, num_nodes=MANY)


# --- retransmit limit -----------------------------------------------------------------


def test_message_dropped_after_retransmit_limit() -> None:
    q = BroadcastQueue(retransmit_mult=2)
    q.queue("a", p("a"))
    # 5 nodes: limit 2 x ceil(log10 6) = 2.
    assert q.get(overhead=0, limit=BIG, num_nodes=5) == [p("a")]
    assert len(q) == 1
    assert q.get(overhead=0, limit=BIG, num_nodes=5) == [p("a")]
    assert len(q) == 0
    assert "a" not in q
    assert q.get(overhead=0, limit=BIG, num_nodes=5) == []


@pytest.mark.parametrize(("num_nodes", "sends"), [(0, 1), (1, 3), (9, 3), (10, 6), (1000, 12)])
def test_each_message_is_sent_exactly_the_limit(num_nodes: int, sends: int) -> None:
    q = BroadcastQueue(retransmit_mult=3)
    q.queue("a", p("a"))
    q.queue("b", p("b"))
    count = 0
    while q.get(overhead=0, limit=BIG, num_nodes=num_nodes):
        count += 1
        assert count <= sends
    assert count == sends == retransmit_limit(3, num_nodes)
    assert len(q) == 0


def test_limit_is_read_at_each_get() -> None:
    """A cluster that grows gives queued messages more sends; one that shrinks ends them."""
    q = BroadcastQueue(retransmit_mult=1)
    q.queue("a", p("a"))
    assert q.get(overhead=0, limit=BIG, num_nodes=100) == [p("a")]  # limit 3, 1 sent
    assert q.get(overhead=0, limit=BIG, num_nodes=5) == [p("a")]  # limit 1: dropped after
    assert len(q) == 0


def test_superseded_message_is_never_sent_again() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("member:a", p("suspect"))
    q.get(overhead=0, limit=BIG, num_nodes=MANY)
    q.queue("member:a", p("alive"))
    sent = []
    while out := q.get(overhead=0, limit=BIG, num_nodes=MANY):
        sent.extend(out)
    assert sent == [p("alive")] * retransmit_limit(4, MANY)


# --- prune ------------------------------------------------------------------------------


def test_prune_keeps_least_transmitted_then_newest() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    q.queue("t2-old", p("t2-old"))
    q.queue("t2-new", p("t2-new"))
    q.get(overhead=0, limit=BIG, num_nodes=MANY)
    q.get(overhead=0, limit=BIG, num_nodes=MANY)
    q.queue("t0-old", p("t0-old"))
    q.queue("t0-new", p("t0-new"))
    q.prune(3)
    assert [key for key, _, _ in state(q)] == ["t0-new", "t0-old", "t2-new"]
    q.prune(1)
    assert [key for key, _, _ in state(q)] == ["t0-new"]
    assert "t2-new" not in q
    assert len(q) == 1


def test_prune_above_size_changes_nothing_and_zero_empties() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    for name in ("a", "b", "c"):
        q.queue(name, p(name))
    before = state(q)
    q.prune(3)
    q.prune(100)
    assert state(q) == before
    q.prune(0)
    assert len(q) == 0
    assert q.get(overhead=0, limit=BIG, num_nodes=MANY) == []


def test_queue_works_after_prune() -> None:
    q = BroadcastQueue(retransmit_mult=4)
    for name in ("a", "b", "c"):
        q.queue(name, p(name))
    q.prune(1)
    q.queue("a", p("a2"))  # "a" was pruned: a plain new message
    q.queue("c", p("c2"))  # "c" survived: superseded
    assert q.get(overhead=0, limit=BIG, num_nodes=MANY) == [p("c2"), p("a2")]


def test_prune_rejects_negative() -> None:
    with pytest.raises(ValueError, match="max_queued"):
        BroadcastQueue(retransmit_mult=4).prune(-1)


# --- properties -------------------------------------------------------------------------


@dataclass
class _Ref:
    key: str
    payload: bytes
    transmits: int
    seq: int


class ReferenceQueue:
    """The rules written the obvious way: sort everything on every call."""

    def __init__(self, mult: int) -> None:
        self.mult = mult
        self.items: list[_Ref] = []
        self.seq = 0

    def ordered(self) -> list[_Ref]:
        return sorted(self.items, key=lambda r: (r.transmits, -r.seq))

    def queue(self, key: str, payload: bytes) -> None:
        self.items = [r for r in self.items if r.key != key]
        self.seq += 1
        self.items.append(_Ref(key, payload, 0, self.seq))

    def get(self, overhead: int, limit: int, num_nodes: int) -> list[bytes]:
        free, out = limit, []
        for r in self.ordered():
            if overhead + len(r.payload) <= free:
                free -= overhead + len(r.payload)
                out.append(r)
        cap = retransmit_limit(self.mult, num_nodes)
        for r in out:
            r.transmits += 1
            if r.transmits >= cap:
                self.items.remove(r)
        return [r.payload for r in out]

    def prune(self, n: int) -> None:
        self.items = self.ordered()[:n]


KEYS = [f"member:n{i}" for i in range(6)]

_ops = st.one_of(
    st.tuples(st.just("queue"), st.sampled_from(KEYS), st.integers(0, 60)),
    st.tuples(st.just("get"), st.integers(0, 4), st.integers(0, 150), st.integers(0, 120)),
    st.tuples(st.just("prune"), st.integers(0, 8)),
)


@settings(max_examples=300)
@given(mult=st.integers(1, 3), ops=st.lists(_ops, max_size=60))
def test_get_respects_budget_and_never_sends_superseded(
    mult: int, ops: list[tuple[object, ...]]
) -> None:
    q = BroadcastQueue(retransmit_mult=mult)
    ref = ReferenceQueue(mult)
    current: dict[str, bytes] = {}  # key -> the payload queued last
    counter = 0
    for op in ops:
        if op[0] == "queue":
            _, key, extra = op
            assert isinstance(key, str) and isinstance(extra, int)
            counter += 1
            payload = counter.to_bytes(4, "big") + b"x" * extra  # unique per queue call
            q.queue(key, payload)
            ref.queue(key, payload)
            current[key] = payload
        elif op[0] == "get":
            _, overhead, limit, num_nodes = op
            assert isinstance(overhead, int) and isinstance(limit, int)
            assert isinstance(num_nodes, int)
            out = q.get(overhead, limit, num_nodes)
            assert sum(overhead + len(m) for m in out) <= limit
            assert set(out) <= set(current.values()), "a superseded payload was sent"
            assert len(set(out)) == len(out), "a message was sent twice in one packet"
            assert out == ref.get(overhead, limit, num_nodes)
        else:
            _, n = op
            assert isinstance(n, int)
            q.prune(n)
            ref.prune(n)
            assert len(q) <= n
        assert state(q) == [(r.key, r.payload, r.transmits) for r in ref.ordered()]
        assert len(q) == len(ref.items)

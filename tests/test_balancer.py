"""Power of two choices over peak-EWMA x outstanding: who gets the traffic, and how it adapts."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter

import pytest

from hostmesh._config import FieldError
from hostmesh.agent._balancer import BalancerConfig, EndpointStats, StatsTable, pick

CONFIG = BalancerConfig()
TAU = CONFIG.decay
MS = 0.001


def simulate(
    latencies: dict[str, float],
    weights: dict[str, float] | None = None,
    *,
    picks: int = 10_000,
    interval: float = 1 * MS,
    seed: int = 1,
) -> Counter[str]:
    """Send ``picks`` requests ``interval`` apart; each takes its instance's fixed latency.

    Returns how many requests each instance got.
    """
    table = StatsTable(CONFIG)
    names = sorted(latencies)
    weight = weights or dict.fromkeys(names, 1.0)
    rng = random.Random(seed)
    pending: list[tuple[float, int, str]] = []  # (finish time, seq, instance)
    counts: Counter[str] = Counter()
    for seq in range(picks):
        now = seq * interval
        while pending and pending[0][0] <= now:
            done, _, name = heapq.heappop(pending)
            table.get(name).finish(done, latencies[name], ok=True)
        chosen = pick(names, table.get, weight.__getitem__, rng, now)
        table.get(chosen).start(now)
        heapq.heappush(pending, (now + latencies[chosen], seq, chosen))
        counts[chosen] += 1
    return counts


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) < sigmas * math.sqrt(n * p * (1 - p))


# --- pick -----------------------------------------------------------------------------


def test_no_candidates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no candidates"):
        pick([], StatsTable().get, lambda _: 1.0, random.Random(0), 0.0)


def test_one_candidate_is_returned() -> None:
    assert pick(["x"], StatsTable().get, lambda _: 1.0, random.Random(0), 0.0) == "x"


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_weight_must_be_positive_and_finite(bad: float) -> None:
    weights = {"a": 1.0, "b": bad}
    with pytest.raises(ValueError, match="'b'"):
        pick(["a", "b"], StatsTable().get, weights.__getitem__, random.Random(0), 0.0)


def test_slow_endpoint_gets_a_small_share() -> None:
    latencies = {"a": 10 * MS, "b": 10 * MS, "c": 10 * MS, "d": 10 * MS, "slow": 100 * MS}
    counts = simulate(latencies)
    assert counts.total() == 10_000
    assert counts["slow"] < 200, counts  # a fair share would be 2,000
    for name in "abcd":
        assert 2_000 < counts[name] < 3_000, counts


def test_outstanding_requests_shift_load() -> None:
    table = StatsTable()
    for _ in range(3):
        table.get("busy").start(0.0)
    rng = random.Random(3)
    counts = Counter(
        pick(["busy", "x", "y"], table.get, lambda _: 1.0, rng, 0.0) for _ in range(3000)
    )
    assert counts["busy"] == 0  # it loses every pair it is drawn into
    assert binomial_ok(counts["x"], 3000, 0.5)
    # Cost is latency x (outstanding + 1): 3 in flight at 10 ms beats 0 in flight at 50 ms.
    table.get("busy").finish(1.0, 10 * MS, ok=True)  # 2 left in flight
    table.get("slow").finish(1.0, 50 * MS, ok=True)
    assert table.get("busy").cost(1.0) == pytest.approx(3 * 10 * MS)
    assert pick(["busy", "slow"], table.get, lambda _: 1.0, rng, 1.0) == "busy"


def test_equal_idle_instances_share_by_weight() -> None:
    # Equal cost: the first draw wins, and draws go by weight: 3:1 exactly in expectation.
    table = StatsTable()
    weights = {"heavy": 3.0, "light": 1.0}
    rng = random.Random(11)
    n = 20_000
    counts = Counter(
        pick(["heavy", "light"], table.get, weights.__getitem__, rng, 0.0) for _ in range(n)
    )
    assert binomial_ok(counts["heavy"], n, 0.75), counts
    # Three instances: shares 3/5, 1/5, 1/5.
    weights["other"] = 1.0
    names = ["heavy", "light", "other"]
    counts = Counter(pick(names, table.get, weights.__getitem__, rng, 0.0) for _ in range(n))
    assert binomial_ok(counts["heavy"], n, 0.6), counts
    assert binomial_ok(counts["light"], n, 0.2), counts


def test_loaded_instances_share_by_weight() -> None:
    # 20 requests in flight at equal latency: outstanding/weight evens out, 15 vs 5.
    counts = simulate({"heavy": 20 * MS, "light": 20 * MS}, {"heavy": 3.0, "light": 1.0})
    assert 2.7 < counts["heavy"] / counts["light"] < 3.3, counts


def test_seeded_picks_are_deterministic() -> None:
    latencies = {"a": 5 * MS, "b": 7 * MS, "c": 9 * MS, "d": 30 * MS}
    first = simulate(latencies, picks=2000, seed=42)
    assert simulate(latencies, picks=2000, seed=42) == first
    table = StatsTable()

    def run(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [pick(list("abcdef"), table.get, lambda _: 1.0, rng, 0.0) for _ in range(50)]

    assert run(5) == run(5)
    assert run(5) != run(6)


# --- peak EWMA ------------------------------------------------------------------------


def test_new_endpoint_uses_default_latency_and_first_sample_replaces_it() -> None:
    stats = EndpointStats(CONFIG)
    assert stats.latency(100.0) == CONFIG.default_latency  # no decay without a sample
    stats.start(0.0)
    stats.finish(0.002, 2 * MS, ok=True)
    assert stats.latency(0.002) == pytest.approx(2 * MS)
    assert stats.outstanding == 0


def test_peak_jumps_up_then_decays_back_over_tau() -> None:
    stats = EndpointStats(CONFIG)
    now = 0.0
    for _ in range(100):
        now += 0.1
        stats.finish(now, 1 * MS, ok=True)
    assert stats.latency(now) == pytest.approx(1 * MS)
    stats.finish(now, 1.0, ok=True)  # a 1 s spike
    assert stats.latency(now) == pytest.approx(1.0)  # peak: at once, not averaged in
    spike_at = now
    for _ in range(100):  # good samples every 0.1 s for one tau
        now += 0.1
        stats.finish(now, 1 * MS, ok=True)
    assert now - spike_at == pytest.approx(TAU)
    # The excess over 1 ms falls by exp(-t / tau), however the samples are spaced.
    assert stats.latency(now) == pytest.approx(1 * MS + (1.0 - 1 * MS) * math.exp(-1), rel=1e-6)
    for _ in range(400):  # four more tau
        now += 0.1
        stats.finish(now, 1 * MS, ok=True)
    assert stats.latency(now) < 10 * MS


def test_idle_estimate_decays_so_a_slow_endpoint_is_retried() -> None:
    table = StatsTable()
    table.get("slow").finish(0.0, 300 * MS, ok=True)
    table.get("fast").finish(0.0, 30 * MS, ok=True)
    assert table.get("slow").latency(TAU) == pytest.approx(0.3 * math.exp(-1))
    rng = random.Random(0)
    assert pick(["slow", "fast"], table.get, lambda _: 1.0, rng, 0.0) == "fast"
    # Only "fast" gets samples; "slow", idle, decays toward 0 and is tried again.
    for i in range(1, 1000):
        now = i * 0.1
        table.get("fast").finish(now, 30 * MS, ok=True)
        if pick(["slow", "fast"], table.get, lambda _: 1.0, rng, now) == "slow":
            break
    # 300 ms x exp(-t / 10 s) < 30 ms once t > 10 s x ln 10 = 23 s.
    assert now == pytest.approx(TAU * math.log(10), abs=0.11)


def test_failures_never_make_an_endpoint_look_faster() -> None:
    stats = EndpointStats(CONFIG)
    stats.finish(0.0, 50 * MS, ok=True)
    stats.finish(20.0, 1 * MS, ok=False)  # failed fast
    assert stats.latency(20.0) == pytest.approx(50 * MS)
    stats.finish(20.0, 2.0, ok=False)  # failed slowly: counts, as a peak
    assert stats.latency(20.0) == pytest.approx(2.0)
    fresh = EndpointStats(CONFIG)
    fresh.finish(0.0, 1 * MS, ok=False)
    assert fresh.latency(0.0) == CONFIG.default_latency


def test_cost_is_latency_times_outstanding_per_weight_plus_one() -> None:
    stats = EndpointStats(CONFIG)
    stats.finish(0.0, 10 * MS, ok=True)
    for _ in range(6):
        stats.start(0.0)
    assert stats.cost(0.0) == pytest.approx(10 * MS * 7)
    assert stats.cost(0.0, weight=3.0) == pytest.approx(10 * MS * 3)


def test_config_is_validated() -> None:
    with pytest.raises(FieldError, match="decay"):
        BalancerConfig(decay=0)
    with pytest.raises(FieldError, match="default_latency"):
        BalancerConfig(default_latency=-1)


# --- StatsTable -----------------------------------------------------------------------


def test_stats_table_creates_lazily_and_forgets_on_retain() -> None:
    table = StatsTable()
    assert len(table) == 0
    a = table.get("a")
    assert table.get("a") is a
    table.get("b")
    a.start(0.0)
    table.retain(["b", "c"])
    assert "a" not in table
    assert "b" in table
    assert "c" not in table  # retain creates nothing
    assert len(table) == 1
    a.finish(1.0, 5 * MS, ok=True)  # a request in flight when "a" was dropped
    assert a.outstanding == 0
    fresh = table.get("a")
    assert fresh is not a
    fresh.finish(1.0, 5 * MS, ok=True)  # finished on the new twin: no negative count
    assert fresh.outstanding == 0


def test_a_new_instance_is_tried_beside_fast_measured_ones_one_request_at_a_time() -> None:
    # Measured at 1 ms, the old instances would beat a new one's 30 ms default in
    # every draw at concurrency 1, and the new one would never be measured.
    table = StatsTable()
    rng = random.Random(7)
    now = 100.0
    for old in ("a", "b"):
        table.get(old).start(now)
        table.get(old).finish(now, 0.001, ok=True)
    first_pick_of_c = None
    counts: Counter[str] = Counter()
    for i in range(300):
        now += 0.01
        chosen = pick(["a", "b", "c"], table.get, lambda _: 1.0, rng, now)
        table.get(chosen).start(now)
        table.get(chosen).finish(now, 0.001, ok=True)  # everyone answers in 1 ms
        counts[chosen] += 1
        if chosen == "c" and first_pick_of_c is None:
            first_pick_of_c = i
    assert first_pick_of_c is not None and first_pick_of_c < 10
    # Once measured, it is an equal: each gets its share (binomial bounds for 1/3 of 300).
    assert all(60 <= counts[name] <= 140 for name in "abc"), counts


def test_a_new_instance_with_a_request_in_flight_is_not_flooded() -> None:
    table = StatsTable()
    now = 0.0
    table.get("old").start(now)
    table.get("old").finish(now, 0.002, ok=True)
    table.get("new").start(now)  # its first request has not answered yet
    rng = random.Random(1)
    picks = Counter(pick(["old", "new"], table.get, lambda _: 1.0, rng, now) for _ in range(50))
    assert picks["new"] == 0  # 30 ms x 2 > 2 ms: wait for its first answer

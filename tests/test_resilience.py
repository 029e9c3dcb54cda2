"""Retry budget, outlier ejection, rate and concurrency limits, retry classification."""

from __future__ import annotations

import ast
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh._config import FieldError
from hostmesh.agent._resilience import (
    IDEMPOTENT_METHODS,
    MAX_EJECTION_MULTIPLIER,
    MULTIPLIER_DECAY,
    REPLAY_BUFFER,
    ConcurrencyLimit,
    Ejection,
    OutlierConfig,
    OutlierDetector,
    RetryBudget,
    RetryBudgetConfig,
    TokenBucket,
    may_retry,
)

SOURCE = Path(__file__).resolve().parents[1] / "agent" / "_resilience.py"


def test_module_is_sans_io() -> None:
    """Standard-library maths and hostmesh's config only: no I/O, no clock (test_layout too)."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(SOURCE.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "math", "collections.abc", "dataclasses", ".._config"}


# --- retry budget -----------------------------------------------------------------------


def _run_traffic(
    budget: RetryBudget, *, rps: int, seconds: int, retries_per_request: int | None
) -> list[int]:
    """Retries granted per second: ``rps`` original requests, all failing.

    Each request retries up to ``retries_per_request`` times (None: until refused).
    """
    granted = [0] * seconds
    for i in range(rps * seconds):
        now = i / rps
        budget.deposit(now)
        tries = 0
        while (retries_per_request is None or tries < retries_per_request) and (
            budget.try_withdraw(now)
        ):
            granted[int(now)] += 1
            tries += 1
    return granted


@pytest.mark.parametrize("retries_per_request", [1, 3, None])
def test_steady_failing_traffic_gets_percent_plus_floor(retries_per_request: int | None) -> None:
    """100 req/s, all failing: 20% of 100 + the 10/s floor = 30 retries/s over each window."""
    granted = _run_traffic(
        RetryBudget(), rps=100, seconds=60, retries_per_request=retries_per_request
    )
    for start in range(10, 60, 10):  # every full window after the first
        assert sum(granted[start : start + 10]) == pytest.approx(300, abs=3)
    assert sum(granted[10:]) / 50 == pytest.approx(30, rel=0.02)
    # The percentage alone bounds the seconds in which the floor was not spent.
    assert max(granted[2:10]) <= 20


def test_retries_never_exceed_the_allowance_in_any_window() -> None:
    budget = RetryBudget()
    granted = _run_traffic(budget, rps=100, seconds=40, retries_per_request=None)
    for start in range(0, 31):
        assert sum(granted[start : start + 10]) <= 0.2 * 100 * 10 + 10 * 10


def test_floor_alone_allows_ten_per_second_on_average() -> None:
    """No traffic: the reserve of 10/s x 10 s, spendable at once, renewed each window."""
    budget = RetryBudget()
    granted = 0
    for i in range(60 * 100):  # a retry attempt every 10 ms for 60 s, no deposits
        granted += budget.try_withdraw(i / 100)
    assert granted == 60 * 10
    fresh = RetryBudget()
    assert sum(fresh.try_withdraw(0.0) for _ in range(150)) == 100  # Finagle: a reserve
    assert not fresh.try_withdraw(9.5)
    assert fresh.try_withdraw(10.0)  # the first slice's withdrawals expired


def test_old_deposits_expire_after_the_window() -> None:
    budget = RetryBudget()
    for _ in range(1000):
        budget.deposit(0.0)
    assert budget.balance(0.0) == 200 + 100
    assert budget.balance(9.99) == 300
    assert budget.balance(10.0) == 100  # the floor only
    assert sum(budget.try_withdraw(10.5) for _ in range(200)) == 100


def test_deposit_lasts_between_nine_and_ten_tenths_of_ttl() -> None:
    budget = RetryBudget(RetryBudgetConfig(percent=1.0, min_per_second=0, ttl=10.0))
    budget.deposit(0.5)
    assert budget.balance(9.99) == 1
    assert budget.balance(10.0) == 0  # made in slice [0, 1): gone at 10 s
    later = RetryBudget(RetryBudgetConfig(percent=1.0, min_per_second=0, ttl=10.0))
    later.deposit(0.0)
    assert later.balance(9.99) == 1


def test_a_refused_withdrawal_takes_nothing() -> None:
    budget = RetryBudget(RetryBudgetConfig(percent=0.2, min_per_second=0))
    for _ in range(4):
        budget.deposit(0.0)
    assert not budget.try_withdraw(0.0)  # 0.8 of a retry is not one
    assert not budget.try_withdraw(0.0)
    budget.deposit(0.0)
    assert budget.try_withdraw(0.0)  # 5 x 0.2 is exactly one, despite float rounding
    assert not budget.try_withdraw(0.0)


def test_percent_zero_and_floor_zero_allows_nothing() -> None:
    budget = RetryBudget(RetryBudgetConfig(percent=0.0, min_per_second=0))
    for _ in range(100):
        budget.deposit(0.0)
    assert not budget.try_withdraw(0.0)
    assert budget.balance(0.0) == 0


def test_a_long_idle_gap_and_a_clock_step_back() -> None:
    budget = RetryBudget()
    for _ in range(500):
        budget.deposit(0.0)
    assert budget.balance(1e9) == 100  # everything from long ago expired
    for _ in range(50):
        budget.deposit(1e9)
    assert budget.balance(1e9 - 5) == 110  # a step back counts into the newest slice


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("percent", {"percent": -0.1}),
        ("percent", {"percent": 1001.0}),
        ("min_per_second", {"min_per_second": -1}),
        ("ttl", {"ttl": 0.5}),
        ("ttl", {"ttl": 61.0}),
    ],
)
def test_budget_config_rejects(field: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(FieldError) as info:
        RetryBudgetConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == field


def test_budget_defaults_are_linkerds() -> None:
    assert RetryBudgetConfig() == RetryBudgetConfig(percent=0.2, min_per_second=10, ttl=10.0)


# --- outlier detection ------------------------------------------------------------------


def _fail(detector: OutlierDetector, instance: str, times: int, now: float) -> list[Ejection]:
    out = [detector.record(instance, False, now) for _ in range(times)]
    return [e for e in out if e is not None]


def _detector(*ids: str, **config: float) -> OutlierDetector:
    detector = OutlierDetector(OutlierConfig(**config))  # type: ignore[arg-type]
    detector.set_instances(ids)
    return detector


def test_five_consecutive_failures_eject_for_thirty_seconds() -> None:
    detector = _detector("a", "b", "c")
    assert _fail(detector, "a", 4, 100.0) == []
    assert not detector.is_ejected("a", 100.0)
    assert detector.record("a", False, 100.0) == Ejection("a", 130.0, 30.0, 1)
    assert detector.is_ejected("a", 100.0)
    assert detector.is_ejected("a", 129.9)
    assert detector.ejected(129.9) == {"a"}
    assert not detector.is_ejected("a", 130.0)  # expires by time, no call needed
    assert detector.ejected(130.0) == set()
    assert detector.ejections_total == 1


def test_a_success_resets_the_count() -> None:
    detector = _detector("a", "b", "c")
    assert _fail(detector, "a", 4, 0.0) == []
    detector.record("a", True, 0.0)
    assert _fail(detector, "a", 4, 0.0) == []
    assert not detector.is_ejected("a", 0.0)
    assert len(_fail(detector, "a", 1, 0.0)) == 1


def test_repeated_ejections_last_longer_up_to_the_cap() -> None:
    detector = _detector("a", "b", "c")
    now = 0.0
    durations = []
    for _ in range(MAX_EJECTION_MULTIPLIER + 2):
        (ejection,) = _fail(detector, "a", 5, now)  # fails again as soon as it is back
        durations.append(ejection.duration)
        now = ejection.until
    assert durations[:3] == [30.0, 60.0, 90.0]
    assert durations[-3:] == [300.0, 300.0, 300.0]  # 10 x 30 s, Envoy's max_ejection_time


def test_the_multiplier_decays_while_the_instance_serves() -> None:
    detector = _detector("a", "b", "c")
    (first,) = _fail(detector, "a", 5, 0.0)
    (second,) = _fail(detector, "a", 5, first.until)
    assert second.multiplier == 2
    # In service for one decay period: 2 - 1 + 1 = 2 again.
    (third,) = _fail(detector, "a", 5, second.until + MULTIPLIER_DECAY)
    assert third.duration == 60.0
    # In service for two periods: 2 - 2 + 1 = 1, back to the base.
    (fourth,) = _fail(detector, "a", 5, third.until + 2 * MULTIPLIER_DECAY)
    assert fourth.duration == 30.0
    # A long healthy spell never drives it below a first ejection.
    (fifth,) = _fail(detector, "a", 5, fourth.until + 3600.0)
    assert fifth.duration == 30.0


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    detector = _detector("a", "b", "c")
    (ejection,) = _fail(detector, "a", 5, 0.0)
    assert _fail(detector, "a", 50, 10.0) == []  # late responses of in-flight requests
    assert not detector.is_ejected("a", ejection.until)
    assert _fail(detector, "a", 4, ejection.until) == []  # a fresh run is needed


def test_two_instances_only_one_may_be_ejected() -> None:
    detector = _detector("a", "b")
    (ejection,) = _fail(detector, "a", 5, 0.0)
    assert _fail(detector, "b", 10, 1.0) == []
    assert detector.ejected(1.0) == {"a"}
    assert detector.overflow_total == 6  # every failure from the fifth on was refused
    # Once "a" is back, "b"'s next failure ejects it (its count was kept).
    (b_ejection,) = _fail(detector, "b", 1, ejection.until)
    assert b_ejection.instance_id == "b"
    assert detector.ejected(ejection.until) == {"b"}


def test_a_single_instance_is_never_ejected() -> None:
    detector = _detector("only")
    assert _fail(detector, "only", 100, 0.0) == []
    assert not detector.is_ejected("only", 0.0)
    assert detector.overflow_total == 96


@pytest.mark.parametrize(
    ("instances", "percent", "allowed"),
    [(4, 50, 2), (3, 50, 1), (10, 50, 5), (10, 10, 1), (9, 10, 0), (3, 100, 3), (5, 0, 0)],
)
def test_max_ejection_percent(instances: int, percent: int, allowed: int) -> None:
    ids = [f"i{n}" for n in range(instances)]
    detector = _detector(*ids, max_ejection_percent=percent)
    for instance in ids:
        _fail(detector, instance, 5, 0.0)
    assert len(detector.ejected(0.0)) == allowed


def test_removed_instances_are_forgotten() -> None:
    detector = _detector("a", "b", "c")
    _fail(detector, "a", 4, 0.0)
    (ejection,) = _fail(detector, "b", 5, 0.0)
    detector.set_instances(["a", "c", "d"])
    assert detector.instances == {"a", "c", "d"}
    assert detector.ejected(0.0) == set()
    assert len(_fail(detector, "a", 1, 0.0)) == 1  # "a", kept, keeps its count
    assert detector.record("b", False, 0.0) is None  # unknown ids are ignored...
    assert detector.instances == {"a", "c", "d"}  # ...and not tracked
    detector.set_instances(["a", "b", "c", "d"])
    assert _fail(detector, "b", 4, 1.0) == []  # "b" came back with a clean slate
    (again,) = _fail(detector, "b", 1, 1.0)
    assert again.multiplier == 1
    assert ejection.multiplier == 1


def test_unknown_instances_are_not_ejected() -> None:
    detector = OutlierDetector()
    assert _fail(detector, "x", 10, 0.0) == []
    assert not detector.is_ejected("x", 0.0)
    assert detector.instances == frozenset()


@settings(max_examples=60)
@given(
    instances=st.integers(1, 8),
    percent=st.integers(0, 100),
    events=st.lists(st.tuples(st.integers(0, 7), st.booleans(), st.floats(0, 5)), max_size=200),
)
def test_ejected_share_never_exceeds_the_cap(
    instances: int, percent: int, events: list[tuple[int, bool, float]]
) -> None:
    ids = [f"i{n}" for n in range(instances)]
    detector = _detector(*ids, consecutive_failures=2, max_ejection_percent=percent)
    now = 0.0
    for index, ok, step in events:
        now += step
        detector.record(ids[index % instances], ok, now)
        assert len(detector.ejected(now)) * 100 <= percent * instances


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("consecutive_failures", {"consecutive_failures": 0}),
        ("base_ejection", {"base_ejection": 0.0}),
        ("max_ejection_percent", {"max_ejection_percent": 101}),
        ("max_ejection_percent", {"max_ejection_percent": -1}),
    ],
)
def test_outlier_config_rejects(field: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(FieldError) as info:
        OutlierConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == field


# --- token bucket -----------------------------------------------------------------------


def test_burst_at_once_then_rate_per_second() -> None:
    bucket = TokenBucket(rate=10, burst=5)
    assert [bucket.try_take(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert not bucket.try_take(0.09)
    assert bucket.try_take(0.1)
    assert not bucket.try_take(0.1)
    admitted = sum(bucket.try_take(1 + i / 1000) for i in range(1000))  # 1 s, polled every ms
    assert admitted == 5 + 9  # full again by 1 s (no more than burst), then 10/s


def test_an_idle_bucket_fills_to_burst_and_no_further() -> None:
    bucket = TokenBucket(rate=100, burst=3)
    assert all(bucket.try_take(0.0) for _ in range(3))
    assert sum(bucket.try_take(3600.0) for _ in range(10)) == 3
    assert sum(bucket.try_take(1e9) for _ in range(10)) == 3


@pytest.mark.parametrize(("rate", "burst"), [(7.0, 3), (0.3, 2), (1000.0, 50), (1 / 3, 2)])
def test_no_drift_over_a_long_run(rate: float, burst: int) -> None:
    """Kept busy for 10,000 tokens: exactly burst + rate x elapsed are admitted.

    Attempts come at most 0.2 token apart, so the bucket never sits full and
    no refill is lost to the cap; the clock starts far from 0, as Trio's does.
    """
    bucket = TokenBucket(rate, burst)
    rng = random.Random(1)
    start = now = 1e7
    admitted = 0
    while now < start + 10_000 / rate:
        admitted += bucket.try_take(now)
        last = now
        now += rng.uniform(0, 0.2 / rate)
    assert admitted == math.floor(burst + rate * (last - start))


def test_fractional_rate() -> None:
    bucket = TokenBucket(rate=0.5, burst=1)
    assert bucket.try_take(0.0)
    assert not bucket.try_take(1.99)
    assert bucket.try_take(2.0)


def test_wait_time() -> None:
    bucket = TokenBucket(rate=4, burst=2)
    assert bucket.wait_time(0.0) == 0.0
    bucket.try_take(0.0)
    bucket.try_take(0.0)
    assert bucket.wait_time(0.0) == pytest.approx(0.25)
    assert bucket.wait_time(0.1) == pytest.approx(0.15)
    assert bucket.wait_time(0.25) == 0.0
    assert bucket.try_take(0.25)


def test_rate_zero_is_unlimited() -> None:
    bucket = TokenBucket(rate=0, burst=0)
    assert all(bucket.try_take(0.0) for _ in range(10_000))
    assert bucket.wait_time(0.0) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, 0)])
def test_token_bucket_rejects(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@settings(max_examples=60)
@given(
    rate=st.floats(0.1, 1000),
    burst=st.integers(1, 20),
    steps=st.lists(st.floats(0, 1), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    now, admitted = 0.0, 0
    for step in steps:
        now += step
        admitted += bucket.try_take(now)
        assert admitted <= burst + rate * now + 1e-6


# --- concurrency limit ------------------------------------------------------------------


def test_concurrency_limit() -> None:
    limit = ConcurrencyLimit(2)
    assert limit.try_acquire()
    assert limit.try_acquire()
    assert not limit.try_acquire()
    assert limit.in_flight == 2
    limit.release()
    assert limit.try_acquire()
    assert not limit.try_acquire()


def test_unmatched_release_never_goes_negative() -> None:
    limit = ConcurrencyLimit(1)
    limit.release()
    limit.release()
    assert limit.in_flight == 0
    assert limit.try_acquire()
    assert not limit.try_acquire()  # the stray releases earned no extra slot


def test_zero_is_unlimited_but_counted() -> None:
    limit = ConcurrencyLimit(0)
    assert all(limit.try_acquire() for _ in range(1000))
    assert limit.in_flight == 1000


def test_lowering_the_limit_waits_for_in_flight_requests() -> None:
    limit = ConcurrencyLimit(3)
    for _ in range(3):
        limit.try_acquire()
    limit.limit = 1
    limit.release()
    assert not limit.try_acquire()  # 2 still in flight
    limit.release()
    limit.release()
    assert limit.try_acquire()


def test_concurrency_limit_rejects_negative() -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimit(-1)


# --- retry classification ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
def test_idempotent_methods_may_retry(method: str) -> None:
    assert may_retry(method, body_replayable=True)
    assert may_retry(method.encode(), body_replayable=True)  # h11 gives bytes
    assert not may_retry(method, body_replayable=False)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "get", "BREW", b"POST", ""])
def test_other_methods_never_retry(method: str | bytes) -> None:
    assert not may_retry(method, body_replayable=True)


def test_constants() -> None:
    assert frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}) == IDEMPOTENT_METHODS
    assert REPLAY_BUFFER == 64 * 1024  # Linkerd 2's limit

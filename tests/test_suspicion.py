"""Lifeguard's suspicion timer: bounds, the timeout curve, which confirmations count."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.catalog._suspicion import (
    Suspicion,
    expected_confirmations,
    suspicion_timeout_bounds,
)

# --- bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mult", "max_mult", "num_nodes", "interval", "expected"),
    [
        (4, 6, 1000, 1.0, (12.0, 72.0)),  # LAN defaults, 1,000 nodes
        (4, 6, 100, 1.0, (8.0, 48.0)),
        (4, 6, 10, 1.0, (4.0, 24.0)),
        (4, 6, 5, 1.0, (4.0, 24.0)),  # log10 5 < 1: scale floors at 1
        (4, 6, 1, 1.0, (4.0, 24.0)),
        (4, 6, 0, 1.0, (4.0, 24.0)),  # no log of 0
        (6, 6, 1000, 5.0, (90.0, 540.0)),  # WAN profile
        (3, 6, 10, 1.0, (3.0, 18.0)),  # Local profile
        (4, 1, 1000, 1.0, (12.0, 12.0)),  # max mult 1: a fixed timeout
    ],
)
def test_timeout_bounds(
    mult: int, max_mult: int, num_nodes: int, interval: float, expected: tuple[float, float]
) -> None:
    assert suspicion_timeout_bounds(mult, max_mult, num_nodes, interval) == pytest.approx(
        expected, rel=1e-12
    )


def test_timeout_bounds_between_powers_of_ten() -> None:
    low, high = suspicion_timeout_bounds(4, 6, 500, 0.5)
    # log10 500 = 2.69897...
    assert low == pytest.approx(4 * 2.698970004336 * 0.5)
    assert high == pytest.approx(6 * low)


# --- k ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mult", "num_nodes", "k"),
    [
        (4, 1000, 2),  # suspicion_mult - 2
        (4, 4, 2),  # two others besides us and the suspect: enough
        (4, 3, 0),  # only one other could confirm: don't wait for two
        (4, 2, 0),
        (6, 1000, 4),  # WAN
        (3, 10, 1),  # Local
        (2, 1000, 0),
        (1, 1000, 0),  # never negative
    ],
)
def test_expected_confirmations(mult: int, num_nodes: int, k: int) -> None:
    assert expected_confirmations(mult, num_nodes) == k


# --- the timeout curve ------------------------------------------------------------------


def test_curve_for_lan_defaults_at_1000_nodes() -> None:
    """mult 4, N = 1000, probe 1 s: min 12 s, max 72 s, k = 2."""
    low, high = suspicion_timeout_bounds(4, 6, 1000, 1.0)
    s = Suspicion("a", expected_confirmations(4, 1000), low, high, now=100.0)
    assert s.k == 2
    assert s.deadline == pytest.approx(172.0)  # n = 0: max
    assert s.confirm("b", now=101.0)
    # n = 1: 72 - 60 * ln 2 / ln 3
    assert s.timeout == pytest.approx(34.144214785712556, abs=1e-9)
    assert s.deadline == pytest.approx(134.144214785712556, abs=1e-9)
    assert s.confirm("c", now=102.0)
    assert s.deadline == pytest.approx(112.0)  # n = k: min
    assert s.confirmations == 2


def test_curve_with_k_4() -> None:
    s = Suspicion("a", 4, 10.0, 60.0, now=0.0)
    timeouts = [s.timeout]
    for source in ("b", "c", "d", "e"):
        assert s.confirm(source, now=1.0)
        timeouts.append(s.timeout)
    # 60 - 50 * ln(n + 1) / ln 5
    expected = [60.0, 38.46617210, 25.86969028, 16.93234419, 10.0]
    assert timeouts == pytest.approx(expected, abs=1e-6)
    # Each confirmation shortens it, the first ones most.
    steps = [a - b for a, b in itertools.pairwise(timeouts)]
    assert all(x > y > 0 for x, y in itertools.pairwise(steps))


def test_timeout_reaches_min_exactly_and_never_goes_below() -> None:
    for k in range(1, 40):
        s = Suspicion("a", k, 3.0, 18.0, now=5.0)
        for i in range(k + 5):
            s.confirm(f"n{i}", now=6.0)
            assert s.timeout >= 3.0
        assert s.timeout == 3.0
        assert s.deadline == 8.0


def test_k_below_one_starts_at_min() -> None:
    for k in (0, -1):
        s = Suspicion("a", k, 4.0, 24.0, now=10.0)
        assert s.deadline == 14.0
        assert not s.confirm("b", now=11.0)
        assert s.confirmations == 0
        assert s.deadline == 14.0


def test_equal_min_and_max_is_a_fixed_timeout() -> None:
    s = Suspicion("a", 3, 12.0, 12.0, now=0.0)
    assert s.deadline == 12.0
    assert s.confirm("b", now=1.0)
    assert s.deadline == 12.0


# --- which confirmations count ----------------------------------------------------------


def test_first_source_does_not_confirm_itself() -> None:
    s = Suspicion("a", 3, 10.0, 60.0, now=0.0)
    assert not s.confirm("a", now=1.0)
    assert s.confirmations == 0
    assert s.deadline == 60.0


def test_repeated_confirmation_counts_once() -> None:
    s = Suspicion("a", 3, 10.0, 60.0, now=0.0)
    assert s.confirm("b", now=1.0)
    after_one = s.deadline
    for t in (2.0, 3.0, 4.0):
        assert not s.confirm("b", now=t)
    assert s.confirmations == 1
    assert s.deadline == after_one


def test_confirmations_beyond_k_do_not_count() -> None:
    s = Suspicion("a", 2, 10.0, 60.0, now=0.0)
    assert s.confirm("b", now=1.0)
    assert s.confirm("c", now=2.0)
    assert not s.confirm("d", now=3.0)
    assert not s.confirm("e", now=4.0)
    assert s.confirmations == 2
    assert s.deadline == 10.0


def test_deadline_is_measured_from_start_not_from_the_confirmation() -> None:
    s = Suspicion("a", 1, 10.0, 60.0, now=100.0)
    assert s.confirm("b", now=150.0)
    assert s.deadline == 110.0
    assert s.expired(150.0)  # a late confirmation can end the suspicion at once


# --- expiry -----------------------------------------------------------------------------


def test_expired_at_the_deadline() -> None:
    s = Suspicion("a", 2, 12.0, 72.0, now=1000.0)
    assert not s.expired(1000.0)
    assert not s.expired(1071.999)
    assert s.expired(1072.0)
    assert s.expired(5000.0)
    assert s.remaining(1000.0) == 72.0
    assert s.remaining(1070.0) == pytest.approx(2.0)
    assert s.remaining(1100.0) == 0.0


def test_confirmations_make_it_expire_sooner() -> None:
    s = Suspicion("a", 2, 12.0, 72.0, now=0.0)
    assert not s.expired(40.0)
    s.confirm("b", now=1.0)  # deadline ~34.1
    assert s.expired(40.0)
    assert not s.expired(30.0)
    s.confirm("c", now=2.0)  # deadline 12
    assert s.expired(30.0)


@pytest.mark.parametrize(("low", "high"), [(-1.0, 5.0), (10.0, 5.0)])
def test_bad_bounds_are_refused(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="min_timeout"):
        Suspicion("a", 2, low, high, now=0.0)


@settings(max_examples=200)
@given(
    k=st.integers(0, 10),
    low=st.floats(0.0, 100.0),
    spread=st.floats(0.0, 1000.0),
    sources=st.lists(st.sampled_from("abcdefghijklmnop"), max_size=40),
)
def test_deadline_only_moves_earlier_and_stays_within_bounds(
    k: int, low: float, spread: float, sources: list[str]
) -> None:
    s = Suspicion("a", k, low, low + spread, now=0.0)
    seen = {"a"}
    previous = s.deadline
    for src in sources:
        counted = s.confirm(src, now=1.0)
        assert counted == (src not in seen and len(seen) - 1 < k)
        if counted:
            seen.add(src)
        assert low <= s.deadline <= low + spread
        assert s.deadline <= previous
        previous = s.deadline
    assert s.confirmations == len(seen) - 1 <= max(k, 0)

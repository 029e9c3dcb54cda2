"""Lifeguard local health awareness: the score's bounds and how it stretches timeouts."""

from __future__ import annotations

import pytest

from hostmesh.catalog._awareness import Awareness


def test_starts_healthy() -> None:
    a = Awareness(max_multiplier=8)
    assert a.score == 0
    assert a.scale(1.0) == 1.0


def test_score_moves_by_delta() -> None:
    a = Awareness(max_multiplier=8)
    a.apply_delta(1)
    a.apply_delta(1)
    assert a.score == 2
    a.apply_delta(-1)
    assert a.score == 1
    a.apply_delta(0)
    assert a.score == 1


def test_clamped_at_max_multiplier_minus_one() -> None:
    a = Awareness(max_multiplier=8)
    for _ in range(20):
        a.apply_delta(1)
    assert a.score == 7
    a.apply_delta(100)
    assert a.score == 7
    # Recovery starts at once: no hidden debt above the cap.
    a.apply_delta(-1)
    assert a.score == 6


def test_clamped_at_zero() -> None:
    a = Awareness(max_multiplier=8)
    a.apply_delta(-5)
    assert a.score == 0
    # No hidden credit below zero either.
    a.apply_delta(1)
    assert a.score == 1


@pytest.mark.parametrize(("score", "expected"), [(0, 0.5), (1, 1.0), (3, 2.0), (7, 4.0)])
def test_scale_multiplies_by_score_plus_one(score: int, expected: float) -> None:
    a = Awareness(max_multiplier=8)
    a.apply_delta(score)
    assert a.scale(0.5) == pytest.approx(expected)


def test_worst_case_is_max_multiplier_times() -> None:
    a = Awareness(max_multiplier=8)
    a.apply_delta(1000)
    assert a.scale(1.0) == 8.0


def test_max_multiplier_one_disables_scaling() -> None:
    a = Awareness(max_multiplier=1)
    a.apply_delta(5)
    assert a.score == 0
    assert a.scale(2.5) == 2.5


@pytest.mark.parametrize("bad", [0, -3])
def test_max_multiplier_below_one_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="max_multiplier"):
        Awareness(max_multiplier=bad)

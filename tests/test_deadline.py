"""The data plane's per-connection deadlines (agent/_deadline.py), on a MockClock.

The proxy relies on three things: a blocked wait ends with DeadlineExceeded
when its deadline passes, not earlier and not much later; moving a deadline
(later or earlier) takes effect while the owner is blocked; and the timer's
heap stays bounded however many connections come and go.
"""

from __future__ import annotations

import math
import socket

import pytest
import trio
import trio.testing
from conftest import trio_test

from hostmesh.agent._deadline import COMPACT_SLACK, DeadlineExceeded, Timer


async def _blocked_until(timer: Timer, set_to: float, *, move_to: float | None = None,
                         move_after: float = 0.0) -> float:  # fmt: skip
    """Block on a silent socket under a deadline; the time DeadlineExceeded arrived."""
    a, b = socket.socketpair()
    dl = timer.deadline()
    try:
        a.setblocking(False)
        dl.set(set_to)
        async with trio.open_nursery() as nursery:
            if move_to is not None:

                async def move() -> None:
                    await trio.sleep(move_after)
                    dl.set(move_to)

                nursery.start_soon(move)
            with pytest.raises(DeadlineExceeded):
                await dl.wait(a)
        assert dl.fired
        return trio.current_time()
    finally:
        dl.close()
        a.close()
        b.close()


# (deadline, moved to, moved after, when the wait ends): all relative to the start
BLOCKED = {
    "passes": (5, None, 0, 5),
    "moved-later-while-blocked": (5, 12, 1, 12),
    "moved-earlier-while-blocked": (60, 3, 1, 3),
}


@pytest.mark.parametrize("case", BLOCKED.values(), ids=BLOCKED.keys())
@trio_test(100, mock_clock=True)
async def test_a_blocked_wait_ends_when_its_deadline_passes(
    case: tuple[float, float | None, float, float],
) -> None:
    at, move_to, move_after, ends = case
    timer = Timer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        t0 = trio.current_time()
        ended = await _blocked_until(timer, t0 + at,
                                     move_to=None if move_to is None else t0 + move_to,
                                     move_after=move_after)  # fmt: skip
        assert ended == pytest.approx(t0 + ends)
        nursery.cancel_scope.cancel()


@trio_test(100, mock_clock=True)
async def test_data_before_the_deadline_ends_the_wait_normally() -> None:
    timer = Timer()
    a, b = socket.socketpair()
    a.setblocking(False)
    dl = timer.deadline()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        dl.after(5)

        async def send_later() -> None:
            await trio.sleep(2)
            b.send(b"x")

        nursery.start_soon(send_later)
        await dl.wait(a)
        assert a.recv(1) == b"x"
        assert not dl.fired
        await trio.sleep(10)  # the old entry comes due: nothing fires, the deadline passed
        nursery.cancel_scope.cancel()
    dl.close()
    a.close()
    b.close()


@trio_test(100, mock_clock=True)
async def test_a_deadline_that_passed_while_not_waiting_fails_the_next_wait() -> None:
    timer = Timer()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.send(b"ready")  # readable at once: only the fired flag can fail the wait
    dl = timer.deadline()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        dl.after(1)
        await trio.sleep(2)
        assert dl.fired
        with pytest.raises(DeadlineExceeded):
            await dl.wait(a)
        dl.after(1)  # a new phase starts clean
        await dl.wait(a)
        nursery.cancel_scope.cancel()
    dl.close()
    a.close()
    b.close()


def test_moving_deadlines_later_pushes_nothing() -> None:
    timer = Timer()
    dls = [timer.deadline() for _ in range(100)]
    for d in dls:
        d.set(10.0)
    assert len(timer) == 100
    for step in range(1, 1000):
        for d in dls:
            d.set(10.0 + step)  # every request's next, later deadline
    assert len(timer) == 100
    timer.fire_due(10.0)  # the entries come due: re-armed at the moved time, none fired
    assert len(timer) == 100
    assert not any(d.fired for d in dls)
    timer.fire_due(1e9)
    assert all(d.fired for d in dls)
    assert len(timer) == 0


def test_connections_coming_and_going_keep_the_heap_bounded() -> None:
    timer = Timer()
    live = [timer.deadline() for _ in range(50)]
    for d in live:
        d.set(1e6)
    for i in range(20_000):  # a connection per request, each closed before its deadline
        d = timer.deadline()
        d.set(100.0 + i)
        d.set(50.0 + i)  # moved earlier once: a second entry
        d.close()
        assert len(timer) <= 2 * len(live) + COMPACT_SLACK + 2
    timer.fire_due(math.inf)
    assert all(d.fired for d in live)  # live ones survived every compaction

"""The proxy's connection loop (agent/_loop.py): coroutines driven straight from epoll."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.lowlevel
import trio.testing
from conftest import trio_test

from hostmesh.agent import _loop
from hostmesh.agent._deadline import DeadlineExceeded, Timer
from hostmesh.agent._loop import Loop, checkpoint, to_trio, wait_socket
from hostmesh.agent._pool import Stream


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _echo_once(sock: socket.socket, log: list[bytes]) -> None:
    stream = Stream(sock)
    assert await stream.fill()
    log.append(bytes(stream.buf))
    await stream.send(bytes(stream.buf).upper())


@trio_test(10)
async def test_many_coroutines_interleave_on_their_sockets() -> None:
    loop = Loop()
    pairs = [_pair() for _ in range(50)]
    log: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, nursery)
            for ours, _ in pairs:
                loop.spawn(_echo_once(ours, log))
            await trio.sleep(0.05)
            assert log == []  # all parked, none busy-waiting
            for i, (_, theirs) in enumerate(reversed(pairs)):
                theirs.send(b"req%d" % i)
            for i, (_, theirs) in enumerate(reversed(pairs)):
                await trio.lowlevel.wait_readable(theirs)
                assert theirs.recv(100) == b"REQ%d" % i
            assert len(loop) == 0
            nursery.cancel_scope.cancel()
    assert sorted(log) == sorted(b"req%d" % i for i in range(50))
    for a, b in pairs:
        a.close()
        b.close()


@trio_test(10)
async def test_data_that_came_while_nobody_waited_is_not_lost() -> None:
    # Edge-triggered: the event arrives before the coroutine waits (it was
    # busy); the next wait must see it rather than sleep forever.
    loop = Loop()
    ours, theirs = _pair()
    got: list[bytes] = []

    async def reader() -> None:
        await wait_socket(ours)  # registers the socket; nothing to read yet
        got.append(ours.recv(10))
        for _ in range(3):
            await checkpoint()  # busy while the second message arrives
        await wait_socket(ours)  # the event already happened
        got.append(ours.recv(10))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, nursery)
            loop.spawn(reader())
            await trio.sleep(0.01)
            theirs.send(b"one")
            while not got:
                await trio.sleep(0.001)
            theirs.send(b"two")
            while len(got) < 2:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert got == [b"one", b"two"]
    ours.close()
    theirs.close()


@trio_test(10)
async def test_a_new_socket_on_a_reused_fd_is_registered_again() -> None:
    # The kernel drops a closed socket from the epoll set; the next socket on
    # that fd number (POSIX hands out the lowest free one) must be registered anew.
    loop = Loop()
    results: list[bytes] = []
    fds = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, nursery)
            for round_ in range(3):
                ours, theirs = _pair()
                fds.append(ours.fileno())
                loop.spawn(_echo_once(ours, results))
                await trio.sleep(0.01)
                theirs.send(b"x%d" % round_)
                await trio.lowlevel.wait_readable(theirs)
                assert theirs.recv(10) == b"X%d" % round_
                ours.close()
                theirs.close()
            nursery.cancel_scope.cancel()
    assert fds[0] == fds[1] == fds[2]  # the case under test did happen
    assert results == [b"x0", b"x1", b"x2"]


@trio_test(10)
async def test_a_deadline_wakes_a_waiting_coroutine_with_deadline_exceeded() -> None:
    loop = Loop()
    timer = Timer()
    ours, theirs = _pair()
    outcome: list[str] = []

    async def waiter() -> None:
        dl = timer.deadline()
        dl.after(0.2)
        try:
            await Stream(ours).fill(dl)
            outcome.append("data")
        except DeadlineExceeded:
            outcome.append("timeout")
        finally:
            dl.close()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer.run)
            nursery.start_soon(loop.run, nursery)
            start = trio.current_time()
            loop.spawn(waiter())
            while not outcome:
                await trio.sleep(0.01)
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
    assert outcome == ["timeout"]
    assert 0.15 < elapsed < 1.0
    ours.close()
    theirs.close()


@trio_test(10)
async def test_to_trio_moves_a_coroutine_into_a_trio_task() -> None:
    loop = Loop()
    ours, theirs = _pair()
    steps: list[str] = []

    async def conn() -> None:
        await wait_socket(ours)
        steps.append(ours.recv(10).decode())
        await to_trio()
        with trio.move_on_after(0.05) as scope:  # a cancel scope: only in Trio
            await trio.sleep_forever()
        steps.append("cancelled" if scope.cancelled_caught else "?")
        await wait_socket(ours)  # Trio's wait now
        steps.append(ours.recv(10).decode())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, nursery)
            loop.spawn(conn())
            await trio.sleep(0.01)
            theirs.send(b"a")
            await trio.sleep(0.2)
            assert len(loop) == 0  # it left the loop
            theirs.send(b"b")
            while len(steps) < 3:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert steps == ["a", "cancelled", "b"]
    ours.close()
    theirs.close()


@trio_test(10)
async def test_a_trio_primitive_reached_in_the_loop_is_a_loud_error() -> None:
    loop = Loop()

    async def forgot_to_trio() -> None:
        await trio.lowlevel.checkpoint()

    with trio.fail_after(5), pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="Trio")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, nursery)
            loop.spawn(forgot_to_trio())


@trio_test(10)
async def test_cancelling_the_loop_closes_its_coroutines() -> None:
    loop = Loop()
    ours, theirs = _pair()
    cleaned: list[str] = []

    async def conn() -> None:
        try:
            await wait_socket(ours)
        finally:
            cleaned.append("closed")
            ours.close()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, nursery)
            loop.spawn(conn())
            await trio.sleep(0.01)
            assert cleaned == []
            nursery.cancel_scope.cancel()
    assert cleaned == ["closed"]
    assert ours.fileno() == -1
    theirs.close()


@trio_test(10)
async def test_other_trio_tasks_run_while_the_loop_is_busy() -> None:
    loop = Loop()
    ticks = 0

    async def spinner() -> None:
        while True:
            await checkpoint()  # never blocks

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, nursery)
            loop.spawn(spinner())
            nursery.start_soon(ticker)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert ticks > 100


@trio_test(10)
async def test_a_coroutine_that_yields_is_not_starved_by_socket_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch that ends (BATCH_TIME) before it has resumed every waiter its events
    woke still runs what was ready before it first in the next batch: a coroutine
    that yields (a long body's copy) gets a turn per batch, not one behind events
    that never stop coming."""
    monkeypatch.setattr(_loop, "BATCH_TIME", 0.0)  # every batch ends after four steps
    loop = Loop()
    turns = 0
    bounces = 0

    async def yielder() -> None:
        nonlocal turns
        while True:
            await checkpoint()
            turns += 1

    async def bounce(sock: socket.socket) -> None:
        nonlocal bounces
        stream = Stream(sock)
        while await stream.fill():
            stream.buf.clear()
            sock.send(b"x")  # back to its partner: a new event, for ever
            bounces += 1

    pairs = [_pair() for _ in range(8)]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run, nursery)
            for a, b in pairs:
                loop.spawn(bounce(a))
                loop.spawn(bounce(b))
            await trio.sleep(0.05)
            loop.spawn(yielder())
            for _, b in pairs:
                b.send(b"x")
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    assert bounces > 200  # the events kept every batch full
    assert turns > bounces // 10  # one turn per batch of four steps, less Trio's share
    for a, b in pairs:
        a.close()
        b.close()


@trio_test(10)
async def test_waiting_on_a_closed_socket_fails_that_wait_not_the_loop() -> None:
    loop = Loop()
    ours, theirs = _pair()
    ours.close()
    errors: list[str] = []
    served: list[bytes] = []

    async def broken() -> None:
        try:
            await wait_socket(ours)
        except (OSError, ValueError) as exc:
            errors.append(type(exc).__name__)

    a, b = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run, nursery)
        loop.spawn(broken())
        loop.spawn(_echo_once(a, served))  # the loop goes on serving others
        await trio.sleep(0.01)
        b.send(b"still here")
        await trio.lowlevel.wait_readable(b)
        assert b.recv(100) == b"STILL HERE"
        nursery.cancel_scope.cancel()
    assert errors == ["ValueError"]
    for s in (theirs, a, b):
        s.close()


@trio_test(10)
async def test_a_second_waiter_on_one_socket_gets_busy_resource_error() -> None:
    loop = Loop()
    ours, theirs = _pair()
    outcome: list[str] = []

    async def reader(name: str) -> None:
        try:
            await wait_socket(ours)
            outcome.append(f"{name} woke")
        except trio.BusyResourceError:
            outcome.append(f"{name} busy")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run, nursery)
        loop.spawn(reader("first"))
        await trio.sleep(0.01)
        loop.spawn(reader("second"))
        await trio.sleep(0.01)
        theirs.send(b"x")
        while len(outcome) < 2:
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert outcome == ["second busy", "first woke"]
    ours.close()
    theirs.close()

"""The proxy's connection loop: coroutines resumed straight from epoll, inside one Trio task.

A proxied keep-alive request waits twice (for the upstream's answer, then
for the client's next request). Through Trio each wait costs a registration,
a trip through its scheduler and a task switch: about a fifth of the proxy's
CPU for a small request. The proxy's connection coroutines wait only on
their sockets (every wait yields the loop's trap: :func:`wait_socket`,
:meth:`~._deadline.Deadline.wait` or :meth:`~._deadline.Deadline.trap`), so one Trio
task, :meth:`Loop.run`, can drive them all itself: one epoll set, each
socket registered once (edge-triggered), and a coroutine resumed with
``send`` when its socket is ready. The loop waits in Trio on the epoll fd
itself, and yields to Trio's other tasks between batches.

A connection coroutine may also be a generator (:func:`types.coroutine`)
that yields the wait itself (:meth:`~._deadline.Deadline.trap`): no
generator object is made per wait, and a wake-up resumes one frame fewer.
Such a wait is usually registered at once (:meth:`Loop.park`) and yields
:data:`PARKED`, which the loop takes without reading a trap.

A coroutine driven here must not reach a Trio primitive (a cancel scope, a
nursery, a thread): before one it calls :func:`to_trio`, which moves it into
a Trio task of its own for the rest of its life (a 100-continue wait, a
WebSocket tunnel, the /proc identity fallback). The loop raises if a Trio
trap reaches it, so a missing :func:`to_trio` is a loud bug, not a hang.

Readiness is edge-triggered: an event for a socket nobody waits on is kept
as a bit and consumed by the next wait, so no event is lost; a wait may
wake spuriously (a stale bit), and every caller retries its read or write.
"""

from __future__ import annotations

import select
import socket
import types
from collections.abc import Coroutine, Generator
from time import perf_counter
from typing import Any, Protocol, cast

import trio

__all__ = [
    "PARKED",
    "READABLE",
    "WAIT",
    "WRITABLE",
    "Driven",
    "Loop",
    "checkpoint",
    "quiet",
    "to_trio",
    "wait_socket",
]

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
# Errors and hang-ups are reported whatever was asked for; they wake any waiter.
_ANY = select.EPOLLERR | select.EPOLLHUP
_IN_ANY = _IN | _ANY
_WAIT, _ESCAPE, _YIELD, _PARK = 0, 1, 2, 3
#: What a wait yields to the loop driving it: (WAIT, socket, READABLE or WRITABLE)
#: (for :meth:`~._deadline.Deadline.wait`, which yields it itself).
WAIT, READABLE, WRITABLE = _WAIT, _IN, _OUT
#: What a wait yields when :meth:`Loop.park` has registered it: nothing left to do.
PARKED = (_PARK,)
#: epoll events fetched per poll.
MAX_EVENTS = 256
#: s of connection work before Trio's other tasks get a turn. A saturated proxy
#: (256 busy connections, ~45 us a step) otherwise held the agent's DNS
#: resolver for one whole batch, ~10 ms.
BATCH_TIME = 0.001

#: The loop resuming a coroutine right now (None: Trio is running the code).
_driving: Loop | None = None


class Driven(Protocol):
    """What the loop drives: a coroutine, or a generator made with :func:`types.coroutine`."""

    def send(self, value: Any, /) -> Any: ...
    def throw(self, error: BaseException, /) -> Any: ...
    def close(self) -> None: ...


@types.coroutine
def _trap(msg: tuple[Any, ...]) -> Generator[Any, Any, Any]:
    return (yield msg)


@types.coroutine
def wait_socket(sock: socket.socket, *, writable: bool = False) -> Generator[Any, Any, None]:
    """Wait until ``sock`` is readable (or writable): in the loop if it drives us, else in Trio.

    A generator, not a coroutine function: the loop's trap is yielded from
    here, one frame below the waiter (every frame between a wait and the loop
    is resumed on each wake-up).

    Raises:
        BaseException: the error :meth:`Loop.interrupt` woke it with (a deadline's).
    """
    if _driving is not None:
        yield (_WAIT, sock, _OUT if writable else _IN)
    elif writable:  # (yield from is the await of a generator)
        yield from trio.lowlevel.wait_writable(sock).__await__()  # noqa: ASYNC105
    else:
        yield from trio.lowlevel.wait_readable(sock).__await__()  # noqa: ASYNC105


async def checkpoint() -> None:
    """Let other connections (or Trio tasks) run: for loops that may never block."""
    if _driving is not None:
        await _trap((_YIELD,))
    else:
        await trio.lowlevel.checkpoint()


async def to_trio() -> None:
    """From here on, run in a Trio task of our own (no-op if already in Trio)."""
    if _driving is not None:
        await _trap((_ESCAPE,))


def quiet(sock: socket.socket) -> bool:
    """Has the loop driving us registered ``sock`` and seen no read, error or hang-up
    event on it since its last wait? (As of its last poll; False outside a loop.)"""
    loop = _driving
    if loop is None:
        return False
    fd = sock.fileno()
    return loop._registered.get(fd) is sock and not loop._bits.get(fd, 0) & (_IN | _ANY)


@types.coroutine
def _continue(coro: Driven) -> Generator[Any, Any, Any]:
    # Resumes ``coro`` where it escaped (its trap answers None) and passes
    # Trio's traps, values and cancellations through, as ``await`` would.
    return (yield from cast(Coroutine[Any, Any, Any], coro))


async def _adopted(coro: Driven) -> None:
    await _continue(coro)


class Loop:
    """Drives connection coroutines from one epoll set; :meth:`run` is its Trio task."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._registered: dict[int, socket.socket] = {}  # fd -> the socket registered on it
        self._bits: dict[int, int] = {}  # fd -> events seen while nobody waited
        self._waiters: dict[int, tuple[Driven, int]] = {}  # fd -> (coro, mask)
        self._ready: list[tuple[Driven, BaseException | None]] = []
        self._live: set[Driven] = set()
        self._current: Driven = cast(Driven, None)  # the coroutine being resumed (by _step)
        self._sleep: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._error: BaseException | None = None

    def __len__(self) -> int:
        """Coroutines driven here (waiting or ready)."""
        return len(self._live)

    def spawn(self, coro: Driven) -> None:
        """Run ``coro`` here from its first step (callable from any Trio task)."""
        self._live.add(coro)
        self._ready.append((coro, None))
        self._wake()

    def interrupt(self, sock: socket.socket, error: BaseException) -> None:
        """Wake the coroutine waiting on ``sock`` with ``error`` (a deadline's)."""
        waiter = self._waiters.pop(sock.fileno(), None)
        if waiter is not None:
            self._ready.append((waiter[0], error))
            self._wake()

    def _wake(self) -> None:
        if self._sleep is not None:
            self._sleep.cancel()

    async def run(self, nursery: trio.Nursery) -> None:
        """Drive the coroutines until cancelled; escaped ones move into ``nursery``.

        On exit every coroutine still here is closed (its ``finally`` blocks
        run). A coroutine's uncaught exception ends the loop with it, as it
        would end a Trio nursery.
        """
        global _driving
        self._nursery = nursery
        poll = self._ep.poll
        try:
            while True:
                events = poll(0, MAX_EVENTS)
                slept = not events and not self._ready
                if slept:  # nothing to do: wait in Trio for the epoll fd (or a wake-up)
                    with trio.CancelScope() as self._sleep:
                        await trio.lowlevel.wait_readable(self._ep.fileno())
                    self._sleep = None
                    events = poll(0, MAX_EVENTS)
                # One batch of at most BATCH_TIME: what was ready before (first: under
                # load, a batch may end before the events' waiters are all resumed),
                # then the waiters the events wake, each resumed as its event is read.
                # What becomes ready meanwhile (a checkpoint, a wait that finds its
                # event) and what did not fit run after Trio's other tasks (DNS,
                # gossip, the API) had a turn.
                ready, self._ready = self._ready, []
                started = perf_counter()
                done = 0
                _driving = self  # for the whole batch: only our coroutines run in it
                try:
                    for coro, exc in ready:
                        self._step(coro, exc)
                        done += 1
                        if not done % 4 and perf_counter() - started > BATCH_TIME:
                            break
                    left = ready[done:]
                    self._dispatch(events, started, -1 if left else done)
                finally:
                    _driving = None
                if left:
                    self._ready[:0] = left  # first in the next batch
                if self._error is not None:
                    raise self._error
                if not slept or self._ready:
                    await trio.lowlevel.checkpoint()  # the rest of the agent gets its turn
        finally:
            self._sleep = None
            self._close_all()

    def _dispatch(self, events: list[tuple[int, int]], started: float, done: int) -> None:
        """Resume each waiter an event wakes (a list of them, then stepping it, was 1%
        of a proxied request) until the batch begun at ``started`` has taken
        BATCH_TIME; after that, and from the start when ``done`` (steps taken in the
        batch) is -1, queue them."""
        waiters = self._waiters
        bits = self._bits
        step = self._step
        for fd, ev in events:
            waiter = waiters.pop(fd, None)
            if waiter is None or not ev & waiter[1]:
                if waiter is not None:  # (woken only by what it waits for)
                    waiters[fd] = waiter
                bits[fd] = bits.get(fd, 0) | ev
            elif done >= 0:
                step(waiter[0], None)
                done += 1
                if not done % 4 and perf_counter() - started > BATCH_TIME:
                    done = -1
            else:
                self._ready.append((waiter[0], None))

    def _step(self, coro: Driven, exc: BaseException | None) -> None:
        # (run() has set _driving for the batch.)
        self._current = coro
        try:
            trap = coro.send(None) if exc is None else coro.throw(exc)
        except StopIteration:
            self._live.discard(coro)
            return
        except BaseException as error:  # a bug in the connection code: end the loop
            self._live.discard(coro)
            self._error = error
            return
        if trap is PARKED:
            return
        kind = trap[0] if type(trap) is tuple else None
        if kind == _WAIT:
            # The usual wait, inline: a registered socket with no event seen for it.
            sock = trap[1]
            fd = sock.fileno()
            if (
                self._registered.get(fd) is sock
                and not self._bits.get(fd, 0) & (trap[2] | _ANY)
                and fd not in self._waiters
            ):
                self._waiters[fd] = (coro, trap[2] | _ANY)
            else:
                self._wait(coro, sock, trap[2])
        elif kind == _YIELD:
            self._ready.append((coro, None))
        elif kind == _ESCAPE:
            self._live.discard(coro)
            assert self._nursery is not None
            self._nursery.start_soon(_adopted, coro)
        else:
            self._live.discard(coro)
            coro.close()
            self._error = RuntimeError(f"a Trio operation reached the proxy loop: {trap!r}")

    def park(self, sock: socket.socket) -> tuple[Any, ...]:
        """What the coroutine being resumed yields to wait until ``sock`` is readable:
        :data:`PARKED` when this registered it already (the usual case of
        :meth:`_step`'s, a registered socket with no event seen for it: the yield
        then carries nothing for the loop to read), else the wait's trap."""
        fd = sock.fileno()
        if (
            self._registered.get(fd) is sock
            and not self._bits.get(fd, 0) & _IN_ANY
            and fd not in self._waiters
        ):
            self._waiters[fd] = (self._current, _IN_ANY)
            return PARKED
        return (_WAIT, sock, _IN)

    def _wait(self, coro: Driven, sock: socket.socket, want: int) -> None:
        fd = sock.fileno()
        if self._registered.get(fd) is not sock:
            # A new socket, or a new one on a reused fd (the kernel dropped the old one).
            try:
                try:
                    self._ep.register(fd, _IN | _OUT | select.EPOLLET)
                except FileExistsError:
                    self._ep.modify(fd, _IN | _OUT | select.EPOLLET)
            except (OSError, ValueError) as exc:  # closed (fd -1): the waiter's error, as in Trio
                self._ready.append((coro, exc))
                return
            self._registered[fd] = sock
            self._bits.pop(fd, None)
        else:
            seen = self._bits.get(fd, 0)
            if seen & (want | _ANY):
                self._bits[fd] = seen & ~want
                self._ready.append((coro, None))
                return
        if fd in self._waiters:  # two waiters on one socket: the second's error, as in Trio
            self._ready.append((coro, trio.BusyResourceError("another task waits on this socket")))
            return
        self._waiters[fd] = (coro, want | _ANY)

    def _close_all(self) -> None:
        live, self._live = self._live, set()
        self._waiters.clear()
        self._ready.clear()
        global _driving
        for coro in live:
            _driving = self
            try:
                coro.close()
            except BaseException:
                pass
            finally:
                _driving = None
        self._ep.close()

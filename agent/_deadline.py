"""Per-connection deadlines for the data plane, without a cancel scope per phase.

A Trio cancel scope per timed phase costs more than the rest of a small
proxied request (entering, registering the deadline, closing): with two
phases per request it was a fifth of the proxy's CPU. Here a connection owns
one :class:`Deadline`; setting it is a float assignment, and one
:class:`Timer` task per proxy keeps a heap with at most one live entry per
deadline. Moving a deadline later, the common case (the next request's head
timeout is later than the last one's), pushes nothing: when the old entry
comes due the timer finds the deadline moved and re-arms it. Only a deadline
moved earlier than its entry pushes a new one.

When a deadline passes, the timer marks it fired and wakes the task blocked
on the deadline's socket with :func:`trio.lowlevel.notify_closing`, which
:meth:`Deadline.wait` turns into :class:`DeadlineExceeded`, or, for a
connection driven by the proxy's :class:`~._loop.Loop`, throws
:class:`DeadlineExceeded` into it with :meth:`~._loop.Loop.interrupt`.
Every phase that times out ends with that socket discarded or answered and
closed (a 408 to the client, an upstream connection thrown away after a
504), so waking it as if it were closing is safe. A task that is not blocked
finds ``fired`` set at its next wait.
"""

from __future__ import annotations

import heapq
import itertools
import math
import socket
import types
from collections.abc import Callable, Generator
from typing import Any

import trio

from . import _loop
from ._loop import READABLE, WAIT, WRITABLE, Loop, wait_socket

__all__ = ["Deadline", "DeadlineExceeded", "Timer"]

#: Stale heap entries tolerated beyond two per live deadline before the heap
#: is rebuilt (clients that open a connection per request leave one each).
COMPACT_SLACK = 1024


class DeadlineExceeded(Exception):
    """A wait passed its connection's deadline (translated to 408/504 by the proxy)."""


class Deadline:
    """When the current phase of one connection must end. Owned by that connection.

    Only the owner moves it while it may be blocked on it: a :meth:`set` from
    elsewhere between the firing and the owner waking would clear ``fired``
    and turn a wake-up in Trio into a plain :class:`trio.ClosedResourceError`.
    """

    __slots__ = ("_armed", "_gen", "_timer", "at", "fired", "loop", "waiting")

    def __init__(self, timer: Timer) -> None:
        self._timer = timer
        self.at = math.inf  # trio.current_time() by which the phase must end
        self.fired = False
        self.waiting: socket.socket | None = None  # the socket the owner is blocked on
        self.loop: Loop | None = None  # the proxy loop it waits in (None: in Trio)
        self._armed = math.inf  # time of this deadline's live heap entry
        self._gen = 0  # the live heap entry's generation; older entries are stale

    def set(self, at: float) -> None:
        """Start a phase that must end by ``at`` (``math.inf``: none)."""
        self.at = at
        self.fired = False
        if at < self._armed:
            self._timer._arm(self, at)

    def after(self, seconds: float) -> None:
        """Start a phase that must end ``seconds`` from now (0 or less: none)."""
        self.set(self._timer.now() + seconds if seconds > 0 else math.inf)

    def clear(self) -> None:
        """No deadline until the next :meth:`set`."""
        self.at = math.inf
        self.fired = False

    def close(self) -> None:
        """The connection is gone: its heap entry goes stale (dropped when due or compacted)."""
        self.clear()
        self._gen += 1
        self._armed = -math.inf  # never armed again
        self._timer._live -= 1

    def trap(self, sock: socket.socket) -> tuple[Any, ...] | None:
        """What a generator driven by the loop yields to wait for ``sock`` to be readable
        within the deadline, without :meth:`wait`'s generator (the proxy's express lane;
        :meth:`~._loop.Loop.park`: usually PARKED, the wait registered already); None
        outside the loop, where the caller waits with :meth:`wait` instead. The
        caller sets ``waiting`` back to None once the yield returns or raises; it raises
        :class:`DeadlineExceeded` when the deadline passes meanwhile.

        Raises:
            DeadlineExceeded: the deadline passed already.
        """
        if self.fired:
            raise DeadlineExceeded
        loop = _loop._driving
        if loop is None:
            return None
        self.waiting = sock
        self.loop = loop
        return loop.park(sock)

    @types.coroutine
    def wait(self, sock: socket.socket, *, writable: bool = False) -> Generator[Any, Any, None]:
        """Wait until ``sock`` is readable (or writable) within the deadline (a generator,
        as :func:`~._loop.wait_socket` is: one frame between the waiter and the loop).

        Raises:
            DeadlineExceeded: the deadline passed before or during the wait.
        """
        if self.fired:
            raise DeadlineExceeded
        self.waiting = sock
        loop = self.loop = _loop._driving
        try:
            if loop is not None:  # wait_socket's trap, yielded here: one frame less
                yield (WAIT, sock, WRITABLE if writable else READABLE)
            else:
                yield from wait_socket(sock, writable=writable)
        except trio.ClosedResourceError:
            if self.fired:
                raise DeadlineExceeded from None
            raise
        finally:
            self.waiting = None


class Timer:
    """Fires the deadlines of one proxy; :meth:`run` is its task (never returns)."""

    def __init__(self) -> None:
        #: ``trio.current_time``; once :meth:`run` started, the run's clock's own
        #: method (one call instead of three: deadlines read it per request phase).
        self.now: Callable[[], float] = trio.current_time
        self._heap: list[tuple[float, int, int, Deadline]] = []
        self._seq = itertools.count()  # tie-break: deadlines are not ordered
        self._wake_at = math.inf  # when the run task will look at the heap next
        self._sleep: trio.CancelScope | None = None
        self._live = 0  # deadlines made and not closed

    def deadline(self) -> Deadline:
        """A new deadline (no time set); the caller closes it with :meth:`Deadline.close`."""
        self._live += 1
        return Deadline(self)

    def __len__(self) -> int:
        """Heap entries, stale ones included (bounded by about one per deadline)."""
        return len(self._heap)

    def _arm(self, d: Deadline, at: float) -> None:
        if len(self._heap) > 2 * self._live + COMPACT_SLACK:
            self._compact()
        d._gen += 1
        d._armed = at
        heapq.heappush(self._heap, (at, next(self._seq), d._gen, d))
        if at < self._wake_at and self._sleep is not None:
            self._wake_at = at
            self._sleep.deadline = at

    def _compact(self) -> None:
        """Drop stale entries (closed connections, superseded entries): O(n), amortised."""
        self._heap = [e for e in self._heap if e[2] == e[3]._gen]
        heapq.heapify(self._heap)

    def fire_due(self, now: float) -> None:
        """Fire every deadline due by ``now``; re-arm the ones that moved later."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, gen, d = heapq.heappop(heap)
            if gen != d._gen:
                continue  # superseded by an earlier entry of the same deadline
            d._armed = math.inf
            if d.at <= now:
                d.fired = True
                if d.waiting is not None:
                    if d.loop is not None:
                        d.loop.interrupt(d.waiting, DeadlineExceeded())
                    else:
                        trio.lowlevel.notify_closing(d.waiting)
            elif d.at < math.inf:
                self._arm(d, d.at)

    async def run(self) -> None:
        self.now = trio.lowlevel.current_clock().current_time
        while True:
            self.fire_due(self.now())
            self._wake_at = self._heap[0][0] if self._heap else math.inf
            with trio.CancelScope(deadline=self._wake_at) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None

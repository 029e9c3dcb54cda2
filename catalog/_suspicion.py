"""Lifeguard's dynamic suspicion timeout (memberlist suspicion.go).

When a member is suspected, it gets a window to refute before it is declared
dead. Lifeguard (Dadgar et al., 2018, section IV-B) starts that window long
and shortens it each time another member independently reports the same
suspicion: one slow or overloaded prober cannot kill a healthy node quickly,
while a node that many members suspect is declared dead almost as fast as
plain SWIM would.

With ``n`` independent confirmations out of ``k`` expected, the timeout is::

    timeout(n) = max(min, max - (max - min) * ln(n + 1) / ln(k + 1))

so it is ``max`` with none, falls fastest for the first confirmations and is
``min`` at ``n = k``. With ``k < 1`` no confirmations are awaited and the
timeout is ``min`` from the start.

The SWIM state machine picks ``k`` with :func:`expected_confirmations`
(memberlist state.go ``suspectNode``): ``suspicion_mult - 2``, or 0 when fewer
than that many other members (besides us and the suspect) could confirm.

Sans-IO: time comes in as ``now`` arguments; the caller schedules a timer
for :attr:`Suspicion.deadline` and re-reads it after each confirmation.
"""

from __future__ import annotations

import math

__all__ = ["Suspicion", "expected_confirmations", "suspicion_timeout_bounds"]


def suspicion_timeout_bounds(
    mult: int, max_timeout_mult: int, num_nodes: int, probe_interval: float
) -> tuple[float, float]:
    """``(min, max)`` suspicion timeouts in seconds for a cluster of ``num_nodes``.

    ``min = mult * max(1, log10(max(1, num_nodes))) * probe_interval`` and
    ``max = max_timeout_mult * min`` (memberlist util.go ``suspicionTimeout``,
    config.go ``SuspicionMult``/``SuspicionMaxTimeoutMult``). Example: the LAN
    defaults (4, 6) at 1,000 nodes and a 1 s probe interval give (12 s, 72 s).
    """
    node_scale = max(1.0, math.log10(max(1, num_nodes)))
    low = mult * node_scale * probe_interval
    return low, max_timeout_mult * low


def expected_confirmations(suspicion_mult: int, num_nodes: int) -> int:
    """``k`` for a new :class:`Suspicion`: independent confirmations to wait for.

    ``suspicion_mult - 2`` (memberlist state.go ``suspectNode``); 0 when the
    cluster has fewer other members than that (``num_nodes - 2``: everyone but
    us and the suspect), because that many confirmations could never arrive and
    the timer would always run to ``max``.
    """
    k = suspicion_mult - 2
    if num_nodes - 2 < k:
        return 0
    return max(0, k)


class Suspicion:
    """The suspicion timer for one suspected member.

    Args:
        source: the member whose report started the suspicion; it counts as
            seen, so its repeats never shorten the timer.
        k: independent confirmations expected (see :func:`expected_confirmations`).
        min_timeout: seconds; the timeout with ``k`` confirmations.
        max_timeout: seconds; the timeout with none.
        now: when the suspicion started.

    Raises:
        ValueError: ``min_timeout`` is negative or greater than ``max_timeout``.
    """

    def __init__(
        self, source: str, k: int, min_timeout: float, max_timeout: float, now: float
    ) -> None:
        if not 0 <= min_timeout <= max_timeout:
            raise ValueError(
                f"need 0 <= min_timeout <= max_timeout, got {min_timeout}, {max_timeout}"
            )
        self.source = source
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.start = now
        self._seen = {source}
        self._confirmations = 0
        self._timeout = self._timeout_for(0)

    @property
    def confirmations(self) -> int:
        """Independent confirmations counted so far (at most ``k``)."""
        return self._confirmations

    @property
    def timeout(self) -> float:
        """Seconds from :attr:`start` to :attr:`deadline`, given the confirmations so far."""
        return self._timeout

    @property
    def deadline(self) -> float:
        """When the suspect is declared dead unless it refutes first."""
        return self.start + self._timeout

    def confirm(self, source: str, now: float) -> bool:
        """Count ``source``'s report of the same suspicion.

        ``now`` is unused by the timeout formula (the deadline is measured from
        :attr:`start`); it is taken so callers pass time the same way everywhere.

        Returns:
            True when this was a new independent confirmation and the deadline
            moved earlier (or stayed at ``min``): not the first source, not a
            repeat, and fewer than ``k`` counted before. The SWIM layer
            re-gossips the suspicion only then (memberlist does the same, so
            duplicate reports do not amplify).
        """
        if self._confirmations >= self.k or source in self._seen:
            return False
        self._seen.add(source)
        self._confirmations += 1
        self._timeout = self._timeout_for(self._confirmations)
        return True

    def expired(self, now: float) -> bool:
        """True once ``now`` has reached :attr:`deadline`."""
        return now >= self.deadline

    def remaining(self, now: float) -> float:
        """Seconds left until :attr:`deadline` (0 once expired)."""
        return max(0.0, self.deadline - now)

    def _timeout_for(self, n: int) -> float:
        if self.k < 1:
            return self.min_timeout
        fraction = math.log(n + 1) / math.log(self.k + 1)
        raw = self.max_timeout - (self.max_timeout - self.min_timeout) * fraction
        return max(self.min_timeout, raw)

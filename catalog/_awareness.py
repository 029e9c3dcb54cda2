"""Lifeguard local health awareness (memberlist awareness.go).

A member that is itself slow (CPU starved, dropping packets) misses acks and
then wrongly suspects healthy peers. Lifeguard (Dadgar et al., 2018, section
IV-A) has each member keep a score of evidence that the trouble is local, and
stretch its own probing by ``score + 1``: a struggling member probes less often
and waits longer before it blames others. HashiCorp reports about 50x fewer
false positives with Lifeguard.

The score is an integer in ``[0, max_multiplier - 1]`` (memberlist:
``AwarenessMaxMultiplier`` 8, so 0..7) and starts at 0. The SWIM state machine
applies these deltas (memberlist state.go ``probeNode`` and ``refute``):

- ``+1`` when a probe fails, no ack direct or indirect, and no indirect
  prober was asked for a nack (nothing tells us the peer is the problem);
- ``+1`` for each nack we asked for and did not get: the indirect probers
  could not even answer us, so our own network is suspect;
- ``+1`` when we refute a suspicion of ourselves: others found us slow;
- ``-1`` when a probe succeeds (an ack arrived in time).

A failed probe whose requested nacks all arrived changes nothing: the peers
answered us, so the fault is more likely the target's.

What is scaled (memberlist): the probe interval, i.e. the time one probe round
waits for any ack before it counts as failed and the gap to the next round,
via :meth:`Awareness.scale`.

Sans-IO: no I/O, no clock.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    """The local health score.

    Args:
        max_multiplier: upper bound of ``score + 1``; at least 1 (1 disables it).

    Raises:
        ValueError: ``max_multiplier`` is below 1.
    """

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError(f"max_multiplier must be >= 1, got {max_multiplier}")
        self.max_multiplier = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """0 is healthy; ``max_multiplier - 1`` is the worst."""
        return self._score

    def apply_delta(self, delta: int) -> None:
        """Add ``delta`` to the score, clamped to ``[0, max_multiplier - 1]``."""
        self._score = min(self.max_multiplier - 1, max(0, self._score + delta))

    def scale(self, timeout: float) -> float:
        """``timeout * (score + 1)``: a timeout or interval stretched by the score."""
        return timeout * (self._score + 1)

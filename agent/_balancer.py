"""Power of two choices over peak-EWMA latency and outstanding requests.

Finagle's ``p2cPeakEwma``, which Linkerd 1 balances with by default and the
Linkerd 2 proxy (tower ``PeakEwma``) keeps: draw two instances, send the
request to the one with the lower cost, where

    cost = latency estimate x (outstanding / weight + 1)

For weight 1 this is Finagle's ``ewma x (pending + 1)``. A weight-``w``
instance is treated as ``w`` servers in parallel: a new request waits behind
``outstanding / w`` others, then its own service time. Under load the balancer
therefore evens out ``outstanding / weight``, so equal-latency instances
serve in proportion to their weights. (Dividing the whole ``pending + 1`` by
the weight instead would make the heavier of two idle instances win every
draw: 100:0, not 3:1.)

The pair is drawn without replacement, each draw with probability
proportional to weight (with equal weights: Finagle's and tower's uniform
distinct pair). On equal cost the first draw wins, so idle instances with
equal estimates, new ones in particular, receive traffic in proportion to
their weight.

Peak EWMA (Finagle ``PeakEwma``): a sample above the estimate replaces it at
once; a lower one pulls it down with weight ``1 - exp(-dt / tau)``, ``dt`` the
time since the previous sample. Between samples the estimate decays toward 0
with the same time constant (Finagle and tower read it with a 0 sample), so an
instance that was slow and then got no traffic is tried again after a while
instead of starving forever; one slow answer puts it back up.

A new instance (no sample yet) costs 0 while nothing is in flight to it, so
the next draws try it; once it has a request in flight it costs
``default_latency`` per request queued, so it is not flooded before its first
answer (Finagle's cold start). A new instance that cost the default latency
even when idle would lose every draw against measured sub-millisecond peers
and get no traffic at low concurrency, never to be measured.

Sans-IO: ``now`` (seconds, any monotonic clock) and ``rng`` come from the caller.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .._config import SECONDS, FieldError

__all__ = ["BalancerConfig", "EndpointStats", "StatsTable", "pick"]

T = TypeVar("T")

MILLISECONDS = SECONDS / 1000


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """Peak-EWMA settings, shared by all the instances of a service."""

    # s; time constant tau of the EWMA: a sample's influence falls to 1/e
    # after tau. Finagle PeakEwma decayTime, Linkerd 1 "decay 10 s", Linkerd 2
    # EWMA_DECAY. Longer is steadier, shorter reacts faster to recovery.
    decay: float = 10 * SECONDS
    # s; the estimate of an instance with no sample yet while requests to it are
    # in flight (Linkerd 2 proxy EWMA_DEFAULT_RTT, 30 ms): a new instance is not
    # flooded before its first answers; idle, it costs 0 and is tried.
    default_latency: float = 30 * MILLISECONDS

    def __post_init__(self) -> None:
        if not self.decay > 0:
            raise FieldError("decay", "must be positive")
        if not self.default_latency > 0:
            raise FieldError("default_latency", "must be positive")


class EndpointStats:
    """Load of one instance: peak-EWMA latency and requests in flight.

    The caller owns the object from :meth:`start` to :meth:`finish` of a
    request: keep the reference rather than looking the instance up again,
    since :meth:`StatsTable.retain` may have dropped it meanwhile.
    """

    __slots__ = ("_decay", "_ewma", "_stamp", "outstanding")

    def __init__(self, config: BalancerConfig) -> None:
        self._decay = config.decay
        self._ewma = config.default_latency  # s
        self._stamp: float | None = None  # time of the last sample; None = none yet
        self.outstanding = 0  # requests started and not finished

    def latency(self, now: float) -> float:
        """The latency estimate in seconds at ``now``, decayed since the last sample."""
        if self._stamp is None:
            return self._ewma
        return self._ewma * math.exp(-max(0.0, now - self._stamp) / self._decay)

    def cost(self, now: float, weight: float = 1.0) -> float:
        """Expected seconds until a new request sent now would be answered.

        ``latency(now) x (outstanding / weight + 1)``; see the module docstring.
        """
        if self._stamp is None and self.outstanding == 0:
            return 0.0  # never tried and idle: worth a try (see the module docstring)
        return self.latency(now) * (self.outstanding / weight + 1)

    def start(self, now: float) -> None:
        """Count a request sent to this instance at ``now``."""
        self.outstanding += 1

    def finish(self, now: float, latency_s: float, ok: bool) -> None:
        """Count a request as done and fold its latency into the estimate.

        Args:
            now: when it finished.
            latency_s: its latency in seconds.
            ok: ``False`` for a failure. A failure's latency only counts when it
                raises the estimate: an instance that fails fast must not look
                fast and draw more traffic (the outlier detector deals with
                the failures themselves). It does restart the idle decay.
        """
        # (Comparisons rather than max(): this runs once per request.)
        if self.outstanding > 0:  # 0: started on a dropped twin
            self.outstanding -= 1
        sample = latency_s if latency_s > 0.0 else 0.0
        stamp = self._stamp
        if stamp is None:
            self._ewma = sample if ok or sample > self._ewma else self._ewma
        elif sample > self._ewma:
            self._ewma = sample  # peak: jump up at once
        elif ok:
            w = math.exp((stamp - now) / self._decay) if now > stamp else 1.0
            self._ewma = self._ewma * w + sample * (1.0 - w)
        self._stamp = now


class StatsTable:
    """:class:`EndpointStats` by instance id, created on first use.

    Memory stays bounded by the instances currently known: call :meth:`retain`
    with each new catalog snapshot's ids.
    """

    def __init__(self, config: BalancerConfig | None = None) -> None:
        self.config = config or BalancerConfig()
        self._stats: dict[str, EndpointStats] = {}

    def __len__(self) -> int:
        return len(self._stats)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._stats

    def get(self, instance_id: str) -> EndpointStats:
        """The stats of ``instance_id``, new (default latency, idle) if unseen."""
        stats = self._stats.get(instance_id)
        if stats is None:
            stats = self._stats[instance_id] = EndpointStats(self.config)
        return stats

    def retain(self, instance_ids: Iterable[str]) -> None:
        """Forget the stats of every instance not in ``instance_ids``."""
        keep = set(instance_ids)
        for gone in [i for i in self._stats if i not in keep]:
            del self._stats[gone]


def _draw(weights: Sequence[float], total: float, rng: random.Random, skip: int) -> int:
    """An index drawn with probability weight / total, never ``skip``."""
    r = rng.random() * total
    last = -1
    for i, w in enumerate(weights):
        if i == skip:
            continue
        last = i
        r -= w
        if r < 0:
            return i
    return last  # r within rounding of total


def pick(
    candidates: Sequence[T],
    stats_of: Callable[[T], EndpointStats],
    weight_of: Callable[[T], float],
    rng: random.Random,
    now: float,
) -> T:
    """The candidate to send the next request to: power of two choices.

    Args:
        candidates: the instances allowed for this request (zone and subset
            already applied).
        stats_of: an instance's load stats (e.g. ``StatsTable.get`` of its id).
        weight_of: an instance's weight, positive (e.g. ``InstanceView.weight``;
            in panic mode, where critical instances count too, use the
            instance's configured weight).
        rng: the randomness; seed it for reproducible picks.
        now: seconds, on the clock the stats were fed with.

    Raises:
        ValueError: no candidates, or a weight that is not positive and finite.
    """
    if not candidates:
        raise ValueError("no candidates to pick from")
    if len(candidates) == 1:
        return candidates[0]
    weights = [float(weight_of(c)) for c in candidates]
    for c, w in zip(candidates, weights, strict=True):
        if not 0 < w < math.inf:
            raise ValueError(f"weight of {c!r} must be positive and finite, got {w!r}")
    total = math.fsum(weights)
    a = _draw(weights, total, rng, skip=-1)
    b = _draw(weights, total - weights[a], rng, skip=a)
    cost_a = stats_of(candidates[a]).cost(now, weights[a])
    cost_b = stats_of(candidates[b]).cost(now, weights[b])
    return candidates[b] if cost_b < cost_a else candidates[a]

"""Envoy's zone-aware routing: how much of a caller's traffic stays in its own AZ.

With ``loc[z]`` the callers' share in zone ``z`` (the fraction of calling hosts
there) and ``up[z]`` the upstream's healthy capacity share there (Envoy docs,
"Zone aware routing"; Envoy ``ZoneAwareLoadBalancerBase``):

- ``up[local] >= loc[local]``: every request stays in the local zone;
- otherwise ``local_pct = up[local] / loc[local]`` stays local and the rest goes
  to the other zones in proportion to their residual capacity
  ``max(0, up[z] - loc[z])``.

Envoy's example: callers 40/40/20 and upstream 25/50/25 keep 62.5% of zone
A's traffic in A; the residuals B 0.10 and C 0.05 split the other 37.5% as 25%
to B and 12.5% to C.

Zone-aware routing is skipped, and traffic spreads over every healthy instance
by capacity, when the upstream has fewer healthy hosts than
``min_cluster_size``, fewer than two zones with healthy capacity, or the local
zone is unknown or has no callers. Under the panic threshold (healthy / total
below ``panic_threshold``) the plan says :attr:`ZoneMode.PANIC`: like Envoy,
the caller then balances over *all* instances of the service, healthy or not,
by their configured weight (a critical instance's health weight is 0).

"Capacity" is whatever the caller sums per zone: host counts as in Envoy, or
balancing weights (:func:`capacity_per_az`). Sans-IO: no clock, no randomness;
:meth:`ZonePlan.pick_zone` takes a uniform draw from the caller.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from .._config import FieldError

__all__ = ["ZoneConfig", "ZoneMode", "ZonePlan", "capacity_per_az", "plan_zones"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ZoneConfig:
    """When zone-aware routing applies (Envoy ``zone_aware_lb_config``, ``common_lb_config``)."""

    # healthy upstream hosts below which zone-aware routing is skipped; Envoy
    # min_cluster_size, default 6. Small services have too few hosts per zone
    # for the per-zone shares to mean anything; 0 always routes by zone.
    min_cluster_size: int = 6
    # fraction of the upstream's hosts that must be healthy (0..1); below it
    # every instance is used, healthy or not. Envoy healthy_panic_threshold,
    # default 50%. Routing only to the few survivors would overload them;
    # 0 disables panic mode.
    panic_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.min_cluster_size < 0:
            raise FieldError("min_cluster_size", "must not be negative")
        if not 0.0 <= self.panic_threshold <= 1.0:
            raise FieldError("panic_threshold", "must be in 0..1")


class ZoneMode(enum.Enum):
    """Which rule :func:`plan_zones` applied."""

    ALL_LOCAL = "all-local"  # the local zone has at least its share of capacity
    LOCAL_PCT = "local-pct"  # a share stays local, the rest spills by residual
    ALL_ZONES = "all-zones"  # zone-aware routing skipped: all healthy instances
    PANIC = "panic"  # under the panic threshold: all instances, any health


@dataclass(frozen=True, slots=True)
class ZonePlan:
    """Where a caller's requests go, per zone.

    ``shares`` holds ``(zone, fraction)`` pairs with positive fractions summing
    to 1.0, the local zone first: the zones :meth:`pick_zone` chooses from in
    ALL_LOCAL and LOCAL_PCT, and the capacity shares (for information) in
    ALL_ZONES. It is empty in PANIC, where the per-zone spread of unhealthy
    instances is unknown here, and when no zone has healthy capacity.
    """

    mode: ZoneMode
    shares: tuple[tuple[str, float], ...] = ()

    @property
    def fractions(self) -> dict[str, float]:
        """zone -> fraction of the traffic; zones that get none are absent."""
        return dict(self.shares)

    def pick_zone(self, r: float) -> str | None:
        """The zone a request goes to, given a uniform draw ``r`` in [0, 1).

        Returns:
            The zone to filter instances by, or ``None``: do not filter by zone
            (ALL_ZONES, PANIC).
        """
        if self.mode in (ZoneMode.ALL_ZONES, ZoneMode.PANIC) or not self.shares:
            return None
        for zone, fraction in self.shares:
            r -= fraction
            if r < 0:
                return zone
        return self.shares[-1][0]  # r within rounding of 1.0


def capacity_per_az(
    items: Iterable[T], az_of: Callable[[T], str], weight_of: Callable[[T], float]
) -> dict[str, float]:
    """zone -> summed weight of the items with a positive weight (healthy capacity).

    For catalog instances: ``capacity_per_az(views, lambda v: v.node.az, lambda v: v.weight)``
    (``InstanceView.weight`` is 0 for a critical instance).
    """
    out: dict[str, float] = {}
    for item in items:
        weight = weight_of(item)
        if weight > 0:
            zone = az_of(item)
            out[zone] = out.get(zone, 0.0) + weight
    return out


def _shares(amounts: Mapping[str, float]) -> dict[str, float]:
    """Each positive amount over their total; empty when the total is not positive."""
    positive = {zone: float(v) for zone, v in amounts.items() if v > 0}
    total = sum(positive.values())
    return {zone: v / total for zone, v in positive.items()} if total > 0 else {}


def _check_amounts(name: str, amounts: Mapping[str, float]) -> None:
    for zone, value in amounts.items():
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{name}[{zone!r}] must be >= 0, got {value!r}")


def _ordered(local_az: str | None, shares: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """Positive shares, the local zone first, then the others by name (stable draws)."""
    rest = sorted((z, f) for z, f in shares.items() if f > 0 and z != local_az)
    if local_az is not None and shares.get(local_az, 0.0) > 0:
        return ((local_az, shares[local_az]), *rest)
    return tuple(rest)


def plan_zones(
    local_az: str | None,
    callers_per_az: Mapping[str, int | float],
    healthy_capacity_per_az: Mapping[str, float],
    *,
    healthy_hosts: int,
    total_hosts: int,
    config: ZoneConfig,
) -> ZonePlan:
    """Plan where this caller's requests to one upstream go, by zone.

    Args:
        local_az: the caller's zone; ``None`` or ``""`` when unknown.
        callers_per_az: calling hosts per zone (the "local cluster" of Envoy).
        healthy_capacity_per_az: healthy capacity per zone: host counts or
            summed weights (:func:`capacity_per_az`).
        healthy_hosts: healthy upstream instances (for ``min_cluster_size``).
        total_hosts: all upstream instances, healthy or not (for the panic threshold).
        config: the thresholds.

    Returns:
        The plan; see :class:`ZoneMode` for the rule each mode stands for.

    Raises:
        ValueError: a negative or NaN amount, or host counts that contradict
            (negative, or more healthy than total).
    """
    _check_amounts("callers_per_az", callers_per_az)
    _check_amounts("healthy_capacity_per_az", healthy_capacity_per_az)
    if not 0 <= healthy_hosts <= total_hosts:
        raise ValueError(
            f"need 0 <= healthy_hosts <= total_hosts, got {healthy_hosts}/{total_hosts}"
        )
    up = _shares(healthy_capacity_per_az)
    # Panic first, as Envoy checks it before locality (isHostSetInPanic).
    if total_hosts > 0 and healthy_hosts / total_hosts < config.panic_threshold:
        return ZonePlan(ZoneMode.PANIC)
    spread = ZonePlan(ZoneMode.ALL_ZONES, _ordered(local_az, up))
    loc = _shares(callers_per_az)
    if (
        healthy_hosts < config.min_cluster_size
        or len(up) < 2
        or not local_az
        or local_az not in loc
    ):
        return spread
    up_local = up.get(local_az, 0.0)
    loc_local = loc[local_az]
    if up_local >= loc_local:
        return ZonePlan(ZoneMode.ALL_LOCAL, ((local_az, 1.0),))
    local_pct = up_local / loc_local  # < 1; 0 when the local zone has no healthy capacity
    residual = {z: max(0.0, f - loc.get(z, 0.0)) for z, f in up.items() if z != local_az}
    total_residual = sum(residual.values())
    if total_residual <= 0:
        # Cannot happen with exact shares (the residuals sum to at least
        # loc[local] - up[local] > 0); guards against rounding. Spill by capacity.
        residual = {z: f for z, f in up.items() if z != local_az}
        total_residual = sum(residual.values())
    spill = 1.0 - local_pct
    out = {z: spill * r / total_residual for z, r in residual.items()}
    out[local_az] = local_pct
    return ZonePlan(ZoneMode.LOCAL_PCT, _ordered(local_az, out))

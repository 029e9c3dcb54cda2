"""Queries over the catalog: instances of a service, filtered and health-aware."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._catalog import Catalog
from ._model import CheckState, Health, Node, ServiceInstance

__all__ = ["InstanceView", "healthy_instances", "service_instances", "service_names"]


@dataclass(frozen=True, slots=True)
class InstanceView:
    """A service instance with its node and health, as queries return it."""

    node: Node
    instance: ServiceInstance
    checks: tuple[CheckState, ...]
    health: Health
    node_live: bool

    @property
    def address(self) -> str:
        return self.instance.address or self.node.address

    @property
    def weight(self) -> int:
        """Balancing weight for the current health (0 when critical)."""
        if self.health is Health.PASSING:
            return self.instance.weight
        if self.health is Health.WARNING:
            return self.instance.weight_warning
        return 0


def service_names(catalog: Catalog) -> dict[str, list[str]]:
    """service name -> sorted union of its instances' tags (Consul's /v1/catalog/services)."""
    out: dict[str, set[str]] = {}
    for rec in catalog:
        if rec.left:
            continue
        for svc in rec.services:
            out.setdefault(svc.name, set()).update(svc.tags)
    return {name: sorted(tags) for name, tags in sorted(out.items())}


def service_instances(
    catalog: Catalog,
    service: str,
    *,
    tags: Iterable[str] = (),
    az: str | None = None,
) -> list[InstanceView]:
    """Every instance of ``service`` (any health) having all ``tags``, in ``az`` if given.

    Sorted by (node, instance id) so that results are stable.
    """
    wanted = frozenset(tags)
    out = []
    for rec in catalog:
        if rec.left or (az is not None and rec.node.az != az):
            continue
        for svc in rec.services:
            if svc.name != service or not wanted.issubset(svc.tags):
                continue
            checks = tuple(rec.checks_for(svc.id))
            out.append(
                InstanceView(
                    node=rec.node,
                    instance=svc,
                    checks=checks,
                    health=Health.worst(c.status for c in checks),
                    node_live=catalog.node_live(rec.node.name),
                )
            )
    out.sort(key=lambda v: (v.node.name, v.instance.id))
    return out


def healthy_instances(
    catalog: Catalog,
    service: str,
    *,
    tags: Sequence[str] = (),
    az: str | None = None,
    prefer_az: str | None = None,
    passing_only: bool = False,
) -> list[InstanceView]:
    """Healthy instances: no critical check, live node; warning only if not ``passing_only``.

    ``az`` filters strictly. ``prefer_az`` keeps only the instances in that AZ
    when at least one of them is healthy, else returns all healthy ones (the
    same-AZ preference of ``<service>.svc.mesh``).
    """
    allowed = (Health.PASSING,) if passing_only else (Health.PASSING, Health.WARNING)
    healthy = [
        v
        for v in service_instances(catalog, service, tags=tags, az=az)
        if v.node_live and v.health in allowed
    ]
    if prefer_az:
        local = [v for v in healthy if v.node.az == prefer_az]
        if local:
            return local
    return healthy

"""The catalog's data model: nodes, service instances, checks and node records.

Each node owns one :class:`NodeRecord`, versioned by ``(generation, version)``:
``generation`` is persisted by the agent and bumped on every start, ``version``
bumps on every change. Records are immutable values; merging keeps the larger
pair (see :mod:`hostmesh.catalog._catalog`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "DEFAULT_INBOUND_PORT",
    "EXTERNAL_META",
    "GOSSIP_PORT_META",
    "INBOUND_PORT_META",
    "CheckState",
    "Health",
    "Node",
    "NodeRecord",
    "ServiceInstance",
    "record_from_json",
    "record_to_json",
]


#: Node meta key an agent sets to its gossip port when that is not the default
#: (7946): the leader server probes a reported death there (server/_health.py).
GOSSIP_PORT_META = "gossip_port"
#: Node meta key an agent sets to its inbound mTLS port when that is not the
#: default: other agents dial it there for this node's instances.
INBOUND_PORT_META = "inbound_port"
DEFAULT_INBOUND_PORT = 4141
#: Node meta marking a record the servers own for an external service (no agent:
#: its instances are dialled directly; consul-esm's ``external-node``).
EXTERNAL_META = "external-node"


class Health(enum.Enum):
    """A check's (or an instance's aggregated) status, as Consul names it."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _HEALTH_RANK[self]

    @staticmethod
    def worst(states: Any) -> Health:
        """The worst of an iterable of Health; PASSING when empty."""
        out = Health.PASSING
        for state in states:
            if _HEALTH_RANK[state] > _HEALTH_RANK[out]:
                out = state
        return out


_HEALTH_RANK = {Health.PASSING: 0, Health.WARNING: 1, Health.CRITICAL: 2}


@dataclass(frozen=True, slots=True)
class Node:
    """A host running an agent (or an external node registered on a server)."""

    name: str
    address: str
    az: str = ""
    region: str = ""
    datacenter: str = "dc1"
    meta: Mapping[str, str] = field(default_factory=dict)
    id: str = ""  # a UUID the agent makes once and keeps in its data dir (Consul's node ID)


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One instance of a service on a node."""

    id: str
    name: str
    address: str  # "" = the node's address
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1  # balancing and SRV weight while passing
    weight_warning: int = 1  # weight while warning
    user: str = ""  # Unix user owning the workload (identity)


@dataclass(frozen=True, slots=True)
class CheckState:
    """The last known state of one check; ``service_id`` "" is a node-level check."""

    id: str
    name: str
    status: Health
    service_id: str = ""
    output: str = ""
    kind: str = ""  # http, tcp, script, ttl
    notes: str = ""


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """Everything one node says about itself, at one ``(generation, version)``.

    ``left`` makes the record a node tombstone (graceful leave or
    deregistration): it carries no services and is garbage collected by the
    catalog once older than the tombstone TTL. ``removed`` holds instance
    tombstones ``(instance id, wall time removed)`` so that a reader of a
    delta learns what went away; the owner drops them after the TTL.
    """

    node: Node
    generation: int
    version: int
    services: tuple[ServiceInstance, ...] = ()
    checks: tuple[CheckState, ...] = ()
    removed: tuple[tuple[str, float], ...] = ()
    left: bool = False
    stamp: float = 0.0  # wall time the owner made this version (tombstone GC age)

    @property
    def key(self) -> tuple[int, int]:
        """The merge key: the larger pair wins."""
        return (self.generation, self.version)

    def service(self, instance_id: str) -> ServiceInstance | None:
        for svc in self.services:
            if svc.id == instance_id:
                return svc
        return None

    def checks_for(self, instance_id: str) -> list[CheckState]:
        """Node-level checks plus the instance's own checks."""
        return [c for c in self.checks if c.service_id in ("", instance_id)]

    def health_of(self, instance_id: str) -> Health:
        return Health.worst(c.status for c in self.checks_for(instance_id))

    def digest(self) -> bytes:
        """A canonical hash of the content: the tie-break for equal keys."""
        return hashlib.sha256(
            json.dumps(record_to_json(self), sort_keys=True, separators=(",", ":")).encode()
        ).digest()

    def bump(self, **changes: Any) -> NodeRecord:
        """The next version of this record with ``changes`` applied."""
        return replace(self, version=self.version + 1, **changes)


def record_to_json(rec: NodeRecord) -> dict[str, Any]:
    """A JSON-ready dict (used for persistence, digests and the wire)."""
    n = rec.node
    return {
        "node": {
            "name": n.name,
            "address": n.address,
            "az": n.az,
            "region": n.region,
            "datacenter": n.datacenter,
            "meta": dict(n.meta),
            "id": n.id,
        },
        "generation": rec.generation,
        "version": rec.version,
        "services": [
            {
                "id": s.id,
                "name": s.name,
                "address": s.address,
                "port": s.port,
                "tags": list(s.tags),
                "meta": dict(s.meta),
                "weight": s.weight,
                "weight_warning": s.weight_warning,
                "user": s.user,
            }
            for s in rec.services
        ],
        "checks": [
            {
                "id": c.id,
                "name": c.name,
                "status": c.status.value,
                "service_id": c.service_id,
                "output": c.output,
                "kind": c.kind,
                "notes": c.notes,
            }
            for c in rec.checks
        ],
        "removed": [[i, t] for i, t in rec.removed],
        "left": rec.left,
        "stamp": rec.stamp,
    }


def record_from_json(data: Any) -> NodeRecord:
    """Parse :func:`record_to_json` output.

    Raises:
        ValueError: the data is not a well-formed record.
    """
    try:
        data = _obj(data)
        n = _obj(data["node"])
        node = Node(
            name=_str(n["name"]),
            address=_str(n["address"]),
            az=_str(n.get("az", "")),
            region=_str(n.get("region", "")),
            datacenter=_str(n.get("datacenter", "dc1")),
            meta=_strmap(n.get("meta", {})),
            id=_str(n.get("id", "")),
        )
        services = tuple(
            ServiceInstance(
                id=_str(s["id"]),
                name=_str(s["name"]),
                address=_str(s.get("address", "")),
                port=_int(s["port"]),
                tags=tuple(_str(t) for t in _list(s.get("tags", []))),
                meta=_strmap(s.get("meta", {})),
                weight=_int(s.get("weight", 1)),
                weight_warning=_int(s.get("weight_warning", 1)),
                user=_str(s.get("user", "")),
            )
            for s in map(_obj, _list(data.get("services", [])))
        )
        checks = tuple(
            CheckState(
                id=_str(c["id"]),
                name=_str(c.get("name", "")),
                status=Health(c["status"]),
                service_id=_str(c.get("service_id", "")),
                output=_str(c.get("output", "")),
                kind=_str(c.get("kind", "")),
                notes=_str(c.get("notes", "")),
            )
            for c in map(_obj, _list(data.get("checks", [])))
        )
        removed = tuple(_removed(r) for r in _list(data.get("removed", [])))
        left = data.get("left", False)
        if not isinstance(left, bool):
            raise ValueError("left must be a boolean")
        return NodeRecord(
            node=node,
            generation=_int(data["generation"]),
            version=_int(data["version"]),
            services=services,
            checks=checks,
            removed=removed,
            left=left,
            stamp=_float(data.get("stamp", 0.0)),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed node record: {exc!r}") from None


def _obj(v: Any) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError(f"expected an object, got {type(v).__name__}")
    return v


def _list(v: Any) -> list[Any] | tuple[Any, ...]:
    if not isinstance(v, list | tuple):
        raise ValueError(f"expected a list, got {type(v).__name__}")
    return v


def _removed(v: Any) -> tuple[str, float]:
    if not isinstance(v, list | tuple) or len(v) != 2:
        raise ValueError("expected an [instance id, time] pair")
    return _str(v[0]), _float(v[1])


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {type(v).__name__}")
    return v


def _float(v: Any) -> float:
    """A finite number (JSON may write a whole float as an integer)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number, got {type(v).__name__}")
    try:
        out = float(v)
    except OverflowError:
        raise ValueError("number out of range") from None
    if not math.isfinite(out):
        raise ValueError(f"expected a finite number, got {out!r}")
    return out


def _strmap(v: Any) -> dict[str, str]:
    if not isinstance(v, Mapping):
        raise ValueError("expected an object")
    return {_str(k): _str(x) for k, x in v.items()}

"""The agent's own node record and the registrations behind it.

:class:`LocalState` owns this node's :class:`NodeRecord`: every registration,
deregistration or check status change makes the next ``version`` and merges
it into the catalog. The generation is persisted in the data dir and bumped on
every start, so a restarted agent's records supersede its old ones. Service
registrations made through the API are persisted (``services.json``) and come
back after a restart; ``services.d`` definitions come from their files.

Sans-IO except for the small files in the data dir; clocks are passed in.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from hostmesh._config import ServiceDefinition
from hostmesh._errors import ConfigError, NotFoundError, ValidationError
from hostmesh.catalog import Catalog, CheckState, Health, Node, NodeRecord, ServiceInstance

from ._consul import service_from_consul, service_to_consul

__all__ = ["SOURCE_API", "LocalState", "Registration", "atomic_write"]

#: Registrations made through the HTTP API (persisted); file ones are "file:<path>".
SOURCE_API = "api"
#: At most this many service instances on one node (a bound on a hostile client).
MAX_LOCAL_SERVICES = 4096


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class Registration:
    """A service on this node and where its definition came from."""

    definition: ServiceDefinition
    source: str  # SOURCE_API or "file:<path>"


class LocalState:
    """This node's registrations, check states and record.

    Args:
        node: this node (name, address, AZ...); its ``id`` is filled from the data dir.
        data_dir: created if missing; holds ``node-id``, ``generation``, ``services.json``.
        catalog: the catalog every new version of our record is merged into.
        wall_clock: wall time for tombstone stamps (``time.time`` in production).
        tombstone_ttl: seconds an instance tombstone is kept in our record.
        on_change: called after every new version of our record (wakes blocking queries).
    """

    def __init__(
        self,
        node: Node,
        data_dir: Path,
        catalog: Catalog,
        wall_clock: Callable[[], float],
        tombstone_ttl: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._dir = data_dir
        self._on_change = on_change
        self._catalog = catalog
        self._clock = wall_clock
        self._ttl = tombstone_ttl
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(str(data_dir), "data_dir", exc.strerror or str(exc)) from None
        node_id = self._load_node_id()
        generation = self._bump_generation()
        self.registrations: dict[str, Registration] = {}
        self._checks: dict[str, CheckState] = {}
        self._removed: dict[str, float] = {}
        self.record = NodeRecord(
            node=replace(node, id=node_id),
            generation=generation,
            version=1,
            stamp=wall_clock(),
        )
        catalog.merge(self.record)

    # --- persistence ------------------------------------------------------------

    def _load_node_id(self) -> str:
        path = self._dir / "node-id"
        try:
            text = path.read_text().strip()
            return str(uuid.UUID(text))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), "", f"unreadable node id: {exc}") from None
        node_id = str(uuid.uuid4())
        atomic_write(path, node_id.encode() + b"\n")
        return node_id

    def _bump_generation(self) -> int:
        path = self._dir / "generation"
        try:
            previous = int(path.read_text().strip())
        except FileNotFoundError:
            previous = 0
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), "", f"unreadable generation: {exc}") from None
        generation = previous + 1
        atomic_write(path, f"{generation}\n".encode())
        return generation

    @property
    def _services_file(self) -> Path:
        return self._dir / "services.json"

    def load_persisted(self) -> list[ServiceDefinition]:
        """The API registrations saved by an earlier run.

        Raises:
            ConfigError: the file exists but cannot be read or parsed.
        """
        path = self._services_file
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), "", f"unreadable registrations: {exc}") from None
        if not isinstance(data, list):
            raise ConfigError(str(path), "", "expected a JSON list of registrations")
        out = []
        for i, item in enumerate(data):
            try:
                out.append(service_from_consul(item))
            except ValidationError as exc:
                raise ConfigError(str(path), f"[{i}]", str(exc)) from None
        return out

    def _persist(self) -> None:
        regs = [
            service_to_consul(r.definition)
            for r in self.registrations.values()
            if r.source == SOURCE_API
        ]
        atomic_write(self._services_file, json.dumps(regs, indent=1).encode())

    # --- changes ----------------------------------------------------------------

    def _commit(self) -> None:
        now = self._clock()
        self._removed = {i: t for i, t in self._removed.items() if now - t <= self._ttl}
        services = tuple(
            ServiceInstance(
                id=d.id,
                name=d.name,
                address=d.address,
                port=d.port,
                tags=d.tags,
                meta=d.meta,
                weight=d.weight,
                weight_warning=d.weight_warning,
                user=d.user,
            )
            for d in (r.definition for r in sorted(self.registrations.values(),
                                                    key=lambda r: r.definition.id))
        )  # fmt: skip
        self.record = self.record.bump(
            services=services,
            checks=tuple(sorted(self._checks.values(), key=lambda c: c.id)),
            removed=tuple(sorted(self._removed.items())),
            stamp=now,
        )
        self._catalog.merge(self.record)
        self._on_change()

    def register(self, defn: ServiceDefinition, source: str) -> None:
        """Add or replace the instance ``defn.id``.

        Checks keep their status when the same check id is registered again
        (Consul does the same), new checks start at their initial status.

        Raises:
            ValidationError: too many services, or a check id owned by another instance.
        """
        if defn.id not in self.registrations and len(self.registrations) >= MAX_LOCAL_SERVICES:
            raise ValidationError(f"at most {MAX_LOCAL_SERVICES} services per node")
        new_ids = {defn.check_id(i) for i in range(len(defn.checks))}
        for check_id in new_ids:
            owner = self._checks.get(check_id)
            if owner is not None and owner.service_id != defn.id:
                raise ValidationError(
                    f"check id {check_id!r} already belongs to service {owner.service_id!r}"
                )
        self._drop_checks(defn.id, keep=new_ids)
        previous = self.registrations.get(defn.id)
        old_defs = (
            {previous.definition.check_id(i): c for i, c in enumerate(previous.definition.checks)}
            if previous
            else {}
        )
        for i, check in enumerate(defn.checks):
            check_id = defn.check_id(i)
            # An unchanged check keeps its status; a changed one starts over,
            # in step with the runner that replaces it.
            old = self._checks.get(check_id) if old_defs.get(check_id) == check else None
            self._checks[check_id] = CheckState(
                id=check_id,
                name=defn.check_name(i),
                status=old.status if old else Health(check.status),
                service_id=defn.id,
                output=old.output if old else "",
                kind=check.kind,
                notes=check.notes,
            )
        self.registrations[defn.id] = Registration(defn, source)
        self._removed.pop(defn.id, None)
        self._commit()
        if source == SOURCE_API:
            self._persist()

    def deregister(self, instance_id: str) -> Registration:
        """Remove an instance and its checks, leaving a tombstone.

        Raises:
            NotFoundError: no such instance.
        """
        reg = self.registrations.pop(instance_id, None)
        if reg is None:
            raise NotFoundError(f'Unknown service ID "{instance_id}"')
        self._drop_checks(instance_id, keep=set())
        self._removed[instance_id] = self._clock()
        self._commit()
        if reg.source == SOURCE_API:
            self._persist()
        return reg

    def _drop_checks(self, instance_id: str, keep: set[str]) -> None:
        for check_id in [
            c.id for c in self._checks.values() if c.service_id == instance_id and c.id not in keep
        ]:
            del self._checks[check_id]

    def check(self, check_id: str) -> CheckState:
        """Raises NotFoundError for an unknown check id."""
        state = self._checks.get(check_id)
        if state is None:
            raise NotFoundError(f'Unknown check ID "{check_id}"')
        return state

    def set_check(self, check_id: str, status: Health, output: str) -> bool:
        """Record a check result; a new record version only when something changed."""
        old = self._checks.get(check_id)
        if old is None or (old.status is status and old.output == output):
            return False
        self._checks[check_id] = CheckState(
            id=old.id,
            name=old.name,
            status=status,
            service_id=old.service_id,
            output=output,
            kind=old.kind,
            notes=old.notes,
        )
        self._commit()
        return True

    def set_node_meta(self, key: str, value: str) -> None:
        """Set one node meta entry (a new version of our record when it changes)."""
        node = self.record.node
        if node.meta.get(key) == value:
            return
        self.record = replace(self.record, node=replace(node, meta={**node.meta, key: value}))
        self._commit()

    def leave(self) -> NodeRecord:
        """Make our record a node tombstone (graceful leave); returns it."""
        self.record = self.record.bump(services=(), checks=(), left=True, stamp=self._clock())
        self._catalog.merge(self.record)
        return self.record

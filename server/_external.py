"""External services: the leader health-checks services that have no agent.

An external service (a managed database, a vendor endpoint) is registered on a
server: ``PUT /v1/catalog/external/<id>`` stores a services.d service plus
``az`` and ``region`` under ``catalog/external/<id>`` (server/_api.py). The
leader runs its checks with the agent's own
:class:`~hostmesh.agent._checks.CheckRunner` (Consul's HTTP and TCP rules,
``success_before_passing`` / ``failures_before_critical``, timeouts, the 4 KB
output cap) and publishes the result as a node record, so agents see the
instances through sync like any other: in DNS, the health API and the proxy.

- One synthetic node per external service, ``external-<id>`` (Consul's
  "external nodes", as consul-esm keeps them): its address is the service's,
  so ``external-<id>.node.mesh`` resolves to it; its AZ is the service's (the
  DNS same-AZ preference and the proxy's zone-aware balancing read a node's
  AZ); a check change rewrites one small record. Its meta carries
  ``external-node = "true"`` and ``external-id``; a record at that key
  without the marker (an agent that took the name) is never overwritten.
- Records are written with :meth:`SyncHub.merge_record` (the catalog's merge
  under compare-and-swap, as for agents' records), each as the next
  ``(generation, version)`` of the stored one: a new leader continues where
  the last one stopped. The first record of a node takes the wall clock in
  seconds as its generation, so a service registered again after its
  tombstone was collected supersedes every copy an agent may still hold.
- Deleting the definition turns the record into a tombstone (``left``, as a
  graceful leave), which every agent applies in any order and which leaves
  DNS at once; the leader's reaper of left nodes (server/_health.py) then
  deletes the key, as after an agent's leave. Records of services deleted
  while no leader ran are tombstoned when the next leader starts.
- A new leader starts each check from the status in the stored record, so a
  leader change does not flap healthy services to critical.

Script checks are refused (by the API, and here for anything stored before
that rule): they would run an argv of the API caller's choosing on a server,
as the user that holds the CA's root key and the store credentials, turning
a management token into a shell on the server. TTL checks are refused too: a
TTL check is fed by updates from the service's own agent, and an external
service has none, so it could only ever expire.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from hostmesh._config import ServiceDefinition, from_mapping, parse_hostport
from hostmesh._errors import Compacted, HostmeshError, StoreError, ValidationError
from hostmesh._log import get_logger
from hostmesh._metrics import Registry
from hostmesh._pki import validate_node_name
from hostmesh.agent._checks import CheckRunner
from hostmesh.catalog import CheckState, Health, Node, NodeRecord, ServiceInstance
from hostmesh.catalog._codec import DecodeError, decode_record
from hostmesh.catalog._model import EXTERNAL_META
from hostmesh.catalog._syncproto import NODES_PREFIX

from ._store import Store

__all__ = [
    "EXTERNAL_META",
    "EXTERNAL_NODE_PREFIX",
    "EXTERNAL_PREFIX",
    "REFUSED_CHECK_KINDS",
    "ExternalChecks",
    "check_targets",
    "external_node_name",
    "parse_external",
]

log = get_logger("hostmesh.server.external")

EXTERNAL_PREFIX = "catalog/external/"
#: Synthetic node names are ``external-<id>``.
EXTERNAL_NODE_PREFIX = "external-"
#: Check kinds never run for an external service (see the module docstring).
REFUSED_CHECK_KINDS = {
    "script": "script checks are not run for external services: a server would run"
    " an argv of the API caller's choosing (use an http or tcp check)",
    "ttl": "TTL checks are fed by the service's own agent and an external service has"
    " none (use an http or tcp check)",
}
#: EC2's IPv6 instance metadata endpoint (fd00:ec2::254) is not link-local.
_METADATA_NET = ipaddress.ip_network("fd00:ec2::254/128")
#: Publishing rounds lost to a concurrent writer before waiting for the next change.
PUBLISH_ATTEMPTS = 8
#: s between attempts after a store error (doubling up to the max).
RETRY_MIN, RETRY_MAX = 0.2, 5.0


def external_node_name(ident: str) -> str:
    """The synthetic node of external service ``ident``.

    Raises:
        ValidationError: ``external-<id>`` is not a node name (one DNS label).
    """
    return validate_node_name(EXTERNAL_NODE_PREFIX + ident)


def check_targets(defn: ServiceDefinition) -> None:
    """Refuse an address or check target in link-local space: 169.254.169.254 and
    fd00:ec2::254 are EC2's instance metadata service, whose answers (the server's IAM
    credentials among them) an HTTP check would put in its output, which every agent
    gets. A name is not resolved here (it may resolve anywhere later).

    Raises:
        ValidationError: naming the field.
    """
    targets = [("address", defn.address)]
    for i, check in enumerate(defn.checks):
        if check.http:
            targets.append((f"checks[{i}].http", urllib.parse.urlsplit(check.http).hostname or ""))
        elif check.tcp:
            targets.append((f"checks[{i}].tcp", parse_hostport(check.tcp)[0].strip("[]")))
    for name, host in targets:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.is_link_local or ip in _METADATA_NET:
            raise ValidationError(
                f"{name}: {host} is link-local (the instance metadata service's range);"
                " the server does not probe it"
            )


def parse_external(value: bytes, ident: str) -> tuple[ServiceDefinition, str, str]:
    """A stored external service: its definition, AZ and region.

    Raises:
        ValidationError: the value is not a valid external service.
    """
    try:
        body = json.loads(value)
    except ValueError as exc:
        raise ValidationError(f"external service {ident!r}: not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValidationError(f"external service {ident!r}: not a JSON object")
    az, region = body.pop("az", ""), body.pop("region", "")
    if not isinstance(az, str) or not isinstance(region, str):
        raise ValidationError(f"external service {ident!r}: az and region must be strings")
    try:
        defn = from_mapping(ServiceDefinition, body, source=f"external service {ident}")
    except HostmeshError as exc:
        raise ValidationError(str(exc)) from None
    if defn.id != ident or not defn.address:
        raise ValidationError(f"external service {ident!r}: wrong id or no address")
    check_targets(defn)
    return defn, az, region


def _is_ours(record: NodeRecord) -> bool:
    return record.node.meta.get(EXTERNAL_META) == "true"


def _same_content(a: NodeRecord, b: NodeRecord) -> bool:
    return (a.node, a.services, a.checks, a.left) == (b.node, b.services, b.checks, b.left)


@dataclass(eq=False)
class _External:
    """One external service being checked: its definition and its checks' states."""

    ident: str
    value: bytes  # the stored definition, to tell a change from a replay
    defn: ServiceDefinition
    az: str
    region: str
    states: dict[str, CheckState] = field(default_factory=dict)
    dirty: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def node(self) -> str:
        return EXTERNAL_NODE_PREFIX + self.ident

    def changed(self) -> None:
        self.dirty.set()


class ExternalChecks:
    """The leader's duty: run every external service's checks and publish them.

    Args:
        store: the server's store (not closed here).
        merge: writes a record by the catalog's merge rule and returns whether the
            store took it: the server's ``SyncHub.merge_record``.
        metrics: where the counters go.
        wall_clock: wall time for record stamps and generations.

    :meth:`run` is the duty: the server runs it under
    ``LeaderElection.run_while_leader``, which cancels it when leadership is lost.
    """

    def __init__(
        self,
        store: Store,
        merge: Callable[[NodeRecord], Awaitable[bool]],
        *,
        metrics: Registry | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.merge = merge
        self.wall_clock = wall_clock
        self._running: dict[str, _External] = {}
        self._nursery: trio.Nursery | None = None
        m = metrics or Registry()
        self.m_published = m.counter(
            "hostmesh_external_records_total",
            "External services' node records written by the leader, by kind"
            " (update, tombstone; refused: an agent's record holds the name)",
            ("kind",))  # fmt: skip
        self.m_invalid = m.counter(
            "hostmesh_external_invalid_total",
            "Stored external services not checked because they do not parse")  # fmt: skip
        m.gauge_func("hostmesh_external_services", "External services the leader checks",
                     lambda: len(self._running))  # fmt: skip

    # --- the duty -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check every external service until cancelled; started once the definitions
        stored now are running."""
        retry = RETRY_MIN
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    try:
                        start = await self._reconcile()
                        task_status.started()
                        task_status = trio.TASK_STATUS_IGNORED
                        await self._follow(start)
                    except Compacted:
                        log.warning("external services watch fell behind: reloading")
                    except StoreError as exc:
                        log.warning("external services watch failed; retrying",
                                    error=str(exc), retry=f"{retry:g}s")  # fmt: skip
                        await trio.sleep(retry)
                        retry = min(2 * retry, RETRY_MAX)
                    else:
                        retry = RETRY_MIN
        finally:
            self._nursery = None
            self._running.clear()

    async def _reconcile(self) -> int:
        """Bring the running set in line with the store; returns the revision to watch from."""
        revision = await self.store.current_revision()
        stored = {
            e.key.removeprefix(EXTERNAL_PREFIX): e.value
            for e in await self.store.list(EXTERNAL_PREFIX)
        }
        for ident in [i for i in self._running if i not in stored]:
            await self._undefine(ident)
        await self._tombstone_orphans(set(stored))  # before any publisher runs
        for ident, value in stored.items():
            await self._define(ident, value)
        return revision + 1

    async def _follow(self, start: int) -> None:
        async with self.store.watch(EXTERNAL_PREFIX, start) as events:
            async for event in events:
                ident = event.entry.key.removeprefix(EXTERNAL_PREFIX)
                if event.kind == "put":
                    await self._define(ident, event.entry.value)
                else:
                    await self._undefine(ident)

    async def _define(self, ident: str, value: bytes) -> None:
        """Start (or restart, when its definition changed) one service's checks."""
        old = self._running.get(ident)
        if old is not None and old.value == value:
            return  # a replay of what runs already
        try:
            external_node_name(ident)
            defn, az, region = parse_external(value, ident)
        except ValidationError as exc:
            self.m_invalid.inc()
            log.warning("external service not checked", id=ident, error=str(exc))
            if old is not None:
                await self._undefine(ident)
            return
        ext = _External(ident, value, defn, az, region)
        if old is not None:
            await self._stop(old)
            # An unchanged check keeps its status (as an agent does on re-registration).
            before = {old.defn.check_id(i): c for i, c in enumerate(old.defn.checks)}
            for i, check in enumerate(defn.checks):
                check_id = defn.check_id(i)
                if before.get(check_id) == check and check_id in old.states:
                    ext.states[check_id] = old.states[check_id]
        self._running[ident] = ext
        assert self._nursery is not None
        self._nursery.start_soon(self._serve, ext)

    async def _undefine(self, ident: str) -> None:
        ext = self._running.pop(ident, None)
        if ext is None:
            return
        await self._stop(ext)
        await self._tombstone(ext.node)

    @staticmethod
    async def _stop(ext: _External) -> None:
        """Cancel a service's checks and wait until its publisher wrote its last record."""
        ext.scope.cancel()
        await ext.done.wait()

    # --- one external service -------------------------------------------------------

    async def _stored(self, node: str) -> tuple[NodeRecord | None, bool]:
        """The stored record of ``node`` (None if absent or broken) and whether it is ours
        (True too when there is none)."""
        entry = await self.store.get(NODES_PREFIX + node)
        if entry is None:
            return None, True
        try:
            record = decode_record(entry.value)
        except DecodeError:
            return None, True  # a broken value loses to any valid record
        return record, _is_ours(record)

    async def _serve(self, ext: _External) -> None:
        try:
            with ext.scope:
                await self._checks(ext)
        finally:
            ext.done.set()

    async def _checks(self, ext: _External) -> None:
        defn = ext.defn
        stored, _ = await self._retrying(lambda: self._stored(ext.node))
        previous = {c.id: c for c in stored.checks} if stored is not None else {}
        runners = []
        for i, check in enumerate(defn.checks):
            check_id = defn.check_id(i)
            state = ext.states.get(check_id)
            if state is None:
                kept = previous.get(check_id)
                status = kept.status if kept is not None and kept.kind == check.kind else None
                state = CheckState(
                    id=check_id,
                    name=defn.check_name(i),
                    status=status or Health(check.status),
                    service_id=defn.id,
                    output=kept.output if status is not None and kept is not None else "",
                    kind=check.kind,
                    notes=check.notes,
                )
            refused = REFUSED_CHECK_KINDS.get(check.kind)
            if refused is not None:
                state = replace(state, status=Health.CRITICAL, output=refused)
            else:
                runners.append(
                    CheckRunner(
                        check_id, replace(check, status=state.status.value), self._on_change(ext)
                    )
                )
            ext.states[check_id] = state
        async with trio.open_nursery() as nursery:
            for runner in runners:
                nursery.start_soon(runner.run)
            while True:
                ext.dirty = trio.Event()
                await self._retrying(lambda: self._publish(ext))
                await ext.dirty.wait()

    @staticmethod
    def _on_change(ext: _External) -> Callable[[str, Health, str], None]:
        def on_change(check_id: str, status: Health, output: str) -> None:
            ext.states[check_id] = replace(ext.states[check_id], status=status, output=output)
            ext.changed()

        return on_change

    async def _retrying(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """``fn()``, again after a growing pause while the store fails."""
        retry = RETRY_MIN
        while True:
            try:
                return await fn()
            except StoreError as exc:
                log.warning("external services: store error; retrying", error=str(exc),
                            retry=f"{retry:g}s")  # fmt: skip
                await trio.sleep(retry)
                retry = min(2 * retry, RETRY_MAX)

    def _record(self, ext: _External) -> NodeRecord:
        """The record's content (its version is set when written)."""
        d = ext.defn
        node = Node(
            name=ext.node,
            address=d.address,
            az=ext.az,
            region=ext.region,
            meta={EXTERNAL_META: "true", "external-id": ext.ident},
        )
        instance = ServiceInstance(
            id=d.id, name=d.name, address=d.address, port=d.port, tags=d.tags, meta=d.meta,
            weight=d.weight, weight_warning=d.weight_warning,
        )  # fmt: skip
        checks = tuple(sorted(ext.states.values(), key=lambda c: c.id))
        return NodeRecord(node, 0, 0, services=(instance,), checks=checks)

    async def _write(self, wanted: NodeRecord, kind: str) -> None:
        """Write ``wanted``'s content as the next version of the stored record, unless
        it is there already or the name belongs to an agent."""
        name = wanted.node.name
        for _ in range(PUBLISH_ATTEMPTS):
            stored, ours = await self._stored(name)
            if not ours:
                self.m_published.labels("refused").inc()
                log.warning("external service not published: an agent's node has its name",
                            node=name)  # fmt: skip
                return
            if stored is not None and _same_content(stored, wanted):
                return
            now = self.wall_clock()
            if stored is not None:
                generation, version = stored.generation, stored.version + 1
            else:
                generation, version = max(1, math.floor(now)), 1
            record = replace(wanted, generation=generation, version=version, stamp=now)
            if await self.merge(record):
                self.m_published.labels(kind).inc()
                return
        log.warning("external service record: lost every round to other writers", node=name)

    async def _publish(self, ext: _External) -> None:
        await self._write(self._record(ext), "update")

    async def _tombstone(self, node: str) -> None:
        stored, ours = await self._retrying(lambda: self._stored(node))
        if stored is None or not ours or stored.left:
            return
        wanted = replace(stored, services=(), checks=(), removed=(), left=True)
        await self._retrying(lambda: self._write(wanted, "tombstone"))

    # --- records left behind --------------------------------------------------------

    async def _tombstone_orphans(self, defined: set[str]) -> None:
        """Tombstone our live records whose definition is gone (deleted while no leader
        ran). Called by :meth:`_reconcile` before it starts publishers, so that none of
        them writes the same node meanwhile."""
        for entry in await self.store.list(NODES_PREFIX + EXTERNAL_NODE_PREFIX):
            try:
                record = decode_record(entry.value)
            except DecodeError:
                continue
            ident = record.node.meta.get("external-id", "")
            if _is_ours(record) and not record.left and ident not in defined:
                await self._tombstone(record.node.name)

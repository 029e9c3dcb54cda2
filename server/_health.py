"""The leader's node-health duties: confirm gossip-reported deaths, reap, force-leave.

Agents report the nodes their gossip saw die; the sync hub keeps each report
at ``catalog/dead/<node>`` with ``"confirmed": false``, and agents ignore it
until it is confirmed (one agent's view must not take a node out of every
agent's DNS). The leader, and only the leader, decides:

- **confirm or refute**: it connects to the node's gossip port (TCP, the port
  every agent listens on for memberlist-style push-pull) from its own
  vantage point. No connection after :attr:`HealthConfig.probe_attempts`
  tries of :attr:`HealthConfig.probe_timeout`: the report is confirmed
  (``confirmed: true``, ``confirmed_at``, under compare-and-swap); agents
  then mark the node dead and its instances leave DNS and the proxy. A
  connection: the node is alive, the report is deleted (counted as refuted).
- **reap**: a node confirmed dead for :attr:`HealthConfig.reap_after` is
  deleted from ``catalog/nodes/`` and ``catalog/dead/``; agents forget it.
- **graceful leave**: a record with ``left`` set (the agent's tombstone) is
  removed at once.

``force_leave`` (``POST /v1/agent/force-leave/<node>``, any server) writes the
node's tombstone and removes it, for a node that will not come back and is
not (yet) confirmed dead.

The decisions are plain functions of the stored values and ``now``
(server/_deaths.py); :class:`NodeHealth` is the Trio adapter the leader runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from hostmesh._errors import NotFoundError, StoreError
from hostmesh._log import get_logger
from hostmesh._metrics import Registry
from hostmesh.catalog import NodeRecord
from hostmesh.catalog._codec import DecodeError, decode_record, encode_record
from hostmesh.catalog._syncproto import DEAD_PREFIX, NODES_PREFIX

from ._deaths import Action, parse_report, probe_target, report_action
from ._store import Entry, Event, Store

if TYPE_CHECKING:
    from hostmesh._config import HealthConfig

__all__ = ["MAX_PROBES", "NodeHealth", "force_leave", "tcp_probe"]

log = get_logger("hostmesh.server.health")

#: Probes run at once: a partition may report hundreds of nodes together; each
#: probe is one socket for at most probe_attempts x probe_timeout.
MAX_PROBES = 64
#: Compare-and-swap rounds for force-leave's tombstone (an agent writing at once).
CAS_ATTEMPTS = 8
#: s between full scans of catalog/nodes/ for left records (between them, the
#: store watch reports every changed record).
FULL_SCAN_INTERVAL = 5 * 60.0
#: s a sweep waits after the first change wakes it, so that changes arriving
#: together (a partition's reports, a burst of records) take one sweep.
BATCH_DELAY = 0.05
#: s between retries when the store fails during a sweep (doubling to the max).
RETRY_MIN, RETRY_MAX = 0.5, 10.0


async def tcp_probe(
    host: str,
    port: int,
    *,
    connect_timeout: float,
    attempts: int,
    pause: float,
) -> bool:
    """True when a TCP connection to ``host:port`` succeeds in one of ``attempts`` tries.

    A refused connection (the host is up, no agent listens) fails a try at once; an
    unreachable host fails it after ``connect_timeout``. Tries are ``pause`` apart, so a node
    whose accept queue is briefly full (a CPU spike) is not declared dead.
    """
    for attempt in range(attempts):
        with trio.move_on_after(connect_timeout):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                pass
            else:
                await stream.aclose()
                return True
        if attempt + 1 < attempts:
            await trio.sleep(pause)
    return False


def _decode(entry: Entry | None) -> NodeRecord | None:
    if entry is None:
        return None
    try:
        return decode_record(entry.value)
    except DecodeError:
        return None


async def force_leave(store: Store, node: str, *, now: float | None = None) -> NodeRecord:
    """Mark ``node`` left (a tombstone every agent merges) and remove it from the catalog.

    Returns the tombstone written.

    Raises:
        NotFoundError: the catalog has no record of ``node``.
        StoreError: the store failed, or CAS_ATTEMPTS rounds all lost.
    """
    key = NODES_PREFIX + node
    stamp = time.time() if now is None else now
    for _ in range(CAS_ATTEMPTS):
        entry = await store.get(key)
        if entry is None:
            await store.delete(DEAD_PREFIX + node)
            raise NotFoundError(f"no node {node!r} in the catalog")
        record = _decode(entry)
        if record is None:  # a broken value: nothing to tombstone, just remove it
            await store.delete(key, cas=entry.mod_revision)
            await store.delete(DEAD_PREFIX + node)
            raise NotFoundError(f"node {node!r} had an unreadable record; it was removed")
        tomb = replace(record.bump(services=(), checks=(), removed=(), left=True), stamp=stamp)
        rev = await store.put(key, encode_record(tomb), cas=entry.mod_revision)
        if rev is None:
            continue
        await store.delete(key, cas=rev)  # a newer record (the node is back) stays
        await store.delete(DEAD_PREFIX + node)
        return tomb
    raise StoreError(f"{key}: {CAS_ATTEMPTS} compare-and-swap rounds lost")


class NodeHealth:
    """The leader's death confirmations and reaping; :meth:`run` runs while leader.

    Args:
        store: the server's store (not closed here).
        config: the ``[health]`` section.
        server: this server's name (``confirmed_by`` in confirmed reports).
        metrics: where the counters go.
        wall_clock: wall time for ``confirmed_at`` (it must survive a leader change).
        probe: ``(host, port) -> alive``; the TCP probe by default.
    """

    def __init__(
        self,
        store: Store,
        config: HealthConfig,
        *,
        server: str = "",
        metrics: Registry | None = None,
        wall_clock: Callable[[], float] = time.time,
        probe: Callable[[str, int], Awaitable[bool]] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.server = server
        self.wall_clock = wall_clock
        self.probe = probe or self._tcp_probe
        self._limiter = trio.CapacityLimiter(MAX_PROBES)
        self._dirty: dict[str, Entry] = {}  # node -> its record's latest change, unswept
        self._reports_due = True  # a report changed: decide them on the next sweep
        self._reports_at = -math.inf  # trio time when the reports are next looked at
        self._full_scan_at = -math.inf
        self._wake = trio.Event()
        metrics = metrics or Registry()
        self.m_deaths = metrics.counter(
            "hostmesh_server_deaths_total",
            "Gossip death reports decided by the leader's probe: confirmed (no answer) or"
            " refuted (the node answered).",
            ("outcome",),
        )
        self.m_reaped = metrics.counter(
            "hostmesh_server_nodes_reaped_total",
            "Nodes removed from the catalog: dead (confirmed dead for reap_after), left"
            " (graceful leave), force_leave.",
            ("reason",),
        )

    async def _tcp_probe(self, host: str, port: int) -> bool:
        cfg = self.config
        return await tcp_probe(host, port, connect_timeout=cfg.probe_timeout,
                               attempts=cfg.probe_attempts, pause=cfg.probe_pause)  # fmt: skip

    async def force_leave(self, node: str) -> NodeRecord:
        """:func:`force_leave`, counted."""
        tomb = await force_leave(self.store, node, now=self.wall_clock())
        self.m_reaped.labels("force_leave").inc()
        log.warning("node force-left", node=node)
        return tomb

    # --- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Sweep whenever the catalog changes and when a reap comes due. Never returns;
        store failures are logged and retried."""
        self._full_scan_at = self._reports_at = -math.inf
        async with trio.open_nursery() as nursery:
            await nursery.start(self._watch)
            retry = RETRY_MIN
            while True:
                try:
                    await self.sweep()
                    retry = RETRY_MIN
                    wake_at = min(self._reports_at, self._full_scan_at)
                except StoreError as exc:
                    log.warning("health sweep failed; retrying", error=str(exc))
                    self._reports_due = True
                    wake_at = trio.current_time() + retry
                    retry = min(2 * retry, RETRY_MAX)
                with trio.move_on_at(wake_at):
                    await self._wake.wait()
                    await trio.sleep(BATCH_DELAY)  # changes arriving together: one sweep
                self._wake = trio.Event()

    async def _watch(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Wake the sweep on every change under catalog/ (reports and records)."""
        retry = RETRY_MIN
        started = False
        while True:
            try:
                async with self.store.watch("catalog/") as events:
                    if not started:
                        task_status.started()
                        started = True
                    retry = RETRY_MIN
                    async for event in events:
                        self._note(event)
            except StoreError as exc:
                log.warning("health watch failed; retrying", error=str(exc))
                self._full_scan_at = self._reports_at = -math.inf  # changes may have been missed
                self._wake.set()
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(retry)
                retry = min(2 * retry, RETRY_MAX)

    def _note(self, event: Event) -> None:
        key = event.entry.key
        if event.kind != "put":
            return
        if key.startswith(NODES_PREFIX):
            self._dirty[key.removeprefix(NODES_PREFIX)] = event.entry  # the latest one
            self._wake.set()
        elif key.startswith(DEAD_PREFIX):
            self._reports_due = True
            self._wake.set()

    async def sweep(self) -> None:
        """Remove left nodes among the changed records (all records on the first sweep
        and every FULL_SCAN_INTERVAL); decide every death report when one changed or a
        reap may be due (at least every ``sweep_interval``)."""
        now_trio = trio.current_time()
        if now_trio >= self._full_scan_at:
            self._full_scan_at = now_trio + FULL_SCAN_INTERVAL
            self._dirty.clear()
            changed = await self.store.list(NODES_PREFIX)
        else:
            changed = [self._dirty[n] for n in sorted(self._dirty)]
            self._dirty.clear()
        for entry in changed:
            record = _decode(entry)
            if record is not None and record.left:
                await self._remove_left(record.node.name, entry)
        if self._reports_due or now_trio >= self._reports_at:
            self._reports_due = False
            self._reports_at = now_trio + await self._decide_reports()

    async def _decide_reports(self) -> float:
        """Act on every death report; returns the seconds until the next reap is due (at
        most ``sweep_interval``)."""
        delay = self.config.sweep_interval
        now = self.wall_clock()
        async with trio.open_nursery() as nursery:
            for report_entry in await self.store.list(DEAD_PREFIX):
                node = report_entry.key.removeprefix(DEAD_PREFIX)
                rec_entry = await self.store.get(NODES_PREFIX + node)
                record = _decode(rec_entry)
                report = parse_report(report_entry.value)
                action = report_action(report, record, now, self.config.reap_after)
                if action is Action.DROP:
                    await self.store.delete(report_entry.key, cas=report_entry.mod_revision)
                elif action is Action.REMOVE:
                    assert rec_entry is not None
                    await self._remove_left(node, rec_entry)
                elif action is Action.PROBE:
                    assert record is not None
                    nursery.start_soon(self._decide, node, record, report_entry)
                elif action is Action.REAP:
                    assert rec_entry is not None
                    await self._reap(node, rec_entry, report_entry)
                else:
                    assert report is not None
                    due = report.confirmed_at + self.config.reap_after - now
                    delay = min(delay, max(0.0, due))
        return delay

    async def _decide(self, node: str, record: NodeRecord, report: Entry) -> None:
        """Probe one reported node; confirm or refute its report (under cas)."""
        target = probe_target(record, self.config.gossip_port)
        async with self._limiter:
            alive = target is not None and await self.probe(*target)
        try:
            if alive:
                if await self.store.delete(report.key, cas=report.mod_revision):
                    self.m_deaths.labels("refuted").inc()
                    log.info("death report refuted: the node answered", node=node,
                             target=f"{target[0]}:{target[1]}" if target else "")  # fmt: skip
                return
            doc = json.loads(report.value)
            doc.update(confirmed=True, confirmed_at=self.wall_clock(), confirmed_by=self.server)
            body = json.dumps(doc, separators=(",", ":")).encode()
            if await self.store.put(report.key, body, cas=report.mod_revision) is not None:
                self.m_deaths.labels("confirmed").inc()
                where = f"{target[0]}:{target[1]}" if target else "no address"
                log.warning("node confirmed dead", node=node, target=where)
                self._reports_due = True  # the next sweep plans its reap
                self._wake.set()
        except StoreError as exc:  # decided again on the next sweep
            log.warning("could not store a death decision", node=node, error=str(exc))

    async def _reap(self, node: str, record: Entry, report: Entry) -> None:
        if await self.store.delete(record.key, cas=record.mod_revision):
            self.m_reaped.labels("dead").inc()
            log.warning("dead node reaped", node=node, reap_after=f"{self.config.reap_after:g}s")
        with contextlib.suppress(StoreError):
            await self.store.delete(report.key, cas=report.mod_revision)

    async def _remove_left(self, node: str, record: Entry) -> None:
        if await self.store.delete(record.key, cas=record.mod_revision):
            self.m_reaped.labels("left").inc()
            log.info("node left: removed from the catalog", node=node)
        await self.store.delete(DEAD_PREFIX + node)

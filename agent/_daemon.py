"""The agent daemon: wires local state, health checks and the local API.

:class:`Agent` owns the catalog, this node's :class:`LocalState`, one
:class:`CheckRunner` task per check, and the listeners. ``Agent.run`` binds
every listener, then reports :class:`AgentAddresses` through ``task_status``
and runs until cancelled.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from hostmesh._config import (
    AgentConfig,
    CheckDefinition,
    ServiceDefinition,
    load_service_file,
    parse_hostport,
)
from hostmesh._errors import CertificateError, ConfigError, HostmeshError, NotFoundError
from hostmesh._httpserver import HttpLimits, serve_http
from hostmesh._log import get_logger
from hostmesh._metrics import Registry
from hostmesh._systemd import notifier
from hostmesh.catalog import Catalog, Health, Node
from hostmesh.catalog._gossip import DEFAULT_PORT, GossipNode, UdpTcpTransport
from hostmesh.catalog._keyring import Keyring
from hostmesh.catalog._model import DEFAULT_INBOUND_PORT, GOSSIP_PORT_META, INBOUND_PORT_META
from hostmesh.catalog._swim import Swim
from hostmesh.dns import DnsCore, Recursor, recursor_addresses, serve_dns

from ._checks import CheckRunner
from ._identity import IdentityMap
from ._intentions import Intentions
from ._proxy import Proxy
from ._routing import Router, build_snapshot
from ._state import SOURCE_API, LocalState, Registration, atomic_write
from ._sync import SyncClient, TrustBundle
from ._tcpproxy import serve_tcp_upstream

if TYPE_CHECKING:
    import ssl

    import httpx

    from hostmesh._routes import TrafficPolicy
    from hostmesh.catalog._syncproto import Applied

    from ._certs import CertificateManager, NodeCertificate
    from ._inbound import InboundProxy, LocalInstance
    from ._mtls import MeshTls

__all__ = ["LIVE_CONFIG", "Agent", "AgentAddresses"]

#: agent.toml settings a SIGHUP applies to a running agent; the others (the
#: listeners' addresses, the node's identity, the data dir, ...) need a restart.
LIVE_CONFIG = frozenset({"traffic"})

log = get_logger("hostmesh.agent")

#: s between routing snapshot rebuilds; a burst of gossip changes is one rebuild.
ROUTE_REFRESH_MIN_INTERVAL = 0.05
#: s a graceful leave waits for its tombstone to go out to the connected server
#: (one websocket message; the rest of the leave, gossip's, follows either way).
LEAVE_SYNC_TIMEOUT = 2.0


@dataclass(frozen=True)
class AgentAddresses:
    """Where a running agent listens (what ``nursery.start(agent.run)`` returns)."""

    api: tuple[str, int]
    dns: tuple[str, int]
    gossip: str  # host:port, UDP and TCP
    proxy: tuple[str, int] = ("", 0)  # outbound HTTP proxy
    inbound: tuple[str, int] = ("", 0)  # inbound mTLS listener (("", 0): not running)
    upstreams: tuple[tuple[str, int], ...] = ()  # TCP upstream listeners, in config order

    @property
    def api_url(self) -> str:
        host, port = self.api
        return f"http://{host}:{port}"


class Agent:
    """One host's agent.

    Args:
        config: the agent's configuration.
        wall_clock: wall time for record stamps (tests may pin it).
        http_transport: transport for HTTP checks (tests may inject one).
        sync_tls: returns the SSL context with this node's certificate for the
            server sync (agent/_certs.py); with ``servers`` configured, sync
            retries until this is set (also later, as ``agent.sync_tls``).
        node_certificate: this node's certificate, given (tests); otherwise an
            agent with ``servers`` gets and renews one itself. Either turns on
            the mTLS hop: the inbound listener, remote instances reached through
            their agents, workload identities and intentions.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
        http_transport: httpx.AsyncBaseTransport | None = None,
        sync_tls: Callable[[], ssl.SSLContext] | None = None,
        load_config: Callable[[], AgentConfig] | None = None,
        node_certificate: NodeCertificate | None = None,
    ) -> None:
        self.config = config
        self._load_config = load_config  # re-reads agent.toml on SIGHUP; None: no file
        self._wall_clock = wall_clock
        self.catalog = Catalog()
        self.metrics = Registry()
        self._changed = trio.Event()
        self._http_transport = http_transport
        self._runners: dict[str, tuple[CheckRunner, trio.CancelScope, ServiceDefinition]] = {}
        self._nursery: trio.Nursery | None = None
        self.ready = False
        self.addresses: AgentAddresses | None = None
        self.state = LocalState(
            Node(
                name=config.node_name,
                address=config.address,
                az=config.az,
                region=config.region,
                datacenter=config.datacenter,
                meta=config.meta,
            ),
            Path(config.data_dir),
            self.catalog,
            wall_clock,
            config.tombstone_ttl,
            on_change=self._local_change,
        )
        self.gossip: GossipNode | None = None
        self.dns = self._make_dns()
        self.router = Router(self.metrics)
        self.proxy = Proxy(config.proxy, self.router, domain=config.dns.domain)
        self._register_proxy_metrics()
        self.keyring = self._load_keyring()
        self.sync_tls = sync_tls
        self.certificates: CertificateManager | None = None  # the node certificate, if we join
        self.trust = TrustBundle()  # CA roots and revocations pushed by the servers
        self._synced_traffic: dict[str, TrafficPolicy] = {}  # config/traffic/<service>
        self.node_certificate = node_certificate
        self.intentions = Intentions()  # the servers' (sync); allow-all before any
        self._identities = IdentityMap(config.node_name)
        self.mesh: MeshTls | None = None
        self.inbound: InboundProxy | None = None
        if config.servers or node_certificate is not None:
            self._enable_mesh()
        self.sync: SyncClient | None = None
        if config.servers:
            self.sync = SyncClient(
                config, self.catalog, lambda: self.state.record, self._sync_context,
                on_change=self._on_sync_change, metrics=self.metrics,
            )  # fmt: skip
        self._m_check_changes = self.metrics.counter(
            "hostmesh_check_status_changes_total", "Check status changes by new status", ("status",)
        )
        self._m_reaped = self.metrics.counter(
            "hostmesh_services_reaped_total",
            "Services deregistered by DeregisterCriticalServiceAfter",
        )
        self._m_reloads = self.metrics.counter(
            "hostmesh_reloads_total", "services.d reloads by result", ("result",)
        )
        self.metrics.gauge_func(
            "hostmesh_catalog_index", "The catalog's change index", lambda: self.catalog.index
        )
        self.metrics.gauge_func(
            "hostmesh_catalog_nodes", "Nodes in the catalog", lambda: len(self.catalog.nodes())
        )
        self.metrics.gauge_func(
            "hostmesh_local_services",
            "Service instances registered on this node",
            lambda: len(self.state.registrations),
        )
        for status in Health:
            self.metrics.gauge_func(
                f"hostmesh_local_checks_{status.value}",
                f"Local checks currently {status.value}",
                functools.partial(self._count_checks, status),
            )

    def _enable_mesh(self) -> None:
        """The mTLS hop: inbound listener, remote instances through their agents,
        identities and intentions on the outbound proxy."""
        from ._inbound import InboundProxy
        from ._mtls import MeshTls

        cfg = self.config
        self.mesh = MeshTls(self.node_credentials, self.trust)
        proxy = self.proxy
        proxy.node = cfg.node_name
        proxy.mesh = self.mesh
        proxy.identify = self._identify
        proxy.identify_now = self._identify_now
        proxy.intentions = self._current_intentions
        bind = cfg.inbound.bind or (
            f"[{cfg.address}]:{DEFAULT_INBOUND_PORT}" if ":" in cfg.address
            else f"{cfg.address}:{DEFAULT_INBOUND_PORT}"
        )  # fmt: skip
        inbound_cfg = replace(cfg.proxy, bind=bind, max_connections=cfg.inbound.max_connections,
                              header_timeout=cfg.inbound.handshake_timeout)  # fmt: skip
        self.inbound = InboundProxy(
            inbound_cfg, self.router, node=cfg.node_name, mesh=self.mesh, catalog=self.catalog,
            local=self._local_instance, intentions=self._current_intentions,
            registry=self.metrics,
        )  # fmt: skip
        stats = self.inbound.stats
        self.metrics.counter_func(
            "hostmesh_inbound_refused_total",
            "Connections and requests the inbound listener refused, by reason", ("reason",),
            lambda: {(k,): v for k, v in stats.refused.items()})  # fmt: skip
        self.metrics.gauge_func(
            "hostmesh_inbound_open_connections", "Connections from other agents open on :4141",
            lambda: stats.open_connections)  # fmt: skip

    def node_credentials(self) -> NodeCertificate | None:
        if self.node_certificate is not None:
            return self.node_certificate
        return self.certificates.current if self.certificates is not None else None

    def _current_intentions(self) -> Intentions:
        return self.intentions

    def _identify(self, peer: tuple[str, int], local: tuple[str, int]) -> str:
        """A local client's workload identity from /proc (blocking: run in a thread). The
        proxy asks this only when :meth:`_identify_now` found no netlink here."""
        return self._identities.identify(peer, local, netlink=False).name

    def _identify_now(self, peer: tuple[str, int], local: tuple[str, int]) -> str | None:
        """The same by netlink only (no blocking read); None when netlink is not here."""
        found = self._identities.identify_now(peer, local)
        return None if found is None else found.name

    def _refresh_identities(self) -> None:
        defs = [reg.definition for reg in self.state.registrations.values()]
        self._identities = found = IdentityMap.from_services(defs, self.config.node_name)
        for user in sorted(found.ambiguous):
            log.warning("user runs several services: its connections get the host identity",
                        user=user)  # fmt: skip
        for user in sorted(found.unknown_users):
            log.warning("service user unknown to this system", user=user)

    def _local_instance(self, instance_id: str) -> LocalInstance | None:
        from ._inbound import LocalInstance

        reg = self.state.registrations.get(instance_id)
        if reg is None:
            return None
        d = reg.definition
        # No address of its own: on loopback (a service bound to 127.0.0.1 is then
        # reachable from other hosts only through the mesh).
        return LocalInstance(d.id, d.name, d.address or "127.0.0.1", d.port)

    async def renew_certificate(self) -> NodeCertificate:
        """Renew the node certificate now (``PUT /v1/agent/certificate/renew``): after a
        ``ca rotate``, or to test a rotation under load.

        Raises:
            CertificateError: this agent has no servers or no certificate yet.
            AuthError: the server refused.
        """
        if self.certificates is None or self.certificates.current is None:
            raise CertificateError("this agent has no node certificate from a server to renew")
        return await self.certificates.renew()

    def _register_proxy_metrics(self) -> None:
        stats = self.proxy.stats
        self.metrics.gauge_func(
            "hostmesh_proxy_open_connections", "Client connections open on the proxy",
            lambda: stats.open_connections)  # fmt: skip
        self.metrics.gauge_func(
            "hostmesh_proxy_upstream_connections", "Connections open to instances (pooled, busy "
            "and tunnels)", lambda: stats.upstream_connections)  # fmt: skip
        self.metrics.counter_func(
            "hostmesh_proxy_refused_total",
            "Requests the proxy answered with its own error, by reason", ("reason",),
            lambda: {(k,): v for k, v in stats.refused.items()})  # fmt: skip
        self.metrics.gauge_func(
            "hostmesh_proxy_connections_refused", "Client connections refused over max_connections",
            lambda: stats.connections_refused)  # fmt: skip
        self.metrics.counter_func(
            "hostmesh_tcp_upstream_events_total",
            "TCP upstream connections, connect failures and refusals, by service", ("service",
            "event"), lambda: {(svc, k): v for svc, c in self.router.tcp.items()
                               for k, v in c.items()})  # fmt: skip

    def _sync_context(self) -> ssl.SSLContext:
        if self.sync_tls is None:
            raise CertificateError("no node certificate for the server sync yet")
        return self.sync_tls()

    def _on_sync_change(self, applied: Applied) -> None:
        """A server sent catalog, config or CA changes (or they were loaded from disk)."""
        from hostmesh._config import from_mapping
        from hostmesh._routes import TrafficPolicy

        assert self.sync is not None
        if applied.config:
            traffic: dict[str, TrafficPolicy] = {}
            for service, doc in self.sync.traffic_documents().items():
                try:
                    if not isinstance(doc, dict):
                        raise TypeError(f"expected a table, got {type(doc).__name__}")
                    traffic[service] = from_mapping(
                        TrafficPolicy, doc, source=f"config/traffic/{service}"
                    )
                except (ConfigError, TypeError) as exc:
                    log.warning("pushed traffic policy refused", service=service, error=str(exc))
                    if service in self._synced_traffic:  # keep the last good one
                        traffic[service] = self._synced_traffic[service]
            self._synced_traffic = traffic
        if applied.ca:
            self.trust.update(*self.sync.trust())
        if applied.config:
            self.intentions = self.sync.intentions()
        if applied.config:
            self.refresh_routes()  # the catalog index did not move: rebuild now
        if applied.config or applied.catalog:
            self.notify()

    def refresh_routes(self) -> None:
        """Rebuild the routing snapshot from the catalog and the traffic config (the
        agent's own ``[traffic]``, with the servers' ``config/traffic/<service>`` over it)."""
        self.router.update(
            build_snapshot(
                self.catalog,
                {**self.config.traffic, **self._synced_traffic},
                self.config.az,
                version=self.catalog.index,
                only_passing=self.config.dns.only_passing,
            )
        )

    async def _route_updates(self) -> None:
        """Keep the routing snapshot in step with the catalog (at most every 50 ms)."""
        while True:
            if self.router.snapshot.version != self.catalog.index:
                self.refresh_routes()
            await self._changed.wait()
            await trio.sleep(ROUTE_REFRESH_MIN_INTERVAL)

    @property
    def keyring_path(self) -> Path:
        return Path(self.config.gossip.keyring_file or Path(self.config.data_dir) / "keyring.json")

    def _load_keyring(self) -> Keyring:
        """The keyring file (written by keyring changes) wins over the config's keys."""
        cfg = self.config.gossip
        path = self.keyring_path
        try:
            keys = json.loads(path.read_text())
        except FileNotFoundError:
            keys = list(cfg.keyring)
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), "", f"unreadable keyring: {exc}") from None
        try:
            return Keyring.from_base64(keys, label=cfg.label)
        except (HostmeshError, TypeError, ValueError) as exc:
            raise ConfigError(str(path), "keyring", str(exc)) from None

    def _save_keyring(self, keyring: Keyring) -> None:
        """Keep the keyring as rotated, so a restart uses the current keys."""
        atomic_write(self.keyring_path, json.dumps(keyring.to_base64()).encode())
        log.info("keyring changed", keys=len(keyring.keys))

    def _make_dns(self) -> tuple[DnsCore, Recursor]:
        cfg = self.config.dns
        bind = parse_hostport(cfg.bind)
        resolv_text = None
        if cfg.resolv_conf and not cfg.recursors:
            try:
                resolv_text = Path(cfg.resolv_conf).read_text()
            except OSError as exc:
                log.warning("no recursors: cannot read resolv.conf", path=cfg.resolv_conf,
                            error=exc.strerror or str(exc))  # fmt: skip
        servers = recursor_addresses(cfg.recursors, resolv_text, bind)
        core = DnsCore(cfg, self.catalog, local_az=self.config.az, ns_address=bind[0],
                       has_recursors=bool(servers))  # fmt: skip
        latency = self.metrics.histogram(
            "hostmesh_dns_recursor_seconds", "Recursor round trips by result", ("result",),
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )  # fmt: skip
        recursor = Recursor(
            servers,
            cfg.recursor_timeout,
            cfg.max_recursions,
            lambda seconds, result: latency.labels(result).observe(seconds),
        )
        stats = core.stats
        self.metrics.counter_func(
            "hostmesh_dns_queries_total", "DNS answers by query type and rcode",
            ("qtype", "rcode"), lambda: stats.answers,
        )  # fmt: skip
        self.metrics.counter_func(
            "hostmesh_dns_dropped_total", "DNS packets dropped or connections closed, by reason",
            ("reason",), lambda: {(k,): v for k, v in stats.dropped.items()},
        )  # fmt: skip
        self.metrics.counter_func(
            "hostmesh_dns_cache_total", "Answer cache lookups by result", ("result",),
            lambda: {("hit",): stats.hits, ("miss",): stats.misses},
        )  # fmt: skip
        self.metrics.gauge_func(
            "hostmesh_dns_cache_hit_ratio", "Answer cache hits / lookups since start",
            lambda: stats.hits / max(1, stats.hits + stats.misses),
        )  # fmt: skip
        return core, recursor

    def _count_checks(self, status: Health) -> int:
        return sum(1 for c in self.state.record.checks if c.status is status)

    # --- change notification (blocking queries) ---------------------------------

    def _local_change(self) -> None:
        """Our record has a new version: gossip it and wake blocking queries."""
        if self.gossip is not None:
            self.gossip.swim.record_changed(self.state.record)
        self.notify()

    def notify(self) -> None:
        """Wake everything waiting for the catalog to change."""
        self._changed.set()
        self._changed = trio.Event()
        if self.sync is not None:
            self.sync.poke()  # our record or gossip's dead nodes may be news for the server

    async def wait_for_index(self, min_index: int, wait: float) -> None:
        """Return once ``catalog.index > min_index`` or after ``wait`` seconds."""
        with trio.move_on_after(wait):
            while self.catalog.index <= min_index:
                await self._changed.wait()

    # --- registrations ----------------------------------------------------------

    def register(self, defn: ServiceDefinition, source: str = SOURCE_API) -> None:
        """Register (or replace) a local service and (re)start its check runners.

        Raises:
            ValidationError: the registration conflicts with another.
        """
        self.state.register(defn, source)
        if self.mesh is not None:
            self._refresh_identities()
        wanted = {defn.check_id(i): c for i, c in enumerate(defn.checks)}
        for check_id, (runner, scope, owner) in list(self._runners.items()):
            if owner.id == defn.id and wanted.get(check_id) != runner.definition:
                scope.cancel()
                del self._runners[check_id]
        for check_id, check in wanted.items():
            if check_id not in self._runners:
                self._start_runner(check_id, check, defn)
        log.info("service registered", id=defn.id, service=defn.name, source=source)

    def deregister(self, instance_id: str) -> Registration:
        """Raises NotFoundError for an unknown instance id."""
        reg = self.state.deregister(instance_id)
        if self.mesh is not None:
            self._refresh_identities()
        for check_id, (_runner, scope, owner) in list(self._runners.items()):
            if owner.id == instance_id:
                scope.cancel()
                del self._runners[check_id]
        log.info("service deregistered", id=instance_id, service=reg.definition.name)
        return reg

    def runner(self, check_id: str) -> CheckRunner:
        """Raises NotFoundError for an unknown check id."""
        entry = self._runners.get(check_id)
        if entry is None:
            raise NotFoundError(f'Unknown check ID "{check_id}"')
        return entry[0]

    def _on_check_change(self, check_id: str, status: Health, output: str) -> None:
        if check_id in self._runners and self.state.set_check(check_id, status, output):
            self._m_check_changes.labels(status.value).inc()
            log.info("check status", check=check_id, status=status.value)

    def _start_runner(
        self, check_id: str, check: CheckDefinition, owner: ServiceDefinition
    ) -> None:
        assert self._nursery is not None, "register() before run()"
        runner = CheckRunner(
            check_id, check, self._on_check_change, http_transport=self._http_transport
        )
        scope = trio.CancelScope()
        self._runners[check_id] = (runner, scope, owner)

        async def run() -> None:
            with scope:
                await runner.run()

        self._nursery.start_soon(run)

    # --- services.d -------------------------------------------------------------

    def _read_services_dir(self) -> dict[str, tuple[ServiceDefinition, str]]:
        """Parse every ``*.toml`` in the services dir; all or nothing.

        Raises:
            ConfigError: the first bad file, key and reason.
        """
        root = Path(self.config.services_dir)
        found: dict[str, tuple[ServiceDefinition, str]] = {}
        if not root.is_dir():
            return found
        for path in sorted(root.glob("*.toml")):
            for defn in load_service_file(path):
                if defn.id in found:
                    raise ConfigError(
                        str(path), "id", f"instance id {defn.id!r} is also defined in "
                        f"{found[defn.id][1].removeprefix('file:')}"
                    )  # fmt: skip
                found[defn.id] = (defn, f"file:{path}")
        return found

    def reload(self) -> None:
        """Re-read services.d (SIGHUP): add, change and remove file services.

        A bad file leaves every registration as it was and is logged.
        """
        try:
            wanted = self._read_services_dir()
        except ConfigError as exc:
            self._m_reloads.labels("error").inc()
            log.error("reload failed, keeping the running services", error=str(exc))
            return
        for reg in list(self.state.registrations.values()):
            if reg.source.startswith("file:") and reg.definition.id not in wanted:
                self.deregister(reg.definition.id)
        for defn, source in wanted.values():
            current = self.state.registrations.get(defn.id)
            if current is None or current.definition != defn or current.source != source:
                self.register(defn, source)
        self._m_reloads.labels("ok").inc()
        log.info("reloaded services", files=len({s for _, s in wanted.values()}))

    # --- tasks ------------------------------------------------------------------

    async def _reap_critical(self) -> None:
        """Deregister services whose check stayed critical past its
        DeregisterCriticalServiceAfter (Consul checks every 30 s); GC tombstones."""
        while True:
            await trio.sleep(self.config.check_reap_interval)
            if self.catalog.gc(self._wall_clock(), self.config.tombstone_ttl):
                self.notify()
            now = trio.current_time()
            doomed = set()
            for runner, _scope, owner in self._runners.values():
                after = runner.definition.deregister_critical_service_after
                since = runner.critical_since
                if after > 0 and since is not None and now - since >= after:
                    doomed.add(owner.id)
            for instance_id in doomed:
                if instance_id in self.state.registrations:
                    self.deregister(instance_id)
                    self._m_reaped.inc()
                    log.warning("deregistered critical service", id=instance_id)

    async def _start_gossip(self, nursery: trio.Nursery) -> str:
        """Bind the gossip sockets, start SWIM and join the seeds in the background."""
        cfg = self.config.gossip
        host, port = parse_hostport(cfg.bind or f"{self.config.address}:{DEFAULT_PORT}")
        transport = UdpTcpTransport(host, port)
        nursery.start_soon(_close_on_cancel, transport)
        addr = await transport.bind()
        bound_port = parse_hostport(addr)[1]
        if bound_port != DEFAULT_PORT:  # where the servers' death probe must knock
            self.state.set_node_meta(GOSSIP_PORT_META, str(bound_port))
        swim = Swim(
            cfg, self.config.node_name, addr, self.catalog, now=trio.current_time(),
            meta={"az": self.config.az, "region": self.config.region},
        )  # fmt: skip
        swim.record_changed(self.state.record)
        self.gossip = GossipNode(swim, transport, self.keyring, on_change=self.notify,
                                 on_keyring_change=self._save_keyring)  # fmt: skip
        await nursery.start(self.gossip.run)
        if cfg.seeds:
            nursery.start_soon(self._join, cfg.seeds)
        return addr

    async def _join(self, seeds: tuple[str, ...]) -> None:
        assert self.gossip is not None
        cfg = self.config.gossip
        reached = await self.gossip.join(seeds, retries=cfg.join_retries, backoff=cfg.join_backoff)
        log.info("joined", seeds_reached=reached, members=self.gossip.swim.num_live)

    async def drain(self) -> None:
        """Graceful stop, first step: the proxy stops accepting and finishes its
        requests in flight, for up to ``proxy.drain_timeout``. DNS and the API
        keep answering meanwhile; TCP upstream connections are cut at exit."""
        timeout = self.config.proxy.drain_timeout
        open_before = self.proxy.stats.open_connections
        log.info("draining", connections=open_before, timeout=f"{timeout:g}s")
        with trio.move_on_after(timeout):
            if self.inbound is not None:
                self.inbound.begin_drain()  # callers see a refused connect: they go elsewhere
            await self.proxy.drain()
            if self.inbound is not None:
                await self.inbound.drain()
        left = self.proxy.stats.open_connections
        if self.proxy.drained:
            log.info("drained", connections=open_before)
        else:
            log.warning("drain timed out", connections_left=left)

    async def leave(self) -> None:
        """Graceful leave: tombstone our record and tell the cluster (best effort)."""
        record = self.state.leave()
        if self.sync is not None and self.sync.connected is not None:
            # The servers remove a node that left at once, once its tombstone reaches them.
            self.sync.poke()
            with trio.move_on_after(LEAVE_SYNC_TIMEOUT):
                await self.sync.wait_sent(record.key)
        if self.gossip is not None:
            self.gossip.swim.record_changed(record)
            await self.gossip.leave()
        log.info("left the cluster", node=self.config.node_name)

    async def _reload_on_sighup(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()  # from here a SIGHUP reloads instead of killing us
            async for _ in signals:
                notifier().reloading("reloading agent.toml and services.d")
                self.reload_config()
                log.info("SIGHUP: reloading services.d")
                self.reload()
                notifier().ready(self._status_line())

    def reload_config(self) -> None:
        """Re-read agent.toml (SIGHUP): apply what may change live, name the rest.

        :data:`LIVE_CONFIG` sections take effect at once (routes and splits
        without a dropped connection); a change anywhere else (addresses,
        ports, node name, data dir, ...) is logged as waiting for a restart
        and the running value stays. A file that no longer loads changes
        nothing and is logged with its error.
        """
        if self._load_config is None:
            return
        try:
            new = self._load_config()
        except HostmeshError as exc:
            log.error("SIGHUP: agent.toml not reloaded; the running config stays", error=str(exc))
            return
        if new.az == "auto":  # resolved once, at start (IMDS)
            new = replace(new, az=self.config.az)
        if new.region == "auto":
            new = replace(new, region=self.config.region)
        changed = [f.name for f in fields(AgentConfig)
                   if getattr(new, f.name) != getattr(self.config, f.name)]  # fmt: skip
        live = [name for name in changed if name in LIVE_CONFIG]
        later = [name for name in changed if name not in LIVE_CONFIG]
        self.config = replace(self.config, **{name: getattr(new, name) for name in live})
        if "traffic" in live:
            self.refresh_routes()
        log.info("SIGHUP: agent.toml reloaded", applied=",".join(live) or "-")
        if later:
            log.warning("SIGHUP: agent.toml changes that wait for a restart", keys=",".join(later))

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[AgentAddresses] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start everything, report the bound addresses, run until cancelled.

        Raises:
            ConfigError: a bad services.d file or persisted state at start.
            OSError: a listener could not bind.
        """
        from ._api import AgentApi  # the API module imports this one for types

        files = self._read_services_dir()
        persisted = self.state.load_persisted()
        if self.sync is not None:
            self.sync.load_persisted()  # the last catalog and config: served with no server
        host, port = parse_hostport(self.config.api.bind)
        api = AgentApi(self)
        limits = HttpLimits(
            max_body=self.config.api.max_body,
            max_connections=self.config.api.max_connections,
            header_timeout=self.config.api.header_timeout,
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(notifier().watchdog)  # WATCHDOG=1 while this loop runs
            nursery.start_soon(_notify_stopping_on_exit)
            for defn in persisted:
                self.register(defn, SOURCE_API)
            for defn, source in files.values():
                self.register(defn, source)
            api_addr = await nursery.start(
                functools.partial(serve_http, api.handle, host, port, limits=limits, name="api")
            )
            core, recursor = self.dns
            dns_host, dns_port = parse_hostport(self.config.dns.bind)
            dns_addr = await nursery.start(
                functools.partial(
                    serve_dns, core, dns_host, dns_port, recursor=recursor,
                    tcp_idle_timeout=self.config.dns.tcp_idle_timeout,
                    max_tcp_connections=self.config.dns.max_tcp_connections,
                )
            )  # fmt: skip
            self.refresh_routes()
            nursery.start_soon(self._route_updates)
            proxy_addr = await nursery.start(self.proxy.serve, _listen(self.config.proxy.bind))
            upstream_addrs = []
            for up in self.config.upstream:
                upstream_addrs.append(
                    await nursery.start(
                        functools.partial(
                            serve_tcp_upstream, _listen(up.bind), up, self.proxy,
                            connect_timeout=self.config.proxy.connect_timeout,
                        )
                    )
                )  # fmt: skip
            inbound_addr: tuple[str, int] = ("", 0)
            if self.inbound is not None:
                inbound_addr = await nursery.start(self.inbound.serve,
                                                   _listen(self.inbound.config.bind))  # fmt: skip
                if inbound_addr[1] != DEFAULT_INBOUND_PORT:  # where other agents must dial
                    self.state.set_node_meta(INBOUND_PORT_META, str(inbound_addr[1]))
            nursery.start_soon(self._reap_critical)
            if handle_signals:
                await nursery.start(self._reload_on_sighup)
            gossip_addr = await self._start_gossip(nursery)
            if self.sync is not None and self.sync_tls is None:
                await nursery.start(self._run_certificates)  # kept, or a join in the background
            if self.sync is not None:
                await nursery.start(self.sync.run)  # retries until there is a certificate
            self.addresses = AgentAddresses(
                api=api_addr, dns=dns_addr, gossip=gossip_addr, proxy=proxy_addr,
                inbound=inbound_addr, upstreams=tuple(upstream_addrs),
            )  # fmt: skip
            self.ready = True
            log.info(
                "agent started",
                node=self.config.node_name,
                az=self.config.az or "-",
                generation=self.state.record.generation,
                api=f"{api_addr[0]}:{api_addr[1]}",
                dns=f"{dns_addr[0]}:{dns_addr[1]}",
                proxy=f"{proxy_addr[0]}:{proxy_addr[1]}",
                inbound=f"{inbound_addr[0]}:{inbound_addr[1]}" if inbound_addr[1] else "-",
                gossip=gossip_addr,
                services=len(self.state.registrations),
            )
            notifier().ready(self._status_line())  # systemd: every listener is bound
            task_status.started(self.addresses)

    async def _run_certificates(
        self, *, task_status: trio.TaskStatus[NodeCertificate | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The node certificate (agent/_certs.py): the kept one, else a join with the join
        token, retried; renewed at 2/3 of its life. The sync uses the newest one."""
        from ._certs import CertificateManager

        certs = self.certificates = CertificateManager(self.config)

        def changed(_: NodeCertificate) -> None:
            self.sync_tls = certs.client_context

        await certs.run(on_change=changed, task_status=task_status)

    def _status_line(self) -> str:
        """The systemd STATUS= line of a running agent."""
        a = self.addresses
        if a is None:
            return "starting"
        return (
            f"serving (az {self.config.az or 'none'}): api {a.api[0]}:{a.api[1]}, "
            f"dns {a.dns[0]}:{a.dns[1]}, "
            f"proxy {a.proxy[0]}:{a.proxy[1]}, gossip {a.gossip}, "
            f"{len(self.state.registrations)} services"
        )


def _listen(bind: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 = any free port)."""
    host, port = parse_hostport(bind)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def jittered_wait(wait: float, rand: float) -> float:
    """Consul adds up to wait/16 of random jitter to a blocking query's wait."""
    return wait + math.floor(wait / 16 * rand * 1000) / 1000


async def _notify_stopping_on_exit() -> None:
    """Tell systemd STOPPING=1 when the agent's nursery ends (SIGTERM or a failure)."""
    try:
        await trio.sleep_forever()
    finally:
        notifier().stopping()


async def _close_on_cancel(transport: UdpTcpTransport) -> None:
    """Close the gossip sockets when the agent's nursery is cancelled."""
    try:
        await trio.sleep_forever()
    finally:
        transport.close()

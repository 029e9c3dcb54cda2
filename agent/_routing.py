"""Routing snapshots and the router the proxy asks for an instance.

A :class:`RoutingSnapshot` is immutable: the catalog's instances per service
(healthy and all), each service's traffic policy, the callers per AZ and the
zone plans, built once per catalog or config change and swapped in with one
assignment (so a future worker process can receive it whole). The
:class:`Router` adds the state that must outlive snapshots: per-instance
latency stats, outlier ejection, retry budgets, rate and concurrency limits.

Picking an instance for a request (:meth:`RouteState.pick`):

1. the route's weighted target (subset) among those with a usable instance;
2. the subset's healthy instances, or all of them under the panic threshold;
3. Envoy's zone-aware plan picks a zone (all local when the local AZ has its
   share of capacity);
4. ejected instances and those already tried for this request are left out
   while anything else remains;
5. power of two choices over peak-EWMA latency x outstanding requests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from hostmesh._metrics import CounterChild, Registry
from hostmesh._routes import (
    DEFAULT_POLICY,
    DEFAULT_ROUTE,
    Route,
    RouteMatch,
    Target,
    TrafficPolicy,
    match_route,
    pick_target_among,
)
from hostmesh.catalog import Catalog, Health
from hostmesh.catalog._model import DEFAULT_INBOUND_PORT, EXTERNAL_META, INBOUND_PORT_META
from hostmesh.catalog._query import InstanceView, service_instances

from ._balancer import EndpointStats, StatsTable, pick
from ._http1 import HttpError
from ._resilience import (
    ConcurrencyLimit,
    InstanceState,
    OutlierConfig,
    OutlierDetector,
    RetryBudget,
    TokenBucket,
)
from ._zone import ZoneConfig, ZonePlan, capacity_per_az, plan_zones

__all__ = ["Endpoint", "Lane", "RouteState", "Router", "RoutingSnapshot", "build_snapshot"]

#: Services whose lanes are remembered per snapshot (unknown names asked for
#: are remembered as None, up to this many).
_LANES_CACHED = 4096
#: Latency histogram bounds (s): the proxy's own overhead is sub-millisecond,
#: so the buckets start at 0.5 ms (Prometheus' defaults start at 5 ms).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance as the proxy dials it."""

    id: str  # the instance ID (unique on its node: ids often repeat across nodes)
    host: str
    port: int
    az: str
    node: str
    weight: float  # balancing weight for its health; the configured one in panic
    healthy: bool
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    node_address: str = ""  # where the node's agent listens (inbound mTLS)
    inbound_port: int = DEFAULT_INBOUND_PORT
    external: bool = False  # a server-owned record with no agent: dialled directly
    uid: str = ""  # "<node>/<id>": unique in the catalog; keys balancer and ejection state
    #: (host, port): the connection pool's key. A field made once, not a property: the
    #: express lane reads it per request.
    key: tuple[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.host, self.port))

    @property
    def inbound(self) -> tuple[str, int]:
        """The node agent's inbound listener: the mTLS hop's address for this instance."""
        return (self.node_address, self.inbound_port)


@dataclass(frozen=True)
class _Subset:
    healthy: tuple[Endpoint, ...]
    all: tuple[Endpoint, ...]
    plan: ZonePlan | None  # None in panic: every instance, any zone
    by_zone: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)  # healthy, per AZ
    zoned: bool = False  # the plan picks among zones (not all zones, not panic, not just one)

    @staticmethod
    def of(healthy: tuple[Endpoint, ...], members: tuple[Endpoint, ...],
           plan: ZonePlan | None) -> _Subset:  # fmt: skip
        by_zone: dict[str, tuple[Endpoint, ...]] = {}
        for e in healthy:
            by_zone[e.az] = (*by_zone.get(e.az, ()), e)
        # pick_zone answers None for every draw (all zones, panic) or for none; with
        # healthy instances in one zone only, it can only answer that zone.
        zoned = plan is not None and plan.pick_zone(0.0) is not None and len(by_zone) > 1
        return _Subset(healthy, members, plan, by_zone, zoned)


@dataclass(frozen=True)
class ServiceSnapshot:
    name: str
    policy: TrafficPolicy
    endpoints: tuple[Endpoint, ...]
    subsets: Mapping[Target, _Subset]


@dataclass(frozen=True)
class RoutingSnapshot:
    """What the proxy routes by; replaced whole, never mutated."""

    services: Mapping[str, ServiceSnapshot] = field(default_factory=dict)
    local_az: str = ""
    version: int = 0


def _endpoint(view: InstanceView) -> Endpoint:
    inst = view.instance
    healthy = view.node_live and view.health is not Health.CRITICAL
    return Endpoint(
        id=inst.id,
        host=view.address,
        port=inst.port,
        az=view.node.az,
        node=view.node.name,
        weight=float(view.weight if healthy else max(1, inst.weight)),
        healthy=healthy,
        tags=inst.tags,
        meta=inst.meta,
        node_address=view.node.address,
        inbound_port=_inbound_port(view.node.meta),
        external=view.node.meta.get(EXTERNAL_META) == "true",
        uid=f"{view.node.name}/{inst.id}",
    )


def _inbound_port(meta: Mapping[str, str]) -> int:
    value = meta.get(INBOUND_PORT_META, "")
    if value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    return DEFAULT_INBOUND_PORT


def build_snapshot(
    catalog: Catalog,
    traffic: Mapping[str, TrafficPolicy],
    local_az: str,
    *,
    zone: ZoneConfig | None = None,
    version: int = 0,
    only_passing: bool = False,
) -> RoutingSnapshot:
    """A snapshot of every service in ``catalog`` under ``traffic``'s policies."""
    zone = zone or ZoneConfig()
    callers: dict[str, int] = {}
    for record in catalog:
        if not record.left and catalog.node_live(record.node.name) and record.node.az:
            callers[record.node.az] = callers.get(record.node.az, 0) + 1
    names = {inst.name for record in catalog for inst in record.services}
    services = {}
    for name in names:
        views = service_instances(catalog, name)
        endpoints = tuple(_endpoint(v) for v in views)
        if only_passing:
            endpoints = tuple(
                e if v.health is Health.PASSING or not e.healthy else _unhealthy(e)
                for e, v in zip(endpoints, views, strict=True)
            )
        policy = traffic.get(name, DEFAULT_POLICY)
        # Target() (every instance) backs the default route and TCP upstreams. The
        # default route's own object is the key: found by identity, not compared.
        targets = {DEFAULT_ROUTE.targets[0]} | {t for route in policy.routes for t in route.targets}
        subsets = {}
        for target in targets:
            members = tuple(e for e in endpoints if target.selects(e))
            healthy = tuple(e for e in members if e.healthy and e.weight > 0)
            plan: ZonePlan | None = plan_zones(
                local_az,
                callers,
                capacity_per_az(healthy, lambda e: e.az, lambda e: e.weight),
                healthy_hosts=len(healthy),
                total_hosts=len(members),
                config=zone,
            )
            if plan is not None and plan.mode.name == "PANIC":
                plan = None
            subsets[target] = _Subset.of(healthy, members, plan)
        services[name] = ServiceSnapshot(name, policy, endpoints, subsets)
    return RoutingSnapshot(services, local_az, version)


def _unhealthy(e: Endpoint) -> Endpoint:
    from dataclasses import replace

    return replace(e, healthy=False)


class _RouteSeries:
    """One route's metric series, looked up once (label lookups cost per request)."""

    __slots__ = ("_family", "_labels", "latency", "requests", "responses", "retries")

    def __init__(self, metrics: TrafficMetrics, service: str, route: str) -> None:
        self.requests = metrics.requests.labels(service, route)
        self.retries = metrics.retries.labels(service, route)
        self.latency = metrics.latency.labels(service)
        self._family = metrics.responses
        self._labels = (service, route)
        # by status // 100 (a status line has three digits: 1 to 9)
        self.responses: list[CounterChild | None] = [None] * 10

    def response(self, status: int) -> CounterChild:
        cls = status // 100
        child = self.responses[cls]
        if child is None:
            child = self.responses[cls] = self._family.labels(*self._labels, f"{cls}xx")
        return child


class _ServiceRuntime:
    """State of one service that survives snapshot swaps."""

    def __init__(self, policy: TrafficPolicy) -> None:
        self.policy = policy
        self.stats = StatsTable()
        self.outlier = OutlierDetector(_outlier_config(policy))
        self.budget = RetryBudget()
        self.bucket = TokenBucket(policy.rate_limit, policy.burst) if policy.rate_limit else None
        self.limit = ConcurrencyLimit(policy.max_concurrent)
        self.series: dict[str, _RouteSeries] = {}  # by route name
        self.instance_requests: dict[str, CounterChild] = {}  # by instance uid

    def update(self, policy: TrafficPolicy, endpoints: Iterable[Endpoint]) -> None:
        if policy != self.policy:
            self.policy = policy
            self.outlier.config = _outlier_config(policy)
            self.bucket = (
                TokenBucket(policy.rate_limit, policy.burst) if policy.rate_limit else None
            )
            self.limit.limit = policy.max_concurrent  # keeps the in-flight count
        ids = [e.uid for e in endpoints]
        self.stats.retain(ids)
        self.outlier.set_instances(ids)
        self.instance_requests.clear()  # children stay in the registry; this is a cache

    def instance_counter(self, router: Router, svc: ServiceSnapshot, e: Endpoint) -> CounterChild:
        """``e``'s attempts counter (looked up once per snapshot)."""
        counter = self.instance_requests.get(e.uid)
        if counter is None:
            counter = self.instance_requests[e.uid] = router.metrics.instance_requests.labels(
                svc.name, e.node, e.id)  # fmt: skip
        return counter


def _outlier_config(policy: TrafficPolicy) -> OutlierConfig:
    o = policy.outlier
    return OutlierConfig(
        consecutive_failures=o.consecutive_failures or 1_000_000_000,
        base_ejection=o.base_ejection,
        max_ejection_percent=o.max_ejection_percent if o.consecutive_failures else 0,
    )


class TrafficMetrics:
    """The proxy's per-service, per-route and per-instance series."""

    def __init__(self, registry: Registry) -> None:
        self.requests = registry.counter(
            "hostmesh_proxy_requests_total", "Requests routed, by service and route.",
            ("service", "route"))  # fmt: skip
        self.responses = registry.counter(
            "hostmesh_proxy_responses_total",
            "Responses to clients by service, route and status class (5xx includes the "
            "proxy's own errors).", ("service", "route", "class"))  # fmt: skip
        self.latency = registry.histogram(
            "hostmesh_proxy_request_duration_seconds",
            "Time from routing a request to its response head, by service.",
            ("service",), buckets=LATENCY_BUCKETS)  # fmt: skip
        self.instance_requests = registry.counter(
            "hostmesh_proxy_instance_requests_total", "Attempts sent to each instance.",
            ("service", "node", "instance"))  # fmt: skip
        self.instance_failures = registry.counter(
            "hostmesh_proxy_instance_failures_total",
            "Attempts that failed (5xx, connect failure, reset, timeout) per instance.",
            ("service", "node", "instance"))  # fmt: skip
        self.retries = registry.counter(
            "hostmesh_proxy_retries_total", "Retries sent, by service and route.",
            ("service", "route"))  # fmt: skip
        self.budget_exhausted = registry.counter(
            "hostmesh_proxy_retry_budget_exhausted_total",
            "Retries not sent because the retry budget was empty.", ("service",))  # fmt: skip
        self.ejections = registry.counter(
            "hostmesh_proxy_ejections_total", "Outlier ejections, by service and instance.",
            ("service", "node", "instance"))  # fmt: skip
        self.limited = registry.counter(
            "hostmesh_proxy_limited_total",
            "Requests refused by a service's rate limit or concurrency cap.",
            ("service", "reason"))  # fmt: skip


class Router:
    """Routes requests by the current snapshot; one per agent (single Trio thread)."""

    def __init__(self, registry: Registry, *, rng: random.Random | None = None) -> None:
        self.snapshot = RoutingSnapshot()
        self.metrics = TrafficMetrics(registry)
        self.rng = rng or random.Random()
        self._runtime: dict[str, _ServiceRuntime] = {}
        self._lanes: dict[str, Lane | None] = {}  # for this snapshot (None: no lane)
        self.tcp: dict[str, dict[str, int]] = {}  # service -> TCP upstream counters

    def update(self, snapshot: RoutingSnapshot) -> None:
        """Swap in a new snapshot; runtime state of gone instances is dropped."""
        for name, svc in snapshot.services.items():
            runtime = self._runtime.get(name)
            if runtime is None:
                self._runtime[name] = _ServiceRuntime(svc.policy)
                self._runtime[name].update(svc.policy, svc.endpoints)
            else:
                runtime.update(svc.policy, svc.endpoints)
        for name in [n for n in self._runtime if n not in snapshot.services]:
            del self._runtime[name]
        self.snapshot = snapshot
        for lane in self._lanes.values():
            if lane is not None:  # requests still using it end the general way
                lane.stale = True
        self._lanes = {}

    def lane(self, service: str) -> Lane | None:
        """The :class:`Lane` of ``service`` when its policy has no routes (None: unknown
        service, or routes to match: :meth:`route`)."""
        try:
            return self._lanes[service]
        except KeyError:
            pass
        svc = self.snapshot.services.get(service)
        lane = None
        if svc is not None and not svc.policy.routes:
            rt = self._runtime[service]
            lane = Lane(self, svc, rt, self._series(rt, service, DEFAULT_ROUTE.name))
        if len(self._lanes) < _LANES_CACHED:
            self._lanes[service] = lane
        return lane

    def runtime(self, service: str) -> _ServiceRuntime | None:
        return self._runtime.get(service)

    def tcp_stats(self, service: str) -> dict[str, int]:
        """Counters of one TCP upstream listener (rendered by /metrics)."""
        return self.tcp.setdefault(service, {"connections": 0, "connect_failures": 0,
                                             "refused": 0, "denied": 0})  # fmt: skip

    def tcp_route(self, service: str, now: float) -> RouteState:
        """A TCP connection's route: the policy's catch-all route (first with an
        empty match, keeping its split), else every instance.

        Raises:
            HttpError: 502 unknown service.
        """
        svc = self.snapshot.services.get(service)
        if svc is None:
            raise HttpError(502, "unknown-service", f"no service named {service!r}")
        route = next((r for r in svc.policy.routes if r.match == RouteMatch()), DEFAULT_ROUTE)
        rt = self._runtime[service]
        return RouteState(self, svc, rt, route, self._series(rt, service, route.name))

    def route(
        self,
        service: str,
        method: bytes,
        path: bytes,
        headers: Callable[[], Iterable[tuple[bytes, bytes]]],
        now: float,
    ) -> RouteState:
        """The route a request takes (``headers`` is called only if a route matches on them).

        Raises:
            HttpError: 502 unknown service, 404 no route matched.
        """
        svc = self.snapshot.services.get(service)
        if svc is None:
            raise HttpError(502, "unknown-service", f"no service named {service!r}")
        routes = svc.policy.routes
        if not routes:
            route: Route | None = DEFAULT_ROUTE
        else:
            route = match_route(
                routes, method.decode("ascii", "replace"), path.decode("latin-1"),
                ((k.decode("latin-1"), v.decode("latin-1")) for k, v in _call(headers)),
            )  # fmt: skip
        if route is None:
            raise HttpError(404, "no-route", f"no route of {service!r} matches the request")
        rt = self._runtime[service]
        series = self._series(rt, service, route.name)
        series.requests.inc()
        return RouteState(self, svc, rt, route, series)

    def _series(self, rt: _ServiceRuntime, service: str, route: str) -> _RouteSeries:
        series = rt.series.get(route)
        if series is None:
            series = rt.series[route] = _RouteSeries(self.metrics, service, route)
        return series


def _call(fn: Callable[[], Iterable[tuple[bytes, bytes]]]) -> Iterator[tuple[bytes, bytes]]:
    yield from fn()  # runs only when iterated: match_route reads headers for header matches


class RouteState:
    """One request's routing: limits, instance picks, outcomes, retry budget."""

    __slots__ = ("_admitted", "_router", "_rt", "_series", "route", "svc")

    def __init__(self, router: Router, svc: ServiceSnapshot, rt: _ServiceRuntime,
                 route: Route, series: _RouteSeries) -> None:  # fmt: skip
        self._router = router
        self.svc = svc
        self._rt = rt
        self.route = route
        self._series = series
        self._admitted = False

    def admit(self, now: float) -> None:
        """Take a slot of the service's rate limit and concurrency cap.

        Raises:
            HttpError: 429 rate limited, 503 over max_concurrent.
        """
        rt = self._rt
        if rt.bucket is not None and not rt.bucket.try_take(now):
            self._router.metrics.limited.labels(self.svc.name, "rate").inc()
            raise HttpError(429, "rate-limited", f"{self.svc.name}: rate limit reached")
        if not rt.limit.try_acquire():
            self._router.metrics.limited.labels(self.svc.name, "concurrency").inc()
            raise HttpError(503, "overloaded", f"{self.svc.name}: too many requests in flight")
        self._admitted = True

    def release(self) -> None:
        if self._admitted:
            self._admitted = False
            self._rt.limit.release()

    def deposit(self, now: float) -> None:
        self._rt.budget.deposit(now)

    def withdraw(self, now: float) -> bool:
        """Take a retry from the budget; counts the retry or the exhaustion."""
        if self._rt.budget.try_withdraw(now):
            self._series.retries.inc()
            return True
        self._router.metrics.budget_exhausted.labels(self.svc.name).inc()
        return False

    def pick(self, tried: Collection[str], now: float) -> Endpoint:
        """The instance for the next attempt.

        Raises:
            HttpError: 503 when no instance can take the request.
        """
        svc = self.svc
        rt = self._rt
        rng = self._router.rng
        outlier = rt.outlier
        subsets = svc.subsets
        targets = self.route.targets
        r = rng.random()
        subset: _Subset | None = None
        if len(targets) == 1:  # no split: the one target, if it has an instance
            subset = subsets.get(targets[0]) if targets[0].weight else None
        else:

            def usable(target: Target) -> bool:
                subset = subsets.get(target)
                return subset is not None and bool(subset.healthy or subset.all)

            target = pick_target_among(self.route, r, usable)
            if target is not None:
                subset = subsets[target]
        if subset is None or not (subset.healthy or subset.all):
            raise HttpError(503, "no-healthy-instance", f"{svc.name} has no healthy instance")
        candidates = _zone_candidates(subset, rng)
        if tried or outlier.any_ejected(now):
            fresh = [e for e in candidates
                     if e.uid not in tried and not outlier.is_ejected(e.uid, now)]  # fmt: skip
            if not fresh:
                fresh = [e for e in subset.healthy or subset.all
                         if not outlier.is_ejected(e.uid, now)] or list(candidates)  # fmt: skip
        else:
            fresh = candidates  # type: ignore[assignment]
        stats = rt.stats
        if len(fresh) == 1:
            chosen = fresh[0]
        else:
            chosen = pick(fresh, lambda e: stats.get(e.uid), _weight, rng, now)
        stats.get(chosen.uid).start(now)
        rt.instance_counter(self._router, svc, chosen).inc()
        return chosen

    def finish(self, endpoint: Endpoint, ok: bool, latency: float, now: float) -> None:
        """Feed one attempt's outcome to the balancer and the outlier detector."""
        rt = self._rt
        rt.stats.get(endpoint.uid).finish(now, latency, ok)
        if ok:
            rt.outlier.record(endpoint.uid, True, now)
            return
        self._router.metrics.instance_failures.labels(self.svc.name, endpoint.node,
                                                    endpoint.id).inc()  # fmt: skip
        ejection = rt.outlier.record(endpoint.uid, ok, now)
        if ejection is not None:
            self._router.metrics.ejections.labels(self.svc.name, endpoint.node, endpoint.id).inc()

    def count_response(self, status: int, duration: float) -> None:
        series = self._series
        series.response(status).inc()
        series.latency.observe(duration)


def _zone_candidates(subset: _Subset, rng: random.Random) -> tuple[Endpoint, ...]:
    """The instances of ``subset`` the zone plan allows for one pick (all in panic)."""
    plan = subset.plan
    if plan is None:
        return subset.all
    r = rng.random()  # drawn whether or not the plan filters: seeded picks stay put
    if subset.zoned:
        zone = plan.pick_zone(r)
        if zone is not None:
            return subset.by_zone.get(zone) or subset.healthy
    return subset.healthy


def _weight(e: Endpoint) -> float:
    return e.weight or 1.0


class Lane:
    """The usual request to one service whose policy has no routes (the default route)
    in two calls: :meth:`begin` does what :meth:`Router.route`, :meth:`RouteState.admit`,
    :meth:`~RouteState.deposit` and :meth:`~RouteState.pick` do, :meth:`end` what
    :meth:`~RouteState.finish`, :meth:`~RouteState.count_response` and
    :meth:`~RouteState.release` do, with the same effects (counters, limits, budget,
    balancer stats and random draws) and fewer calls: the proxy's express lane
    takes one per request.

    Made by :meth:`Router.lane` for the current snapshot; a request keeps its lane
    to the end, as it keeps a :class:`RouteState`.
    """

    __slots__ = ("_loads", "_router", "_rt", "_series", "_subset", "first_try", "route", "stale",
                 "svc")  # fmt: skip

    def __init__(self, router: Router, svc: ServiceSnapshot, rt: _ServiceRuntime,
                 series: _RouteSeries) -> None:  # fmt: skip
        self._router = router
        self.svc = svc
        self._rt = rt
        self._series = series
        self.route = route = DEFAULT_ROUTE
        #: s the first try may take: the route's total or per-try timeout, the sooner
        total = route.timeout if route.timeout > 0 else math.inf
        self.first_try = min(total, route.per_try_timeout if route.per_try_timeout > 0 else total)
        target = DEFAULT_ROUTE.targets[0]
        subset = svc.subsets.get(target) if target.weight else None
        self._subset = subset if subset is not None and (subset.healthy or subset.all) else None
        # uid -> (balancer stats, attempts counter, outlier state): the lookups in one
        self._loads: dict[str, tuple[EndpointStats, CounterChild, InstanceState | None]] = {}
        #: A newer snapshot came (its update may have dropped and remade stats).
        self.stale = False

    def begin(self, now: float) -> Endpoint | None:
        """Route, admit, count and pick for one request; None (and nothing done) when
        the general path must: no usable instance, an ejection in force, or a limit
        refusing (the general path refuses and counts it)."""
        rt = self._rt
        subset = self._subset
        if subset is None or rt.outlier.ejected_until > now:  # (any_ejected, without a call)
            return None
        limit = rt.limit
        if not limit.try_acquire():
            return None
        bucket = rt.bucket
        if bucket is not None and not bucket.try_take(now):
            limit.release()
            return None
        # Counters in place (CounterChild's _value): a call per counter was 1% of a request.
        self._series.requests._value += 1
        rt.budget.deposit(now)
        rng = self._router.rng
        rng.random()  # pick's target draw (one target: its value is not needed)
        candidates = _zone_candidates(subset, rng)
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            chosen = pick(candidates, lambda e: rt.stats.get(e.uid), _weight, rng, now)
        load = self._loads.get(chosen.uid)
        if load is None:
            counter = rt.instance_counter(self._router, self.svc, chosen)
            load = self._loads[chosen.uid] = (rt.stats.get(chosen.uid), counter,
                                              rt.outlier.state(chosen.uid))  # fmt: skip
        load[0].outstanding += 1  # EndpointStats.start
        load[1]._value += 1
        return chosen

    def end(self, endpoint: Endpoint, status: int, latency: float, now: float) -> None:
        """The request :meth:`begin` picked ``endpoint`` for got ``status`` from it.

        Its concurrency slot is given back here, with the upstream's whole answer in
        hand; the general path gives it back after writing to the client.
        """
        if status >= 500 or self.stale:  # the general accounting (failures, ejection)
            state = self.state()
            state.finish(endpoint, status < 500, latency, now)
            state.count_response(status, latency)
            state.release()
            return
        stats, _, outlier = self._loads[endpoint.uid]
        stats.finish(now, latency, True)
        if outlier is not None:  # OutlierDetector.record of a success
            outlier.failures = 0
        series = self._series
        (series.responses[status // 100] or series.response(status))._value += 1
        series.latency.observe(latency)
        self._rt.limit.release()

    def release(self) -> None:
        """End the request :meth:`begin` started without an answer (as
        :meth:`RouteState.release` does): its concurrency slot is given back."""
        self._rt.limit.release()

    def state(self) -> RouteState:
        """The request :meth:`begin` started, as a :class:`RouteState` (admitted) for the
        general path to carry on with (retries, failures); it releases it."""
        state = RouteState(self._router, self.svc, self._rt, DEFAULT_ROUTE, self._series)
        state._admitted = True
        return state

"""The express lane's routing (Lane.begin / Lane.end) has the general path's effects.

Two routers see the same snapshots and the same seeded randomness. One takes
every request the general way (route, admit, deposit, pick, finish,
count_response, release); the other asks its Lane first and goes the general
way only when the lane declines, as the proxy does. After every step the picks,
the /metrics text, the random state, the balancer's stats, the limits and the
ejections must be the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from hostmesh._metrics import Registry
from hostmesh._routes import OutlierPolicy, Route, RouteMatch, Target, TrafficPolicy
from hostmesh.agent._http1 import HttpError
from hostmesh.agent._routing import Endpoint, Lane, Router, RouteState, build_snapshot
from hostmesh.catalog import Catalog, Node, NodeRecord, ServiceInstance

SERVICE = "web"
NO_HEADERS: list[tuple[bytes, bytes]] = []


def _catalog(instances: dict[str, int], generation: int) -> Catalog:
    """Nodes n0.. in the given AZs, each with ``count`` instances of web."""
    catalog = Catalog()
    node = 0
    for az, count in instances.items():
        for _ in range(count):
            name = f"n{node}"
            services = (ServiceInstance(f"web-{node}", SERVICE, "127.0.0.1", 9000 + node),)
            catalog.merge(NodeRecord(Node(name, "127.0.0.1", az=az), generation=generation,
                                     version=1, services=services))  # fmt: skip
            node += 1
    return catalog


@dataclass
class _Side:
    router: Router
    registry: Registry
    use_lane: bool
    flight: list[tuple[Lane | RouteState, Endpoint, float]] = field(default_factory=list)
    lane_taken: int = 0

    def start(self, now: float) -> str:
        """One request begins; what happened (the pick's uid, or the refusal)."""
        if self.use_lane:
            lane = self.router.lane(SERVICE)
            assert lane is not None
            endpoint = lane.begin(now)
            if endpoint is not None:
                self.lane_taken += 1
                self.flight.append((lane, endpoint, now))
                return endpoint.uid
        state = self.router.route(SERVICE, b"GET", b"/", lambda: NO_HEADERS, now)
        try:
            state.admit(now)
        except HttpError as exc:
            return exc.reason
        state.deposit(now)
        try:
            endpoint = state.pick(frozenset(), now)
        except HttpError as exc:
            state.release()
            return exc.reason
        self.flight.append((state, endpoint, now))
        return endpoint.uid

    def end(self, index: int, status: int, now: float) -> None:
        owner, endpoint, started = self.flight.pop(index)
        latency = now - started
        if isinstance(owner, Lane):
            owner.end(endpoint, status, latency, now)
        else:
            owner.finish(endpoint, status < 500, latency, now)
            owner.count_response(status, latency)
            owner.release()

    def observed(self, now: float) -> tuple[object, ...]:
        rt = self.router.runtime(SERVICE)
        assert rt is not None
        uids = sorted(e.uid for e in self.router.snapshot.services[SERVICE].endpoints)
        stats = [(u, rt.stats.get(u).latency(now), rt.stats.get(u).outstanding) for u in uids]
        limits = (rt.limit.in_flight, rt.budget.balance(now), sorted(rt.outlier.ejected(now)))
        return (self.registry.render(), self.router.rng.getstate(), stats, limits)


POLICIES = {
    "default": TrafficPolicy(),
    "limited": TrafficPolicy(rate_limit=200, rate_burst=5, max_concurrent=3),
    "quick ejection": TrafficPolicy(
        outlier=OutlierPolicy(consecutive_failures=2, base_ejection=0.05)
    ),
}


@pytest.mark.parametrize("policy", POLICIES, ids=list(POLICIES))
@pytest.mark.parametrize("seed", range(4))
def test_the_lane_has_the_general_paths_effects(policy: str, seed: int) -> None:
    traffic = {SERVICE: POLICIES[policy]}
    sides = []
    for use_lane in (False, True):
        registry = Registry()
        sides.append(_Side(Router(registry, rng=random.Random(seed)), registry, use_lane))
    plan = random.Random(1000 + seed)  # the same requests, outcomes and times for both
    layouts = [{"az-a": 2, "az-b": 3, "az-c": 1}, {"az-a": 1}, {"az-a": 4, "az-b": 1}]
    now = 100.0
    for step in range(600):
        if step % 200 == 0:  # a new snapshot: the lane is made again
            catalog = _catalog(layouts[step // 200], generation=step + 1)
            for side in sides:
                side.router.update(build_snapshot(catalog, traffic, "az-a"))
        now += plan.choice((0.0001, 0.001, 0.01))
        if sides[0].flight and (len(sides[0].flight) > 4 or plan.random() < 0.5):
            index = plan.randrange(len(sides[0].flight))
            status = plan.choice((200, 200, 200, 204, 404, 500, 503))
            for side in sides:
                side.end(index, status, now)
        else:
            got = [side.start(now) for side in sides]
            assert got[0] == got[1], f"step {step}"
        assert sides[0].observed(now) == sides[1].observed(now), f"step {step}"
    # The lane did much of the work, not only its fallback (it declines while an
    # ejection is in force, and where a limit refuses).
    assert sides[1].lane_taken > 50


def test_a_service_with_routes_has_no_lane_and_a_new_snapshot_makes_a_new_lane() -> None:
    catalog = _catalog({"az-a": 2}, generation=1)
    router = Router(Registry())
    routed = TrafficPolicy(routes=(Route(match=RouteMatch(path_prefix="/api"),
                                         targets=(Target(),)),))  # fmt: skip
    router.update(build_snapshot(catalog, {SERVICE: routed}, "az-a"))
    assert router.lane(SERVICE) is None
    assert router.lane("nonexistent") is None
    router.update(build_snapshot(catalog, {}, "az-a"))
    lane = router.lane(SERVICE)
    assert lane is not None and router.lane(SERVICE) is lane
    router.update(build_snapshot(catalog, {}, "az-a"))
    assert router.lane(SERVICE) is not lane

"""The proxy's routing and resilience on real sockets: splits, routes, AZ-aware
balancing, retries and the retry budget, timeouts, ejection, limits, TCP upstreams.

Instances are real HTTP backends on loopback, entered in the agent's catalog
as gossip would (tests/proxy_env.py); the client is httpx through the proxy.
"""

from __future__ import annotations

import math
import socket
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio
from conftest import trio_test
from proxy_env import Mesh, mesh

from hostmesh import ProxyConfig
from hostmesh._config import UpstreamConfig, from_mapping
from hostmesh._routes import TrafficPolicy
from hostmesh.catalog import CheckState, Health, Node, NodeRecord, ServiceInstance


def policy(text: str) -> dict[str, TrafficPolicy]:
    """``[traffic.<service>]`` tables from TOML text, loaded like the agent config."""
    data = tomllib.loads(text)["traffic"]
    return {name: from_mapping(TrafficPolicy, table) for name, table in data.items()}


def within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """``count`` of ``n`` draws is within ``sigmas`` binomial deviations of ``n * p``."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


async def metrics(m: Mesh) -> str:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://{m.addrs.api[0]}:{m.addrs.api[1]}/metrics")
    return r.text


def group(seen: Counter[str], part: int) -> Counter[str]:
    """Hits summed by one dash-separated part of the backend names."""
    out: Counter[str] = Counter()
    for name, hits in seen.items():
        out[name.split("-")[part]] += hits
    return out


async def spread(m: Mesh, n: int, path: str = "/", host: str = "udvr",
                 **kwargs: Any) -> Counter[str]:  # fmt: skip
    """Which backend answered each of ``n`` requests (8 at a time)."""
    seen: Counter[str] = Counter()
    async with m.client() as client:

        async def worker(k: int) -> None:
            for _ in range(k):
                r = await client.get(path, headers={"Host": host}, **kwargs)
                seen[r.headers.get("x-backend", f"status-{r.status_code}")] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(worker, n // 8)
    return seen


@trio_test(60)
async def test_weighted_split_over_versions(tmp_path: Path) -> None:
    traffic = policy("""
        [[traffic.udvr.routes]]
        targets = [{ version = "v1", weight = 3 }, { version = "v2", weight = 1 },
                   { version = "v3", weight = 0 }]
    """)
    async with mesh(tmp_path, traffic=traffic) as m:
        for v in ("v1", "v2", "v3"):
            await m.add_node(f"n-{v}", "dev-1a", "udvr", 2, meta={"version": v})
        seen = await spread(m, 800)
        by_version = group(seen, 1)
        assert by_version["v3"] == 0
        assert sum(by_version.values()) == 800
        assert within(by_version["v1"], 800, 0.75), by_version


@trio_test(60)
async def test_first_matching_route_wins_and_unmatched_gets_404(tmp_path: Path) -> None:
    traffic = policy("""
        [[traffic.udvr.routes]]
        name = "canary"
        match = { headers = [{ name = "x-canary", exact = "1" }] }
        targets = [{ tag = "canary" }]
        [[traffic.udvr.routes]]
        name = "api"
        match = { path_prefix = "/api", method = "GET" }
        targets = [{ tag = "stable" }]
    """)
    async with mesh(tmp_path, traffic=traffic) as m:
        await m.add_node("n1", "dev-1a", "udvr", tags=("stable",))
        await m.add_node("n2", "dev-1a", "udvr", tags=("canary",))
        async with m.client() as c:
            r = await c.get("/api/x", headers={"Host": "udvr", "X-Canary": "1"})
            assert r.headers["x-backend"].startswith("n2")
            r = await c.get("/api/x", headers={"Host": "udvr"})
            assert r.headers["x-backend"].startswith("n1")
            r = await c.post("/api/x", headers={"Host": "udvr"})
            assert r.status_code == 404 and r.headers["hostmesh-error"] == "no-route"
            r = await c.get("/other", headers={"Host": "udvr"})
            assert r.status_code == 404


async def add_callers(m: Mesh, per_az: dict[str, int]) -> None:
    """Nodes without instances of the service: they count as callers per AZ."""
    for az, count in per_az.items():
        for i in range(count):
            m.agent.catalog.merge(NodeRecord(Node(f"caller-{az}-{i}", "127.0.0.1", az=az), 1, 1))
    await m.refresh()


@trio_test(90)
async def test_zone_aware_routing_keeps_envoys_local_share(tmp_path: Path) -> None:
    # Envoy's example: callers 40/40/20 %, upstream capacity 25/50/25 % -> 62.5 % local.
    async with mesh(tmp_path) as m:  # the agent itself is in dev-1a
        await m.add_node("up-a", "dev-1a", "udvr", 2)
        await m.add_node("up-b", "dev-1b", "udvr", 4)
        await m.add_node("up-c", "dev-1c", "udvr", 2)
        await add_callers(m, {"dev-1a": 2, "dev-1b": 3, "dev-1c": 1})  # 4 / 4 / 2 nodes
        seen = await spread(m, 1600)
        zones = group(seen, 1)
        assert within(zones["a"], 1600, 0.625), zones
        assert within(zones["b"], 1600, 0.25), zones
        assert within(zones["c"], 1600, 0.125), zones


@trio_test(60)
async def test_zone_with_enough_capacity_keeps_all_traffic_local(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        for az in ("dev-1a", "dev-1b", "dev-1c"):
            await m.add_node(f"up-{az[-1]}", az, "udvr", 2)
        await add_callers(m, {"dev-1b": 1, "dev-1c": 1})  # callers 2 / 2 / 2 nodes
        seen = await spread(m, 200)
        assert {name.split("-")[1] for name in seen} == {"a"}
        # The local instances go critical: traffic spills to the other zones.
        for i in range(2):
            rec = m.agent.catalog.record("up-a")
            assert rec is not None
            m.agent.catalog.merge(rec.bump(checks=tuple(
                CheckState(f"c{j}", "c", Health.CRITICAL, f"up-a-udvr-{j}") for j in range(2)
            )))  # fmt: skip
            del i
            break
        await m.refresh()
        seen = await spread(m, 200)
        assert {name.split("-")[1] for name in seen} == {"b", "c"}


@trio_test(60)
async def test_retries_on_gateway_errors_reach_a_healthy_instance(tmp_path: Path) -> None:
    traffic = policy("""
        [[traffic.udvr.routes]]
        retries = { max = 2, on = ["gateway-error", "connection-error"] }
    """)
    async with mesh(tmp_path, traffic=traffic) as m:
        bad, good = await m.add_node("n1", "dev-1a", "udvr", 2)
        await spread(m, 40)  # both measured: the balancer picks either
        bad.status = 503
        tried = bad.hits
        # 8 at a time: with requests in flight on good, P2C sends some to bad
        # (one at a time, the lower latency estimate would win every draw).
        assert await spread(m, 40) == {good.name: 40}
        assert bad.hits > tried  # it was tried, failed, and the retry went to good
        text = await metrics(m)
        assert 'hostmesh_proxy_retries_total{service="udvr",route="route-0"}' in text


@trio_test(90)
async def test_retry_budget_caps_a_retry_storm(tmp_path: Path) -> None:
    traffic = policy("""
        [traffic.udvr.outlier]
        consecutive_failures = 0
        [[traffic.udvr.routes]]
        retries = { max = 3, on = ["server-error"] }
    """)
    async with mesh(tmp_path, traffic=traffic) as m:
        backends = await m.add_node("n1", "dev-1a", "udvr", 2)
        for b in backends:
            b.status = 500
        n = 400
        seen = await spread(m, n)
        sent = sum(b.hits for b in backends)
        retries = sent - n
        # Without a budget: 3 retries per request (1,200). With Linkerd's budget:
        # 20 % of requests plus a reserve of 10/s over the 10 s window (100).
        assert retries <= 0.2 * n + 100 + 5, retries
        assert retries >= 0.2 * n, retries
        assert sum(seen.values()) == n  # every request answered (with the 500)
        stats = m.agent.proxy.stats.refused
        assert stats.get("retry-budget-exhausted", 0) > 0


@trio_test(60)
async def test_total_timeout_and_per_try_timeout_with_retry(tmp_path: Path) -> None:
    traffic = policy("""
        [[traffic.slow.routes]]
        timeout = "500ms"
        [[traffic.mixed.routes]]
        timeout = "5s"
        per_try_timeout = "300ms"
        retries = { max = 2, on = ["connection-error"] }
    """)
    async with mesh(tmp_path, traffic=traffic) as m:
        await m.add_node("n1", "dev-1a", "slow")
        await m.add_node("n2", "dev-1a", "mixed", 1)
        async with m.client() as c:
            t0 = trio.current_time()
            r = await c.get("/sleep/3", headers={"Host": "slow"})
            assert r.status_code == 504 and r.headers["hostmesh-error"] == "timeout"
            assert 0.4 < trio.current_time() - t0 < 1.5
            t0 = trio.current_time()
            r = await c.get("/sleep/2", headers={"Host": "mixed"})
            # Each try times out after 300 ms; 1 + 2 retries, then 504.
            assert r.status_code == 504
            assert 0.8 < trio.current_time() - t0 < 2.0


@trio_test(60)
async def test_connect_failure_is_retried_and_reported(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        (good,) = await m.add_node("n1", "dev-1a", "udvr", 1)
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        dead.close()  # nothing listens there now
        rec = m.agent.catalog.record("n1")
        assert rec is not None
        m.agent.catalog.merge(rec.bump(services=(*rec.services, ServiceInstance(
            "dead-0", "udvr", "127.0.0.1", port))))  # fmt: skip
        await m.refresh()
        async with m.client() as c:
            for _ in range(20):
                r = await c.get("/", headers={"Host": "udvr"})
                assert r.status_code == 200
            assert good.hits == 20
            # Only the dead instance left: 502 naming the reason.
            rec = m.agent.catalog.record("n1")
            assert rec is not None
            m.agent.catalog.merge(rec.bump(services=(
                ServiceInstance("dead-0", "udvr", "127.0.0.1", port),)))  # fmt: skip
            await m.refresh()
            r = await c.get("/", headers={"Host": "udvr"})
            assert r.status_code == 502 and r.headers["hostmesh-error"] == "connect-failed"
            assert r.text.count("\n") == 1


@trio_test(90)
async def test_outlier_ejection_stops_traffic_to_a_failing_instance(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backends = await m.add_node("n1", "dev-1a", "udvr", 4)
        await spread(m, 200)  # every instance measured fast
        bad = backends[0]
        assert bad.hits > 0
        bad.status = 500
        before = bad.hits
        # Until it has failed 5 times: a failure that was slow (a busy machine) raises
        # its latency estimate, and the balancer rightly avoids it for a while.
        for _ in range(10):
            await spread(m, 200)
            if bad.hits - before >= 5:
                break
        hits = bad.hits
        # Ejected after 5 consecutive 5xx; requests already sent to it by the
        # other 7 concurrent clients when the fifth failed still arrive.
        assert 5 <= hits - before < 5 + 8
        await spread(m, 200)
        assert bad.hits == hits  # ejected for 30 s
        text = await metrics(m)
        labels = f'service="udvr",node="n1",instance="{bad.name}"'
        assert f"hostmesh_proxy_ejections_total{{{labels}}} 1" in text


@trio_test(60)
async def test_ejection_never_takes_more_than_half_of_a_service(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        backends = await m.add_node("n1", "dev-1a", "udvr", 2)
        for b in backends:
            b.status = 500
        await spread(m, 200)
        await spread(m, 40)
        # One may be ejected, never both: the service keeps answering (with 500s).
        ejected = m.agent.router.runtime("udvr").outlier.ejected(trio.current_time())  # type: ignore[union-attr]
        assert len(ejected) <= 1
        assert sum(b.hits for b in backends) >= 240


@trio_test(60)
async def test_rate_limit_and_concurrency_cap(tmp_path: Path) -> None:
    traffic = policy("""
        [traffic.limited]
        rate_limit = 5
        [traffic.narrow]
        max_concurrent = 1
    """)
    async with mesh(tmp_path, traffic=traffic) as m:
        await m.add_node("n1", "dev-1a", "limited")
        await m.add_node("n2", "dev-1a", "narrow")
        async with m.client() as c:
            codes = [(await c.get("/", headers={"Host": "limited"})).status_code for _ in range(8)]
            assert codes[:5] == [200] * 5 and 429 in codes[5:]
            r = await c.get("/", headers={"Host": "limited"})
            assert r.status_code == 429 and r.headers["hostmesh-error"] == "rate-limited"

            results: list[int] = []

            async def slow() -> None:
                results.append((await c.get("/sleep/0.5", headers={"Host": "narrow"})).status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow)
                await trio.sleep(0.1)
                r = await c.get("/", headers={"Host": "narrow"})
                assert r.status_code == 503 and r.headers["hostmesh-error"] == "overloaded"
            assert results == [200]


@trio_test(60)
async def test_no_healthy_instance_is_a_503(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        await m.add_node("n1", "dev-1a", "udvr", 1)
        rec = m.agent.catalog.record("n1")
        assert rec is not None
        m.agent.catalog.merge(rec.bump(checks=(
            CheckState("c", "c", Health.CRITICAL, "n1-udvr-0"),)))  # fmt: skip
        await m.refresh()
        async with m.client() as c:
            r = await c.get("/", headers={"Host": "udvr"})
        # One instance, critical: below the panic threshold every instance is
        # used (Envoy's panic routing), so the request is still tried.
        assert r.status_code == 200


async def echo_server(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A TCP echo server that closes its side after the client half-closes."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@trio_test(60)
async def test_tcp_upstream_forwards_with_half_close_and_connect_retry(tmp_path: Path) -> None:
    up = UpstreamConfig(service="pg", bind="127.0.0.1:0")
    async with mesh(tmp_path, upstream=(up,)) as m:
        port = await m.nursery.start(echo_server)
        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        m.agent.catalog.merge(NodeRecord(Node("db", "127.0.0.1", az="dev-1a"), 1, 1, services=(
            ServiceInstance("pg-dead", "pg", "127.0.0.1", dead_port),
            ServiceInstance("pg-live", "pg", "127.0.0.1", port),
        )))  # fmt: skip
        await m.refresh()
        host, lport = m.addrs.upstreams[0]
        for _ in range(5):  # some picks land on the dead one first: retried
            stream = await trio.open_tcp_stream(host, lport)
            async with stream:
                await stream.send_all(b"select 1;" * 1000)
                await stream.send_eof()
                got = b""
                while data := await stream.receive_some(65536):
                    got += data
            assert got == b"select 1;" * 1000


@trio_test(60)
async def test_proxy_metrics_by_service_route_and_status_class(tmp_path: Path) -> None:
    async with mesh(tmp_path, proxy=ProxyConfig(bind="127.0.0.1:0")) as m:
        (b,) = await m.add_node("n1", "dev-1a", "udvr", 1)
        async with m.client() as c:
            for _ in range(3):
                await c.get("/", headers={"Host": "udvr"})
            await c.get("/status/404", headers={"Host": "udvr"})
        text = await metrics(m)
    assert 'hostmesh_proxy_requests_total{service="udvr",route="default"} 4' in text
    assert 'hostmesh_proxy_responses_total{service="udvr",route="default",class="2xx"} 3' in text
    assert 'hostmesh_proxy_responses_total{service="udvr",route="default",class="4xx"} 1' in text
    assert 'hostmesh_proxy_request_duration_seconds_count{service="udvr"} 4' in text
    labels = f'service="udvr",node="n1",instance="{b.name}"'
    assert f"hostmesh_proxy_instance_requests_total{{{labels}}} 4" in text
    assert "hostmesh_proxy_open_connections" in text

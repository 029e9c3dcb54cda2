"""The leader's node-health duties: death confirmation by a direct probe, reaping, graceful
leave and force-leave, on a real server (SQLite: the one server leads) with agents syncing
over real TLS websockets."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from conftest import agent_config, running_agent, trio_test
from sync_env import LightAgent, light_record, node_tls, nodes_tls, server_verify
from test_cli import HOSTMESH
from test_sync import FAST_SYNC, counter, running_server

from hostmesh import ServerConfig
from hostmesh._config import HealthConfig
from hostmesh._errors import ConfigError
from hostmesh.catalog import Node, NodeRecord, ServiceInstance
from hostmesh.catalog._codec import encode_record
from hostmesh.catalog._syncproto import ClientState
from hostmesh.server import Server
from hostmesh.server._deaths import Action, DeathReport, parse_report, probe_target, report_action
from hostmesh.server._health import tcp_probe

# --- the decisions (no I/O) -------------------------------------------------------------


def record(
    version: int = 3, *, left: bool = False, meta: dict[str, str] | None = None
) -> NodeRecord:
    return NodeRecord(Node("n1", "10.0.0.7", meta=meta or {}), generation=2, version=version,
                      left=left)  # fmt: skip


def test_each_report_gets_the_decision_an_operator_expects() -> None:
    now, reap = 10_000.0, 3600.0
    fresh = DeathReport(2, 3)
    confirmed = DeathReport(2, 3, confirmed=True, confirmed_at=now - 10)
    old = DeathReport(2, 3, confirmed=True, confirmed_at=now - reap)
    assert report_action(fresh, record(), now, reap) is Action.PROBE
    assert report_action(confirmed, record(), now, reap) is Action.WAIT
    assert report_action(old, record(), now, reap) is Action.REAP  # reap_after reached
    # The node came back (a newer record) or is gone: the report is dropped, not acted on.
    assert report_action(old, record(version=4), now, reap) is Action.DROP
    assert report_action(fresh, None, now, reap) is Action.DROP
    assert report_action(None, record(), now, reap) is Action.DROP  # unreadable report
    # A node that left gracefully is removed whatever the report says.
    assert report_action(fresh, record(left=True), now, reap) is Action.REMOVE


def test_reports_parse_strictly() -> None:
    assert parse_report(b'{"generation":1,"version":2,"reporters":["a"],"confirmed":false}') == (
        DeathReport(1, 2)
    )
    got = parse_report(b'{"generation":1,"version":2,"confirmed":true,"confirmed_at":5.5}')
    assert got == DeathReport(1, 2, True, 5.5)
    for bad in (b"", b"[]", b'{"generation":1}', b'{"generation":"1","version":2}',
                b'{"generation":1,"version":2,"confirmed":"yes"}',
                b'{"generation":true,"version":2}',
                b'{"generation":1,"version":2,"confirmed_at":"soon"}'):  # fmt: skip
        assert parse_report(bad) is None, bad


def test_the_probe_goes_to_the_gossip_port_of_the_record() -> None:
    assert probe_target(record(), 7946) == ("10.0.0.7", 7946)
    assert probe_target(record(meta={"gossip_port": "8301"}), 7946) == ("10.0.0.7", 8301)
    for bad in ("0", "65536", "x", "-1", "\uff18\uff13\uff10\uff11"):  # ignored, not trusted
        assert probe_target(record(meta={"gossip_port": bad}), 7946) == ("10.0.0.7", 7946)
    nowhere = NodeRecord(Node("n1", ""), 1, 1)
    assert probe_target(nowhere, 7946) is None


def test_health_config_has_documented_defaults_and_refuses_nonsense() -> None:
    cfg = HealthConfig()
    assert cfg.reap_after == 3600 and cfg.probe_attempts == 3 and cfg.gossip_port == 7946
    from hostmesh._config import from_mapping

    got = from_mapping(ServerConfig, {"health": {"reap_after": "15m", "probe_timeout": "300ms"}})
    assert got.health.reap_after == 900 and got.health.probe_timeout == 0.3
    for key, value in (("reap_after", "0s"), ("reap_after", "90d"), ("probe_attempts", 0),
                       ("gossip_port", 70000), ("sweep_interval", 0), ("bogus", 1)):  # fmt: skip
        with pytest.raises(ConfigError, match=f"health.{key}"):
            from_mapping(ServerConfig, {"health": {key: value}}, source="server.toml")


def test_the_readme_shows_the_real_health_defaults() -> None:
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [block] = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[health]" in b]
    from hostmesh._config import from_mapping

    assert from_mapping(ServerConfig, tomllib.loads(block)).health == HealthConfig()


@pytest.mark.sockets
@trio_test(timeout=10)
async def test_the_tcp_probe_tells_a_listening_port_from_a_closed_one() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _close_at_once, listeners)
        assert await tcp_probe("127.0.0.1", port, connect_timeout=1, attempts=1, pause=0)
        nursery.cancel_scope.cancel()
    start = trio.current_time()
    # The listener is closed: refused at once, every try (pauses in between).
    assert not await tcp_probe("127.0.0.1", port, connect_timeout=1, attempts=3, pause=0.05)
    assert trio.current_time() - start < 1.0


async def _close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


# --- on a real server ---------------------------------------------------------------------

FAST_HEALTH = HealthConfig(reap_after=1.5, probe_timeout=0.3, probe_attempts=2, probe_pause=0.05,
                           sweep_interval=0.3)  # fmt: skip


def health_server(tmp_path: Path, **health: object) -> Server:
    cfg = ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path / "srv"),
                       health=replace(FAST_HEALTH, **health))  # type: ignore[arg-type]  # fmt: skip
    return Server(cfg, print_token=False)


@contextlib.asynccontextmanager
async def gossip_port() -> AsyncIterator[int]:
    """A listening TCP port standing in for a live agent's gossip listener."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _close_at_once, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def closed_port() -> int:
    """A loopback port nothing listens on (bound and closed a moment ago)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_service(node: str, port: int, service: str = "web") -> NodeRecord:
    svc = ServiceInstance(f"{service}-{node}", service, "", 8080)
    rec = light_record(node, services=(svc,))
    return replace(rec, node=replace(rec.node, meta={"gossip_port": str(port)}))


async def passing(api: httpx.AsyncClient, service: str = "web") -> set[str]:
    rows = (await api.get(f"/v1/health/service/{service}?passing")).json()
    return {r["Node"]["Node"] for r in rows}


async def catalog_nodes(api: httpx.AsyncClient) -> set[str]:
    return {r["Node"] for r in (await api.get("/v1/catalog/nodes")).json()}


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an async predicate (the test's trio_test bound limits the wait; ``what`` is
    what the test waits for, shown in the traceback when the bound ends it)."""
    while not await predicate():
        await trio.sleep(0.02)


@pytest.mark.sockets
@trio_test(timeout=30)
async def test_deaths_are_confirmed_by_a_probe_refuted_when_alive_and_reaped(
    tmp_path: Path,
) -> None:
    server = health_server(tmp_path)
    async with running_server(server) as address, gossip_port() as live_port:
        names = ["node-x", "node-y", "rep"]
        tls_x, tls_y, tls_r = await nodes_tls(server, names)
        dead, alive, reporter = (LightAgent(n, t) for n, t in zip(names, (tls_x, tls_y, tls_r),
                                                                    strict=True))  # fmt: skip
        dead.record = with_service("node-x", closed_port())
        alive.record = with_service("node-y", live_port)
        cfg = agent_config(tmp_path / "obs", servers=(address,), sync=FAST_SYNC)
        cfg = replace(cfg, node_name="observer")
        async with (
            trio.open_nursery() as nursery,
            running_agent(cfg, sync_tls=await node_tls(server, "observer")) as (agent, addrs),
            httpx.AsyncClient(base_url=addrs.api_url, timeout=10) as api,
        ):
            for light in (dead, alive, reporter):
                await nursery.start(light.run, address)
            await until(lambda: _eq(passing(api), {"node-x", "node-y"}), "both serve web")
            assert dead.ws is not None
            await dead.ws.aclose()  # node-x dies: its gossip port is closed
            # Gossip on another node reports both; only the leader's probe decides.
            assert reporter.ws is not None
            # The observer is a real agent: its record names its gossip port (not 7946 here).
            await until(lambda: _stored(server, "observer"), "the observer's record stored")
            own = agent.state.record
            assert own.node.meta["gossip_port"] == addrs.gossip.rpartition(":")[2]
            deaths = [("node-x", 1, 1), ("node-y", 1, 1), ("observer", *own.key)]
            await reporter.ws.send_message(ClientState.deaths_message(deaths))
            await until(lambda: _confirmed(server, "node-x"), "node-x confirmed dead")
            report = json.loads((await _get(server, "catalog/dead/node-x")) or b"{}")
            assert report["confirmed"] is True and report["reporters"][0] == "rep"
            confirmed_at = report["confirmed_at"]
            # node-x's instance leaves the observer's healthy answers (DNS and the proxy
            # read the same catalog view); node-y, which answered the probe, stays.
            await until(lambda: _eq(passing(api), {"node-y"}), "node-x out of service")
            assert not agent.catalog.node_live("node-x")
            await until(lambda: _gone(server, "catalog/dead/node-y"), "node-y's report refuted")
            assert counter(server.metrics, "hostmesh_server_deaths_total",
                           outcome="confirmed") == 1  # fmt: skip
            assert agent.catalog.node_live("node-y")
            # The real agent's gossip listener answered too: refuted, still in the catalog.
            await until(lambda: _gone(server, "catalog/dead/observer"), "observer refuted")
            assert counter(server.metrics, "hostmesh_server_deaths_total", outcome="refuted") == 2
            assert await _stored(server, "observer")
            # Still listed (as dead) until reap_after, then gone from the store and the agent.
            assert "node-x" in await catalog_nodes(api)
            await until(lambda: _gone(server, "catalog/nodes/node-x"), "node-x reaped")
            reaped_after = time.time() - confirmed_at
            assert reaped_after >= FAST_HEALTH.reap_after - 0.05, reaped_after
            assert await _gone(server, "catalog/dead/node-x")
            await until(lambda: _lacks(catalog_nodes(api), "node-x"), "the agent forgot node-x")
            assert counter(server.metrics, "hostmesh_server_nodes_reaped_total",
                           reason="dead") == 1  # fmt: skip
            assert "node-y" in await catalog_nodes(api)
            nursery.cancel_scope.cancel()


@pytest.mark.sockets
@trio_test(timeout=40)
async def test_a_graceful_leave_and_a_force_leave_remove_the_node_at_once(tmp_path: Path) -> None:
    server = health_server(tmp_path, reap_after=3600.0)
    async with running_server(server) as address:
        names = ["node-f", "node-c"]
        tls = await nodes_tls(server, names)
        lights = [LightAgent(n, t) for n, t in zip(names, tls, strict=True)]
        for light in lights:
            light.record = with_service(light.node, closed_port())
        cfg = replace(agent_config(tmp_path / "obs", servers=(address,), sync=FAST_SYNC),
                      node_name="observer")  # fmt: skip
        leaver_cfg = replace(agent_config(tmp_path / "l", servers=(address,), sync=FAST_SYNC),
                             node_name="node-l")  # fmt: skip
        token = server.management_token
        assert token is not None
        roots = tmp_path / "roots.pem"
        roots.write_bytes(server.ca.bundle_pem())
        async with (
            trio.open_nursery() as nursery,
            running_agent(cfg, sync_tls=await node_tls(server, "observer")) as (_, addrs),
            httpx.AsyncClient(base_url=addrs.api_url, timeout=10) as api,
            httpx.AsyncClient(
                base_url=f"https://{address}", verify=server_verify(server), timeout=10
            ) as mgmt,  # fmt: skip
        ):
            for light in lights:
                await nursery.start(light.run, address)
            leaver_tls = await node_tls(server, "node-l")
            async with (
                running_agent(leaver_cfg, sync_tls=leaver_tls) as (leaver, la),
                httpx.AsyncClient(base_url=la.api_url, timeout=10) as own,
            ):
                r = await own.put("/v1/agent/service/register",
                                  json={"Name": "web", "ID": "web-l", "Port": 8080})  # fmt: skip
                assert r.status_code == 200
                await until(lambda: _eq(passing(api), {"node-l", *names}), "all three serve web")
                # A graceful leave, as on SIGTERM: the agent leaves, then exits at once. Its
                # tombstone went out first; the server removes the node (no probe, no
                # reap_after).
                with trio.fail_after(5):
                    await leaver.leave()
            await until(lambda: _gone(server, "catalog/nodes/node-l"), "node-l removed")
            await until(lambda: _lacks(catalog_nodes(api), "node-l"), "the agent forgot node-l")
            assert counter(server.metrics, "hostmesh_server_nodes_reaped_total",
                           reason="left") == 1  # fmt: skip
            # force-leave through the API (Consul's path), with the management token only.
            path = "/v1/agent/force-leave/node-f"
            assert (await mgmt.put(path)).status_code == 401
            r = await mgmt.put(path, headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            assert r.json() == {"node": "node-f", "left": True}
            assert await _gone(server, "catalog/nodes/node-f")
            await until(lambda: _lacks(catalog_nodes(api), "node-f"), "the agent forgot node-f")
            auth = {"authorization": f"Bearer {token}"}
            r = await mgmt.put("/v1/agent/force-leave/node-f", headers=auth)
            assert r.status_code == 404 and "node-f" in r.text
            r = await mgmt.post("/v1/agent/force-leave/bad..name", headers=auth)
            assert r.status_code == 400
            # ... and through the CLI.
            env = {**os.environ, "HOSTMESH_SERVER": address, "HOSTMESH_TOKEN": token,
                   "HOSTMESH_CACERT": str(roots), "COLUMNS": "200"}  # fmt: skip
            done = await cli_force_leave("node-c", env)
            assert done.returncode == 0, done.stderr
            assert "node-c left" in done.stdout
            assert await _gone(server, "catalog/nodes/node-c")
            await until(lambda: _eq(passing(api), set()), "no web instance left")
            again = await cli_force_leave("node-c", env)
            assert again.returncode == 1 and "404" in again.stderr
            assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
            assert counter(server.metrics, "hostmesh_server_nodes_reaped_total",
                           reason="force_leave") == 2  # fmt: skip
            # The one SQLite server is the leader and says so on Consul's path.
            assert (await mgmt.get("/v1/status/leader")).json() == address
            nursery.cancel_scope.cancel()


@pytest.mark.sockets
@trio_test(timeout=20)
async def test_a_stored_left_record_is_removed_when_the_server_starts(tmp_path: Path) -> None:
    """A tombstone written while no leader ran (or missed by a watch) goes on the first sweep."""
    server = health_server(tmp_path, reap_after=3600.0)
    tomb = replace(light_record("gone"), left=True)
    await server.store.put("catalog/nodes/gone", encode_record(tomb))
    await server.store.put("catalog/nodes/stays", encode_record(light_record("stays")))
    async with running_server(server):
        await until(lambda: _gone(server, "catalog/nodes/gone"), "the tombstone removed")
        assert await _get(server, "catalog/nodes/stays") is not None


async def cli_force_leave(node: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``hostmesh force-leave NODE`` as an operator runs it (a real process)."""
    cmd = [HOSTMESH, "force-leave", node]
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
    )


# --- small async predicates over the store and the agent API ----------------------------


async def _get(server: Server, key: str) -> bytes | None:
    entry = await server.store.get(key)
    return entry.value if entry is not None else None


async def _gone(server: Server, key: str) -> bool:
    return await server.store.get(key) is None


async def _stored(server: Server, node: str) -> bool:
    return await server.store.get(f"catalog/nodes/{node}") is not None


async def _confirmed(server: Server, node: str) -> bool:
    value = await _get(server, f"catalog/dead/{node}")
    return value is not None and json.loads(value).get("confirmed") is True


async def _eq(got: Awaitable[set[str]], want: set[str]) -> bool:
    return await got == want


async def _lacks(got: Awaitable[set[str]], node: str) -> bool:
    return node not in await got

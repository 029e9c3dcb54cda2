"""Agent <-> server sync on real TLS websockets over loopback (and a real etcd for HA)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from conftest import agent_config, running_agent, trio_test
from etcd_cluster import EtcdCluster
from sync_env import MESH, LightAgent, light_record, node_tls, nodes_tls, start_killable

from hostmesh import ServerConfig, StoreConfig
from hostmesh._config import ServerCaConfig, SyncConfig
from hostmesh._metrics import Registry
from hostmesh.agent._sync import sync_websocket
from hostmesh.catalog import Catalog, ServiceInstance
from hostmesh.catalog._codec import decode_record
from hostmesh.catalog._syncproto import (
    MAX_MESSAGE_BYTES,
    ClientState,
    ErrorMessage,
    Hello,
    Snapshot,
    decode,
    encode,
)
from hostmesh.server import Server
from hostmesh.server._sync import SyncHub

pytestmark = pytest.mark.sockets

FAST_SYNC = SyncConfig(mesh=MESH, heartbeat_interval=0.5, heartbeat_timeout=15.0,
                       connect_timeout=2.0, backoff_base=0.05, backoff_max=0.2,
                       persist_interval=0.05)  # fmt: skip


def server_config(tmp_path: Path, name: str = "srv", **kw: object) -> ServerConfig:
    return ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path / name), **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_server(server: Server) -> AsyncIterator[str]:
    """Run ``server``; yields "host:port"; cancels it at the end."""
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.run)
        try:
            yield f"{host}:{port}"
        finally:
            nursery.cancel_scope.cancel()


def counter(metrics: Registry, name: str, **labels: str) -> float:
    """A counter's value from a registry's /metrics text."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    for line in metrics.render().splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


async def put_json(server: Server, key: str, value: object) -> int:
    rev = await server.store.put(key, json.dumps(value).encode())
    assert rev is not None
    return rev


@trio_test(timeout=30)
async def test_records_travel_between_agents_and_config_reaches_their_routers(
    tmp_path: Path,
) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    async with running_server(server) as address:
        await put_json(server, "config/traffic/web", {"rate_limit": 7})
        cfg_a = agent_config(tmp_path / "a", servers=(address,), sync=FAST_SYNC)
        cfg_b = replace(agent_config(tmp_path / "b", servers=(address,), sync=FAST_SYNC),
                        node_name="node-b")  # fmt: skip
        tls_a, tls_b = await node_tls(server, "node-a"), await node_tls(server, "node-b")
        async with (
            running_agent(cfg_a, sync_tls=tls_a) as (_, addrs_a),
            running_agent(cfg_b, sync_tls=tls_b) as (b, _),
        ):
            async with httpx.AsyncClient(base_url=addrs_a.api_url, timeout=10) as api:
                r = await api.put("/v1/agent/service/register",
                                  json={"Name": "web", "ID": "web-1", "Port": 8080})  # fmt: skip
                assert r.status_code == 200
            # A's record goes to the server (stored under catalog/nodes/node-a) and on to B.
            while (rec := b.catalog.record("node-a")) is None or not rec.services:
                await trio.sleep(0.02)
            assert [s.name for s in rec.services] == ["web"]
            entry = await server.store.get("catalog/nodes/node-a")
            assert entry is not None and decode_record(entry.value).services == rec.services
            # The config pushed before B connected is in B's router for web.
            while "web" not in b.router.snapshot.services:
                await trio.sleep(0.02)
            assert b.router.snapshot.services["web"].policy.rate_limit == 7
            # A change made now reaches it too: a delta, not a new snapshot.
            await put_json(server, "config/traffic/web", {"rate_limit": 9})
            while b.router.snapshot.services["web"].policy.rate_limit != 9:
                await trio.sleep(0.02)
            assert b.sync is not None and b.sync.last_start == "snapshot"
            # The CA bundle came with the snapshot, for the agent's TLS users.
            assert b.trust.roots_pem == server.ca.bundle_pem()
            assert (
                counter(server.metrics, "hostmesh_sync_sessions_started_total", start="snapshot")
                == 2
            )
            # B's gossip sees A die: B reports it and the server stores the report
            # (watched, not polled: the leader's probe finds A alive and may drop
            # the report again within milliseconds) ...
            async with server.store.watch("catalog/dead/") as events:
                b.catalog.set_node_dead("node-a", True)
                b.notify()
                async for event in events:
                    if event.kind == "put" and event.entry.key == "catalog/dead/node-a":
                        assert json.loads(event.entry.value)["reporters"] == ["node-b"]
                        break
            # ... and it is gone after A's next record (it is alive after all).
            b.catalog.set_node_dead("node-a", False)  # B's gossip hears from A again
            async with httpx.AsyncClient(base_url=addrs_a.api_url, timeout=10) as api:
                r = await api.put("/v1/agent/service/register",
                                  json={"Name": "api", "ID": "api-1", "Port": 8081})  # fmt: skip
                assert r.status_code == 200
            while await server.store.get("catalog/dead/node-a") is not None:
                await trio.sleep(0.02)


@trio_test(timeout=30)
async def test_reconnect_resumes_from_the_revision_unless_it_left_the_history(
    tmp_path: Path,
) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    async with running_server(server) as address:
        tls = await node_tls(server, "light")
        agent = LightAgent("light", tls)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run, address)
            await put_json(server, "config/a", 1)
            await agent.wait_for(lambda: "config/a" in agent.state.config)
            assert agent.ws is not None
            await agent.ws.aclose()
        # Changes while the agent is away; it comes back with the same state.
        await put_json(server, "config/b", 2)
        await server.store.delete("config/a")
        agent.applied.clear()
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run, address)
            # Both changes, which may come in two batches: waiting for config/b alone
            # raced the delete (seen once in a suite run).
            await agent.wait_for(lambda: "config/b" in agent.state.config
                                 and "config/a" not in agent.state.config)  # fmt: skip
            assert agent.applied[0].resumed and not any(a.snapshot for a in agent.applied)
            assert agent.ws is not None
            await agent.ws.aclose()
        # A server whose history no longer reaches the agent's revision sends a snapshot.
        server.sync._history_max = 1
        for i in range(3):
            await put_json(server, f"config/c{i}", i)
        while server.sync.revision < await server.store.current_revision():
            await trio.sleep(0.01)
        agent.applied.clear()
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run, address)
            assert agent.applied[-1].snapshot
            assert {"config/b", "config/c0", "config/c2"} <= set(agent.state.config)
            assert agent.ws is not None
            await agent.ws.aclose()
        assert counter(server.metrics, "hostmesh_sync_sessions_started_total", start="resumed") == 1


@trio_test(timeout=60)
async def test_a_slow_agent_gets_a_fresh_snapshot_and_the_server_queue_stays_bounded(
    tmp_path: Path,
) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    limit = 256 * 1024
    server.sync = hub = SyncHub(server.store, metrics=Registry(), max_queued_messages=8,
                                max_queued_bytes=limit)  # fmt: skip
    async with running_server(server) as address:
        tls = await node_tls(server, "slow")
        state = ClientState(Catalog(), "slow")
        async with sync_websocket(address, tls(), MESH) as ws:
            await ws.send_message(state.hello(light_record("slow")))
            assert state.receive(await ws.get_message()).snapshot
            # The agent stops reading while 20 MB of changes are made: more than the
            # socket buffers hold, so the server's queue for it fills.
            value = "x" * (400 * 1024)
            peak = 0
            for i in range(50):
                await put_json(server, f"config/big/{i}", {"i": i, "pad": value})
                peak = max(peak, *(s.session.queued[1] for s in hub._subscribers))
            while hub.revision < await server.store.current_revision():
                await trio.sleep(0.01)
            assert peak <= limit
            assert counter(hub.metrics, "hostmesh_sync_resyncs_total") >= 1
            # Reading again, it catches up through a fresh snapshot with the final state.
            snapshots = 0
            while state.config.get("config/big/49", (0, {}))[1].get("i") != 49:
                snapshots += state.receive(await ws.get_message()).snapshot
            assert snapshots >= 1
            assert all(f"config/big/{i}" in state.config for i in range(50))


@trio_test(timeout=40)
async def test_a_restarted_agent_serves_the_persisted_catalog_with_no_server(
    tmp_path: Path,
) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    db = ServiceInstance("db-1", "db", "", 5432)
    cfg = replace(agent_config(tmp_path / "b", sync=FAST_SYNC), node_name="node-b")
    async with running_server(server) as address:
        cfg = replace(cfg, servers=(address,))
        await put_json(server, "config/traffic/db", {"rate_limit": 3})
        other = LightAgent("node-x", await node_tls(server, "node-x"))
        other.record = light_record("node-x", services=(db,))
        tls = await node_tls(server, "node-b")
        async with trio.open_nursery() as nursery:
            await nursery.start(other.run, address)
            async with running_agent(cfg, sync_tls=tls) as (agent, _):
                while agent.catalog.record("node-x") is None:
                    await trio.sleep(0.02)
                assert agent.sync is not None
                await agent.sync.wait_persisted()
            nursery.cancel_scope.cancel()
    # The server is gone (nothing listens on its port); the agent starts again.
    async with running_agent(cfg, sync_tls=tls) as (agent, addrs):
        async with httpx.AsyncClient(base_url=addrs.api_url, timeout=10) as api:
            rows = (await api.get("/v1/catalog/service/db")).json()
        assert [(r["Node"], r["ServicePort"]) for r in rows] == [("node-x", 5432)]
        assert agent.router.snapshot.services["db"].policy.rate_limit == 3
        assert agent.sync is not None and agent.sync.connected is None


async def raw_session(address: str, tls: ssl.SSLContext, *messages: str) -> tuple[list, object]:
    """Send ``messages`` and read until the server closes; (what came back, close reason)."""
    got: list = []
    async with sync_websocket(address, tls, MESH) as ws:
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            for text in messages:
                await ws.send_message(text)
            while True:
                got.append(decode(await ws.get_message()))
    return got, ws.closed


@trio_test(timeout=40)
async def test_hostile_sessions_are_closed_counted_and_write_nothing(tmp_path: Path) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    async with running_server(server) as address:
        [tls] = await nodes_tls(server, ["node-h"])
        before = await server.store.current_revision()
        cases = [
            ("malformed", ["this is not json"], 1008),
            ("unexpected", [encode(Snapshot(1, (), False))], 1008),
            ("identity", [encode(Hello("node-h", 0, light_record("evil")))], 1008),
            ("identity", [encode(Hello("evil", 0, light_record("evil")))], 1008),
            ("too_large", ["x" * (MAX_MESSAGE_BYTES + 1)], 1009),
        ]
        for reason, messages, code in cases:
            seen = counter(server.metrics, "hostmesh_sync_sessions_closed_total", reason=reason)
            got, closed = await raw_session(address, tls(), *messages)
            assert getattr(closed, "code", None) == code, (reason, closed)
            if code == 1008:  # a clear error before the close
                assert isinstance(got[-1], ErrorMessage) and got[-1].reason.startswith(reason)
            assert counter(server.metrics, "hostmesh_sync_sessions_closed_total",
                           reason=reason) == seen + 1  # fmt: skip
        # A client without a node certificate is refused at the websocket handshake.
        anonymous = ssl.create_default_context(cadata=server.ca.bundle_pem().decode())
        anonymous.check_hostname = False
        with pytest.RaisesGroup(trio_websocket.ConnectionRejected, flatten_subgroups=True,
                                allow_unwrapped=True) as info:  # fmt: skip
            async with sync_websocket(address, anonymous, MESH):
                pass
        assert info.value.exceptions[0].status_code == 403
        assert counter(server.metrics, "hostmesh_sync_sessions_closed_total",
                       reason="no_certificate") == 1  # fmt: skip
        assert await server.store.current_revision() == before  # nothing written
        assert await server.store.list("catalog/") == []
        # The server still serves a well-behaved agent.
        good = LightAgent("node-h", tls)
        async with trio.open_nursery() as nursery:
            await nursery.start(good.run, address)
            while await server.store.get("catalog/nodes/node-h") is None:
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()


@trio_test(timeout=60)
async def test_a_hundred_agents_see_a_config_change_within_a_second(tmp_path: Path) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    async with running_server(server) as address:
        names = [f"agent-{i}" for i in range(100)]
        agents = [LightAgent(n, t) for n, t in zip(names, await nodes_tls(server, names),
                                                   strict=True)]  # fmt: skip
        async with trio.open_nursery() as nursery:
            for agent in agents:
                await nursery.start(agent.run, address)
            assert server.sync.sessions == 100
            key = "config/traffic/web"
            start = trio.current_time()
            await put_json(server, key, {"routes": [], "rate_limit": 42})

            async def seen(agent: LightAgent) -> None:
                await agent.wait_for(lambda: key in agent.state.config)

            async with trio.open_nursery() as waiters:
                for agent in agents:
                    waiters.start_soon(seen, agent)
            elapsed = trio.current_time() - start
            assert elapsed < 1.0, f"the last agent saw the change after {elapsed:.3f} s"
            assert all(a.state.config[key][1]["rate_limit"] == 42 for a in agents)
            # The agents' records reached the store and each other, too.
            assert len(await server.store.list("catalog/nodes/")) == 100
            await agents[0].wait_for(lambda: len(agents[0].catalog) == 99)
            nursery.cancel_scope.cancel()


def test_an_agent_fails_over_to_the_second_server_on_one_etcd(tmp_path: Path) -> None:
    key_file = tmp_path / "seal.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o600)
    with EtcdCluster(tmp_path / "etcd", size=1) as etcd:

        @trio_test(timeout=60)
        async def scenario() -> None:
            store = StoreConfig(backend="etcd", endpoints=tuple(etcd.endpoints))
            ca = ServerCaConfig(sealing_key_file=str(key_file))
            servers = [Server(server_config(tmp_path, f"s{i}", store=store, ca=ca),
                              print_token=False) for i in (1, 2)]  # fmt: skip
            scopes: list[trio.CancelScope] = []
            addresses: list[str] = []
            async with trio.open_nursery() as nursery:
                for server in servers:  # each in its own scope, so that one can die alone
                    scope, address = await start_killable(nursery, server)
                    scopes.append(scope)
                    addresses.append(address)
                # One CA for both: the second server loaded the state the first made.
                assert servers[0].ca.bundle_pem() == servers[1].ca.bundle_pem()
                cfg = replace(agent_config(tmp_path / "agent", servers=tuple(addresses),
                                           sync=FAST_SYNC))  # fmt: skip
                tls = await node_tls(servers[0], "node-a")
                async with running_agent(cfg, sync_tls=tls) as (agent, _):
                    assert agent.sync is not None
                    while agent.sync.connected is None:
                        await trio.sleep(0.02)
                    first = addresses.index(agent.sync.connected)
                    await put_json(servers[first], "config/traffic/web", {"rate_limit": 1})
                    while "config/traffic/web" not in agent.sync.state.config:
                        await trio.sleep(0.02)
                    scopes[first].cancel()  # that server dies
                    other = servers[1 - first]
                    # A change written through the surviving server reaches the agent.
                    await put_json(other, "config/traffic/web", {"rate_limit": 2})
                    while agent.sync.connected != addresses[1 - first]:
                        await trio.sleep(0.02)
                    while agent.sync.state.config["config/traffic/web"][1]["rate_limit"] != 2:
                        await trio.sleep(0.02)
                    # It resumed from its revision: the survivor's history covers it.
                    assert agent.sync.last_start == "resumed"
                    entry = await other.store.get("catalog/nodes/node-a")
                    assert entry is not None
                nursery.cancel_scope.cancel()

        scenario()


@trio_test(timeout=30)
async def test_gossip_deaths_merge_into_the_store_by_record_version(tmp_path: Path) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    async with running_server(server) as address:
        tls_x, tls_r, tls_s = await nodes_tls(server, ["node-x", "rep-1", "rep-2"])
        x, r1, r2 = (
            LightAgent("node-x", tls_x),
            LightAgent("rep-1", tls_r),
            LightAgent("rep-2", tls_s),
        )
        x.record = light_record("node-x", version=3)
        async with trio.open_nursery() as nursery:
            for agent in (x, r1, r2):
                await nursery.start(agent.run, address)
            while await server.store.get("catalog/nodes/node-x") is None:
                await trio.sleep(0.02)
            assert r1.ws is not None and r2.ws is not None
            # A stale report (of version 2; the store has 3) is dropped.
            await r1.ws.send_message(ClientState.deaths_message([("node-x", 1, 2)]))
            # Two agents report version 3 dead: one report, both reporters.
            await r1.ws.send_message(ClientState.deaths_message([("node-x", 1, 3)]))
            await r2.ws.send_message(ClientState.deaths_message([("node-x", 1, 3)]))
            while (entry := await server.store.get("catalog/dead/node-x")) is None or len(
                json.loads(entry.value)["reporters"]
            ) < 2:
                await trio.sleep(0.02)
            report = json.loads(entry.value)
            assert (report["generation"], report["version"]) == (1, 3)
            assert sorted(report["reporters"]) == ["rep-1", "rep-2"]
            assert report["confirmed"] is False  # the leader's probe confirms, not gossip
            # Every agent sees the report; unconfirmed, it takes nobody out of service.
            await r1.wait_for(lambda: "node-x" in r1.state.deaths)
            assert r1.catalog.node_live("node-x")
            # node-x is alive after all and says so with a newer record: the report goes.
            assert x.ws is not None
            await x.ws.send_message(ClientState.record(light_record("node-x", version=4)))
            while await server.store.get("catalog/dead/node-x") is not None:
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()


@trio_test(timeout=30)
async def test_a_silent_agent_is_dropped_after_the_heartbeat_timeout(tmp_path: Path) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    server.sync.heartbeat_timeout = 0.5
    async with running_server(server) as address:
        [tls] = await nodes_tls(server, ["mute"])
        got, closed = await raw_session(
            address, tls(), encode(Hello("mute", 0, light_record("mute")))
        )
        assert any(isinstance(m, Snapshot) for m in got)
        assert isinstance(got[-1], ErrorMessage) and got[-1].reason.startswith("heartbeat_timeout")
        assert getattr(closed, "code", None) == 1008
        reason = "heartbeat_timeout"
        assert counter(server.metrics, "hostmesh_sync_sessions_closed_total", reason=reason) == 1


@trio_test(timeout=30)
async def test_revoking_a_node_ends_its_session_and_refuses_it_after(tmp_path: Path) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    async with running_server(server) as address:
        [tls] = await nodes_tls(server, ["node-r"])
        agent = LightAgent("node-r", tls)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run, address)
            assert server.ca_keeper is not None
            await server.ca_keeper.update(
                lambda ca: ca.revoke_node("node-r", now=datetime.now(UTC))
            )
            await agent.wait_for(lambda: any(a.error for a in agent.applied))
        assert next(a.error for a in agent.applied if a.error).startswith("revoked")
        assert counter(server.metrics, "hostmesh_sync_sessions_closed_total", reason="revoked") == 1
        # Its certificate no longer identifies it: the sync is refused at the handshake.
        with pytest.RaisesGroup(
            trio_websocket.ConnectionRejected, flatten_subgroups=True, allow_unwrapped=True
        ):
            async with sync_websocket(address, tls(), MESH):
                pass


@trio_test(timeout=30)
async def test_an_agent_leaves_a_silent_server_and_comes_back_resumed(tmp_path: Path) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    server.sync.heartbeat_interval = 3600.0  # this server never heartbeats
    sync = replace(FAST_SYNC, heartbeat_interval=0.2, heartbeat_timeout=0.6)
    cfg = agent_config(tmp_path / "a", sync=sync)
    async with running_server(server) as address:
        tls = await node_tls(server, "node-a")
        async with running_agent(replace(cfg, servers=(address,)), sync_tls=tls) as (agent, _):
            assert agent.sync is not None
            while counter(agent.metrics, "hostmesh_sync_client_sessions_total",
                          result="heartbeat_timeout") < 1:  # fmt: skip
                await trio.sleep(0.05)
            while agent.sync.connected is None:
                await trio.sleep(0.02)
            assert agent.sync.last_start == "resumed"


@trio_test(timeout=30)
async def test_an_agent_woken_often_with_nothing_to_send_still_heartbeats(tmp_path: Path) -> None:
    # Catalog changes poke the sender; a poke that sends nothing must not push the
    # heartbeat back, or a busy agent looks silent and the server drops it.
    server = Server(server_config(tmp_path), print_token=False)
    server.sync.heartbeat_timeout = 1.0
    sync = replace(FAST_SYNC, heartbeat_interval=0.3)
    cfg = agent_config(tmp_path / "a", sync=sync)
    async with running_server(server) as address:
        tls = await node_tls(server, "node-a")
        async with running_agent(replace(cfg, servers=(address,)), sync_tls=tls) as (agent, _):
            assert agent.sync is not None
            while agent.sync.connected is None:
                await trio.sleep(0.02)
            for _ in range(40):  # 4 s: four of the server's silence limits
                agent.sync.poke()
                await trio.sleep(0.1)
            closed = counter(server.metrics, "hostmesh_sync_sessions_closed_total",
                             reason="heartbeat_timeout")  # fmt: skip
            assert closed == 0 and agent.sync.connected is not None


def _pushed_intentions(tmp_path: Path, config: dict[str, object]) -> str:
    """What an agent decides for web -> db from the config entries a server pushed."""
    from hostmesh.agent._sync import SyncClient

    cfg = agent_config(tmp_path, servers=("127.0.0.1:4150",))
    client = SyncClient(cfg, Catalog(), lambda: light_record("node-a"), ssl.create_default_context)
    client.state.config.update({key: (1, value) for key, value in config.items()})
    return client.intentions().decide("web", "db").reason


def test_pushed_intentions_and_their_default_reach_the_decision(tmp_path: Path) -> None:
    rule = {"source": "web", "destination": "db", "action": "deny"}
    assert "before any" not in _pushed_intentions(tmp_path, {})
    assert _pushed_intentions(tmp_path, {}).startswith("allowed by the default policy (allow)")
    denied = _pushed_intentions(tmp_path, {"config/intentions/db/web": rule})
    assert denied.startswith("denied by intention web -> db deny")
    by_default = _pushed_intentions(tmp_path, {"config/intentions-default": {"default": "deny"}})
    assert by_default.startswith("denied by the default policy (deny)")


@pytest.mark.parametrize(
    "config",
    [
        {"config/intentions/db/web": {"source": "web", "destination": "db", "action": "maybe"}},
        {"config/intentions/db/web": ["not", "an", "object"]},
        {"config/intentions-default": {"default": "sometimes"}},
        {"config/intentions-default": "allow"},
    ],
)
def test_a_broken_pushed_intention_denies_rather_than_guessing(
    tmp_path: Path, config: dict[str, object]
) -> None:
    # A server (or a tampered store) pushing a rule that does not parse must not
    # turn into "no such rule": the agent denies until a good set arrives.
    assert _pushed_intentions(tmp_path, config).startswith("denied by the default policy (deny)")

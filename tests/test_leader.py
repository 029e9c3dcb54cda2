"""Leader election through the store: the lease bookkeeping alone, elections on a real etcd,
and a leader server crashing in a cluster of three on a real 3-member etcd."""

from __future__ import annotations

import base64
import functools
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from conftest import agent_config, trio_test
from etcd_cluster import EtcdCluster
from sync_env import light_record, node_tls, server_verify, start_killable
from test_sync import FAST_SYNC, counter

from hostmesh import ServerConfig, StoreConfig
from hostmesh._config import HealthConfig, ServerCaConfig
from hostmesh._metrics import Registry
from hostmesh.agent import Agent
from hostmesh.catalog import NodeRecord
from hostmesh.catalog._codec import encode_record
from hostmesh.server import EtcdStore, Server
from hostmesh.server._leader import LEADER_KEY, LEASE_TTL, LeaderElection
from hostmesh.server._leadership import KEEPALIVE_RETRY, Leadership, leader_address
from hostmesh.server._store import Entry

# --- the lease bookkeeping (no I/O) ------------------------------------------------------


def test_a_leader_renews_at_a_third_of_the_ttl_and_steps_down_at_its_end() -> None:
    lead = Leadership(ttl=6)
    assert not lead.still_leader(0)
    lead.acquired(sent_at=100.0)  # counted from when the grant was *sent*
    assert lead.still_leader(100.0) and lead.next_keepalive == 102.0
    assert lead.expires == 106.0
    lead.renewed_at(102.0)
    assert lead.next_keepalive == 104.0 and lead.expires == 108.0
    lead.renewed_at(101.0)  # a late answer to an older keepalive does not move it back
    assert lead.expires == 108.0
    # The store does not answer: retried soon, never past the lease's end ...
    assert lead.retry_after_failure(104.0) == 104.0 + KEEPALIVE_RETRY
    assert lead.retry_after_failure(107.9) == 108.0
    # ... and at the end the server is no longer the leader, whatever the store says later.
    assert lead.retry_after_failure(108.0) is None
    assert not lead.still_leader(108.0)
    lead.lost()
    assert not lead.still_leader(105.0)


def test_the_leader_key_names_the_leader() -> None:
    def entry(value: bytes) -> Entry:
        return Entry(LEADER_KEY, value, 1, 1, 7)

    assert leader_address(entry(b'{"address":"10.0.0.1:4150","server":"s1"}')) == "10.0.0.1:4150"
    assert leader_address(None) == ""
    for bad in (b"", b"[]", b'{"address":5}', b"\xff"):
        assert leader_address(entry(bad)) == ""


# --- elections on a real etcd --------------------------------------------------------------


@pytest.mark.sockets
def test_one_leader_and_its_duties_move_on_resign_and_on_crash(tmp_path: Path) -> None:
    ttl = 2
    with EtcdCluster(tmp_path / "etcd", size=1) as etcd:

        @trio_test(timeout=30)
        async def scenario() -> None:
            stores = [EtcdStore(etcd.endpoints) for _ in range(3)]
            registries = [Registry() for _ in stores]
            elections = [
                LeaderElection(s, single=False, name=f"s{i}", ttl=ttl, metrics=m)
                for i, (s, m) in enumerate(zip(stores, registries, strict=True))
            ]
            running: list[str] = []  # whose duty runs now
            scopes = []

            async def duty(name: str) -> None:
                running.append(name)
                try:
                    await trio.sleep_forever()
                finally:
                    running.remove(name)

            async with trio.open_nursery() as nursery:
                for i, election in enumerate(elections):
                    election.address = f"10.0.0.{i}:4150"
                    scope = trio.CancelScope()
                    scopes.append(scope)

                    async def run(
                        election: LeaderElection = election,
                        scope: trio.CancelScope = scope,
                        *,
                        task_status: trio.TaskStatus[None],
                    ) -> None:
                        with scope:
                            await election.run(task_status=task_status)

                    await nursery.start(run)
                    name = election.name
                    nursery.start_soon(election.run_while_leader, functools.partial(duty, name))

                async def one_leader(among: list[LeaderElection]) -> LeaderElection:
                    while True:
                        leaders = [e for e in among if e.is_leader]
                        assert len(leaders) <= 1, [e.name for e in leaders]
                        addresses = {e.leader_address for e in among}
                        if (
                            leaders
                            and addresses == {leaders[0].address}
                            and running == [leaders[0].name]
                        ):
                            return leaders[0]
                        await trio.sleep(0.02)

                first = await one_leader(elections)
                entry = await stores[0].get(LEADER_KEY)
                assert entry is not None and entry.lease != 0  # held under a lease
                assert json.loads(entry.value)["server"] == first.name
                # A graceful stop revokes the lease: another server leads almost at once.
                start = trio.current_time()
                scopes[elections.index(first)].cancel()
                rest = [e for e in elections if e is not first]
                second = await one_leader(rest)
                assert trio.current_time() - start < 1.0
                changes = registries[elections.index(first)]
                assert counter(changes, "hostmesh_server_leader_changes_total", change="lost") == 1
                # A crash (no revoke): the lease must run out first, then the duties move.
                second.resign_on_exit = False
                start = trio.current_time()
                scopes[elections.index(second)].cancel()
                [third] = [e for e in rest if e is not second]
                assert await one_leader([third]) is third
                elapsed = trio.current_time() - start
                assert ttl / 2 <= elapsed <= ttl + 2.0, elapsed
                # Someone deletes the key under the leader's live lease: the leader notices
                # at its next keepalive, steps down (its duty stops) and campaigns again.
                mine = registries[elections.index(third)]
                await stores[0].delete(LEADER_KEY)
                while counter(mine, "hostmesh_server_leader_changes_total", change="lost") < 1:
                    await trio.sleep(0.02)
                assert await one_leader([third]) is third
                assert counter(mine, "hostmesh_server_leader_changes_total", change="acquired") == 2
                nursery.cancel_scope.cancel()
            for store in stores:
                await store.aclose()

        scenario()


@pytest.mark.sockets
def test_a_leader_that_cannot_reach_the_store_steps_down_before_its_lease_ends(
    tmp_path: Path,
) -> None:
    ttl = 2
    with EtcdCluster(tmp_path / "etcd", size=1) as etcd:

        @trio_test(timeout=30)
        async def scenario() -> None:
            store = EtcdStore(etcd.endpoints, request_timeout=0.5, failover_timeout=30)
            election = LeaderElection(store, single=False, name="s0", ttl=ttl)
            election.address = "10.0.0.1:4150"
            stopped: list[float] = []
            done = trio.Event()

            async def duty() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    stopped.append(trio.current_time())
                    done.set()

            async with trio.open_nursery() as nursery:
                await nursery.start(election.run)
                assert election.is_leader
                nursery.start_soon(election.run_while_leader, duty)
                # etcd dies: keepalives fail (the store would keep retrying for 30 s).
                await trio.to_thread.run_sync(etcd.kill, etcd.endpoints[0])
                killed = trio.current_time()
                await done.wait()
                # The duty stopped no later than the lease could have run out in etcd,
                # so no other server could have taken over while this one still acted.
                assert not election.is_leader and len(stopped) == 1
                assert stopped[0] - killed <= ttl + 0.2, stopped[0] - killed
                assert election.leader_address != "10.0.0.1:4150"  # it no longer claims it
                nursery.cancel_scope.cancel()
            await store.aclose()

        scenario()


# --- a cluster of three servers on a 3-member etcd ---------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.sockets
def test_killing_the_leader_server_moves_its_duties_and_its_agents(tmp_path: Path) -> None:
    key_file = tmp_path / "seal.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o600)
    with EtcdCluster(tmp_path / "etcd", size=3, heartbeat_ms=100, election_ms=1000) as etcd:

        @trio_test(timeout=60)
        async def scenario() -> None:
            store = StoreConfig(backend="etcd", endpoints=tuple(etcd.endpoints))
            ca = ServerCaConfig(sealing_key_file=str(key_file))
            health = HealthConfig(probe_timeout=0.3, probe_attempts=2, probe_pause=0.05,
                                  sweep_interval=0.3)  # fmt: skip
            servers = [
                Server(ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path / f"s{i}"),
                                    store=store, ca=ca, health=health), print_token=False)
                for i in range(3)
            ]  # fmt: skip
            scopes: list[trio.CancelScope] = []
            addresses: list[str] = []
            async with trio.open_nursery() as nursery:
                for server in servers:  # each in its own scope, so that one can die alone
                    scope, address = await start_killable(nursery, server)
                    scopes.append(scope)
                    addresses.append(address)
                leader = await _the_one_leader(servers, addresses)
                li = servers.index(leader)
                # Every server names the same leader on Consul's path.
                for address in addresses:
                    async with httpx.AsyncClient(verify=server_verify(leader), timeout=10) as http:
                        r = await http.get(f"https://{address}/v1/status/leader")
                    assert r.json() == addresses[li]
                # A real agent, synced with the leader (its list puts the leader first).
                cfg = agent_config(tmp_path / "agent", servers=tuple(addresses), sync=FAST_SYNC)
                agent = Agent(cfg, sync_tls=await node_tls(leader, "node-a"))
                assert agent.sync is not None
                agent.sync.servers = [addresses[li]] + [a for a in addresses if a != addresses[li]]
                async with trio.open_nursery() as agents:
                    await agents.start(functools.partial(agent.run, handle_signals=False))
                    while agent.sync.connected != addresses[li]:
                        await trio.sleep(0.02)
                    # The leader crashes: no revoke, its lease has to run out.
                    leader.leader.resign_on_exit = False
                    start = trio.current_time()
                    scopes[li].cancel()
                    rest = [s for s in servers if s is not leader]
                    new = await _the_one_leader(rest, [addresses[servers.index(s)] for s in rest])
                    elapsed = trio.current_time() - start
                    assert elapsed <= LEASE_TTL + 3.0, f"no new leader after {elapsed:.1f} s"
                    # ... and not before the dead leader's lease ran out (renewed every
                    # TTL/3, so at least 2/3 of the TTL was left when it died).
                    assert elapsed >= LEASE_TTL * 2 / 3 - 0.5, elapsed
                    assert counter(new.metrics, "hostmesh_server_leader_changes_total",
                                   change="acquired") == 1  # fmt: skip
                    # The agent reconnected to a surviving server.
                    while agent.sync.connected not in [addresses[servers.index(s)] for s in rest]:
                        await trio.sleep(0.02)
                    # The new leader runs the duties: a death report about a node whose
                    # gossip port is closed is confirmed by it, and the agent acts on it.
                    dead = _record("node-d", closed_port())
                    await new.store.put("catalog/nodes/node-d", encode_record(dead))
                    while agent.catalog.record("node-d") is None:
                        await trio.sleep(0.02)
                    report = {"generation": 1, "version": 1, "reporters": ["node-a"],
                              "confirmed": False}  # fmt: skip
                    await new.store.put("catalog/dead/node-d", json.dumps(report).encode())
                    while agent.catalog.node_live("node-d"):
                        await trio.sleep(0.02)
                    entry = await new.store.get("catalog/dead/node-d")
                    assert entry is not None
                    assert json.loads(entry.value)["confirmed_by"] == new.leader.name
                    assert counter(new.metrics, "hostmesh_server_deaths_total",
                                   outcome="confirmed") == 1  # fmt: skip
                    agents.cancel_scope.cancel()
                nursery.cancel_scope.cancel()

        scenario()


def _record(node: str, gossip_port: int) -> NodeRecord:
    rec = light_record(node)
    return replace(rec, node=replace(rec.node, meta={"gossip_port": str(gossip_port)}))


async def _the_one_leader(servers: list[Server], addresses: list[str]) -> Server:
    """Wait until exactly one of ``servers`` leads and all of them know its address."""
    while True:
        leaders = [s for s in servers if s.leader.is_leader]
        assert len(leaders) <= 1
        if leaders:
            want = addresses[servers.index(leaders[0])]
            if all(s.leader.leader_address == want for s in servers):
                return leaders[0]
        await trio.sleep(0.02)

"""Two real agents gossiping over real UDP and TCP sockets on loopback."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from conftest import agent_config, trio_test

from hostmesh import GossipConfig
from hostmesh.agent import Agent

pytestmark = pytest.mark.sockets

FAST = GossipConfig.for_profile("local", bind="127.0.0.1:0", join_backoff=0.1)


async def until(check, within: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(within):
        while not await check():
            await trio.sleep(0.05)


@trio_test(timeout=60)
async def test_agents_share_services_and_see_a_leave(tmp_path: Path) -> None:
    a = Agent(agent_config(tmp_path / "a", gossip=FAST, az="az-a"))
    async with trio.open_nursery() as nursery:
        addrs_a = await nursery.start(functools.partial(a.run, handle_signals=False))
        cfg_b = agent_config(
            tmp_path / "b", gossip=replace(FAST, seeds=(addrs_a.gossip,)), az="az-b"
        )
        b = Agent(replace(cfg_b, node_name="node-b"))
        scope_b = trio.CancelScope()

        async def run_b(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
            with scope_b:
                await b.run(handle_signals=False, task_status=task_status)

        addrs_b = await nursery.start(run_b)
        async with httpx.AsyncClient(base_url=addrs_a.api_url, timeout=5) as http_a, \
                httpx.AsyncClient(base_url=addrs_b.api_url, timeout=5) as http_b:  # fmt: skip
            await http_b.put("/v1/agent/service/register", json={"Name": "db", "Port": 5432})

            async def a_sees_db() -> bool:
                return bool((await http_a.get("/v1/health/service/db?passing")).json())

            await until(a_sees_db)
            entry = (await http_a.get("/v1/health/service/db")).json()[0]
            assert entry["Node"]["Node"] == "node-b"
            assert entry["Node"]["Locality"]["Zone"] == "az-b"
            members = (await http_a.get("/v1/agent/members")).json()
            assert {(m["Name"], m["State"]) for m in members} == {
                ("node-a", "alive"), ("node-b", "alive")}  # fmt: skip

            # DNS on agent A answers for B's service.
            out = await trio.run_process(
                ["dig", "@127.0.0.1", "-p", str(addrs_a.dns[1]), "db.svc.mesh", "+short"],
                capture_stdout=True,
            )
            assert out.stdout.decode().split() == ["127.0.0.1"]

            # B leaves gracefully: A drops its instances at once, marks it left.
            await b.leave()
            scope_b.cancel()

            async def a_forgot_db() -> bool:
                return not (await http_a.get("/v1/health/service/db?passing")).json()

            await until(a_forgot_db, 5)
            members = {
                m["Name"]: m["State"] for m in (await http_a.get("/v1/agent/members")).json()
            }
            assert members["node-b"] == "left"
        nursery.cancel_scope.cancel()


@trio_test(timeout=60)
async def test_keyring_rotation_through_the_api_reaches_both_agents(tmp_path: Path) -> None:
    import base64
    import json

    old = base64.b64encode(bytes(range(32))).decode()
    new = base64.b64encode(bytes(range(1, 33))).decode()
    keyed = replace(FAST, keyring=(old,))
    a = Agent(agent_config(tmp_path / "a", gossip=keyed))
    async with trio.open_nursery() as nursery:
        addrs_a = await nursery.start(functools.partial(a.run, handle_signals=False))
        gossip_b = replace(keyed, seeds=(addrs_a.gossip,))
        b = Agent(replace(agent_config(tmp_path / "b", gossip=gossip_b), node_name="node-b"))
        await nursery.start(functools.partial(b.run, handle_signals=False))
        async with httpx.AsyncClient(base_url=addrs_a.api_url, timeout=20) as http:

            async def both_members() -> bool:
                return len((await http.get("/v1/agent/members")).json()) == 2

            await until(both_members)
            for method in ("POST", "PUT"):
                r = await http.request(method, "/v1/operator/keyring", json={"Key": new})
                assert r.status_code == 200, r.text
            (listing,) = (await http.get("/v1/operator/keyring")).json()
            assert listing["Keys"] == {old: 2, new: 2} and listing["PrimaryKeys"] == {new: 2}
            r = await http.request("DELETE", "/v1/operator/keyring", json={"Key": old})
            assert r.status_code == 200, r.text
            # Both agents persisted the rotated keyring for their next start.
            for agent in (a, b):
                assert json.loads(agent.keyring_path.read_text()) == [new]
            # Removing the primary fails on every member, with the reason.
            r = await http.request("DELETE", "/v1/operator/keyring", json={"Key": new})
            assert r.status_code == 500 and "primary" in r.text
            r = await http.post("/v1/operator/keyring", json={"Key": "not base64!"})
            assert r.status_code == 500 and "2 member(s) failed" in r.text
            assert len((await http.get("/v1/agent/members")).json()) == 2
        nursery.cancel_scope.cancel()

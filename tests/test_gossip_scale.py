"""1,000 simulated members: stability, failure detection and dissemination.

Membership is bootstrapped as a settled cluster (see start_settled_cluster);
joining from scratch is tested with 150 members here and measured at 1,000 by
bench/gossip_sim.py.
"""

from __future__ import annotations

import trio
from conftest import trio_test
from gossip_cluster import converged, kill, start_cluster, start_settled_cluster
from simnet import SimNetwork

from hostmesh import GossipConfig
from hostmesh.catalog import Node
from hostmesh.catalog._messages import MemberStatus
from hostmesh.catalog._suspicion import suspicion_timeout_bounds

LAN = GossipConfig()


@trio_test(timeout=600, mock_clock=True)
async def test_thousand_members_detect_a_death_and_spread_a_change() -> None:
    n = 1000
    net = SimNetwork(latency=0.002, seed=1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        members = await start_settled_cluster(nursery, net, n, LAN)

        # Stable: 10 simulated seconds of probing on a quiet network, no false deaths.
        await trio.sleep(10)
        assert converged(members, n)
        assert sum(m.swim.stats.get("status_dead", 0) for m in members) == 0

        # A record change reaches 99.9% of the members in about 2 s (Serf's model:
        # 10 rounds of 200 ms at fanout 3 for 1,000 nodes).
        source = members[123]
        source.update_record(node=Node(source.name, "10.0.0.124", az="az-new"))
        start = trio.current_time()
        reached: dict[float, int] = {}
        while trio.current_time() - start < 4.0:
            await trio.sleep(0.1)
            have = sum(1 for m in members if m.catalog.record(source.name).node.az == "az-new")  # type: ignore[union-attr]
            reached[round(trio.current_time() - start, 1)] = have
            if have == n:
                break
        t999 = min(t for t, have in reached.items() if have >= 0.999 * n)
        assert t999 <= 2.5, reached

        # A killed member is dead everywhere within the Lifeguard bounds.
        victim = members[500]
        kill(net, victim)
        others = [m for m in members if m is not victim]
        start = trio.current_time()
        while not all(m.status_of(victim.name) is MemberStatus.DEAD for m in others):
            await trio.sleep(0.25)
        elapsed = trio.current_time() - start
        low, high = suspicion_timeout_bounds(4, 6, n, LAN.probe_interval)  # 12 s, 72 s
        assert low <= elapsed <= high + 5 * LAN.probe_interval
        # Only the victim died.
        dead = {name for m in others for name, x in m.swim.members.items()
                if x.status is MemberStatus.DEAD}  # fmt: skip
        assert dead == {victim.name}
        nursery.cancel_scope.cancel()


@trio_test(timeout=600, mock_clock=True)
async def test_one_hundred_fifty_members_join_from_scratch_and_converge() -> None:
    n = 150
    net = SimNetwork(latency=0.002, seed=150)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        members = await start_cluster(nursery, net, n, LAN)
        start = trio.current_time()
        while not (converged(members, n) and all(len(m.catalog) == n for m in members)):
            await trio.sleep(0.5)
            assert trio.current_time() - start < 120
        assert sum(m.swim.stats.get("status_dead", 0) for m in members) == 0
        nursery.cancel_scope.cancel()

#!/usr/bin/env python3
"""Gossip at scale, from scratch: N members join, converge, detect a death.

    python bench/gossip_sim.py [--nodes 1000] [--latency 0.002] [--loss 0.0]

Runs the real SWIM state machine and Trio adapter for every member in one
``trio.run`` over the simulator's in-memory network (tests/simnet.py) on a
MockClock, and prints simulated and wall times: when every member knew every
other member and record, and how long until a killed member was known dead
everywhere (Lifeguard bounds: min = 4 x max(1, log10 N) s, max = 6 x min).
CI runs the same code at 150 members from scratch and at 1,000 from a settled
start (tests/test_gossip_scale.py); this is the full 1,000-member join, which
needs minutes of CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gossip_cluster import converged, kill, start_cluster
from simnet import SimNetwork

from hostmesh import GossipConfig
from hostmesh.catalog._messages import MemberStatus
from hostmesh.catalog._suspicion import suspicion_timeout_bounds


async def run(n: int, latency: float, loss: float) -> dict[str, float]:
    config = GossipConfig()
    net = SimNetwork(latency=latency, loss=loss, seed=n)
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        members = await start_cluster(nursery, net, n, config)
        start = trio.current_time()
        while not (converged(members, n) and all(len(m.catalog) == n for m in members)):
            await trio.sleep(0.5)
        out["converged_s"] = trio.current_time() - start
        victim = members[n // 2]
        kill(net, victim)
        others = [m for m in members if m is not victim]
        start = trio.current_time()
        while not all(m.status_of(victim.name) is MemberStatus.DEAD for m in others):
            await trio.sleep(0.25)
        out["dead_everywhere_s"] = trio.current_time() - start
        out["packets"] = net.sent
        nursery.cancel_scope.cancel()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.002)
    parser.add_argument("--loss", type=float, default=0.0)
    args = parser.parse_args()
    wall = time.monotonic()
    result = trio.run(run, args.nodes, args.latency, args.loss,
                      clock=trio.testing.MockClock(autojump_threshold=0))  # fmt: skip
    low, high = suspicion_timeout_bounds(4, 6, args.nodes, 1.0)
    print(f"members {args.nodes}, latency {args.latency * 1000:g} ms, loss {args.loss:.0%}")
    print(f"joined and converged (members and records): {result['converged_s']:.1f} s simulated")
    print(f"killed member dead everywhere: {result['dead_everywhere_s']:.1f} s simulated "
          f"(Lifeguard bounds {low:g}..{high:g} s)")  # fmt: skip
    print(f"packets sent: {result['packets']:.0f}; wall time {time.monotonic() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Gossip at N = 10, 100, 1,000: detection, dissemination and bandwidth vs the models.

    python bench/gossip.py [--nodes 10 100 1000] [--latency 0.002] [--out FILE]

Runs the real SWIM state machine and Trio adapter of every member in one
``trio.run`` over the simulator's in-memory network (tests/simnet.py) on a
MockClock, with memberlist's LAN defaults. Each cluster starts settled (every
member knows every other, as after joining; bench/gossip_sim.py measures the
join itself) and then:

1. runs 10 simulated seconds of quiet probing: bytes per second per node;
2. changes one member's record and samples every 50 ms how many members have
   it: time to 50 / 99 / 99.9 % next to Serf's convergence model (an
   epidemic with fanout 3 every 200 ms; Serf quotes 8 rounds at 100 nodes and
   10 at 1,000 for 99.9 %) and the bytes per second per node meanwhile;
3. kills a member: time to the first suspicion next to SWIM's expected
   e/(e-1) probe periods, and until every member knows it dead next to the
   Lifeguard bounds (min = 4 x max(1, log10 N) s, max = 6 x min).

5,000 members do not fit in a few minutes here (1,000 take about two).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gossip_cluster import converged, kill, start_settled_cluster
from simnet import SimNetwork

from hostmesh import GossipConfig
from hostmesh.catalog import Node
from hostmesh.catalog._messages import MemberStatus
from hostmesh.catalog._suspicion import suspicion_timeout_bounds

SAMPLE = 0.05  # s of simulated time between samples
QUIET = 10.0  # s of simulated quiet probing for the baseline bandwidth
SERF_ROUNDS = {100: 8, 1000: 10, 10000: 11}  # Serf's published 99.9 % figures


def epidemic_rounds(n: int, fanout: int, share: float) -> int:
    """Rounds until ``share`` of ``n`` members are informed (push epidemic model).

    Each round every informed member tells ``fanout`` members at random, so an
    uninformed member stays uninformed with probability (1 - 1/n) ** (fanout * informed).
    """
    informed = 1.0
    rounds = 0
    while informed < share * n and rounds < 100:
        informed = n - (n - informed) * (1 - 1 / n) ** (fanout * informed)
        rounds += 1
    return rounds


def first_time(samples: list[tuple[float, int]], count: float) -> float:
    return min((t for t, have in samples if have >= count), default=math.inf)


async def measure(n: int, latency: float) -> dict[str, float]:
    config = GossipConfig()
    net = SimNetwork(latency=latency, seed=n)
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(net.run)
        members = await start_settled_cluster(nursery, net, n, config)

        before = net.bytes_sent
        await trio.sleep(QUIET)
        out["quiet_bps"] = (net.bytes_sent - before) / QUIET / n
        out["false_deaths"] = sum(m.swim.stats.get("status_dead", 0) for m in members)
        assert converged(members, n)

        source = members[n // 3]
        source.update_record(node=Node(source.name, source.record.node.address, az="az-new"))
        start, before = trio.current_time(), net.bytes_sent
        samples: list[tuple[float, int]] = []
        while True:
            await trio.sleep(SAMPLE)
            records = [m.catalog.record(source.name) for m in members]
            have = sum(1 for r in records if r is not None and r.node.az == "az-new")
            samples.append((trio.current_time() - start, have))
            if have == n or trio.current_time() - start > 30:
                break
        elapsed = trio.current_time() - start
        out["spread_bps"] = (net.bytes_sent - before) / elapsed / n
        for share in (0.5, 0.99, 0.999):
            out[f"t{share}"] = first_time(samples, math.ceil(share * n))

        victim = members[n // 2]
        kill(net, victim)
        others = [m for m in members if m is not victim]
        start = trio.current_time()
        suspected = math.inf
        while not all(m.status_of(victim.name) is MemberStatus.DEAD for m in others):
            await trio.sleep(SAMPLE)
            if suspected == math.inf and any(
                m.status_of(victim.name) is not MemberStatus.ALIVE for m in others
            ):
                suspected = trio.current_time() - start
            if trio.current_time() - start > 200:
                break
        out["first_suspect"] = suspected
        out["dead_everywhere"] = trio.current_time() - start
        nursery.cancel_scope.cancel()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--latency", type=float, default=0.002, help="one-way, seconds")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    cfg = GossipConfig()
    rnd = cfg.gossip_interval
    swim_detect = math.e / (math.e - 1) * cfg.probe_interval
    lines = [
        f"gossip bench: LAN defaults, one-way latency {args.latency * 1000:g} ms, no loss",
        f"{'N':>5} {'detect':>7} {'SWIM':>5} {'dead all':>8} {'Lifeguard':>10} "
        f"{'50%':>5} {'99%':>5} {'99.9%':>6} {'model':>6} {'Serf':>5} "
        f"{'B/s/node quiet':>14} {'spreading':>9} {'wall':>6}",
    ]
    print(lines[0])
    print(lines[1])
    for n in args.nodes:
        wall = time.monotonic()
        r = trio.run(measure, n, args.latency,
                     clock=trio.testing.MockClock(autojump_threshold=0))  # fmt: skip
        low, high = suspicion_timeout_bounds(cfg.suspicion_mult, cfg.suspicion_max_timeout_mult,
                                             n, cfg.probe_interval)  # fmt: skip
        model = epidemic_rounds(n, cfg.gossip_nodes, 0.999) * rnd
        serf = f"{SERF_ROUNDS[n] * rnd:.1f}" if n in SERF_ROUNDS else "-"
        line = (
            f"{n:>5} {r['first_suspect']:>6.2f}s {swim_detect:>4.2f}s "
            f"{r['dead_everywhere']:>7.1f}s "
            f"{f'{low:g}..{high:g}s':>10} {r['t0.5']:>4.2f}s {r['t0.99']:>4.2f}s "
            f"{r['t0.999']:>5.2f}s {model:>5.1f}s {serf:>5} {r['quiet_bps']:>14.0f} "
            f"{r['spread_bps']:>9.0f} {time.monotonic() - wall:>5.0f}s"
        )
        if r["false_deaths"]:
            line += f"  ({r['false_deaths']:.0f} false deaths!)"
        print(line, flush=True)
        lines.append(line)
    lines.append(
        "detect: kill to first suspicion (SWIM: e/(e-1) probe periods); dead all: until "
        "every member knows it dead; model: push epidemic, fanout 3 per 200 ms"
    )
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers to run simulated gossip clusters (see tests/simnet.py)."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import trio
from simnet import SimNetwork

from hostmesh import GossipConfig
from hostmesh.catalog import Catalog, Node, NodeRecord, ServiceInstance
from hostmesh.catalog._gossip import GossipNode
from hostmesh.catalog._messages import MemberStatus
from hostmesh.catalog._swim import Swim


@dataclass
class SimMember:
    name: str
    addr: str
    catalog: Catalog
    node: GossipNode
    scope: trio.CancelScope
    record: NodeRecord
    joined: trio.Event = field(default_factory=trio.Event)

    @property
    def swim(self) -> Swim:
        return self.node.swim

    def status_of(self, name: str) -> MemberStatus | None:
        member = self.swim.members.get(name)
        return member.status if member else None

    def update_record(self, **changes: object) -> NodeRecord:
        """A new version of this member's own record, gossiped."""
        self.record = self.record.bump(**changes)
        self.catalog.merge(self.record)
        self.swim.record_changed(self.record)
        return self.record


def member_record(name: str, addr: str, az: str, generation: int = 1) -> NodeRecord:
    host = addr.split(":")[0]
    return NodeRecord(
        Node(name, host, az=az),
        generation=generation,
        version=1,
        services=(ServiceInstance(f"web-{name}", "web", "", 8080, ("v1",)),),
    )


async def start_member(
    nursery: trio.Nursery,
    net: SimNetwork,
    index: int,
    config: GossipConfig,
    seeds: list[str],
    *,
    azs: int = 3,
    generation: int = 1,
) -> SimMember:
    """Start member ``n<index>`` at ``10.<i>:7946`` and join ``seeds`` in the background."""
    name = f"n{index}"
    addr = f"10.0.{index // 250}.{index % 250 + 1}:7946"
    catalog = Catalog()
    record = member_record(name, addr, f"az-{index % azs}", generation)
    catalog.merge(record)
    rng = random.Random(index * 7919 + generation)
    swim = Swim(config, name, addr, catalog, now=trio.current_time(), rng=rng,
                meta={"az": f"az-{index % azs}"})  # fmt: skip
    swim.record_changed(record)
    transport = net.members.get(addr) or net.transport(addr)
    node = GossipNode(swim, transport, rng=rng)
    scope = trio.CancelScope()
    member = SimMember(name, addr, catalog, node, scope, record)

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            async with trio.open_nursery() as inner:
                await inner.start(node.run)
                task_status.started()
                if seeds:
                    await node.join(seeds, retries=config.join_retries,
                                    backoff=config.join_backoff)  # fmt: skip
                member.joined.set()

    await nursery.start(run)
    return member


async def start_cluster(
    nursery: trio.Nursery, net: SimNetwork, n: int, config: GossipConfig, *, azs: int = 3,
    join_spread: float = 0.0,
) -> list[SimMember]:  # fmt: skip
    """``n`` members; each joins through one already started member (random)."""
    members: list[SimMember] = []
    rng = random.Random(n)
    for i in range(n):
        seeds = [rng.choice(members).addr] if members else []
        members.append(await start_member(nursery, net, i, config, seeds, azs=azs))
        if join_spread:
            await trio.sleep(join_spread / n)
    return members


def kill(net: SimNetwork, member: SimMember) -> None:
    """The member's process dies: no more packets in or out."""
    net.killed.add(member.addr)
    member.scope.cancel()


def converged(members: list[SimMember], alive: int) -> bool:
    """Every running member sees ``alive`` live members (itself included)."""
    return all(m.swim.num_live == alive for m in members)


async def run_network(nursery: trio.Nursery, net: SimNetwork) -> None:
    nursery.start_soon(functools.partial(net.run))


async def start_settled_cluster(
    nursery: trio.Nursery, net: SimNetwork, n: int, config: GossipConfig, *, azs: int = 3
) -> list[SimMember]:
    """``n`` members that already know each other, as after joining and settling.

    Every member merges one full push-pull state (all members alive, every
    record) and then drops the news it would otherwise re-broadcast: the state
    of a cluster whose join gossip has died down. Joining from scratch is
    covered at a smaller size (disseminating N joins costs N x N x retransmits
    messages, minutes of CPU for N = 1,000 in Python).
    """
    from hostmesh.catalog._broadcast import BroadcastQueue
    from hostmesh.catalog._messages import MemberState, PushPull

    members = [await start_member(nursery, net, i, config, [], azs=azs) for i in range(n)]
    snapshot = PushPull(
        False,
        tuple(MemberState(m.name, m.addr, 0, MemberStatus.ALIVE, m.swim.me.meta) for m in members),
        {},
        tuple(m.record for m in members),
    )
    now = trio.current_time()
    for m in members:
        m.swim.answer_push_pull(snapshot, now)
        m.swim.broadcasts = BroadcastQueue(config.retransmit_mult)
    return members

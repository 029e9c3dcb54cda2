"""The catalog: one record per node, merged by ``(generation, version)``.

Merging is a join: the record with the larger ``(generation, version)`` wins,
and the content digest breaks a tie, so the result is the maximum of a total
order. That makes :meth:`Catalog.merge` commutative, associative and
idempotent, and every delivery order of the same records (gossip, push-pull,
server sync, duplicates included) converges to the same catalog.

Sans-IO: no clocks are read here; callers pass ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ._model import Node, NodeRecord

__all__ = ["Catalog", "newer"]


def newer(incoming: NodeRecord, current: NodeRecord | None) -> bool:
    """True when ``incoming`` supersedes ``current`` under the merge order."""
    if current is None:
        return True
    if incoming.key != current.key:
        return incoming.key > current.key
    if incoming is current or incoming == current:
        return False  # the common case: a duplicate delivery
    return incoming.digest() > current.digest()


class Catalog:
    """All node records known here, plus local liveness observations.

    ``index`` is a counter that grows on every visible change; the agent API
    reports it as ``X-Consul-Index`` and blocks on it.
    """

    def __init__(self) -> None:
        self._records: dict[str, NodeRecord] = {}
        self._dead: set[str] = set()
        self.index = 1

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[NodeRecord]:
        return iter(self._records.values())

    def record(self, node: str) -> NodeRecord | None:
        return self._records.get(node)

    def merge(self, record: NodeRecord) -> bool:
        """Keep ``record`` if it supersedes what we have; True when it did."""
        if not newer(record, self._records.get(record.node.name)):
            return False
        self._records[record.node.name] = record
        self.index += 1
        return True

    def merge_all(self, records: Iterable[NodeRecord]) -> int:
        """Merge several records; returns how many were taken."""
        return sum(1 for r in records if self.merge(r))

    def forget(self, node: str) -> bool:
        """Drop ``node``'s record (the servers reaped it); True if there was one.

        Unlike a tombstone this is not order-free: a copy arriving later brings
        the node back, which is what a node that is still alive should do.
        """
        if self._records.pop(node, None) is None:
            return False
        self._dead.discard(node)
        self.index += 1
        return True

    def digest(self) -> dict[str, tuple[int, int]]:
        """node -> (generation, version): what push-pull and sync exchange first."""
        return {name: rec.key for name, rec in self._records.items()}

    def set_node_dead(self, node: str, dead: bool) -> bool:
        """Record a liveness observation (gossip or server); True if it changed."""
        if dead == (node in self._dead):
            return False
        if dead:
            self._dead.add(node)
        else:
            self._dead.discard(node)
        self.index += 1
        return True

    def dead_nodes(self) -> frozenset[str]:
        """The nodes observed dead (gossip or server), with or without a record."""
        return frozenset(self._dead)

    def node_live(self, node: str) -> bool:
        rec = self._records.get(node)
        return rec is not None and not rec.left and node not in self._dead

    def nodes(self) -> list[Node]:
        """Nodes that have not left, sorted by name (dead ones included)."""
        return sorted((r.node for r in self._records.values() if not r.left), key=lambda n: n.name)

    def gc(self, now: float, ttl: float) -> list[str]:
        """Drop node tombstones older than ``ttl`` seconds; returns their names.

        ``ttl`` must exceed the time an update takes to reach every node, or a
        stale copy arriving later would bring the node back.
        """
        expired = [n for n, r in self._records.items() if r.left and now - r.stamp > ttl]
        for name in expired:
            del self._records[name]
            self._dead.discard(name)
        if expired:
            self.index += 1
        return expired

"""Helpers for proxy tests: an agent whose catalog holds instances on real backends.

Remote nodes are merged into the agent's catalog as gossip would deliver
them, each instance pointing at a real :class:`~http_backend.Backend` on
loopback, so the proxy dials real sockets in several AZs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.lowlevel
from conftest import agent_config, running_agent
from http_backend import Backend

from hostmesh.agent import Agent, AgentAddresses
from hostmesh.catalog import Node, NodeRecord, ServiceInstance


@dataclass
class Mesh:
    agent: Agent
    addrs: AgentAddresses
    nursery: trio.Nursery
    backends: dict[str, Backend] = field(default_factory=dict)
    _generation: int = 1

    @property
    def proxy_url(self) -> str:
        host, port = self.addrs.proxy
        return f"http://{host}:{port}"

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client that sends every request to the proxy (origin form)."""
        return httpx.AsyncClient(base_url=self.proxy_url, timeout=30, **kwargs)

    async def add_node(
        self,
        node: str,
        az: str,
        service: str,
        count: int = 1,
        *,
        tags: tuple[str, ...] = (),
        meta: Mapping[str, str] | None = None,
        weight: int = 1,
    ) -> list[Backend]:
        """A remote node in ``az`` with ``count`` instances of ``service``, each a real backend."""
        started = []
        instances = []
        for i in range(count):
            name = f"{node}-{service}-{i}"
            backend = Backend(name)
            await self.nursery.start(backend.serve)
            self.backends[name] = backend
            started.append(backend)
            instances.append(
                ServiceInstance(
                    name, service, "127.0.0.1", backend.port, tags, dict(meta or {}), weight=weight
                )
            )
        existing = self.agent.catalog.record(node)
        services = tuple(existing.services) if existing else ()
        self._generation += 1
        record = NodeRecord(
            Node(node, "127.0.0.1", az=az), generation=self._generation, version=1,
            services=services + tuple(instances),
        )  # fmt: skip
        self.agent.catalog.merge(record)
        await self.refresh()
        return started

    async def refresh(self) -> None:
        self.agent.notify()
        self.agent.refresh_routes()
        await trio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path, **overrides: Any) -> AsyncIterator[Mesh]:
    """An agent in AZ ``dev-1a`` with its proxy on a free port."""
    async with trio.open_nursery() as nursery:
        async with running_agent(agent_config(tmp_path, **overrides)) as (agent, addrs):
            yield Mesh(agent, addrs, nursery)
        nursery.cancel_scope.cancel()


__all__ = ["Mesh", "functools", "mesh"]

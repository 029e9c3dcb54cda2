"""Helpers for tests that talk to a real server over its TLS listener.

- :func:`server_verify`: an SSL context that trusts a running server's CA, for
  httpx (``verify=``) against ``https://``;
- :func:`node_tls`: a node certificate issued by the server's CA, as the
  client context factory an agent's sync takes;
- :class:`LightAgent`: the agent's side of sync without an Agent: the real
  client state machine (:class:`ClientState`) over a real TLS websocket, so
  one trio.run can hold a hundred of them.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import trio
import trio_websocket

from hostmesh._tls import client_context, make_node_key_and_csr
from hostmesh.agent._sync import sync_websocket
from hostmesh.catalog import Catalog, Node, NodeRecord
from hostmesh.catalog._syncproto import Applied, ClientState
from hostmesh.server import Server
from hostmesh.server._ca import CertificateAuthority

MESH = "mesh"  # ServerCaConfig's default trust domain


def server_verify(server: Server) -> ssl.SSLContext:
    """Trust the server's CA roots; the server certificate carries the bind IP as a SAN."""
    ctx = ssl.create_default_context(cadata=server.ca.bundle_pem().decode())
    ctx.check_hostname = False
    return ctx


async def node_tls(server: Server, node: str) -> Callable[[], ssl.SSLContext]:
    """Issue ``node`` a certificate from the server's CA (kept by its CA keeper)."""
    [factory] = await nodes_tls(server, [node])
    return factory


async def nodes_tls(server: Server, nodes: list[str]) -> list[Callable[[], ssl.SSLContext]]:
    """Certificates for several nodes in one CA update (one save of the CA state)."""
    keys = [make_node_key_and_csr(node) for node in nodes]
    assert server.ca_keeper is not None

    def issue(ca: CertificateAuthority) -> list[bytes]:
        now = datetime.now(UTC)
        return [
            ca.issue(k.csr_pem, n, now=now).chain_pem() for k, n in zip(keys, nodes, strict=True)
        ]

    chains = await server.ca_keeper.update(issue)
    roots = server.ca.bundle_pem()
    out = []
    for chain, key in zip(chains, keys, strict=True):
        ctx = client_context(chain, key.key_pem, roots)
        out.append(lambda ctx=ctx: ctx)
    return out


async def start_killable(nursery: trio.Nursery, server: Server) -> tuple[trio.CancelScope, str]:
    """Run ``server`` in ``nursery`` under its own cancel scope: cancelling the scope
    stops that server alone, without revoking its lease (as a crash would)."""
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        with scope:
            await server.run(task_status=task_status)

    host, port = await nursery.start(run)
    return scope, f"{host}:{port}"


def light_record(node: str, version: int = 1, **changes: Any) -> NodeRecord:
    return NodeRecord(Node(node, "127.0.0.1", az="dev-1a"), generation=1, version=version,
                      **changes)  # fmt: skip


class LightAgent:
    """One agent's sync session with only the protocol state: a catalog and ClientState."""

    def __init__(self, node: str, tls: Callable[[], ssl.SSLContext]) -> None:
        self.node = node
        self.tls = tls
        self.catalog = Catalog()
        self.state = ClientState(self.catalog, node)
        self.record = light_record(node)
        self.applied: list[Applied] = []
        self.changed = trio.Event()
        self.ws: trio_websocket.WebSocketConnection | None = None

    async def run(
        self, address: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, send HELLO, report started once synced, apply messages until closed."""
        async with sync_websocket(address, self.tls(), MESH) as ws:
            self.ws = ws
            await ws.send_message(self.state.hello(self.record))
            started = False
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                while True:
                    applied = self.state.receive(await ws.get_message())
                    self.applied.append(applied)
                    self.changed.set()
                    self.changed = trio.Event()
                    if not started and (applied.snapshot or applied.resumed):
                        started = True
                        task_status.started()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.changed.wait()

"""The mTLS hop between agents, in one process on loopback with real TLS.

Two agents (node-a, node-b) gossip with each other; each has a node
certificate from one CA. node-b runs the instances; requests through node-a's
proxy reach them through node-b's inbound listener. Other TLS clients made by
the tests play hostile peers: plaintext, a foreign CA, an expired or revoked
certificate, a node the catalog does not know, a node claiming a service it
does not run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
from conftest import agent_config, trio_test
from http_backend import Backend

from hostmesh import GossipConfig, ServiceDefinition
from hostmesh._config import UpstreamConfig
from hostmesh._tls import client_context, make_node_key_and_csr
from hostmesh.agent import Agent, AgentAddresses
from hostmesh.agent._certs import NodeCertificate
from hostmesh.agent._intentions import Intention, Intentions
from hostmesh.catalog import Node, NodeRecord, ServiceInstance
from hostmesh.server._ca import CertificateAuthority

pytestmark = pytest.mark.sockets

FAST = GossipConfig.for_profile("local", bind="127.0.0.1:0", join_backoff=0.1)
MESH = "mesh"


def issue(ca: CertificateAuthority, node: str, *, now: datetime | None = None,
          ttl: float | None = None) -> NodeCertificate:  # fmt: skip
    key = make_node_key_and_csr(node)
    issued = ca.issue(key.csr_pem, node, now=now or datetime.now(UTC), ttl=ttl)
    return NodeCertificate(issued.chain_pem(), key.key_pem, ca.bundle_pem())


def metric(agent: Agent, name: str, **labels: str) -> float:
    """One sample of the agent's /metrics text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in agent.metrics.render().splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and got == want:
            return float(value)
    return 0.0


@dataclass
class Pair:
    ca: CertificateAuthority
    a: Agent
    b: Agent
    addrs_a: AgentAddresses
    addrs_b: AgentAddresses
    nursery: trio.Nursery
    backends: dict[str, Backend]

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.addrs_a.proxy[1]}"

    @property
    def inbound_b(self) -> tuple[str, int]:
        return self.addrs_b.inbound

    async def backend(self, name: str) -> Backend:
        backend = Backend(name)
        await self.nursery.start(backend.serve)
        self.backends[name] = backend
        return backend

    async def serve_on_b(self, service: str, name: str, **kw: object) -> Backend:
        backend = await self.backend(name)
        self.b.register(ServiceDefinition(name=service, id=name, port=backend.port, **kw))
        await until(lambda: any(e.id == name for e in self._endpoints(service)))
        return backend

    def _endpoints(self, service: str) -> tuple[object, ...]:
        svc = self.a.router.snapshot.services.get(service)
        return () if svc is None else svc.endpoints


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    with trio.fail_after(within):
        while not check():
            await trio.sleep(0.02)


@contextlib.asynccontextmanager
async def pair(tmp_path: Path, **overrides_a: object) -> AsyncIterator[Pair]:
    ca = CertificateAuthority.create(MESH, now=datetime.now(UTC))
    async with trio.open_nursery() as nursery:
        cfg_b = replace(agent_config(tmp_path / "b", gossip=FAST, az="az-1"), node_name="node-b")
        b = Agent(cfg_b, node_certificate=issue(ca, "node-b"))
        addrs_b = await nursery.start(functools.partial(b.run, handle_signals=False))
        cfg_a = replace(agent_config(tmp_path / "a", gossip=replace(FAST, seeds=(addrs_b.gossip,)),
                                     az="az-1"), node_name="node-a", **overrides_a)  # fmt: skip
        a = Agent(cfg_a, node_certificate=issue(ca, "node-a"))
        addrs_a = await nursery.start(functools.partial(a.run, handle_signals=False))
        await until(lambda: a.catalog.record("node-b") is not None
                    and b.catalog.record("node-a") is not None)  # fmt: skip
        try:
            yield Pair(ca, a, b, addrs_a, addrs_b, nursery, {})
        finally:
            nursery.cancel_scope.cancel()


def tls_to(address: tuple[str, int], cert: NodeCertificate | None, roots: bytes,
           request: bytes = b"") -> bytes:  # fmt: skip
    """A blocking TLS client (a hostile or foreign peer): what it reads after its request."""
    if cert is not None:
        ctx = client_context(cert.chain_pem, cert.key_pem, roots)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(address, timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(request or b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def mesh_request(service: str, instance: str, source: str, path: str = "/") -> bytes:
    head = (f"GET {path} HTTP/1.1\r\nhost: {service}\r\nhostmesh-source: {source}\r\n"
            f"hostmesh-destination: {service}\r\nhostmesh-instance: {instance}\r\n"
            "\r\n")  # fmt: skip
    return head.encode()


@trio_test(40)
async def test_remote_instances_are_reached_through_their_agent_over_mtls(tmp_path: Path) -> None:
    async with pair(tmp_path) as p:
        await p.serve_on_b("udvr", "udvr-b1")
        async with httpx.AsyncClient(base_url=p.proxy, timeout=10) as http:
            for _ in range(5):
                r = await http.get("/", headers={"host": "udvr"})
                assert r.status_code == 200 and r.text == "udvr-b1\n"
            # What the instance sees: no mesh header (not even a forged one), the hop's
            # peer in X-Forwarded-For.
            r = await http.get("/headers", headers={"host": "udvr", "hostmesh-source": "admin",
                                                    "hostmesh-instance": "x"})  # fmt: skip
            names = {k.lower(): v for k, v in r.json()}
            assert not [k for k in names if k.startswith("hostmesh-")]
            assert names["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"
        assert metric(p.b, "hostmesh_inbound_responses_total", service="udvr", code="2xx") == 6
        # One pooled TLS connection carried them all (keep-alive over the hop).
        assert p.backends["udvr-b1"].connections == 1
        assert p.b.inbound is not None and p.b.inbound.stats.open_connections == 1
        # The inbound port is in node-b's record, so that node-a could find it.
        record = p.a.catalog.record("node-b")
        assert record is not None and record.node.meta["inbound_port"] == str(p.inbound_b[1])


@trio_test(40)
async def test_the_inbound_port_refuses_plaintext_and_bad_certificates(tmp_path: Path) -> None:
    async with pair(tmp_path) as p:
        await p.serve_on_b("udvr", "udvr-b1")
        roots = p.ca.bundle_pem()
        refused = p.b.inbound.stats.refused  # type: ignore[union-attr]

        def plaintext() -> bytes:
            with socket.create_connection(p.inbound_b, timeout=5) as s:
                s.sendall(mesh_request("udvr", "udvr-b1", "host:node-a"))
                out = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := s.recv(4096):
                        out += chunk
                return out

        assert await trio.to_thread.run_sync(plaintext) == b""
        assert refused.get("not-tls") == 1

        # A client without a certificate, one from a foreign CA, an expired one.
        request = mesh_request("udvr", "udvr-b1", "host:node-a")
        assert await trio.to_thread.run_sync(tls_to, p.inbound_b, None, roots, request) == b""
        assert refused.get("missing") == 1
        foreign = CertificateAuthority.create(MESH, now=datetime.now(UTC))
        stranger = issue(foreign, "node-a")
        got = await trio.to_thread.run_sync(tls_to, p.inbound_b, stranger,
                                            foreign.bundle_pem() + roots, request)  # fmt: skip
        assert got == b"" and refused.get("untrusted") == 1
        old = issue(p.ca, "node-a", now=datetime.now(UTC) - timedelta(hours=2), ttl=3600)
        assert await trio.to_thread.run_sync(tls_to, p.inbound_b, old, roots, request) == b""
        assert refused.get("expired") == 1

        # A valid certificate of a node nobody knows.
        ghost = issue(p.ca, "node-ghost")
        assert await trio.to_thread.run_sync(tls_to, p.inbound_b, ghost, roots, request) == b""
        assert refused.get("unknown-node") == 1

        # A valid certificate, revoked: refused at the handshake once the list arrives.
        good = issue(p.ca, "node-a")
        ok = await trio.to_thread.run_sync(tls_to, p.inbound_b, good, roots, request)
        assert ok.startswith(b"HTTP/1.1 200")
        p.ca.revoke(good_serial(good), now=datetime.now(UTC))
        p.b.trust.update(roots, p.ca.revocations)
        assert await trio.to_thread.run_sync(tls_to, p.inbound_b, good, roots, request) == b""
        assert refused.get("revoked") == 1
        assert metric(p.b, "hostmesh_inbound_refused_total", reason="not-tls") == 1


def good_serial(cert: NodeCertificate) -> int:
    return cert.cert.serial_number


@trio_test(40)
async def test_a_node_cannot_speak_for_a_service_it_does_not_run(tmp_path: Path) -> None:
    async with pair(tmp_path) as p:
        await p.serve_on_b("udvr", "udvr-b1")
        web = await p.backend("web-a1")
        p.a.register(ServiceDefinition(name="web", id="web-a1", port=web.port))
        await until(lambda: any(i.name == "web" for i in p.b.catalog.record("node-a").services))  # type: ignore[union-attr]
        roots = p.ca.bundle_pem()
        cert_a = issue(p.ca, "node-a")
        for source, status in (("web", b"200"), ("host:node-a", b"200"),
                               ("billing", b"403"), ("host:node-b", b"403")):  # fmt: skip
            got = await trio.to_thread.run_sync(
                tls_to, p.inbound_b, cert_a, roots, mesh_request("udvr", "udvr-b1", source)
            )
            assert got.split(b" ")[1] == status, (source, got)
            if status == b"403":
                assert b"hostmesh-error: source-not-on-node" in got
        assert p.b.inbound is not None
        assert p.b.inbound.stats.refused["source-not-on-node"] == 2  # each refusal once
        # Requests for an instance that is not here: 503 no-instance (the caller goes elsewhere).
        got = await trio.to_thread.run_sync(
            tls_to, p.inbound_b, cert_a, roots, mesh_request("udvr", "udvr-zz", "web")
        )
        assert got.startswith(b"HTTP/1.1 503") and b"hostmesh-error: no-instance" in got
        # Mesh headers are required on the inbound port.
        got = await trio.to_thread.run_sync(tls_to, p.inbound_b, cert_a, roots,
                                            b"GET / HTTP/1.1\r\nhost: udvr\r\n\r\n")  # fmt: skip
        assert got.startswith(b"HTTP/1.1 400") and b"missing-mesh-headers" in got


@trio_test(40)
async def test_the_client_checks_the_peer_is_the_node_the_catalog_names(tmp_path: Path) -> None:
    async with pair(tmp_path) as p:
        backend = await p.backend("udvr-z1")
        # A record that says node-z hosts udvr, with node-b's inbound listener as its
        # address: whoever answers there must prove it is node-z, and node-b cannot.
        host, port = p.inbound_b
        p.a.catalog.merge(NodeRecord(
            Node("node-z", host, az="az-1", meta={"inbound_port": str(port)}),
            generation=1, version=1,
            services=(ServiceInstance("udvr-z1", "udvr", "127.0.0.1", backend.port),),
        ))  # fmt: skip
        p.a.refresh_routes()
        async with httpx.AsyncClient(base_url=p.proxy, timeout=10) as http:
            r = await http.get("/", headers={"host": "udvr"})
        assert r.status_code == 502 and r.headers["hostmesh-error"] == "connect-failed"
        assert "node-z" in r.text
        assert p.a.proxy.stats.refused.get("mtls-identity", 0) >= 1
        assert backend.hits == 0


@trio_test(40)
async def test_external_services_have_no_agent_and_are_dialled_directly(tmp_path: Path) -> None:
    async with pair(tmp_path) as p:
        backend = await p.backend("orders-db")
        p.a.catalog.merge(NodeRecord(
            Node("external-orders-db", "127.0.0.1", az="az-1", meta={"external-node": "true"}),
            generation=1, version=1,
            services=(ServiceInstance("orders-db", "orders", "127.0.0.1", backend.port),),
        ))  # fmt: skip
        p.a.refresh_routes()
        async with httpx.AsyncClient(base_url=p.proxy, timeout=10) as http:
            r = await http.get("/headers", headers={"host": "orders"})
        assert r.status_code == 200 and backend.hits == 1
        assert not [k for k, _ in r.json() if k.lower().startswith("hostmesh-")]
        assert metric(p.b, "hostmesh_inbound_responses_total", service="orders", code="2xx") == 0


@trio_test(40)
async def test_intentions_deny_at_the_destination_and_at_the_source(tmp_path: Path) -> None:
    async with pair(tmp_path) as p:
        await p.serve_on_b("udvr", "udvr-b1")
        deny = Intentions([Intention("host:node-a", "udvr", "deny")])
        async with httpx.AsyncClient(base_url=p.proxy, timeout=10) as http:
            # Only the destination knows: node-b refuses, the caller gets its 403.
            p.b.intentions = deny
            r = await http.get("/", headers={"host": "udvr"})
            assert r.status_code == 403 and r.headers["hostmesh-error"] == "intention-denied"
            assert "host:node-a -> udvr deny" in r.text
            assert metric(p.b, "hostmesh_intentions_denied_total", source="host:node-a",
                          destination="udvr") == 1  # fmt: skip
            # The source knows too: refused before anything is sent.
            p.a.intentions = deny
            before = p.backends["udvr-b1"].hits
            r = await http.get("/", headers={"host": "udvr"})
            assert r.status_code == 403 and r.headers["hostmesh-error"] == "intention-denied"
            assert metric(p.b, "hostmesh_intentions_denied_total", source="host:node-a",
                          destination="udvr") == 1  # fmt: skip
            # An HTTP match: only POST under /admin is denied; the default allows the rest.
            scoped = Intentions.from_json([{"source": "*", "destination": "udvr",
                                            "action": "deny",
                                            "http": {"path_prefix": "/admin",
                                                     "methods": ["POST"]}}])  # fmt: skip
            p.a.intentions = Intentions()
            p.b.intentions = scoped
            assert (await http.post("/admin/x", headers={"host": "udvr"})).status_code == 403
            assert (await http.get("/admin/x", headers={"host": "udvr"})).status_code == 200
            assert (await http.post("/other", headers={"host": "udvr"})).status_code == 200
            assert p.backends["udvr-b1"].hits == before + 2


@trio_test(40)
async def test_a_dead_instance_behind_an_agent_is_a_failed_try(tmp_path: Path) -> None:
    async with pair(tmp_path) as p:
        # An instance registered on node-b whose port nobody listens on.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        p.b.register(ServiceDefinition(name="udvr", id="udvr-dead", port=dead_port))
        await until(lambda: len(p._endpoints("udvr")) == 1)
        dead = {"service": "udvr", "node": "node-b", "instance": "udvr-dead"}
        async with httpx.AsyncClient(base_url=p.proxy, timeout=10) as http:
            r = await http.get("/", headers={"host": "udvr"})
            # node-b's connect-failed is node-a's failed try: retried (no other
            # instance here, so on the same one), counted, then answered.
            assert r.status_code == 502 and r.headers["hostmesh-error"] == "connect-failed"
            assert metric(p.a, "hostmesh_proxy_instance_failures_total", **dead) == 3
            assert metric(p.a, "hostmesh_proxy_retries_total", service="udvr",
                          route="default") == 2  # fmt: skip
            assert p.b.inbound is not None and p.b.inbound.stats.refused["connect-failed"] == 3
            # A live instance beside it takes every request from here.
            await p.serve_on_b("udvr", "udvr-b1")
            codes = [(await http.get("/", headers={"host": "udvr"})).status_code
                     for _ in range(20)]  # fmt: skip
        assert codes == [200] * 20


async def echo_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A TCP service: echoes upper-cased until the client half-closes, then says bye."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            await stream.send_all(data.upper() + b"|bye")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@trio_test(40)
async def test_tcp_upstreams_cross_the_same_hop(tmp_path: Path) -> None:
    upstream = UpstreamConfig(service="pg", bind="127.0.0.1:0")
    async with pair(tmp_path, upstream=(upstream,)) as p:
        port = await p.nursery.start(echo_server)
        p.b.register(ServiceDefinition(name="pg", id="pg-b1", port=port))
        await until(lambda: bool(p._endpoints("pg")))

        def talk() -> bytes:
            with socket.create_connection(p.addrs_a.upstreams[0], timeout=5) as s:
                s.sendall(b"select 1;" * 1000)
                s.shutdown(socket.SHUT_WR)  # half-close: the answer still comes back
                out = b""
                with contextlib.suppress(ConnectionResetError):  # refused: closed unread
                    while chunk := s.recv(65536):
                        out += chunk
                return out

        assert await trio.to_thread.run_sync(talk) == b"SELECT 1;" * 1000 + b"|bye"
        assert metric(p.b, "hostmesh_inbound_responses_total", service="pg", code="2xx") == 1
        # Denied at the destination: the stream is closed before any byte.
        p.b.intentions = Intentions([Intention("*", "pg", "deny")])
        assert await trio.to_thread.run_sync(talk) == b""
        assert p.a.router.tcp["pg"]["denied"] == 1


@trio_test(60)
async def test_callers_are_identified_by_the_unix_user_of_their_socket(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to run a client as another user (scripts/test.sh runs as root)")
    async with pair(tmp_path) as p:
        await p.serve_on_b("udvr", "udvr-b1")
        web = await p.backend("web-a1")
        # A service on node-a run by `nobody`: its connections are "web".
        p.a.register(ServiceDefinition(name="web", id="web-a1", port=web.port, user="nobody"))
        await until(lambda: any(i.name == "web" for i in p.b.catalog.record("node-a").services))  # type: ignore[union-attr]
        allow_web = Intentions([Intention("web", "udvr", "allow")], default="deny")
        p.b.intentions = allow_web

        def curl(*user: str) -> tuple[str, str]:
            done = subprocess.run(
                [*user, "curl", "-s", "-o", "/dev/null", "-D", "-", "-H", "host: udvr",
                 f"{p.proxy}/"], capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            head = done.stdout
            error = [
                line for line in head.splitlines() if line.lower().startswith("hostmesh-error")
            ]
            return head.split(" ")[1] if head else "", error[0] if error else ""

        as_nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        assert await trio.to_thread.run_sync(curl, *as_nobody) == ("200", "")
        status, error = await trio.to_thread.run_sync(curl)  # root: host:node-a, default deny
        assert status == "403" and "intention-denied" in error

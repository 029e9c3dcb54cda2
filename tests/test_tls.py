"""Real TLS 1.3 handshakes on loopback with certificates from the mesh CA: mutual
authentication, node identity, refusal of foreign, expired, revoked and
plaintext peers, and trust across a root rotation."""

from __future__ import annotations

import functools
import ssl
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from conftest import trio_test

from hostmesh._errors import CertificateError, PeerCertificateError, RemoteProtocolError
from hostmesh._pki import NodeIdentity, RevocationList
from hostmesh._tls import (
    client_context,
    handshake,
    load_cert_chain,
    make_node_key_and_csr,
    server_context,
)
from hostmesh.server._ca import CertificateAuthority, IssuedCertificate

MESH = "mesh.test"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Creds:
    """What an agent holds: its chain, its key, and the roots it trusts."""

    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes

    def server(self) -> ssl.SSLContext:
        return server_context(self.chain_pem, self.key_pem, self.roots_pem)

    def client(self) -> ssl.SSLContext:
        return client_context(self.chain_pem, self.key_pem, self.roots_pem)

    def trusting(self, roots_pem: bytes) -> Creds:
        return Creds(self.chain_pem, self.key_pem, roots_pem)


def node_creds(
    ca: CertificateAuthority, node: str, *, now: datetime | None = None
) -> tuple[Creds, IssuedCertificate]:
    nk = make_node_key_and_csr(node)
    issued = ca.issue(nk.csr_pem, node, now=now or datetime.now(UTC))
    return Creds(issued.chain_pem(), nk.key_pem, ca.bundle_pem()), issued


@dataclass
class Outcome:
    identity: NodeIdentity | None = None
    error: Exception | None = None
    received: bytes = b""


@dataclass
class Server:
    port: int
    outcomes: trio.MemoryReceiveChannel[Outcome]
    handled: list[Outcome] = field(default_factory=list)

    async def next(self) -> Outcome:
        return await self.outcomes.receive()


async def start_server(
    nursery: trio.Nursery,
    ctx: ssl.SSLContext,
    *,
    revocations: RevocationList | None = None,
) -> Server:
    """A TLS listener on 127.0.0.1:0 that checks the client, reads, answers ``pong``."""
    send, receive = trio.open_memory_channel[Outcome](10)

    async def handler(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        outcome = Outcome()
        try:
            outcome.identity = await handshake(stream, mesh=MESH, revocations=revocations)
            outcome.received = bytes(await stream.receive_some())
            await stream.send_all(b"pong from server")
            await stream.aclose()  # close_notify: the client sees a clean end
        except (PeerCertificateError, RemoteProtocolError, trio.BrokenResourceError) as exc:
            outcome.error = exc
        finally:
            await trio.aclose_forcefully(stream)
            await send.send(outcome)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return Server(port=listeners[0].socket.getsockname()[1], outcomes=receive)


async def connect(port: int, ctx: ssl.SSLContext, *, expected_node: str | None = None) -> Outcome:
    """Dial, check the server, send ``ping``, read the answer (until EOF)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    outcome = Outcome()
    try:
        outcome.identity = await handshake(stream, mesh=MESH, expected_node=expected_node)
        await stream.send_all(b"ping from client")
        while data := await stream.receive_some():
            outcome.received += data
    except (PeerCertificateError, RemoteProtocolError, trio.BrokenResourceError) as exc:
        outcome.error = exc
    finally:
        await trio.aclose_forcefully(stream)
    return outcome


async def exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    expected_node: str | None = None,
    revocations: RevocationList | None = None,
) -> tuple[Outcome, Outcome]:
    """One connection: (what the server saw, what the client saw)."""
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, server_ctx, revocations=revocations)
        client = await connect(server.port, client_ctx, expected_node=expected_node)
        seen = await server.next()
        nursery.cancel_scope.cancel()
    return seen, client


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(MESH, now=datetime.now(UTC) - timedelta(days=30))


# --- mutual authentication ------------------------------------------------------------


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_mutual_auth_both_sides_see_the_peer_node(ca: CertificateAuthority) -> None:
    server, _ = node_creds(ca, "db-1")
    client, _ = node_creds(ca, "web-1")
    seen, got = await exchange(server.server(), client.client(), expected_node="db-1")
    assert seen.error is None and got.error is None
    assert seen.identity == NodeIdentity(MESH, "web-1")
    assert got.identity == NodeIdentity(MESH, "db-1")
    assert seen.received == b"ping from client"
    assert got.received == b"pong from server"


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_client_refuses_a_server_that_is_not_the_expected_node(
    ca: CertificateAuthority,
) -> None:
    server, _ = node_creds(ca, "db-1")
    client, _ = node_creds(ca, "web-1")
    _, got = await exchange(server.server(), client.client(), expected_node="db-2")
    assert isinstance(got.error, PeerCertificateError) and got.error.reason == "identity"
    assert "expected node 'db-2'" in str(got.error)
    assert got.received == b""


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_only_tls_13_is_spoken(ca: CertificateAuthority) -> None:
    server, _ = node_creds(ca, "db-1")
    client, _ = node_creds(ca, "web-1")
    old = client.client()
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    seen, got = await exchange(server.server(), old)
    assert isinstance(seen.error, RemoteProtocolError)
    assert seen.identity is None and got.received == b""


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_a_client_from_a_foreign_ca_is_refused(ca: CertificateAuthority) -> None:
    server, _ = node_creds(ca, "db-1")
    foreign = CertificateAuthority.create(MESH, now=datetime.now(UTC) - timedelta(days=1))
    intruder, _ = node_creds(foreign, "web-1")  # same mesh name, same node name, other CA
    seen, got = await exchange(server.server(), intruder.trusting(server.roots_pem).client())
    assert isinstance(seen.error, PeerCertificateError) and seen.error.reason == "untrusted"
    assert seen.identity is None and seen.received == b""
    assert got.received == b""  # the client never gets a byte of application data


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_a_server_from_a_foreign_ca_is_refused(ca: CertificateAuthority) -> None:
    foreign = CertificateAuthority.create(MESH, now=datetime.now(UTC) - timedelta(days=1))
    impostor, _ = node_creds(foreign, "db-1")
    client, _ = node_creds(ca, "web-1")
    seen, got = await exchange(impostor.trusting(client.roots_pem).server(), client.client())
    assert isinstance(got.error, PeerCertificateError) and got.error.reason == "untrusted"
    assert got.identity is None and got.received == b""
    assert seen.received == b""  # the client sent nothing to the impostor


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_expired_certificates_are_refused_both_ways(ca: CertificateAuthority) -> None:
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)  # 72 h TTL: expired a week ago
    stale_server, issued = node_creds(ca, "db-1", now=ten_days_ago)
    assert issued.not_after < datetime.now(UTC)
    stale_client, _ = node_creds(ca, "web-1", now=ten_days_ago)
    server, _ = node_creds(ca, "db-1")
    client, _ = node_creds(ca, "web-1")

    seen, got = await exchange(server.server(), stale_client.client())
    assert isinstance(seen.error, PeerCertificateError) and seen.error.reason == "expired"
    assert "expired" in str(seen.error) and got.received == b""

    _, got = await exchange(stale_server.server(), client.client())
    assert isinstance(got.error, PeerCertificateError) and got.error.reason == "expired"


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_a_revoked_client_is_refused_after_the_handshake(ca: CertificateAuthority) -> None:
    server, _ = node_creds(ca, "db-1")
    client, issued = node_creds(ca, "web-1")
    ca.revoke_node("web-1", now=datetime.now(UTC))
    # The agent only has the pushed list, not the CA.
    pushed = RevocationList.from_bytes(ca.revocations.to_bytes())
    seen, got = await exchange(server.server(), client.client(), revocations=pushed)
    assert isinstance(seen.error, PeerCertificateError) and seen.error.reason == "revoked"
    assert f"{issued.serial:x}" in str(seen.error)
    assert seen.received == b"" and got.received == b""
    # The same client before the revocation reached this agent: accepted.
    seen, got = await exchange(server.server(), client.client(), revocations=RevocationList())
    assert seen.identity == NodeIdentity(MESH, "web-1") and got.received == b"pong from server"


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_a_client_without_a_certificate_is_refused(ca: CertificateAuthority) -> None:
    server, _ = node_creds(ca, "db-1")
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=server.roots_pem.decode())
    seen, got = await exchange(server.server(), anonymous)
    assert isinstance(seen.error, PeerCertificateError) and seen.error.reason == "missing"
    assert got.received == b""


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_plaintext_to_the_tls_listener_gets_no_data(ca: CertificateAuthority) -> None:
    server, _ = node_creds(ca, "db-1")
    async with trio.open_nursery() as nursery:
        listener = await start_server(nursery, server.server())
        tcp = await trio.open_tcp_stream("127.0.0.1", listener.port)
        await tcp.send_all(b"GET /v1/secrets HTTP/1.1\r\nHost: db-1\r\n\r\n")
        answer = b""
        try:
            while data := await tcp.receive_some():
                answer += data
        except trio.BrokenResourceError:
            pass
        await tcp.aclose()
        seen = await listener.next()
        nursery.cancel_scope.cancel()
    assert answer == b""
    assert isinstance(seen.error, RemoteProtocolError)
    assert seen.identity is None and seen.received == b""


# --- root rotation ------------------------------------------------------------------


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_rotation_keeps_old_and_new_agents_talking(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    old_roots = ca.bundle_pem()
    old_server, _ = node_creds(ca, "db-1")
    old_client, _ = node_creds(ca, "web-1")
    ca.rotate(now=now)
    new_roots = ca.bundle_pem()
    new_server, issued = node_creds(ca, "db-2")
    new_client, _ = node_creds(ca, "web-2")
    assert len(issued.chain) == 2  # leaf + the new root cross-signed by the old one

    # An agent that trusts only the old root accepts a new leaf through the cross-signed root,
    seen, got = await exchange(
        new_server.server(), old_client.trusting(old_roots).client(), expected_node="db-2"
    )
    assert got.identity == NodeIdentity(MESH, "db-2") and seen.identity is not None
    assert got.received == b"pong from server"
    # in both directions (a not yet updated server, a new client),
    seen, got = await exchange(old_server.trusting(old_roots).server(), new_client.client())
    assert seen.identity == NodeIdentity(MESH, "web-2") and got.received == b"pong from server"
    # and agents with the new bundle accept old leaves and new ones.
    seen, got = await exchange(new_server.server(), old_client.trusting(new_roots).client())
    assert seen.identity == NodeIdentity(MESH, "web-1") and got.identity is not None
    seen, got = await exchange(old_server.trusting(new_roots).server(), new_client.client())
    assert seen.identity == NodeIdentity(MESH, "web-2") and got.identity == NodeIdentity(
        MESH, "db-1"
    )


@pytest.mark.sockets
@trio_test(timeout=TIMEOUT)
async def test_without_the_cross_signed_root_an_old_agent_refuses_new_leaves(
    ca: CertificateAuthority,
) -> None:
    old_roots = ca.bundle_pem()
    client, _ = node_creds(ca, "web-1")
    ca.rotate(now=datetime.now(UTC))
    nk = make_node_key_and_csr("db-2")
    issued = ca.issue(nk.csr_pem, "db-2", now=datetime.now(UTC))
    leaf_only = Creds(
        issued.chain_pem().split(b"-----END CERTIFICATE-----")[0]
        + (b"-----END CERTIFICATE-----\n"),
        nk.key_pem,
        ca.bundle_pem(),
    )
    _, got = await exchange(leaf_only.server(), client.trusting(old_roots).client())
    assert isinstance(got.error, PeerCertificateError) and got.error.reason == "untrusted"


# --- loading credentials ----------------------------------------------------------------


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("hostmesh-tls-*")}


@pytest.mark.parametrize("use_memfd", [True, False], ids=["memfd", "tempfile"])
def test_credentials_load_from_memory_and_leave_no_file(
    ca: CertificateAuthority, use_memfd: bool
) -> None:
    creds, _ = node_creds(ca, "db-1")
    before = _leftovers()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert_chain(ctx, creds.chain_pem, creds.key_pem, use_memfd=use_memfd)
    assert _leftovers() == before
    other, _ = node_creds(ca, "db-2")
    with pytest.raises(CertificateError, match="do not load"):
        load_cert_chain(ctx, creds.chain_pem, other.key_pem, use_memfd=use_memfd)
    assert _leftovers() == before


def test_bad_credentials_are_clear_errors(ca: CertificateAuthority) -> None:
    creds, _ = node_creds(ca, "db-1")
    with pytest.raises(CertificateError, match="roots bundle is empty"):
        server_context(creds.chain_pem, creds.key_pem, b"")
    with pytest.raises(CertificateError, match="roots bundle does not load"):
        client_context(creds.chain_pem, creds.key_pem, b"-----BEGIN CERTIFICATE-----\nx\n")
    with pytest.raises(CertificateError, match="do not load"):
        client_context(b"not a certificate", creds.key_pem, creds.roots_pem)


def test_contexts_require_tls13_and_peer_certificates(ca: CertificateAuthority) -> None:
    creds, _ = node_creds(ca, "db-1")
    for ctx in (creds.server(), creds.client()):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname  # the identity is the URI SAN, checked after
    assert creds.server().num_tickets == 0


def test_by_default_the_key_never_touches_a_file(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Linux the chain and key go through a memfd: no temporary file is made."""
    creds, _ = node_creds(ca, "db-1")

    def no_files(*args: object, **kwargs: object) -> tuple[int, str]:
        raise AssertionError("a temporary file was created for the private key")

    monkeypatch.setattr(tempfile, "mkstemp", no_files)
    assert creds.server().verify_mode == ssl.CERT_REQUIRED

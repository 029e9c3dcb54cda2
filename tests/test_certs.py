"""The agent's node certificate against a real server on loopback over TLS: a join with
a join token (server trusted by a CA pin or a roots file), renewal over mutual TLS,
refusals, revocation, and a root rotation; plus the server's own certificate."""

from __future__ import annotations

import contextlib
import ipaddress
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from conftest import agent_config, trio_test
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from hostmesh import AgentServerConfig, AuthError, CertificateError, ServerConfig
from hostmesh._errors import CsrRejectedError, PeerCertificateError
from hostmesh._pki import load_certificates, spki_pin, verify_node_certificate
from hostmesh._tls import make_node_key_and_csr
from hostmesh.agent._certs import CertificateManager, NodeCertificate
from hostmesh.server import Server
from hostmesh.server._ca import CertificateAuthority
from hostmesh.server._ca_store import issue_server_certificate

pytestmark = pytest.mark.sockets


@contextlib.asynccontextmanager
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[Server, str]]:
    """A real server (TLS listener on loopback); yields it and its host:port."""
    server = Server(
        ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path / "server")), print_token=False
    )
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.run)
        yield server, f"{host}:{port}"
        nursery.cancel_scope.cancel()


async def make_agent(
    tmp_path: Path, server: Server, address: str, node: str = "web-1", pattern: str = "web-*",
    **trust: str,
) -> CertificateManager:  # fmt: skip
    secret, _ = await server.tokens.create("join", node_pattern=pattern)
    token_file = tmp_path / f"join-token-{node}"
    token_file.write_text(secret + "\n")
    trust.setdefault("ca_pin", spki_pin(server.ca.active.cert))
    cfg = replace(
        agent_config(tmp_path / node),
        node_name=node,
        servers=(address,),
        server=AgentServerConfig(join_token_file=str(token_file), **trust),
    )
    return CertificateManager(cfg)


@trio_test(timeout=30)
async def test_agent_joins_by_pin_keeps_its_certificate_and_renews_over_mtls(
    tmp_path: Path,
) -> None:
    async with tls_server(tmp_path) as (server, address):
        agent = await make_agent(tmp_path, server, address)
        cert = await agent.ensure()
        assert cert.identity.spiffe_id == "spiffe://mesh/node/web-1"
        now = datetime.now(UTC)
        assert verify_node_certificate([cert.cert], server.ca.roots, now=now).node == "web-1"
        assert timedelta(hours=71) < cert.not_after - now <= timedelta(hours=72)
        assert cert.renew_at - now < timedelta(hours=48, minutes=1)
        key_file = agent.dir / "node.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(agent.dir.stat().st_mode) == 0o700

        # Renewal: a new key and certificate for the same node, over mutual TLS.
        renewed = await agent.renew()
        assert renewed.cert.serial_number != cert.cert.serial_number
        assert renewed.key_pem != cert.key_pem and renewed.identity == cert.identity
        assert set(server.ca.certificates_of("web-1")) == {
            cert.cert.serial_number, renewed.cert.serial_number}  # fmt: skip
        assert agent.client_context() is not None and agent.server_context() is not None

        # After a restart the kept certificate is used: no join (the token is gone).
        Path(agent.config.server.join_token_file).unlink()  # noqa: ASYNC240
        again = CertificateManager(agent.config)
        kept = await again.ensure()
        assert kept.cert.serial_number == renewed.cert.serial_number


@trio_test(timeout=30)
async def test_joins_that_must_fail_fail_clearly_and_keep_nothing(tmp_path: Path) -> None:
    async with tls_server(tmp_path) as (server, address):
        other_root = CertificateAuthority.create("mesh", now=datetime.now(UTC)).active.cert
        cases: list[tuple[CertificateManager, type[Exception], str]] = [
            # The pin of another CA: whoever answers is not our server.
            (await make_agent(tmp_path, server, address, ca_pin=spki_pin(other_root)),
             CertificateError, "no CA root matches"),
            # A token for web-* cannot join as db-1.
            (await make_agent(tmp_path, server, address, node="db-1"),
             AuthError, "not 'db-1'"),
        ]  # fmt: skip
        # Roots of another CA in ca_file: the verified handshake fails.
        other_file = tmp_path / "other-roots.pem"
        other_file.write_bytes(
            CertificateAuthority.create("mesh", now=datetime.now(UTC)).bundle_pem()
        )
        cases.append((await make_agent(tmp_path, server, address, node="web-7", ca_pin="",
                                       ca_file=str(other_file)),
                      CertificateError, "no server answered"))  # fmt: skip
        # No join token file.
        agent = await make_agent(tmp_path, server, address, node="web-8")
        Path(agent.config.server.join_token_file).unlink()  # noqa: ASYNC240
        cases.append((agent, CertificateError, "needs a join token"))
        for agent, error, words in cases:
            with pytest.raises(error, match=words):
                await agent.ensure()
            assert not agent.dir.exists()
        # A revoked token stops working at once.
        agent = await make_agent(tmp_path, server, address, node="web-9")
        [token] = [t for t in await server.tokens.list() if t.node_pattern == "web-*"][-1:]
        await server.tokens.revoke(token.accessor)
        with pytest.raises(AuthError, match="401"):
            await agent.ensure()
        # The right roots file works.
        roots_file = tmp_path / "roots.pem"
        roots_file.write_bytes(server.ca.bundle_pem())
        ok = await make_agent(tmp_path, server, address, node="web-5", ca_pin="",
                              ca_file=str(roots_file))  # fmt: skip
        assert (await ok.ensure()).identity.node == "web-5"


@trio_test(timeout=30)
async def test_a_revoked_node_cannot_renew_and_joins_again(tmp_path: Path) -> None:
    async with tls_server(tmp_path) as (server, address):
        agent = await make_agent(tmp_path, server, address)
        first = await agent.ensure()
        now = datetime.now(UTC)
        assert server.ca_keeper is not None
        await server.ca_keeper.update(lambda ca: ca.revoke_node("web-1", now=now))
        with pytest.raises(AuthError, match="401"):
            await agent.renew()
        # The renewal loop, at renew_at, falls back to a join with its token.
        agent.now = lambda: datetime.now(UTC) + timedelta(hours=49)
        changed: list[int] = []
        async with trio.open_nursery() as nursery:

            def on_change(cert: NodeCertificate) -> None:
                changed.append(cert.cert.serial_number)  # the kept one first, then the new one
                if len(changed) == 2:
                    nursery.cancel_scope.cancel()

            kept = await nursery.start(lambda **kw: agent.run(on_change=on_change, **kw))
            assert kept.cert.serial_number == first.cert.serial_number
        assert changed[0] == first.cert.serial_number
        assert changed[1] != first.cert.serial_number and changed[1] not in server.ca.revocations
        assert agent.load() is not None and agent.load().cert.serial_number == changed[1]  # type: ignore[union-attr]


@trio_test(timeout=30)
async def test_after_a_root_rotation_renewed_certificates_chain_to_both_roots(
    tmp_path: Path,
) -> None:
    async with tls_server(tmp_path) as (server, address):
        agent = await make_agent(tmp_path, server, address)
        before = await agent.ensure()
        old_roots = before.roots
        assert server.ca_keeper is not None
        await server.ca_keeper.update(lambda ca: ca.rotate(now=datetime.now(UTC)))
        renewed = await agent.renew()
        assert len(renewed.roots) == 2  # the agent now trusts both roots
        chain = load_certificates(renewed.chain_pem)
        now = datetime.now(UTC)
        # Peers still on the old bundle accept the new certificate (leaf -> cross-signed -> R1).
        assert verify_node_certificate(chain, old_roots, now=now).node == "web-1"
        with pytest.raises(PeerCertificateError):
            verify_node_certificate(chain[:1], old_roots, now=now)
        # And the next renewal runs with the new certificate over mutual TLS.
        assert (await agent.renew()).identity.node == "web-1"


def test_server_certificate_names_a_server_never_a_node() -> None:
    now = datetime.now(UTC)
    ca = CertificateAuthority.create("mesh", now=now)
    cert = issue_server_certificate(ca, "srv-1", ["127.0.0.1", "mesh-1.example.com"], now=now)
    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://mesh/server/srv-1"]  # fmt: skip
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["mesh-1.example.com"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.not_valid_after_utc - now <= timedelta(hours=72)
    # It chains to the root, but it is no node identity: an agent cannot use one to renew.
    with pytest.raises(PeerCertificateError) as caught:
        verify_node_certificate([leaf], ca.roots, now=now)
    assert caught.value.reason in ("identity", "untrusted")
    csr = make_node_key_and_csr("srv-1").csr_pem
    for name, addresses in (("srv_1", []), ("srv-1", ["not an address!"]), ("srv-1", ["a" * 300])):
        with pytest.raises(CsrRejectedError):
            ca.issue_server(csr, name, addresses, now=now)
    assert ca.certificates_of("srv-1") == {}  # not in the node ledger


@trio_test(timeout=30)
async def test_an_agent_with_servers_joins_in_the_background_and_keeps_serving(
    tmp_path: Path,
) -> None:
    from conftest import running_agent

    async with tls_server(tmp_path) as (server, address):
        manager = await make_agent(tmp_path, server, address)
        async with running_agent(manager.config) as (agent, addrs):
            assert addrs.api[1] > 0  # started without waiting for the join
            with trio.fail_after(15):
                while agent.sync_tls is None:  # set once the join has a certificate
                    await trio.sleep(0.02)
            assert agent.certificates is not None and agent.certificates.current is not None
            assert agent.certificates.current.identity.node == "web-1"
            assert agent.sync_tls() is not None

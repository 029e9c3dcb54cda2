"""The agent's node certificate: join with a join token, keep it, renew it over mutual TLS.

- **Join** (no certificate yet, or the last one expired or was revoked): make
  an EC P-256 key and a CSR, and ``POST /v1/ca/sign`` the node name, the CSR
  and the join token (``[server] join_token_file``) to a server over TLS. The
  server is trusted either by ``[server] ca_file`` (PEM roots) or by
  ``[server] ca_pin``: as kubeadm's discovery, the roots are first fetched
  without verification (``GET /v1/ca/roots``), one of them must have the
  pinned SubjectPublicKeyInfo hash, and the join itself then runs over a TLS
  connection verified against those roots, so a man in the middle cannot
  pass. After any verified handshake the server's certificate must name a
  server of the mesh (URI SAN ``spiffe://<mesh>/server/<name>``).
- **Renew** at ``renew_at`` (2/3 of the life, 48 h into the default 72 h):
  ``POST /v1/ca/renew`` with a new key's CSR over mutual TLS with the current
  certificate; failures retry with doubling backoff (``renew_retry`` up to
  ``renew_retry_max``). A renewal the server refuses (401/403: revoked or
  unknown) falls back to a join.
- **Keep**: ``<data_dir>/certs/node.key`` (0600), ``node.pem`` (leaf and
  intermediates) and ``roots.pem`` (the trust bundle the server sent last).
  A key that does not match its certificate (a crash between writes) counts
  as no certificate.

Servers are tried in the order of ``servers``; an unreachable one or a 5xx/429
moves on to the next, a refusal (4xx) does not (every server would say the same).
"""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hostmesh._config import AgentConfig, parse_hostport
from hostmesh._errors import AuthError, CertificateError, HostmeshError
from hostmesh._log import get_logger
from hostmesh._pki import (
    NodeIdentity,
    load_certificates,
    node_identity,
    renew_at,
    spki_pin,
    validate_trust_domain,
)
from hostmesh._tls import client_context, make_node_key_and_csr, server_context

__all__ = ["CERTS_DIR", "CertificateManager", "NodeCertificate", "spki_pin"]

log = get_logger("hostmesh.agent.certs")

CERTS_DIR = "certs"
KEY_FILE = "node.key"
CHAIN_FILE = "node.pem"
ROOTS_FILE = "roots.pem"
#: A join token file is one line; anything larger is not one.
MAX_TOKEN_FILE = 4096
#: Largest answer read from a server (a chain and a bundle of a few roots are < 8 KiB).
MAX_ANSWER = 256 * 1024


def _now() -> datetime:
    return datetime.now(UTC)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace ``path`` (temporary file created with ``mode``, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _mesh_of(root: x509.Certificate) -> str:
    """The trust domain in a root's URI SAN ``spiffe://<mesh>``."""
    try:
        san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError("a CA root has no spiffe:// URI SAN: not a hostmesh root") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
            return validate_trust_domain(uri[len("spiffe://") :])
    raise CertificateError("a CA root has no spiffe://<mesh> URI SAN: not a hostmesh root")


@dataclass(frozen=True)
class NodeCertificate:
    """This node's certificate chain, key and trust bundle (PEM)."""

    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return load_certificates(self.chain_pem, what="node certificate")[0]

    @property
    def identity(self) -> NodeIdentity:
        return node_identity(self.cert)

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def renew_at(self) -> datetime:
        return renew_at(self.cert)

    @property
    def roots(self) -> list[x509.Certificate]:
        return load_certificates(self.roots_pem, what="CA roots")

    def check(self) -> None:
        """Raise CertificateError unless the key matches the certificate and roots load."""
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if key.public_key() != self.cert.public_key():
            raise CertificateError("the node key does not match the node certificate")
        if not self.roots:
            raise CertificateError("no CA roots")


class CertificateManager:
    """Gets, keeps and renews this agent's node certificate; the agent owns one.

    Args:
        config: the agent config (``node_name``, ``servers``, ``data_dir``, ``[server]``).
        now: wall-clock time (aware UTC); tests inject one.
        transport: an httpx transport for tests; default real TCP + TLS.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        now: Callable[[], datetime] = _now,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.now = now
        self.transport = transport
        self.dir = Path(config.data_dir) / CERTS_DIR
        self.current: NodeCertificate | None = None

    # --- files ------------------------------------------------------------------------

    def load(self) -> NodeCertificate | None:
        """The kept certificate, or None when there is none or it is unusable (logged)."""
        try:
            cert = NodeCertificate(
                chain_pem=(self.dir / CHAIN_FILE).read_bytes(),
                key_pem=(self.dir / KEY_FILE).read_bytes(),
                roots_pem=(self.dir / ROOTS_FILE).read_bytes(),
            )
            cert.check()
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, HostmeshError) as exc:
            log.warning("kept node certificate unusable; joining again", error=str(exc))
            return None
        self.current = cert
        return cert

    def _save(self, cert: NodeCertificate) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_file(self.dir / KEY_FILE, cert.key_pem, 0o600)
        _write_file(self.dir / CHAIN_FILE, cert.chain_pem, 0o644)
        _write_file(self.dir / ROOTS_FILE, cert.roots_pem, 0o644)
        self.current = cert

    # --- TLS contexts for others ---------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        """Mutual TLS as this node (to servers and other agents); build a new one after a
        renewal. Raises CertificateError when there is no certificate yet."""
        cert = self._require()
        return client_context(cert.chain_pem, cert.key_pem, cert.roots_pem)

    def server_context(self) -> ssl.SSLContext:
        """The inbound listener's context (:4141), requiring a node certificate."""
        cert = self._require()
        return server_context(cert.chain_pem, cert.key_pem, cert.roots_pem)

    def _require(self) -> NodeCertificate:
        if self.current is None:
            raise CertificateError("this agent has no node certificate yet (it has not joined)")
        return self.current

    # --- talking to servers --------------------------------------------------------------

    def _urls(self) -> list[str]:
        if not self.config.servers:
            raise CertificateError("no servers configured (agent.toml: servers)")
        urls = []
        for server in self.config.servers:
            host, port = parse_hostport(server)
            urls.append(f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}")
        return urls

    def _trust_context(
        self, roots_pem: bytes, cert: NodeCertificate | None = None
    ) -> ssl.SSLContext:
        if cert is not None:
            return client_context(cert.chain_pem, cert.key_pem, roots_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the identity is the URI SAN, checked after the handshake
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as exc:
            raise CertificateError(f"the CA roots do not load: {exc}") from exc
        return ctx

    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        roots_pem: bytes,
        cert: NodeCertificate | None = None,
        token: str = "",
    ) -> dict[str, Any]:
        """POST to the first server that answers; returns the JSON object it sent."""
        ctx = self._trust_context(roots_pem, cert)
        mesh = _mesh_of(load_certificates(roots_pem, what="CA roots")[0])
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        errors = []
        for url in self._urls():
            try:
                async with self._client(ctx) as http:
                    response = await http.post(url + path, json=body, headers=headers)
                    self._check_server(response, mesh)
            except httpx.HTTPError as exc:
                errors.append(f"{url}: {exc or type(exc).__name__}")
                continue
            text = response.text.strip().splitlines()[0] if response.text.strip() else ""
            if response.status_code in (401, 403):
                raise AuthError("forbidden", f"{url}{path}: {response.status_code} {text}")
            if response.status_code == 429 or response.status_code >= 500:
                errors.append(f"{url}: {response.status_code} {text}")
                continue
            if response.status_code != 200:
                raise CertificateError(f"{url}{path}: {response.status_code} {text}")
            try:
                doc = response.json()
            except ValueError:
                doc = None
            if not isinstance(doc, dict) or not all(
                isinstance(doc.get(k), str) for k in ("chain", "roots")
            ):
                raise CertificateError(f"{url}{path}: the answer is not a certificate")
            return doc
        raise CertificateError(f"no server answered {path}: " + "; ".join(errors))

    def _client(self, ctx: ssl.SSLContext | bool) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
        return httpx.AsyncClient(
            verify=ctx,
            transport=self.transport,
            timeout=self.config.server.request_timeout,
            limits=limits,
        )

    @staticmethod
    def _check_server(response: httpx.Response, mesh: str) -> None:
        """After a verified handshake: the peer must be a server of ``mesh``."""
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        if ssl_object is None:
            return  # a test transport: no TLS to check
        der = ssl_object.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if not any(u.startswith(f"spiffe://{mesh}/server/") for u in uris):
            raise httpx.ConnectError(
                f"the peer is not a server of mesh {mesh!r} (URI SANs: {uris or 'none'})"
            )

    # --- trust at join ---------------------------------------------------------------------

    async def _join_roots(self) -> bytes:
        """The roots to verify the server with at a join: ca_file, a pinned discovery, or
        the bundle kept from the last certificate."""
        cfg = self.config.server
        if cfg.ca_file:
            try:
                return await trio.to_thread.run_sync(Path(cfg.ca_file).read_bytes)
            except OSError as exc:
                raise CertificateError(f"server.ca_file {cfg.ca_file}: {exc.strerror}") from None
        if cfg.ca_pin:
            return await self._discover(cfg.ca_pin)
        try:
            return await trio.to_thread.run_sync((self.dir / ROOTS_FILE).read_bytes)
        except FileNotFoundError:
            pass
        raise CertificateError(
            "cannot trust the servers for a join: set server.ca_pin (hostmesh certs --server"
            " shows it) or server.ca_file in agent.toml"
        )

    async def _discover(self, pin: str) -> bytes:
        """Fetch ``/v1/ca/roots`` unverified and keep only what matches the pin."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # checked by the pin below, then by a verified join
        errors = []
        for url in self._urls():
            try:
                async with self._client(ctx) as http:
                    response = await http.get(url + "/v1/ca/roots")
                roots_pem = response.json()["roots_pem"].encode()
                roots = load_certificates(roots_pem, what="CA roots")
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
                errors.append(f"{url}: {exc or type(exc).__name__}")
                continue
            except CertificateError as exc:
                errors.append(f"{url}: {exc}")
                continue
            if any(secrets.compare_digest(spki_pin(r), pin) for r in roots):
                return bytes(roots_pem)
            raise CertificateError(
                f"{url}: no CA root matches server.ca_pin {pin} (the server is not the one"
                " pinned, or the pin is wrong)"
            )
        raise CertificateError("no server answered /v1/ca/roots: " + "; ".join(errors))

    def _join_token(self) -> str:
        path = Path(self.config.server.join_token_file)
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_TOKEN_FILE + 1)
        except OSError as exc:
            raise CertificateError(
                f"server.join_token_file {path}: {exc.strerror}; a join needs a join token"
                " (hostmesh token create --kind join)"
            ) from None
        token = raw.decode("utf-8", "replace").strip()
        if not token or len(raw) > MAX_TOKEN_FILE or any(c.isspace() for c in token):
            raise CertificateError(f"server.join_token_file {path}: not a token (one line)")
        return token

    # --- join and renew ------------------------------------------------------------------

    def _issued(self, doc: dict[str, Any], key_pem: bytes) -> NodeCertificate:
        cert = NodeCertificate(
            chain_pem=doc["chain"].encode(), key_pem=key_pem, roots_pem=doc["roots"].encode()
        )
        try:
            cert.check()
            identity = cert.identity
        except (ValueError, TypeError, HostmeshError) as exc:
            raise CertificateError(f"the server sent an unusable certificate: {exc}") from None
        if identity.node != self.config.node_name:
            raise CertificateError(f"the server issued a certificate for {identity}, not this node")
        return cert

    async def join(self) -> NodeCertificate:
        """Get a first certificate with the join token; keeps and returns it.

        Raises:
            AuthError: the server refused the token (wrong, expired, another node's).
            CertificateError: no trust (pin/file), no token, no server answered.
        """
        roots_pem = await self._join_roots()
        token = self._join_token()
        key = make_node_key_and_csr(self.config.node_name)
        body = {"node": self.config.node_name, "csr": key.csr_pem.decode()}
        doc = await self._post("/v1/ca/sign", body, roots_pem=roots_pem, token=token)
        cert = self._issued(doc, key.key_pem)
        await trio.to_thread.run_sync(self._save, cert)
        log.info("joined: node certificate issued", identity=str(cert.identity),
                 not_after=cert.not_after.isoformat())  # fmt: skip
        return cert

    async def renew(self) -> NodeCertificate:
        """A new key and certificate over mutual TLS with the current one.

        Raises:
            AuthError: the server refused the certificate (revoked, expired, unknown root).
            CertificateError: no certificate yet, or no server answered.
        """
        current = self._require()
        key = make_node_key_and_csr(self.config.node_name)
        doc = await self._post("/v1/ca/renew", {"csr": key.csr_pem.decode()},
                               roots_pem=current.roots_pem, cert=current)  # fmt: skip
        cert = self._issued(doc, key.key_pem)
        await trio.to_thread.run_sync(self._save, cert)
        log.info("node certificate renewed", not_after=cert.not_after.isoformat())
        return cert

    async def ensure(self) -> NodeCertificate:
        """The kept certificate if it is still valid, else a join."""
        cert = self.current or self.load()
        if cert is not None and self.now() < cert.not_after:
            return cert
        return await self.join()

    async def run(
        self,
        *,
        on_change: Callable[[NodeCertificate], None] | None = None,
        task_status: trio.TaskStatus[NodeCertificate | None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a certificate: the kept one or a join, then renewals at ``renew_at``, until
        cancelled; never returns, never raises for a server that refuses or is away.

        Reports the kept certificate (or None) at once, so an agent starts
        without a server (static stability); joins are retried with backoff.
        ``on_change`` is called with the first usable certificate and every
        new one (build new TLS contexts there).
        """
        cfg = self.config.server
        kept = self.current or self.load()
        task_status.started(kept)
        backoff = cfg.renew_retry
        while True:
            try:
                cert = await self.ensure()
                break
            except HostmeshError as exc:
                log.warning("no node certificate yet; retrying the join", error=str(exc),
                            retry_in=f"{backoff:g}s")  # fmt: skip
                await trio.sleep(backoff)
                backoff = min(backoff * 2, cfg.renew_retry_max)
        if on_change is not None:
            on_change(cert)
        backoff = cfg.renew_retry
        while True:
            wait = (cert.renew_at - self.now()).total_seconds()
            if wait > 0:
                await trio.sleep(wait)
            try:
                if self.now() >= cert.not_after:
                    cert = await self.join()  # too late to renew: the server would refuse
                else:
                    try:
                        cert = await self.renew()
                    except AuthError as exc:
                        log.warning("renewal refused; joining again", error=str(exc))
                        cert = await self.join()
            except HostmeshError as exc:
                log.warning("node certificate not renewed; retrying", error=str(exc),
                            retry_in=f"{backoff:g}s")  # fmt: skip
                await trio.sleep(backoff)
                backoff = min(backoff * 2, cfg.renew_retry_max)
                continue
            backoff = cfg.renew_retry
            if on_change is not None:
                on_change(cert)

"""TLS 1.3 with mutual authentication by node certificates, for agents and servers.

- :func:`server_context` / :func:`client_context` build ``ssl.SSLContext`` s:
  TLS 1.3 only, the peer's certificate required and verified against the
  mesh's roots (OpenSSL checks chain, validity and key usage in the handshake).
  Node certificate, chain and key come from memory; the ssl module only loads
  them from a path, so they go through an anonymous memfd (never on a disk),
  or where there is none a 0600 temporary file that is deleted at once.
- The node's identity is its URI SAN ``spiffe://<mesh>/node/<node>``, not a
  host name, so hostname checking is off and :func:`check_peer` (or
  :func:`handshake`) checks the identity and the revocation list after the
  handshake. A connection is only trusted after that check.
- Contexts are immutable in use: after a renewal or a new CA bundle build new
  ones; open connections keep theirs (rotation without dropping connections).
- :func:`make_node_key_and_csr`: the agent's side of getting a certificate.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._errors import CertificateError, PeerCertificateError, RemoteProtocolError
from ._pki import NodeIdentity, RevocationList, check_identity, node_identity, validate_node_name

__all__ = [
    "NodeKey",
    "check_peer",
    "client_context",
    "handshake",
    "load_cert_chain",
    "make_node_key_and_csr",
    "peer_certificate",
    "server_context",
]

# OpenSSL X509_V_ERR_* codes that mean "outside its validity period".
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10


#: What has a peer certificate after a handshake.
_HasPeerCert = ssl.SSLObject | ssl.SSLSocket | trio.SSLStream[Any]


@dataclass(frozen=True)
class NodeKey:
    """A node's new private key and the CSR to send to a server, both PEM."""

    key_pem: bytes
    csr_pem: bytes


def make_node_key_and_csr(node: str) -> NodeKey:
    """A fresh EC P-256 key and a CSR for ``node`` (agent side of join and renewal).

    The CSR's subject is ``CN=<node>``; the CA ignores it and names the node it
    authorised, so the CSR carries no SAN.

    Raises:
        ValidationError: ``node`` is not a valid node name.
    """
    validate_node_name(node)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NodeKey(key_pem=key_pem, csr_pem=csr.public_bytes(serialization.Encoding.PEM))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def load_cert_chain(
    ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes, *, use_memfd: bool | None = None
) -> None:
    """Load a certificate chain (leaf first) and its private key from memory into ``ctx``.

    Args:
        use_memfd: None: a memfd where Linux has one, else a temporary file.

    Raises:
        CertificateError: not PEM, or the key does not match the certificate.
    """
    data = chain_pem.rstrip(b"\n") + b"\n" + key_pem
    if use_memfd is None:
        use_memfd = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")
    try:
        if use_memfd:
            fd = os.memfd_create("hostmesh-tls", os.MFD_CLOEXEC)
            try:
                _write_all(fd, data)
                # Opening /proc/self/fd/N opens the memfd afresh at offset 0.
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        else:
            fd, path = tempfile.mkstemp(prefix="hostmesh-tls-", suffix=".pem")  # mode 0600
            try:
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
                ctx.load_cert_chain(path)
            finally:
                os.unlink(path)
    except ssl.SSLError as exc:
        raise CertificateError(f"node certificate and key do not load: {exc}") from exc
    except OSError as exc:
        raise CertificateError(f"cannot load the node certificate: {exc}") from exc


def _context(*, server: bool, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # The identity is the URI SAN, checked after the handshake: no DNS-name check.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if not roots_pem.strip():
        raise CertificateError("the CA roots bundle is empty")
    try:
        ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise CertificateError(f"the CA roots bundle does not load: {exc}") from exc
    load_cert_chain(ctx, chain_pem, key_pem)
    return ctx


def server_context(chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires and verifies a client node certificate.

    Args:
        chain_pem: this node's certificate, then its intermediates (PEM).
        key_pem: its private key (PEM, unencrypted).
        roots_pem: the CA bundle (every current root).

    Raises:
        CertificateError: the certificate, key or roots do not load.
    """
    ctx = _context(server=True, chain_pem=chain_pem, key_pem=key_pem, roots_pem=roots_pem)
    ctx.num_tickets = 0  # no resumption: every connection shows its certificate
    return ctx


def client_context(chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.3 client context that presents this node's certificate and verifies the server's.

    Wrap with ``server_hostname=None``; check the server's identity with
    :func:`check_peer` after the handshake.

    Raises:
        CertificateError: the certificate, key or roots do not load.
    """
    return _context(server=False, chain_pem=chain_pem, key_pem=key_pem, roots_pem=roots_pem)


def peer_certificate(conn: _HasPeerCert) -> x509.Certificate:
    """The peer's leaf certificate of a completed handshake (an SSLObject, SSLSocket or
    trio.SSLStream).

    Raises:
        PeerCertificateError: (``missing``) the peer sent none.
    """
    der = conn.getpeercert(binary_form=True)
    if not der:
        raise PeerCertificateError("missing", "peer presented no certificate")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PeerCertificateError("identity", f"peer certificate is malformed: {exc}") from exc


def check_peer(
    conn: _HasPeerCert,
    *,
    mesh: str,
    expected_node: str | None = None,
    revocations: RevocationList | None = None,
) -> NodeIdentity:
    """After a handshake: the peer's node identity, checked.

    The chain and the validity period were verified by OpenSSL in the handshake;
    this checks what it cannot: the SPIFFE ID (mesh and, if given, node) and
    the revocation list.

    Raises:
        PeerCertificateError: reason ``missing``, ``identity`` or ``revoked``.
    """
    cert = peer_certificate(conn)
    identity = node_identity(cert)
    check_identity(identity, mesh=mesh, expected_node=expected_node)
    if revocations is not None and revocations.is_revoked(cert):
        raise PeerCertificateError(
            "revoked", f"certificate {cert.serial_number:x} of {identity} is revoked"
        )
    return identity


def _handshake_error(exc: BaseException) -> PeerCertificateError | RemoteProtocolError:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        reason = (
            "expired"
            if cause.verify_code in (_X509_V_ERR_CERT_HAS_EXPIRED, _X509_V_ERR_CERT_NOT_YET_VALID)
            else "untrusted"
        )
        return PeerCertificateError(reason, f"peer certificate refused: {cause.verify_message}")
    if isinstance(cause, ssl.SSLError):
        if cause.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return PeerCertificateError("missing", "peer presented no certificate")
        return RemoteProtocolError(f"TLS handshake failed: {cause.reason or cause}")
    return RemoteProtocolError(f"TLS handshake failed: {cause or exc!r}")


async def handshake(
    stream: trio.SSLStream[Any],
    *,
    mesh: str,
    expected_node: str | None = None,
    revocations: RevocationList | None = None,
) -> NodeIdentity:
    """Run the TLS handshake on ``stream`` and :func:`check_peer` the result.

    The caller owns ``stream`` and closes it, also when this raises.

    In TLS 1.3 a server checks the client's certificate after the client has
    finished its side of the handshake: a client the server refuses returns
    from here and learns it on its first read (``trio.BrokenResourceError``).

    Raises:
        PeerCertificateError: the peer's certificate was refused (``reason`` says why).
        RemoteProtocolError: the peer does not speak TLS or broke the handshake.
    """
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        raise _handshake_error(exc) from exc
    return check_peer(stream, mesh=mesh, expected_node=expected_node, revocations=revocations)

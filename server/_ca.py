"""The mesh's certificate authority: roots, node certificates, rotation, revocation (sans-IO).

No I/O and no clock: every decision takes ``now`` (wall-clock, a timezone-aware
datetime for certificates; a monotonic float in seconds for the rate limiter).
The server wires it to the store and the sync protocol; persistence of the
secret state is in :mod:`hostmesh.server._ca_keys`.

Certificates (Consul's built-in CA is the reference for the numbers):

- Root: ECDSA P-256, self-signed, ``CN=hostmesh root <key id>``, ``O=hostmesh``,
  URI SAN ``spiffe://<mesh>`` (the SPIFFE trust domain), CA:TRUE with path
  length 1 (room for the cross-signed root below it), key usage keyCertSign +
  cRLSign, valid 10 years (Consul's ``root_cert_ttl``) from ``now`` minus the
  backdate.
- Node (leaf): the CSR's public key only (EC P-256 required). Subject, SANs and
  extensions the CSR asks for are ignored; the one URI SAN is
  ``spiffe://<mesh>/node/<node>`` with the node name the caller authorised
  (the join token or the mTLS identity of a renewal). CA:FALSE, key usage
  digitalSignature, extended key usage serverAuth + clientAuth (a node both
  dials and accepts), a random 159-bit serial, 72 h TTL by default (Consul's
  ``leaf_cert_ttl``), ``not_before`` one minute in the past for clock skew, and
  never beyond the issuing root. Renew at :func:`renew_at` (2/3 of the life).

Root rotation (:meth:`CertificateAuthority.rotate`), by cross-signing as Consul does:

1. A new root R2 is made, and a cross-signed certificate X: R2's subject and
   public key, issued and signed by the old root R1. The bundle becomes
   [R1, R2]; new leaves are signed by R2 and handed out with the chain
   [leaf, X].
2. During the overlap an agent that still trusts only R1 accepts a new leaf
   through leaf -> X -> R1; an agent that has the new bundle accepts old
   leaves (-> R1) and new ones (-> R2). Nobody loses trust.
3. R1 may be dropped once every leaf it signed has expired and every agent has
   had time to get the new bundle: at ``max(last R1 leaf expiry, rotation +
   leaf TTL)``. Every live agent renews (and receives the bundle) within one
   leaf TTL, and an agent that did not has an expired certificate anyway.
   :meth:`CertificateAuthority.prune` drops R1 and stops sending X then; a
   second rotation is refused until it has.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostmesh._errors import (
    CaStateError,
    CertificateError,
    CsrRejectedError,
    NotFoundError,
    RateLimitedError,
    ValidationError,
)
from hostmesh._pki import (
    NodeIdentity,
    Revocation,
    RevocationList,
    certificates_pem,
    renew_at,
    utc,
    validate_node_name,
    validate_trust_domain,
    verify_node_certificate,
)

__all__ = [
    "CSR_RATE",
    "DAYS",
    "HOURS",
    "MAX_CSR_BYTES",
    "MINUTES",
    "SECONDS",
    "CaConfig",
    "CertificateAuthority",
    "CsrRateLimiter",
    "IssuedCertificate",
    "RootEntry",
    "renew_at",
]

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS

# Consul's csr_max_per_second default: the servers sign at most this many CSRs a second.
CSR_RATE = 50.0
# A P-256 CSR is ~450 bytes of PEM; an RSA-4096 one ~1.7 kB. Anything far larger is garbage.
MAX_CSR_BYTES = 8 * 1024
# A DNS name in a server certificate (RFC 1123 labels, dot-separated).
_DNS_NAME_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                          r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # fmt: skip
# The path length a root allows: the cross-signed root below it during a rotation.
ROOT_PATH_LENGTH = 1


@dataclass(frozen=True)
class CaConfig:
    """Tunables of the CA; the server maps its config file onto this."""

    leaf_ttl: float = 72 * HOURS  # s; Consul's leaf_cert_ttl. Shorter: fewer revocations, more CSRs
    root_ttl: float = 3650 * DAYS  # s; 10 years, Consul's root_cert_ttl. Rotate long before it ends
    backdate: float = 1 * MINUTES  # s; not_before = now - backdate, for agent clocks running behind
    min_leaf_ttl: float = 1 * MINUTES  # s; the shortest TTL a caller may ask for

    def __post_init__(self) -> None:
        if not self.min_leaf_ttl > 0:
            raise ValueError("min_leaf_ttl must be > 0")
        if self.leaf_ttl < self.min_leaf_ttl:
            raise ValueError(f"leaf_ttl must be at least {self.min_leaf_ttl} s")
        if self.root_ttl <= self.leaf_ttl:
            raise ValueError("root_ttl must be longer than leaf_ttl")
        if not 0 <= self.backdate < self.leaf_ttl:
            raise ValueError("backdate must be >= 0 and shorter than leaf_ttl")


@dataclass
class RootEntry:
    """One root in the bundle, with what the CA knows about it."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cross_signed: x509.Certificate | None = None  # this root signed by its predecessor
    leaves_until: datetime | None = None  # expiry of the last leaf it signed
    retired_at: datetime | None = None  # when a rotation replaced it; None: the active root


@dataclass(frozen=True)
class IssuedCertificate:
    """A node certificate and the chain to hand out with it."""

    node: str
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates (the cross-signed root)

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def renew_at(self) -> datetime:
        return renew_at(self.cert)

    def chain_pem(self) -> bytes:
        """The leaf and its intermediates as PEM, ready for ``load_cert_chain``."""
        return certificates_pem(self.chain)


@dataclass
class _Ledger:
    """Serials issued per node that have not expired yet (for revoking a node)."""

    by_node: dict[str, dict[int, datetime]] = field(default_factory=dict)

    def add(self, node: str, serial: int, not_after: datetime) -> None:
        self.by_node.setdefault(node, {})[serial] = not_after

    def find(self, serial: int) -> tuple[str, datetime] | None:
        for node, serials in self.by_node.items():
            if serial in serials:
                return node, serials[serial]
        return None

    def prune(self, now: datetime, node: str | None = None) -> None:
        for name in [node] if node is not None else list(self.by_node):
            serials = self.by_node.get(name, {})
            for serial in [s for s, na in serials.items() if na < now]:
                del serials[serial]
            if not serials:
                self.by_node.pop(name, None)


def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    return type(key).__name__


def _parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CsrRejectedError(f"CSR must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_CSR_BYTES:
        raise CsrRejectedError(f"CSR is {len(data)} bytes; at most {MAX_CSR_BYTES}")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CsrRejectedError(f"not a PEM or DER certificate signing request: {exc}") from exc


def _check_csr_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CsrRejectedError(f"CSR public key cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CsrRejectedError(
            f"CSR key is {_key_kind(key)}; only EC P-256 (secp256r1) keys are accepted"
        )
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CsrRejectedError(f"CSR signature cannot be checked: {exc}") from exc
    if not valid:
        raise CsrRejectedError("CSR signature does not match its public key")
    return key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _root_subject(key: ec.EllipticCurvePrivateKey) -> x509.Name:
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:16]
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hostmesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"hostmesh root {key_id}"),
        ]
    )


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _ca_certificate(
    *,
    mesh: str,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    path_length: int,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{mesh}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )


class CertificateAuthority:
    """The CA of one mesh (SPIFFE trust domain ``mesh``).

    Not thread-safe; the server serialises calls and persists :meth:`to_bytes`
    after every call that changes state (issue, rotate, revoke, prune).
    """

    FORMAT = "hostmesh-ca"
    VERSION = 1

    def __init__(
        self,
        mesh: str,
        roots: Sequence[RootEntry],
        *,
        config: CaConfig | None = None,
        revocations: RevocationList | None = None,
        issued: dict[str, dict[int, datetime]] | None = None,
    ) -> None:
        self.mesh = validate_trust_domain(mesh)
        self.config = config or CaConfig()
        if not roots:
            raise ValueError("a CA needs at least one root")
        if any(r.retired_at is None for r in roots[:-1]) or roots[-1].retired_at is not None:
            raise ValueError("exactly the last root must be active (retired_at None)")
        self._roots = list(roots)
        self.revocations = revocations if revocations is not None else RevocationList()
        self._ledger = _Ledger({n: dict(s) for n, s in (issued or {}).items()})

    # --- roots ----------------------------------------------------------------

    @classmethod
    def create(
        cls, mesh: str, *, now: datetime, config: CaConfig | None = None
    ) -> CertificateAuthority:
        """A new CA with a fresh root (made at first start)."""
        config = config or CaConfig()
        mesh = validate_trust_domain(mesh)
        return cls(mesh, [cls._make_root(mesh, utc(now), config)], config=config)

    @staticmethod
    def _make_root(mesh: str, now: datetime, config: CaConfig) -> RootEntry:
        key = _new_key()
        subject = _root_subject(key)
        cert = _ca_certificate(
            mesh=mesh,
            subject=subject,
            public_key=key.public_key(),
            issuer=subject,
            signer=key,
            not_before=now - timedelta(seconds=config.backdate),
            not_after=now + timedelta(seconds=config.root_ttl),
            path_length=ROOT_PATH_LENGTH,
        )
        return RootEntry(cert=cert, key=key)

    @property
    def active(self) -> RootEntry:
        """The root that signs new node certificates."""
        return self._roots[-1]

    @property
    def root_entries(self) -> tuple[RootEntry, ...]:
        """Every root still trusted, oldest first (the last is active)."""
        return tuple(self._roots)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The trust bundle agents get: every root still trusted, oldest first."""
        return tuple(r.cert for r in self._roots)

    def bundle_pem(self) -> bytes:
        """:attr:`roots` as PEM (for ``SSLContext.load_verify_locations(cadata=...)``)."""
        return certificates_pem(self.roots)

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """What a new leaf is sent with: the cross-signed active root during an overlap."""
        if len(self._roots) > 1 and self.active.cross_signed is not None:
            return (self.active.cross_signed,)
        return ()

    def overlap_ends(self) -> datetime | None:
        """When the retired roots may be dropped (see the module docstring); None: no overlap."""
        ends = [self._drop_after(r) for r in self._roots[:-1]]
        return max(ends) if ends else None

    def _drop_after(self, root: RootEntry) -> datetime:
        assert root.retired_at is not None
        after = root.retired_at + timedelta(seconds=self.config.leaf_ttl)
        if root.leaves_until is not None:
            after = max(after, root.leaves_until)
        return after

    def rotate(self, *, now: datetime) -> x509.Certificate:
        """Make a new active root, cross-signed by the current one; return the new root.

        Raises:
            CertificateError: a previous rotation's overlap has not ended yet
                (a third root would strand agents two rotations behind).
        """
        now = utc(now)
        self.prune(now)
        ends = self.overlap_ends()
        if ends is not None:
            raise CertificateError(
                f"the previous root rotation's overlap lasts until {ends.isoformat()}:"
                " the old root still backs live certificates; rotate again after that"
            )
        old = self.active
        new = self._make_root(self.mesh, now, self.config)
        new.cross_signed = _ca_certificate(
            mesh=self.mesh,
            subject=new.cert.subject,
            public_key=new.key.public_key(),
            issuer=old.cert.subject,
            signer=old.key,
            not_before=now - timedelta(seconds=self.config.backdate),
            not_after=min(new.cert.not_valid_after_utc, old.cert.not_valid_after_utc),
            path_length=0,
        )
        old.retired_at = now
        self._roots.append(new)
        return new.cert

    def prune(self, now: datetime) -> None:
        """Forget what has expired: ledger entries, revocations, roots past their overlap."""
        now = utc(now)
        self._ledger.prune(now)
        self.revocations.prune(now)
        keep = [r for r in self._roots[:-1] if now < self._drop_after(r)]
        if len(keep) != len(self._roots) - 1:
            self._roots = [*keep, self.active]
            if not keep:
                self.active.cross_signed = None

    # --- node certificates ----------------------------------------------------

    def _leaf_not_after(self, now: datetime, ttl: float | None) -> datetime:
        """When a leaf issued ``now`` expires: its TTL, never past the root or a cross-sign.

        Raises:
            CsrRejectedError: a TTL outside ``min_leaf_ttl``..``root_ttl``.
            CertificateError: the active root has expired.
        """
        ttl = self.config.leaf_ttl if ttl is None else ttl
        if not self.config.min_leaf_ttl <= ttl <= self.config.root_ttl:
            raise CsrRejectedError(
                f"TTL {ttl} s is outside {self.config.min_leaf_ttl}..{self.config.root_ttl} s"
            )
        root = self.active
        not_after = min(
            now + timedelta(seconds=ttl),
            root.cert.not_valid_after_utc,
            *(c.not_valid_after_utc for c in self.intermediates),
        )
        if not_after <= now:
            raise CertificateError(
                f"the CA root expired at {root.cert.not_valid_after_utc.isoformat()}; rotate it"
            )
        return not_after

    def issue(
        self, csr: bytes, node: str, *, now: datetime, ttl: float | None = None
    ) -> IssuedCertificate:
        """Sign a node certificate for ``node`` with the public key of ``csr``.

        Args:
            csr: PEM or DER; only its public key (EC P-256) is used, after its
                signature has been checked. Its subject and SANs are ignored.
            node: the node name the caller authorised (join token or mTLS
                identity), never a name taken from the CSR.
            now: wall-clock time of issue.
            ttl: seconds; default ``config.leaf_ttl``.

        Raises:
            CsrRejectedError: unreadable CSR, bad signature, wrong key type,
                invalid node name or TTL.
            CertificateError: the active root has expired.
        """
        now = utc(now)
        try:
            validate_node_name(node)
        except ValidationError as exc:
            raise CsrRejectedError(str(exc)) from None
        not_after = self._leaf_not_after(now, ttl)
        public_key = _check_csr_key(_parse_csr(csr))
        root = self.active
        intermediates = self.intermediates
        not_before = now - timedelta(seconds=self.config.backdate)
        serial = x509.random_serial_number()  # 159 random bits: no collision to check for
        identity = NodeIdentity(self.mesh, node)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(root.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.spiffe_id)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
                critical=False,
            )
            .sign(root.key, hashes.SHA256())
        )
        self._ledger.prune(now, node)
        self._ledger.add(node, serial, not_after)
        if root.leaves_until is None or not_after > root.leaves_until:
            root.leaves_until = not_after
        return IssuedCertificate(node=node, cert=cert, chain=(cert, *intermediates))

    def issue_server(
        self,
        csr: bytes,
        name: str,
        addresses: Sequence[str],
        *,
        now: datetime,
        ttl: float | None = None,
    ) -> IssuedCertificate:
        """Sign a server's TLS certificate (the listener agents and operators dial).

        Same rules as :meth:`issue` (CSR key only, backdate, never beyond the
        root, chain with the cross-signed root during an overlap), but the URI
        SAN is ``spiffe://<mesh>/server/<name>`` (so it can never pass as a
        node), the extended key usage is serverAuth only, and ``addresses`` become
        IP and DNS SANs. Server certificates are not in the node ledger: revoking
        a node never touches them. ``IssuedCertificate.node`` holds ``name``.

        Raises:
            CsrRejectedError: unreadable CSR, wrong key, invalid name, address or TTL.
            CertificateError: the active root has expired.
        """
        now = utc(now)
        try:
            validate_node_name(name)
        except ValidationError as exc:
            raise CsrRejectedError(f"server name: {exc}") from None
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"spiffe://{self.mesh}/server/{name}")
        ]
        for address in addresses:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError:
                if len(address) > 253 or not _DNS_NAME_RE.fullmatch(address):
                    raise CsrRejectedError(
                        f"server address {address!r} is neither an IP address nor a DNS name"
                    ) from None
                sans.append(x509.DNSName(address.lower()))
        not_after = self._leaf_not_after(now, ttl)
        public_key = _check_csr_key(_parse_csr(csr))
        root = self.active
        intermediates = self.intermediates
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(root.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=self.config.backdate))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
                critical=False,
            )
            .sign(root.key, hashes.SHA256())
        )
        if root.leaves_until is None or not_after > root.leaves_until:
            root.leaves_until = not_after
        return IssuedCertificate(node=name, cert=cert, chain=(cert, *intermediates))

    def certificates_of(self, node: str) -> dict[int, datetime]:
        """Serial -> expiry of ``node``'s unexpired certificates (as of the last prune)."""
        return dict(self._ledger.by_node.get(node, {}))

    # --- revocation -----------------------------------------------------------

    def revoke(self, serial: int, *, now: datetime) -> Revocation:
        """Revoke one certificate by serial.

        Raises:
            NotFoundError: the CA has no unexpired certificate with that serial.
        """
        now = utc(now)
        self._ledger.prune(now)
        found = self._ledger.find(serial)
        if found is None:
            raise NotFoundError(f"no unexpired certificate with serial {serial:x}")
        node, not_after = found
        entry = Revocation(serial=serial, node=node, not_after=not_after, revoked_at=now)
        self.revocations.add(entry)
        return entry

    def revoke_node(self, node: str, *, now: datetime) -> list[Revocation]:
        """Revoke every unexpired certificate of ``node`` (``hostmesh node revoke``).

        Whether the node may join again is the join tokens' business, not the CA's.

        Raises:
            NotFoundError: the node has no unexpired certificate.
        """
        now = utc(now)
        self._ledger.prune(now, node)
        serials = self.certificates_of(node)
        if not serials:
            raise NotFoundError(f"node {node!r} has no unexpired certificate")
        return [self.revoke(serial, now=now) for serial in sorted(serials)]

    # --- checking peers -------------------------------------------------------

    def verify(
        self,
        chain: Sequence[x509.Certificate],
        *,
        now: datetime,
        expected_node: str | None = None,
    ) -> NodeIdentity:
        """Check a node certificate against this CA's roots and revocations.

        Raises:
            PeerCertificateError: see :func:`hostmesh._pki.verify_node_certificate`.
        """
        return verify_node_certificate(
            chain,
            self.roots,
            now=now,
            revocations=self.revocations,
            mesh=self.mesh,
            expected_node=expected_node,
        )

    # --- persistence ----------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state, private keys included: JSON. Keep it secret (see _ca_keys)."""

        def pem(cert: x509.Certificate | None) -> str | None:
            return None if cert is None else cert.public_bytes(serialization.Encoding.PEM).decode()

        def iso(t: datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        doc = {
            "format": self.FORMAT,
            "version": self.VERSION,
            "mesh": self.mesh,
            "roots": [
                {
                    "cert": pem(r.cert),
                    "key": r.key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ).decode(),
                    "cross_signed": pem(r.cross_signed),
                    "leaves_until": iso(r.leaves_until),
                    "retired_at": iso(r.retired_at),
                }
                for r in self._roots
            ],
            "revocations": json.loads(self.revocations.to_bytes()),
            "issued": {
                node: {format(s, "x"): na.isoformat() for s, na in sorted(serials.items())}
                for node, serials in sorted(self._ledger.by_node.items())
            },
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, config: CaConfig | None = None) -> CertificateAuthority:
        """Load :meth:`to_bytes` output.

        Raises:
            CaStateError: not JSON, not CA state, or keys that do not match their roots.
        """
        try:
            return cls._from_json(json.loads(data), config)
        except CaStateError:
            raise
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            UnsupportedAlgorithm,
            ValidationError,
        ) as exc:
            raise CaStateError(f"malformed CA state: {exc!r}") from exc
        except CertificateError as exc:
            raise CaStateError(f"malformed CA state: {exc}") from exc

    @classmethod
    def _from_json(cls, doc: Any, config: CaConfig | None) -> CertificateAuthority:
        if not isinstance(doc, dict) or doc.get("format") != cls.FORMAT:
            raise CaStateError("not hostmesh CA state")
        if doc.get("version") != cls.VERSION:
            raise CaStateError(f"unsupported CA state version {doc.get('version')!r}")

        def time(value: Any) -> datetime | None:
            return None if value is None else utc(datetime.fromisoformat(value))

        roots = []
        for obj in doc["roots"]:
            cert = x509.load_pem_x509_certificate(obj["cert"].encode())
            key = serialization.load_pem_private_key(obj["key"].encode(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
                key.curve, ec.SECP256R1
            ):
                raise CaStateError("a root key is not EC P-256")
            if key.public_key() != cert.public_key():
                raise CaStateError(
                    f"the key of root {cert.subject.rfc4514_string()} does not match"
                )
            cross = obj["cross_signed"]
            roots.append(
                RootEntry(
                    cert=cert,
                    key=key,
                    cross_signed=None
                    if cross is None
                    else x509.load_pem_x509_certificate(cross.encode()),
                    leaves_until=time(obj["leaves_until"]),
                    retired_at=time(obj["retired_at"]),
                )
            )
        issued = {
            validate_node_name(node): {
                int(s, 16): utc(datetime.fromisoformat(na)) for s, na in serials.items()
            }
            for node, serials in doc["issued"].items()
        }
        return cls(
            doc["mesh"],
            roots,
            config=config,
            revocations=RevocationList.from_json(doc["revocations"]),
            issued=issued,
        )


class CsrRateLimiter:
    """A token bucket for CSRs (Consul's ``csr_max_per_second``, default 50).

    ``rate`` tokens a second accrue up to ``burst`` (default: one second's
    worth); each CSR takes one. ``rate=0`` disables the limit, as in Consul.
    ``now`` is monotonic seconds (``trio.current_time()``).
    """

    def __init__(self, rate: float = CSR_RATE, burst: float | None = None) -> None:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
        self.rate = rate
        self.burst = float(burst if burst is not None else max(rate, 1.0))
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self._tokens = self.burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now

    def try_acquire(self, now: float) -> bool:
        """Take a token if there is one."""
        if self.rate == 0:
            return True
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def acquire(self, now: float) -> None:
        """Take a token or raise.

        Raises:
            RateLimitedError: none left; ``retry_after`` is when the next one accrues.
        """
        if not self.try_acquire(now):
            raise RateLimitedError("certificate signing requests", (1 - self._tokens) / self.rate)

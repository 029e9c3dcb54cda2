"""Node identities, certificate checks and the revocation list (sans-IO).

Shared by the server's CA (:mod:`hostmesh.server._ca`) and the agents
(:mod:`hostmesh._tls`). No sockets, no clock: every decision takes ``now``
(a timezone-aware :class:`~datetime.datetime`, wall-clock UTC).

A node certificate names its node with exactly one URI SAN,
``spiffe://<mesh>/node/<node>`` (SPIFFE X.509-SVID: one URI SAN, the trust
domain is the mesh name). The node name is one DNS label so that
``<node>.node.mesh`` resolves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification

from ._errors import CertificateError, PeerCertificateError, ValidationError

__all__ = [
    "MAX_CHAIN_DEPTH",
    "MAX_NODE_NAME",
    "MAX_REVOCATION_LIST_BYTES",
    "MAX_TRUST_DOMAIN",
    "NodeIdentity",
    "Revocation",
    "RevocationList",
    "certificates_pem",
    "check_identity",
    "load_certificates",
    "node_identity",
    "parse_spiffe_id",
    "renew_at",
    "spiffe_id",
    "spki_pin",
    "utc",
    "validate_node_name",
    "validate_trust_domain",
    "verify_node_certificate",
]

# One DNS label (RFC 1035 section 2.3.4): <node>.node.mesh must be a valid name.
MAX_NODE_NAME = 63
# SPIFFE ID spec, section 2.1: a trust domain is at most 255 bytes.
MAX_TRUST_DOMAIN = 255
# leaf <- cross-signed intermediate <- root is the longest chain the CA makes
# (see hostmesh.server._ca, root rotation); one spare level.
MAX_CHAIN_DEPTH = 3
# A revocation entry is ~150 bytes of JSON and lives only until the revoked
# certificate expires (72 h by default): 8 MiB is ~50,000 live revocations.
MAX_REVOCATION_LIST_BYTES = 8 * 1024 * 1024

# LDH rule (RFC 1123 section 2.1): letters, digits, hyphens; no hyphen at either end.
_NODE_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# SPIFFE ID spec, section 2.1: lowercase letters, digits, dots, dashes, underscores.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_NODE_PATH = "/node/"


def utc(now: datetime) -> datetime:
    """``now`` as an aware UTC datetime; a naive one is refused (it hides a time zone bug)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware (UTC), got naive {now!r}")
    return now.astimezone(UTC)


def validate_node_name(node: str) -> str:
    """Return ``node`` if it is a valid node name (one DNS label), else raise.

    Raises:
        ValidationError: empty, longer than :data:`MAX_NODE_NAME`, or not
            letters, digits and inner hyphens.
    """
    if not isinstance(node, str) or not node:
        raise ValidationError("node name is empty")
    if len(node) > MAX_NODE_NAME:
        raise ValidationError(
            f"node name {node[:MAX_NODE_NAME]!r}... is {len(node)} characters;"
            f" at most {MAX_NODE_NAME} (one DNS label)"
        )
    if not _NODE_RE.fullmatch(node):
        raise ValidationError(
            f"invalid node name {node!r}: use letters, digits and '-' (not first or last)"
        )
    return node


def validate_trust_domain(mesh: str) -> str:
    """Return ``mesh`` if it is a valid SPIFFE trust domain, else raise ValidationError."""
    if not isinstance(mesh, str) or not mesh:
        raise ValidationError("mesh name (SPIFFE trust domain) is empty")
    if len(mesh) > MAX_TRUST_DOMAIN:
        raise ValidationError(f"mesh name is {len(mesh)} characters; at most {MAX_TRUST_DOMAIN}")
    if not _TRUST_DOMAIN_RE.fullmatch(mesh):
        raise ValidationError(
            f"invalid mesh name {mesh!r}: use lowercase letters, digits, '.', '-' and '_'"
        )
    return mesh


@dataclass(frozen=True, order=True)
class NodeIdentity:
    """The identity a node certificate proves: node ``node`` of mesh ``mesh``."""

    mesh: str
    node: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.mesh)
        validate_node_name(self.node)

    @property
    def spiffe_id(self) -> str:
        """``spiffe://<mesh>/node/<node>``."""
        return f"spiffe://{self.mesh}{_NODE_PATH}{self.node}"

    def __str__(self) -> str:
        return self.spiffe_id


def spiffe_id(mesh: str, node: str) -> str:
    """``spiffe://<mesh>/node/<node>``, both parts validated."""
    return NodeIdentity(mesh, node).spiffe_id


def parse_spiffe_id(uri: str) -> NodeIdentity:
    """Parse ``spiffe://<mesh>/node/<node>``.

    Raises:
        ValidationError: any other form (other scheme, path, query, port, user).
    """
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise ValidationError(f"{uri!r} is not a spiffe:// ID")
    mesh, sep, node = uri[len(prefix) :].partition(_NODE_PATH)
    if not sep:
        raise ValidationError(f"{uri!r} is not a node ID (spiffe://<mesh>/node/<node>)")
    try:
        return NodeIdentity(mesh, node)
    except ValidationError as exc:
        raise ValidationError(f"{uri!r} is not a node ID: {exc}") from None


def node_identity(cert: x509.Certificate) -> NodeIdentity:
    """The node identity in ``cert``'s single URI SAN.

    Raises:
        PeerCertificateError: (reason ``identity``) no SAN, not exactly one URI,
            or a URI that is not a node ID.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerCertificateError(
            "identity", "certificate has no subject alternative name"
        ) from None
    except ValueError as exc:
        raise PeerCertificateError(
            "identity", f"certificate extensions are malformed: {exc}"
        ) from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerCertificateError(
            "identity", f"certificate must have exactly one URI SAN (SPIFFE), it has {len(uris)}"
        )
    try:
        return parse_spiffe_id(uris[0])
    except ValidationError as exc:
        raise PeerCertificateError("identity", str(exc)) from None


def renew_at(cert: x509.Certificate) -> datetime:
    """When to renew ``cert``: two thirds into its validity (not before + 2/3 of the lifetime).

    Consul's agents renew leaf certificates in the same window; with the default
    72 h TTL that is 48 h after issue, leaving 24 h to retry while the server is away.
    """
    start = cert.not_valid_before_utc
    return start + (cert.not_valid_after_utc - start) * 2 / 3


def spki_pin(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of ``cert``'s DER SubjectPublicKeyInfo: a CA root's pin
    (agent.toml ``[server] ca_pin``), in the form of kubeadm's discovery hash."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return "sha256:" + digest.finalize().hex()


def load_certificates(pem: bytes, *, what: str = "certificates") -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order.

    Raises:
        CertificateError: not PEM, or no certificate in it.
    """
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(f"{what}: not a PEM certificate bundle ({exc})") from exc
    return certs


def certificates_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """The PEM encoding of ``certs``, concatenated in order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def verify_node_certificate(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    now: datetime,
    revocations: RevocationList | None = None,
    mesh: str | None = None,
    expected_node: str | None = None,
) -> NodeIdentity:
    """Check a node certificate the way a peer does, without a handshake.

    Args:
        chain: the leaf first, then any intermediates the peer sent (the
            cross-signed root during a root rotation).
        roots: the trusted roots (the CA bundle).
        now: wall-clock time to check validity against.
        revocations: refuse a leaf whose serial is in this list.
        mesh: refuse an identity of another trust domain.
        expected_node: refuse any other node name.

    Path validation is cryptography's (RFC 5280 with the web PKI profile's
    rules) with the client-authentication EKU; node certificates carry both
    serverAuth and clientAuth, so this serves for either side.

    Returns:
        The leaf's node identity.

    Raises:
        PeerCertificateError: with ``reason`` ``missing``, ``expired``,
            ``untrusted``, ``revoked`` or ``identity``.
    """
    now = utc(now)
    if not chain:
        raise PeerCertificateError("missing", "peer presented no certificate")
    leaf, intermediates = chain[0], list(chain[1:])
    if now > leaf.not_valid_after_utc:
        raise PeerCertificateError(
            "expired", f"certificate expired at {leaf.not_valid_after_utc.isoformat()}"
        )
    if now < leaf.not_valid_before_utc:
        raise PeerCertificateError(
            "expired", f"certificate is not valid before {leaf.not_valid_before_utc.isoformat()}"
        )
    if not roots:
        raise PeerCertificateError("untrusted", "no trusted roots to verify against")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as exc:
        raise PeerCertificateError(
            "untrusted", f"certificate does not chain to a trusted root: {exc}"
        ) from exc
    identity = node_identity(leaf)
    check_identity(identity, mesh=mesh, expected_node=expected_node)
    if revocations is not None and revocations.is_revoked(leaf):
        raise PeerCertificateError(
            "revoked", f"certificate {leaf.serial_number:x} of {identity} is revoked"
        )
    return identity


def check_identity(
    identity: NodeIdentity, *, mesh: str | None = None, expected_node: str | None = None
) -> None:
    """Raise PeerCertificateError (``identity``) unless ``identity`` is the one expected."""
    if mesh is not None and identity.mesh != mesh:
        raise PeerCertificateError(
            "identity", f"peer {identity} belongs to mesh {identity.mesh!r}, not {mesh!r}"
        )
    if expected_node is not None and identity.node != expected_node:
        raise PeerCertificateError(
            "identity", f"peer is {identity}, expected node {expected_node!r}"
        )


# --- revocations --------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    """One revoked node certificate."""

    serial: int  # the certificate's serial number
    node: str  # the node it was issued to (for people and logs)
    not_after: datetime  # the certificate's expiry: after it the entry can go
    revoked_at: datetime  # when it was revoked

    def to_json(self) -> dict[str, str]:
        return {
            "serial": format(self.serial, "x"),
            "node": self.node,
            "not_after": self.not_after.isoformat(),
            "revoked_at": self.revoked_at.isoformat(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Revocation:
        if not isinstance(obj, dict):
            raise TypeError("entry is not an object")
        return cls(
            serial=int(obj["serial"], 16),
            node=validate_node_name(obj["node"]),
            not_after=utc(datetime.fromisoformat(obj["not_after"])),
            revoked_at=utc(datetime.fromisoformat(obj["revoked_at"])),
        )


class RevocationList:
    """The serials of revoked node certificates, pushed from the servers to every agent.

    ``revision`` grows on every change, so an agent keeps the list with the
    highest revision. An entry is only needed until its certificate expires
    (expiry refuses it anyway), so :meth:`prune` keeps the list small.
    """

    FORMAT = "hostmesh-revocations"
    VERSION = 1

    def __init__(self, entries: Iterable[Revocation] = (), *, revision: int = 0) -> None:
        self._by_serial: dict[int, Revocation] = {e.serial: e for e in entries}
        self.revision = revision

    def __len__(self) -> int:
        return len(self._by_serial)

    def __contains__(self, serial: object) -> bool:
        return serial in self._by_serial

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RevocationList):
            return NotImplemented
        return self.revision == other.revision and self._by_serial == other._by_serial

    __hash__ = None  # type: ignore[assignment]  # mutable

    @property
    def entries(self) -> tuple[Revocation, ...]:
        """The entries, ordered by revocation time."""
        return tuple(sorted(self._by_serial.values(), key=lambda e: (e.revoked_at, e.serial)))

    def add(self, entry: Revocation) -> bool:
        """Add an entry; False (and no new revision) when the serial is already revoked."""
        if entry.serial in self._by_serial:
            return False
        self._by_serial[entry.serial] = entry
        self.revision += 1
        return True

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """True when ``cert``'s serial number is revoked."""
        return cert.serial_number in self._by_serial

    def prune(self, now: datetime) -> int:
        """Drop entries whose certificate has expired; return how many went."""
        now = utc(now)
        gone = [s for s, e in self._by_serial.items() if e.not_after < now]
        for serial in gone:
            del self._by_serial[serial]
        if gone:
            self.revision += 1
        return len(gone)

    def to_bytes(self) -> bytes:
        """JSON: ``{"format", "version", "revision", "entries": [...]}``; serials in hex."""
        doc = {
            "format": self.FORMAT,
            "version": self.VERSION,
            "revision": self.revision,
            "entries": [e.to_json() for e in self.entries],
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        """Parse :meth:`to_bytes` output.

        Raises:
            CertificateError: too large, not JSON, or not a revocation list.
        """
        if len(data) > MAX_REVOCATION_LIST_BYTES:
            raise CertificateError(
                f"revocation list is {len(data)} bytes; at most {MAX_REVOCATION_LIST_BYTES}"
            )
        try:
            doc = json.loads(data)
            return cls.from_json(doc)
        except (ValueError, TypeError, KeyError, AttributeError, ValidationError) as exc:
            raise CertificateError(f"malformed revocation list: {exc!r}") from exc

    @classmethod
    def from_json(cls, doc: Any) -> RevocationList:
        if not isinstance(doc, dict) or doc.get("format") != cls.FORMAT:
            raise ValueError("not a hostmesh revocation list")
        if doc.get("version") != cls.VERSION:
            raise ValueError(f"unsupported revocation list version {doc.get('version')!r}")
        revision = doc["revision"]
        if not isinstance(revision, int) or revision < 0:
            raise ValueError(f"bad revision {revision!r}")
        entries = doc["entries"]
        if not isinstance(entries, list):
            raise TypeError("entries is not a list")
        return cls((Revocation.from_json(e) for e in entries), revision=revision)

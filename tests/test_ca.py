"""The CA's rules (sans-IO): roots, node certificates from CSRs, rotation, revocation,
the CSR rate limit, and keeping the CA state (0600 file, AES-256-GCM seal)."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostmesh._errors import (
    CaStateError,
    CertificateError,
    CsrRejectedError,
    NotFoundError,
    PeerCertificateError,
    RateLimitedError,
    ValidationError,
)
from hostmesh._pki import (
    NodeIdentity,
    RevocationList,
    node_identity,
    parse_spiffe_id,
    renew_at,
    spiffe_id,
    validate_node_name,
    verify_node_certificate,
)
from hostmesh._tls import make_node_key_and_csr
from hostmesh.server._ca import (
    MAX_CSR_BYTES,
    CaConfig,
    CertificateAuthority,
    CsrRateLimiter,
)
from hostmesh.server._ca_keys import (
    decode_sealing_key,
    generate_sealing_key,
    read_private_file,
    seal,
    unseal,
    write_private_file,
)

MESH = "mesh.test"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(MESH, now=NOW)


def make_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None = None,
    *,
    cn: str = "whatever",
    sans: list[x509.GeneralName] | None = None,
    der: bool = False,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


# --- the root ------------------------------------------------------------------------


def test_root_is_a_self_signed_p256_ca_valid_ten_years(ca: CertificateAuthority) -> None:
    (root,) = ca.roots
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    root.verify_directly_issued_by(root)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert root.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert root.not_valid_after_utc == NOW + timedelta(days=3650)
    assert uris(root) == [f"spiffe://{MESH}"]
    assert root.subject.rfc4514_string().startswith("CN=hostmesh root ")
    assert ca.bundle_pem().count(b"BEGIN CERTIFICATE") == 1


def test_each_ca_has_its_own_root_key(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create(MESH, now=NOW)
    assert other.roots[0].public_key() != ca.roots[0].public_key()
    assert other.roots[0].subject != ca.roots[0].subject


def test_bad_mesh_name_and_naive_time_refused() -> None:
    with pytest.raises(ValidationError, match="mesh name"):
        CertificateAuthority.create("Bad Mesh!", now=NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        CertificateAuthority.create(MESH, now=datetime(2026, 1, 1))


# --- node certificates ------------------------------------------------------------------


def test_san_comes_from_the_authorised_node_not_the_csr(ca: CertificateAuthority) -> None:
    forged = make_csr(
        cn="server-1",
        sans=[
            x509.UniformResourceIdentifier(f"spiffe://{MESH}/node/server-1"),
            x509.DNSName("admin.example"),
            x509.RFC822Name("root@example"),
        ],
    )
    issued = ca.issue(forged, "web-7", now=NOW)
    assert uris(issued.cert) == [f"spiffe://{MESH}/node/web-7"]
    san = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(san)) == 1  # no DNS name, no e-mail from the CSR
    assert issued.cert.subject.rfc4514_string() == "CN=web-7"
    assert node_identity(issued.cert) == NodeIdentity(MESH, "web-7")
    assert ca.verify(issued.chain, now=NOW) == NodeIdentity(MESH, "web-7")


def test_node_certificate_profile(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(make_csr(key, der=True), "web-7", now=NOW)
    cert = issued.cert
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.roots[0])
    assert cert.issuer == ca.roots[0].subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert issued.chain == (cert,)  # no rotation: no intermediate
    assert issued.chain_pem().count(b"BEGIN CERTIFICATE") == 1


def test_serials_are_random_and_large(ca: CertificateAuthority) -> None:
    csr = make_csr()
    serials = {ca.issue(csr, "web-7", now=NOW).serial for _ in range(20)}
    assert len(serials) == 20
    assert max(s.bit_length() for s in serials) > 128  # 159 random bits
    assert set(ca.certificates_of("web-7")) == serials


def test_default_ttl_is_72h_with_a_minute_of_backdate(ca: CertificateAuthority) -> None:
    issued = ca.issue(make_csr(), "web-7", now=NOW)
    assert issued.cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert issued.not_after == NOW + timedelta(hours=72)
    # renew at 2/3 of the certificate's life: not_before + 2/3 * (72 h + 1 min)
    life = timedelta(hours=72, minutes=1)
    assert issued.renew_at == NOW - timedelta(minutes=1) + life * 2 / 3
    assert renew_at(issued.cert) == issued.renew_at
    assert NOW + 47 * HOUR < issued.renew_at < NOW + 49 * HOUR


def test_ttl_is_configurable_and_bounded() -> None:
    ca = CertificateAuthority.create(MESH, now=NOW, config=CaConfig(leaf_ttl=3600.0))
    assert ca.issue(make_csr(), "web-7", now=NOW).not_after == NOW + HOUR
    assert ca.issue(make_csr(), "web-7", now=NOW, ttl=600.0).not_after == NOW + timedelta(
        minutes=10
    )
    one_hour = ca.issue(make_csr(), "web-7", now=NOW)
    assert renew_at(one_hour.cert) == NOW - timedelta(minutes=1) + timedelta(minutes=61) * 2 / 3
    with pytest.raises(CsrRejectedError, match="TTL"):
        ca.issue(make_csr(), "web-7", now=NOW, ttl=1.0)
    with pytest.raises(ValueError, match="root_ttl"):
        CaConfig(leaf_ttl=3600.0, root_ttl=60.0)


def test_a_leaf_never_outlives_its_root() -> None:
    config = CaConfig(root_ttl=100 * 3600.0)
    ca = CertificateAuthority.create(MESH, now=NOW, config=config)
    late = ca.issue(make_csr(), "web-7", now=NOW + 50 * HOUR)
    assert late.not_after == ca.roots[0].not_valid_after_utc == NOW + 100 * HOUR
    with pytest.raises(CertificateError, match="root expired"):
        ca.issue(make_csr(), "web-7", now=NOW + 101 * HOUR)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA 2048"),
        (ec.generate_private_key(ec.SECP384R1()), "EC secp384r1"),
        (ec.generate_private_key(ec.SECP256K1()), "EC secp256k1"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
    ],
    ids=["rsa2048", "p384", "secp256k1", "ed25519"],
)
def test_only_p256_keys_are_accepted(
    ca: CertificateAuthority,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    kind: str,
) -> None:
    with pytest.raises(CsrRejectedError, match=f"CSR key is {kind}; only EC P-256"):
        ca.issue(make_csr(key), "web-7", now=NOW)
    assert ca.certificates_of("web-7") == {}


def test_a_csr_with_a_bad_signature_is_refused(ca: CertificateAuthority) -> None:
    der = bytearray(make_csr(cn="aaaaaaaa", der=True))
    i = der.index(b"aaaaaaaa")
    der[i] = ord("b")  # the signed subject changes; the signature stays
    with pytest.raises(CsrRejectedError, match="signature does not match"):
        ca.issue(bytes(der), "web-7", now=NOW)


def test_a_csr_signed_by_another_key_is_refused(ca: CertificateAuthority) -> None:
    """A CSR carrying victim's public key but signed by the attacker's key."""
    victim = ec.generate_private_key(ec.SECP256R1())
    attacker = ec.generate_private_key(ec.SECP256R1())
    good = x509.load_der_x509_csr(make_csr(victim, der=True))
    mine = x509.load_der_x509_csr(make_csr(attacker, der=True))
    # Splice: victim's certificationRequestInfo with the attacker's signature.
    info = good.tbs_certrequest_bytes
    forged = bytearray(mine.public_bytes(serialization.Encoding.DER))
    start = forged.index(mine.tbs_certrequest_bytes)
    body = info + forged[start + len(mine.tbs_certrequest_bytes) :]
    spliced = _der_sequence(bytes(body))
    parsed = x509.load_der_x509_csr(spliced)
    assert parsed.public_key() == victim.public_key()
    with pytest.raises(CsrRejectedError, match="signature"):
        ca.issue(spliced, "web-7", now=NOW)


def _der_sequence(body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x30" + length + body


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\x30\x82\xff\xff" + b"\x00" * 20,
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * (MAX_CSR_BYTES + 1),
        os.urandom(300),
    ],
    ids=["empty", "text", "bad-der", "bad-pem", "oversized", "random"],
)
def test_garbage_csr_bytes_get_a_clear_error(ca: CertificateAuthority, data: bytes) -> None:
    with pytest.raises(CsrRejectedError, match=r"certificate signing request|at most"):
        ca.issue(data, "web-7", now=NOW)


def test_a_certificate_is_not_a_csr(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrRejectedError, match="not a PEM or DER certificate signing request"):
        ca.issue(ca.bundle_pem(), "web-7", now=NOW)
    with pytest.raises(CsrRejectedError, match="must be bytes"):
        ca.issue("-----BEGIN", "web-7", now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "node",
    ["", "a" * 64, "-web", "web-", "web.1", "web_1", "wéb", "web/1", "../etc", "web 1", "a\n"],
)
def test_invalid_node_names_are_refused(ca: CertificateAuthority, node: str) -> None:
    with pytest.raises(CsrRejectedError, match="node name"):
        ca.issue(make_csr(), node, now=NOW)
    with pytest.raises(ValidationError):
        validate_node_name(node)


@pytest.mark.parametrize("node", ["a", "a" * 63, "ip-10-0-1-5", "Web1", "0"])
def test_valid_node_names(ca: CertificateAuthority, node: str) -> None:
    assert node_identity(ca.issue(make_csr(), node, now=NOW).cert).node == node


def test_spiffe_ids_parse_strictly() -> None:
    assert spiffe_id(MESH, "web-7") == "spiffe://mesh.test/node/web-7"
    assert parse_spiffe_id("spiffe://mesh.test/node/web-7") == NodeIdentity(MESH, "web-7")
    for bad in [
        "https://mesh.test/node/web-7",
        "spiffe://mesh.test/svc/web-7",
        "spiffe://mesh.test/node/web-7/x",
        "spiffe://mesh.test:443/node/web-7",
        "spiffe://user@mesh.test/node/web-7",
        "spiffe://mesh.test/node/web-7?x=1",
        "spiffe://MESH/node/web-7",
    ]:
        with pytest.raises(ValidationError):
            parse_spiffe_id(bad)


def test_agent_csr_helper_is_accepted(ca: CertificateAuthority) -> None:
    nk = make_node_key_and_csr("web-7")
    key = serialization.load_pem_private_key(nk.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    issued = ca.issue(nk.csr_pem, "web-7", now=NOW)
    assert issued.cert.public_key() == key.public_key()
    with pytest.raises(ValidationError):
        make_node_key_and_csr("not a node")


# --- checking peers ----------------------------------------------------------------


def test_verify_refuses_foreign_expired_and_misnamed(ca: CertificateAuthority) -> None:
    issued = ca.issue(make_csr(), "web-7", now=NOW)
    foreign = CertificateAuthority.create(MESH, now=NOW).issue(make_csr(), "web-7", now=NOW)
    with pytest.raises(PeerCertificateError, match="trusted root") as info:
        ca.verify(foreign.chain, now=NOW)
    assert info.value.reason == "untrusted"
    with pytest.raises(PeerCertificateError, match="expired") as info:
        ca.verify(issued.chain, now=NOW + 73 * HOUR)
    assert info.value.reason == "expired"
    with pytest.raises(PeerCertificateError, match="not valid before") as info:
        ca.verify(issued.chain, now=NOW - HOUR)
    assert info.value.reason == "expired"
    with pytest.raises(PeerCertificateError, match="expected node 'db-1'") as info:
        ca.verify(issued.chain, now=NOW, expected_node="db-1")
    assert info.value.reason == "identity"
    other_mesh = CertificateAuthority.create("other.test", now=NOW)
    theirs = other_mesh.issue(make_csr(), "web-7", now=NOW)
    with pytest.raises(PeerCertificateError, match=r"belongs to mesh 'other\.test'"):
        verify_node_certificate(theirs.chain, other_mesh.roots, now=NOW, mesh=MESH)
    with pytest.raises(PeerCertificateError) as info:
        ca.verify([], now=NOW)
    assert info.value.reason == "missing"


def test_a_ca_certificate_is_not_a_node_certificate(ca: CertificateAuthority) -> None:
    with pytest.raises(PeerCertificateError) as info:
        ca.verify([ca.roots[0]], now=NOW)
    assert info.value.reason in {"untrusted", "identity"}


# --- revocation ----------------------------------------------------------------------


def test_revoking_a_node_refuses_its_certificates_only(ca: CertificateAuthority) -> None:
    first = ca.issue(make_csr(), "web-7", now=NOW)
    second = ca.issue(make_csr(), "web-7", now=NOW + HOUR)
    other = ca.issue(make_csr(), "db-1", now=NOW)
    revoked = ca.revoke_node("web-7", now=NOW + 2 * HOUR)
    assert {r.serial for r in revoked} == {first.serial, second.serial}
    assert {r.node for r in revoked} == {"web-7"}
    for issued in (first, second):
        with pytest.raises(PeerCertificateError, match="revoked") as info:
            ca.verify(issued.chain, now=NOW + 3 * HOUR)
        assert info.value.reason == "revoked"
    assert ca.verify(other.chain, now=NOW + 3 * HOUR).node == "db-1"
    # A certificate issued after the revocation (the node joined again) is good.
    again = ca.issue(make_csr(), "web-7", now=NOW + 3 * HOUR)
    assert ca.verify(again.chain, now=NOW + 3 * HOUR).node == "web-7"


def test_revoke_one_serial_and_unknown_ones(ca: CertificateAuthority) -> None:
    issued = ca.issue(make_csr(), "web-7", now=NOW)
    entry = ca.revoke(issued.serial, now=NOW)
    assert (entry.node, entry.not_after) == ("web-7", issued.not_after)
    assert ca.revocations.is_revoked(issued.cert)
    with pytest.raises(NotFoundError, match="serial"):
        ca.revoke(12345, now=NOW)
    with pytest.raises(NotFoundError, match="'nobody'"):
        ca.revoke_node("nobody", now=NOW)
    # An expired certificate needs no revocation.
    with pytest.raises(NotFoundError):
        ca.revoke_node("web-7", now=NOW + 73 * HOUR)


def test_revocation_list_round_trip_revision_and_pruning(ca: CertificateAuthority) -> None:
    a = ca.issue(make_csr(), "web-7", now=NOW)
    b = ca.issue(make_csr(), "db-1", now=NOW + 10 * HOUR)
    assert ca.revocations.revision == 0
    ca.revoke(a.serial, now=NOW + 11 * HOUR)
    ca.revoke(b.serial, now=NOW + 11 * HOUR)
    assert ca.revocations.revision == 2
    pushed = RevocationList.from_bytes(ca.revocations.to_bytes())
    assert pushed == ca.revocations
    assert pushed.is_revoked(a.cert) and pushed.is_revoked(b.cert)
    with pytest.raises(PeerCertificateError, match="revoked"):
        verify_node_certificate(a.chain, ca.roots, now=NOW + 12 * HOUR, revocations=pushed)
    # After a's certificate expired its entry is useless and goes; b's stays.
    ca.prune(NOW + 73 * HOUR)
    assert len(ca.revocations) == 1 and b.serial in ca.revocations
    assert ca.revocations.revision == 3


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'{"format": "hostmesh-revocations", "version": 2, "revision": 0, "entries": []}',
        b'{"format": "hostmesh-revocations", "version": 1, "revision": -1, "entries": []}',
        b'{"format": "hostmesh-revocations", "version": 1, "revision": 1, "entries": [{}]}',
        b'{"format": "hostmesh-revocations", "version": 1, "revision": 1, "entries": [1]}',
        b'{"format": "hostmesh-revocations", "version": 1, "revision": 1, "entries": [{"serial":'
        b' "ff", "node": "../x", "not_after": "2026-01-01T00:00:00+00:00", "revoked_at":'
        b' "2026-01-01T00:00:00+00:00"}]}',
        b"x" * (8 * 1024 * 1024 + 1),
    ],
    ids=["empty", "list", "version", "revision", "keys", "type", "node", "oversized"],
)
def test_malformed_revocation_lists_are_refused(data: bytes) -> None:
    with pytest.raises(CertificateError, match="revocation list"):
        RevocationList.from_bytes(data)


# --- root rotation ---------------------------------------------------------------------


def test_rotation_cross_signs_the_new_root(ca: CertificateAuthority) -> None:
    old_root = ca.roots[0]
    old_leaf = ca.issue(make_csr(), "web-7", now=NOW)
    new_root = ca.rotate(now=NOW + HOUR)
    assert ca.roots == (old_root, new_root)
    assert ca.bundle_pem().count(b"BEGIN CERTIFICATE") == 2
    (cross,) = ca.intermediates
    assert cross.subject == new_root.subject and cross.issuer == old_root.subject
    assert cross.public_key() == new_root.public_key()
    cross.verify_directly_issued_by(old_root)
    new_leaf = ca.issue(make_csr(), "db-1", now=NOW + HOUR)
    assert new_leaf.chain == (new_leaf.cert, cross)
    new_leaf.cert.verify_directly_issued_by(new_root)
    later = NOW + 2 * HOUR
    # An agent still on the old bundle accepts new leaves through the cross-signed root ...
    assert verify_node_certificate(new_leaf.chain, [old_root], now=later).node == "db-1"
    # ... which it needs: without it the new leaf does not chain to the old root.
    with pytest.raises(PeerCertificateError, match="trusted root"):
        verify_node_certificate(new_leaf.chain[:1], [old_root], now=later)
    # Agents with the new bundle accept old and new leaves.
    assert ca.verify(old_leaf.chain, now=later).node == "web-7"
    assert ca.verify(new_leaf.chain, now=later).node == "db-1"
    assert verify_node_certificate(new_leaf.chain[:1], [new_root], now=later).node == "db-1"


def test_old_root_dropped_only_after_its_leaves_expired(ca: CertificateAuthority) -> None:
    old_root = ca.roots[0]
    last_old = ca.issue(make_csr(), "web-7", now=NOW + 10 * HOUR)
    ca.rotate(now=NOW + 10 * HOUR)
    new_leaf = ca.issue(make_csr(), "db-1", now=NOW + 11 * HOUR)
    ends = NOW + 82 * HOUR  # the last old leaf's expiry (= rotation + leaf TTL here)
    assert ca.overlap_ends() == ends == last_old.not_after
    with pytest.raises(CertificateError, match="overlap lasts until"):
        ca.rotate(now=NOW + 20 * HOUR)
    ca.prune(ends - timedelta(seconds=1))
    assert old_root in ca.roots
    ca.prune(ends + timedelta(seconds=1))
    assert old_root not in ca.roots and len(ca.roots) == 1
    assert ca.intermediates == ()
    assert ca.issue(make_csr(), "db-1", now=ends + HOUR).chain[1:] == ()
    assert ca.verify(new_leaf.chain[:1], now=ends).node == "db-1"
    ca.rotate(now=ends + HOUR)  # a new rotation is allowed again
    assert len(ca.roots) == 2


def test_overlap_lasts_a_leaf_ttl_even_without_old_leaves(ca: CertificateAuthority) -> None:
    """Agents need time to get the new bundle even if the old root signed nothing."""
    ca.rotate(now=NOW)
    assert ca.overlap_ends() == NOW + 72 * HOUR


# --- persistence ---------------------------------------------------------------------


def test_state_round_trip_keeps_roots_keys_revocations_and_ledger(
    ca: CertificateAuthority,
) -> None:
    old_leaf = ca.issue(make_csr(), "web-7", now=NOW)
    ca.rotate(now=NOW + HOUR)
    ca.issue(make_csr(), "db-1", now=NOW + HOUR)
    ca.revoke(old_leaf.serial, now=NOW + HOUR)
    data = ca.to_bytes()
    assert b"PRIVATE KEY" in data  # the state is secret: keep it 0600 or sealed
    back = CertificateAuthority.from_bytes(data)
    assert back.to_bytes() == data
    assert back.roots == ca.roots and back.intermediates == ca.intermediates
    assert back.revocations == ca.revocations
    # The restored keys sign: a new leaf chains to the restored bundle.
    fresh = back.issue(make_csr(), "api-1", now=NOW + 2 * HOUR)
    assert back.verify(fresh.chain, now=NOW + 2 * HOUR).node == "api-1"
    assert back.overlap_ends() == ca.overlap_ends()
    assert len(back.revoke_node("db-1", now=NOW + 2 * HOUR)) == 1
    with pytest.raises(PeerCertificateError, match="revoked"):
        back.verify(old_leaf.chain, now=NOW + 2 * HOUR)


def test_corrupt_state_is_a_clear_error(ca: CertificateAuthority) -> None:
    with pytest.raises(CaStateError, match="malformed CA state"):
        CertificateAuthority.from_bytes(b"\x00garbage")
    with pytest.raises(CaStateError, match="not hostmesh CA state"):
        CertificateAuthority.from_bytes(b'{"format": "other"}')
    issued = ca.issue(make_csr(), "web-7", now=NOW)
    hostile = ca.to_bytes().replace(b'"web-7"', b'"../../etc"')
    with pytest.raises(CaStateError, match="malformed CA state"):
        CertificateAuthority.from_bytes(hostile)
    assert issued.node == "web-7"
    # A root whose key was swapped for another one.
    other = CertificateAuthority.create(MESH, now=NOW)
    doc = ca.to_bytes().decode()
    mine = doc.split('"key": "')[1].split('"')[0]
    theirs = other.to_bytes().decode().split('"key": "')[1].split('"')[0]
    with pytest.raises(CaStateError, match="does not match"):
        CertificateAuthority.from_bytes(doc.replace(mine, theirs).encode())


def test_sealing_round_trip_and_wrong_key(ca: CertificateAuthority) -> None:
    key = decode_sealing_key(generate_sealing_key())
    data = ca.to_bytes()
    blob = seal(data, key)
    assert b"PRIVATE KEY" not in blob and data not in blob
    assert seal(data, key) != blob  # a fresh nonce every time
    assert CertificateAuthority.from_bytes(unseal(blob, key)).roots == ca.roots
    with pytest.raises(CaStateError, match="wrong sealing key"):
        unseal(blob, os.urandom(32))
    with pytest.raises(CaStateError, match="wrong sealing key"):
        unseal(blob, key, label=b"another-cluster")
    tampered = bytearray(blob)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(CaStateError, match="altered"):
        unseal(bytes(tampered), key)
    with pytest.raises(CaStateError, match="not a sealed blob"):
        unseal(blob[:20], key)
    with pytest.raises(CaStateError, match="not a sealed blob"):
        unseal(data, key)
    with pytest.raises(ValueError, match="32 bytes"):
        seal(data, key[:16])


def test_sealing_key_config_forms() -> None:
    key = os.urandom(32)
    import base64

    assert decode_sealing_key(base64.b64encode(key).decode()) == key
    assert decode_sealing_key(key.hex()) == key
    assert decode_sealing_key(f"  {key.hex().upper()}\n") == key
    for bad in ["", "not a key", base64.b64encode(os.urandom(16)).decode(), "zz" * 32]:
        with pytest.raises(ValueError, match="sealing key"):
            decode_sealing_key(bad)


def test_private_file_is_0600_and_atomic(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = tmp_path / "ca.json"
    old = os.umask(0)  # even with a permissive umask
    try:
        write_private_file(path, ca.to_bytes())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert CertificateAuthority.from_bytes(read_private_file(path)).roots == ca.roots
    write_private_file(path, b"second")
    assert read_private_file(path) == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.json"]  # no temporary left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ca.json"
    write_private_file(path, b"secret")
    path.chmod(mode)
    with pytest.raises(CaStateError, match=f"mode {mode:04o}, readable by others") as info:
        read_private_file(path)
    assert f"chmod 600 {path}" in str(info.value)


def test_missing_unwritable_and_symlinked_key_files(tmp_path: Path) -> None:
    with pytest.raises(CaStateError, match="cannot read"):
        read_private_file(tmp_path / "absent")
    with pytest.raises(CaStateError, match="cannot write"):
        write_private_file(tmp_path / "no-such-dir" / "ca.json", b"x")
    real = tmp_path / "real"
    write_private_file(real, b"x")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(CaStateError, match="cannot read"):
        read_private_file(link)
    with pytest.raises(CaStateError, match="regular file"):
        read_private_file(tmp_path)


# --- the CSR rate limit ----------------------------------------------------------------


def test_rate_limit_is_50_per_second_by_default() -> None:
    limiter = CsrRateLimiter()
    assert sum(limiter.try_acquire(0.0) for _ in range(60)) == 50  # a one-second burst
    with pytest.raises(RateLimitedError, match=r"retry in 0\.020 s") as info:
        limiter.acquire(0.0)
    assert info.value.retry_after == pytest.approx(0.02)
    limiter.acquire(0.02)  # one token accrued
    # With the burst spent, 100/s offered for 10 s: 50/s get through.
    accepted = sum(limiter.try_acquire(0.02 + i / 100) for i in range(1, 1001))
    assert 499 <= accepted <= 500  # float rounding of the accrued fraction


def test_rate_limit_custom_burst_zero_and_clock_steps() -> None:
    limiter = CsrRateLimiter(rate=2.0, burst=5)
    assert sum(limiter.try_acquire(100.0) for _ in range(10)) == 5
    assert not limiter.try_acquire(99.0)  # time going backwards mints nothing
    assert sum(limiter.try_acquire(1000.0) for _ in range(10)) == 5  # capped at the burst
    unlimited = CsrRateLimiter(rate=0)
    assert all(unlimited.try_acquire(0.0) for _ in range(1000))
    with pytest.raises(ValueError):
        CsrRateLimiter(rate=-1)
    with pytest.raises(ValueError):
        CsrRateLimiter(rate=float("inf"))

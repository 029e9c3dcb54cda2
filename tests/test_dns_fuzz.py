"""Fuzzing the DNS core: random and mutated packets never break it.

Every input gets None (dropped), a Forward, or a reply that dnslib parses,
with the query's ID and QR set, over UDP and TCP, from a core with and without
recursors. Valid queries are also parsed by dnslib to check the wire parser.

The examples are derandomized so CI runs the same ~11,000 cases every time
(about 15 s); set HOSTMESH_FUZZ_RANDOM=1 to explore new ones.
"""

from __future__ import annotations

import os
import random
import struct

from dnslib import EDNS0, QTYPE, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hostmesh import DnsConfig
from hostmesh.catalog import Catalog, CheckState, Health, Node, NodeRecord, ServiceInstance
from hostmesh.dns import DnsCore, Forward, Rcode, parse_query

DERANDOMIZE = os.environ.get("HOSTMESH_FUZZ_RANDOM") != "1"
UDP_MAX = 1232


def _fleet() -> Catalog:
    """A few services, so that valid names hit real answers; some odd catalog data too."""
    cat = Catalog()

    def add(name: str, address: str, az: str, *services: ServiceInstance, **kw: object) -> None:
        cat.merge(
            NodeRecord(
                node=Node(name=name, address=address, az=az, meta={"rack": name}),
                generation=1,
                version=1,
                services=services,
                **kw,  # type: ignore[arg-type]
            )
        )

    add("n1", "10.0.0.1", "az-a", ServiceInstance("w1", "web", "", 80, tags=("v2",)))
    add("n2", "10.0.0.2", "az-b", ServiceInstance("w2", "web", "10.0.9.9", 81, weight=5))
    add("n3", "2001:db8::3", "az-a", ServiceInstance("w3", "web", "", 82, tags=("v1",)))
    add("n4", "10.0.0.4", "az-b", ServiceInstance("d1", "db", "", 5432),
        checks=(CheckState("c", "", Health.WARNING, "d1"),))  # fmt: skip
    add("n5", "10.0.0.5", "az-a", ServiceInstance("k1", "cache", "", 6379),
        checks=(CheckState("c", "", Health.CRITICAL),))  # fmt: skip
    for i in range(40):  # big enough to be trimmed over UDP
        add(f"b{i}", f"10.1.0.{i + 1}", "az-c", ServiceInstance(f"b{i}", "bulk", "", 9000))
    add("x" * 70, "10.0.0.7", "az-a", ServiceInstance("o1", "odd", "bad..host", 70000),
        ServiceInstance("o2", "odd", "", 1))  # fmt: skip
    return cat


CATALOG = _fleet()


def _core(has_recursors: bool) -> DnsCore:
    return DnsCore(
        DnsConfig(udp_max_payload=UDP_MAX, a_record_limit=0),
        CATALOG,
        local_az="az-a",
        has_recursors=has_recursors,
        rng=random.Random(0),
    )


CORES = (_core(False), _core(True))

NAMES = (
    "web.svc.mesh",
    "WEB.Svc.MESH",
    "v2.web.svc.mesh",
    "az-b.v1.web.svc.mesh",
    "_web._tcp.svc.mesh",
    "_web._v2.svc.mesh",
    "bulk.svc.mesh",
    "_bulk._tcp.svc.mesh",
    "odd.svc.mesh",
    "db.svc.mesh",
    "cache.svc.mesh",
    "nope.svc.mesh",
    "n1.node.mesh",
    "0a000909.addr.mesh",
    "mesh",
    "ns.mesh",
    "example.com",
)
QTYPES = ("A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "MX")


def _seed(name: str, qtype: str, edns: int | None, qid: int) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


SEEDS = tuple(
    _seed(name, qtype, edns, i)
    for i, (name, qtype, edns) in enumerate(
        (n, t, e) for n in NAMES for t in QTYPES for e in (None, 512, 4096)
    )
)


def dnslib_safe(packet: bytes) -> bytes:
    """``packet`` with each question label that is not UTF-8 made ASCII at the same length.

    dnslib refuses such labels although any octet is valid in one (RFC 2181
    11), and replies echo the question as sent. Lengths and offsets are kept,
    so compression pointers still hold.
    """
    if len(packet) < 12 or packet[4:6] == b"\x00\x00":
        return packet
    out = bytearray(packet)
    pos = 12
    while pos < len(out) and 0 < out[pos] <= 63:
        end = pos + 1 + out[pos]
        label = bytes(out[pos + 1 : end])
        try:
            label.decode()
        except UnicodeDecodeError:
            out[pos + 1 : end] = bytes(b if b < 0x80 else 0x78 for b in label)
        pos = end
    return bytes(out)


def check_handle(data: bytes) -> None:
    """The fuzz property, for every core over UDP and TCP."""
    for core in CORES:
        for tcp in (False, True):
            out = core.handle(data, tcp=tcp)
            if out is None:
                continue
            if isinstance(out, Forward):
                assert core.has_recursors
                assert out.data == data
                continue
            assert isinstance(out, bytes)
            reply = DNSRecord.parse(dnslib_safe(out))
            assert len(data) >= 2
            assert out[:2] == data[:2]
            assert reply.header.id == struct.unpack("!H", data[:2])[0]
            assert reply.header.qr == 1
            if not tcp:
                assert len(out) <= UDP_MAX


# --- random bytes ---------------------------------------------------------------------------


@settings(max_examples=3000, deadline=None, derandomize=DERANDOMIZE)
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    check_handle(data)


@settings(max_examples=1500, deadline=None, derandomize=DERANDOMIZE)
@given(st.binary(min_size=10, max_size=10), st.binary(max_size=300))
def test_random_bytes_behind_a_plausible_header(head: bytes, rest: bytes) -> None:
    """Random bytes mostly stop at QR or QDCOUNT; this header gets them to the name parser."""
    flags = struct.unpack("!H", head[2:4])[0] & 0x07FF  # QR=0, opcode QUERY
    data = head[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, head[4] & 1) + rest
    check_handle(data)


# --- mutated valid queries ------------------------------------------------------------------

_seeds = st.sampled_from(SEEDS)
_tapes = st.binary(min_size=4, max_size=24)
_COUNTS = (0, 1, 2, 3, 0xFFFF)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed changed by up to six mutations read from a byte tape.

    Some mutations keep the query valid (a new ID, a letter's case), so the
    answering paths are fuzzed as well as the parser.

    One draw per example keeps generation cheap, and shrinking the tape
    shrinks the mutations. Each 4 bytes: operation, position (2), value.
    """
    data = bytearray(draw(_seeds))
    tape = draw(_tapes)
    for k in range(0, len(tape) - 3, 4):
        op, value = tape[k] % 8, tape[k + 3]
        i = int.from_bytes(tape[k + 1 : k + 3], "big") % (len(data) + 1)
        if op == 0 and data:  # flip one bit
            data[i % len(data)] ^= 1 << (value % 8)
        elif op == 1 and data:  # set one byte
            data[i % len(data)] = value
        elif op == 2:  # truncate
            del data[i:]
        elif op == 3:  # insert 1-8 bytes
            data[i:i] = bytes([value]) * (tape[k] // 8 % 8 + 1)
        elif op == 4:  # duplicate a slice in place
            data[i:i] = data[i : i + value % 32 + 1]
        elif op == 5 and len(data) >= 12:  # set QDCOUNT, ANCOUNT, NSCOUNT or ARCOUNT
            which = value % 4
            data[4 + 2 * which : 6 + 2 * which] = struct.pack("!H", _COUNTS[value // 4 % 5])
        elif op == 6 and data and chr(data[i % len(data)]).isalpha():  # swap a letter's case
            data[i % len(data)] ^= 0x20
        elif op == 7 and len(data) >= 2:  # a new ID: the query stays valid
            data[0:2] = tape[k + 1 : k + 3]
    return bytes(data)


@settings(
    max_examples=4000,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutated())
def test_mutated_queries(data: bytes) -> None:
    check_handle(data)


def test_every_seed_is_answered() -> None:
    """The seeds themselves are valid: in-zone names are answered, the rest forwarded."""
    for data in SEEDS:
        check_handle(data)
        out = CORES[1].handle(data)
        assert out is not None
        if not isinstance(out, Forward):
            assert isinstance(out, bytes)
            assert DNSRecord.parse(out).header.rcode in (Rcode.NOERROR, Rcode.NXDOMAIN)


# --- valid queries: our parser agrees with dnslib, and the zone answers ----------------------

_PREFIXES = (
    (),
    (b"web",),
    (b"WeB",),
    (b"v2", b"web"),
    (b"AZ-A", b"web"),
    (b"_web", b"_tcp"),
    (b"n1",),
    (b"0a000909",),
    (b"\xc3\x89t\xc3\xa9",),  # UTF-8 "Été": only ASCII folds (RFC 4343)
    (b"a" * 63,),
)
_SUFFIXES = ((), (b"mesh",), (b"svc", b"MeSh"), (b"node", b"mesh"), (b"addr", b"mesh"), (b"com",))
_prefixes = st.sampled_from(_PREFIXES)
_suffixes = st.sampled_from(_SUFFIXES)
_zone_suffixes = st.sampled_from([x for x in _SUFFIXES if x and x[-1].lower() == b"mesh"])
_middles = st.binary(max_size=70) | st.text(max_size=12).map(str.encode)
_qtypes = st.sampled_from([1, 28, 33, 16, 6, 2, 255]) | st.integers(0, 0xFFFF)
_qclasses = st.sampled_from([1, 255, 3]) | st.integers(0, 0xFFFF)
_words = st.integers(0, 2**32 - 1)


@st.composite
def valid_queries(draw: st.DrawFn, *, in_zone: bool = False) -> bytes:
    """Well-formed queries: known labels around random ones, any type and class, EDNS or not."""
    middle = [x[:63] for x in draw(_middles).split(b".") if x]
    labels = [*draw(_prefixes), *middle, *draw(_zone_suffixes if in_zone else _suffixes)]
    assume(sum(len(x) + 1 for x in labels) + 1 <= 255)
    word = draw(_words)  # ID, RD, EDNS, DO
    record = DNSRecord(
        DNSHeader(id=word & 0xFFFF, rd=word >> 16 & 1),
        q=DNSQuestion(DNSLabel(labels), draw(_qtypes), draw(_qclasses)),
    )
    if word >> 17 & 1:
        flags = "do" if word >> 18 & 1 else ""
        record.add_ar(EDNS0(udp_len=word >> 19 & 0x1FFF, flags=flags))
    return bytes(record.pack())


@settings(max_examples=1000, deadline=None, derandomize=DERANDOMIZE)
@given(valid_queries())
def test_parse_query_agrees_with_dnslib(data: bytes) -> None:
    ours = parse_query(data)
    theirs = DNSRecord.parse(dnslib_safe(data))
    safe = parse_query(dnslib_safe(data))
    assert ours.id == theirs.header.id
    assert safe.labels == theirs.q.qname.label
    assert len(ours.labels) == len(safe.labels)
    assert safe.name == b".".join(x.lower() for x in theirs.q.qname.label).decode("latin-1")
    assert ours.name == b".".join(x.lower() for x in ours.labels).decode("latin-1")
    assert ours.qtype == theirs.q.qtype
    assert ours.qclass == theirs.q.qclass
    assert ours.rd == bool(theirs.header.rd)
    opt = [rr for rr in theirs.ar if rr.rtype == QTYPE.OPT]
    assert ours.edns_size == (max(opt[0].rclass, 512) if opt else None)


@settings(max_examples=600, deadline=None, derandomize=DERANDOMIZE)
@given(valid_queries(in_zone=True))
def test_in_zone_answers_are_authoritative(data: bytes) -> None:
    """Every IN query for the zone gets NOERROR or NXDOMAIN, AA, and an SOA when empty."""
    query = parse_query(data)
    out = CORES[0].handle(data)
    assert isinstance(out, bytes)
    reply = DNSRecord.parse(dnslib_safe(out))
    if query.qclass not in (1, 255):
        assert reply.header.rcode == Rcode.REFUSED
        return
    assert reply.header.rcode in (Rcode.NOERROR, Rcode.NXDOMAIN)
    assert reply.header.aa == 1
    assert out[12 : 12 + len(query.question)] == query.question  # case as sent
    if not reply.rr:
        assert [rr.rtype for rr in reply.auth] == [QTYPE.SOA]

"""The gossip wire format: round trips, bounds, framing, and fuzzing.

The fuzz tests feed random bytes and mutated valid encodings (bit flips,
truncations, extensions, overwritten counts) to every decoder: each input
gives a value or a DecodeError, nothing else. A mutation that still decodes
must re-encode to the same bytes (the format has one encoding per value).

The examples are derandomized so CI runs the same ~4,500 fuzz cases every
time; set HOSTMESH_FUZZ_RANDOM=1 to explore new ones.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostmesh import LocalProtocolError, RemoteProtocolError
from hostmesh.catalog import CheckState, Health, Node, NodeRecord, ServiceInstance
from hostmesh.catalog._codec import (
    COMPOUND_HEADER,
    COMPOUND_OVERHEAD,
    FRAME_OVERHEAD,
    MAX_CHECKS_PER_RECORD,
    MAX_COMPOUND_PARTS,
    MAX_MEMBER_META,
    MAX_MEMBERS,
    MAX_META_PAIRS,
    MAX_NAME,
    MAX_RECORD_SIZE,
    MAX_RECORDS_PER_MESSAGE,
    MAX_REMOVED_PER_RECORD,
    MAX_SERVICES_PER_RECORD,
    MAX_TAG,
    MAX_TAGS,
    MAX_TCP_FRAME,
    MAX_TEXT,
    MAX_UINT,
    MAX_WEIGHT,
    PROTOCOL_VERSION,
    UDP_PACKET_BUDGET,
    DecodeError,
    decode,
    decode_compound,
    decode_packet,
    encode,
    encode_compound,
    encode_record,
    frame,
    unframe,
)
from hostmesh.catalog._keyring import SEAL_OVERHEAD
from hostmesh.catalog._messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    KeyringOp,
    KeyringRequest,
    KeyringResponse,
    MemberState,
    MemberStatus,
    Message,
    MsgType,
    Nack,
    Ping,
    PushPull,
    Records,
    Suspect,
)

DERANDOMIZE = os.environ.get("HOSTMESH_FUZZ_RANDOM") != "1"

# --- strategies ------------------------------------------------------------------------

# Any Unicode but surrogates (not encodable as UTF-8), including astral characters.
TEXT = st.text(max_size=12)
UINT = st.one_of(st.integers(0, 300), st.integers(0, MAX_UINT))
TIME = st.floats(allow_nan=False, allow_infinity=False)
META = st.dictionaries(TEXT, TEXT, max_size=3)
# Three pairs of at most 12 characters (48 bytes) each stay within MAX_MEMBER_META.
MEMBER_META = st.dictionaries(TEXT, TEXT, max_size=3)

SERVICES = st.builds(
    ServiceInstance,
    id=TEXT,
    name=TEXT,
    address=TEXT,
    port=st.integers(0, 65535),
    tags=st.lists(TEXT, max_size=3).map(tuple),
    meta=META,
    weight=st.integers(0, MAX_WEIGHT),
    weight_warning=st.integers(0, MAX_WEIGHT),
    user=TEXT,
)
CHECKS = st.builds(
    CheckState,
    id=TEXT,
    name=TEXT,
    status=st.sampled_from(Health),
    service_id=TEXT,
    output=st.text(max_size=40),
    kind=st.sampled_from(["", "http", "tcp", "script", "ttl"]),
    notes=TEXT,
)
NODES = st.builds(
    Node,
    name=TEXT,
    address=TEXT,
    az=TEXT,
    region=TEXT,
    datacenter=TEXT,
    meta=META,
    id=TEXT,
)
RECORDS = st.builds(
    NodeRecord,
    node=NODES,
    generation=UINT,
    version=UINT,
    services=st.lists(SERVICES, max_size=3).map(tuple),
    checks=st.lists(CHECKS, max_size=3).map(tuple),
    removed=st.lists(st.tuples(TEXT, TIME), max_size=2).map(tuple),
    left=st.booleans(),
    stamp=TIME,
)
MEMBERS = st.builds(
    MemberState,
    name=TEXT,
    addr=TEXT,
    incarnation=UINT,
    status=st.sampled_from(MemberStatus),
    meta=MEMBER_META,
)
BY_TYPE: dict[MsgType, st.SearchStrategy[Message]] = {
    MsgType.PING: st.builds(Ping, UINT, TEXT, TEXT, TEXT),
    MsgType.INDIRECT_PING: st.builds(IndirectPing, UINT, TEXT, TEXT, TEXT, TEXT, st.booleans()),
    MsgType.ACK: st.builds(Ack, UINT),
    MsgType.NACK: st.builds(Nack, UINT),
    MsgType.SUSPECT: st.builds(Suspect, UINT, TEXT, TEXT),
    MsgType.ALIVE: st.builds(Alive, UINT, TEXT, TEXT, MEMBER_META),
    MsgType.DEAD: st.builds(Dead, UINT, TEXT, TEXT),
    MsgType.RECORDS: st.builds(Records, st.lists(RECORDS, max_size=2).map(tuple)),
    MsgType.PUSH_PULL: st.builds(
        PushPull,
        st.booleans(),
        st.lists(MEMBERS, max_size=3).map(tuple),
        st.dictionaries(TEXT, st.tuples(UINT, UINT), max_size=3),
        st.lists(RECORDS, max_size=2).map(tuple),
    ),
    MsgType.KEYRING_REQUEST: st.builds(
        KeyringRequest, UINT, st.sampled_from(KeyringOp), TEXT, TEXT
    ),
    MsgType.KEYRING_RESPONSE: st.builds(
        KeyringResponse, UINT, TEXT, st.booleans(), TEXT, st.lists(TEXT, max_size=3).map(tuple)
    ),
}
MESSAGES = st.one_of(*BY_TYPE.values())


def test_every_message_type_but_compound_has_a_strategy() -> None:
    assert set(BY_TYPE) == set(MsgType) - {MsgType.COMPOUND}


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BY_TYPE), ids=lambda t: t.name)
@settings(max_examples=60, derandomize=DERANDOMIZE, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_message_round_trips(kind: MsgType, data: st.DataObject) -> None:
    msg = data.draw(BY_TYPE[kind])
    encoded = encode(msg)
    assert encoded[0] == kind
    assert decode(encoded) == msg
    assert decode_packet(encoded) == [msg]
    assert unframe(frame(encoded)) == encoded


@settings(max_examples=150, derandomize=DERANDOMIZE, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES)
def test_no_proper_prefix_of_a_message_decodes(msg: Message) -> None:
    """A message cut anywhere (a short read, a lost tail) is refused, not misread."""
    data = encode(msg)
    for size in range(len(data)):
        with pytest.raises(DecodeError):
            decode(data[:size])


@settings(max_examples=150, derandomize=DERANDOMIZE, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MESSAGES, min_size=1, max_size=6))
def test_compound_round_trips(msgs: list[Message]) -> None:
    parts = [encode(m) for m in msgs]
    data = encode_compound(parts)
    assert len(data) == COMPOUND_HEADER + sum(COMPOUND_OVERHEAD + len(p) for p in parts)
    assert decode_compound(data) == parts
    assert decode_packet(data) == msgs
    assert decode_packet(unframe(frame(data))) == msgs


def test_a_record_keeps_every_field() -> None:
    rec = NodeRecord(
        node=Node("név-1", "10.0.0.1", "eu-west-1a", "eu-west-1", "dc2", {"rack": "r7"}, "uuid"),
        generation=2**63,
        version=7,
        services=(
            ServiceInstance(
                "web-1", "web", "10.0.9.9", 8080, ("v2", "🐍"), {"version": "2"}, 5, 0, "www"
            ),
        ),
        checks=(CheckState("c1", "HTTP", Health.WARNING, "web-1", "429 Too Many", "http", "n"),),
        removed=(("old-1", 1700000000.25),),
        left=True,
        stamp=-0.0,
    )
    again = decode(encode(Records((rec,))))
    assert isinstance(again, Records)
    assert again.records == (rec,)
    assert str(again.records[0].stamp) == "-0.0"
    assert encode_record(rec) == encode(Records((rec,)))[2:]  # type byte, count 1


def test_meta_order_is_kept() -> None:
    msg = Alive(1, "n1", "10.0.0.1:7946", {"z": "1", "a": "2", "m": "3"})
    again = decode(encode(msg))
    assert isinstance(again, Alive)
    assert list(again.meta) == ["z", "a", "m"]


# --- encoding refuses what the wire cannot carry ----------------------------------------


def _rec(**changes: Any) -> NodeRecord:
    base: dict[str, Any] = {"node": Node("n1", "10.0.0.1"), "generation": 1, "version": 1}
    return NodeRecord(**{**base, **changes})


def _svc(**changes: Any) -> ServiceInstance:
    base: dict[str, Any] = {"id": "s1", "name": "web", "address": "", "port": 80}
    return ServiceInstance(**{**base, **changes})


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        (Ack(-1), "seq -1"),
        (Ack(MAX_UINT + 1), "outside"),
        (Ping(1, "x" * (MAX_NAME + 1), "s", "a"), "target is 257 bytes"),
        (Ping(1, "t", "\ud800", "a"), "UTF-8"),
        (Records((_rec(services=(_svc(port=70000),)),)), "port 70000"),
        (Records((_rec(services=(_svc(weight=MAX_WEIGHT + 1),)),)), "weight"),
        (Records((_rec(services=(_svc(tags=("t",) * (MAX_TAGS + 1)),)),)), "tags"),
        (Records((_rec(services=(_svc(tags=("é" * MAX_TAG,)),)),)), "tag is"),
        (Records((_rec(node=Node("n", "a", meta={str(i): "" for i in range(65)})),)), "pairs"),
        (Records((_rec(stamp=float("nan")),)), "finite"),
        (Records((_rec(removed=(("i", float("inf")),)),)), "finite"),
        (Records((_rec(generation=-1),)), "generation"),
        (Alive(1, "n", "a", {"k": "v" * MAX_MEMBER_META}), "member meta is"),
        (PushPull(False, (), {"n": (1, -2)}), "digest version"),
    ],
)
def test_encode_refuses_out_of_bounds_values(msg: Message, words: str) -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode") as info:
        encode(msg)
    assert words in str(info.value)


def test_strings_at_their_limit_encode_and_one_byte_more_does_not() -> None:
    at_limit = Ping(1, "x" * MAX_NAME, "é" * (MAX_NAME // 2), "a")
    assert decode(encode(at_limit)) == at_limit
    with pytest.raises(LocalProtocolError):
        encode(Ping(1, "x", "é" * (MAX_NAME // 2) + "x", "a"))
    check = CheckState("c", "", Health.CRITICAL, output="o" * MAX_TEXT)
    assert decode(encode(Records((_rec(checks=(check,)),)))) == Records((_rec(checks=(check,)),))
    with pytest.raises(LocalProtocolError):
        encode(Records((_rec(checks=(CheckState("c", "", Health.CRITICAL, "", "o" * 4097),)),)))


def test_a_record_larger_than_max_record_size_is_refused() -> None:
    checks = tuple(
        CheckState(f"c{i}", "", Health.PASSING, output="o" * MAX_TEXT)
        for i in range(MAX_RECORD_SIZE // MAX_TEXT + 1)
    )
    with pytest.raises(LocalProtocolError, match="record of 'n1' is"):
        encode_record(_rec(checks=checks))


def test_a_push_pull_larger_than_a_tcp_frame_is_refused() -> None:
    """The record caps do not bound a whole message: encode checks the total."""
    big = tuple(
        _rec(node=Node(f"n{i}", "a"), checks=(CheckState("c", "", Health.PASSING, "", "o" * 4000),))
        for i in range(MAX_TCP_FRAME // 4000 + 1)
    )
    with pytest.raises(LocalProtocolError, match="several messages"):
        encode(PushPull(False, (), {}, big))


# --- size budgets ------------------------------------------------------------------------

# A sealed UDP packet has room for this much message.
UDP_ROOM = UDP_PACKET_BUDGET - FRAME_OVERHEAD - SEAL_OVERHEAD


def _biggest_member_meta() -> dict[str, str]:
    """One pair whose encoding (count, key, value) is exactly MAX_MEMBER_META bytes."""
    key = "k" * MAX_NAME
    value = "v" * (MAX_MEMBER_META - 1 - (2 + MAX_NAME) - 2)
    meta = {key: value}
    assert len(encode(Alive(0, "", "", meta))) - 4 == MAX_MEMBER_META
    return meta


def test_every_probe_and_membership_message_fits_one_udp_packet_at_its_bounds() -> None:
    """With every field at its limit, each fixed-shape message (and a compound
    header around it) still fits a sealed UDP packet."""
    name = "n" * MAX_NAME
    biggest: list[Message] = [
        Ping(MAX_UINT, name, name, name),
        IndirectPing(MAX_UINT, name, name, name, name, True),
        Ack(MAX_UINT),
        Nack(MAX_UINT),
        Suspect(MAX_UINT, name, name),
        Alive(MAX_UINT, name, name, _biggest_member_meta()),
        Dead(MAX_UINT, name, name),
    ]
    sizes = {type(m).__name__: len(encode(m)) for m in biggest}
    assert sizes["IndirectPing"] == 1 + 10 + 4 * (2 + MAX_NAME) + 1
    assert sizes["Alive"] == 1 + 10 + 2 * (2 + MAX_NAME) + MAX_MEMBER_META
    for kind, size in sizes.items():
        assert size + COMPOUND_HEADER + COMPOUND_OVERHEAD <= UDP_ROOM, kind


def test_a_record_at_its_cap_fits_a_tcp_frame_and_the_biggest_join_fits_too() -> None:
    assert 1 + 1 + MAX_RECORD_SIZE <= MAX_TCP_FRAME
    # A full membership at MAX_MEMBERS with realistic names, plus one maximal record.
    members = tuple(
        MemberState(f"ip-10-{i >> 8}-{i & 255}-1", f"10.{i >> 8}.{i & 255}.1:7946", 3,
                    MemberStatus.ALIVE, {"az": "eu-west-1a", "region": "eu-west-1"})
        for i in range(MAX_MEMBERS)
    )  # fmt: skip
    digest = {m.name: (2**40, 2**20) for m in members}
    members_only = len(encode(PushPull(True, members, digest)))
    assert members_only + 3 + MAX_RECORD_SIZE <= MAX_TCP_FRAME


def _typical_record(services: int, checks: bool) -> NodeRecord:
    svcs = tuple(
        ServiceInstance(f"svc-{i:02d}-{8080 + i}", f"svc-{i:02d}", "", 8080 + i,
                        ("v2", "primary"), {"version": "2.3.1"}, user=f"svc{i:02d}")
        for i in range(services)
    )  # fmt: skip
    states = tuple(
        CheckState(f"service:{s.id}", f"Service '{s.name}' check", Health.PASSING, s.id,
                   f"HTTP GET http://127.0.0.1:{s.port}/health: 200 OK Output: ok", "http")
        for s in svcs
    )  # fmt: skip
    node = Node("ip-10-0-1-23", "10.0.1.23", "eu-west-1a", "eu-west-1", "dc1",
                {"instance_type": "m5.large"}, "8d3e5a52-8f5e-4b5e-9d64-1f0e3c2b7a11")  # fmt: skip
    return NodeRecord(node, 3, 42, svcs, states if checks else (), stamp=1.7e9)


def test_record_sizes_against_the_udp_budget() -> None:
    """Measured: 20 instances take 1,265 bytes without checks (fits one packet)
    and 3,645 with one HTTP check each (does not: it travels over TCP)."""
    bare = len(encode(Records((_typical_record(20, checks=False),))))
    checked = len(encode(Records((_typical_record(20, checks=True),))))
    assert (bare, checked) == (1265, 3645)
    assert bare <= UDP_ROOM < checked
    assert checked < MAX_RECORD_SIZE


def test_limits_are_consistent() -> None:
    assert MAX_CHECKS_PER_RECORD >= MAX_SERVICES_PER_RECORD
    assert MAX_RECORDS_PER_MESSAGE >= MAX_MEMBERS
    assert MAX_REMOVED_PER_RECORD >= 24 * 3600 // 15


def test_the_text_bound_carries_the_agents_check_output() -> None:
    from hostmesh._config import MAX_CHECK_OUTPUT

    assert MAX_TEXT >= MAX_CHECK_OUTPUT


# --- compound and framing errors --------------------------------------------------------


def test_encode_compound_refuses_what_memberlist_cannot_carry() -> None:
    ack = encode(Ack(1))
    with pytest.raises(LocalProtocolError):
        encode_compound([])
    with pytest.raises(LocalProtocolError):
        encode_compound([ack] * (MAX_COMPOUND_PARTS + 1))
    with pytest.raises(LocalProtocolError, match="nest"):
        encode_compound([encode_compound([ack])])
    with pytest.raises(LocalProtocolError):
        encode_compound([b""])
    with pytest.raises(LocalProtocolError):
        encode_compound([ack + b"\0" * 0x10000])
    assert len(decode_compound(encode_compound([ack] * MAX_COMPOUND_PARTS))) == 255


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes([MsgType.COMPOUND, 0]), "no parts"),
        (bytes([MsgType.COMPOUND, 1, 0, 2, MsgType.ACK]), "truncated"),
        (bytes([MsgType.COMPOUND, 1, 0, 2, MsgType.ACK, 1, 9]), "trailing"),
        (bytes([MsgType.COMPOUND, 2, 0, 2]), "truncated"),
        (bytes([MsgType.COMPOUND, 1, 0, 2, MsgType.ACK, 0x80]), "truncated seq"),
        (bytes([MsgType.COMPOUND, 1, 0, 4, MsgType.COMPOUND, 1, 0, 0]), "compound"),
        (bytes([MsgType.ACK, 1, MsgType.ACK, 2]), "trailing"),
        (bytes([0]), "unknown message type 0"),
        (bytes([200]), "unknown message type 200"),
        (b"", "truncated"),
    ],
)
def test_decode_packet_errors(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_packet(data)


def test_frame_round_trip_and_layout() -> None:
    payload = encode(Ping(7, "a", "b", "10.0.0.2:7946"))
    framed = frame(payload)
    assert framed[0] == PROTOCOL_VERSION
    assert struct.unpack(">I", framed[1:5])[0] == zlib.crc32(payload)
    assert framed[FRAME_OVERHEAD:] == payload
    assert unframe(framed) == payload
    assert unframe(frame(b"")) == b""


def test_unframe_refuses_a_crc_mismatch_in_payload_or_header() -> None:
    framed = bytearray(frame(encode(Ack(99))))
    for index in range(1, len(framed)):
        for bit in range(8):
            bad = bytearray(framed)
            bad[index] ^= 1 << bit
            with pytest.raises(DecodeError, match="CRC32"):
                unframe(bytes(bad))


def test_unframe_refuses_another_version_and_short_frames() -> None:
    framed = frame(b"\x03\x01")
    with pytest.raises(DecodeError, match="protocol version 2, expected 1"):
        unframe(bytes([2]) + framed[1:])
    for size in range(FRAME_OVERHEAD):
        with pytest.raises(DecodeError, match="shorter"):
            unframe(framed[:size])


def test_frame_size_limits() -> None:
    with pytest.raises(LocalProtocolError):
        frame(bytes(MAX_TCP_FRAME + 1))
    with pytest.raises(DecodeError, match="more than"):
        unframe(bytes([PROTOCOL_VERSION]) + bytes(4 + MAX_TCP_FRAME + 1))


def test_decode_error_is_a_remote_protocol_error() -> None:
    assert issubclass(DecodeError, RemoteProtocolError)
    assert DecodeError("bad").reason == "bad"


# --- targeted malformed inputs ------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes([MsgType.ACK]) + b"\x80" * 10 + b"\x01", "longer than 10"),
        (bytes([MsgType.ACK]) + b"\xff" * 9 + b"\x02", "more than"),
        (bytes([MsgType.ACK, 0x81, 0x00]), "shortest form"),
        (bytes([MsgType.SUSPECT, 1, 2, 0xC3, 0x28, 0]), "not valid UTF-8"),
        (bytes([MsgType.SUSPECT, 1]) + _varint(MAX_NAME + 1), "more than 256"),
        (bytes([MsgType.SUSPECT, 1]) + _varint(2**40), "more than 256"),
        (bytes([MsgType.INDIRECT_PING, 1, 0, 0, 0, 0, 2]), "not a boolean"),
        (bytes([MsgType.ALIVE, 1, 0, 0, 2, 1, 97, 0, 1, 97, 0]), "duplicate key 'a'"),
        (bytes([MsgType.ALIVE, 1, 0, 0]) + _varint(MAX_META_PAIRS + 1), "more than 64"),
        (bytes([MsgType.ALIVE, 1, 0, 0, 20]), "cannot fit"),
        (bytes([MsgType.RECORDS]) + _varint(MAX_RECORDS_PER_MESSAGE + 1), "more than"),
        (bytes([MsgType.RECORDS]) + _varint(10**6), "more than"),
        (bytes([MsgType.RECORDS, 200, 1]), "cannot fit"),
        (bytes([MsgType.PUSH_PULL, 0]) + _varint(2**63), "members, more than"),
        (bytes([MsgType.PUSH_PULL, 0, 1, 0, 0, 0, 9, 0]), "unknown member status 9"),
        (bytes([MsgType.PUSH_PULL, 0, 0, 2, 1, 97, 1, 1, 1, 97, 1, 1, 0]), "duplicate node"),
    ],
)
def test_decode_names_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(data)


def test_a_forged_count_does_not_allocate() -> None:
    """A count of 10,000 records in 30 bytes is refused before reading any."""
    with pytest.raises(DecodeError, match="cannot fit"):
        decode(bytes([MsgType.RECORDS]) + _varint(10_000) + bytes(30))


def test_records_bad_enum_float_and_bool() -> None:
    rec = _rec(checks=(CheckState("c", "", Health.PASSING),), removed=(("i", 1.0),), stamp=2.0)
    good = encode(Records((rec,)))
    status_at = good.index(b"\x01c\x00") + 3  # check id "c", empty name, then the status byte
    assert good[status_at] == 0
    with pytest.raises(DecodeError, match="unknown check status 7"):
        decode(good[:status_at] + b"\x07" + good[status_at + 1 :])
    stamp_at = len(good) - 8
    nan = struct.pack(">d", float("nan"))
    with pytest.raises(DecodeError, match="stamp is not a finite"):
        decode(good[:stamp_at] + nan)
    with pytest.raises(DecodeError, match="left"):
        decode(good[: stamp_at - 1] + b"\x02" + good[stamp_at:])
    removed_at = good.index(struct.pack(">d", 1.0))
    with pytest.raises(DecodeError, match="removal time"):
        decode(good[:removed_at] + struct.pack(">d", float("-inf")) + good[removed_at + 8 :])


# --- fuzzing --------------------------------------------------------------------------------

DECODERS: tuple[Callable[[bytes], object], ...] = (decode, decode_packet, decode_compound, unframe)


def _decodes_or_refuses(data: bytes) -> None:
    """Every decoder returns a value or raises DecodeError; a message that
    decodes re-encodes to exactly ``data``."""
    for fn in DECODERS:
        try:
            value = fn(data)
        except DecodeError:
            continue
        if fn is decode:
            assert encode(value) == data  # type: ignore[arg-type]
        elif fn is decode_packet:
            assert isinstance(value, list)
            parts = [encode(m) for m in value]
            assert (parts[0] if data[0] != MsgType.COMPOUND else encode_compound(parts)) == data


FUZZ = settings(
    max_examples=1500,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    deadline=None,
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        # A known type byte first, so the fuzz reaches the field decoders.
        st.builds(
            lambda t, rest: bytes([t]) + rest,
            st.sampled_from(sorted(MsgType)),
            st.binary(max_size=200),
        ),
        # A valid frame around random bytes, so unframe's payload path runs.
        st.binary(max_size=100).map(frame),
    )
)
def test_fuzz_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.choice(["flip", "set", "truncate", "extend", "insert", "delete", "count"])
    at = rng.randrange(max(len(buf), 1))
    if kind == "flip" and buf:
        buf[at] ^= 1 << rng.randrange(8)
    elif kind == "set" and buf:
        buf[at] = rng.randrange(256)
    elif kind == "truncate":
        del buf[at:]
    elif kind == "extend":
        buf += rng.randbytes(rng.randint(1, 20))
    elif kind == "insert":
        buf[at:at] = rng.randbytes(rng.randint(1, 4))
    elif kind == "delete":
        del buf[at : at + rng.randint(1, 4)]
    elif buf:
        # A varint count or length replaced by a zero, a large or a two-byte one.
        buf[at : at + 1] = rng.choice(
            [b"\x00", b"\x01", b"\x7f", b"\xff\x7f", b"\xff\xff\xff\x7f", b"\x81\x01"]
        )
    return bytes(buf)


# Valid encodings to mutate, made once from a seeded generator: drawing whole
# messages from the strategies above for every fuzz example is several times slower.
_CHARS = "az09-.:_ éßЖ中文🐍\u0000\u007f\u00a0"


def _random_message(rng: random.Random) -> Message:
    def text() -> str:
        return "".join(rng.choice(_CHARS) for _ in range(rng.choice([0, 1, 3, 8, 20])))

    def uint() -> int:
        return rng.choice([0, 1, 127, 128, 300, 2**32, MAX_UINT])

    def meta(n: int = 3) -> dict[str, str]:
        return {text(): text() for _ in range(rng.randint(0, n))}

    def record() -> NodeRecord:
        services = tuple(
            ServiceInstance(text(), text(), text(), rng.randint(0, 65535),
                            tuple(text() for _ in range(rng.randint(0, 3))), meta(),
                            rng.randint(0, MAX_WEIGHT), rng.randint(0, 3), text())
            for _ in range(rng.randint(0, 3))
        )  # fmt: skip
        checks = tuple(
            CheckState(text(), text(), rng.choice(list(Health)), text(), text(), text(), text())
            for _ in range(rng.randint(0, 3))
        )
        removed = tuple((text(), rng.uniform(-1e10, 1e10)) for _ in range(rng.randint(0, 2)))
        node = Node(text(), text(), text(), text(), text(), meta(), text())
        return NodeRecord(node, uint(), uint(), services, checks, removed,
                          rng.random() < 0.5, rng.choice([0.0, -0.0, 1.7e9, 5e-324]))  # fmt: skip

    kind = rng.choice(sorted(BY_TYPE))
    if kind is MsgType.PING:
        return Ping(uint(), text(), text(), text())
    if kind is MsgType.INDIRECT_PING:
        return IndirectPing(uint(), text(), text(), text(), text(), rng.random() < 0.5)
    if kind is MsgType.ACK:
        return Ack(uint())
    if kind is MsgType.NACK:
        return Nack(uint())
    if kind is MsgType.SUSPECT:
        return Suspect(uint(), text(), text())
    if kind is MsgType.ALIVE:
        return Alive(uint(), text(), text(), meta(2))
    if kind is MsgType.DEAD:
        return Dead(uint(), text(), text())
    if kind is MsgType.RECORDS:
        return Records(tuple(record() for _ in range(rng.randint(0, 2))))
    members = tuple(
        MemberState(text(), text(), uint(), rng.choice(list(MemberStatus)), meta(2))
        for _ in range(rng.randint(0, 3))
    )
    digest = {text(): (uint(), uint()) for _ in range(rng.randint(0, 3))}
    return PushPull(rng.random() < 0.5, members, digest, (record(),) if rng.random() < 0.5 else ())


def _pool(size: int) -> list[bytes]:
    rng = random.Random(2024)
    out = []
    for _ in range(size):
        parts = [encode(_random_message(rng)) for _ in range(rng.choice([1, 1, 2, 3]))]
        out.append(parts[0] if len(parts) == 1 else encode_compound(parts))
    return out


POOL = _pool(300)


# Mutations come from a seeded Random: one draw per example keeps the
# Hypothesis overhead per example low; a failure reports the seed.
SEEDS = st.integers(0, 2**64 - 1)


@settings(FUZZ, max_examples=2000)
@given(SEEDS)
def test_fuzz_mutated_messages(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.choice(POOL)
    for _ in range(rng.randint(1, 3)):
        data = _mutate(data, rng)
    _decodes_or_refuses(data)


@settings(FUZZ, max_examples=1000)
@given(SEEDS)
def test_fuzz_mutated_frames(seed: int) -> None:
    """A damaged frame is always refused (the CRC), and never crashes a decoder."""
    rng = random.Random(seed)
    framed = frame(rng.choice(POOL))
    data = _mutate(framed, rng)
    _decodes_or_refuses(data)
    if data == framed:
        assert unframe(data) == framed[FRAME_OVERHEAD:]
    else:
        with pytest.raises(DecodeError):
            unframe(data)

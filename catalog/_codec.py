"""The gossip wire format: a versioned, compact, strictly bounded binary codec.

Sans-IO: bytes in, :mod:`hostmesh.catalog._messages` values out, and back.

Layers, innermost first (after memberlist's net.go)::

    message   [MsgType u8][fields]                      encode() / decode()
    compound  [COMPOUND u8][n u8][n x u16 length][n messages]   encode_compound()
    frame     [PROTOCOL_VERSION u8][CRC32 u32][message or compound]   frame() / unframe()

The keyring (:mod:`hostmesh.catalog._keyring`) seals a frame for the network;
a TCP transport puts its own length prefix in front of each sealed frame and
refuses lengths above ``MAX_TCP_FRAME + FRAME_OVERHEAD + SEAL_OVERHEAD``.

Field encodings (all multi-byte fixed widths big-endian):

- unsigned integer: LEB128 varint, at most 10 bytes, value < 2**64, shortest form;
- port: u16; weight: varint <= ``MAX_WEIGHT``; time: IEEE 754 float64, finite;
- bool: one byte, 0 or 1; enum: one byte, a known value;
- string: varint byte length, then UTF-8; a per-field bound (``MAX_NAME`` or ``MAX_TEXT``);
- list: varint count, then the items; map: varint count, then key/value pairs
  with distinct keys (order kept).

The decoder accepts exactly what the encoder produces: every length and count
is checked against its bound and against the bytes left (a forged count cannot
make it allocate), strings must be valid UTF-8, trailing bytes are an error,
and each failure is a :class:`DecodeError`. So for any input ``x`` that
decodes, ``encode(decode(x)) == x``. The encoder refuses values outside the
bounds with :class:`~hostmesh.LocalProtocolError`.

Changing a layout means bumping ``PROTOCOL_VERSION``; ``MsgType`` values are
append-only.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from hostmesh._errors import LocalProtocolError, RemoteProtocolError

from ._messages import (
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
from ._model import CheckState, Health, Node, NodeRecord, ServiceInstance

__all__ = [
    "COMPOUND_HEADER",
    "COMPOUND_OVERHEAD",
    "FRAME_OVERHEAD",
    "MAX_CHECKS_PER_RECORD",
    "MAX_COMPOUND_PARTS",
    "MAX_COMPOUND_PART_SIZE",
    "MAX_MEMBERS",
    "MAX_MEMBER_META",
    "MAX_META_PAIRS",
    "MAX_NAME",
    "MAX_RECORDS_PER_MESSAGE",
    "MAX_RECORD_SIZE",
    "MAX_REMOVED_PER_RECORD",
    "MAX_SERVICES_PER_RECORD",
    "MAX_TAG",
    "MAX_TAGS",
    "MAX_TCP_FRAME",
    "MAX_TEXT",
    "MAX_UINT",
    "MAX_WEIGHT",
    "PROTOCOL_VERSION",
    "UDP_PACKET_BUDGET",
    "DecodeError",
    "decode",
    "decode_compound",
    "decode_packet",
    "decode_record",
    "encode",
    "encode_compound",
    "encode_record",
    "frame",
    "unframe",
]

# --- versions and sizes -----------------------------------------------------------

#: The first byte of every frame. Bump it when any layout below changes; a peer
#: with another version is refused (DecodeError), not misread.
PROTOCOL_VERSION = 1

#: Bytes per UDP packet, framing and encryption included (memberlist's
#: UDPBufferSize: below a 1500-byte Ethernet MTU after IP/UDP headers).
UDP_PACKET_BUDGET = 1400

#: Largest message or compound inside one TCP frame (push-pull). A join reply
#: for 10,000 nodes (REFERENCE.md's Consul scale) carries 0.9 MB of members and
#: digest (measured); the rest is records, which a big catalog sends over several
#: frames. 8 MiB bounds what one connection makes us buffer (memberlist's
#: maxPushStateBytes is 20 MiB).
MAX_TCP_FRAME = 8 * 1024 * 1024

#: frame() adds the version byte and the CRC32.
FRAME_OVERHEAD = 1 + 4
#: encode_compound() adds the type and count bytes ...
COMPOUND_HEADER = 1 + 1
#: ... and a u16 length per part.
COMPOUND_OVERHEAD = 2
#: memberlist's compound count is one byte.
MAX_COMPOUND_PARTS = 255
#: A compound part's length is a u16.
MAX_COMPOUND_PART_SIZE = 0xFFFF

# --- field bounds -------------------------------------------------------------------

#: Varints carry Go's uint64 range (memberlist's seq and incarnation are uint32).
MAX_UINT = 2**64 - 1
#: Weights become DNS SRV weights, a 16-bit field (RFC 2782); the config allows 0..65535.
MAX_WEIGHT = 0xFFFF
#: Bytes of an identifier: node, service and check ids and names, addresses,
#: meta keys, kinds, users. hostmesh's names are at most 128 ASCII characters;
#: a DNS name is at most 253 bytes (RFC 1035 2.3.4). 256 keeps every probe and
#: membership message within one sealed UDP packet at its bounds (tested).
MAX_NAME = 256
#: Bytes of a tag: the config allows 128 characters, at most 512 bytes of UTF-8.
MAX_TAG = 512
#: Bytes of free text: check output (the agent keeps 4 KiB, MAX_CHECK_OUTPUT),
#: check names and notes, meta values.
MAX_TEXT = 4 * 1024
#: Key/value pairs in a node's or a service's meta (Consul's metaMaxKeyPairs).
MAX_META_PAIRS = 64
#: Encoded bytes of a member's meta in Alive/MemberState (memberlist's MetaMaxSize).
MAX_MEMBER_META = 512
#: Tags on one service instance; a handful in practice (v2, canary, primary).
MAX_TAGS = 64
#: Service instances in one record: the agent's own limit (agent MAX_LOCAL_SERVICES).
MAX_SERVICES_PER_RECORD = 4096
#: Checks in one record: two per instance at the instance limit.
MAX_CHECKS_PER_RECORD = 2 * MAX_SERVICES_PER_RECORD
#: Instance tombstones kept in one record over the tombstone TTL (24 h by
#: default): a node replacing a batch instance every 15 s keeps ~5,800.
MAX_REMOVED_PER_RECORD = 8192
#: Encoded bytes of one record. 20 instances with an HTTP check each take
#: 3.6 KB (tests/test_gossip_codec.py); at 1 MiB one node fills at most an
#: eighth of a push-pull frame.
MAX_RECORD_SIZE = 1024 * 1024
#: Members and digest entries in one push-pull: above the 10,000-node
#: datacenter of REFERENCE.md. A member and its digest entry take ~90 bytes,
#: so 16,384 of them fill 1.4 MB of the frame (measured).
MAX_MEMBERS = 16_384
#: Keys in one keyring answer: rotation needs two or three; more is a mistake.
MAX_KEYS = 16
#: Records in one message: one per member at most. The frame size, checked on
#: encode, bounds the total; a count is also bounded by the bytes left.
MAX_RECORDS_PER_MESSAGE = MAX_MEMBERS

# Check status on the wire. ONLY APPEND TO THIS TABLE.
_HEALTH_CODES: dict[Health, int] = {Health.PASSING: 0, Health.WARNING: 1, Health.CRITICAL: 2}
_HEALTH_BY_CODE = {code: health for health, code in _HEALTH_CODES.items()}

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")


class DecodeError(RemoteProtocolError):
    """Bytes from a peer are not a valid message; ``reason`` says why (one line).

    The caller drops the packet and counts it; it is never a crash.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- writing ------------------------------------------------------------------------


def _refuse(reason: str) -> LocalProtocolError:
    return LocalProtocolError(f"cannot encode: {reason}")


def _w_uint(out: bytearray, value: int, what: str, limit: int = MAX_UINT) -> None:
    if not 0 <= value <= limit:
        raise _refuse(f"{what} {value} is outside 0..{limit}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _w_u16(out: bytearray, value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFF:
        raise _refuse(f"{what} {value} is outside 0..65535")
    out += _U16.pack(value)


def _w_bool(out: bytearray, value: bool) -> None:
    out.append(1 if value else 0)


def _w_time(out: bytearray, value: float, what: str) -> None:
    if not math.isfinite(value):
        raise _refuse(f"{what} {value!r} is not a finite number")
    out += _F64.pack(value)


def _w_str(out: bytearray, value: str, limit: int, what: str) -> None:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse(f"{what} is not encodable as UTF-8") from None
    if len(raw) > limit:
        raise _refuse(f"{what} is {len(raw)} bytes, more than {limit}")
    _w_uint(out, len(raw), what)
    out += raw


def _w_count(out: bytearray, count: int, limit: int, what: str) -> None:
    if count > limit:
        raise _refuse(f"{count} {what}, more than {limit}")
    _w_uint(out, count, what)


def _w_meta(out: bytearray, meta: Mapping[str, str], what: str) -> None:
    _w_count(out, len(meta), MAX_META_PAIRS, f"{what} pairs")
    for key, value in meta.items():
        _w_str(out, key, MAX_NAME, f"{what} key")
        _w_str(out, value, MAX_TEXT, f"{what} value")


def _w_member_meta(out: bytearray, meta: Mapping[str, str]) -> None:
    start = len(out)
    _w_meta(out, meta, "member meta")
    if len(out) - start > MAX_MEMBER_META:
        raise _refuse(f"member meta is {len(out) - start} bytes, more than {MAX_MEMBER_META}")


def _w_record(out: bytearray, rec: NodeRecord) -> None:
    start = len(out)
    n = rec.node
    _w_str(out, n.name, MAX_NAME, "node name")
    _w_str(out, n.address, MAX_NAME, "node address")
    _w_str(out, n.az, MAX_NAME, "node az")
    _w_str(out, n.region, MAX_NAME, "node region")
    _w_str(out, n.datacenter, MAX_NAME, "node datacenter")
    _w_meta(out, n.meta, "node meta")
    _w_str(out, n.id, MAX_NAME, "node id")
    _w_uint(out, rec.generation, "generation")
    _w_uint(out, rec.version, "version")
    _w_count(out, len(rec.services), MAX_SERVICES_PER_RECORD, "services")
    for svc in rec.services:
        _w_str(out, svc.id, MAX_NAME, "service id")
        _w_str(out, svc.name, MAX_NAME, "service name")
        _w_str(out, svc.address, MAX_NAME, "service address")
        _w_u16(out, svc.port, "port")
        _w_count(out, len(svc.tags), MAX_TAGS, "tags")
        for tag in svc.tags:
            _w_str(out, tag, MAX_TAG, "tag")
        _w_meta(out, svc.meta, "service meta")
        _w_uint(out, svc.weight, "weight", MAX_WEIGHT)
        _w_uint(out, svc.weight_warning, "weight_warning", MAX_WEIGHT)
        _w_str(out, svc.user, MAX_NAME, "service user")
    _w_count(out, len(rec.checks), MAX_CHECKS_PER_RECORD, "checks")
    for check in rec.checks:
        _w_str(out, check.id, MAX_NAME, "check id")
        _w_str(out, check.name, MAX_TEXT, "check name")
        out.append(_HEALTH_CODES[check.status])
        _w_str(out, check.service_id, MAX_NAME, "check service_id")
        _w_str(out, check.output, MAX_TEXT, "check output")
        _w_str(out, check.kind, MAX_NAME, "check kind")
        _w_str(out, check.notes, MAX_TEXT, "check notes")
    _w_count(out, len(rec.removed), MAX_REMOVED_PER_RECORD, "removed instances")
    for instance_id, when in rec.removed:
        _w_str(out, instance_id, MAX_NAME, "removed instance id")
        _w_time(out, when, "removal time")
    _w_bool(out, rec.left)
    _w_time(out, rec.stamp, "stamp")
    if len(out) - start > MAX_RECORD_SIZE:
        raise _refuse(
            f"the record of {n.name!r} is {len(out) - start} bytes, more than {MAX_RECORD_SIZE}"
        )


def _w_records(out: bytearray, records: Sequence[NodeRecord]) -> None:
    _w_count(out, len(records), MAX_RECORDS_PER_MESSAGE, "records")
    for rec in records:
        _w_record(out, rec)


def encode_record(rec: NodeRecord) -> bytes:
    """One record's binary form, as embedded in RECORDS and PUSH_PULL messages.

    Raises:
        LocalProtocolError: a field is outside its bound, or the record is
            larger than ``MAX_RECORD_SIZE``.
    """
    out = bytearray()
    _w_record(out, rec)
    return bytes(out)


def encode(msg: Message) -> bytes:
    """One message's bytes: its ``MsgType`` byte, then its fields.

    Raises:
        LocalProtocolError: a field is outside its bound, or the message is
            larger than ``MAX_TCP_FRAME``. Nothing was sent; it is our bug or
            our data's (a record too big to gossip).
    """
    out = bytearray()
    match msg:
        case Ping():
            out.append(MsgType.PING)
            _w_uint(out, msg.seq, "seq")
            _w_str(out, msg.target, MAX_NAME, "target")
            _w_str(out, msg.source, MAX_NAME, "source")
            _w_str(out, msg.source_addr, MAX_NAME, "source_addr")
        case IndirectPing():
            out.append(MsgType.INDIRECT_PING)
            _w_uint(out, msg.seq, "seq")
            _w_str(out, msg.target, MAX_NAME, "target")
            _w_str(out, msg.target_addr, MAX_NAME, "target_addr")
            _w_str(out, msg.source, MAX_NAME, "source")
            _w_str(out, msg.source_addr, MAX_NAME, "source_addr")
            _w_bool(out, msg.nack)
        case Ack():
            out.append(MsgType.ACK)
            _w_uint(out, msg.seq, "seq")
        case Nack():
            out.append(MsgType.NACK)
            _w_uint(out, msg.seq, "seq")
        case Suspect():
            out.append(MsgType.SUSPECT)
            _w_uint(out, msg.incarnation, "incarnation")
            _w_str(out, msg.node, MAX_NAME, "node")
            _w_str(out, msg.source, MAX_NAME, "source")
        case Alive():
            out.append(MsgType.ALIVE)
            _w_uint(out, msg.incarnation, "incarnation")
            _w_str(out, msg.node, MAX_NAME, "node")
            _w_str(out, msg.addr, MAX_NAME, "addr")
            _w_member_meta(out, msg.meta)
        case Dead():
            out.append(MsgType.DEAD)
            _w_uint(out, msg.incarnation, "incarnation")
            _w_str(out, msg.node, MAX_NAME, "node")
            _w_str(out, msg.source, MAX_NAME, "source")
        case Records():
            out.append(MsgType.RECORDS)
            _w_records(out, msg.records)
        case PushPull():
            out.append(MsgType.PUSH_PULL)
            _w_bool(out, msg.join)
            _w_count(out, len(msg.members), MAX_MEMBERS, "members")
            for member in msg.members:
                _w_str(out, member.name, MAX_NAME, "member name")
                _w_str(out, member.addr, MAX_NAME, "member addr")
                _w_uint(out, member.incarnation, "incarnation")
                out.append(member.status)
                _w_member_meta(out, member.meta)
            _w_count(out, len(msg.digest), MAX_MEMBERS, "digest entries")
            for node, (generation, version) in msg.digest.items():
                _w_str(out, node, MAX_NAME, "digest node")
                _w_uint(out, generation, "digest generation")
                _w_uint(out, version, "digest version")
            _w_records(out, msg.records)
        case KeyringRequest():
            out.append(MsgType.KEYRING_REQUEST)
            _w_uint(out, msg.id, "id")
            out.append(msg.op)
            _w_str(out, msg.key, MAX_NAME, "key")
            _w_str(out, msg.origin_addr, MAX_NAME, "origin_addr")
        case KeyringResponse():
            out.append(MsgType.KEYRING_RESPONSE)
            _w_uint(out, msg.id, "id")
            _w_str(out, msg.node, MAX_NAME, "node")
            _w_bool(out, msg.ok)
            _w_str(out, msg.error, MAX_NAME, "error")
            _w_count(out, len(msg.keys), MAX_KEYS, "keys")
            for key in msg.keys:
                _w_str(out, key, MAX_NAME, "key")
        case _:
            raise _refuse(f"{type(msg).__name__} is not a gossip message")
    if len(out) > MAX_TCP_FRAME:
        raise _refuse(
            f"{type(msg).__name__} is {len(out)} bytes, more than MAX_TCP_FRAME "
            f"({MAX_TCP_FRAME}); send its records over several messages"
        )
    return bytes(out)


# --- reading ------------------------------------------------------------------------

_T = TypeVar("_T")


class _Reader:
    """A cursor over one message; every read checks the bytes left."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise DecodeError(f"truncated {what}: need {n} bytes, {self.left()} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        if self.pos >= len(self.data):
            raise DecodeError(f"truncated {what}")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self, what: str) -> int:
        value: int = _U16.unpack(self.take(2, what))[0]
        return value

    def uint(self, what: str, limit: int = MAX_UINT) -> int:
        value = 0
        for i in range(10):
            byte = self.u8(what)
            value |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                if byte == 0 and i > 0:
                    raise DecodeError(f"{what}: varint not in its shortest form")
                if value > limit:
                    raise DecodeError(f"{what} {value} is more than {limit}")
                return value
        raise DecodeError(f"{what}: varint longer than 10 bytes")

    def boolean(self, what: str) -> bool:
        byte = self.u8(what)
        if byte > 1:
            raise DecodeError(f"{what}: {byte} is not a boolean (0 or 1)")
        return byte == 1

    def time(self, what: str) -> float:
        value: float = _F64.unpack(self.take(8, what))[0]
        if not math.isfinite(value):
            raise DecodeError(f"{what} is not a finite number")
        return value

    def string(self, limit: int, what: str) -> str:
        size = self.uint(f"{what} length")
        if size > limit:
            raise DecodeError(f"{what} is {size} bytes, more than {limit}")
        raw = self.take(size, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"{what} is not valid UTF-8") from None

    def count(self, limit: int, what: str, min_item: int) -> int:
        """A list count, at most ``limit`` and at most what the bytes left can hold."""
        n = self.uint(f"{what} count")
        if n > limit:
            raise DecodeError(f"{n} {what}, more than {limit}")
        if n * min_item > self.left():
            raise DecodeError(f"{n} {what} cannot fit in {self.left()} bytes")
        return n

    def items(self, limit: int, what: str, min_item: int, item: Callable[[], _T]) -> list[_T]:
        return [item() for _ in range(self.count(limit, what, min_item))]

    def meta(self, what: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for _ in range(self.count(MAX_META_PAIRS, f"{what} pairs", 2)):
            key = self.string(MAX_NAME, f"{what} key")
            if key in out:
                raise DecodeError(f"{what}: duplicate key {key!r}")
            out[key] = self.string(MAX_TEXT, f"{what} value")
        return out

    def member_meta(self) -> dict[str, str]:
        start = self.pos
        out = self.meta("member meta")
        if self.pos - start > MAX_MEMBER_META:
            raise DecodeError(
                f"member meta is {self.pos - start} bytes, more than {MAX_MEMBER_META}"
            )
        return out


def _r_service(r: _Reader) -> ServiceInstance:
    return ServiceInstance(
        id=r.string(MAX_NAME, "service id"),
        name=r.string(MAX_NAME, "service name"),
        address=r.string(MAX_NAME, "service address"),
        port=r.u16("port"),
        tags=tuple(r.items(MAX_TAGS, "tags", 1, lambda: r.string(MAX_TAG, "tag"))),
        meta=r.meta("service meta"),
        weight=r.uint("weight", MAX_WEIGHT),
        weight_warning=r.uint("weight_warning", MAX_WEIGHT),
        user=r.string(MAX_NAME, "service user"),
    )


def _r_health(r: _Reader) -> Health:
    code = r.u8("check status")
    try:
        return _HEALTH_BY_CODE[code]
    except KeyError:
        raise DecodeError(f"unknown check status {code}") from None


def _r_check(r: _Reader) -> CheckState:
    return CheckState(
        id=r.string(MAX_NAME, "check id"),
        name=r.string(MAX_TEXT, "check name"),
        status=_r_health(r),
        service_id=r.string(MAX_NAME, "check service_id"),
        output=r.string(MAX_TEXT, "check output"),
        kind=r.string(MAX_NAME, "check kind"),
        notes=r.string(MAX_TEXT, "check notes"),
    )


def _r_removed(r: _Reader) -> tuple[str, float]:
    return r.string(MAX_NAME, "removed instance id"), r.time("removal time")


# The fewest bytes an encoded item can take: a count never promises more items
# than the bytes left could hold.
_MIN_SERVICE = 3 + 2 + 1 + 1 + 2 + 1  # id/name/address, port, tags, meta, weights, user
_MIN_CHECK = 2 + 1 + 4  # id, name, status, service_id, output, kind, notes
_MIN_REMOVED = 1 + 8
_MIN_RECORD = 7 + 2 + 3 + 1 + 8  # node, generation/version, lists, left, stamp
_MIN_MEMBER = 2 + 1 + 1 + 1  # name, addr, incarnation, status, meta
_MIN_DIGEST = 1 + 2


def _r_record(r: _Reader) -> NodeRecord:
    start = r.pos
    node = Node(
        name=r.string(MAX_NAME, "node name"),
        address=r.string(MAX_NAME, "node address"),
        az=r.string(MAX_NAME, "node az"),
        region=r.string(MAX_NAME, "node region"),
        datacenter=r.string(MAX_NAME, "node datacenter"),
        meta=r.meta("node meta"),
        id=r.string(MAX_NAME, "node id"),
    )
    rec = NodeRecord(
        node=node,
        generation=r.uint("generation"),
        version=r.uint("version"),
        services=tuple(
            r.items(MAX_SERVICES_PER_RECORD, "services", _MIN_SERVICE, lambda: _r_service(r))
        ),
        checks=tuple(r.items(MAX_CHECKS_PER_RECORD, "checks", _MIN_CHECK, lambda: _r_check(r))),
        removed=tuple(
            r.items(
                MAX_REMOVED_PER_RECORD, "removed instances", _MIN_REMOVED, lambda: _r_removed(r)
            )
        ),
        left=r.boolean("left"),
        stamp=r.time("stamp"),
    )
    if r.pos - start > MAX_RECORD_SIZE:
        raise DecodeError(f"a record of {r.pos - start} bytes, more than {MAX_RECORD_SIZE}")
    return rec


def decode_record(data: bytes) -> NodeRecord:
    """Parse exactly one :func:`encode_record` output (the server stores records so).

    Raises:
        DecodeError: anything wrong with ``data``; never another exception.
    """
    if len(data) > MAX_RECORD_SIZE:
        raise DecodeError(f"a record of {len(data)} bytes, more than {MAX_RECORD_SIZE}")
    r = _Reader(bytes(data))
    rec = _r_record(r)
    if r.left():
        raise DecodeError(f"{r.left()} trailing bytes after a record")
    return rec


def _r_records(r: _Reader) -> tuple[NodeRecord, ...]:
    return tuple(r.items(MAX_RECORDS_PER_MESSAGE, "records", _MIN_RECORD, lambda: _r_record(r)))


def _r_member(r: _Reader) -> MemberState:
    name = r.string(MAX_NAME, "member name")
    addr = r.string(MAX_NAME, "member addr")
    incarnation = r.uint("incarnation")
    code = r.u8("member status")
    if code not in _MEMBER_STATUS_CODES:
        raise DecodeError(f"unknown member status {code}")
    return MemberState(name, addr, incarnation, MemberStatus(code), r.member_meta())


_MEMBER_STATUS_CODES = frozenset(status.value for status in MemberStatus)


def _r_push_pull(r: _Reader) -> PushPull:
    join = r.boolean("join")
    members = tuple(r.items(MAX_MEMBERS, "members", _MIN_MEMBER, lambda: _r_member(r)))
    digest: dict[str, tuple[int, int]] = {}
    for _ in range(r.count(MAX_MEMBERS, "digest entries", _MIN_DIGEST)):
        node = r.string(MAX_NAME, "digest node")
        if node in digest:
            raise DecodeError(f"digest: duplicate node {node!r}")
        digest[node] = (r.uint("digest generation"), r.uint("digest version"))
    return PushPull(join, members, digest, _r_records(r))


def _r_message(r: _Reader) -> Message:
    code = r.u8("message type")
    msg: Message
    if code == MsgType.PING:
        msg = Ping(
            seq=r.uint("seq"),
            target=r.string(MAX_NAME, "target"),
            source=r.string(MAX_NAME, "source"),
            source_addr=r.string(MAX_NAME, "source_addr"),
        )
    elif code == MsgType.INDIRECT_PING:
        msg = IndirectPing(
            seq=r.uint("seq"),
            target=r.string(MAX_NAME, "target"),
            target_addr=r.string(MAX_NAME, "target_addr"),
            source=r.string(MAX_NAME, "source"),
            source_addr=r.string(MAX_NAME, "source_addr"),
            nack=r.boolean("nack"),
        )
    elif code == MsgType.ACK:
        msg = Ack(r.uint("seq"))
    elif code == MsgType.NACK:
        msg = Nack(r.uint("seq"))
    elif code == MsgType.SUSPECT:
        msg = Suspect(
            r.uint("incarnation"), r.string(MAX_NAME, "node"), r.string(MAX_NAME, "source")
        )
    elif code == MsgType.ALIVE:
        msg = Alive(
            incarnation=r.uint("incarnation"),
            node=r.string(MAX_NAME, "node"),
            addr=r.string(MAX_NAME, "addr"),
            meta=r.member_meta(),
        )
    elif code == MsgType.DEAD:
        msg = Dead(r.uint("incarnation"), r.string(MAX_NAME, "node"), r.string(MAX_NAME, "source"))
    elif code == MsgType.RECORDS:
        msg = Records(_r_records(r))
    elif code == MsgType.PUSH_PULL:
        msg = _r_push_pull(r)
    elif code == MsgType.KEYRING_REQUEST:
        request_id = r.uint("id")
        op = r.u8("keyring op")
        if op not in KeyringOp._value2member_map_:
            raise DecodeError(f"unknown keyring op {op}")
        msg = KeyringRequest(request_id, KeyringOp(op), r.string(MAX_NAME, "key"),
                             r.string(MAX_NAME, "origin_addr"))  # fmt: skip
    elif code == MsgType.KEYRING_RESPONSE:
        request_id = r.uint("id")
        node = r.string(MAX_NAME, "node")
        ok = r.boolean("ok")
        error = r.string(MAX_NAME, "error")
        keys = tuple(r.string(MAX_NAME, "key") for _ in range(r.count(MAX_KEYS, "keys", 1)))
        msg = KeyringResponse(request_id, node, ok, error, keys)
    elif code == MsgType.COMPOUND:
        raise DecodeError("a compound message where one message was expected")
    else:
        raise DecodeError(f"unknown message type {code}")
    if r.left():
        raise DecodeError(f"{r.left()} trailing bytes after {MsgType(code).name}")
    return msg


def decode(data: bytes) -> Message:
    """Parse exactly one message (not a compound).

    Raises:
        DecodeError: anything wrong with ``data``; never another exception.
    """
    if len(data) > MAX_TCP_FRAME:
        raise DecodeError(f"a message of {len(data)} bytes, more than {MAX_TCP_FRAME}")
    return _r_message(_Reader(bytes(data)))


# --- compound messages ----------------------------------------------------------------


def encode_compound(parts: Sequence[bytes]) -> bytes:
    """Pack encoded messages into one: ``[COMPOUND][n][n x u16 length][parts]``.

    memberlist sends a compound when several messages fit one UDP packet; the
    caller keeps the result within ``UDP_PACKET_BUDGET`` (the compound costs
    ``COMPOUND_HEADER`` bytes, and each part ``COMPOUND_OVERHEAD`` more).

    Raises:
        LocalProtocolError: no parts or more than 255, an empty, oversized or
            compound part.
    """
    if not 1 <= len(parts) <= MAX_COMPOUND_PARTS:
        raise _refuse(f"a compound holds 1..{MAX_COMPOUND_PARTS} messages, got {len(parts)}")
    out = bytearray((MsgType.COMPOUND, len(parts)))
    for part in parts:
        if not part or len(part) > MAX_COMPOUND_PART_SIZE:
            raise _refuse(f"a compound part is 1..{MAX_COMPOUND_PART_SIZE} bytes, got {len(part)}")
        if part[0] == MsgType.COMPOUND:
            raise _refuse("compounds do not nest")
        out += _U16.pack(len(part))
    for part in parts:
        out += part
    return bytes(out)


def decode_compound(data: bytes) -> list[bytes]:
    """Split a compound message into its parts (still encoded).

    Raises:
        DecodeError: not a compound, no parts, truncated, or trailing bytes.
    """
    r = _Reader(bytes(data))
    if r.u8("message type") != MsgType.COMPOUND:
        raise DecodeError("not a compound message")
    n = r.u8("compound count")
    if n == 0:
        raise DecodeError("a compound message with no parts")
    lengths = [r.u16("compound part length") for _ in range(n)]
    parts = [r.take(size, "compound part") for size in lengths]
    if r.left():
        raise DecodeError(f"{r.left()} trailing bytes after a compound message")
    return parts


def decode_packet(data: bytes) -> list[Message]:
    """The messages in one frame's payload: a single message or a compound of them.

    Raises:
        DecodeError: anything wrong in the packet or any part (the whole packet
            is dropped: its parts came from one sender in one datagram).
    """
    if data[:1] == bytes((MsgType.COMPOUND,)):
        return [decode(part) for part in decode_compound(data)]
    return [decode(data)]


# --- frames -----------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """``[PROTOCOL_VERSION][CRC32(payload) u32][payload]``, for a datagram or a TCP frame.

    Raises:
        LocalProtocolError: ``payload`` is larger than ``MAX_TCP_FRAME``.
    """
    if len(payload) > MAX_TCP_FRAME:
        raise _refuse(f"a frame payload of {len(payload)} bytes, more than {MAX_TCP_FRAME}")
    return bytes((PROTOCOL_VERSION,)) + _U32.pack(zlib.crc32(payload)) + payload


def unframe(data: bytes) -> bytes:
    """The payload of a frame, after checking its version and CRC.

    Raises:
        DecodeError: too short or too long, another protocol version, or a CRC mismatch.
    """
    if len(data) < FRAME_OVERHEAD:
        raise DecodeError(f"a frame of {len(data)} bytes, shorter than its header")
    if len(data) > FRAME_OVERHEAD + MAX_TCP_FRAME:
        raise DecodeError(f"a frame of {len(data)} bytes, more than {MAX_TCP_FRAME} of payload")
    if data[0] != PROTOCOL_VERSION:
        raise DecodeError(f"protocol version {data[0]}, expected {PROTOCOL_VERSION}")
    payload = bytes(data[FRAME_OVERHEAD:])
    (crc,) = _U32.unpack(data[1:FRAME_OVERHEAD])
    if zlib.crc32(payload) != crc:
        raise DecodeError("CRC32 mismatch")
    return payload

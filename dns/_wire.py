"""DNS wire format: a strict, bounded parser for queries and small reply helpers.

Only what a resolver needs from a query is parsed (RFC 1035 section 4.1,
EDNS0 from RFC 6891): the header, one question and at most one OPT record.
Anything else is refused with FORMERR, or dropped when no sane reply exists
(too short to carry an ID, or a response sent to us: answering responses is
how reflection loops start). Sans-IO: bytes in, values out.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "HEADER_SIZE",
    "MAX_NAME",
    "MAX_QUERY_SIZE",
    "Drop",
    "FormatError",
    "QType",
    "Query",
    "Rcode",
    "error_reply",
    "parse_query",
]

#: Size of the fixed DNS header (RFC 1035 4.1.1).
HEADER_SIZE = 12
#: Longest domain name in wire form (RFC 1035 2.3.4).
MAX_NAME = 255
#: Longest label (RFC 1035 2.3.4).
MAX_LABEL = 63
#: Longest query we read: header + longest name + type/class + an OPT record
#: with options (cookies are 40 bytes); anything longer is not a real query.
MAX_QUERY_SIZE = 1024

_FLAG_QR = 0x8000
_FLAG_RD = 0x0100
_OPCODE_MASK = 0x7800
_TYPE_OPT = 41


class Rcode(enum.IntEnum):
    """Response codes (RFC 1035 4.1.1, RFC 6891 for BADVERS). ONLY APPEND."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16


class QType(enum.IntEnum):
    """The query types the resolver knows by name. ONLY APPEND."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    OPT = 41
    ANY = 255


class Drop(Exception):
    """The packet gets no reply; ``reason`` names the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FormatError(Exception):
    """The query is malformed: reply FORMERR (or ``rcode``) to ``query_id``."""

    def __init__(self, query_id: int, flags: int, reason: str, rcode: Rcode = Rcode.FORMERR):
        super().__init__(reason)
        self.query_id = query_id
        self.flags = flags
        self.reason = reason
        self.rcode = rcode


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query."""

    id: int
    flags: int
    labels: tuple[bytes, ...]  # the name's labels as sent (case kept)
    question: bytes  # the question section as sent: name, type, class
    qtype: int
    qclass: int
    edns_size: int | None  # the client's UDP payload size; None without EDNS0
    edns_do: bool  # DNSSEC OK bit

    @property
    def rd(self) -> bool:
        return bool(self.flags & _FLAG_RD)

    @property
    def name(self) -> str:
        """The name in lower case, dot-separated, without the trailing dot.

        Only ASCII letters are folded (RFC 4343); other bytes map to latin-1.
        """
        return b".".join(self.labels).lower().decode("latin-1")


def _read_name(data: bytes, pos: int, query_id: int, flags: int) -> tuple[tuple[bytes, ...], int]:
    labels: list[bytes] = []
    total = 1
    while True:
        if pos >= len(data):
            raise FormatError(query_id, flags, "name runs past the end")
        length = data[pos]
        if length == 0:
            return tuple(labels), pos + 1
        if length & 0xC0:
            # A compression pointer in a query's only name can point nowhere
            # valid (only the header precedes it); refusing them also rules
            # out pointer loops.
            raise FormatError(query_id, flags, "compression pointer in question")
        if length > MAX_LABEL:  # pragma: no cover - 0x40..0x7f are caught above
            raise FormatError(query_id, flags, "label too long")
        total += length + 1
        if total > MAX_NAME:
            raise FormatError(query_id, flags, "name longer than 255 bytes")
        end = pos + 1 + length
        if end > len(data):
            raise FormatError(query_id, flags, "label runs past the end")
        labels.append(data[pos + 1 : end])
        pos = end


def parse_query(data: bytes) -> Query:
    """Parse a query.

    Raises:
        Drop: no reply should be sent (short packet, a response, oversized).
        FormatError: reply with its rcode (FORMERR, NOTIMP or BADVERS).
    """
    if len(data) < HEADER_SIZE:
        raise Drop("short")
    if len(data) > MAX_QUERY_SIZE:
        raise Drop("oversized")
    query_id, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", data)
    if flags & _FLAG_QR:
        raise Drop("response")
    if flags & _OPCODE_MASK:
        raise FormatError(query_id, flags, "only QUERY is implemented", Rcode.NOTIMP)
    if qdcount != 1:
        raise FormatError(query_id, flags, f"QDCOUNT is {qdcount}, not 1")
    if ancount or nscount or arcount > 1:
        raise FormatError(query_id, flags, "unexpected records in a query")
    labels, pos = _read_name(data, HEADER_SIZE, query_id, flags)
    if pos + 4 > len(data):
        raise FormatError(query_id, flags, "question truncated")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    question = data[HEADER_SIZE : pos + 4]
    pos += 4
    edns_size = None
    edns_do = False
    if arcount:
        if pos + 11 > len(data) or data[pos] != 0:
            raise FormatError(query_id, flags, "additional record is not an OPT record")
        rtype, size, _ext_rcode, version, edns_flags, rdlen = struct.unpack_from(
            "!HHBBHH", data, pos + 1
        )
        if rtype != _TYPE_OPT:
            raise FormatError(query_id, flags, "additional record is not an OPT record")
        pos += 11 + rdlen
        if pos > len(data):
            raise FormatError(query_id, flags, "OPT record truncated")
        if version != 0:
            raise FormatError(query_id, flags, f"EDNS version {version}", Rcode.BADVERS)
        edns_size = max(size, 512)  # RFC 6891 6.2.5: below 512 means 512
        edns_do = bool(edns_flags & 0x8000)
    if pos != len(data):
        raise FormatError(query_id, flags, "trailing bytes after the query")
    return Query(query_id, flags, labels, question, qtype, qclass, edns_size, edns_do)


def error_reply(
    query_id: int, flags: int, rcode: Rcode, question: bytes = b"", edns_size: int | None = None
) -> bytes:
    """A reply with no records: ``rcode`` (BADVERS goes in the OPT record)."""
    out_flags = _FLAG_QR | (flags & (_FLAG_RD | _OPCODE_MASK)) | (int(rcode) & 0xF)
    arcount = 1 if edns_size is not None or rcode is Rcode.BADVERS else 0
    head = struct.pack("!6H", query_id, out_flags, 1 if question else 0, 0, 0, arcount)
    if not arcount:
        return head + question
    # OPT: root name, type 41, class = our payload size, TTL = ext-rcode|version|flags.
    opt = b"\x00" + struct.pack("!HHBBHH", _TYPE_OPT, edns_size or 512, int(rcode) >> 4, 0, 0, 0)
    return head + question + opt

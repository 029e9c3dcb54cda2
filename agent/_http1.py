"""Sans-IO HTTP/1.1 pieces for the proxy: strict head parsing and body framing.

The proxy forwards bytes, not objects: a head is validated and split into
``(lowercase name, value)`` pairs once, and forwarded by joining the original
lines it keeps, so nothing is re-serialised. Bodies are forwarded as they
arrive; :class:`ChunkedScanner` only tracks where a chunked body ends (chunk
sizes, extensions and trailers pass through untouched).

Parsing follows RFC 9112 strictly, because a proxy that reads a message
differently from its upstream is a request-smuggling hole (RFC 9112 §11.2):
obs-fold, bare CR or LF, invalid field names or values, conflicting
Content-Length/Transfer-Encoding and unknown transfer codings are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "HOP_BY_HOP",
    "MAX_CHUNK_LINE",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_REQUEST_LINE",
    "ChunkedScanner",
    "Head",
    "HttpError",
    "body_framing",
    "find_head_end",
    "parse_request_head",
    "parse_response_head",
    "response_framing",
]

#: Longest request line; nginx's default large_client_header_buffers is 8 KiB.
#: Longer gets 414 (RFC 9112 §3 recommends supporting at least 8,000 octets).
MAX_REQUEST_LINE = 8 * 1024
#: Whole head (request line + fields); larger gets 431 (RFC 6585 §5). nginx
#: allows 4 x 8 KiB by default.
MAX_HEAD_BYTES = 32 * 1024
#: Field lines per head; more gets 431 (Go and Envoy cap near 100).
MAX_HEADERS = 100
#: Longest chunk-size line with extensions; a chunk size needs 16 hex digits.
MAX_CHUNK_LINE = 4 * 1024
#: Longest trailer section.
MAX_TRAILERS = 16 * 1024

#: RFC 9110 §7.6.1 connection-specific fields, plus the de-facto Keep-Alive and
#: Proxy-Connection; never forwarded (Connection may name more).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# field-value: visible chars, obs-text, SP and HTAB; no CR, LF or other CTLs.
# Possessive and greedy: no backtracking (a lazy value with a trailing-space
# group cost more than the rest of parsing); trailing SP/HTAB is stripped after.
_FIELD = re.compile(rb"(" + _TOKEN + rb"+):[ \t]*+([\t\x20-\x7e\x80-\xff]*+)\r\n")
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb"+:[\t\x20-\x7e\x80-\xff]*+\r\n)*+")
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) (HTTP/1\.[01])")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class HttpError(Exception):
    """A message the proxy refuses: answer ``status`` with ``reason`` and close.

    ``reason`` is a short slug for the ``hostmesh-error`` header and metrics.
    """

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason


@dataclass(slots=True)
class Head:
    """A parsed request or response head.

    ``lines`` are the original field lines (no CRLF) parallel to ``fields``,
    so a proxy forwards the ones it keeps without re-encoding them.
    """

    start: bytes  # the request or status line
    method: bytes  # request only (b"" for responses)
    target: bytes  # request only
    version: bytes  # b"HTTP/1.1" or b"HTTP/1.0"
    status: int  # response only (0 for requests)
    fields: list[tuple[bytes, bytes]]  # (lowercase name, value)
    lines: list[bytes]
    framing: tuple[str, int] | None = None  # body_framing()'s answer, once a caller asked

    def get(self, name: bytes) -> bytes | None:
        """The first value of field ``name`` (lowercase), or None."""
        for k, v in self.fields:
            if k == name:
                return v
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.fields if k == name]

    def connection_tokens(self) -> set[bytes]:
        """Lowercase tokens of every Connection field."""
        out: set[bytes] = set()
        for k, v in self.fields:
            if k == b"connection":
                out.update(t.strip().lower() for t in v.split(b","))
        return out


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line that ends a head in ``buf``, or -1."""
    i = buf.find(b"\r\n\r\n", start)
    return -1 if i < 0 else i + 4


def _fields(block: bytes) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """Split the field section (each line ending in CRLF) into pairs and raw lines."""
    if _FIELDS.fullmatch(block) is None:
        raise HttpError(400, "bad-header", "invalid header field (name, value or line folding)")
    pairs = [(name.lower(), value.rstrip(b" \t")) for name, value in _FIELD.findall(block)]
    if len(pairs) > MAX_HEADERS:
        raise HttpError(431, "headers-too-large", f"more than {MAX_HEADERS} header fields")
    return pairs, block[:-2].split(b"\r\n") if block else []


def parse_request_head(head: bytes) -> Head:
    """Parse a request head (``head`` includes the final blank line).

    Raises:
        HttpError: 400 malformed, 414 request line too long, 431 head too large.
    """
    line_end = head.find(b"\r\n")
    if line_end > MAX_REQUEST_LINE:
        raise HttpError(414, "uri-too-long", "request line too long")
    if len(head) > MAX_HEAD_BYTES:
        raise HttpError(431, "headers-too-large", "request header section too large")
    start = head[:line_end]
    m = _REQUEST_LINE.fullmatch(start)
    if m is None:
        raise HttpError(400, "bad-request-line", "malformed request line")
    fields, lines = _fields(head[line_end + 2 : -2])
    method, target, version = m.groups()
    return Head(start, method, target, version, 0, fields, lines)


def parse_response_head(head: bytes) -> Head:
    """Parse a response head from an upstream.

    Raises:
        HttpError: 502 for anything malformed or oversized (the upstream's fault).
    """
    if len(head) > MAX_HEAD_BYTES:
        raise HttpError(502, "bad-upstream-response", "upstream header section too large")
    line_end = head.find(b"\r\n")
    start = head[:line_end]
    m = _STATUS_LINE.fullmatch(start)
    if m is None:
        raise HttpError(502, "bad-upstream-response", "malformed upstream status line")
    try:
        fields, lines = _fields(head[line_end + 2 : -2])
    except HttpError as exc:
        raise HttpError(502, "bad-upstream-response", f"upstream: {exc.detail}") from None
    version, status = m.groups()
    return Head(start, b"", b"", version, int(status), fields, lines)


#: Body framing: ("length", n), ("chunked", 0), ("close", 0) (response only), ("none", 0)
Framing = tuple[str, int]


def body_framing(head: Head, *, status_error: int = 400) -> Framing:
    """How a message body is delimited (RFC 9112 §6.3).

    Refuses what a smuggler sends: Transfer-Encoding with Content-Length,
    a transfer coding other than a single ``chunked``, or Content-Length
    values that differ or are not plain digits.

    Raises:
        HttpError: with ``status_error`` (400 for requests, 502 for responses),
        or 501 for a request with an unsupported transfer coding.
    """
    if head.framing is not None:
        return head.framing
    head.framing = _body_framing(head, status_error)
    return head.framing


def _body_framing(head: Head, status_error: int) -> Framing:
    te: list[bytes] = []
    cl: list[bytes] = []
    for k, v in head.fields:
        if k == b"transfer-encoding":
            te.append(v)
        elif k == b"content-length":
            cl.append(v)
    if te:
        if cl:
            raise HttpError(
                status_error, "bad-framing", "both Transfer-Encoding and Content-Length"
            )
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        if codings != [b"chunked"]:
            if codings and codings[-1] == b"chunked" and status_error == 400:
                raise HttpError(501, "unsupported-transfer-coding", "only chunked is supported")
            raise HttpError(status_error, "bad-framing", "unsupported Transfer-Encoding")
        if head.version == b"HTTP/1.0":
            raise HttpError(status_error, "bad-framing", "Transfer-Encoding in HTTP/1.0")
        return ("chunked", 0)
    if cl:
        values = {c.strip() for v in cl for c in v.split(b",")}
        if len(values) != 1:
            raise HttpError(status_error, "bad-framing", "conflicting Content-Length values")
        (value,) = values
        if _DIGITS.fullmatch(value) is None:
            raise HttpError(status_error, "bad-framing", "invalid Content-Length")
        return ("length", int(value))
    return ("none", 0)


def response_framing(head: Head, request_method: bytes) -> Framing:
    """Framing of a response to ``request_method`` (RFC 9112 §6.3 rules 1-7)."""
    status = head.status
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return ("none", 0)
    framing = body_framing(head, status_error=502)
    if framing[0] == "none":
        return ("close", 0)  # read until the upstream closes
    return framing


class ChunkedScanner:
    """Finds the end of a chunked body in a byte stream, without copying it.

    Feed each piece of the body as it arrives; :meth:`feed` returns the
    number of bytes that belong to the body (all of ``data`` until the end is
    seen; then the position just past the final CRLF), and :attr:`done`
    turns True. Bytes after the end belong to the next message.
    """

    __slots__ = ("_line", "_need", "_state", "_trailer_bytes", "done")

    # states: 0 size line, 1 chunk data, 2 CRLF after data, 3 trailer section
    def __init__(self) -> None:
        self._state = 0
        self._need = 0  # data bytes left in the current chunk
        self._line = b""  # partial size/trailer line
        self._trailer_bytes = 0
        self.done = False

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume ``data``; return how many bytes of it are body.

        Raises:
            HttpError: 400 for a malformed chunked body.
        """
        pos = 0
        n = len(data)
        while pos < n and not self.done:
            state = self._state
            if state == 1:
                take = min(self._need, n - pos)
                pos += take
                self._need -= take
                if self._need == 0:
                    self._state = 2
                    self._line = b""
                continue
            # line-oriented states: size line (0), CRLF after data (2), trailers (3)
            end = bytes(data[pos : pos + MAX_CHUNK_LINE + 2]).find(b"\n")
            if end < 0:
                self._line += bytes(data[pos:n])
                if len(self._line) > MAX_CHUNK_LINE + 1:  # the line and its CR, LF still to come
                    raise HttpError(400, "bad-chunk", "chunk line too long")
                return n
            line = self._line + bytes(data[pos : pos + end + 1])
            pos += end + 1
            self._line = b""
            if len(line) > MAX_CHUNK_LINE + 2 or not line.endswith(b"\r\n"):
                raise HttpError(400, "bad-chunk", "chunk line not ended by CRLF")
            if state == 2:
                if line != b"\r\n":
                    raise HttpError(400, "bad-chunk", "chunk data longer than its size")
                self._state = 0
            elif state == 0:
                size_text = line[:-2].split(b";", 1)[0].rstrip(b" \t")
                if _HEX.fullmatch(size_text) is None:
                    raise HttpError(400, "bad-chunk", "invalid chunk size")
                size = int(size_text, 16)
                if size == 0:
                    self._state = 3
                else:
                    self._need = size
                    self._state = 1
            else:  # trailer section ends at an empty line
                if line == b"\r\n":
                    self.done = True
                else:
                    self._trailer_bytes += len(line)
                    if self._trailer_bytes > MAX_TRAILERS:
                        raise HttpError(431, "headers-too-large", "trailer section too large")
                    if _FIELDS.fullmatch(line) is None:
                        raise HttpError(400, "bad-chunk", "invalid trailer field")
        return pos

"""Sans-IO HTTP/1.1 pieces for the proxy: strict head parsing and body framing.

The proxy forwards bytes, not objects: a head is validated in one regex
match and kept as its bytes with a lowercase copy, where the fields the
proxy decides on are found by byte search (:class:`Head`); what it forwards
is the original bytes minus the lines it drops, so nothing is re-serialised.
In CPython every call into a builtin costs about a thousand instructions,
so the usual head takes few of them. Bodies are forwarded as they
arrive; :class:`ChunkedScanner` only tracks where a chunked body ends (chunk
sizes, extensions and trailers pass through untouched).

Parsing follows RFC 9112 strictly, because a proxy that reads a message
differently from its upstream is a request-smuggling hole (RFC 9112 §11.2):
obs-fold, bare CR or LF, invalid field names or values, conflicting
Content-Length/Transfer-Encoding and unknown transfer codings are refused.
"""

from __future__ import annotations

import re
import sys

__all__ = [
    "HOP_BY_HOP",
    "MAX_CHUNK_LINE",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_REQUEST_LINE",
    "MESH_PREFIX",
    "USUAL_REQUEST",
    "USUAL_RESPONSE",
    "ChunkedScanner",
    "Head",
    "HttpError",
    "body_framing",
    "find_head_end",
    "framing_from_fields",
    "parse_request_head",
    "parse_response_head",
    "response_framing",
    "usual_request",
    "usual_response",
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
#: Request fields besides the hop-by-hop ones that change what the proxy does:
#: Host and framing are read, Expect answered, X-Forwarded-For and
#: traceparent edited.
_REQUEST_DECIDING = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-for", b"traceparent"}
)
#: Mesh headers (the mTLS hop's source identity and destination); a local
#: client may never set them.
MESH_PREFIX = b"hostmesh-"

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: How a group of field lines repeats: possessive (``*+``), the cheapest, where
#: it is right. CPython before 3.11.5 (Debian 12's python3 is 3.11.2) mis-matches
#: a possessive repeat of a group: it ends a match inside a line, and one of a
#: group holding a lookahead fails to match at all (CPython gh-106052 and
#: gh-100061), so no request head was "usual" there and every request took the
#: general path. There the plain greedy repeat, which matches the same heads
#: (each part of a line is possessive, and a line matches one way only).
_LINES = rb"*+" if sys.version_info >= (3, 11, 5) else rb"*"
# field-value: visible chars, obs-text, SP and HTAB; no CR, LF or other CTLs.
# Possessive and greedy: no backtracking (a lazy value with a trailing-space
# group cost more than the rest of parsing); trailing SP/HTAB is stripped after.
_FIELD = re.compile(rb"(" + _TOKEN + rb"+):[ \t]*+([\t\x20-\x7e\x80-\xff]*+)\r\n")
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb"+:[\t\x20-\x7e\x80-\xff]*+\r\n)" + _LINES)
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) (HTTP/1\.[01])")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-9][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# A whole head in one match (each regex call has a fixed cost of a few thousand
# instructions): start line, field lines, blank line. Only when it fails are
# the parts matched one by one, to name the fault.
_REQUEST_HEAD = re.compile(_REQUEST_LINE.pattern + rb"\r\n" + _FIELDS.pattern + rb"\r\n")
_RESPONSE_HEAD = re.compile(_STATUS_LINE.pattern + rb"\r\n" + _FIELDS.pattern + rb"\r\n")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


def _plain_field(excluded: frozenset[bytes]) -> bytes:
    """A field line whose name does not start with one of ``excluded`` (any case), nor
    with ``hostmesh-``. Names are grouped by first letter: sre tries alternatives one
    by one, so a line costs a test per first letter, not per name. Each first letter
    is a class (``[cC]``) outside the ignore-case group: sre skips a branch whose
    first class does not match without entering it, which it does not do for an
    ignore-case letter (about 6% of the response pattern's cost). The names start with a
    letter."""
    first: dict[bytes, list[bytes]] = {}
    for name in sorted(excluded | {MESH_PREFIX}):
        first.setdefault(name[:1], []).append(re.escape(name[1:]))
    names = b"|".join(b"[" + c.lower() + c.upper() + b"](?i:" + b"|".join(rest) + b")"
                      for c, rest in first.items())  # fmt: skip
    return rb"(?!" + names + rb")" + _TOKEN + rb"+:[\t\x20-\x7e\x80-\xff]*+\r\n"


#: The usual request, validated and read in one match: origin form, HTTP/1.1,
#: a method other than HEAD, one Host (group 3) and no field the proxy acts on
#: (framing, hop-by-hop, Expect, X-Forwarded-For, traceparent, mesh fields)
#: but ``Connection: keep-alive`` as httpx, requests and Java write it. Such a
#: head is forwarded as it came, without that line, plus two fields. What does
#: not match takes :func:`parse_request_head` and the general path; a head this
#: matches parses there to the same method, target and Host
#: (tests/test_proxy_heads.py).
_KEEP_ALIVE = rb"|Connection: keep-alive\r\n"
_PLAIN_REQUEST_FIELD = _plain_field(HOP_BY_HOP | _REQUEST_DECIDING) + _KEEP_ALIVE
USUAL_REQUEST = re.compile(
    rb"(?!HEAD )(%s) (/[\x21-\x7e\x80-\xff]*+) HTTP/1\.1\r\n(?:%s)%s"
    rb"(?i:host):[ \t]*+([\x21-\x7e\x80-\xff]++)[ \t]*+\r\n(?:%s)%s\r\n"
    % (_TOKEN, _PLAIN_REQUEST_FIELD, _LINES, _PLAIN_REQUEST_FIELD, _LINES)
)
#: The usual response: HTTP/1.1, a status from 200 to 599 (group 1), one
#: Content-Length of digits (group 2), and no hop-by-hop field but
#: ``Connection: keep-alive`` as nginx, Node and Apache write it (the proxy
#: cuts that line). The caller still refuses 204 and 304, whose
#: Content-Length frames no body. Anything else takes
#: :func:`parse_response_head`; what this matches parses there to the same
#: status and framing.
_PLAIN_RESPONSE_FIELD = _plain_field(HOP_BY_HOP | {b"content-length"}) + _KEEP_ALIVE
USUAL_RESPONSE = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*+)?\r\n(?:%s)%s"
    rb"(?i:content-length):[ \t]*+([0-9]{1,18})[ \t]*+\r\n(?:%s)%s\r\n"
    % (_PLAIN_RESPONSE_FIELD, _LINES, _PLAIN_RESPONSE_FIELD, _LINES)
)
_NO_TOKENS: frozenset[bytes] = frozenset()
#: Connection values as almost every message sends them, to their token sets.
_COMMON_TOKENS = {t: frozenset({t}) for t in (b"keep-alive", b"close", b"upgrade")}
_CONNECTION = b"\r\nconnection:"
_NONE: tuple[str, int] = ("none", 0)
# Shortest head with more than MAX_HEADERS fields ("a:" and CRLF each): shorter
# ones need no count. (Note: ``bytes in bytes`` costs twice ``find`` in CPython
# 3.11, which tries the needle as an int first; hot paths use ``find``.)
_MIN_TOO_MANY = 4 * (MAX_HEADERS + 1)
# Where fields start in a head's lowercase copy (see Head).
_TE = b"\r\ntransfer-encoding:"
_CL = b"\r\ncontent-length:"


class HttpError(Exception):
    """A message the proxy refuses: answer ``status`` with ``reason`` and close.

    ``reason`` is a short slug for the ``hostmesh-error`` header and metrics.
    """

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason


class Head:
    """A parsed request or response head, kept as its bytes.

    ``raw`` is the whole head (start line to blank line) and ``low`` its
    lowercase copy. A field section that passed validation has a CRLF before
    every field line and none inside one, so ``b"\\r\\n" + name + b":"`` in
    ``low`` finds exactly the lines of field ``name``: lookups, framing and
    dropping hop-by-hop fields are byte searches, with no per-field objects.
    ``fields`` (``(lowercase name, value)`` pairs) and ``lines`` (the
    original field lines, no CRLF) are built on first use.
    """

    __slots__ = ("_fields", "_lines", "framing", "line_end", "low", "method", "raw", "status",
                 "target", "version")  # fmt: skip

    def __init__(self, raw: bytes, line_end: int, method: bytes, target: bytes, version: bytes,
                 status: int) -> None:  # fmt: skip
        self.raw = raw
        self.low = raw.lower()
        self.line_end = line_end  # index of the CRLF that ends the start line
        self.method = method  # request only (b"" for responses)
        self.target = target  # request only
        self.version = version  # b"HTTP/1.1" or b"HTTP/1.0"
        self.status = status  # response only (0 for requests)
        self.framing: tuple[str, int] | None = None  # body_framing()'s answer, once asked
        self._fields: list[tuple[bytes, bytes]] | None = None
        self._lines: list[bytes] | None = None

    @property
    def start(self) -> bytes:
        """The request or status line."""
        return self.raw[: self.line_end]

    @property
    def section(self) -> bytes:
        """The field lines, each after a CRLF (``b""`` when there is none)."""
        return self.raw[self.line_end : -4] if len(self.raw) > self.line_end + 4 else b""

    @property
    def fields(self) -> list[tuple[bytes, bytes]]:
        """``(lowercase name, value)`` per field line, in order."""
        if self._fields is None:
            self._fields = [
                (name.lower(), value.rstrip(b" \t"))
                for name, value in _FIELD.findall(self.raw, self.line_end + 2, len(self.raw) - 2)
            ]
        return self._fields

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """:attr:`fields`, as a call (for code that reads them only sometimes)."""
        return self.fields

    @property
    def lines(self) -> list[bytes]:
        """The original field lines (no CRLF), parallel to :attr:`fields`."""
        if self._lines is None:
            section = self.section
            self._lines = section[2:].split(b"\r\n") if section else []
        return self._lines

    def has(self, name: bytes) -> bool:
        """Is there a field ``name`` (lowercase)?"""
        return self.low.find(b"\r\n" + name + b":") >= 0

    def get(self, name: bytes) -> bytes | None:
        """The first value of field ``name`` (lowercase), or None."""
        key = b"\r\n" + name + b":"
        i = self.low.find(key)
        if i < 0:
            return None
        i += len(key)
        return self.raw[i : self.low.find(b"\r\n", i)].strip(b" \t")

    def get_all(self, name: bytes) -> list[bytes]:
        """Every value of field ``name`` (lowercase), in order."""
        return self._values(name, self.raw)

    def _values(self, name: bytes, source: bytes) -> list[bytes]:
        key = b"\r\n" + name + b":"
        low = self.low
        out = []
        i = low.find(key)
        while i >= 0:
            i += len(key)
            end = low.find(b"\r\n", i)
            out.append(source[i:end].strip(b" \t"))
            i = low.find(key, end)
        return out

    def connection_tokens(self) -> frozenset[bytes]:
        """Lowercase tokens of every Connection field."""
        low = self.low
        at = low.find(_CONNECTION)
        if at < 0:
            return _NO_TOKENS
        at += len(_CONNECTION)
        end = low.find(b"\r\n", at)
        if low.find(_CONNECTION, end) < 0:  # one Connection field: usually one common token
            tokens = _COMMON_TOKENS.get(low[at:end].strip(b" \t"))
            if tokens is not None:
                return tokens
        return frozenset(
            t.strip(b" \t") for v in self._values(b"connection", self.low) for t in v.split(b",")
        )


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line that ends a head in ``buf``, or -1."""
    i = buf.find(b"\r\n\r\n", start)
    return -1 if i < 0 else i + 4


def _field_count(data: bytes, end: int) -> int:
    """Field lines of the head ``data[:end]`` (its CRLFs less the start line's and the blank
    line's); heads up to :data:`_MIN_TOO_MANY` bytes need no count."""
    return data.count(b"\r\n", 0, end) - 2


def _check_fields(head: bytes, line_end: int) -> None:
    """Validate the field section of ``head`` (its lines, after the start line).

    Raises:
        HttpError: 400 invalid field line (name, value, folding), 431 too many.
    """
    if _FIELDS.fullmatch(head, line_end + 2, len(head) - 2) is None:
        raise HttpError(400, "bad-header", "invalid header field (name, value or line folding)")
    if _field_count(head, len(head)) > MAX_HEADERS:
        raise HttpError(431, "headers-too-large", f"more than {MAX_HEADERS} header fields")


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
    m = _REQUEST_HEAD.fullmatch(head)
    if m is not None:
        if len(head) > _MIN_TOO_MANY and _field_count(head, len(head)) > MAX_HEADERS:
            raise HttpError(431, "headers-too-large", f"more than {MAX_HEADERS} header fields")
    else:
        m = _REQUEST_LINE.fullmatch(head, 0, line_end)
        if m is None:
            raise HttpError(400, "bad-request-line", "malformed request line")
        _check_fields(head, line_end)
    method, target, version = m.group(1, 2, 3)
    return Head(head, line_end, method, target, version, 0)


def parse_response_head(head: bytes) -> Head:
    """Parse a response head from an upstream.

    Raises:
        HttpError: 502 for anything malformed or oversized (the upstream's fault).
    """
    if len(head) > MAX_HEAD_BYTES:
        raise HttpError(502, "bad-upstream-response", "upstream header section too large")
    line_end = head.find(b"\r\n")
    m = _RESPONSE_HEAD.fullmatch(head)
    if m is None or (len(head) > _MIN_TOO_MANY and _field_count(head, len(head)) > MAX_HEADERS):
        m = _STATUS_LINE.fullmatch(head, 0, line_end)
        if m is None:
            raise HttpError(502, "bad-upstream-response", "malformed upstream status line")
        try:
            _check_fields(head, line_end)
        except HttpError as exc:
            raise HttpError(502, "bad-upstream-response", f"upstream: {exc.detail}") from None
    version, status = m.group(1, 2)
    return Head(head, line_end, b"", b"", version, int(status))


def usual_request(head: bytes) -> re.Match[bytes] | None:
    """:data:`USUAL_REQUEST`'s match of a whole request head, within the limits
    :func:`parse_request_head` enforces; None: parse it there."""
    if len(head) > _MIN_TOO_MANY and (
        len(head) > MAX_REQUEST_LINE or _field_count(head, len(head)) > MAX_HEADERS
    ):
        return None
    return USUAL_REQUEST.fullmatch(head)


def usual_response(data: bytes) -> re.Match[bytes] | None:
    """:data:`USUAL_RESPONSE`'s match of the head ``data`` starts with (its ``end()`` just
    past the blank line), within :func:`parse_response_head`'s limits; None: parse it
    there."""
    m = USUAL_RESPONSE.match(data)
    if (
        m is not None
        and (end := m.end()) > _MIN_TOO_MANY
        and (end > MAX_HEAD_BYTES or _field_count(data, end) > MAX_HEADERS)
    ):
        return None
    return m


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
    framing = head.framing
    if framing is None:
        framing = head.framing = _body_framing(head, status_error)
    return framing


def _body_framing(head: Head, status_error: int) -> Framing:
    low = head.low
    if low.find(_TE) < 0:
        at = low.find(_CL)
        if at < 0:
            return _NONE
        at += len(_CL)
        end = low.find(b"\r\n", at)
        value = low[at:end].strip(b" \t")
        # one Content-Length field of plain digits (bytes.isdigit: ASCII only), the usual
        if value.isdigit() and len(value) <= 18 and low.find(_CL, end) < 0:
            return ("length", int(value))
    return framing_from_fields(head, status_error)


def framing_from_fields(head: Head, status_error: int = 400) -> Framing:
    """:func:`body_framing` from every Transfer-Encoding and Content-Length value: the
    general case, and the reference its shortcut for the usual message is tested against."""
    te = head.get_all(b"transfer-encoding")
    cl = head.get_all(b"content-length")
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
        return _NONE
    framing = head.framing or body_framing(head, status_error=502)
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

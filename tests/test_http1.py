"""The sans-IO HTTP/1.1 layer of the proxy: strict heads, body framing, chunked ends.

A proxy that reads a message differently from its upstream is a
request-smuggling hole, so every refusal is checked with the status and the
reason slug a client (or the metrics) would see. Chunked bodies are fed whole,
one byte at a time and split at every position: where a body ends must not
depend on how TCP cut it up.

The fuzz examples are derandomized so CI runs the same cases every time; set
HOSTMESH_FUZZ_RANDOM=1 to explore new ones.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.agent._http1 import (
    MAX_CHUNK_LINE,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    ChunkedScanner,
    Head,
    HttpError,
    body_framing,
    find_head_end,
    parse_request_head,
    parse_response_head,
    response_framing,
)

DERANDOMIZE = os.environ.get("HOSTMESH_FUZZ_RANDOM") != "1"


def request(*lines: bytes, start: bytes = b"GET / HTTP/1.1") -> bytes:
    """A request head: ``start``, each field line, the blank line."""
    return start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def response(*lines: bytes, start: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return request(*lines, start=start)


def refusal(fn: Callable[..., object], *args: object) -> tuple[int, str]:
    """(status, reason) of the HttpError that ``fn(*args)`` raises."""
    with pytest.raises(HttpError) as info:
        fn(*args)
    return info.value.status, info.value.reason


# --- valid requests ---------------------------------------------------------------


def test_origin_form_request() -> None:
    head = parse_request_head(request(b"Host: web.svc.mesh", start=b"GET /a/b?c=d#e HTTP/1.1"))
    assert head.start == b"GET /a/b?c=d#e HTTP/1.1"
    assert (head.method, head.target, head.version, head.status) == (
        b"GET",
        b"/a/b?c=d#e",
        b"HTTP/1.1",
        0,
    )
    assert head.fields == [(b"host", b"web.svc.mesh")]
    assert head.lines == [b"Host: web.svc.mesh"]
    assert head.get(b"host") == b"web.svc.mesh"
    assert head.get(b"content-length") is None


@pytest.mark.parametrize(
    ("start", "method", "target", "version"),
    [
        (b"GET http://web.svc.mesh/x HTTP/1.1", b"GET", b"http://web.svc.mesh/x", b"HTTP/1.1"),
        (b"POST http://web:8080 HTTP/1.0", b"POST", b"http://web:8080", b"HTTP/1.0"),
        (b"GET / HTTP/1.0", b"GET", b"/", b"HTTP/1.0"),
        (b"OPTIONS * HTTP/1.1", b"OPTIONS", b"*", b"HTTP/1.1"),
        (b"M-SEARCH /caf\xc3\xa9 HTTP/1.1", b"M-SEARCH", b"/caf\xc3\xa9", b"HTTP/1.1"),
    ],
)
def test_request_line_forms(start: bytes, method: bytes, target: bytes, version: bytes) -> None:
    head = parse_request_head(request(start=start))
    assert (head.method, head.target, head.version) == (method, target, version)
    assert head.fields == [] and head.lines == []


def test_field_values_trimmed_but_original_lines_kept() -> None:
    lines = [
        b"Host:\t web.svc.mesh \t",
        b"X-Tight:v",
        b"X-Empty:",
        b"X-Blank: \t ",
        b"X-Inner: a \t b",
        b"X-Obs-Text: caf\xc3\xa9 \x80\xff",
        b"X-Colons: a:b::c",
        b"Mixed-CASE-Name: KeepsCase",
    ]
    head = parse_request_head(request(*lines))
    assert head.fields == [
        (b"host", b"web.svc.mesh"),
        (b"x-tight", b"v"),
        (b"x-empty", b""),
        (b"x-blank", b""),
        (b"x-inner", b"a \t b"),
        (b"x-obs-text", b"caf\xc3\xa9 \x80\xff"),
        (b"x-colons", b"a:b::c"),
        (b"mixed-case-name", b"KeepsCase"),
    ]
    assert head.lines == lines  # names keep their case, whitespace is untouched


def test_field_order_and_repeats_preserved() -> None:
    lines = [b"Accept: a", b"X-B: 1", b"accept: b", b"ACCEPT: c", b"Connection: keep-alive, Up"]
    head = parse_request_head(request(*lines, b"connection: close"))
    assert [name for name, _ in head.fields] == [
        b"accept",
        b"x-b",
        b"accept",
        b"accept",
        b"connection",
        b"connection",
    ]
    assert head.lines[:5] == lines
    assert head.get(b"accept") == b"a"
    assert head.get_all(b"accept") == [b"a", b"b", b"c"]
    assert head.connection_tokens() == {b"keep-alive", b"up", b"close"}


def test_up_to_max_headers_accepted() -> None:
    lines = [b"X-H%d: v%d" % (i, i) for i in range(MAX_HEADERS)]
    head = parse_request_head(request(*lines))
    assert len(head.fields) == MAX_HEADERS
    assert head.lines == lines
    assert head.fields[-1] == (b"x-h%d" % (MAX_HEADERS - 1), b"v%d" % (MAX_HEADERS - 1))


def test_longest_request_line_and_head_accepted() -> None:
    prefix, suffix = b"GET /", b" HTTP/1.1"
    start = prefix + b"a" * (MAX_REQUEST_LINE - len(prefix) - len(suffix)) + suffix
    assert len(start) == MAX_REQUEST_LINE
    assert parse_request_head(request(start=start)).start == start

    short = request(b"X-Pad: ")
    pad = b"p" * (MAX_HEAD_BYTES - len(short))
    full = request(b"X-Pad: " + pad)
    assert len(full) == MAX_HEAD_BYTES
    assert parse_request_head(full).get(b"x-pad") == pad


def test_find_head_end() -> None:
    buf = request(b"Host: a") + b"body"
    assert find_head_end(buf) == len(buf) - 4
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n") == -1
    assert find_head_end(b"\r\n\r\n\r\n\r\n", 1) == 6


# --- smuggling and abuse ----------------------------------------------------------

BAD = (400, "bad-header")
BAD_LINE = (400, "bad-request-line")


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        # obs-fold: a continuation line starting with SP or HTAB
        pytest.param(request(b"X-A: one", b" two"), BAD, id="obs-fold-space"),
        pytest.param(request(b"X-A: one", b"\ttwo"), BAD, id="obs-fold-tab"),
        pytest.param(request(b" Host: a"), BAD, id="first-field-indented"),
        # whitespace between name and colon (RFC 9112 5.1: MUST reject)
        pytest.param(request(b"Host : a"), BAD, id="space-before-colon"),
        pytest.param(request(b"Host\t: a"), BAD, id="tab-before-colon"),
        pytest.param(request(b"Transfer-Encoding : chunked"), BAD, id="te-space-before-colon"),
        # bare LF / bare CR inside the field section
        pytest.param(request(b"X-A: a\nX-B: b"), BAD, id="bare-lf-between-fields"),
        pytest.param(request(b"X-A: a\rX-B: b"), BAD, id="bare-cr-between-fields"),
        pytest.param(request(b"X-A: a\rb"), BAD, id="bare-cr-in-value"),
        pytest.param(request(b"X-A: a\n"), BAD, id="lf-before-crlf"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\n\r\n", BAD, id="bare-lf-line-end"),
        # NUL and other CTLs in a value
        pytest.param(request(b"X-A: a\x00b"), BAD, id="nul-in-value"),
        pytest.param(request(b"X-A: a\x7fb"), BAD, id="del-in-value"),
        pytest.param(request(b"X-A: \x1b[31m"), BAD, id="esc-in-value"),
        pytest.param(request(b"X-A: a\x0bb"), BAD, id="vt-in-value"),
        # field names must be tokens
        pytest.param(request(b"X A: b"), BAD, id="space-in-name"),
        pytest.param(request(b"X(A): b"), BAD, id="paren-in-name"),
        pytest.param(request(b"X\xc3\xa9: b"), BAD, id="obs-text-in-name"),
        pytest.param(request(b"X\x00A: b"), BAD, id="nul-in-name"),
        pytest.param(request(b": no-name"), BAD, id="empty-name"),
        pytest.param(request(b"NoColon"), BAD, id="no-colon"),
        pytest.param(request(b"X-A: a", b"", b"X-B: b"), BAD, id="blank-line-inside"),
        # request line
        pytest.param(request(start=b"GET / http/1.1"), BAD_LINE, id="lowercase-version"),
        pytest.param(request(start=b"GET / HTTP/2.0"), BAD_LINE, id="http-2"),
        pytest.param(request(start=b"GET / HTTP/1.2"), BAD_LINE, id="http-1.2"),
        pytest.param(request(start=b"GET / HTTP/1"), BAD_LINE, id="http-1-short"),
        pytest.param(request(start=b"GET HTTP/1.1"), BAD_LINE, id="missing-target"),
        pytest.param(request(start=b"GET  HTTP/1.1"), BAD_LINE, id="empty-target"),
        pytest.param(request(start=b"GET  / HTTP/1.1"), BAD_LINE, id="double-space-1"),
        pytest.param(request(start=b"GET /  HTTP/1.1"), BAD_LINE, id="double-space-2"),
        pytest.param(request(start=b"GET\t/ HTTP/1.1"), BAD_LINE, id="tab-separator"),
        pytest.param(request(start=b"GET / HTTP/1.1 "), BAD_LINE, id="trailing-space"),
        pytest.param(request(start=b" GET / HTTP/1.1"), BAD_LINE, id="leading-space"),
        pytest.param(request(start=b"GET /a b HTTP/1.1"), BAD_LINE, id="space-in-target"),
        pytest.param(request(start=b"GET /\x00 HTTP/1.1"), BAD_LINE, id="nul-in-target"),
        pytest.param(request(start=b"G(T / HTTP/1.1"), BAD_LINE, id="bad-method"),
        pytest.param(request(start=b"GET /"), BAD_LINE, id="http-0.9"),
        pytest.param(request(start=b""), BAD_LINE, id="empty-request-line"),
        pytest.param(b"GET / HTTP/1.1\n\r\n", BAD_LINE, id="request-line-bare-lf"),
        pytest.param(b"GET / HTTP/1.1\rHost: a\r\n\r\n", BAD_LINE, id="request-line-bare-cr"),
    ],
)
def test_malformed_request_refused(head: bytes, expected: tuple[int, str]) -> None:
    assert refusal(parse_request_head, head) == expected


def test_request_line_too_long_is_414() -> None:
    start = b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1"
    assert refusal(parse_request_head, request(start=start)) == (414, "uri-too-long")
    # the line length wins over the head size: the client learns what to shorten
    big = request(b"X-Pad: " + b"p" * MAX_HEAD_BYTES, start=start)
    assert refusal(parse_request_head, big) == (414, "uri-too-long")


def test_head_too_large_is_431() -> None:
    full = request(b"X-Pad: " + b"p" * (MAX_HEAD_BYTES - len(request(b"X-Pad: "))))
    assert refusal(parse_request_head, full[:-4] + b"p\r\n\r\n") == (431, "headers-too-large")
    many = [b"X-%d: %s" % (i, b"v" * 400) for i in range(90)]
    assert refusal(parse_request_head, request(*many)) == (431, "headers-too-large")


def test_too_many_fields_is_431() -> None:
    lines = [b"X-H%d: v" % i for i in range(MAX_HEADERS + 1)]
    assert refusal(parse_request_head, request(*lines)) == (431, "headers-too-large")
    empty = [b"A:"] * (MAX_HEADERS + 1)  # small but many
    assert refusal(parse_request_head, request(*empty)) == (431, "headers-too-large")


# --- body framing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "start", "expected"),
    [
        pytest.param([], b"POST / HTTP/1.1", ("none", 0), id="no-body"),
        pytest.param([b"Content-Length: 0"], b"POST / HTTP/1.1", ("length", 0), id="cl-0"),
        pytest.param([b"content-length:  42 "], b"POST / HTTP/1.1", ("length", 42), id="cl"),
        pytest.param([b"Content-Length: 7"], b"POST / HTTP/1.0", ("length", 7), id="cl-1.0"),
        pytest.param(
            [b"Content-Length: 5", b"Content-Length: 5"],
            b"POST / HTTP/1.1",
            ("length", 5),
            id="cl-identical-duplicates",
        ),
        pytest.param(
            [b"Content-Length: 5, 5,5"], b"POST / HTTP/1.1", ("length", 5), id="cl-identical-list"
        ),
        pytest.param(
            [b"Content-Length: " + b"9" * 18],
            b"POST / HTTP/1.1",
            ("length", 10**18 - 1),
            id="cl-18-digits",
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked"], b"POST / HTTP/1.1", ("chunked", 0), id="chunked"
        ),
        pytest.param(
            [b"transfer-encoding:  CHUNKED\t"],
            b"POST / HTTP/1.1",
            ("chunked", 0),
            id="chunked-case",
        ),
    ],
)
def test_request_body_framing(lines: list[bytes], start: bytes, expected: tuple[str, int]) -> None:
    assert body_framing(parse_request_head(request(*lines, start=start))) == expected


BAD_FRAMING = (400, "bad-framing")


@pytest.mark.parametrize(
    ("lines", "start", "expected"),
    [
        pytest.param(
            [b"Transfer-Encoding: chunked", b"Content-Length: 5"],
            b"POST / HTTP/1.1",
            BAD_FRAMING,
            id="te-and-cl",
        ),
        pytest.param(
            [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
            b"POST / HTTP/1.1",
            BAD_FRAMING,
            id="cl-and-te",
        ),
        pytest.param(
            [b"Transfer-Encoding: gzip, chunked"],
            b"POST / HTTP/1.1",
            (501, "unsupported-transfer-coding"),
            id="gzip-chunked",
        ),
        pytest.param(
            [b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"],
            b"POST / HTTP/1.1",
            (501, "unsupported-transfer-coding"),
            id="gzip-then-chunked-fields",
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked, gzip"],
            b"POST / HTTP/1.1",
            BAD_FRAMING,
            id="chunked-not-last",
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"],
            b"POST / HTTP/1.1",
            BAD_FRAMING,
            id="chunked-not-last-fields",
        ),
        pytest.param(
            [b"Transfer-Encoding: identity"], b"POST / HTTP/1.1", BAD_FRAMING, id="identity"
        ),
        pytest.param([b"Transfer-Encoding:"], b"POST / HTTP/1.1", BAD_FRAMING, id="te-empty"),
        pytest.param(
            [b"Transfer-Encoding: xchunked"], b"POST / HTTP/1.1", BAD_FRAMING, id="te-xchunked"
        ),
        pytest.param(
            [b"Transfer-Encoding: chunked"], b"POST / HTTP/1.0", BAD_FRAMING, id="te-in-http-1.0"
        ),
        pytest.param(
            [b"Content-Length: 5", b"Content-Length: 6"],
            b"POST / HTTP/1.1",
            BAD_FRAMING,
            id="cl-differ-fields",
        ),
        pytest.param(
            [b"Content-Length: 5, 6"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-differ-list"
        ),
        pytest.param([b"Content-Length: 5,"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-empty-item"),
        pytest.param([b"Content-Length:"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-empty"),
        pytest.param([b"Content-Length: +5"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-plus"),
        pytest.param([b"Content-Length: -5"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-minus"),
        pytest.param([b"Content-Length: 1 0"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-space"),
        pytest.param([b"Content-Length: 1\t0"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-tab"),
        pytest.param([b"Content-Length: 0x10"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-hex"),
        pytest.param([b"Content-Length: 1e3"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-exp"),
        pytest.param([b"Content-Length: 1_0"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-underscore"),
        pytest.param(
            [b"Content-Length: \xd9\xa1"], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-arabic-digit"
        ),
        pytest.param(
            [b"Content-Length: " + b"1" * 19], b"POST / HTTP/1.1", BAD_FRAMING, id="cl-19-digits"
        ),
    ],
)
def test_request_framing_refused(
    lines: list[bytes], start: bytes, expected: tuple[int, str]
) -> None:
    assert refusal(body_framing, parse_request_head(request(*lines, start=start))) == expected


# --- responses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "version", "status"),
    [
        (b"HTTP/1.1 200 OK", b"HTTP/1.1", 200),
        (b"HTTP/1.0 404 Not Found", b"HTTP/1.0", 404),
        (b"HTTP/1.1 204", b"HTTP/1.1", 204),  # no reason phrase
        (b"HTTP/1.1 204 ", b"HTTP/1.1", 204),  # empty reason phrase
        (b"HTTP/1.1 100 Continue", b"HTTP/1.1", 100),
        (b"HTTP/1.1 599 caf\xc3\xa9\there", b"HTTP/1.1", 599),
    ],
)
def test_status_line_forms(start: bytes, version: bytes, status: int) -> None:
    head = parse_response_head(response(b"Server: up", start=start))
    assert (head.start, head.version, head.status) == (start, version, status)
    assert (head.method, head.target) == (b"", b"")
    assert head.fields == [(b"server", b"up")] and head.lines == [b"Server: up"]


UPSTREAM = (502, "bad-upstream-response")


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(response(start=b"HTTP/1.1 20 OK"), id="two-digit-status"),
        pytest.param(response(start=b"HTTP/1.1 2000 OK"), id="four-digit-status"),
        pytest.param(response(start=b"HTTP/1.1 099 Low"), id="status-below-100"),
        pytest.param(response(start=b"HTTP/1.1 OK"), id="no-status"),
        pytest.param(response(start=b"HTTP/1.1 2x0 OK"), id="non-digit-status"),
        pytest.param(response(start=b"HTTP/1.1 200\tOK"), id="tab-after-status"),
        pytest.param(response(start=b"HTTP/1.1  200 OK"), id="double-space"),
        pytest.param(response(start=b"http/1.1 200 OK"), id="lowercase-version"),
        pytest.param(response(start=b"HTTP/2 200 OK"), id="http-2"),
        pytest.param(response(start=b"HTTP/1.1 200 O\x00K"), id="nul-in-reason"),
        pytest.param(response(start=b"ICY 200 OK"), id="icy"),
        pytest.param(b"HTTP/1.1 200 OK\n\r\n", id="status-line-bare-lf"),
        pytest.param(response(b"X-A: a", b" folded"), id="obs-fold"),
        pytest.param(response(b"Content-Length : 5"), id="space-before-colon"),
        pytest.param(response(b"X-A: a\rb"), id="bare-cr"),
        pytest.param(response(b"X-A: a\x00"), id="nul"),
        pytest.param(response(*[b"X-%d: v" % i for i in range(MAX_HEADERS + 1)]), id="too-many"),
        pytest.param(response(b"X-Pad: " + b"p" * MAX_HEAD_BYTES), id="too-large"),
    ],
)
def test_malformed_response_is_502(head: bytes) -> None:
    assert refusal(parse_response_head, head) == UPSTREAM


@pytest.mark.parametrize(
    ("status", "method", "lines", "expected"),
    [
        pytest.param(200, b"HEAD", [b"Content-Length: 100"], ("none", 0), id="head"),
        pytest.param(200, b"HEAD", [b"Transfer-Encoding: chunked"], ("none", 0), id="head-te"),
        pytest.param(100, b"POST", [], ("none", 0), id="100"),
        pytest.param(101, b"GET", [b"Upgrade: websocket"], ("none", 0), id="101"),
        pytest.param(103, b"GET", [b"Content-Length: 9"], ("none", 0), id="103"),
        pytest.param(204, b"DELETE", [b"Content-Length: 10"], ("none", 0), id="204"),
        pytest.param(304, b"GET", [b"Content-Length: 10"], ("none", 0), id="304"),
        pytest.param(200, b"GET", [], ("close", 0), id="until-close"),
        pytest.param(205, b"GET", [], ("close", 0), id="205-until-close"),
        pytest.param(200, b"GET", [b"Content-Length: 12"], ("length", 12), id="length"),
        pytest.param(404, b"POST", [b"Content-Length: 0"], ("length", 0), id="404-empty"),
        pytest.param(200, b"GET", [b"Transfer-Encoding: chunked"], ("chunked", 0), id="chunked"),
    ],
)
def test_response_framing(
    status: int, method: bytes, lines: list[bytes], expected: tuple[str, int]
) -> None:
    head = parse_response_head(response(*lines, start=b"HTTP/1.1 %d X" % status))
    assert response_framing(head, method) == expected


@pytest.mark.parametrize(
    ("start", "lines"),
    [
        pytest.param(b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked", b"Content-Length: 3"]),
        pytest.param(b"HTTP/1.1 200 OK", [b"Transfer-Encoding: gzip, chunked"]),  # 502, not 501
        pytest.param(b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked, gzip"]),
        pytest.param(b"HTTP/1.0 200 OK", [b"Transfer-Encoding: chunked"]),
        pytest.param(b"HTTP/1.1 200 OK", [b"Content-Length: 3", b"Content-Length: 4"]),
        pytest.param(b"HTTP/1.1 200 OK", [b"Content-Length: -1"]),
    ],
)
def test_response_framing_refused_is_502(start: bytes, lines: list[bytes]) -> None:
    head = parse_response_head(response(*lines, start=start))
    assert refusal(response_framing, head, b"GET") == (502, "bad-framing")


# --- chunked bodies -----------------------------------------------------------------

CHUNKED_BODY = (
    b"5;name=value\r\nhello\r\n"
    b'1A ; a=1;b="q;uoted"\r\n' + bytes(range(0x61, 0x61 + 26)) + b"\r\n"
    b"3\r\n\r\n\n\r\n"  # data that looks like line ends
    b"0;last\r\n"
    b"Expires: never\r\n"
    b"X-Checksum:\tabc \r\n"
    b"\r\n"
)
NEXT_MESSAGE = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


def feed_pieces(pieces: list[bytes]) -> tuple[int, bool]:
    """Feed ``pieces`` in order; (bytes taken as body, done)."""
    scanner = ChunkedScanner()
    used = 0
    for piece in pieces:
        took = scanner.feed(piece)
        assert 0 <= took <= len(piece)
        assert took == len(piece) or scanner.done  # short only at the end of the body
        used += took
    return used, scanner.done


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(CHUNKED_BODY, id="extensions-and-trailers"),
        pytest.param(b"0\r\n\r\n", id="empty"),
        pytest.param(b"a\r\n0123456789\r\nA\r\n0123456789\r\n00\r\n\r\n", id="hex-case"),
        pytest.param(b"000000000000000F\r\n" + b"x" * 15 + b"\r\n0\r\n\r\n", id="16-digits"),
    ],
)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_chunked_body_end_is_exact(body: bytes, split: str) -> None:
    stream = body + NEXT_MESSAGE
    pieces = [stream] if split == "whole" else bytewise(stream)
    assert feed_pieces(pieces) == (len(body), True)


def test_chunked_end_same_for_every_two_piece_split() -> None:
    stream = CHUNKED_BODY + NEXT_MESSAGE
    for cut in range(len(stream) + 1):
        assert feed_pieces([stream[:cut], stream[cut:]]) == (len(CHUNKED_BODY), True), cut


def test_chunked_accepts_bytearray_and_memoryview() -> None:
    stream = CHUNKED_BODY + NEXT_MESSAGE
    assert ChunkedScanner().feed(bytearray(stream)) == len(CHUNKED_BODY)
    assert ChunkedScanner().feed(memoryview(stream)[: len(CHUNKED_BODY) + 3]) == len(CHUNKED_BODY)


def test_chunked_incomplete_body_is_all_taken_and_not_done() -> None:
    for cut in (1, 3, 12, 20, len(CHUNKED_BODY) - 1):
        scanner = ChunkedScanner()
        assert scanner.feed(CHUNKED_BODY[:cut]) == cut
        assert not scanner.done
    assert scanner.feed(CHUNKED_BODY[-1:] + b"rest") == 1
    assert scanner.done
    assert scanner.feed(b"more") == 0  # a finished scanner takes nothing


def test_chunked_huge_chunk_size_streams() -> None:
    scanner = ChunkedScanner()
    assert scanner.feed(b"FFFFFFFFFFFFFFFF\r\n") == 18
    assert scanner.feed(b"\r\n0\r\n\r\n" * 1000) == 7000  # all of it is chunk data
    assert not scanner.done


BAD_CHUNK = (400, "bad-chunk")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"g\r\nxxxxxxxxxxxxxxxx\r\n0\r\n\r\n", BAD_CHUNK, id="non-hex"),
        pytest.param(b"5x\r\nhello\r\n0\r\n\r\n", BAD_CHUNK, id="hex-then-junk"),
        pytest.param(b"\r\nhello\r\n0\r\n\r\n", BAD_CHUNK, id="empty-size"),
        pytest.param(b";ext\r\n0\r\n\r\n", BAD_CHUNK, id="extension-without-size"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", BAD_CHUNK, id="negative"),
        pytest.param(b"+5\r\nhello\r\n0\r\n\r\n", BAD_CHUNK, id="plus"),
        pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", BAD_CHUNK, id="0x-prefix"),
        pytest.param(b" 5\r\nhello\r\n0\r\n\r\n", BAD_CHUNK, id="leading-space"),
        pytest.param(b"1" + b"0" * 16 + b"\r\n", BAD_CHUNK, id="17-hex-digits"),
        pytest.param(b"0" * 17 + b"\r\n\r\n", BAD_CHUNK, id="17-zeros"),
        pytest.param(b"5\nhello\r\n0\r\n\r\n", BAD_CHUNK, id="size-bare-lf"),
        pytest.param(b"5\rhello\r\n0\r\n\r\n", BAD_CHUNK, id="size-bare-cr"),
        pytest.param(b"5\r\nhello0\r\n\r\n", BAD_CHUNK, id="no-crlf-after-data"),
        pytest.param(b"5\r\nhello\n0\r\n\r\n", BAD_CHUNK, id="bare-lf-after-data"),
        pytest.param(b"5\r\nhello\r0\r\n\r\n", BAD_CHUNK, id="bare-cr-after-data"),
        pytest.param(b"5\r\nhello world\r\n0\r\n\r\n", BAD_CHUNK, id="data-longer-than-size"),
        pytest.param(b"5\r\nhello \r\n0\r\n\r\n", BAD_CHUNK, id="space-after-data"),
        pytest.param(b"5\r\nhello\t\r\n0\r\n\r\n", BAD_CHUNK, id="tab-after-data"),
        pytest.param(b"3\r\nhello\r\n0\r\n\r\n", BAD_CHUNK, id="size-too-small"),
        pytest.param(b"0\n\r\n", BAD_CHUNK, id="last-chunk-bare-lf"),
        pytest.param(b"0\r\n\n", BAD_CHUNK, id="final-bare-lf"),
        pytest.param(b"5;" + b"e" * MAX_CHUNK_LINE + b"\r\nhello\r\n", BAD_CHUNK, id="long-line"),
        pytest.param(b"0" * (MAX_CHUNK_LINE + 10), BAD_CHUNK, id="long-line-no-lf"),
        pytest.param(b"0\r\nBad Name: x\r\n\r\n", BAD_CHUNK, id="trailer-bad-name"),
        pytest.param(b"0\r\nX : y\r\n\r\n", BAD_CHUNK, id="trailer-space-before-colon"),
        pytest.param(b"0\r\nX: a\r\n folded\r\n\r\n", BAD_CHUNK, id="trailer-obs-fold"),
        pytest.param(b"0\r\nX: a\x00b\r\n\r\n", BAD_CHUNK, id="trailer-nul"),
        pytest.param(b"0\r\nX: a\rb\r\n\r\n", BAD_CHUNK, id="trailer-bare-cr"),
        pytest.param(b"0\r\nX: y\n\r\n", BAD_CHUNK, id="trailer-bare-lf"),
        pytest.param(b"0\r\nno-colon\r\n\r\n", BAD_CHUNK, id="trailer-no-colon"),
        pytest.param(
            b"0\r\n" + b"X-T: " + b"t" * (MAX_CHUNK_LINE + 1) + b"\r\n\r\n",
            BAD_CHUNK,
            id="trailer-line-too-long",
        ),
        pytest.param(
            b"0\r\n" + b"X-T: %s\r\n" % (b"t" * 1000) * 17 + b"\r\n",
            (431, "headers-too-large"),
            id="trailers-too-large",
        ),
    ],
)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_malformed_chunked_refused(body: bytes, expected: tuple[int, str], split: str) -> None:
    pieces = [body + NEXT_MESSAGE] if split == "whole" else bytewise(body + NEXT_MESSAGE)
    assert refusal(feed_pieces, pieces) == expected


def test_trailers_up_to_the_limit_accepted() -> None:
    trailers = b"X-T: %s\r\n" % (b"t" * 1000) * 16  # 16,144 bytes, under 16 KiB
    body = b"0\r\n" + trailers + b"\r\n"
    assert feed_pieces([body + NEXT_MESSAGE]) == (len(body), True)
    assert feed_pieces(bytewise(body)) == (len(body), True)


LONGEST_SIZE_LINE = b"5;" + b"e" * (MAX_CHUNK_LINE - 2) + b"\r\n"  # MAX_CHUNK_LINE + CRLF


def test_longest_chunk_line_accepted_whole() -> None:
    body = LONGEST_SIZE_LINE + b"hello\r\n0\r\n\r\n"
    assert feed_pieces([body + NEXT_MESSAGE]) == (len(body), True)
    assert feed_pieces([body[: MAX_CHUNK_LINE - 10], body[MAX_CHUNK_LINE - 10 :]]) == (
        len(body),
        True,
    )


@pytest.mark.parametrize("split", ["cr-lf", "bytewise"])
def test_longest_chunk_line_accepted_however_split(split: str) -> None:
    body = LONGEST_SIZE_LINE + b"hello\r\n0\r\n\r\n"
    cut = len(LONGEST_SIZE_LINE) - 1  # between the CR and the LF, as TCP may cut it
    pieces = [body[:cut], body[cut:]] if split == "cr-lf" else bytewise(body)
    assert feed_pieces(pieces) == (len(body), True)


# --- fuzzing ------------------------------------------------------------------------

TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VALUE_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
INTERESTING = b"\r\n\t :;,\x00\x0b\x7f\x80\xff0aAzZ-"

HEAD_SEEDS = (
    request(b"Host: web.svc.mesh", b"Accept: */*"),
    request(b"Host: a", b"Transfer-Encoding: chunked", start=b"POST /up HTTP/1.1"),
    request(b"Host: a", b"Content-Length: 5, 5", start=b"PUT /x HTTP/1.1"),
    request(b"Connection: close", start=b"GET http://web/x HTTP/1.0"),
    response(b"Content-Length: 12", b"Server:\tup "),
    response(b"Transfer-Encoding: gzip, chunked", start=b"HTTP/1.1 404"),
    response(start=b"HTTP/1.0 304 Not Modified"),
)
CHUNKED_SEEDS = (
    CHUNKED_BODY,
    b"0\r\n\r\n",
    b"3;x\r\nabc\r\n0\r\nT: v\r\n\r\n",
    b"10\r\n0123456789abcdef\r\n0\r\n\r\n",
)


def mutate(seed: bytes, program: bytes) -> bytes:
    """``seed`` edited by ``program``: each 3 bytes insert, delete, replace or repeat.

    An edit may be aimed at a line boundary (just before a LF, or just after).

    One binary draw per input keeps hypothesis's per-example cost low, and
    it still shrinks to the smallest edit that breaks something.
    """
    data = bytearray(seed)
    for i in range(0, len(program) - 2, 3):
        op, where, arg = program[i : i + 3]
        at = where % (len(data) + 1)
        if op & 8:  # snap to a line start or a line end, where smuggling happens
            edges = [j for j, c in enumerate(data) if c == 0x0A] or [0]
            at = edges[where % len(edges)] + (op & 16 == 0)
        byte = INTERESTING[arg % len(INTERESTING)] if op & 4 else arg
        if op % 4 == 0:
            data.insert(at, byte)
        elif op % 4 == 1:
            del data[at : at + 1]
        elif op % 4 == 2:
            data[at : at + 1] = bytes([byte])
        else:
            data[at:at] = data[at : at + arg % 8 + 1]
    return bytes(data)


def mutated(seeds: tuple[bytes, ...]) -> st.SearchStrategy[bytes]:
    """A seed with a few bytes inserted, deleted, replaced or a span repeated."""
    return st.builds(mutate, st.sampled_from(seeds), st.binary(min_size=3, max_size=12))


def check_head(head: Head) -> None:
    """What the proxy relies on when it forwards an accepted head's lines."""
    assert len(head.lines) == len(head.fields) <= MAX_HEADERS
    for (name, value), line in zip(head.fields, head.lines, strict=True):
        assert line.split(b":", 1)[0].lower() == name
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line
        assert line[:1] not in (b" ", b"\t")
        assert value == line.split(b":", 1)[1].strip(b" \t")
    assert b"\r" not in head.start and b"\n" not in head.start


def check_parsers(data: bytes) -> None:
    for parse, statuses in (
        (parse_request_head, {400, 414, 431}),
        (parse_response_head, {502}),
    ):
        try:
            head = parse(data)
        except HttpError as exc:
            assert exc.status in statuses
            continue
        check_head(head)
        try:
            if parse is parse_request_head:
                framing = body_framing(head)
            else:
                framing = response_framing(head, b"GET")
        except HttpError as exc:
            assert exc.status in {400, 501, 502}
        else:
            assert framing[0] in {"none", "close", "length", "chunked"}
            assert framing[1] >= 0


def scan_outcome(pieces: list[bytes]) -> tuple[object, ...]:
    try:
        return ("ok", *feed_pieces(pieces))
    except HttpError as exc:
        assert exc.status in {400, 431}
        return ("error", exc.status, exc.reason)


@settings(max_examples=2000, derandomize=DERANDOMIZE)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"),
        mutated(HEAD_SEEDS),
        mutated(CHUNKED_SEEDS),
    ),
    st.binary(max_size=6),
)
def test_fuzz_parsers_only_raise_http_error(data: bytes, cuts: bytes) -> None:
    """Heads parse or raise HttpError; a chunked body's outcome ignores how it is split."""
    check_parsers(data)
    end = find_head_end(data)  # as the proxy cuts a head from its buffer
    if 0 < end < len(data):
        check_parsers(data[:end])

    whole = scan_outcome([data + NEXT_MESSAGE])
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)] + [NEXT_MESSAGE]
    assert scan_outcome(pieces) == whole


field_line = st.tuples(
    st.binary(min_size=1, max_size=12).map(
        lambda b: bytes(TOKEN_BYTES[x % len(TOKEN_BYTES)] for x in b)
    ),
    st.sampled_from([b"", b" ", b"\t", b"  ", b" \t "]),
    st.binary(max_size=30).map(lambda b: bytes(VALUE_BYTES[x % len(VALUE_BYTES)] for x in b)),
    st.sampled_from([b"", b" ", b"\t", b" \t"]),
).map(lambda t: t[0] + b":" + t[1] + t[2] + t[3])


@settings(max_examples=300, derandomize=DERANDOMIZE)
@given(st.lists(field_line, max_size=MAX_HEADERS), st.booleans())
def test_fields_round_trip(lines: list[bytes], is_request: bool) -> None:
    raw = request(*lines) if is_request else response(*lines)
    head = (parse_request_head if is_request else parse_response_head)(raw)
    assert b"\r\n".join(head.lines) == b"\r\n".join(lines)
    assert head.start + b"\r\n" + b"".join(x + b"\r\n" for x in head.lines) + b"\r\n" == raw
    assert head.fields == [
        (x.split(b":", 1)[0].lower(), x.split(b":", 1)[1].strip(b" \t")) for x in lines
    ]


chunk_ext = st.sampled_from([b"", b";a", b";a=b", b' ; q="x;y" ', b";x=1;y=2", b"\t;t"])


@settings(max_examples=300, derandomize=DERANDOMIZE)
@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=40), chunk_ext, st.booleans()), max_size=5),
    chunk_ext,
    st.lists(field_line, max_size=4),
    st.binary(max_size=8),
)
def test_valid_chunked_bodies_end_exactly(
    chunks: list[tuple[bytes, bytes, bool]], last_ext: bytes, trailers: list[bytes], cuts: bytes
) -> None:
    body = b"".join(
        b"%s%s\r\n%s\r\n" % (b"%X" % len(data) if upper else b"%x" % len(data), ext, data)
        for data, ext, upper in chunks
    )
    body += b"0" + last_ext + b"\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    stream = body + NEXT_MESSAGE
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert feed_pieces(pieces) == (len(body), True)

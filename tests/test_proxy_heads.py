"""The proxy's byte-level head work against its line-by-line definitions.

The proxy reads and forwards the usual head as bytes: lookups are byte
searches in a lowercase copy, one regex drops the hop-by-hop and mesh
fields, the usual Content-Length and Connection values take a shortcut. It
keeps a line-by-line version for everything else. Both must agree on every
head: a request that reaches an instance with a hop-by-hop or ``hostmesh-``
field left in, or a framing read differently from the upstream's, is what a
smuggler looks for. Field names are drawn from the ones those edits treat
specially, in mixed case, beside arbitrary valid ones; values from the ones
that change decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st
from test_http1 import DERANDOMIZE, field_line, request, response

from hostmesh import ProxyConfig
from hostmesh._metrics import Registry
from hostmesh.agent import _proxy
from hostmesh.agent._http1 import (
    HOP_BY_HOP,
    Head,
    HttpError,
    body_framing,
    framing_from_fields,
    parse_request_head,
    parse_response_head,
    response_framing,
    usual_request,
    usual_response,
)
from hostmesh.agent._routing import Router

NAMES = [
    b"Host", b"host", b"Content-Length", b"content-LENGTH", b"Transfer-Encoding",
    b"Connection", b"CONNECTION", b"Keep-Alive", b"Proxy-Connection", b"TE", b"te",
    b"Trailer", b"Upgrade", b"X-Forwarded-For", b"x-forwarded-for", b"traceparent",
    b"TraceParent", b"hostmesh-source", b"Hostmesh-Destination", b"hostmesh-", b"Expect",
    b"Close", b"X-A", b"Te-X", b"Connectionx", b"X-Host", b"Hosts", b"X-Content-Length",
    b"Expected", b"Contentlength",
]  # fmt: skip
VALUES = [
    b"", b"5", b"05", b"5, 5", b"5,6", b"x5", b"1234567890123456789", b"chunked",
    b"gzip, chunked", b"Chunked", b"close", b"keep-alive", b"Keep-Alive, Upgrade",
    b"x-a, close", b"te, trailer", b"x-host", b",", b"abc", b"10.0.0.1",
    b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01", b"00-" + b"A" * 32 + b"-" + b"b" * 16 + b"-01",
    b"websocket",
]  # fmt: skip
named_line = st.tuples(
    st.sampled_from(NAMES),
    st.sampled_from([b"", b" ", b"\t "]),
    st.sampled_from(VALUES),
    st.sampled_from([b"", b" "]),
).map(lambda t: t[0] + b":" + t[1] + t[2] + t[3])
# Whole lines that decide framing and forwarding, alone or repeated.
decisive_line = st.sampled_from([
    b"Content-Length: 5", b"content-length:6", b"Content-Length: 05", b"Content-Length: 5 ",
    b"Content-Length: 1234567890123456789", b"Content-Length: 123456789012345678",
    b"Transfer-Encoding: chunked", b"Connection: close", b"Connection: keep-alive",
    b"Connection: x-a", b"X-A: 1", b"X-Forwarded-For: 10.1.1.1", b"hostmesh-source: web",
])  # fmt: skip
any_line = st.one_of(decisive_line, named_line, named_line, field_line)
lines_of_a_head = st.lists(any_line, max_size=10)
TRACE = b"\r\ntraceparent: 00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"


def outcome(fn: Callable[[], object]) -> object:
    try:
        return ("ok", fn())
    except HttpError as exc:
        return ("refused", exc.status, exc.reason)


def parsed(lines: list[bytes], is_request: bool, start: bytes | None = None) -> Head | None:
    try:
        if is_request:
            return parse_request_head(request(*lines, start=start or b"GET / HTTP/1.1"))
        return parse_response_head(response(*lines))
    except HttpError:
        return None


@settings(max_examples=600, derandomize=DERANDOMIZE)
@given(lines_of_a_head, st.booleans())
def test_byte_search_lookups_agree_with_the_field_list(
    lines: list[bytes], is_request: bool
) -> None:
    head = parsed(lines, is_request)
    if head is None:
        return
    for name in {n for n, _ in head.fields} | {b"host", b"connection", b"content-length", b"no"}:
        values = [v for k, v in head.fields if k == name]
        assert head.get_all(name) == values
        assert head.get(name) == (values[0] if values else None)
        assert head.has(name) == bool(values)
    connection = [v.lower() for k, v in head.fields if k == b"connection"]
    tokens = {t.strip() for v in connection for t in v.split(b",")}
    assert head.connection_tokens() == tokens
    again = parsed(lines, is_request)
    assert again is not None
    status = 400 if is_request else 502
    assert outcome(lambda: body_framing(head, status_error=status)) == outcome(
        lambda: framing_from_fields(again, status)
    )


PROXY = _proxy.Proxy(ProxyConfig(), Router(Registry()))


@settings(max_examples=600, derandomize=DERANDOMIZE)
@given(
    lines_of_a_head,
    st.sampled_from([(b"GET / HTTP/1.1", b"/"), (b"GET http://web:80/x?y HTTP/1.1", b"/x?y")]),
    st.booleans(),
    st.booleans(),
)
def test_request_head_edit_equals_the_line_by_line_one(
    lines: list[bytes], start_path: tuple[bytes, bytes], chunked: bool, upgrade: bool
) -> None:
    start, path = start_path
    req = parsed(lines, True, start)
    if req is None:
        return
    with mock.patch.object(_proxy, "_new_traceparent", lambda: TRACE):
        fast = PROXY._upstream_head(req, path, "10.0.0.9", chunked=chunked, upgrade=upgrade)
        slow = PROXY._upstream_head_lines(req, path, "10.0.0.9", chunked=chunked, upgrade=upgrade)
    assert fast == slow
    sent = parse_request_head(fast)
    assert not {n for n, _ in sent.fields if n.startswith(b"hostmesh-")}
    left = {n for n, _ in sent.fields} & (HOP_BY_HOP | req.connection_tokens())
    assert left <= {b"transfer-encoding", b"connection", b"upgrade"}  # only the proxy's own


@settings(max_examples=600, derandomize=DERANDOMIZE)
@given(lines_of_a_head)
def test_response_fields_edit_equals_the_line_by_line_one(lines: list[bytes]) -> None:
    resp = parsed(lines, False)
    if resp is None:
        return
    tokens = resp.connection_tokens()
    assert _proxy.response_fields(resp, tokens) == _proxy.kept_lines(resp, HOP_BY_HOP | tokens)


def test_service_names_by_host_are_remembered_up_to_a_bound() -> None:
    proxy = _proxy.Proxy(ProxyConfig(), Router(Registry()))
    for i in range(_proxy._HOSTS_CACHED + 50):
        host = b"Svc%d.svc.mesh:80" % i
        req = parse_request_head(request(b"Host: " + host))
        assert proxy._destination(req) == (b"svc%d" % i, b"/")
    assert len(proxy._hosts) == _proxy._HOSTS_CACHED


# --- the express lane: what its one-match heads are, by the general parser --------------

START_LINES = [
    b"GET / HTTP/1.1", b"POST /a?b=c HTTP/1.1", b"HEAD / HTTP/1.1", b"GET / HTTP/1.0",
    b"get /x HTTP/1.1", b"GET http://web/x HTTP/1.1", b"GET /%zz HTTP/1.1", b"GET  / HTTP/1.1",
]  # fmt: skip
HOST_LINES = [b"Host: web", b"host:web:8080 ", b"HOST: Web.svc.mesh", b"Host: ", b"Host: a b"]
STATUS_LINES = [
    b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 503", b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 101 Switching", b"HTTP/1.0 200 OK",
    b"HTTP/1.1 600 X", b"HTTP/1.1 200  x\ty",
]  # fmt: skip
LENGTH_LINES = [b"Content-Length: 3", b"content-length:0", b"Content-Length: 007 ",
                b"Content-Length: 1234567890123456789", b"Content-Length: 3, 3"]  # fmt: skip
keep_alive_lines = st.lists(st.just(b"Connection: keep-alive"), max_size=2)
# Most heads of plain lines and at most one named line, each a near miss of the usual
# head or one; the others as above.
some_lines = st.one_of(
    lines_of_a_head,
    st.tuples(st.lists(field_line, max_size=6), st.lists(named_line, max_size=1),
              st.integers(0, 6)).map(lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]),
)  # fmt: skip


def _with(lines: list[bytes], extra: list[bytes], at: int) -> list[bytes]:
    """``lines`` with ``extra`` inserted at ``at`` (modulo their length)."""
    at = at % (len(lines) + 1)
    return lines[:at] + extra + lines[at:]


@settings(max_examples=1500, derandomize=DERANDOMIZE)
@given(some_lines, st.sampled_from(START_LINES[:2] * 3 + START_LINES),
       st.lists(st.sampled_from(HOST_LINES[:3] * 3 + HOST_LINES), min_size=1, max_size=2),
       keep_alive_lines, st.integers(0, 20), st.integers(0, 20))  # fmt: skip
def test_a_usual_request_is_what_the_parser_reads_and_is_forwarded_the_same(
    lines: list[bytes], start: bytes, hosts: list[bytes], keep_alive: list[bytes], i: int, j: int
) -> None:
    """The express lane forwards a head :func:`usual_request` matches as it came, minus
    ``Connection: keep-alive``, plus X-Forwarded-For and traceparent: exactly the head
    the general path builds, for a message the general path reads the same way."""
    head = request(*_with(_with(lines, hosts, i), keep_alive, j), start=start)
    m = usual_request(head)
    if m is None:
        return
    req = parse_request_head(head)  # raises if the one match let anything malformed through
    method, target, host = m.group(1, 2, 3)
    assert (method, target, host) == (req.method, req.target, req.get(b"host"))
    assert method != b"HEAD" and req.version == b"HTTP/1.1" and target[:1] == b"/"
    assert body_framing(req) == ("none", 0)
    assert req.connection_tokens() <= {b"keep-alive"} and req.get(b"expect") is None
    kept = _proxy.without_keep_alive(head, len(head))
    if kept is None:  # two or more keep-alive lines: left to the general path
        assert len(req.get_all(b"connection")) >= 2
        return
    with mock.patch.object(_proxy, "_new_traceparent", lambda: TRACE):
        general = PROXY._upstream_head(req, target, "10.0.0.9", chunked=False, upgrade=False)
    assert kept[:-2] + b"X-Forwarded-For: 10.0.0.9" + TRACE + b"\r\n\r\n" == general


@settings(max_examples=1500, derandomize=DERANDOMIZE)
@given(some_lines, st.sampled_from(STATUS_LINES[:3] * 3 + STATUS_LINES),
       st.lists(st.sampled_from(LENGTH_LINES[:3] * 3 + LENGTH_LINES), min_size=1, max_size=2),
       keep_alive_lines, st.integers(0, 20), st.integers(0, 20))  # fmt: skip
def test_a_usual_response_is_what_the_parser_reads_and_is_forwarded_the_same(
    lines: list[bytes], start: bytes, lengths: list[bytes], keep_alive: list[bytes], i: int,
    j: int,
) -> None:  # fmt: skip
    head = response(*_with(_with(lines, lengths, i), keep_alive, j), start=start)
    data = head + b"body"
    m = usual_response(data)
    if m is None:
        return
    assert m.end() == len(head)  # the head ends where the parser's does
    resp = parse_response_head(head)
    status, length = int(m.group(1)), int(m.group(2))
    assert status == resp.status and 200 <= status < 600 and resp.version == b"HTTP/1.1"
    if status not in (204, 304):
        assert response_framing(resp, b"GET") == ("length", length)
    tokens = resp.connection_tokens()
    assert tokens <= {b"keep-alive"}
    out = _proxy.without_keep_alive(data, len(head))
    if out is None:
        assert len(resp.get_all(b"connection")) >= 2
        return
    assert out == resp.start + _proxy.response_fields(resp, tokens) + b"\r\n\r\nbody"


def test_the_heads_of_common_clients_and_servers_are_usual() -> None:
    """curl, httpx and wrk heads and nginx's and Node's answers take the express lane."""
    for head in (
        b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: web:4140\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate"
        b"\r\nConnection: keep-alive\r\nUser-Agent: python-httpx/0.27.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
    ):
        assert usual_request(head) is not None
    for head in (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 15:58:35 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
        b"Date: Tue, 01 Dec 2026 15:58:35 GMT\r\nConnection: keep-alive\r\n\r\n",
    ):
        assert usual_response(head) is not None
    # and what must not: a body, framing, hop-by-hop fields, a trace, a mesh field
    for line in (b"Content-Length: 3", b"Transfer-Encoding: chunked", b"Connection: close",
                 b"Keep-Alive: timeout=5", b"traceparent: x", b"hostmesh-source: x",
                 b"X-Forwarded-For: 1.2.3.4", b"Expect: 100-continue",
                 b"TE: trailers"):  # fmt: skip
        assert usual_request(request(b"Host: web", line)) is None, line
    for line in (b"Transfer-Encoding: chunked", b"Connection: close", b"Keep-Alive: timeout=5",
                 b"Upgrade: h2c", b"Content-Length: 4"):  # fmt: skip
        assert usual_response(response(b"Content-Length: 3", line)) is None

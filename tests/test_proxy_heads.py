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
)
from hostmesh.agent._routing import Router

NAMES = [
    b"Host", b"host", b"Content-Length", b"content-LENGTH", b"Transfer-Encoding",
    b"Connection", b"CONNECTION", b"Keep-Alive", b"Proxy-Connection", b"TE", b"te",
    b"Trailer", b"Upgrade", b"X-Forwarded-For", b"x-forwarded-for", b"traceparent",
    b"TraceParent", b"hostmesh-source", b"Hostmesh-Destination", b"hostmesh-", b"Expect",
    b"Close", b"X-A", b"Te-X", b"Connectionx", b"X-Host",
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

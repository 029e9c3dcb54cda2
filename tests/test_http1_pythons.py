"""The HTTP/1 head parser and the express lane's patterns on the fleet's own Python.

An agent runs on the python3 its host has, and the Ansible role installs it
into Debian's: Debian 12 ships CPython 3.11.2. Its ``re`` mis-matches a
possessive repeat of a group (CPython gh-106052, gh-100061, fixed in 3.11.5):
there the usual request patterns never matched, so every request took the
general path at half the speed, while the tests here, on a newer 3.11, passed.

So the same heads go through :mod:`hostmesh.agent._http1` under this
interpreter and under Debian's ``/usr/bin/python3`` (``_http1`` needs only
the standard library, so it is loaded there from the installed file), and
both must read each head the same way: the parse outcome (fields, or the
status and reason of the refusal) and the usual patterns' matches. The heads
of curl, httpx and wrk, and nginx's answer, must be usual on both.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from pathlib import Path

from hostmesh.agent import _http1

#: Debian's own interpreter (package python3), the one the Ansible role installs into.
SYSTEM_PYTHON = "/usr/bin/python3"

# Run by each interpreter: load the installed _http1.py by path, read base64 heads
# (JSON on stdin), print what it makes of each.
DRIVER = r"""
import base64, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_http1", sys.argv[1])
h = importlib.util.module_from_spec(spec)
spec.loader.exec_module(h)

def parsed(parse, head):
    try:
        got = parse(head)
    except h.HttpError as exc:
        return ["refused", exc.status, exc.reason]
    return [repr(got.start), repr(got.fields)]

def usual(m):
    return None if m is None else [m.span(), [g.hex() for g in m.groups()]]

out = []
for data in (base64.b64decode(d) for d in json.load(sys.stdin)):
    end = data.find(b"\r\n\r\n")
    head = data[: end + 4] if end >= 0 else data + b"\r\n\r\n"
    out.append([parsed(h.parse_request_head, head), parsed(h.parse_response_head, head),
                usual(h.usual_request(head)), usual(h.usual_response(data))])
print(sys.version.split()[0])
print(json.dumps(out))
"""

COMMON = [
    b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: web:4140\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nUser-Agent: python-httpx/0.27.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n",
]
NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 15:58:35 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)

STARTS = [b"GET / HTTP/1.1"] * 6 + [b"HTTP/1.1 200 OK"] * 6 + [
    b"POST /a?b=c HTTP/1.1", b"HEAD / HTTP/1.1", b"GET / HTTP/1.0", b"HTTP/1.1 204 No Content",
    b"HTTP/1.0 404 x", b"GET http://web/ HTTP/1.1",
]  # fmt: skip
NAMES = [b"User-Agent", b"Accept", b"Date", b"Server", b"X-A"] * 4 + [
    b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Keep-Alive",
    b"X-Forwarded-For", b"traceparent", b"hostmesh-source", b"Expect", b"TE", b"Upgrade",
    b"content-length", b"Proxy-Connection", b"Trailer",
]  # fmt: skip
VALUES = [
    b"web", b"web:4140", b"3", b"0", b"chunked", b"keep-alive", b"close", b"*/*", b"a b", b"",
    b" x ", b"100-continue", b"1.2.3.4", b"\x80\xff", b"12345678901234567890",
]  # fmt: skip
JUNK = [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b"\r\n", b"\r\n\r\n", b"\x7f", b"("]


def _heads(n: int, seed: int) -> list[bytes]:
    """``n`` heads (with a little body): mostly plain ones near the usual shape, some
    with one to three bytes inserted, deleted or changed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lines = [rng.choice(STARTS)]
        for _ in range(rng.randint(0, 7)):
            if rng.random() < 0.05:
                lines.append(b"Connection: keep-alive")
            else:
                space = rng.choice([b" ", b"", b"\t", b"  "])
                lines.append(rng.choice(NAMES) + b":" + space + rng.choice(VALUES))
        head = b"\r\n".join(lines) + b"\r\n\r\n" + rng.choice([b"", b"ok\n", b"body"])
        for _ in range(rng.choice([0, 0, 0, 0, 0, 1, 2, 3])):
            at = rng.randrange(len(head) + 1)
            op = rng.random()
            if op < 0.4:
                head = head[:at] + rng.choice(JUNK) + head[at:]
            elif op < 0.7:
                head = head[:at] + head[at + 1 :]
            else:
                head = head[:at] + bytes([rng.randrange(256)]) + head[at + 1 :]
        out.append(head)
    return out


def _read(python: str, heads: list[bytes]) -> tuple[str, list[list[object]]]:
    """(version, what ``python`` makes of each head)."""
    run = subprocess.run(
        [python, "-I", "-c", DRIVER, str(Path(_http1.__file__))],
        input=json.dumps([base64.b64encode(h).decode() for h in heads]),
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    version, results = run.stdout.split("\n", 1)
    return version, json.loads(results)


def test_debians_python_reads_every_head_as_this_one_does() -> None:
    heads = [*COMMON, NGINX, *_heads(20_000, seed=11)]
    here_version, here = _read(sys.executable, heads)
    there_version, there = _read(SYSTEM_PYTHON, heads)
    differ = [(h, a, b) for h, a, b in zip(heads, here, there, strict=True) if a != b]
    assert not differ, (
        f"{len(differ)} heads read differently by {here_version} and {there_version}, "
        f"e.g. {differ[0]}"
    )
    # The comparison covers both outcomes and the express lane on both interpreters.
    for results in (here, there):
        assert all(r[2] is not None for r in results[: len(COMMON)]), "a common head is not usual"
        assert results[len(COMMON)][3] is not None, "nginx's answer is not usual"
        assert sum(r[2] is not None for r in results) > 100
        assert sum(r[3] is not None for r in results) > 25
        assert sum(r[0][0] == "refused" for r in results) > 1000
        assert sum(r[0][0] != "refused" for r in results) > 1000

"""az/region "auto" from EC2 IMDSv2, against a fake IMDS the test serves on loopback.

The fake behaves like IMDSv2 with ``HttpTokens=required``: ``PUT
/latest/api/token`` needs the TTL header, every GET needs a token it issued
(401 otherwise). Tests switch it to misbehave: hostile or oversized answers,
rejected tokens, silence. The last tests start a real ``hostmesh agent``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
from conftest import trio_test

from hostmesh import AgentConfig
from hostmesh._config import Ec2Config
from hostmesh._errors import ImdsError
from hostmesh._imds import MAX_ANSWER, Placement, fetch_placement, resolve_placement

pytestmark = pytest.mark.sockets

HOSTMESH = str(Path(sys.executable).with_name("hostmesh"))
#: The fake's answers when a test does not change them.
AZ, REGION = "eu-west-1a", "eu-west-1"


@dataclass
class FakeImds:
    """What the fake serves and what it saw. Tests change the fields directly."""

    answers: dict[str, bytes] = field(
        default_factory=lambda: {
            "/latest/meta-data/placement/availability-zone": AZ.encode(),
            "/latest/meta-data/placement/region": REGION.encode(),
        }
    )
    token: bytes | None = None  # None: a fresh random token per PUT
    status: dict[str, int] = field(default_factory=dict)  # path -> forced status
    extra_headers: dict[str, str] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)  # path -> whole response, verbatim
    reject_tokens: int = 0  # the first n tokens issued are refused on GET (expired)
    issued: list[str] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""


def _handler(fake: FakeImds) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in fake.extra_headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)  # a client refusing a large answer hangs up

        def do_PUT(self) -> None:
            fake.requests.append(("PUT", self.path, dict(self.headers)))
            if self.path != "/latest/api/token":
                return self._send(405)
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return self._send(400)
            token = fake.token if fake.token is not None else secrets.token_urlsafe(40).encode()
            fake.issued.append(token.decode(errors="replace"))
            self._send(fake.status.get(self.path, 200), token)

        def do_GET(self) -> None:
            fake.requests.append(("GET", self.path, dict(self.headers)))
            token = self.headers.get("X-aws-ec2-metadata-token")
            if token is None or token not in fake.issued:
                return self._send(401)
            if fake.issued.index(token) < fake.reject_tokens:
                return self._send(401)
            if self.path in fake.status:
                return self._send(fake.status[self.path])
            if self.path in fake.raw:
                self.close_connection = True
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(fake.raw[self.path])
                return None
            if self.path not in fake.answers:
                return self._send(404)
            self._send(200, fake.answers[self.path])

    return Handler


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    fake = FakeImds()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def ec2(url: str, **kw: object) -> Ec2Config:
    return Ec2Config(imds_endpoint=url, **kw)  # type: ignore[arg-type]


@pytest.fixture
def closed_port() -> Iterator[str]:
    """An http:// URL where nothing listens (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    yield f"http://127.0.0.1:{port}"


# --- the protocol ----------------------------------------------------------------


@trio_test(10)
async def test_placement_comes_from_imdsv2_with_a_session_token(imds: FakeImds) -> None:
    assert await fetch_placement(ec2(imds.url)) == Placement(az=AZ, region=REGION)
    (put, *gets) = imds.requests
    assert put[:2] == ("PUT", "/latest/api/token")
    assert put[2]["X-aws-ec2-metadata-token-ttl-seconds"] == "60"
    assert [g[:2] for g in gets] == [
        ("GET", "/latest/meta-data/placement/availability-zone"),
        ("GET", "/latest/meta-data/placement/region"),
    ]
    assert {g[2]["X-aws-ec2-metadata-token"] for g in gets} == {imds.issued[0]}


def test_the_fake_refuses_a_get_without_a_token(imds: FakeImds) -> None:
    # IMDSv1-style requests fail, so the test above proves the token is sent.
    response = httpx.get(f"{imds.url}/latest/meta-data/placement/availability-zone", timeout=5)
    assert response.status_code == 401
    response = httpx.put(f"{imds.url}/latest/api/token", timeout=5)
    assert response.status_code == 400  # no TTL header


@trio_test(10)
async def test_a_refused_token_is_retried_with_a_new_one(imds: FakeImds) -> None:
    imds.reject_tokens = 1
    assert await fetch_placement(ec2(imds.url)) == Placement(az=AZ, region=REGION)
    assert [r[0] for r in imds.requests] == ["PUT", "GET", "PUT", "GET", "GET"]


@trio_test(10)
async def test_every_attempt_refused_names_the_last_reason(imds: FakeImds) -> None:
    imds.reject_tokens = 10
    with pytest.raises(ImdsError, match=r"GET /latest/meta-data/placement/availability-zone: "
                                        r"HTTP 401 \(2 attempts\)"):  # fmt: skip
        await fetch_placement(ec2(imds.url))
    assert len(imds.issued) == 2


@trio_test(10)
async def test_proxy_environment_is_ignored(
    imds: FakeImds, monkeypatch: pytest.MonkeyPatch, closed_port: str
) -> None:
    # A host-wide http_proxy must never see the IMDS token (nor break the lookup).
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, closed_port)
    assert await fetch_placement(ec2(imds.url)) == Placement(az=AZ, region=REGION)


@trio_test(10)
async def test_transport_is_injectable() -> None:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url}")
        if request.method == "PUT":
            return httpx.Response(200, content=b"tok")
        assert request.headers["X-aws-ec2-metadata-token"] == "tok"
        return httpx.Response(200, content=b"us-east-1-bos-1a" if "zone" in str(request.url)
                              else b"us-east-1")  # fmt: skip

    got = await fetch_placement(Ec2Config(), transport=httpx.MockTransport(handle))
    assert got == Placement(az="us-east-1-bos-1a", region="us-east-1")
    assert seen[0] == "PUT http://169.254.169.254/latest/api/token"


# --- hostile and broken answers --------------------------------------------------


@trio_test(10)
async def test_an_oversized_answer_is_refused(imds: FakeImds) -> None:
    imds.answers["/latest/meta-data/placement/availability-zone"] = b"a" * (1024 * 1024)
    with pytest.raises(ImdsError, match=f"answer larger than {MAX_ANSWER} bytes, refused"):
        await fetch_placement(ec2(imds.url))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1000\r\n" + b"a" * 4096,
         "answer without Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n" + b"a" * 4096,
         f"answer larger than {MAX_ANSWER} bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 20\r\n\r\n"
         + b"\x1f\x8b" + b"\0" * 18, "compressed answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "RemoteProtocolError"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "RemoteProtocolError"),
    ],
    ids=["chunked-endless", "huge-length", "gzip", "bad-length", "not-http"],
)  # fmt: skip
@trio_test(10)
async def test_a_hostile_http_answer_is_refused(imds: FakeImds, raw: bytes, reason: str) -> None:
    imds.raw["/latest/meta-data/placement/availability-zone"] = raw
    with pytest.raises(ImdsError, match=f"availability-zone: {reason}"):
        await fetch_placement(ec2(imds.url))


@pytest.mark.parametrize(
    "answer",
    [
        b"eu-west-1a\r\nX-Injected: 1",
        b"eu-west-1a; rm -rf /",
        b"../../etc/passwd",
        b"EU-WEST-1A",
        b"-eu-west-1a",
        b"",
        b"a" * 64,  # longer than a DNS label
        "eu-wëst-1a".encode(),
        b"\xff\xfe",
    ],
)
@trio_test(10)
async def test_a_malformed_az_is_refused(imds: FakeImds, answer: bytes) -> None:
    imds.answers["/latest/meta-data/placement/availability-zone"] = answer
    with pytest.raises(ImdsError, match="refused"):
        await fetch_placement(ec2(imds.url))


@pytest.mark.parametrize("token", [b"x" * 2000, b"tok\r\nX-Evil: 1", b"tok en", b""])
@trio_test(10)
async def test_a_hostile_token_is_refused_before_any_get(imds: FakeImds, token: bytes) -> None:
    imds.token = token
    with pytest.raises(ImdsError, match=r"PUT /latest/api/token: .*refused"):
        await fetch_placement(ec2(imds.url))
    assert all(r[0] == "PUT" for r in imds.requests)


@pytest.mark.parametrize("status", [301, 403, 404, 500])
@trio_test(10)
async def test_a_non_200_answer_is_an_error(imds: FakeImds, status: int) -> None:
    imds.status["/latest/meta-data/placement/region"] = status
    imds.extra_headers["Location"] = "http://example.invalid/"
    with pytest.raises(ImdsError, match=f"GET /latest/meta-data/placement/region: HTTP {status}"):
        await fetch_placement(ec2(imds.url))


@trio_test(10)
async def test_imds_down_fails_fast(closed_port: str) -> None:
    start = time.monotonic()
    with pytest.raises(ImdsError, match=r"PUT /latest/api/token: ConnectError"):
        await fetch_placement(ec2(closed_port))
    assert time.monotonic() - start < 1.0


@trio_test(10)
async def test_a_silent_imds_times_out_per_request() -> None:
    # Accepts connections (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ImdsError, match=r"no answer within 0.2 s \(2 attempts\)"):
            await fetch_placement(ec2(url, imds_timeout=0.2))
        assert 0.35 < time.monotonic() - start < 2.0


# --- resolving the config --------------------------------------------------------


def cfg(tmp_path: Path, **kw: object) -> AgentConfig:
    return replace(AgentConfig.dev(str(tmp_path)), **kw)  # type: ignore[arg-type]


@trio_test(10)
async def test_auto_values_are_replaced(imds: FakeImds, tmp_path: Path) -> None:
    config = cfg(tmp_path, az="auto", region="auto", ec2=ec2(imds.url))
    resolved = await resolve_placement(config)
    assert (resolved.az, resolved.region) == (AZ, REGION)
    assert replace(resolved, az="auto", region="auto") == config


@trio_test(10)
async def test_only_the_auto_value_is_replaced(imds: FakeImds, tmp_path: Path) -> None:
    resolved = await resolve_placement(cfg(tmp_path, az="auto", region="r1", ec2=ec2(imds.url)))
    assert (resolved.az, resolved.region) == (AZ, "r1")


@trio_test(10)
async def test_no_auto_means_no_request(imds: FakeImds, tmp_path: Path) -> None:
    config = cfg(tmp_path, az="eu-west-1b", region="eu-west-1", ec2=ec2(imds.url))
    assert await resolve_placement(config) is config
    assert imds.requests == []


@trio_test(10)
async def test_imds_down_falls_back_to_no_az_with_a_warning(
    closed_port: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = cfg(tmp_path, az="auto", region="auto", ec2=ec2(closed_port))
    with caplog.at_level(logging.WARNING, logger="hostmesh.imds"):
        resolved = await resolve_placement(config)
    assert (resolved.az, resolved.region) == ("", "")
    (record,) = caplog.records
    assert record.getMessage().startswith('EC2 placement unknown: az/region "auto" fall back')
    fields = record.__dict__["hostmesh_fields"]
    assert closed_port in fields["error"] and "ConnectError" in fields["error"]


@trio_test(10)
async def test_imds_required_stops_the_start(closed_port: str, tmp_path: Path) -> None:
    config = cfg(tmp_path, az="auto", ec2=ec2(closed_port, imds_required=True))
    with pytest.raises(ImdsError, match=r'^az/region "auto": http://127\.0\.0\.1:\d+: PUT'):
        await resolve_placement(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [("imds_endpoint", '"https://169.254.169.254"'), ("imds_endpoint", '"169.254.169.254"'),
     ("imds_endpoint", '"http://h/latest"'), ("imds_timeout", '"0s"'), ("imds_attempts", "0")],
)  # fmt: skip
def test_bad_ec2_settings_name_the_key(tmp_path: Path, key: str, value: str) -> None:
    (tmp_path / "agent.toml").write_text(f'az = "auto"\n[ec2]\n{key} = {value}\n')
    done = subprocess.run(
        [HOSTMESH, "agent", "-c", str(tmp_path / "agent.toml")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {tmp_path / 'agent.toml'}: ec2.{key}: ")
    assert "Traceback" not in done.stderr


# --- a real agent ----------------------------------------------------------------


def agent_toml(tmp_path: Path, endpoint: str, extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'node_name = "ec2-node"\naz = "auto"\nregion = "auto"\n'
        f'data_dir = "{tmp_path / "data"}"\nservices_dir = "{tmp_path / "services.d"}"\n'
        '[api]\nbind = "127.0.0.1:0"\n[dns]\nbind = "127.0.0.1:0"\nresolv_conf = ""\n'
        '[gossip]\nbind = "127.0.0.1:0"\n[proxy]\nbind = "127.0.0.1:0"\n'
        f'[ec2]\nimds_endpoint = "{endpoint}"\nimds_timeout = "300ms"\n{extra}'
    )
    return path


@contextlib.contextmanager
def run_agent(toml: Path) -> Iterator[tuple[str, list[dict[str, object]]]]:
    """Start an agent; yield its API address and log records up to "agent started"."""
    proc = subprocess.Popen(
        [HOSTMESH, "agent", "-c", str(toml), "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=toml.parent,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        records: list[dict[str, object]] = []
        deadline = time.monotonic() + 20
        os.set_blocking(proc.stderr.fileno(), True)
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"agent exited: {records}")
            records.append(json.loads(line))
            if records[-1]["msg"] == "agent started":
                yield str(records[-1]["api"]), records
                return
        raise AssertionError(f"no 'agent started' in {records}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()


def test_agent_with_az_auto_reports_the_ec2_placement(imds: FakeImds, tmp_path: Path) -> None:
    imds.answers["/latest/meta-data/placement/availability-zone"] = b"eu-central-1b"
    imds.answers["/latest/meta-data/placement/region"] = b"eu-central-1"
    with run_agent(agent_toml(tmp_path, imds.url)) as (api, records):
        me = httpx.get(f"http://{api}/v1/agent/self", timeout=5).json()
        assert me["Locality"] == {"Region": "eu-central-1", "Zone": "eu-central-1b"}
        assert records[-1]["az"] == "eu-central-1b"
        assert any(r["msg"] == "EC2 placement from IMDS" for r in records)


def test_agent_without_imds_starts_with_no_az_and_says_why(
    closed_port: str, tmp_path: Path
) -> None:
    with run_agent(agent_toml(tmp_path, closed_port)) as (api, records):
        me = httpx.get(f"http://{api}/v1/agent/self", timeout=5).json()
        assert me["Locality"] == {"Region": "", "Zone": ""}
        (warning,) = [r for r in records if r["level"] == "warning"]
        assert str(warning["msg"]).startswith('EC2 placement unknown: az/region "auto"')
        assert closed_port in str(warning["error"])


def test_agent_with_imds_required_fails_in_one_line(closed_port: str, tmp_path: Path) -> None:
    toml = agent_toml(tmp_path, closed_port, "imds_required = true\n")
    done = subprocess.run(
        [HOSTMESH, "agent", "-c", str(toml)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f'error: az/region "auto": {closed_port}: PUT /latest/api/token: ')

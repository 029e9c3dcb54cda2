"""Health checks: the sans-IO status machine, then the runner on real sockets and scripts."""

from __future__ import annotations

import datetime
import functools
import inspect
import ipaddress
import random
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hostmesh import CheckDefinition, ValidationError
from hostmesh._config import MAX_CHECK_OUTPUT
from hostmesh.agent._checks import (
    USER_AGENT,
    CheckRunner,
    CheckStatusMachine,
    truncate_output,
)
from hostmesh.catalog import Health

PASSING, WARNING, CRITICAL = Health.PASSING, Health.WARNING, Health.CRITICAL
HOUR = 3600.0  # an interval long enough that a test only ever sees the first run

# --- helpers ---------------------------------------------------------------------------


def trio_test(
    *, mock_clock: bool = False, timeout: float | None = None
) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    """Run an async test in ``trio.run``, bounded by ``fail_after(timeout)``.

    ``mock_clock``: virtual time that jumps whenever every task is blocked
    (``MockClock(autojump_threshold=0)``); only for tests without real I/O. The
    bound is then virtual too (default one day: a hung test fails at once).
    Real-time tests default to 10 s.
    """
    if timeout is None:
        timeout = 24 * 3600.0 if mock_clock else 10.0

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            async def main() -> None:
                with trio.fail_after(timeout):
                    await fn(*args, **kwargs)

            clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
            trio.run(main, clock=clock)

        return wrapper

    return decorate


def _bytes(text: str) -> int:
    return len(text.encode("utf-8"))


class NoJitter(random.Random):
    """Makes the first run start at once."""

    def random(self) -> float:
        return 0.0


class Recorder:
    """The ``on_change`` callback: records every change, lets a test wait for the n-th."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, Health, str]] = []
        self.times: list[float] = []
        self._event = trio.Event()

    def __call__(self, check_id: str, status: Health, output: str) -> None:
        self.changes.append((check_id, status, output))
        self.times.append(trio.current_time())
        self._event.set()
        self._event = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.changes) < count:
            await self._event.wait()


async def first_result(
    defn: CheckDefinition, transport: httpx.AsyncBaseTransport | None = None
) -> tuple[CheckRunner, Health, str]:
    """Start a runner without jitter, wait for its first change, stop it."""
    recorder = Recorder()
    runner = CheckRunner("web-1", defn, recorder, http_transport=transport, rng=NoJitter())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await recorder.wait_for(1)
        nursery.cancel_scope.cancel()
    check_id, status, output = recorder.changes[0]
    assert check_id == "web-1"
    assert (runner.status, runner.output) == (status, output)
    return runner, status, output


def process_is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- a tiny real HTTP/1.1 server -------------------------------------------------------

HUGE_BODY = 64 * 1024 * 1024  # bytes announced by /huge; far more than a check may read
_SEND_CHUNK = 64 * 1024


class HttpStats:
    def __init__(self) -> None:
        self.huge_sent = 0  # bytes of /huge sent before the client hung up


async def _handle(stream: trio.abc.Stream, stats: HttpStats) -> None:
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(_SEND_CHUNK)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        _method, path, _version = head.split("\r\n", 1)[0].split(" ")
        extra = ""
        if path == "/ok":
            code, reason, body = 200, "OK", b"all good"
        elif path == "/busy":
            code, reason, body = 429, "Too Many Requests", b"slow down"
        elif path == "/fail":
            code, reason, body = 500, "Internal Server Error", b"db down"
        elif path == "/echo":
            code, reason, body = 200, "OK", head.encode("latin-1")
        elif path == "/redirect":
            code, reason, body, extra = 302, "Found", b"", "Location: /ok\r\n"
        elif path == "/slow":
            await trio.sleep(HOUR)
            return
        elif path == "/huge":
            await stream.send_all(
                f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE_BODY}\r\n\r\n".encode()
            )
            block = b"x" * _SEND_CHUNK
            while stats.huge_sent < HUGE_BODY:
                await stream.send_all(block)
                stats.huge_sent += len(block)
            return
        else:
            code, reason, body = 404, "Not Found", b"no route"
        await stream.send_all(
            f"HTTP/1.1 {code} {reason}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n".encode()
            + body
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the check hung up, as it should on a huge body
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http(
    stats: HttpStats, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    task_status.started(port)
    await trio.serve_listeners(functools.partial(_handle, stats=stats), listeners)


def self_signed_context() -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context.load_cert_chain(cert_file, key_file)
    return context


async def serve_https(
    stats: HttpStats, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_ssl_over_tcp_listeners(
        0, self_signed_context(), host="127.0.0.1", https_compatible=True
    )
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    task_status.started(port)
    await trio.serve_listeners(functools.partial(_handle, stats=stats), listeners)


@asynccontextmanager
async def http_server(*, tls: bool = False) -> AsyncIterator[tuple[str, HttpStats]]:
    """A loopback HTTP(S) server; yields its base URL and stats."""
    stats = HttpStats()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_https if tls else serve_http, stats)
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", stats
        nursery.cancel_scope.cancel()


# --- the status machine (no trio) -------------------------------------------------------


def machine(**fields: Any) -> CheckStatusMachine:
    return CheckStatusMachine(CheckDefinition(ttl=30, **fields), now=100.0)


def test_status_machine_does_no_io() -> None:
    source = inspect.getsource(CheckStatusMachine)
    assert "trio" not in source
    assert "await" not in source


def test_new_check_starts_critical_since_registration() -> None:
    m = machine()
    assert (m.status, m.output, m.critical_since) == (CRITICAL, "", 100.0)


def test_initial_status_from_definition() -> None:
    m = machine(status="passing")
    assert (m.status, m.critical_since) == (PASSING, None)
    assert machine(status="warning").status is WARNING


def test_without_thresholds_every_result_applies_at_once() -> None:
    m = machine()
    assert m.observe(PASSING, "up", 1.0) is True
    assert (m.status, m.output) == (PASSING, "up")
    assert m.observe(WARNING, "slow", 2.0) is True
    assert (m.status, m.output) == (WARNING, "slow")
    assert m.observe(CRITICAL, "down", 3.0) is True
    assert (m.status, m.output) == (CRITICAL, "down")
    assert m.observe(CRITICAL, "down", 4.0) is False  # nothing new
    assert m.observe(CRITICAL, "still down", 5.0) is True  # output alone is a change
    assert (m.status, m.output) == (CRITICAL, "still down")


@pytest.mark.parametrize("threshold", [0, 1])
def test_threshold_zero_and_one_both_mean_at_once(threshold: int) -> None:
    m = machine(success_before_passing=threshold, failures_before_critical=threshold)
    for status in (PASSING, CRITICAL, PASSING, WARNING, CRITICAL):
        assert m.observe(status, status.value, 0.0) is True
        assert m.status is status


def test_first_result_applies_at_once_like_consul() -> None:
    # Consul's NewStatusHandler starts both counters at their threshold.
    m = machine(success_before_passing=3, failures_before_critical=3)
    assert m.observe(PASSING, "up", 1.0) is True
    assert (m.status, m.output) == (PASSING, "up")


def test_success_before_passing_needs_consecutive_passes() -> None:
    m = machine(success_before_passing=3, status="passing")
    assert m.observe(CRITICAL, "down", 1.0) is True  # failures apply at once
    assert m.observe(PASSING, "up 1", 2.0) is False
    assert m.observe(PASSING, "up 2", 3.0) is False
    assert (m.status, m.output) == (CRITICAL, "down")  # output still explains the status
    assert m.observe(CRITICAL, "down again", 4.0) is True  # resets the success count
    assert m.observe(PASSING, "up 1", 5.0) is False
    assert m.observe(PASSING, "up 2", 6.0) is False
    assert m.observe(PASSING, "up 3", 7.0) is True
    assert (m.status, m.output) == (PASSING, "up 3")


def test_failures_before_critical_needs_consecutive_failures() -> None:
    m = machine(failures_before_critical=3, status="passing")
    assert m.observe(PASSING, "up", 1.0) is True
    assert m.observe(CRITICAL, "blip 1", 2.0) is False
    assert m.observe(CRITICAL, "blip 2", 3.0) is False
    assert (m.status, m.output, m.critical_since) == (PASSING, "up", None)
    assert m.observe(PASSING, "up", 4.0) is False  # resets the failure count, same output
    assert m.observe(CRITICAL, "down 1", 5.0) is False
    assert m.observe(CRITICAL, "down 2", 6.0) is False
    assert m.observe(CRITICAL, "down 3", 7.0) is True
    assert (m.status, m.output, m.critical_since) == (CRITICAL, "down 3", 7.0)


def test_warning_counts_as_a_success() -> None:
    m = machine(success_before_passing=2, failures_before_critical=2)
    assert m.observe(PASSING, "up", 1.0) is True  # the first result applies at once
    assert m.observe(CRITICAL, "down 1", 2.0) is False
    assert m.observe(WARNING, "degraded", 3.0) is False  # resets failures, 1 success of 2
    assert m.observe(CRITICAL, "down 1", 4.0) is False  # so one failure is not enough
    assert (m.status, m.output) == (PASSING, "up")
    assert m.observe(CRITICAL, "down 2", 5.0) is True
    assert m.status is CRITICAL
    assert m.observe(WARNING, "degraded", 6.0) is False
    assert m.observe(WARNING, "degraded", 7.0) is True  # two successes: status = the result
    assert (m.status, m.output, m.critical_since) == (WARNING, "degraded", None)


def test_force_bypasses_thresholds() -> None:
    m = machine(success_before_passing=5, failures_before_critical=5, status="passing")
    assert m.force(CRITICAL, "ttl says no", 1.0) is True
    assert (m.status, m.critical_since) == (CRITICAL, 1.0)
    assert m.force(PASSING, "ttl says yes", 2.0) is True
    assert (m.status, m.critical_since) == (PASSING, None)


def test_critical_since_is_when_the_status_became_critical() -> None:
    m = machine()
    assert m.critical_since == 100.0
    m.observe(CRITICAL, "down", 110.0)
    assert m.critical_since == 100.0  # already critical since registration
    m.observe(PASSING, "up", 120.0)
    assert m.critical_since is None
    m.observe(WARNING, "meh", 125.0)
    assert m.critical_since is None
    m.observe(CRITICAL, "down", 130.0)
    m.observe(CRITICAL, "still down", 140.0)
    assert m.critical_since == 130.0


def test_output_is_capped_at_4_kib_and_says_so() -> None:
    m = machine()
    assert m.observe(PASSING, "a" * 10_000, 1.0) is True
    assert _bytes(m.output) <= MAX_CHECK_OUTPUT
    assert m.output.startswith("a" * 4000)
    assert m.output.endswith("(output truncated from 10000 bytes)")
    exact = "b" * MAX_CHECK_OUTPUT
    m.observe(PASSING, exact, 2.0)
    assert m.output == exact  # at the limit nothing is cut


def test_truncation_never_cuts_a_character() -> None:
    for text in ("é" * 5000, "€" * 3000, "a" + "😀" * 2000):
        out = truncate_output(text)
        assert _bytes(out) <= MAX_CHECK_OUTPUT
        assert "\ufffd" not in out
        assert out.endswith(f"(output truncated from {_bytes(text)} bytes)")
        kept = out.split(" ... (output truncated", 1)[0]
        assert text.startswith(kept) and len(kept) > 1000


# --- TTL checks (virtual time) ----------------------------------------------------------


@trio_test(mock_clock=True)
async def test_ttl_check_passes_on_update_and_expires_without_one() -> None:
    recorder = Recorder()
    runner = CheckRunner("ttl-1", CheckDefinition(ttl=30), recorder)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        assert (runner.status, runner.critical_since) == (CRITICAL, 0.0)

        await trio.sleep(5)
        runner.ttl_update(PASSING, "worker loop alive")
        assert recorder.changes == [("ttl-1", PASSING, "worker loop alive")]
        assert runner.critical_since is None

        await trio.sleep(29)  # t=34 < 5 + 30: still passing
        assert runner.status is PASSING
        runner.ttl_update(PASSING, "worker loop alive")  # re-arms to t=64, no change
        assert len(recorder.changes) == 1

        await recorder.wait_for(2)
        assert recorder.times[1] == pytest.approx(64.0)
        assert recorder.changes[1] == (
            "ttl-1",
            CRITICAL,
            "TTL expired (last output before timeout follows): worker loop alive",
        )
        assert runner.critical_since == pytest.approx(64.0)

        await trio.sleep(300)  # expiry fires once, not every ttl
        assert len(recorder.changes) == 2

        runner.ttl_update(WARNING, "backlog growing")
        assert (runner.status, runner.output) == (WARNING, "backlog growing")
        nursery.cancel_scope.cancel()


@trio_test(mock_clock=True)
async def test_ttl_check_never_updated_expires_after_ttl() -> None:
    recorder = Recorder()
    runner = CheckRunner("ttl-1", CheckDefinition(ttl=10), recorder)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await recorder.wait_for(1)
        nursery.cancel_scope.cancel()
    assert recorder.changes == [("ttl-1", CRITICAL, "TTL expired")]
    assert recorder.times == [pytest.approx(10.0)]
    assert runner.critical_since == 0.0  # critical since registration, not since expiry


@trio_test(mock_clock=True)
async def test_ttl_updates_bypass_thresholds_and_are_capped() -> None:
    recorder = Recorder()
    defn = CheckDefinition(ttl=10, failures_before_critical=3, success_before_passing=3)
    runner = CheckRunner("ttl-1", defn, recorder)
    runner.ttl_update(PASSING, "ok")
    runner.ttl_update(CRITICAL, "x" * 100_000)
    assert runner.status is CRITICAL
    assert _bytes(runner.output) <= MAX_CHECK_OUTPUT
    assert runner.output.endswith("(output truncated from 100000 bytes)")
    assert [c[1] for c in recorder.changes] == [PASSING, CRITICAL]


@trio_test(mock_clock=True)
async def test_ttl_update_on_other_checks_is_refused() -> None:
    runner = CheckRunner("web-http", CheckDefinition(http="http://127.0.0.1:1/"), Recorder())
    with pytest.raises(ValidationError, match="check web-http is not a TTL check"):
        runner.ttl_update(PASSING, "ok")
    assert runner.status is CRITICAL


# --- scheduling and robustness (virtual time, in-memory HTTP) -----------------------------


def counting_transport(times: list[float], codes: list[int] | None = None) -> httpx.MockTransport:
    """Answers with the next code of ``codes`` (then 200) and records request times."""

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        code = codes.pop(0) if codes else 200
        return httpx.Response(code, text=f"run {len(times)}")

    return httpx.MockTransport(handler)


@trio_test(mock_clock=True)
async def test_first_run_is_jittered_then_every_interval() -> None:
    times: list[float] = []
    defn = CheckDefinition(http="http://svc.local/health", interval=10)
    runner = CheckRunner(
        "web", defn, Recorder(), http_transport=counting_transport(times), rng=random.Random(7)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(35)
        nursery.cancel_scope.cancel()
    stagger = random.Random(7).random() * 10
    assert 0 < stagger < 10
    assert times == pytest.approx([stagger, stagger + 10, stagger + 20, stagger + 30][: len(times)])
    assert len(times) == (4 if stagger < 5 else 3)
    assert runner.status is PASSING


@trio_test(mock_clock=True)
async def test_checks_registered_together_are_spread_over_the_interval() -> None:
    times: list[float] = []
    rng = random.Random(1)
    defn = CheckDefinition(http="http://svc.local/health", interval=10)
    async with trio.open_nursery() as nursery:
        for i in range(20):
            runner = CheckRunner(
                f"c{i}", defn, Recorder(), http_transport=counting_transport(times), rng=rng
            )
            nursery.start_soon(runner.run)
        await trio.sleep(9.999)
        nursery.cancel_scope.cancel()
    assert len(times) == 20  # every check ran once within the first interval
    assert all(0 <= t < 10 for t in times)
    assert max(times) - min(times) > 5  # and not all at the same moment


@trio_test(mock_clock=True)
async def test_a_crashing_probe_is_critical_and_the_runner_keeps_going() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("transport bug\non two lines")
        return httpx.Response(200, text="recovered")

    recorder = Recorder()
    defn = CheckDefinition(http="http://svc.local/health", interval=10)
    runner = CheckRunner(
        "web", defn, recorder, http_transport=httpx.MockTransport(handler), rng=NoJitter()
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await recorder.wait_for(2)
        nursery.cancel_scope.cancel()
    assert recorder.changes[0] == (
        "web",
        CRITICAL,
        "check failed: RuntimeError: transport bug on two lines",
    )
    assert recorder.changes[1][1:] == (
        PASSING,
        "HTTP GET http://svc.local/health: 200 OK Output: recovered",
    )


@trio_test(mock_clock=True)
async def test_runner_applies_failures_before_critical() -> None:
    times: list[float] = []
    recorder = Recorder()
    defn = CheckDefinition(http="http://svc.local/h", interval=10, failures_before_critical=2)
    transport = counting_transport(times, codes=[200, 503, 200, 503, 503])
    runner = CheckRunner("web", defn, recorder, http_transport=transport, rng=NoJitter())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(45)  # runs at t = 0, 10, 20, 30, 40
        nursery.cancel_scope.cancel()
    assert len(times) == 5
    assert [(status, output[-5:]) for _, status, output in recorder.changes] == [
        (PASSING, "run 1"),
        (PASSING, "run 3"),  # run 2's single 503 did not count
        (CRITICAL, "run 5"),
    ]
    assert runner.critical_since == pytest.approx(40.0)


# --- HTTP checks on a real server -------------------------------------------------------


@pytest.mark.sockets
@trio_test()
async def test_http_status_codes_map_to_health() -> None:
    async with http_server() as (base, _stats):
        _, status, output = await first_result(CheckDefinition(http=f"{base}/ok"))
        assert (status, output) == (PASSING, f"HTTP GET {base}/ok: 200 OK Output: all good")

        _, status, output = await first_result(CheckDefinition(http=f"{base}/busy"))
        assert status is WARNING
        assert output == f"HTTP GET {base}/busy: 429 Too Many Requests Output: slow down"

        _, status, output = await first_result(CheckDefinition(http=f"{base}/fail"))
        assert status is CRITICAL
        assert output == f"HTTP GET {base}/fail: 500 Internal Server Error Output: db down"


@pytest.mark.sockets
@trio_test()
async def test_http_check_sends_method_and_headers() -> None:
    async with http_server() as (base, _stats):
        defn = CheckDefinition(http=f"{base}/echo", method="POST", header={"X-Token": "s3cret"})
        _, status, output = await first_result(defn)
    assert status is PASSING
    assert "Output: POST /echo HTTP/1.1" in output
    assert "x-token: s3cret" in output.lower()
    assert f"user-agent: {USER_AGENT}".lower() in output.lower()


@pytest.mark.sockets
@trio_test()
async def test_http_check_follows_redirects() -> None:
    async with http_server() as (base, _stats):
        _, status, output = await first_result(CheckDefinition(http=f"{base}/redirect"))
    assert (status, output) == (PASSING, f"HTTP GET {base}/redirect: 200 OK Output: all good")


@pytest.mark.sockets
@trio_test()
async def test_https_certificate_is_verified_unless_told_not_to() -> None:
    async with http_server(tls=True) as (base, _stats):
        _, status, output = await first_result(CheckDefinition(http=f"{base}/ok"))
        assert status is CRITICAL
        assert output.startswith(f"HTTP GET {base}/ok: ConnectError")
        assert "CERTIFICATE_VERIFY_FAILED" in output

        defn = CheckDefinition(http=f"{base}/ok", tls_skip_verify=True)
        _, status, output = await first_result(defn)
        assert (status, output) == (PASSING, f"HTTP GET {base}/ok: 200 OK Output: all good")


@pytest.mark.sockets
@trio_test()
async def test_http_huge_body_is_not_read_whole() -> None:
    async with http_server() as (base, stats):
        _, status, output = await first_result(CheckDefinition(http=f"{base}/huge"))
        await trio.sleep(0.05)  # let the server notice the hang-up
    assert status is PASSING
    assert output.startswith(f"HTTP GET {base}/huge: 200 OK Output: xxxx")
    assert output.endswith("xxx ... (body truncated)")
    assert _bytes(output) <= MAX_CHECK_OUTPUT
    assert stats.huge_sent < HUGE_BODY // 4  # the check hung up early


@pytest.mark.sockets
@trio_test()
async def test_http_connection_refused_is_critical() -> None:
    url = f"http://127.0.0.1:{closed_port()}/health"
    _, status, output = await first_result(CheckDefinition(http=url))
    assert (status, output) == (CRITICAL, f"HTTP GET {url}: ConnectError: Connection refused")


@pytest.mark.sockets
@trio_test()
async def test_http_timeout_is_critical() -> None:
    async with http_server() as (base, _stats):
        start = trio.current_time()
        _, status, output = await first_result(CheckDefinition(http=f"{base}/slow", timeout=0.3))
        elapsed = trio.current_time() - start
    assert (status, output) == (CRITICAL, f"HTTP GET {base}/slow: timed out after 300ms")
    assert elapsed < 2


# --- TCP checks -----------------------------------------------------------------------


@pytest.mark.sockets
@trio_test()
async def test_tcp_check_passes_when_a_listener_accepts() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        _, status, output = await first_result(CheckDefinition(tcp=f"127.0.0.1:{port}"))
    finally:
        await listeners[0].aclose()
    assert (status, output) == (PASSING, f"TCP connect 127.0.0.1:{port}: Success")


@pytest.mark.sockets
@trio_test()
async def test_tcp_check_on_a_closed_port_is_critical() -> None:
    port = closed_port()
    _, status, output = await first_result(CheckDefinition(tcp=f"127.0.0.1:{port}"))
    assert (status, output) == (CRITICAL, f"TCP connect 127.0.0.1:{port}: Connection refused")


# --- script checks ---------------------------------------------------------------------


def sh(script: str, **fields: Any) -> CheckDefinition:
    return CheckDefinition(args=("sh", "-c", script), **fields)


@trio_test()
async def test_script_exit_codes_map_to_health() -> None:
    _, status, output = await first_result(sh("echo all fine"))
    assert (status, output) == (PASSING, "all fine\n")
    _, status, output = await first_result(sh("echo disk 85% full; exit 1"))
    assert (status, output) == (WARNING, "disk 85% full\n")
    _, status, output = await first_result(sh("echo out; echo err >&2; exit 2"))
    assert (status, output) == (CRITICAL, "out\nerr\n")  # stdout and stderr together
    _, status, output = await first_result(sh("echo killed; kill -9 $$"))
    assert (status, output) == (CRITICAL, "killed\n")


@trio_test()
async def test_script_timeout_kills_the_script_and_its_children() -> None:
    start = trio.current_time()
    # sh forks sleep (it does not exec it: there is a `wait` after it)
    _, status, output = await first_result(sh("sleep 30 & echo $!; wait", timeout=0.3))
    elapsed = trio.current_time() - start
    assert status is CRITICAL
    header, child_pid = output.split("\n\n")
    assert header == "Timed out (300ms) running check"
    assert elapsed < 3
    for _ in range(200):  # SIGKILL is quick, but the kernel tears down asynchronously
        if process_is_gone(int(child_pid)):
            break
        await trio.sleep(0.01)
    assert process_is_gone(int(child_pid)), "the script's child outlived the timeout"


@trio_test()
async def test_script_printing_a_megabyte_keeps_the_tail() -> None:
    script = "head -c 1048576 /dev/zero | tr '\\000' a; echo; echo END"
    _, status, output = await first_result(sh(script))
    assert status is PASSING
    assert _bytes(output) <= MAX_CHECK_OUTPUT
    header, tail = output.split("\n...\n")
    total = 1024 * 1024 + len("\nEND\n")
    assert header == f"Captured {_bytes(tail)} of {total} bytes"  # Consul's wording
    assert tail.endswith("aaa\nEND\n")  # the end of the output is what explains a failure
    assert _bytes(tail) > 4000


@trio_test()
async def test_missing_script_is_critical_not_a_crash(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-check.sh")
    _, status, output = await first_result(CheckDefinition(args=(missing, "--fast")))
    assert (status, output) == (
        CRITICAL,
        f"failed to start {missing}: No such file or directory",
    )


@trio_test()
async def test_script_runs_again_every_interval(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    script = f"echo x >> {counter}; wc -l < {counter}"
    recorder = Recorder()
    runner = CheckRunner("s", sh(script, interval=0.05), recorder, rng=NoJitter())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await recorder.wait_for(3)
        nursery.cancel_scope.cancel()
    assert [out.strip() for _, _, out in recorder.changes[:3]] == ["1", "2", "3"]

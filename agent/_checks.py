"""Health checks the agent runs for its local services (Consul-compatible).

Two layers, as in the rest of hostmesh:

- :class:`CheckStatusMachine` is sans-IO: results go in with ``now``, the
  status, output and ``critical_since`` come out. It holds Consul's
  ``success_before_passing`` / ``failures_before_critical`` rule
  (``agent/checks/check.go``, ``StatusHandler``) and the 4 KB output cap.
- :class:`CheckRunner` is the Trio adapter: one per check, it probes (HTTP,
  TCP, script) on a jittered interval or waits for TTL updates, feeds the
  machine and calls ``on_change`` when the status or output changes.

Rules and numbers from Consul's check docs and ``agent/checks/check.go``:
HTTP 2xx passing, 429 warning, else critical; script exit 0 passing, 1
warning, else critical; TCP passing when a connect completes; default timeout
10 s (scripts 30 s); first run after a random stagger within one interval
(``lib.RandomStagger``); output capped at 4 KB (``DefaultBufSize``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import signal
import ssl
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .._config import MAX_CHECK_OUTPUT, CheckDefinition, parse_hostport
from .._errors import ValidationError
from ..catalog import Health

if TYPE_CHECKING:
    # Imported where an HTTP check runs: httpx (with the CLI it loads when
    # click is installed) is the largest part of an agent's memory otherwise.
    import httpx

__all__ = [
    "HTTP_MAX_REDIRECTS",
    "USER_AGENT",
    "CheckRunner",
    "CheckStatusMachine",
    "truncate_output",
]

#: User-Agent of HTTP checks unless the definition sets one. Consul's value, so
#: services that already filter health checks out of their access logs keep doing so.
USER_AGENT = "Consul Health Check"
#: Consul's Accept header for HTTP checks.
_ACCEPT = "text/plain, text/*, */*"
#: Redirects an HTTP check follows: Consul uses Go's http.Client default, which
#: follows up to 10 (a redirect loop is then critical).
HTTP_MAX_REDIRECTS = 10
#: Bytes read from a script's output pipe per call; with the 4 KB tail buffer this
#: bounds memory per running script to about 8 KB whatever the script prints.
_SCRIPT_READ_CHUNK = MAX_CHECK_OUTPUT
#: s to reap a script after SIGKILL before giving up on it (a process stuck in
#: uninterruptible sleep must not block the runner's cancellation forever).
_REAP_TIMEOUT = 5.0
#: s to close an HTTP client's connections when the runner stops.
_CLOSE_TIMEOUT = 1.0


# --- output helpers (no I/O) --------------------------------------------------------


def _utf8_prefix(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes of ``data``, shortened so no character is cut."""
    if size >= len(data):
        return data
    size = max(size, 0)
    while size > 0 and data[size] & 0xC0 == 0x80:  # a continuation byte: back off
        size -= 1
    return data[:size]


def _utf8_suffix(data: bytes, size: int) -> bytes:
    """The last ``size`` bytes of ``data``, without a cut character at the start."""
    if size >= len(data):
        return data
    start = len(data) - max(size, 0)
    while start < len(data) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:]


def _clip(text: str, limit: int, note: str) -> str:
    """``text`` cut to fit ``limit`` UTF-8 bytes together with ``note`` appended."""
    data = text.encode("utf-8", errors="replace")
    room = limit - len(note.encode("utf-8"))
    return _utf8_prefix(data, room).decode("utf-8") + note


def truncate_output(text: str, limit: int = MAX_CHECK_OUTPUT) -> str:
    """``text`` if it fits ``limit`` UTF-8 bytes, else a prefix that says it was cut.

    The result is at most ``limit`` bytes (Consul caps check output at 4 KB) and
    never ends in half a character.
    """
    size = len(text.encode("utf-8", errors="replace"))
    if size <= limit:
        return text
    return _clip(text, limit, f" ... (output truncated from {size} bytes)")


def _go_duration(seconds: float) -> str:
    """``seconds`` written as Go's time.Duration prints it (``"30s"``, ``"1m30s"``, ``"500ms"``)."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = f"{int(hours)}h" if hours else ""
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{secs:g}s"


def _one_line(exc: BaseException) -> str:
    """An exception as one line: ``Type: message`` with whitespace collapsed.

    When the message is empty (httpx's ConnectError often is), the first cause
    in the chain that has one explains it.
    """
    reason: BaseException | None = exc
    text = ""
    for _ in range(8):  # chains are short; never loop on a cycle
        if reason is None:
            break
        text = " ".join(str(reason).split())
        if text:
            break
        reason = reason.__cause__ or reason.__context__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the status machine (sans-IO) ---------------------------------------------------


class CheckStatusMachine:
    """A check's status, output and critical time, fed with probe results.

    Consul's ``StatusHandler`` rule: a passing or warning result adds one to the
    success count and zeroes the failure count; it is applied once the success
    count reaches ``success_before_passing``. A critical result zeroes the success
    count, adds one to the failure count and is applied once that reaches
    ``failures_before_critical``. 0 and 1 both mean "at once". A result that is
    not applied changes nothing, output included, so the output always explains
    the status shown.

    As in Consul (``NewStatusHandler``), both counters start at their threshold,
    so the first result after registration is applied at once; the thresholds
    guard against flapping from then on.

    ``critical_since`` is the time the status became critical (the registration
    time for a check that starts critical), ``None`` while not critical; the
    agent deregisters a service whose check stayed critical longer than
    ``deregister_critical_service_after``.

    Args:
        defn: the check definition (thresholds and initial status).
        now: the registration time, on the caller's clock.
    """

    def __init__(self, defn: CheckDefinition, *, now: float = 0.0) -> None:
        self._success_before_passing = defn.success_before_passing
        self._failures_before_critical = defn.failures_before_critical
        self._successes = defn.success_before_passing
        self._failures = defn.failures_before_critical
        self.status = Health(defn.status)
        self.output = ""
        self.critical_since: float | None = now if self.status is Health.CRITICAL else None

    def observe(self, result: Health, output: str, now: float) -> bool:
        """Feed one probe result; return True when the status or output changed."""
        if result is Health.CRITICAL:
            self._successes = 0
            self._failures += 1
            if self._failures < self._failures_before_critical:
                return False
        else:
            self._failures = 0
            self._successes += 1
            if self._successes < self._success_before_passing:
                return False
        return self.force(result, output, now)

    def force(self, status: Health, output: str, now: float) -> bool:
        """Set the status, bypassing the thresholds (TTL updates and expiry, as in Consul).

        Returns True when the status or output changed.
        """
        output = truncate_output(output)
        changed = status is not self.status or output != self.output
        if status is Health.CRITICAL and self.status is not Health.CRITICAL:
            self.critical_since = now
        elif status is not Health.CRITICAL:
            self.critical_since = None
        self.status = status
        self.output = output
        return changed


# --- the Trio runner ----------------------------------------------------------------


class _TailBuffer:
    """Keeps the last ``limit`` bytes written and counts all of them (Consul's circbuf)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._data = bytearray()

    def write(self, chunk: bytes | bytearray) -> None:
        self.total += len(chunk)
        self._data += chunk[-self.limit :]
        del self._data[: -self.limit]

    def text(self) -> str:
        """The captured output; when some was dropped, Consul's "Captured N of M bytes" header."""
        data = bytes(self._data)
        if self.total <= len(data):
            return data.decode("utf-8", errors="replace")
        header_max = len(f"Captured {self.limit} of {self.total} bytes\n...\n")
        tail = _utf8_suffix(data, self.limit - header_max)
        header = f"Captured {len(tail)} of {self.total} bytes\n...\n"
        return header + tail.decode("utf-8", errors="replace")


@functools.cache
def _verifying_ssl_context() -> ssl.SSLContext:
    """The system/certifi trust store, loaded once per process and shared by all
    runners: loading it takes ~100 ms, which would stall the event loop per check."""
    import httpx

    return httpx.create_ssl_context()


def _connect_reason(exc: OSError) -> str:
    """Why a TCP connect failed: the first attempt's error, not trio's summary."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for inner in cause.exceptions:
            if isinstance(inner, OSError) and inner.errno:
                return os.strerror(inner.errno)  # trio's strerror also names the address
    return exc.strerror or _one_line(exc)


def _http_reason(exc: httpx.HTTPError) -> str:
    """An httpx error as one line, with the connect reason rather than trio's summary."""
    reason: BaseException | None = exc
    for _ in range(8):  # chains are short; never loop on a cycle
        if reason is None:
            break
        if isinstance(reason, OSError) and isinstance(reason.__cause__, BaseExceptionGroup):
            return f"{type(exc).__name__}: {_connect_reason(reason)}"
        reason = reason.__cause__ or reason.__context__
    return _one_line(exc)


class CheckRunner:
    """Runs one check of a local service until cancelled.

    Create it inside ``trio.run`` (it reads ``trio.current_time()``). HTTP, TCP
    and script checks run first after a random delay within ``[0, interval)``,
    then ``interval`` after each run ends (Consul's ``run`` loops). A TTL check
    does not probe: it is critical with ``"TTL expired"`` unless
    :meth:`ttl_update` is called within ``ttl`` seconds of the last update (or of
    creation).

    Nothing a probe does stops the runner: every error becomes a critical
    result with a one-line output. Exceptions raised by ``on_change`` propagate
    (a bug in the caller).

    Args:
        check_id: the check's id, passed back to ``on_change``.
        defn: the check definition.
        on_change: called as ``on_change(check_id, status, output)`` each time
            the status or the output changes.
        http_transport: the transport of HTTP checks (tests pass a
            ``MockTransport``); the caller owns it and the runner never closes it.
            ``None``: a transport owned by the runner, one connection per run.
        rng: source of the start jitter; a seeded one makes it reproducible.
    """

    def __init__(
        self,
        check_id: str,
        defn: CheckDefinition,
        on_change: Callable[[str, Health, str], None],
        *,
        http_transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.check_id = check_id
        self.definition = defn
        self._on_change = on_change
        self._http_transport = http_transport
        self._rng = rng if rng is not None else random.Random()
        now = trio.current_time()
        self._machine = CheckStatusMachine(defn, now=now)
        # TTL checks: when the status expires, re-armed by every update.
        self._ttl_deadline = now + defn.ttl if defn.kind == "ttl" else math.inf
        self._ttl_rearmed = trio.Event()
        self._ttl_last_output = ""

    @property
    def status(self) -> Health:
        return self._machine.status

    @property
    def output(self) -> str:
        return self._machine.output

    @property
    def critical_since(self) -> float | None:
        """``trio.current_time()`` when the check became critical; None while not critical."""
        return self._machine.critical_since

    # -- TTL -----------------------------------------------------------------------

    def ttl_update(self, status: Health, output: str) -> None:
        """Set a TTL check's status now (no thresholds, as in Consul) and re-arm its TTL.

        Raises:
            ValidationError: the check is not a TTL check.
        """
        if self.definition.kind != "ttl":
            raise ValidationError(f"check {self.check_id} is not a TTL check")
        self._ttl_deadline = trio.current_time() + self.definition.ttl
        self._ttl_last_output = truncate_output(output)
        self._ttl_rearmed.set()
        self._ttl_rearmed = trio.Event()
        self._apply(self._machine.force(status, output, trio.current_time()))

    async def _run_ttl(self) -> None:
        while True:
            rearmed = self._ttl_rearmed
            with trio.move_on_at(self._ttl_deadline) as scope:
                await rearmed.wait()
            if scope.cancelled_caught:
                # Consul's CheckTTL.getExpiredOutput: keep the last output for context.
                output = "TTL expired"
                if self._ttl_last_output:
                    output += f" (last output before timeout follows): {self._ttl_last_output}"
                self._ttl_deadline = math.inf  # fires once; the next update re-arms it
                self._apply(self._machine.force(Health.CRITICAL, output, trio.current_time()))

    # -- probing -------------------------------------------------------------------

    async def run(self) -> None:
        """Run the check until cancelled; never returns."""
        if self.definition.kind == "ttl":
            await self._run_ttl()
            return
        client = self._new_client() if self.definition.kind == "http" else None
        try:
            # Consul's lib.RandomStagger: uniform in [0, interval), so checks
            # registered together do not all probe at once.
            await trio.sleep(self._rng.random() * self.definition.interval)
            while True:
                result, output = await self._probe(client)
                self._apply(self._machine.observe(result, output, trio.current_time()))
                await trio.sleep(self.definition.interval)
        finally:
            if client is not None and self._http_transport is None:
                with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    await client.aclose()

    def _apply(self, changed: bool) -> None:
        if changed:
            self._on_change(self.check_id, self._machine.status, self._machine.output)

    async def _probe(self, client: httpx.AsyncClient | None) -> tuple[Health, str]:
        """One run of the check; any error is a critical result, never an exception."""
        kind = self.definition.kind
        try:
            if kind == "http":
                assert client is not None
                return await self._probe_http(client)
            if kind == "tcp":
                return await self._probe_tcp()
            return await self._probe_script()
        except Exception as exc:
            return Health.CRITICAL, f"check failed: {_one_line(exc)}"

    def _new_client(self) -> httpx.AsyncClient:
        import httpx

        defn = self.definition
        if self._http_transport is not None:
            transport: httpx.AsyncBaseTransport = self._http_transport
        else:
            # No keep-alive: Consul opens a new connection per run "to prevent
            # failing checks due to the keepalive interval".
            transport = httpx.AsyncHTTPTransport(
                verify=False if defn.tls_skip_verify else _verifying_ssl_context(),
                limits=httpx.Limits(max_keepalive_connections=0),
                trust_env=False,
            )
        return httpx.AsyncClient(
            transport=transport,
            follow_redirects=True,  # like Go's default client Consul uses
            max_redirects=HTTP_MAX_REDIRECTS,
            timeout=defn.effective_timeout,
            trust_env=False,  # checks target the service itself, never an env proxy
        )

    async def _probe_http(self, client: httpx.AsyncClient) -> tuple[Health, str]:
        import httpx

        defn = self.definition
        headers = httpx.Headers(dict(defn.header))
        headers.setdefault("User-Agent", USER_AGENT)
        headers.setdefault("Accept", _ACCEPT)
        where = f"HTTP {defn.method} {defn.http}"
        timeout = defn.effective_timeout
        body = bytearray()
        truncated = False
        timed_out = True  # until the response is read
        code, status_line = 0, ""
        # One deadline for the whole run, body included (Go's http.Client.Timeout);
        # httpx's own timeouts are per read.
        with trio.move_on_after(timeout):
            try:
                async with client.stream(defn.method, defn.http, headers=headers) as response:
                    code = response.status_code
                    status_line = f"{code} {response.reason_phrase}"
                    # Enough read: cancel instead of `break`. The Cancelled then runs
                    # through httpx's and httpcore's generators, which close the
                    # connection and finish (a `break` leaves them to the garbage
                    # collector and trio warns, encode/httpx#3686).
                    with trio.CancelScope() as reader:
                        async for chunk in response.aiter_bytes():
                            if not truncated:
                                body += chunk
                            if len(body) > MAX_CHECK_OUTPUT:
                                truncated = True
                                reader.cancel()
                timed_out = False
            except httpx.TimeoutException:
                pass
            except httpx.HTTPError as exc:
                return Health.CRITICAL, f"{where}: {_http_reason(exc)}"
        if timed_out:
            return Health.CRITICAL, f"{where}: timed out after {_go_duration(timeout)}"
        text = _utf8_prefix(bytes(body), MAX_CHECK_OUTPUT).decode("utf-8", errors="replace")
        output = f"{where}: {status_line} Output: {text}"
        if truncated:
            output = _clip(output, MAX_CHECK_OUTPUT, " ... (body truncated)")
        if 200 <= code <= 299:
            return Health.PASSING, output
        if code == 429:  # Too Many Requests (RFC 6585): overloaded, not down
            return Health.WARNING, output
        return Health.CRITICAL, output

    async def _probe_tcp(self) -> tuple[Health, str]:
        defn = self.definition
        host, port = parse_hostport(defn.tcp)
        where = f"TCP connect {defn.tcp}"
        with trio.move_on_after(defn.effective_timeout):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                return Health.CRITICAL, f"{where}: {_connect_reason(exc)}"
            await trio.aclose_forcefully(stream)
            return Health.PASSING, f"{where}: Success"
        return Health.CRITICAL, f"{where}: timed out after {_go_duration(defn.effective_timeout)}"

    async def _probe_script(self) -> tuple[Health, str]:
        defn = self.definition
        timeout = defn.effective_timeout
        try:
            # Own session (process group), so a timeout kills the script's
            # children too, as Consul's KillCommandSubtree does.
            process = await trio.lowlevel.open_process(
                list(defn.args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return Health.CRITICAL, f"failed to start {defn.args[0]}: {exc.strerror or exc}"
        captured = _TailBuffer(MAX_CHECK_OUTPUT)
        stdout = process.stdout
        assert stdout is not None
        timed_out = True  # until the output is read and the script has exited
        try:
            with trio.move_on_after(timeout):
                while chunk := await stdout.receive_some(_SCRIPT_READ_CHUNK):
                    captured.write(chunk)
                await process.wait()
                timed_out = False
        finally:
            if timed_out:  # the deadline passed or the runner is being cancelled
                _kill_group(process.pid)
                with trio.move_on_after(_REAP_TIMEOUT, shield=True):
                    await process.wait()
            await trio.aclose_forcefully(stdout)
        output = captured.text()
        if timed_out:
            message = f"Timed out ({_go_duration(timeout)}) running check"
            return Health.CRITICAL, message + (f"\n\n{output}" if output else "")
        if process.returncode == 0:
            return Health.PASSING, output
        if process.returncode == 1:
            return Health.WARNING, output
        return Health.CRITICAL, output


def _kill_group(pgid: int) -> None:
    """SIGKILL a script's process group (the script and its children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pgid, signal.SIGKILL)

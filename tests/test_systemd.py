"""systemd: the unit files pass systemd-analyze, and real daemons speak sd_notify.

The units are checked by the real ``systemd-analyze verify`` and ``security``
against a throwaway root (systemd is not PID 1 here): the root holds a copy of
the system's units (targets the units name), ``/bin/kill`` and an executable at
the role's venv path, so ``verify`` checks our files, not this machine.

The notification tests start real ``hostmesh agent`` / ``hostmesh server``
processes with ``NOTIFY_SOCKET`` pointing at a datagram socket the test owns.
"""

from __future__ import annotations

import configparser
import contextlib
import itertools
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from conftest import trio_test

from hostmesh import AgentConfig, DnsConfig, ServerConfig
from hostmesh._systemd import MAX_MESSAGE, MAX_STATUS, Notifier

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
HOSTMESH = str(Path(sys.executable).with_name("hostmesh"))
#: Where the ansible role installs the venv; the units must start this binary.
ROLE_BINARY = "/opt/hostmesh/venv/bin/hostmesh"
#: systemd-analyze security's exposure (0 safest .. 10) a unit may have at most.
#: Ours score 1.8-1.9; 2.5 still reads "OK" and catches a dropped hardening block.
MAX_EXPOSURE = 2.5

# --- the unit files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A filesystem root for ``systemd-analyze --root``: system units, kill, our binary."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir()
    shutil.copy2("/bin/kill", root / "bin/kill")
    binary = root / ROLE_BINARY.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text(f'#!/bin/sh\nexec {HOSTMESH} "$@"\n')
    binary.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


def analyze(root: Path, unit_text: str, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Install ``unit_text`` as ``name`` under ``root`` and run systemd-analyze on it."""
    (root / "etc/systemd/system" / name).write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", *args, f"--root={root}", f"/etc/systemd/system/{name}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def verify_problems(root: Path, unit_text: str, name: str) -> str:
    """What ``systemd-analyze verify`` says about a unit; "" when it is clean.

    verify exits 0 on warnings such as an unknown key or an unparsable value
    (systemd ignores those lines at run time), so any output counts as a problem.
    """
    done = analyze(root, unit_text, name, "verify", "--man=no", "--generators=no")
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0 and not out:
        out = f"exit status {done.returncode}"
    return out


def unit_files() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def test_the_units_the_ansible_role_installs_exist() -> None:
    assert [p.name for p in unit_files()] == ["hostmesh-agent.service", "hostmesh-server.service"]
    assert (UNITS / "resolved" / "hostmesh.conf").is_file()


@pytest.mark.parametrize("unit", unit_files(), ids=lambda p: p.name)
def test_systemd_analyze_verify_passes(fake_root: Path, unit: Path) -> None:
    assert verify_problems(fake_root, unit.read_text(), unit.name) == ""


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        ("NoNewPrivileges=yes", "NoNewPrivilege=yes", "Unknown key 'NoNewPrivilege'"),
        ("WatchdogSec=30s", "WatchdogSec=thirty", "Failed to parse sec value"),
        ("Type=notify", "Type=notifyy", "Failed to parse service type"),
        (ROLE_BINARY, "/opt/hostmesh/env/bin/hostmesh", "is not executable"),
    ],
    ids=["unknown-key", "bad-duration", "bad-type", "missing-binary"],
)
def test_verify_reports_a_broken_unit(fake_root: Path, old: str, new: str, reported: str) -> None:
    text = (UNITS / "hostmesh-agent.service").read_text()
    assert old in text
    problems = verify_problems(fake_root, text.replace(old, new), "broken.service")
    assert reported in problems


@pytest.mark.parametrize("unit", unit_files(), ids=lambda p: p.name)
def test_units_are_hardened(fake_root: Path, unit: Path) -> None:
    done = analyze(
        fake_root, unit.read_text(), unit.name,
        "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
    )  # fmt: skip
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, last
    assert "Overall exposure level" in last
    # The settings the issue names, with the values that matter.
    service = _service_section(unit)
    for key, value in {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID", "User": "hostmesh",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "ConfigurationDirectory": "hostmesh",
        "CapabilityBoundingSet": "", "WatchdogSec": "30s",
    }.items():  # fmt: skip
        assert service.get(key) == value, key
    assert int(service["LimitNOFILE"]) >= 65536
    # systemd makes the state directories writable (nothing else is): the daemon's
    # default data_dir and /var/lib/hostmesh, the one the ansible role configures.
    default = AgentConfig() if "agent" in unit.name else ServerConfig()
    writable = {"/var/lib/" + d for d in service["StateDirectory"].split()}
    assert {default.data_dir, "/var/lib/hostmesh"} <= writable
    assert service["WorkingDirectory"] in writable


def _service_section(unit: Path) -> dict[str, str]:
    """``[Service]`` as key -> last assignment (systemd.syntax(7): keys may repeat)."""
    section, out = "", {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.mark.parametrize(
    ("unit", "command", "config"),
    [("hostmesh-agent.service", "agent", "agent.toml"),
     ("hostmesh-server.service", "server", "server.toml")],
)  # fmt: skip
def test_exec_start_runs_the_role_venv_with_options_the_cli_accepts(
    unit: str, command: str, config: str
) -> None:
    argv = shlex.split(_service_section(UNITS / unit)["ExecStart"])
    assert argv == [ROLE_BINARY, command, "-c", f"/etc/hostmesh/{config}"]
    # The same arguments through the real CLI: an unknown option fails before --help.
    done = subprocess.run(
        [HOSTMESH, *argv[1:], "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_resolved_drop_in_routes_the_mesh_domain_to_the_agents_dns() -> None:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / "resolved" / "hostmesh.conf").read_text())
    assert parser.sections() == ["Resolve"]
    defaults = DnsConfig()
    assert dict(parser["Resolve"]) == {"DNS": defaults.bind, "Domains": f"~{defaults.domain}"}


# --- sd_notify, in process --------------------------------------------------------


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"hostmesh-test-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind(b"\0" + name.encode())
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def test_notifier_without_notify_socket_is_a_no_op() -> None:
    n = Notifier.from_env({}, pid=1)
    assert not n.enabled and n.watchdog_interval == 0
    assert n.ready("x") is False and n.stopping() is False


@pytest.mark.parametrize(
    ("env", "usec"),
    [
        ({"WATCHDOG_USEC": "400000"}, 400_000),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "4242"}, 400_000),  # our pid
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, 0),  # someone else's
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "x"}, 0),
        ({"WATCHDOG_USEC": "abc"}, 0),
        ({"WATCHDOG_USEC": "-5"}, 0),
        ({"WATCHDOG_USEC": "0"}, 0),
        ({"WATCHDOG_USEC": "1"}, 0),  # 0.5 µs pings would spin the loop
        ({"WATCHDOG_USEC": "9" * 40}, 0),
    ],
)
def test_watchdog_follows_sd_watchdog_enabled(env: dict[str, str], usec: int) -> None:
    environ = {"NOTIFY_SOCKET": "@x", **env}
    n = Notifier.from_env(environ, pid=4242)
    assert n.watchdog_usec == usec
    assert environ == {}  # removed: children (check scripts) must not inherit them


@pytest.mark.parametrize("address", ["relative/path", "/" + "x" * 200, "@", "vsock:2:1234"])
def test_unusable_notify_socket_values_are_ignored(address: str) -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": address}, pid=1).enabled


@pytest.mark.sockets
def test_status_is_one_line_and_bounded(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, address = abstract_socket
    n = Notifier(address)
    assert n.ready("line one\nREADY=0\r\nline three" + "x" * 10_000)
    message = sock.recv(2 * MAX_MESSAGE).decode()
    ready, status, end = message.split("\n")
    assert ready == "READY=1" and end == ""
    assert status.startswith("STATUS=line one READY=0 line three")
    assert len(status) == len("STATUS=") + MAX_STATUS
    n.close()


@pytest.mark.sockets
def test_a_dead_notify_socket_never_raises(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    try:
        assert n.ready("x") is False and n.send({"WATCHDOG": "1"}) is False
    finally:
        n.close()


@pytest.mark.sockets
@trio_test(10, mock_clock=True)
async def test_watchdog_pings_every_half_period(
    abstract_socket: tuple[socket.socket, str],
) -> None:
    sock, address = abstract_socket
    n = Notifier(address, watchdog_usec=2_000_000)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.watchdog)
            nursery.start_soon(n.watchdog)  # a second daemon in the process: no double pings
            await trio.sleep(4.5)  # virtual: pings at 0, 1, 2, 3, 4
            nursery.cancel_scope.cancel()
        sock.setblocking(False)
        pings = []
        while True:
            try:
                pings.append(sock.recv(100))
            except BlockingIOError:
                break
        assert pings == [b"WATCHDOG=1\n"] * 5
    finally:
        n.close()


@pytest.mark.sockets
@trio_test(10)
async def test_watchdog_pings_stop_while_the_loop_is_blocked(
    abstract_socket: tuple[socket.socket, str],
) -> None:
    # The pings come from the loop itself, not a thread: a task that blocks the
    # loop (a wedged agent) silences them, which is what makes systemd restart us.
    sock, address = abstract_socket
    sock.setblocking(False)
    n = Notifier(address, watchdog_usec=200_000)

    def drain() -> int:
        count = 0
        with contextlib.suppress(BlockingIOError):
            while sock.recv(100):
                count += 1
        return count

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.watchdog)
            await trio.sleep(0.35)
            assert drain() >= 2
            time.sleep(0.6)  # noqa: ASYNC251 - on purpose: blocks the loop for 6 periods
            assert drain() == 0
            await trio.sleep(0.25)
            assert drain() >= 1
            nursery.cancel_scope.cancel()
    finally:
        n.close()


# --- sd_notify from real daemons --------------------------------------------------


class Listener:
    """The test's end of NOTIFY_SOCKET: timestamped messages as dicts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, timeout: float) -> tuple[float, dict[str, str]] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return time.monotonic(), fields

    def wait_for(self, key: str, timeout: float = 15) -> tuple[float, dict[str, str], list[str]]:
        """Read until a message carries ``key``; also return what came before."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            got = self.recv(left)
            if got is None:
                break
            if key in got[1]:
                return got[0], got[1], seen
            seen.append(",".join(got[1]))
        raise AssertionError(f"no {key} within {timeout} s; got {seen}")

    def drain(self) -> list[dict[str, str]]:
        out = []
        while (got := self.recv(0.001)) is not None:
            out.append(got[1])
        return out

    def collect(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        deadline = time.monotonic() + seconds
        out = []
        while (left := deadline - time.monotonic()) > 0:
            got = self.recv(left)
            if got is not None:
                out.append(got)
        return out


@pytest.fixture
def listener(abstract_socket: tuple[socket.socket, str]) -> Listener:
    return Listener(abstract_socket[0])


def agent_toml(tmp_path: Path, extra: str = "") -> Path:
    services = tmp_path / "services.d"
    services.mkdir(exist_ok=True)
    (services / "env.toml").write_text(
        'name = "envprobe"\nport = 9\n[[checks]]\n'
        'args = ["/bin/sh", "-c", '
        '"echo notify=${NOTIFY_SOCKET:-unset} wd=${WATCHDOG_USEC:-unset}"]\n'
        'interval = "300ms"\n'
    )
    path = tmp_path / "agent.toml"
    path.write_text(
        f'node_name = "sd-node"\naz = "eu-west-1a"\n{extra}'
        f'data_dir = "{tmp_path / "data"}"\nservices_dir = "{services}"\n'
        '[api]\nbind = "127.0.0.1:0"\n[dns]\nbind = "127.0.0.1:0"\nresolv_conf = ""\n'
        '[gossip]\nbind = "127.0.0.1:0"\n[proxy]\nbind = "127.0.0.1:0"\n'
    )
    return path


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID")}
    return subprocess.Popen(
        [HOSTMESH, *args], env={**full, **env}, cwd=cwd,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish(proc: subprocess.Popen[bytes]) -> tuple[int | None, str]:
    """Stop the process if it still runs; its exit status and stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err.decode(errors="replace")


def _api_from_status(status: str) -> str:
    # "serving (az eu-west-1a): api 127.0.0.1:PORT, dns ..."
    return status.split("api ", 1)[1].split(",", 1)[0]


@pytest.mark.sockets
def test_agent_process_notifies_ready_watchdog_reload_and_stopping(
    tmp_path: Path, listener: Listener, abstract_socket: tuple[socket.socket, str]
) -> None:
    proc = start(
        ["agent", "-c", str(agent_toml(tmp_path))],
        {"NOTIFY_SOCKET": abstract_socket[1], "WATCHDOG_USEC": "400000"},
        tmp_path,
    )
    try:
        # READY=1 with a status naming where the API is; it answers at once.
        _, ready, before = listener.wait_for("READY")
        assert set(before) <= {"WATCHDOG"}, before
        status = ready["STATUS"]
        assert status.startswith("serving (az eu-west-1a): api 127.0.0.1:"), status
        assert "1 services" in status
        api = f"http://{_api_from_status(status)}"
        assert httpx.get(f"{api}/ready", timeout=5).status_code == 200

        # WATCHDOG=1 about every WATCHDOG_USEC / 2 = 200 ms.
        pings = [t for t, m in listener.collect(2.0) if m == {"WATCHDOG": "1"}]
        assert 6 <= len(pings) <= 12, pings
        assert 0.15 <= statistics.median(b - a for a, b in itertools.pairwise(pings)) <= 0.3

        # A stopped loop sends nothing (systemd would restart us); pings resume after.
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)
        listener.drain()
        assert listener.collect(1.0) == []
        proc.send_signal(signal.SIGCONT)
        listener.wait_for("WATCHDOG", timeout=5)

        # Check scripts do not inherit NOTIFY_SOCKET or WATCHDOG_USEC.
        output = _check_output(api, "service:envprobe")
        assert output.strip() == "notify=unset wd=unset"

        # SIGHUP: RELOADING=1, then READY=1 again with the status.
        proc.send_signal(signal.SIGHUP)
        _, reloading, _ = listener.wait_for("RELOADING", timeout=5)
        assert reloading["MONOTONIC_USEC"].isdigit()
        _, again, _ = listener.wait_for("READY", timeout=5)
        assert again["STATUS"] == status

        # SIGTERM: STOPPING=1 with the reason, then a clean exit.
        proc.send_signal(signal.SIGTERM)
        _, stopping, _ = listener.wait_for("STOPPING", timeout=5)
        assert stopping["STATUS"] == "stopping (SIGTERM)"
        assert proc.wait(timeout=10) == 0
        assert not any("READY" in m for m in listener.drain())
    finally:
        finish(proc)


def _check_output(api: str, check_id: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checks = httpx.get(f"{api}/v1/agent/checks", timeout=5).json()
        output = checks.get(check_id, {}).get("Output", "")
        if output:
            return str(output)
        time.sleep(0.1)
    raise AssertionError(f"{check_id} has no output after {timeout} s")


@pytest.mark.sockets
def test_path_socket_and_a_watchdog_meant_for_another_process(tmp_path: Path) -> None:
    # A path socket (unit files normally get /run/systemd/notify). WATCHDOG_PID=1:
    # the watchdog is systemd's business with PID 1, not ours: no pings.
    short = Path(tempfile.mkdtemp(prefix="hm-sd-", dir="/tmp"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(short / "notify"))
        listener = Listener(sock)
        env = {"NOTIFY_SOCKET": str(short / "notify"), "WATCHDOG_USEC": "200000"}
        proc = start(["agent", "-c", str(agent_toml(tmp_path))], {**env, "WATCHDOG_PID": "1"},
                     tmp_path)  # fmt: skip
        try:
            _, ready, before = listener.wait_for("READY")
            assert before == [] and ready["STATUS"].startswith("serving")
            assert listener.collect(0.6) == []
            proc.send_signal(signal.SIGTERM)
            listener.wait_for("STOPPING", timeout=5)
            assert proc.wait(timeout=10) == 0
        finally:
            finish(proc)
    finally:
        sock.close()
        shutil.rmtree(short)


@pytest.mark.sockets
def test_server_process_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, listener: Listener, abstract_socket: tuple[socket.socket, str]
) -> None:
    (tmp_path / "server.toml").write_text(
        f'bind = "127.0.0.1:0"\ndata_dir = "{tmp_path / "server"}"\n'
    )
    proc = start(
        ["server", "-c", str(tmp_path / "server.toml")],
        {"NOTIFY_SOCKET": abstract_socket[1], "WATCHDOG_USEC": "400000"},
        tmp_path,
    )
    try:
        _, ready, _ = listener.wait_for("READY")
        status = ready["STATUS"]
        assert status.startswith("serving: api 127.0.0.1:"), status
        # The server's API is HTTPS under the mesh's own CA; liveness is all this asks.
        api = "https://" + status.removeprefix("serving: api ").split(",")[0]
        assert httpx.get(f"{api}/ready", timeout=5, verify=False).status_code == 200
        pings = [m for _, m in listener.collect(1.0) if m == {"WATCHDOG": "1"}]
        assert 3 <= len(pings) <= 7
        # systemctl reload: the server survives SIGHUP (it has nothing to re-read yet).
        proc.send_signal(signal.SIGHUP)
        listener.wait_for("RELOADING", timeout=5)
        _, again, _ = listener.wait_for("READY", timeout=5)
        assert again["STATUS"] == status
        assert httpx.get(f"{api}/ready", timeout=5, verify=False).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, stopping, _ = listener.wait_for("STOPPING", timeout=5)
        assert stopping["STATUS"] == "stopping (SIGTERM)"
        assert proc.wait(timeout=10) == 0
    finally:
        finish(proc)


@pytest.mark.sockets
def test_agent_with_an_unreachable_notify_socket_still_serves(tmp_path: Path) -> None:
    proc = start(
        ["agent", "-c", str(agent_toml(tmp_path)), "--log-format", "json"],
        {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"), "WATCHDOG_USEC": "200000"},
        tmp_path,
    )
    try:
        api, early = _read_api_address(proc)
        assert httpx.get(f"http://{api}/ready", timeout=5).status_code == 200
        time.sleep(0.5)  # a few watchdog periods: still one warning, still serving
        assert httpx.get(f"http://{api}/ready", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        _, err = finish(proc)
    logs = early + err
    assert logs.count("systemd notification not delivered") == 1, logs


def _read_api_address(proc: subprocess.Popen[bytes], timeout: float = 15) -> tuple[str, str]:
    """The API address from the "agent started" JSON log line, and the log so far."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
            for line in seen.decode(errors="replace").splitlines():
                if '"agent started"' in line:
                    return str(json.loads(line)["api"]), seen.decode(errors="replace")
    raise AssertionError(f"no 'agent started' log line; got {seen!r}")

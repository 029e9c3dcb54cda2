"""The hostmesh command line against real agent processes."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.sockets

HOSTMESH = str(Path(sys.executable).with_name("hostmesh"))


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOSTMESH, *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def read_until(
    proc: subprocess.Popen[bytes], stream_name: str, pattern: str, timeout: float = 20
) -> tuple[re.Match[str], list[str]]:
    """Read lines of the process's stdout/stderr until ``pattern`` matches one.

    Reads the raw pipe (no Python buffering, so the selector sees every byte).
    """
    fd = getattr(proc, stream_name).fileno()
    seen: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=deadline - time.monotonic()):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode()
                seen.append(line)
                match = re.search(pattern, line)
                if match:
                    return match, seen
    raise AssertionError(f"{pattern!r} not seen; got:\n" + "\n".join(seen))


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def agent_files(tmp_path: Path) -> Path:
    (tmp_path / "services.d").mkdir()
    (tmp_path / "services.d" / "db.toml").write_text(
        'name = "db"\nport = 5432\ntags = ["primary"]\n'
    )
    (tmp_path / "agent.toml").write_text(
        f'node_name = "cli-node"\naz = "eu-west-1a"\ndata_dir = "{tmp_path / "data"}"\n'
        f'services_dir = "{tmp_path / "services.d"}"\n[api]\nbind = "127.0.0.1:0"\n'
        '[dns]\nbind = "127.0.0.1:0"\nresolv_conf = ""\n[gossip]\nbind = "127.0.0.1:0"\n'
    )
    (tmp_path / "web.toml").write_text(
        'name = "web"\nport = 8080\ntags = ["v1"]\n[[checks]]\nttl = "1m"\n'
    )
    return tmp_path


def start_agent(files: Path) -> tuple[subprocess.Popen[bytes], str, list[str]]:
    proc = subprocess.Popen(
        [HOSTMESH, "agent", "-c", str(files / "agent.toml"), "--log-format", "json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, bufsize=0, cwd=files,
    )  # fmt: skip
    match, lines = read_until(proc, "stderr", r'"msg": ?"agent started".*"api": ?"([0-9.:]+)"')
    return proc, match.group(1), lines


@pytest.fixture
def agent_proc(agent_files: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    proc, api, _ = start_agent(agent_files)
    try:
        yield proc, api, agent_files
    finally:
        stop(proc, signal.SIGKILL)


def test_cli_manages_services_on_a_running_agent(
    agent_proc: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, api, files = agent_proc

    out = run("services", "--agent", api)
    assert out.returncode == 0, out.stderr
    assert "db" in out.stdout and "cli-node" in out.stdout and "eu-west-1a" in out.stdout

    out = run("register", str(files / "web.toml"), "--agent", api)
    assert out.returncode == 0, out.stderr
    assert "registered web" in out.stdout

    rows = json.loads(run("services", "web", "--json", "--agent", api).stdout)
    assert [(r["id"], r["port"], r["tags"], r["health"]) for r in rows] == [
        ("web", 8080, ["v1"], "critical")
    ]

    env = {**os.environ, "HOSTMESH_AGENT": api}
    assert run("check", "pass", "service:web", "--note", "fine", env=env).returncode == 0
    rows = json.loads(run("services", "--json", env=env).stdout)
    assert {r["id"]: r["health"] for r in rows} == {"db": "passing", "web": "passing"}
    run("check", "warn", "service:web", env=env)
    rows = json.loads(run("services", "web", "--json", env=env).stdout)
    assert rows[0]["health"] == "warning"

    out = run("deregister", "web", env=env)
    assert out.returncode == 0 and "deregistered web" in out.stdout
    out = run("deregister", "web", env=env)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "404" in out.stderr and 'Unknown service ID "web"' in out.stderr

    # SIGHUP reloads services.d.
    (files / "services.d" / "cache.toml").write_text('name = "cache"\nport = 6379\n')
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = {r["service"] for r in json.loads(run("services", "--json", env=env).stdout)}
        if "cache" in names:
            break
        time.sleep(0.1)
    assert names == {"db", "cache"}

    assert stop(proc) == 0


def test_api_registrations_survive_an_agent_restart(agent_files: Path) -> None:
    proc, api, _ = start_agent(agent_files)
    try:
        assert run("register", str(agent_files / "web.toml"), "--agent", api).returncode == 0
    finally:
        assert stop(proc) == 0
    proc, api, lines = start_agent(agent_files)
    try:
        rows = json.loads(run("services", "--json", "--agent", api).stdout)
        assert sorted(r["id"] for r in rows) == ["db", "web"]
        for line in lines:
            json.loads(line)  # --log-format json: every line is one JSON object
    finally:
        stop(proc)


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    out = run("services", "--agent", "127.0.0.1:1")
    assert out.returncode == 1
    assert "cannot reach the agent at http://127.0.0.1:1" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "web"\nport = "eighty"\n')
    out = run("register", str(bad), "--agent", "127.0.0.1:1")
    assert out.returncode == 1
    assert f"{bad}: port: expected an integer" in out.stderr
    assert "Traceback" not in out.stderr

    cfg = tmp_path / "agent.toml"
    cfg.write_text('node_name = "x"\n[api]\nbind = "nowhere"\n')
    out = run("agent", "-c", str(cfg))
    assert out.returncode == 1
    assert f"{cfg}: api.bind" not in out.stderr or "Traceback" not in out.stderr
    assert "Traceback" not in out.stderr and "invalid address" in out.stderr

    out = run("agent", "-c", str(tmp_path / "missing.toml"))
    assert out.returncode == 1 and "missing.toml" in out.stderr and "Traceback" not in out.stderr


def test_dev_runs_the_mesh_and_its_printed_commands_work(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [HOSTMESH, "dev", "--api", "127.0.0.1:0", "--server-api", "127.0.0.1:0",
         "--dns", "127.0.0.1:0", "--gossip", "127.0.0.1:0", "--proxy", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, cwd=tmp_path,
    )  # fmt: skip
    try:
        _, lines = read_until(proc, "stdout", r"Ctrl-C stops")
        text = "\n".join(lines)
        api = re.search(r"agent API\s+http://([0-9.:]+)", text)
        server = re.search(r"server API\s+https://([0-9.:]+)", text)
        token = re.search(r"token\s+(hm_\S+)", text)
        pin = re.search(r"CA pin\s+(sha256:[0-9a-f]+)", text)
        data = re.search(r"data\s+(\S+)", text)
        assert api and server and token and pin and data
        # The printed token and pin open the server's HTTPS API.
        env = {**os.environ, "HOSTMESH_SERVER": server.group(1),
               "HOSTMESH_TOKEN": token.group(1), "HOSTMESH_CA_PIN": pin.group(1)}  # fmt: skip
        assert run("kv", "put", "greeting", "hello", env=env).returncode == 0
        assert run("kv", "get", "greeting", env=env).stdout.strip() == "hello"
        assert "AZ dev-1a" in text
        tried = lines[[line.strip() for line in lines].index("Try:") + 1 :]
        commands = [
            line.strip()
            for line in tried
            if line.strip().startswith(("curl ", "hostmesh ", HOSTMESH, "dig "))
        ]
        assert len(commands) == 5
        for command in commands:
            done = subprocess.run(
                command, shell=True, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                env={**os.environ, "PATH": f"{Path(HOSTMESH).parent}:{os.environ['PATH']}"},
            )  # fmt: skip
            assert done.returncode == 0, (command, done.stderr)
            if command.startswith("dig "):
                assert done.stdout.split() == ["127.0.0.1"]  # the registered web instance
            if "Host: web" in command:  # through the proxy to web's port 8080
                assert done.stdout.startswith("HTTP/1.1 "), done.stdout
                listening = "hostmesh-error: connect-failed" not in done.stdout
                assert listening or " 502 " in done.stdout.splitlines()[0]
        rows = json.loads(run("services", "--json", "--agent", api.group(1)).stdout)
        assert [(r["service"], r["health"], r["az"]) for r in rows] == [
            ("web", "passing", "dev-1a")
        ]
        assert Path(data.group(1)).is_dir()
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 0
    assert not Path(data.group(1)).exists()  # the temporary store is removed on exit


def test_dev_with_several_nodes_runs_a_multi_az_mesh_over_loopback(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [HOSTMESH, "dev", "--nodes", "3", "--azs", "2", "--api", "127.0.0.1:0",
         "--server-api", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--gossip", "127.0.0.1:0",
         "--proxy", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, cwd=tmp_path,
    )  # fmt: skip
    try:
        _, lines = read_until(proc, "stdout", r"Ctrl-C stops")
        rows = [
            re.search(r"AZ (\S+)\s+API http://(\S+)\s+DNS (\S+)\s+proxy", line) for line in lines
        ]
        agents = [(m.group(1), m.group(2), m.group(3)) for m in rows if m]
        assert [az for az, _, _ in agents] == ["dev-1a", "dev-1b", "dev-1a"]
        assert [api.split(":")[0] for _, api, _ in agents] == [
            "127.0.0.1",
            "127.0.0.2",
            "127.0.0.3",
        ]
        first_api = agents[0][1]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = run("members", "--json", "--agent", first_api)
            if (
                out.returncode == 0
                and [m["status"] for m in json.loads(out.stdout)] == ["alive"] * 3
            ):
                break
            time.sleep(0.2)
        assert [m["az"] for m in json.loads(out.stdout)] == ["dev-1a", "dev-1b", "dev-1a"]
        # A service on the third agent is visible through the first agent's DNS.
        third_api = agents[2][1]
        svc = tmp_path / "api.toml"
        svc.write_text('name = "api"\nport = 9000\n')
        assert run("register", str(svc), "--agent", third_api).returncode == 0
        dns_host, dns_port = agents[0][2].split(":")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            dig = subprocess.run(
                ["dig", f"@{dns_host}", "-p", dns_port, "api.svc.mesh", "+short"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            if dig.stdout.split() == ["127.0.0.3"]:
                break
            time.sleep(0.2)
        assert dig.stdout.split() == ["127.0.0.3"]
    finally:
        assert stop(proc, signal.SIGINT) == 0


def test_daemons_take_their_options_like_the_other_commands(agent_files: Path) -> None:
    # --help, a typo and a missing value get typer's answers, as for every command.
    assert "Run the agent" in run("agent", "--help").stdout
    for bad, words in ((["--bogus"], "No such option"), (["-c"], "requires an argument")):
        done = run("agent", *bad)
        assert done.returncode != 0 and words in done.stderr and "Traceback" not in done.stderr
    done = run("agent", "-c", str(agent_files / "missing.toml"))
    assert done.returncode == 1 and "missing.toml" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = run("server", "--log-level", "loud", "-c", str(agent_files / "missing.toml"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    # A daemon starts without the admin commands' libraries (typer, click, rich:
    # about 4 MB it would keep resident).
    done = subprocess.run(
        [sys.executable, "-X", "importtime", HOSTMESH, "agent", "-c", str(agent_files / "x.toml")],
        capture_output=True, text=True, cwd=agent_files, timeout=60,
    )  # fmt: skip
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert done.returncode == 1 and done.stderr.splitlines()[-1].startswith("error: ")
    assert {"hostmesh._entry", "hostmesh._config", "trio"} <= imported  # real import lines
    assert not imported & {"typer", "click", "rich", "hostmesh.cli"}
    # --opt=value forms start the agent too, and it does not carry typer's
    # argument conversion (pydantic, ~10 MB) for the rest of its life.
    proc = subprocess.Popen(
        [HOSTMESH, "agent", f"--config={agent_files / 'agent.toml'}", "--log-format=json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, bufsize=0, cwd=agent_files,
    )  # fmt: skip
    try:
        read_until(proc, "stderr", r'"msg": ?"agent started"')
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "pydantic_core" not in maps
        assert "_ssl" in maps or "libssl" in maps  # the check reads real mappings
    finally:
        assert stop(proc) == 0

"""The Ansible role and site.yml, run for real.

ansible-lint (production profile) checks ansible/. Then ``ansible-playbook
site.yml`` runs with a local connection against a throwaway prefix with the
systemd steps off, installing a wheel built from this repository: one server
and one agent, as two inventory hosts sharing the prefix (a server host that
also runs an agent). The daemons are then started from exactly what the role
wrote (the installed ``hostmesh`` entry point, agent.toml and server.toml),
and must answer /ready with the inventory's AZ, gossip key and services. A
second run with the /ready waits on changes nothing; a service definition the
agent would refuse, on one host of a batch of two, stops the rollout before
the next batch (max_fail_percentage).
"""

from __future__ import annotations

import base64
import contextlib
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from hostmesh import load_agent_config, load_server_config, load_service_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent

# Seconds per subprocess. The first run makes a venv and installs the wheel's
# dependencies through pip's configured index (about 20 s here).
FIRST_RUN_TIMEOUT = 300
RUN_TIMEOUT = 120
LINT_TIMEOUT = 120
# Seconds a started daemon has to answer /ready.
READY_TIMEOUT = 20

# What the role would touch on a real host; a prefixed run must leave them alone.
OUTSIDE = [
    Path("/etc/hostmesh"),
    Path("/opt/hostmesh"),
    Path("/var/lib/hostmesh"),
    Path("/var/lib/hostmesh-server"),
    Path("/usr/local/bin/hostmesh"),
    Path("/etc/systemd/system/hostmesh-agent.service"),
    Path("/etc/systemd/system/hostmesh-server.service"),
    Path("/etc/systemd/resolved.conf.d/hostmesh.conf"),
]

# The vaulted CA sealing key of the servers (etcd stores; accepted with SQLite too).
SEALING_KEY = base64.b64encode(secrets.token_bytes(32)).decode()

_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_wheel(tmp: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the repository (setuptools reuses build/)."""
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_COPY_IGNORE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", tmp / "dist", src],
        check=True, capture_output=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    [wheel] = (tmp / "dist").glob("hostmesh-*.whl")
    return wheel


def outside_state() -> dict[str, Any]:
    """Existence and mtime of the real paths, and the hostmesh user, to compare after."""
    state: dict[str, Any] = {}
    for path in OUTSIDE:
        state[str(path)] = path.lstat().st_mtime_ns if os.path.lexists(path) else None
    try:
        state["user"] = pwd.getpwnam("hostmesh").pw_uid
    except KeyError:
        state["user"] = None
    return state


@dataclass
class Run:
    returncode: int
    output: str

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP counters per host."""
        hosts = {}
        for host, counters in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", self.output, re.M):
            hosts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}
        return hosts


@dataclass
class Site:
    tmp: Path
    prefix: Path
    inventory: Path
    env: dict[str, str]
    api: str
    server: str
    gossip_key: str
    join_token: str
    first: Run = field(default_factory=lambda: Run(0, ""))
    agent_pid: int = 0  # set by the running fixture

    def play(self, *args: str, inventory: Path | None = None, timeout: float = RUN_TIMEOUT) -> Run:
        proc = subprocess.run(
            [BIN / "ansible-playbook", "-i", inventory or self.inventory, ANSIBLE / "site.yml",
             "--vault-password-file", self.tmp / "vault-password", *args],
            cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        return Run(proc.returncode, proc.stdout + proc.stderr)


def inventory(tmp: Path, prefix: Path, api: int, server: int) -> Any:
    """Server and agent on this machine, ports moved to free loopback ports."""
    me = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    return {
        "hostmesh_servers": {"hosts": {"server1": {}}},
        "hostmesh_agents": {
            "hosts": {
                "agent1": {
                    "hostmesh_services": [
                        {
                            "name": "web",
                            "id": "web-1",
                            "port": 8080,
                            "tags": ["v1", "canary"],
                            "meta": {"version": "v1", "owner": 'team "a"'},
                            "user": me,
                            "checks": [{"ttl": "30s", "notes": "heartbeat from the app"}],
                        },
                        {
                            "name": "db",
                            "port": 5432,
                            "weight": 5,
                            "checks": [
                                {"tcp": "127.0.0.1:5432", "interval": "10s", "timeout": "1s"},
                                {
                                    "http": "http://127.0.0.1:5433/health",
                                    "header": {"X-Probe": "hostmesh"},
                                    "interval": "5s",
                                    "failures_before_critical": 3,
                                },
                            ],
                        },
                    ],
                },
            },
        },
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "hostmesh_prefix": str(prefix),
                "hostmesh_manage_systemd": False,
                "hostmesh_create_user": False,
                "hostmesh_install_os_packages": False,
                "hostmesh_user": me,
                "hostmesh_group": group,
                "hostmesh_owner": me,
                "hostmesh_owner_group": group,
                "hostmesh_python": sys.executable,
                "hostmesh_wheel": str(next((tmp / "dist").glob("hostmesh-*.whl"))),
                "hostmesh_address": "127.0.0.1",
                "hostmesh_az": "test-1a",
                "hostmesh_region": "test-1",
                "hostmesh_node_meta": {"team": "platform"},
                "hostmesh_api_bind": f"127.0.0.1:{api}",
                "hostmesh_dns_bind": "127.0.0.1:0",
                "hostmesh_dns_resolv_conf": "",  # tests never query the machine's resolver
                "hostmesh_proxy_bind": "127.0.0.1:0",
                "hostmesh_gossip_bind": "127.0.0.1:0",
                "hostmesh_server_bind": f"127.0.0.1:{server}",
                "hostmesh_server_port": server,
                "hostmesh_ready_retries": 10,
                "hostmesh_ready_delay": 1,
                "hostmesh_server_ca": {"mesh": "test.mesh", "leaf_ttl": "24h"},
            }
        },
    }


def encrypt_strings(values: dict[str, str], password_file: Path, env: dict[str, str]) -> str:
    """``name: !vault |`` YAML for each value, as `ansible-vault encrypt_string` gives it."""
    names = [arg for name in values for arg in ("--name", name)]
    proc = subprocess.run(
        [BIN / "ansible-vault", "encrypt_string", "--vault-password-file", password_file, *names,
         *values.values()],
        env=env, capture_output=True, text=True, check=False, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """site.yml run once against a fresh prefix."""
    tmp = tmp_path_factory.mktemp("ansible")
    build_wheel(tmp)
    prefix = tmp / "root"
    api, server = free_port(), free_port()
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    token = secrets.token_hex(16)
    inv = tmp / "inventory.yml"
    inv.write_text(json.dumps(inventory(tmp, prefix, api, server), indent=2))
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_PIPELINING": "1",
        "ANSIBLE_CONFIG": str(tmp / "no-ansible.cfg"),
    }
    # The secrets as an operator keeps them: vaulted values in group_vars/all.yml
    # beside the inventory.
    (tmp / "vault-password").write_text(secrets.token_hex(16))
    vault_values = {
        "hostmesh_gossip_key": key,
        "hostmesh_join_token": token,
        "hostmesh_ca_sealing_key": SEALING_KEY,
    }
    vaulted = encrypt_strings(vault_values, tmp / "vault-password", env)
    assert vaulted.count("!vault |") == len(vault_values) and key not in vaulted
    (tmp / "group_vars").mkdir()
    (tmp / "group_vars/all.yml").write_text("---\n" + vaulted)
    before = outside_state()
    s = Site(tmp, prefix, inv, env, f"127.0.0.1:{api}", f"127.0.0.1:{server}", key, token)
    s.first = s.play(timeout=FIRST_RUN_TIMEOUT)
    assert s.first.returncode == 0, s.first.output
    assert outside_state() == before, "a prefixed run touched files or users outside the prefix"
    return s


@contextlib.contextmanager
def daemon(args: list[str | Path], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` (the server's: TLS with a certificate from the mesh's own CA)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"daemon exited {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1, verify=False).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"no answer from {url} within {READY_TIMEOUT} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def running(site: Site) -> Iterator[Site]:
    """The installed server and agent, started from the files the role wrote."""
    hostmesh = site.prefix / "opt/hostmesh/venv/bin/hostmesh"
    etc = site.prefix / "etc/hostmesh"
    server_log, agent_log = site.tmp / "server.log", site.tmp / "agent.log"
    with (
        daemon([hostmesh, "server", "-c", etc / "server.toml"], server_log) as server,
        daemon([hostmesh, "agent", "-c", etc / "agent.toml"], agent_log) as agent,
    ):
        wait_ready(f"https://{site.server}/ready", server, server_log)
        wait_ready(f"http://{site.api}/ready", agent, agent_log)
        site.agent_pid = agent.pid
        yield site


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    env = {**os.environ, "ANSIBLE_HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run(
        [BIN / "ansible-lint", "--offline", "--profile", "production", "--nocolor", "ansible/"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=LINT_TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_rollout_installs_under_the_prefix(site: Site) -> None:
    etc, venv = site.prefix / "etc/hostmesh", site.prefix / "opt/hostmesh/venv"
    assert site.first.recap()["agent1"]["failed"] == 0
    assert (venv / "bin/hostmesh").is_file()
    assert (site.prefix / "usr/local/bin/hostmesh").resolve() == (venv / "bin/hostmesh").resolve()
    installed = subprocess.run(
        [venv / "bin/python", "-I", "-c", "import hostmesh; print(hostmesh.__file__)"],
        cwd=site.tmp, capture_output=True, text=True, check=True, timeout=RUN_TIMEOUT,
    ).stdout  # fmt: skip
    assert Path(installed.strip()).is_relative_to(venv), "hostmesh not imported from the venv"
    # Files with secrets are not world-readable.
    for name, mode in (("agent.toml", 0o640), ("join-token", 0o640), ("ca-sealing.key", 0o600)):
        assert stat.S_IMODE((etc / name).stat().st_mode) == mode, name
    assert (etc / "join-token").read_text() == site.join_token + "\n"
    for data in ("var/lib/hostmesh", "var/lib/hostmesh-server"):
        assert stat.S_IMODE((site.prefix / data).stat().st_mode) == 0o750, data
    # What the role wrote loads with hostmesh's own loader, with the inventory's values.
    cfg = load_agent_config(etc / "agent.toml")
    assert (cfg.node_name, cfg.az, cfg.region) == ("agent1", "test-1a", "test-1")
    assert cfg.gossip.keyring == (site.gossip_key,)
    assert cfg.servers == (site.server,)
    assert cfg.server.join_token_file == str(etc / "join-token")  # what the agent presents
    assert cfg.data_dir == str(site.prefix / "var/lib/hostmesh")
    server = load_server_config(etc / "server.toml")
    assert server.bind == site.server
    assert server.data_dir == str(site.prefix / "var/lib/hostmesh-server")
    assert server.store.backend == "sqlite"
    assert (server.ca.mesh, server.ca.leaf_ttl) == ("test.mesh", 24 * 3600)
    assert server.ca.sealing_key_file == str(etc / "ca-sealing.key")
    assert sorted(p.name for p in (etc / "services.d").iterdir()) == ["db.toml", "web.toml"]
    (web,) = load_service_file(etc / "services.d/web.toml")
    assert web.meta == {"version": "v1", "owner": 'team "a"'} and web.tags == ("v1", "canary")
    (db,) = load_service_file(etc / "services.d/db.toml")
    assert db.weight == 5 and db.checks[1].header == {"X-Probe": "hostmesh"}
    # The secrets never reach the output.
    assert site.gossip_key not in site.first.output
    assert site.join_token not in site.first.output
    assert SEALING_KEY not in site.first.output


def test_installed_agent_answers_ready_with_the_inventory_config(running: Site) -> None:
    api = f"http://{running.api}"
    me = httpx.get(f"{api}/v1/agent/self", timeout=5).json()
    # gossip_port: the agent's own entry (its gossip port is not 7946 here), for the servers
    meta = {k: v for k, v in me["Meta"].items() if k != "gossip_port"}
    assert me["Member"]["Tags"]["az"] == "test-1a" and meta == {"team": "platform"}
    services = httpx.get(f"{api}/v1/agent/services", timeout=5).json()
    assert sorted(services) == ["db", "web-1"]
    assert services["web-1"]["Meta"]["version"] == "v1"
    checks = httpx.get(f"{api}/v1/agent/checks", timeout=5).json()
    assert len(checks) == 3
    # Gossip runs encrypted with the vaulted key.
    keyring = httpx.get(f"{api}/v1/operator/keyring", timeout=10).json()
    assert any(running.gossip_key in entry["Keys"] for entry in keyring), keyring
    # The operator's check: the installed CLI lists this node and its AZ.
    out = subprocess.run(
        [running.prefix / "usr/local/bin/hostmesh", "members", "--json",
         "--agent", running.api],
        capture_output=True, text=True, check=True, timeout=RUN_TIMEOUT,
    ).stdout  # fmt: skip
    assert [(m["name"], m["az"]) for m in json.loads(out)] == [("agent1", "test-1a")]
    # The server keeps its store where the role said.
    assert any((running.prefix / "var/lib/hostmesh-server").iterdir())


def test_second_run_changes_nothing_and_waits_for_ready(running: Site) -> None:
    run = running.play("-e", '{"hostmesh_wait_ready": true}')
    assert run.returncode == 0, run.output
    recap = run.recap()
    assert recap.keys() == {"server1", "agent1"}
    assert all(r["changed"] == 0 and r["failed"] == 0 for r in recap.values()), run.output
    # The waits ran against the daemons started from the role's files.
    for task in ("Wait until the server answers /ready", "Wait until the agent answers /ready"):
        assert re.search(rf"TASK \[{task}\] \**\nok: ", run.output), run.output


def test_a_service_change_reloads_the_agent_without_a_restart(running: Site) -> None:
    """services.d changes notify the SIGHUP handler only; the agent picks the file up."""
    inv = json.loads(running.inventory.read_text())
    web = inv["hostmesh_agents"]["hosts"]["agent1"]["hostmesh_services"][0]
    web["tags"] = ["v1", "stable"]
    changed = running.tmp / "inventory-tags.yml"
    changed.write_text(json.dumps(inv))
    run = running.play("--limit", "agent1", inventory=changed)
    assert run.returncode == 0, run.output
    assert run.recap()["agent1"]["changed"] == 1, run.output
    assert "RUNNING HANDLER [hostmesh : Reload hostmesh]" in run.output
    assert "RUNNING HANDLER [hostmesh : Restart hostmesh]" not in run.output
    # What systemd's ExecReload does, then the agent serves the new file.
    os.kill(running.agent_pid, signal.SIGHUP)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        tags = httpx.get(f"http://{running.api}/v1/agent/service/web-1", timeout=5).json()["Tags"]
        if tags == ["v1", "stable"]:
            break
        time.sleep(0.1)
    assert tags == ["v1", "stable"]


def test_a_failed_batch_stops_the_agent_rollout(running: Site) -> None:
    """One bad host of two in a batch (a service the agent would refuse) is more
    than max_fail_percentage: the next batch is not touched."""
    inv = json.loads(running.inventory.read_text())
    agents = inv["hostmesh_agents"]["hosts"]
    agents["agent1"]["hostmesh_services"].append({"name": "broken", "port": 70000})
    # A good host in the same batch, on its own prefix with the venv already made.
    agents["agent1b"] = {
        "hostmesh_prefix": str(running.tmp / "root-b"),
        "hostmesh_venv": str(running.prefix / "opt/hostmesh/venv"),
        "hostmesh_wheel": "",
        "hostmesh_wait_ready": False,
    }
    agents["agent2"] = {"hostmesh_prefix": str(running.tmp / "root-2")}
    bad = running.tmp / "inventory-bad.yml"
    bad.write_text(json.dumps(inv))
    batches = '{"hostmesh_agent_batches": [2, "100%"]}'
    run = running.play("-e", batches, "--limit", "hostmesh_agents", inventory=bad)
    assert run.returncode != 0
    assert "70000 is not a TCP port" in run.output  # the loader's own message
    recap = run.recap()
    assert recap["agent1"]["failed"] == 1 and recap["agent1b"]["failed"] == 0, run.output
    assert (running.tmp / "root-b/etc/hostmesh/agent.toml").exists()
    assert "agent2" not in recap, "the rollout went on past a failed batch"
    assert not (running.tmp / "root-2").exists()
    # The running agent keeps its files and keeps serving.
    etc = running.prefix / "etc/hostmesh/services.d"
    assert sorted(p.name for p in etc.iterdir()) == ["db.toml", "web.toml"]
    assert httpx.get(f"http://{running.api}/ready", timeout=5).status_code == 200

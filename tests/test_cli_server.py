"""The CLI against a real `hostmesh server` process over HTTPS: tokens, KV, routes and
splits with compare-and-swap, node revocation, root rotation and `hostmesh certs`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from conftest import agent_config
from test_cli import HOSTMESH, read_until, stop

from hostmesh import AgentServerConfig
from hostmesh._pki import load_certificates, spki_pin
from hostmesh.agent._certs import CertificateManager

pytestmark = pytest.mark.sockets

ROUTES = """
[traffic.udvr]
rate_limit = 50

[[traffic.udvr.routes]]
name = "canary"
match = { headers = [{ name = "x-canary", exact = "1" }] }
targets = [{ tag = "canary" }]

[[traffic.udvr.routes]]
name = "default"
targets = [{ version = "v1", weight = 3 }, { version = "v2", weight = 1 }]
"""


class Running:
    def __init__(self, address: str, token: str, pin: str, roots: Path) -> None:
        self.address, self.token, self.pin, self.roots = address, token, pin, roots

    @property
    def env(self) -> dict[str, str]:
        """The CLI's environment: server, token, and the roots file (one TLS connection a
        call; the pin path, two connections, is tested on its own)."""
        return {**os.environ, "HOSTMESH_SERVER": self.address, "HOSTMESH_TOKEN": self.token,
                "HOSTMESH_CACERT": str(self.roots), "COLUMNS": "200"}  # fmt: skip


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HOSTMESH, *args], capture_output=True, text=True, timeout=60, env=env)


def one_line_error(done: subprocess.CompletedProcess[str], words: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert words in done.stderr, done.stderr


@contextlib.contextmanager
def server_process(root: Path, extra_toml: str = "") -> Iterator[Running]:
    """A real ``hostmesh server`` in ``root``: its printed token and pin, its verified roots."""
    (root / "server.toml").write_text(
        f'bind = "127.0.0.1:0"\ndata_dir = "{root / "data"}"\n{extra_toml}'
    )
    proc = subprocess.Popen(
        [HOSTMESH, "server", "-c", str(root / "server.toml"), "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    try:
        _, out = read_until(proc, "stdout", r"^\s+sha256:[0-9a-f]{64}$")
        token, pin = out[1].strip(), out[3].strip()
        match, _ = read_until(proc, "stderr", r'"msg": ?"server started".*"api": ?"([0-9.:]+)"')
        address = match.group(1)
        # The roots, fetched unverified and checked against the printed pin (as the CLI does).
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        roots_pem = httpx.get(f"https://{address}/v1/ca/roots", verify=insecure).json()["roots_pem"]
        assert spki_pin(load_certificates(roots_pem.encode())[0]) == pin
        (root / "roots.pem").write_text(roots_pem)
        yield Running(address, token, pin, root / "roots.pem")
    finally:
        assert stop(proc, signal.SIGTERM) == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with server_process(tmp_path_factory.mktemp("server")) as running:
        yield running


def test_tokens_kv_and_errors_through_the_cli(server: Running) -> None:
    env = server.env
    made = cli("token", "create", "--node-pattern", "web-*", "--description", "web", env=env)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert re.fullmatch(r"hm_[A-Za-z0-9_-]{43}", secret) and "not shown again" in made.stderr
    listed = json.loads(cli("token", "list", "--json", env=env).stdout)
    [join] = [t for t in listed if t["kind"] == "join"]
    assert join["node_pattern"] == "web-*" and secret not in json.dumps(listed)
    assert cli("token", "revoke", join["accessor"], env=env).returncode == 0
    one_line_error(cli("token", "revoke", join["accessor"], env=env), "404")

    assert cli("kv", "put", "app/config", "debug=1", env=env).returncode == 0
    assert cli("kv", "get", "app/config", env=env).stdout == "debug=1\n"
    entry = json.loads(cli("kv", "get", "app/config", "--json", env=env).stdout)
    stale = str(entry["modify_index"])
    assert cli("kv", "put", "app/config", "debug=2", "--cas", stale, env=env).returncode == 0
    one_line_error(cli("kv", "put", "app/config", "x", "--cas", stale, env=env), "does not match")
    assert cli("kv", "get", "app/config", env=env).stdout == "debug=2\n"
    # Trusting the server by the pin it printed works as well as the roots file.
    by_pin = {**env, "HOSTMESH_CACERT": "", "HOSTMESH_CA_PIN": server.pin}
    rows = json.loads(cli("kv", "list", "app/", "--json", env=by_pin).stdout)
    assert [r["key"] for r in rows] == ["app/config"]
    assert cli("kv", "delete", "app/config", env=env).returncode == 0
    one_line_error(cli("kv", "get", "app/config", env=env), "no key 'app/config'")

    # Credentials and trust: each mistake is one clear line.
    one_line_error(cli("kv", "list", env={**env, "HOSTMESH_TOKEN": ""}), "--token")
    one_line_error(cli("kv", "list", env={**env, "HOSTMESH_TOKEN": "hm_" + "x" * 43}), "401")
    wrong_pin = {**by_pin, "HOSTMESH_CA_PIN": "sha256:" + "0" * 64}
    one_line_error(cli("kv", "list", env=wrong_pin), "no CA root matches")
    one_line_error(cli("kv", "list", env={**env, "HOSTMESH_CACERT": ""}), "--ca-pin")


def test_routes_splits_revocation_rotation_and_certs(server: Running, tmp_path: Path) -> None:
    env = server.env
    (tmp_path / "udvr.toml").write_text(ROUTES)
    done = cli("route", "set", "udvr", str(tmp_path / "udvr.toml"), "--cas", "0", env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(cli("route", "get", "udvr", "--json", env=env).stdout)
    assert [r["name"] for r in doc["policy"]["routes"]] == ["canary", "default"]
    # A second operator holding the old index cannot clobber the first one's change.
    old = str(doc["modify_index"])
    assert cli("split", "udvr", "v1=1", "v2=1", "v3=2", env=env).returncode == 0
    one_line_error(cli("route", "set", "udvr", str(tmp_path / "udvr.toml"), "--cas", old, env=env),
                   "409")  # fmt: skip
    doc = json.loads(cli("route", "get", "udvr", "--json", env=env).stdout)
    targets = doc["policy"]["routes"][-1]["targets"]
    assert [(t["version"], t["weight"]) for t in targets] == [("v1", 1), ("v2", 1), ("v3", 2)]
    assert doc["policy"]["routes"][0]["name"] == "canary" and doc["policy"]["rate_limit"] == 50
    # The server validates with the agent's own parser; the key at fault is named.
    (tmp_path / "bad.toml").write_text('[[routes]]\ntargets = [{ version = "v1", weight = -2 }]\n')
    one_line_error(cli("route", "set", "udvr", str(tmp_path / "bad.toml"), env=env),
                   "routes[0].targets[0].weight")  # fmt: skip
    one_line_error(cli("split", "udvr", "v1", env=env), "SUBSET=WEIGHT")
    assert cli("split", "web", "tag:canary=1", "v1=9", env=env).returncode == 0
    table = cli("route", "list", env=env).stdout
    assert "canary=1 v1=9" in table and "v1=1 v2=1 v3=2" in table
    assert cli("route", "delete", "web", env=env).returncode == 0
    one_line_error(cli("route", "get", "web", env=env), "no routes set for 'web'")

    # An agent joins (in-process, over TLS, trusting the pin printed by the server).
    secret = cli("token", "create", env=env).stdout.strip()
    (tmp_path / "join-token").write_text(secret)
    trust = AgentServerConfig(ca_pin=server.pin, join_token_file=str(tmp_path / "join-token"))
    cfg = replace(agent_config(tmp_path / "agent"), node_name="web-1",
                  servers=(server.address,), server=trust)  # fmt: skip
    issued = trio.run(CertificateManager(cfg).ensure)
    local = {**env, "HOSTMESH_SERVER": ""}
    shown = json.loads(cli("certs", "--data-dir", cfg.data_dir, "--json", env=local).stdout)
    assert shown["node"]["identity"] == "spiffe://mesh/node/web-1"
    assert shown["node"]["serial"] == format(issued.cert.serial_number, "x")
    assert [r["pin"] for r in shown["roots"]] == [server.pin]
    table = cli("certs", "--data-dir", cfg.data_dir, env=local).stdout
    assert "spiffe://mesh/node/web-1" in table and server.pin in table and "2d 23h" in table

    revoked = json.loads(cli("node", "revoke", "web-1", "--json", env=env).stdout)
    assert revoked["revoked"] == [format(issued.cert.serial_number, "x")]
    one_line_error(cli("node", "revoke", "nobody", env=env), "no unexpired certificate")

    rotated = cli("ca", "rotate", env=env)
    assert rotated.returncode == 0 and "new root sha256:" in rotated.stdout
    one_line_error(cli("ca", "rotate", env=env), "overlap")
    both = json.loads(cli("certs", "--data-dir", str(tmp_path / "none"), "--json", env=env).stdout)
    assert [r["active"] for r in both["server_roots"]] == [False, True]
    assert both["server_roots"][0]["pin"] == server.pin  # the old pin still finds the CA

"""kill -9 of a real ``hostmesh server`` process during a burst of registrations: after a
restart every acknowledged registration is there (SQLite in the data dir, and a real etcd).

Two kinds of registration run at once, each counted only once the server acknowledged it:

- agents' node records over the real sync protocol (TLS websocket, node certificates from a
  join). Sync has no per-record ACK message, but the server streams every committed change
  of ``catalog/nodes/*`` to every session, the sender's own key included: a record version
  counts as acknowledged when the agent receives it back from the server's store watch,
  which only carries committed (for SQLite: fsynced) revisions;
- external services through the management API (``PUT /v1/catalog/external/<id>`` answers
  200 after the store committed the write).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from etcd_cluster import EtcdCluster
from test_cli import HOSTMESH, read_until

from hostmesh._tls import client_context, make_node_key_and_csr
from hostmesh.agent._sync import sync_websocket
from hostmesh.catalog import Catalog, Node, NodeRecord, ServiceInstance
from hostmesh.catalog._syncproto import ClientState, Delta, Snapshot, decode

pytestmark = pytest.mark.sockets

MESH = "mesh"
NODES = 12  # agents registering at once
KILL_AFTER = 300  # acknowledged registrations (both kinds) before the SIGKILL
#: s for the burst (or the check after the restart); a few seconds here.
BURST_TIMEOUT = 30.0
#: What a client sees of a server killed under it.
GONE = (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, trio.BrokenResourceError,
        OSError)  # fmt: skip


@dataclass
class Proc:
    """A running ``hostmesh server``: its process, API address and management token."""

    process: subprocess.Popen[bytes]
    address: str
    token: str
    lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def hostmesh_server(root: Path, store_toml: str) -> Iterator[Proc]:
    """Start ``hostmesh server`` on a free port with ``root/data``; stop (or reap) it at the end."""
    config = root / "server.toml"
    config.write_text(
        f'bind = "127.0.0.1:0"\ndata_dir = "{root / "data"}"\n{store_toml}'
        "\n[ca]\ncsr_rate = 0\n"
        + (f'sealing_key_file = "{root / "seal.key"}"\n' if "etcd" in store_toml else "")
    )
    process = subprocess.Popen(
        [HOSTMESH, "server", "-c", str(config), "--log-format", "json"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    drainer: threading.Thread | None = None
    try:
        match, lines = read_until(
            process, "stderr", r'"msg": ?"server started".*"api": ?"([0-9.:]+)"'
        )
        token = (root / "data" / "management.token").read_text().strip()
        proc = Proc(process, match.group(1), token, lines)

        def drain() -> None:  # the log keeps flowing; a full pipe would stall the server
            assert process.stderr is not None
            for raw in iter(process.stderr.readline, b""):
                proc.lines.append(raw.decode(errors="replace"))

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        yield proc
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if drainer is not None:
            drainer.join(timeout=10)  # EOF once the process is gone
        assert process.stderr is not None
        process.stderr.close()


def roots_of(address: str) -> bytes:
    """The CA roots, fetched as a joining agent would before it trusts them (tests trust the
    first answer: the server is the one this test started)."""
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    with httpx.Client(verify=insecure, timeout=10, trust_env=False) as http:
        return http.get(f"https://{address}/v1/ca/roots").json()["roots_pem"].encode()


def verify(roots: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=roots.decode())
    ctx.check_hostname = False  # the certificate names spiffe://mesh/server/<name>
    return ctx


def join(server: Proc, roots: bytes, nodes: list[str]) -> dict[str, ssl.SSLContext]:
    """Node certificates for ``nodes`` through a join token and ``POST /v1/ca/sign``."""
    with httpx.Client(base_url=f"https://{server.address}", verify=verify(roots), timeout=10,
                      trust_env=False) as http:  # fmt: skip
        manage = {"Authorization": f"Bearer {server.token}"}
        r = http.post("/v1/tokens", json={"kind": "join", "node_pattern": "*"}, headers=manage)
        assert r.status_code == 200, r.text
        secret = r.json()["secret"]
        out = {}
        for node in nodes:
            key = make_node_key_and_csr(node)
            r = http.post("/v1/ca/sign", json={"node": node, "csr": key.csr_pem.decode()},
                          headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
            assert r.status_code == 200, r.text
            out[node] = client_context(r.json()["chain"].encode(), key.key_pem, roots)
        return out


def record(node: str, version: int) -> NodeRecord:
    """Version ``v`` of a node's record registers services svc-0 .. svc-(v-1)."""
    services = tuple(ServiceInstance(f"svc-{i}", f"svc-{i}", "", 8000 + i) for i in range(version))
    return NodeRecord(Node(node, "127.0.0.1", az="dev-1a"), 1, version, services=services)


def own_versions(node: str, message: Any) -> list[int]:
    """Versions of ``node``'s record in a SNAPSHOT or DELTA (what the store committed)."""
    changes = message.entries if isinstance(message, Snapshot) else message.changes
    key = f"catalog/nodes/{node}"
    return [c.value["version"] for c in changes if c.key == key and not c.deleted]


@dataclass
class Burst:
    acked_records: dict[str, int] = field(default_factory=dict)  # node -> highest acked version
    sent_records: dict[str, int] = field(default_factory=dict)
    acked_external: set[str] = field(default_factory=set)
    attempted_external: int = 0
    stop: bool = False  # set when the test ends the burst on a failure

    @property
    def acked(self) -> int:
        return sum(self.acked_records.values()) + len(self.acked_external)


async def register_records(address: str, node: str, tls: ssl.SSLContext, burst: Burst) -> None:
    """Send versions 1, 2, ... of ``node``'s record, each once the last one came back."""
    state = ClientState(Catalog(), node)
    version = 1
    try:
        async with sync_websocket(address, tls, MESH) as ws:
            await ws.send_message(state.hello(record(node, version)))
            burst.sent_records[node] = version
            while True:
                message = decode(await ws.get_message())
                if not isinstance(message, Snapshot | Delta):
                    continue
                seen = own_versions(node, message)
                if seen and max(seen) >= version:
                    burst.acked_records[node] = max(seen)
                    version = max(seen) + 1
                    await ws.send_message(ClientState.record(record(node, version)))
                    burst.sent_records[node] = version
    except* GONE:
        pass  # the server was killed


def register_externals(address: str, roots: bytes, token: str, burst: Burst) -> None:
    """PUT external services one after another until the server dies; a 200 is an
    acknowledgement. (A thread with httpx's sync client: a request cut by the kill leaves
    an async client's body generator to the garbage collector, encode/httpx#3686.)"""
    with httpx.Client(base_url=f"https://{address}", verify=verify(roots), timeout=10,
                      headers={"Authorization": f"Bearer {token}"},
                      trust_env=False) as http:  # fmt: skip
        while not burst.stop:
            ident = f"ext-{burst.attempted_external}"
            burst.attempted_external += 1
            try:
                r = http.put(f"/v1/catalog/external/{ident}",
                             json={"name": "managed-db", "address": "10.0.9.10", "port": 5432,
                                   "az": "dev-1b"})  # fmt: skip
            except httpx.HTTPError:
                return  # the server died with this one in flight: not acknowledged
            assert r.status_code == 200, r.text
            burst.acked_external.add(ident)


async def run_burst(server: Proc, roots: bytes, certs: dict[str, ssl.SSLContext]) -> Burst:
    """Register from every node and through the API until KILL_AFTER acknowledgements, then
    SIGKILL the server while registrations are in flight."""
    burst = Burst()
    try:
        with trio.fail_after(BURST_TIMEOUT):
            await _burst(server, roots, certs, burst)
    finally:
        burst.stop = True
    return burst


async def _burst(
    server: Proc, roots: bytes, certs: dict[str, ssl.SSLContext], burst: Burst
) -> None:
    async with trio.open_nursery() as nursery:
        for node, tls in certs.items():
            nursery.start_soon(register_records, server.address, node, tls, burst)
        # Abandoned on cancel (a failure elsewhere): it ends at burst.stop or with the server.
        puts = functools.partial(trio.to_thread.run_sync, abandon_on_cancel=True)
        nursery.start_soon(puts, register_externals, server.address, roots, server.token, burst)
        while burst.acked < KILL_AFTER:
            await trio.sleep(0.005)  # polling the counters the tasks above fill
        os.kill(server.process.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(server.process.wait)
    # Acks already in a client's socket when the server died count too: the store
    # committed them before it sent them.
    assert server.process.returncode == -signal.SIGKILL


async def stored_records(server: Proc, tls: ssl.SSLContext) -> dict[str, NodeRecord]:
    """The restarted server's catalog as a new agent's snapshot shows it."""
    state = ClientState(Catalog(), "checker")
    with trio.fail_after(BURST_TIMEOUT):
        async with sync_websocket(server.address, tls, MESH) as ws:
            await ws.send_message(state.hello(record("checker", 1)))
            while not state.receive(await ws.get_message()).snapshot:
                pass
    return {r.node.name: r for r in state.catalog}


def crash_and_check(root: Path, store_toml: str) -> None:
    nodes = [f"burst-{i}" for i in range(NODES)]
    with hostmesh_server(root, store_toml) as server:
        roots = roots_of(server.address)
        certs = join(server, roots, [*nodes, "checker"])
        checker = certs.pop("checker")
        burst = trio.run(run_burst, server, roots, certs)
    assert len(burst.acked_records) == NODES and burst.acked_external  # both kinds ran
    in_flight = sum(burst.sent_records[n] - burst.acked_records.get(n, 0) for n in nodes)
    in_flight += burst.attempted_external - len(burst.acked_external)
    assert in_flight > 0, "the kill came between registrations, not during them"
    print(f"acknowledged: {burst.acked}, in flight at the kill: {in_flight}")

    with hostmesh_server(root, store_toml) as again:
        records = trio.run(stored_records, again, checker)
        with httpx.Client(base_url=f"https://{again.address}", verify=verify(roots_of(
                again.address)), timeout=10, trust_env=False,
                headers={"Authorization": f"Bearer {again.token}"}) as http:  # fmt: skip
            externals = {s["id"] for s in http.get("/v1/catalog/external").json()}
    missing = {n: v for n, v in burst.acked_records.items()
               if n not in records or records[n].version < v}  # fmt: skip
    assert not missing, f"acknowledged record versions lost: {missing}"
    for node, version in burst.acked_records.items():
        registered = {s.id for s in records[node].services}
        assert {f"svc-{i}" for i in range(version)} <= registered
    assert burst.acked_external <= externals, burst.acked_external - externals


def test_kill_9_during_a_burst_loses_no_acknowledged_registration_sqlite(tmp_path: Path) -> None:
    crash_and_check(tmp_path, "")


def test_kill_9_during_a_burst_loses_no_acknowledged_registration_etcd(tmp_path: Path) -> None:
    (tmp_path / "seal.key").write_text(base64.b64encode(os.urandom(32)).decode())
    (tmp_path / "seal.key").chmod(0o600)
    with EtcdCluster(tmp_path / "etcd", size=1) as etcd:
        endpoints = ", ".join(f'"{e}"' for e in etcd.endpoints)
        crash_and_check(tmp_path, f'[store]\nbackend = "etcd"\nendpoints = [{endpoints}]\n')

"""The mTLS hop under load, on loopback: a real server and agents on 127.0.0.x, each
agent's inbound listener on a port of its own (published in its node meta).

- wrk through agent A's proxy to a service that only agent B runs, while both
  renew their node certificates and the CA root is rotated: no failed request,
  and B's inbound listener presents the new certificates (new serials, the last
  one issued by the new root).
- A closed loop through A to a service with three instances on two other agents;
  one instance is killed with SIGKILL mid-run: failures stay under 0.1% and the
  survivors carry the traffic.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from mesh_env import AgentProc, Mesh, mesh, parse_wrk, service_toml, wait_until

pytestmark = [pytest.mark.sockets, pytest.mark.slow]

WRK = "/usr/bin/wrk"
WRK_SECONDS = 10
LOAD_SECONDS = 8.0
#: Fewest requests a run must make: far below what the proxy does (hundreds a second
#: even on a busy 2-core machine), far above what a broken hop would let through.
MIN_REQUESTS = 1000
#: s a renewal may take to show on a listener (it is immediate in the product).
SHOW_BOUND = 3.0
#: Where the backends listen: an instance without an address of its own is dialled by
#: its agent on 127.0.0.1, so a caller that skipped the hop (dialling the node address
#: 127.0.0.x) would find nothing there.
LOOPBACK = "127.0.0.1"


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Mesh]:
    with mesh(tmp_path) as m:
        m.server()
        yield m


def start_agents(m: Mesh, instances: dict[str, list[int]]) -> dict[str, AgentProc]:
    """Agent ``a`` (127.0.0.2, the caller, no services) and one agent per key of
    ``instances`` (127.0.0.3, ...) with those ports as instances of ``svc``.

    Instance ids are ``svc-0``, ``svc-1``, ... on every agent, as a templated rollout
    would make them: an id is unique on its node only (``ServiceDefinition.id``)."""
    agents = [m.agent("a", "127.0.0.2", "dev-1a", ports="any", inbound="127.0.0.2:0", wait=False)]
    for i, (name, ports) in enumerate(instances.items()):
        address = f"127.0.0.{3 + i}"
        files = {
            f"svc{j}": service_toml("svc", port, id=f"svc-{j}") for j, port in enumerate(ports)
        }
        agents.append(m.agent(name, address, "dev-1a", services=files, ports="any",
                              inbound=f"{address}:0", wait=False))  # fmt: skip
    for agent in agents:
        m.wait_agent(agent)
    m.wait_synced()
    a = agents[0]
    total = sum(len(p) for p in instances.values())
    wait_until(lambda: sum(a.passing("svc").values()) == total, 10, "a sees every instance")
    a.wait_answering("svc")  # the data path is up
    return {agent.name: agent for agent in agents}


def start_wrk(
    out: Path, caller: AgentProc, *, connections: int, seconds: int
) -> subprocess.Popen[bytes]:
    """wrk through the caller's proxy to ``svc``, its report into ``out``."""
    with out.open("w") as sink:
        return subprocess.Popen([*caller.prefix, WRK, "-t2", f"-c{connections}", f"-d{seconds}s",
                                 "--timeout", "5s", "-H", "Host: svc", caller.proxy_url],
                                stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip


def inbound_address(caller: AgentProc, node: str) -> tuple[str, int]:
    """Where ``node``'s inbound listener is, as the caller's catalog says (node meta)."""
    [entry] = [n for n in caller.api_json("GET", "/v1/catalog/nodes") if n["Node"] == node]
    port = int(entry["Meta"]["inbound_port"])
    assert port != 4141, "the test asked for any free port, not the default"
    return entry["Address"], port


def presented_certificate(address: tuple[str, int]) -> x509.Certificate:
    """The certificate a TLS listener presents (we have no client certificate: TLS 1.3
    sends the server's before it asks for ours, so the handshake gets that far)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(address, timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der, f"{address} presented no certificate"
    return x509.load_der_x509_certificate(der)


def renew(agent: AgentProc) -> int:
    """Renew the agent's node certificate now (its API); the new serial."""
    return int(agent.api_json("PUT", "/v1/agent/certificate/renew")["Serial"], 16)


def authority_key(cert: x509.Certificate) -> bytes:
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier


def test_certificates_renew_and_the_root_rotates_under_wrk_without_a_failed_request(
    running: Mesh,
) -> None:
    m = running
    agents = start_agents(m, {"b": m.backend("svc@b", LOOPBACK, [0, 0]).ports})
    a, b = agents["a"], agents["b"]
    b_inbound = inbound_address(a, "b")
    first = presented_certificate(b_inbound)

    hops_before = b.metric("hostmesh_inbound_responses_total", service="svc", code="2xx")
    wrks: list[subprocess.Popen[bytes]] = []
    try:
        wrks.append(start_wrk(m.root / "wrk.txt", a, connections=16, seconds=WRK_SECONDS))
        began = time.monotonic()

        def at(offset: float) -> None:
            time.sleep(max(0.0, began + offset - time.monotonic()))

        at(1.5)
        b_serials = [renew(b)]
        at(2.5)
        a_serials = [renew(a)]
        at(3.5)
        assert m.server_proc is not None
        rotated = json.loads(m.server_proc.cli_ok("ca", "rotate", "--json"))
        at(5.0)  # the new root has reached the agents (the sync takes about a second)
        b_serials.append(renew(b))
        at(6.0)
        a_serials.append(renew(a))
        # B's listener shows each new certificate to new connections.
        wait_until(lambda: presented_certificate(b_inbound).serial_number == b_serials[-1],
                   SHOW_BOUND, "b's inbound presents its last certificate")  # fmt: skip
        # More connections than A has pooled to B: new hops, both ends on new certificates.
        at(7.0)
        wrks.append(start_wrk(m.root / "wrk-burst.txt", a, connections=64, seconds=2))
        for wrk in wrks:
            wrk.wait(timeout=WRK_SECONDS + 20)
    finally:
        for wrk in wrks:
            if wrk.poll() is None:
                wrk.kill()
                wrk.wait()
    results = [parse_wrk((m.root / f).read_text()) for f in ("wrk.txt", "wrk-burst.txt")]
    last = presented_certificate(b_inbound)
    hops = b.metric("hostmesh_inbound_responses_total", service="svc", code="2xx") - hops_before

    for result in results:
        assert result.failed == 0, f"{result.text}\n{m.logs()}"
    assert results[0].requests >= MIN_REQUESTS, results[0].text
    # Every request crossed to B's inbound listener (the instances are only there).
    assert hops >= sum(r.requests for r in results), (hops, results)
    serials = [first.serial_number, *b_serials]
    assert len(set(serials)) == 3 and len(set(a_serials)) == 2, (serials, a_serials)
    assert last.serial_number == b_serials[-1]
    # The last one is issued by the new root: another signing key than the first.
    assert authority_key(last) != authority_key(first), rotated
    kept = x509.load_pem_x509_certificates((a.data_dir / "certs" / "node.pem").read_bytes())[0]
    assert kept.serial_number == a_serials[-1]


def test_an_instance_killed_under_load_costs_almost_no_request(running: Mesh) -> None:
    m = running
    b_procs = [m.backend(f"svc@b{i}", LOOPBACK) for i in range(2)]
    c_proc = m.backend("svc@c", LOOPBACK)
    agents = start_agents(m, {"b": [p.ports[0] for p in b_procs], "c": c_proc.ports})
    a = agents["a"]
    warm = a.fetch("svc", 60)
    assert set(warm["backends"]) == {"svc@b0", "svc@b1", "svc@c"}, warm

    args = [a.proxy_url, "svc", str(LOAD_SECONDS), "--concurrency", "8"]
    load = subprocess.Popen(a.client_argv("load", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(LOAD_SECONDS * 0.4)
        killed_at = time.time()
        b_procs[0].proc.popen.send_signal(signal.SIGKILL)
        stdout, stderr = load.communicate(timeout=LOAD_SECONDS + 30)
    finally:
        if load.poll() is None:
            load.kill()
            load.communicate()
    assert load.returncode == 0, stderr
    doc = json.loads(stdout)
    (m.root / "load.json").write_text(stdout)
    width, start = doc["bucket"], doc["start"]
    buckets = {int(k): v for k, v in doc["buckets"].items()}
    backends = {int(k): v for k, v in doc["backends"].items()}
    ok = sum(v.get("ok", 0) for v in buckets.values())
    failed = sum(v.get("failed", 0) for v in buckets.values())
    total = ok + failed
    assert total >= MIN_REQUESTS // 2, doc  # a Python client: fewer than wrk
    assert failed <= total * 0.001, f"{failed} of {total} failed: {doc['failures']}\n{m.logs()}"

    kill_slot = int((killed_at - start) / width)
    timeline = "\n".join(f"{s * width:4.1f}s{' kill' if s == kill_slot else ''}: {buckets[s]}"
                          f" {backends.get(s, {})}" for s in sorted(buckets))  # fmt: skip
    before = [s for s in buckets if s < kill_slot]
    after = [s for s in buckets if s > kill_slot and (s + 1) * width <= LOAD_SECONDS]
    assert before and after, (kill_slot, sorted(buckets))
    # The killed instance served before its death; the survivors carry the rest.
    assert sum(backends.get(s, {}).get("svc@b0", 0) for s in before) > 0, timeline
    for name in ("svc@b1", "svc@c"):
        assert sum(backends.get(s, {}).get(name, 0) for s in after) > 0, f"{name}\n{timeline}"
    rate_before = sum(buckets[s].get("ok", 0) for s in before) / len(before)
    assert all(buckets[s].get("ok", 0) >= 0.3 * rate_before for s in after), timeline

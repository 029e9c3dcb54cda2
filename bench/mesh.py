#!/usr/bin/env python3
"""Mesh hop benchmark: wrk direct, through two hostmesh agents over mTLS, and through two nginx.

    python bench/mesh.py [--seconds 10] [--connections 32] [--out bench/results/mesh.txt]

Starts, on free loopback ports and in one temp directory:

- the backend: nginx, one worker, ``return 200 "ok\\n"`` (as in bench/proxy.py);
- a ``hostmesh server`` (SQLite store) and two ``hostmesh agent`` processes, node
  ``mesh-a`` on 127.0.0.2 and node ``mesh-b`` on 127.0.0.3, each joined with its
  own join token; ``backend`` is in mesh-b's ``services.d`` only, so a request
  to mesh-a's outbound proxy (``Host: backend``) crosses mesh-a -> mutual TLS
  -> mesh-b's inbound listener -> the backend;
- the same hop in nginx: nginx A (plain HTTP) -> ``proxy_pass https://`` with a
  client certificate, TLS 1.3, keep-alive -> nginx B (``ssl_verify_client on``)
  -> the backend; one worker each, leaf certificates from a throwaway EC P-256 CA.

wrk (``-t1 -c<connections> --latency``) runs the same time against the backend
directly and through each hop. Then a paced, open-loop client (bench/proxy.py's)
sends 1,000 requests/s to each of the three at once, so the difference of the
p99s is the latency a hop adds at a moderate load. Prints rps, p50/p99, ratios,
each agent's RSS and CPU, and the goals beside them. Loopback only; bounded in
time; every process and the temp directory are cleaned up on failure and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy import (
    NGINX_BACKEND,
    NGINX_COMMON,
    SERVICE,
    WARMUP,
    PacedResult,
    Processes,
    WrkResult,
    first_line,
    machine_busy,
    noise_line,
    our_cpu,
    paced,
    paced_rows,
    publish,
    sigterm_as_exit,
    tree_cpu,
    wait_ready,
    wrk,
    wrk_errors,
)

NODES = {"a": "127.0.0.2", "b": "127.0.0.3"}  # node -> address; all of 127/8 is loopback
MESH_TIMEOUT = 60.0  # s for the server to start, the agents to join, gossip and answer 200
CERT_LIFE = datetime.timedelta(days=1)  # the throwaway nginx CA and leaves; one run
GOAL_RPS_VS_NGINX = 0.5  # hostmesh hop rps >= this x nginx TLS hop rps (bench/proxy.py's goal)
GOAL_RSS_MB = 50.0  # MB (10^6 bytes) of each agent's RSS after the load (bench/proxy.py's goal)
PROXY_GOAL_ADDED_P99_MS = 1.0  # ms; bench/proxy.py's goal for one proxy, shown for reference

SERVER = """\
bind = "127.0.0.1:0"
data_dir = "{tmp}/server"
"""

AGENT = """\
node_name = "mesh-{node}"
address = "{address}"
az = "bench-1a"
data_dir = "{dir}/data"
services_dir = "{dir}/services.d"
servers = ["{server}"]
[server]
ca_pin = "{pin}"
join_token_file = "{dir}/join-token"
[api]
bind = "127.0.0.1:{api}"
[dns]
bind = "127.0.0.1:{dns}"
resolv_conf = ""
[gossip]
bind = "{address}:{gossip}"
seeds = ["{peer_gossip}"]
[proxy]
bind = "127.0.0.1:{proxy}"
[inbound]
bind = "{address}:{inbound}"
"""

# nginx A: plain HTTP in, TLS 1.3 with a client certificate out, kept alive.
NGINX_HOP_A = """\
    upstream hop {{
        server {b}:{hop_b};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://hop;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_certificate {pki}/nginx-a.pem;
            proxy_ssl_certificate_key {pki}/nginx-a.key;
            proxy_ssl_trusted_certificate {pki}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name nginx-b.node.mesh;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_session_reuse on;
        }}
    }}"""

# nginx B: TLS 1.3 in, a client certificate from the CA required, plain HTTP to the backend.
NGINX_HOP_B = """\
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {b}:{port} ssl;
        ssl_certificate {pki}/nginx-b.pem;
        ssl_certificate_key {pki}/nginx-b.key;
        ssl_protocols TLSv1.3;
        ssl_client_certificate {pki}/ca.pem;
        ssl_verify_client on;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --- the nginx hop's certificates ------------------------------------------------------


def make_pki(out: Path) -> None:
    """A throwaway EC P-256 CA (``ca.pem``) and leaves ``nginx-a`` and ``nginx-b``.

    Each leaf has a DNS SAN ``<name>.node.mesh``, its node's IP and a SPIFFE URI
    SAN like a hostmesh node certificate, and both server and client auth.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench mesh CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CERT_LIFE)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for node, address in NODES.items():
        name = f"nginx-{node}"
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CERT_LIFE)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(f"{name}.node.mesh"),
                        x509.IPAddress(ipaddress.ip_address(address)),
                        x509.UniformResourceIdentifier(f"spiffe://mesh/node/{name}"),
                    ]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (out / f"{name}.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (out / f"{name}.key").write_bytes(key_pem)
        (out / f"{name}.key").chmod(0o600)


def probe_tls(
    host: str, port: int, cert: Path, key: Path, roots: Path, server_name: str | None
) -> str:
    """One handshake as a client with ``cert``: the version and cipher the listener chose."""
    ctx = ssl.create_default_context(cafile=str(roots))
    ctx.check_hostname = server_name is not None
    ctx.load_cert_chain(str(cert), str(key))
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            cipher = tls.cipher()
            return f"{tls.version()} {cipher[0] if cipher else '?'}"
    except (OSError, ssl.SSLError) as exc:
        return f"handshake failed: {exc}"


# --- the hostmesh side -----------------------------------------------------------------


def mesh_logs(procs: Processes, tail: int = 40) -> str:
    """The last lines of the server's and agents' logs, token secrets blanked."""
    text = "\n".join(
        f"--- {name} log (tail):\n{procs.log(name, tail) or '(empty)'}"
        for name in ("hostmesh-server", "agent-a", "agent-b")
    )
    return re.sub(r"hm_[A-Za-z0-9_-]+", "hm_<secret>", text)


def start_server(procs: Processes, hostmesh: str, tmp: Path) -> tuple[str, str, str]:
    """Start ``hostmesh server``; its address, printed management token and CA pin."""
    (tmp / "server.toml").write_text(SERVER.format(tmp=tmp))
    procs.start("hostmesh-server",
                [hostmesh, "server", "-c", str(tmp / "server.toml"), "--log-format", "json"],
                cwd=tmp)  # fmt: skip
    deadline = time.monotonic() + MESH_TIMEOUT
    while time.monotonic() < deadline:
        procs.check_alive()
        text = (tmp / "hostmesh-server.log").read_text(errors="replace")
        token = re.search(r"^\s+(hm_\S+)$", text, re.MULTILINE)
        pin = re.search(r"^\s+(sha256:[0-9a-f]{64})$", text, re.MULTILINE)
        address = ""
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("msg") == "server started":
                    address = str(record["api"])
        if token and pin and address:
            return address, token.group(1), pin.group(1)
        time.sleep(0.1)
    raise SystemExit(f"hostmesh server did not start:\n{procs.log('hostmesh-server')}")


def join_token(hostmesh: str, server: str, token: str, pin: str, node: str) -> str:
    """A join token for ``node`` only, made with ``hostmesh token create``."""
    env = {**os.environ, "HOSTMESH_SERVER": server, "HOSTMESH_TOKEN": token,
           "HOSTMESH_CA_PIN": pin, "HOSTMESH_CACERT": ""}  # fmt: skip
    done = subprocess.run(
        [hostmesh, "token", "create", "--node-pattern", node, "--description", "bench/mesh.py"],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"hostmesh token create failed: {done.stderr.strip()}")
    return done.stdout.strip()


def wait_mesh(procs: Processes, api_a: int, proxy_a: int) -> None:
    """Until agent A's catalog has a passing ``backend`` on mesh-b and its proxy answers 200."""
    deadline = time.monotonic() + MESH_TIMEOUT
    health = f"http://127.0.0.1:{api_a}/v1/health/service/{SERVICE}?passing"
    through = urllib.request.Request(f"http://127.0.0.1:{proxy_a}/", headers={"Host": SERVICE})
    step, last = "catalog", ""
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            if step == "catalog":
                with urllib.request.urlopen(health, timeout=2) as response:
                    nodes = [e["Node"]["Node"] for e in json.loads(response.read())]
                last = f"agent A sees {SERVICE} on {nodes or 'no node'}"
                if "mesh-b" in nodes:
                    step = "proxy"
            if step == "proxy":
                with urllib.request.urlopen(through, timeout=2) as response:
                    response.read()
                    if response.status == 200:
                        return
        except OSError as exc:  # refused while starting; HTTPError for 502/503
            last = f"{step}: {exc}"
        time.sleep(0.2)
    raise SystemExit(f"the mesh hop did not answer 200 in {MESH_TIMEOUT:g} s ({last})\n"
                     + mesh_logs(procs))  # fmt: skip


def hop_connections(pid: int, port: int, *, after: float) -> int:
    """Established TCP connections on local ``port`` held by ``pid`` or its children,
    counted ``after`` seconds from now (during a wrk run)."""
    time.sleep(after)
    root = psutil.Process(pid)
    count = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            count += sum(
                1
                for c in proc.net_connections("tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
            )
    return count


def rss(pid: int) -> int:
    """Bytes resident of ``pid`` and its children (nginx's master and worker)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


# --- the run ---------------------------------------------------------------------------

DIRECT, HOSTMESH, NGINX = "direct (nginx backend)", "hostmesh mesh hop", "nginx TLS hop"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk / paced run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    hostmesh = str(Path(sys.executable).with_name("hostmesh"))
    if not Path(hostmesh).exists():
        hostmesh = shutil.which("hostmesh") or "hostmesh"
    for tool in (nginx, "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt-get install nginx wrk)")

    results: dict[str, WrkResult] = {}
    # label -> {process: cores it used during the label's wrk run}
    cpu: dict[str, dict[str, float]] = {}
    paced_results: dict[str, PacedResult] = {}
    busy_before, ours_before = machine_busy(), our_cpu()
    steal_before = psutil.cpu_times().steal  # CPU the hypervisor gave to other guests
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="bench-mesh-") as tmp_dir:
        tmp = Path(tmp_dir)
        procs = Processes(tmp)
        try:
            b = NODES["b"]
            ports = {"backend": free_port(), "hop_a": free_port(), "hop_b": free_port(b)}
            pki = tmp / "pki"
            pki.mkdir()
            make_pki(pki)
            for name, body in (
                ("backend", NGINX_BACKEND.format(port=ports["backend"])),
                ("nginx-b", NGINX_HOP_B.format(b=b, port=ports["hop_b"], pki=pki,
                                               backend=ports["backend"])),
                ("nginx-a", NGINX_HOP_A.format(b=b, port=ports["hop_a"], pki=pki,
                                               hop_b=ports["hop_b"])),
            ):  # fmt: skip
                prefix = tmp / name
                prefix.mkdir()
                (prefix / "nginx.conf").write_text(NGINX_COMMON.format(prefix=prefix, body=body))
                procs.start(name, [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                            cwd=prefix)  # fmt: skip

            server, token, pin = start_server(procs, hostmesh, tmp)
            agent_ports = {
                node: {"api": free_port(), "dns": free_port(), "proxy": free_port(),
                       "gossip": free_port(address), "inbound": free_port(address)}
                for node, address in NODES.items()
            }  # fmt: skip
            for node, address in NODES.items():
                peer = "b" if node == "a" else "a"
                home = tmp / f"agent-{node}"
                (home / "services.d").mkdir(parents=True)
                (home / "join-token").write_text(
                    join_token(hostmesh, server, token, pin, f"mesh-{node}") + "\n"
                )
                (home / "agent.toml").write_text(
                    AGENT.format(
                        node=node, address=address, dir=home, server=server, pin=pin,
                        peer_gossip=f"{NODES[peer]}:{agent_ports[peer]['gossip']}",
                        **agent_ports[node],
                    )
                )  # fmt: skip
            (tmp / "agent-b" / "services.d" / f"{SERVICE}.toml").write_text(
                f'name = "{SERVICE}"\naddress = "127.0.0.1"\nport = {ports["backend"]}\n'
            )
            for node in NODES:
                home = tmp / f"agent-{node}"
                argv = [hostmesh, "agent", "-c", str(home / "agent.toml")]
                procs.start(f"agent-{node}", argv, cwd=home)

            targets = {
                DIRECT: (ports["backend"], {"backend": "backend"}),
                HOSTMESH: (agent_ports["a"]["proxy"],
                           {"A": "agent-a", "B": "agent-b", "backend": "backend"}),
                NGINX: (ports["hop_a"], {"A": "nginx-a", "B": "nginx-b", "backend": "backend"}),
            }  # fmt: skip
            wait_ready(procs, "backend", f"http://127.0.0.1:{ports['backend']}/")
            wait_ready(procs, "nginx-a", f"http://127.0.0.1:{ports['hop_a']}/")
            for node in NODES:
                wait_ready(procs, f"agent-{node}",
                           f"http://127.0.0.1:{agent_ports[node]['api']}/ready")  # fmt: skip
            wait_mesh(procs, agent_ports["a"]["api"], agent_ports["a"]["proxy"])
            certs = tmp / "agent-a" / "data" / "certs"
            tls = {
                HOSTMESH: probe_tls(b, agent_ports["b"]["inbound"], certs / "node.pem",
                                    certs / "node.key", certs / "roots.pem", None),
                NGINX: probe_tls(b, ports["hop_b"], pki / "nginx-a.pem", pki / "nginx-a.key",
                                 pki / "ca.pem", "nginx-b.node.mesh"),
            }  # fmt: skip

            hops = {HOSTMESH: ("agent-b", agent_ports["b"]["inbound"]),
                    NGINX: ("nginx-b", ports["hop_b"])}  # fmt: skip
            connections: dict[str, int] = {}  # label -> connections into B, mid-warm-up
            for label, (port, servers) in targets.items():
                print(f"wrk: {label} ...", file=sys.stderr, flush=True)
                with ThreadPoolExecutor(1) as pool:
                    if label in hops:  # proof that the requests cross the hop
                        name, hop_port = hops[label]
                        later = pool.submit(hop_connections, procs.procs[name].pid, hop_port,
                                            after=WARMUP / 2)  # fmt: skip
                    wrk(port, WARMUP, args.connections)
                    if label in hops:
                        connections[label] = later.result()
                before = {k: tree_cpu(procs.procs[n].pid) for k, n in servers.items()}
                results[label] = wrk(port, args.seconds, args.connections)
                cpu[label] = {k: (tree_cpu(procs.procs[n].pid) - before[k]) / args.seconds
                              for k, n in servers.items()}  # fmt: skip
                procs.check_alive()
            print("paced 1,000 rps: direct and both hops ...", file=sys.stderr, flush=True)
            paced_results = paced({label: port for label, (port, _) in targets.items()},
                                  args.seconds)  # fmt: skip
            procs.check_alive()
            memory = {
                "hostmesh agent A": rss(procs.procs["agent-a"].pid),
                "hostmesh agent B": rss(procs.procs["agent-b"].pid),
                "nginx A (master + worker)": rss(procs.procs["nginx-a"].pid),
                "nginx B (master + worker)": rss(procs.procs["nginx-b"].pid),
            }
            logs = mesh_logs(procs)
        finally:
            procs.stop()
    # Children count once waited for: the servers after stop(), wrk after each run.
    other = max(0.0, machine_busy() - busy_before - (our_cpu() - ours_before))
    steal = psutil.cpu_times().steal - steal_before

    direct, hm, ng = results[DIRECT], results[HOSTMESH], results[NGINX]

    def cores(label: str, key: str) -> str:
        value = cpu[label].get(key)
        return "-" if value is None else f"{value:.2f}"

    def per_request(label: str) -> str:
        if "A" not in cpu[label]:
            return "-"
        hop = cpu[label]["A"] + cpu[label]["B"]
        return f"{hop / results[label].rps * 1e6:.0f}"

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    lines = [
        f"wrk -t1 -c{args.connections} -d{args.seconds:g}s --latency, GET / with Host: {SERVICE},"
        f" loopback; {WARMUP:g} s wrk warm-up before each run",
        f"machine: {os.cpu_count()} cores shared by wrk, both hop ends and the backend;"
        f" python {sys.version.split()[0]}; {ssl.OPENSSL_VERSION}",
        f"{first_line([nginx, '-v'])}; {first_line(['wrk', '-v'])}",
        'backend: nginx, 1 worker, return 200 "ok\\n", keep-alive (keepalive_requests 1000000)',
        "hostmesh: wrk -> agent A outbound proxy -> mTLS -> agent B inbound -> backend"
        " (backend registered on B only); node certificates from the hostmesh server's CA",
        "nginx: wrk -> nginx A (http) -> TLS 1.3 with a client certificate, keepalive 64,"
        " session reuse -> nginx B (ssl_verify_client on) -> backend; 1 worker each,",
        "  EC P-256 CA and leaves made for the run",
        f"TLS between the hop ends (a probe handshake with A's certificate): hostmesh"
        f" {tls[HOSTMESH]}; nginx {tls[NGINX]}",
        "connections into B's hop port during the warm-up: "
        + ", ".join(
            f"{label} {connections.get(label, 0)}"
            + ("" if connections.get(label) else " (NO HOP: A did not connect to B)")
            for label in hops
        ),
        "cpu = cores used during the wrk run by hop end A, hop end B and the backend;"
        " us/req = core-us of A + B per request",
        "",
        f"{'target':<24}{'rps':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'A cpu':>7}{'B cpu':>7}{'backend':>9}{'us/req':>8}{'vs nginx hop':>14}",
    ]
    for label, r in results.items():
        lines.append(
            f"{label:<24}{r.rps:>10.0f}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}{r.errors:>8}"
            f"{cores(label, 'A'):>7}{cores(label, 'B'):>7}{cores(label, 'backend'):>9}"
            f"{per_request(label):>8}{r.rps / ng.rps:>13.2f}x"
        )
    ratio = hm.rps / ng.rps
    lines += [
        "",
        f"hostmesh hop / nginx TLS hop rps: {ratio:.2f}x   (bench/proxy.py's goal for one"
        f" proxy, for reference: >= {GOAL_RPS_VS_NGINX}x: {verdict(ratio >= GOAL_RPS_VS_NGINX)})",
        f"hostmesh hop / nginx TLS hop p50: {hm.p50_ms / ng.p50_ms:.2f}x,"
        f" p99: {hm.p99_ms / ng.p99_ms:.2f}x",
    ]
    for label in (HOSTMESH, NGINX):
        r = results[label]
        lines.append(
            f"added by the {label} over direct under wrk: p50 {r.p50_ms - direct.p50_ms:+.3f} ms,"
            f" p99 {r.p99_ms - direct.p99_ms:+.3f} ms"
        )
    lines += [
        "",
        "paced load: 1000 rps open loop to each target at the same time (sends interleaved),"
        " 8 keep-alive connections each;",
        "bench/proxy.py's client; latency = send to last response byte",
        *paced_rows(paced_results),
    ]
    base = paced_results[DIRECT]
    for label in (HOSTMESH, NGINX):
        p = paced_results[label]
        lines.append(
            f"added by the {label}: p50 {p.p50_ms - base.p50_ms:+.3f} ms,"
            f" p99 {p.p99_ms - base.p99_ms:+.3f} ms"
        )
    lines += [
        f"  (for reference, bench/proxy.py's goal for one proxy: p99 < {PROXY_GOAL_ADDED_P99_MS:g}"
        " ms added)",
        "",
        "RSS after the load:",
    ]
    for name, size in memory.items():
        goal = ""
        if name.startswith("hostmesh"):
            goal = (f"   (bench/proxy.py's goal, for an agent without TLS: < {GOAL_RSS_MB:g} MB:"
                    f" {verdict(size / 1e6 < GOAL_RSS_MB)})")  # fmt: skip
        lines.append(f"  {name:<26}{size / 1e6:>6.1f} MB ({size / 2**20:.1f} MiB){goal}")
    lines += [
        "",
        noise_line(other, steal),
    ]
    errors = wrk_errors(results, paced_results)
    if errors:
        lines += [*errors, logs]
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

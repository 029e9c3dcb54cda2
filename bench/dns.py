#!/usr/bin/env python3
"""DNS benchmark: dnsperf against hostmesh and against dnsmasq, in the same run.

    python bench/dns.py [--seconds 10] [--out bench/results/dns.txt]

Starts a hostmesh agent (its own process, DNS on a free loopback port) with
one instance of ``udvr`` at 10.0.0.1, and dnsmasq with the same static answer
for ``udvr.svc.mesh``, and a bare CPython answer loop (bench/floor_dns.py): the
most any Python server can do here. dnsperf (one process, 100 queries outstanding) asks
for ``udvr.svc.mesh A`` for the same time against each, and then against
hostmesh again while the catalog changes 10 times a second (a TTL check
flipping between passing and warning through the agent API, each flip a new
catalog version that invalidates the answer cache). Prints qps, latencies,
the ratios to dnsmasq and the agent's RSS. Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from proxy import publish

NAME = "udvr.svc.mesh"
FLOOR_LABEL = "bare CPython loop"
ADDRESS = "10.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_answer(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), NAME, "+short", "+time=1", "+tries=1"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if ADDRESS in out.stdout:
            return
        time.sleep(0.1)
    raise SystemExit(f"no answer for {NAME} on port {port}")


def dnsperf(port: int, seconds: float, queries: Path) -> dict[str, float]:
    out = subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(seconds),
         "-c", "1", "-q", "100", "-t", "2"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def grab(pattern: str) -> float:
        match = re.search(pattern, out)
        if not match:
            raise SystemExit(f"dnsperf output not understood:\n{out}")
        return float(match.group(1))

    return {
        "qps": grab(r"Queries per second:\s+([\d.]+)"),
        "avg_ms": grab(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "lost_pct": grab(r"Queries lost:\s+\d+ \(([\d.]+)%\)"),
    }


def api(port: int, path: str, body: dict[str, object] | None = None) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode() if body is not None else b"",
        method="PUT",
    )
    with urllib.request.urlopen(req, timeout=5) as response:
        response.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    for tool in ("dnsperf", "dig"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed (apt-get install dnsperf bind9-dnsutils)")
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    hostmesh = str(Path(sys.executable).with_name("hostmesh"))

    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp_dir:
        tmp = Path(tmp_dir)
        dns_port, api_port, mask_port = free_port(), free_port(), free_port()
        (tmp / "agent.toml").write_text(
            f'node_name = "bench"\naz = "a"\ndata_dir = "{tmp / "data"}"\n'
            f'services_dir = "{tmp / "services.d"}"\n'
            f'[api]\nbind = "127.0.0.1:{api_port}"\n'
            f'[dns]\nbind = "127.0.0.1:{dns_port}"\nresolv_conf = ""\n'
        )
        queries = tmp / "queries"
        queries.write_text(f"{NAME} A\n")
        agent = subprocess.Popen(
            [hostmesh, "agent", "-c", str(tmp / "agent.toml"), "--log-level", "warning"],
            cwd=tmp,
        )
        peer = subprocess.Popen(
            [dnsmasq, "-k", "--no-resolv", "--no-hosts", "--no-poll", "--pid-file=",
             "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={mask_port}",
             f"--host-record={NAME},{ADDRESS}", "--user=root", "--cache-size=1000",
             "--log-facility=/dev/null"],
        )  # fmt: skip
        floor_port = free_port()
        floor = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("floor_dns.py")), str(floor_port),
             ADDRESS], cwd=tmp,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    api(api_port, "/v1/agent/service/register",
                        {"Name": "udvr", "Address": ADDRESS, "Port": 8080})  # fmt: skip
                    api(api_port, "/v1/agent/service/register",
                        {"Name": "churn", "Port": 9, "Check": {"TTL": "1h"}})  # fmt: skip
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            wait_for_answer(dns_port)
            wait_for_answer(mask_port)
            wait_for_answer(floor_port)

            results = {}
            results["dnsmasq"] = dnsperf(mask_port, args.seconds, queries)
            results["hostmesh"] = dnsperf(dns_port, args.seconds, queries)
            results[FLOOR_LABEL] = dnsperf(floor_port, args.seconds, queries)

            stop = threading.Event()
            flips = 0

            def churn() -> None:
                # On a fixed 100 ms schedule, whatever each API call takes.
                nonlocal flips
                begin = time.monotonic()
                while not stop.is_set():
                    verb = "pass" if flips % 2 else "warn"
                    api(api_port, f"/v1/agent/check/{verb}/service:churn")
                    flips += 1
                    stop.wait(max(0.0, begin + flips * 0.1 - time.monotonic()))

            thread = threading.Thread(target=churn)
            start = time.monotonic()
            thread.start()
            try:
                results["hostmesh, catalog changing"] = dnsperf(dns_port, args.seconds, queries)
            finally:
                stop.set()
                thread.join()
            change_rate = flips / (time.monotonic() - start)
            rss = psutil.Process(agent.pid).memory_info().rss / 2**20
        finally:
            for proc in (agent, peer, floor):
                proc.send_signal(signal.SIGTERM)
            for proc in (agent, peer, floor):
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    base = results["dnsmasq"]["qps"]
    lines = [
        f"dnsperf -c 1 -q 100, {args.seconds:g} s each, query {NAME} A, one answer, loopback",
        f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}",
        "",
        f"{'server':<28}{'qps':>10}{'avg ms':>9}{'lost %':>8}{'vs dnsmasq':>12}",
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<28}{r['qps']:>10.0f}{r['avg_ms']:>9.3f}{r['lost_pct']:>8.2f}"
            f"{r['qps'] / base:>11.2f}x"
        )
    lines += [
        "",
        f"{FLOOR_LABEL}: bench/floor_dns.py, epoll + recvfrom/sendto of cached answers, no"
        " Trio, no rules: what CPython allows at all",
        f"catalog changes during the churn run: {change_rate:.1f}/s",
        f"hostmesh agent RSS after the runs: {rss:.1f} MiB",
    ]
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

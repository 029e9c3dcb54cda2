"""The agent under a saturated proxy: its DNS resolver still answers at once.

The proxy, the DNS resolver, gossip and the API share one agent process. wrk
with 256 connections keeps the proxy at a full core; a client meanwhile asks
the agent's resolver every 20 ms. Before the proxy loop gave Trio a turn
every millisecond, a query waited for a whole batch of proxied requests: p50
10-19 ms, p99 27-46 ms. Real processes on loopback: ``hostmesh agent``, a
fast HTTP responder, wrk, and a UDP client.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.sockets, pytest.mark.slow]

HOSTMESH = str(Path(sys.executable).with_name("hostmesh"))
WRK = "/usr/bin/wrk"
WRK_SECONDS = 6
QUERIES = 150  # one every QUERY_GAP s, inside the wrk run
QUERY_GAP = 0.02
#: ms the 99th-percentile DNS answer may take under the load (about 3 ms here; the
#: old scheduling gave 27-46 ms).
P99_BOUND_MS = 15.0

#: A minimal keep-alive HTTP responder (epoll, no parsing beyond the blank line):
#: far faster than the proxy, so the proxy is what saturates.
RESPONDER = r"""
import select, socket
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1024); ls.setblocking(False)
print(ls.getsockname()[1], flush=True)
ep = select.epoll(); ep.register(ls.fileno(), select.EPOLLIN); conns = {}
answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
while True:
    for fd, _ in ep.poll():
        if fd == ls.fileno():
            try:
                s, _ = ls.accept()
            except BlockingIOError:
                continue
            s.setblocking(False)
            conns[s.fileno()] = [s, b""]
            ep.register(s.fileno(), select.EPOLLIN)
            continue
        s, buf = conns[fd]
        try:
            data = s.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            ep.unregister(fd); s.close(); del conns[fd]; continue
        buf += data
        n = buf.count(b"\r\n\r\n")
        conns[fd][1] = buf[buf.rfind(b"\r\n\r\n") + 4:] if n else buf
        if n:
            try:
                s.send(answer * n)
            except OSError:
                pass
"""


def _query(name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[psutil.Process, int, int]]:
    """A server-less agent whose service ``backend`` is the responder: (process,
    proxy port, DNS port)."""
    responder = subprocess.Popen([sys.executable, "-c", RESPONDER], stdout=subprocess.PIPE,
                                 text=True)  # fmt: skip
    procs: list[subprocess.Popen[str]] = [responder]
    try:
        assert responder.stdout is not None
        backend = int(responder.stdout.readline())
        (tmp_path / "services.d").mkdir()
        (tmp_path / "services.d" / "backend.toml").write_text(
            f'name = "backend"\naddress = "127.0.0.1"\nport = {backend}\n'
        )
        # Every listener on port 0; the agent logs where each one is.
        (tmp_path / "agent.toml").write_text(
            f'node_name = "load"\naddress = "127.0.0.1"\naz = "load-1a"\n'
            f'data_dir = "{tmp_path / "data"}"\nservices_dir = "{tmp_path / "services.d"}"\n'
            '[api]\nbind = "127.0.0.1:0"\n[dns]\nbind = "127.0.0.1:0"\nresolv_conf = ""\n'
            '[gossip]\nbind = "127.0.0.1:0"\n[proxy]\nbind = "127.0.0.1:0"\n'
            'drain_timeout = "1s"\n'
        )
        log = tmp_path / "agent.log"
        with log.open("w") as out:
            proc = subprocess.Popen([HOSTMESH, "agent", "-c", str(tmp_path / "agent.toml")],
                                    stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        procs.append(proc)
        deadline = time.monotonic() + 20
        while (started := re.search(r'msg="agent started".* dns=\S+:(\d+) proxy=\S+:(\d+)',
                                    log.read_text())) is None:  # fmt: skip
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the agent did not start:\n{log.read_text()}"
            time.sleep(0.05)
        dns, proxy = int(started.group(1)), int(started.group(2))
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{proxy}/",
                                                 headers={"Host": "backend"})  # fmt: skip
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.read() == b"ok\n":
                        break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the proxy never answered"
            time.sleep(0.1)
        yield psutil.Process(proc.pid), proxy, dns
    finally:
        if responder.stdout is not None:
            responder.stdout.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_dns_answers_within_milliseconds_while_the_proxy_is_saturated(
    agent: tuple[psutil.Process, int, int],
) -> None:
    proc, proxy, dns = agent
    wrk = subprocess.Popen([WRK, "-t1", "-c256", f"-d{WRK_SECONDS}s", "-H", "Host: backend",
                            f"http://127.0.0.1:{proxy}/"], stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    try:
        time.sleep(1.0)  # wrk's connections are open and busy
        cpu_before = sum(proc.cpu_times()[:2])
        started = time.monotonic()
        latencies: list[float] = []
        query = _query("backend.svc.mesh")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(2.0)
            for _ in range(QUERIES):
                t0 = time.perf_counter()
                client.sendto(query, ("127.0.0.1", dns))
                reply = client.recv(512)
                latencies.append((time.perf_counter() - t0) * 1000)
                assert reply[:2] == query[:2] and reply[3] & 0x0F == 0  # NOERROR
                assert socket.inet_aton("127.0.0.1") in reply  # the instance's address
                time.sleep(QUERY_GAP)
        busy = (sum(proc.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started)
        out, _ = wrk.communicate(timeout=WRK_SECONDS + 20)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    summary = f"DNS p50 {p50:.2f} ms, p99 {p99:.2f} ms; agent CPU {busy:.2f} cores\n{out}"
    print(summary)
    # The condition under test happened: the agent was busy for the whole probe.
    assert busy > 0.7, summary
    assert "Requests/sec" in out and "Non-2xx" not in out, summary
    assert p99 < P99_BOUND_MS, summary

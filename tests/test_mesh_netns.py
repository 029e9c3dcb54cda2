"""The mesh across real hosts: a server and three agents in network namespaces on a
bridge, callers in two AZs, requests between hosts over the agents' mutual TLS hop.

Hosts h1 and h2 are in eu-west-1a, h3 in eu-west-1b; the server has a namespace of
its own. ``udvr`` v1 runs on h2 and v2 on h3 behind a 3:1 split; ``zsvc`` (no
routes) has five instances on h2 and two on h3; on h1, ``web`` runs as ``nobody`` and
``batch`` as ``daemon``. The test checks what a user sees: zone-aware balancing and
the split (binomial bounds), intentions per Unix user, and that what crosses the
wire between hosts is TLS (a plaintext request to an inbound port gets no HTTP
answer; a capture of h2's link holds TLS records and no HTTP line, while a
plaintext control request on the same link is seen in the same capture).

Needs root, iproute2, tcpdump, curl and setpriv, all present where scripts/test.sh runs.
"""

from __future__ import annotations

import math
import os
import re
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mesh_env import Mesh, mesh, service_toml, wait_until

pytestmark = [pytest.mark.sockets, pytest.mark.slow]

PREFIX = f"hmm{os.getpid() % 1000}"
HOSTS = {"h1": ("10.99.0.1", "eu-west-1a"), "h2": ("10.99.0.2", "eu-west-1a"),
         "h3": ("10.99.0.3", "eu-west-1b")}  # fmt: skip
SERVER_ADDRESS = "10.99.0.100"
BACKEND_PORT = 8080  # udvr's instances (and the plaintext control request's target)
ZSVC_PORTS = {"h2": [8101, 8102, 8103, 8104, 8105], "h3": [8101, 8102]}
INBOUND_PORT = 4141  # the agents' default [inbound] port
REQUESTS = 300  # per caller and check
#: Standard deviations around a binomial mean that a count may stray: a false
#: failure once in ~150,000 checks.
Z = 4.5
#: s a change made on the server may take to reach every agent ("about a second").
SYNC_BOUND = 5.0

HTTP_LINE = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH) /\S* HTTP/1\.[01]\r\n|"
                       rb"HTTP/1\.[01] \d{3} ")  # fmt: skip


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def ns(name: str) -> str:
    return f"{PREFIX}{name}"


def in_ns(name: str) -> list[str]:
    return ["ip", "netns", "exec", ns(name)]


def veth(name: str) -> str:
    """The host's end of its link to the switch (inside the host's namespace)."""
    return f"{PREFIX}a{name}"


@pytest.fixture
def network() -> Iterator[None]:
    """A switch namespace with a bridge; each host and the server a namespace on it."""
    switch = ns("sw")
    made: list[str] = []
    try:
        sh("ip", "netns", "add", switch)
        made.append(switch)
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        hosts = {**{h: addr for h, (addr, _) in HOSTS.items()}, "srv": SERVER_ADDRESS}
        for name, address in hosts.items():
            sh("ip", "netns", "add", ns(name))
            made.append(ns(name))
            inner, outer = veth(name), f"{PREFIX}b{name}"
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            sh("ip", "link", "set", inner, "netns", ns(name))
            sh("ip", "link", "set", outer, "netns", switch)
            sh("ip", "-n", switch, "link", "set", outer, "master", "br0", "up")
            sh("ip", "-n", ns(name), "addr", "add", f"{address}/24", "dev", inner)
            sh("ip", "-n", ns(name), "link", "set", inner, "up")
            sh("ip", "-n", ns(name), "link", "set", "lo", "up")
        yield
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture
def capture(network: None, tmp_path: Path) -> Iterator[Path]:
    """tcpdump on h2's link, from before any agent starts (every connection is seen
    from its SYN) until the test ends; yields the pcap file."""
    pcap = tmp_path / "h2.pcap"
    # --immediate-mode: each packet reaches tcpdump at once (not in 1 s blocks), and
    # -U writes it to the file at once: the test reads the file while it grows.
    proc = subprocess.Popen([*in_ns("h2"), "tcpdump", "-i", veth("h2"), "--immediate-mode", "-U",
                             "-s", "0", "-n", "-w", str(pcap), "tcp"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()  # "listening on ...": capturing from here
        assert "listening on" in line, line
        yield pcap
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
def running(capture: Path, tmp_path: Path) -> Iterator[Mesh]:
    with mesh(tmp_path) as m:
        server = m.server(f"{SERVER_ADDRESS}:4150", prefix=in_ns("srv"))
        # Config the agents get with their first snapshot: the split, two intentions.
        server.cli_ok("split", "udvr", "v1=3", "v2=1")
        server.cli_ok("intention", "allow", "web", "udvr")
        server.cli_ok("intention", "deny", "batch", "udvr")
        for host, version in (("h2", "v1"), ("h3", "v2")):
            # On every address: the agent dials 127.0.0.1, the control request the host's.
            m.backend(f"udvr-{version}@{host}", "0.0.0.0", [BACKEND_PORT], prefix=in_ns(host))
            m.backend(f"zsvc@{host}", "0.0.0.0", ZSVC_PORTS[host], prefix=in_ns(host))
        services = {
            "h1": {"web": service_toml("web", 9001, user="nobody"),
                   "batch": service_toml("batch", 9002, user="daemon")},
            "h2": {"udvr": service_toml("udvr", BACKEND_PORT, meta={"version": "v1"})},
            "h3": {"udvr": service_toml("udvr", BACKEND_PORT, meta={"version": "v2"})},
        }  # fmt: skip
        for host, ports in ZSVC_PORTS.items():
            for i, port in enumerate(ports):
                services[host][f"zsvc{i}"] = service_toml("zsvc", port, id=f"zsvc-{i}")
        for host, (address, az) in HOSTS.items():
            seeds = [f"{HOSTS['h1'][0]}:7946"] if host != "h1" else []
            m.agent(host, address, az, services=services[host], prefix=in_ns(host),
                    seeds=seeds, wait=False)  # fmt: skip
        for agent in m.agents.values():
            m.wait_agent(agent)
        m.wait_synced()
        h1, h3 = m.agents["h1"], m.agents["h3"]
        wait_until(lambda: all(a.passing("zsvc") == {"h2": 5, "h3": 2} and
                               a.passing("udvr") == {"h2": 1, "h3": 1} for a in (h1, h3)),
                   10, "h1 and h3 see every instance passing", on_fail=m.logs)  # fmt: skip
        for agent in (h1, h3):
            agent.wait_answering("zsvc")
            agent.wait_answering("udvr")
        yield m


def binomial_bounds(n: int, p: float) -> tuple[float, float]:
    """The range of a Binomial(n, p) count within Z standard deviations of its mean."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - Z * sd, n * p + Z * sd


def by_host(backends: dict[str, int]) -> dict[str, int]:
    """Answers by the host of the answering backend (``name@host[:port]``)."""
    out: dict[str, int] = {}
    for name, count in backends.items():
        host = name.partition("@")[2].partition(":")[0]
        out[host] = out.get(host, 0) + count
    return out


def ok(result: dict[str, object], n: int, logs: str) -> None:
    assert result["statuses"] == {"200": n}, f"{result}\n{logs}"


def test_zones_splits_intentions_and_tls_between_hosts(running: Mesh, capture: Path) -> None:
    started = time.monotonic()
    m = running
    h1, h3 = m.agents["h1"], m.agents["h3"]

    # Zone-aware balancing (Envoy's rule, DESIGN.md): callers are 2/3 in eu-west-1a,
    # 1/3 in eu-west-1b; zsvc's capacity is 5/7 and 2/7. h1's zone has more than its
    # share: everything stays there. h3's has less: 2/7 / 1/3 = 6/7 stays, the rest
    # spills. Without zone awareness the local shares would be 5/7 and 2/7.
    from_h1, from_h3 = h1.fetch("zsvc", REQUESTS), h3.fetch("zsvc", REQUESTS)
    ok(from_h1, REQUESTS, m.logs())
    ok(from_h3, REQUESTS, m.logs())
    assert by_host(from_h1["backends"]).get("h2", 0) >= 0.98 * REQUESTS, from_h1
    low, high = binomial_bounds(REQUESTS, 6 / 7)
    assert low <= by_host(from_h3["backends"]).get("h3", 0) <= high, (from_h3, low, high)

    # The 3:1 split v1 (h2) : v2 (h3), from both zones (for h3, v1 is across the hop).
    for agent in (h1, h3):
        got = agent.fetch("udvr", REQUESTS)
        ok(got, REQUESTS, m.logs())
        low, high = binomial_bounds(REQUESTS, 3 / 4)
        assert low <= got["backends"].get("udvr-v1@h2", 0) <= high, (agent.name, got, low, high)
        assert got["backends"].get("udvr-v2@h3", 0) == REQUESTS - got["backends"]["udvr-v1@h2"]

    # Intentions by Unix user on one host: nobody is web (allowed), daemon is batch
    # (denied at once, 403 intention-denied), root is host:h1 (the default: allow).
    as_web = h1.fetch("udvr", 20, user="nobody")
    as_batch = h1.fetch("udvr", 20, user="daemon")
    as_host = h1.fetch("udvr", 20)
    ok(as_web, 20, m.logs())
    ok(as_host, 20, m.logs())
    assert as_batch == {"backends": {}, "statuses": {"403": 20},
                        "errors": {"intention-denied": 20}}, f"{as_batch}\n{m.logs()}"  # fmt: skip
    # An allow replaces the deny; it reaches h1's callers within the sync bound.
    assert m.server_proc is not None
    m.server_proc.cli_ok("intention", "allow", "batch", "udvr")
    took = wait_until(lambda: h1.fetch("udvr", 1, user="daemon")["statuses"] == {"200": 1},
                      SYNC_BOUND + 5, "batch is allowed after the allow")  # fmt: skip
    assert took <= SYNC_BOUND

    # The control: one plaintext request across h2's link, straight to a backend.
    control = h1.run("curl", "-sS", "--max-time", "5", f"http://{HOSTS['h2'][0]}:{BACKEND_PORT}/")
    assert control.stdout == "udvr-v1@h2\n", control

    # (b) What crossed h2's link so far: the control's HTTP, and for the mesh TLS only.
    seen: list[dict[StreamKey, bytes]] = [{}]

    def control_seen() -> bool:
        seen[0] = tcp_streams(capture.read_bytes())
        return any(HTTP_LINE.search(v) for k, v in seen[0].items() if BACKEND_PORT in (k[1], k[3]))

    wait_until(control_seen, 5, "the capture holds the plaintext control request",
               on_fail=lambda: f"streams: {sorted(seen[0])}")  # fmt: skip
    streams = seen[0]
    control_streams = {k for k in streams if BACKEND_PORT in (k[1], k[3])}
    mesh_bytes = 0
    hop_streams = 0
    for key, data in streams.items():
        if key in control_streams:
            continue
        assert not HTTP_LINE.search(data), (key, HTTP_LINE.search(data), data[:300])
        if INBOUND_PORT in (key[1], key[3]):
            hop_streams += 1
            mesh_bytes += len(data)
            assert not data or tls_records(data), (key, data[:64].hex())
    # Hundreds of requests crossed into h2: at least some hundred bytes each.
    assert hop_streams >= 2 and mesh_bytes >= 100 * REQUESTS, (hop_streams, mesh_bytes)

    # (a) An inbound port refuses plaintext: no HTTP answer, the connection is closed.
    # (After the capture was read: this request is plaintext on h2's link on purpose.)
    for target in ("h2", "h3"):
        probe = h1.client("probe", HOSTS[target][0], str(INBOUND_PORT))
        reply = bytes.fromhex(probe["reply_hex"])
        assert probe["ended"] in ("closed", "reset") and b"HTTP/" not in reply, (target, probe)
    assert time.monotonic() - started < 60


# --- pcap -----------------------------------------------------------------------------

#: pcap's magic (microsecond timestamps, either byte order) and Ethernet link type.
PCAP_MAGIC = (0xA1B2C3D4, 0xD4C3B2A1)
LINKTYPE_ETHERNET = 1

StreamKey = tuple[str, int, str, int]  # source address, port, destination address, port


def tcp_streams(pcap: bytes) -> dict[StreamKey, bytes]:
    """Each direction of each TCP connection seen from its SYN: the payload in sequence
    order (retransmissions once); a stream stops at the first gap. IPv4 over Ethernet."""
    (magic,) = struct.unpack("<I", pcap[:4])
    assert magic in PCAP_MAGIC, "not a pcap file"
    endian = "<" if magic == PCAP_MAGIC[0] else ">"
    linktype = struct.unpack(endian + "I", pcap[20:24])[0]
    assert linktype == LINKTYPE_ETHERNET, linktype
    initial: dict[StreamKey, int] = {}
    segments: dict[StreamKey, dict[int, bytes]] = {}
    pos = 24
    while pos + 16 <= len(pcap):
        caplen = struct.unpack(endian + "I", pcap[pos + 8 : pos + 12])[0]
        frame = pcap[pos + 16 : pos + 16 + caplen]
        pos += 16 + caplen
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 only
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6:  # TCP
            continue
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        offset = (tcp[12] >> 4) * 4
        flags = tcp[13]
        key = (src, sport, dst, dport)
        if flags & 0x02:  # SYN: the stream starts at seq + 1
            initial[key] = (seq + 1) & 0xFFFFFFFF
            segments[key] = {}
            continue
        payload = tcp[offset:]
        if payload and key in initial:
            segments[key].setdefault((seq - initial[key]) & 0xFFFFFFFF, payload)
    streams = {}
    for key, parts in segments.items():
        data = b""
        for start in sorted(parts):
            if start > len(data):
                break
            data += parts[start][len(data) - start :]
        streams[key] = data
    return streams


def tls_records(data: bytes) -> int:
    """The number of TLS records ``data`` consists of (RFC 8446 section 5.1: type 20-23,
    legacy version 3.1-3.3, length <= 2^14 + 256; the last one may be cut short); 0 if
    it is not a sequence of TLS records from its first byte."""
    count = 0
    pos = 0
    while pos + 5 <= len(data):
        kind, major, minor, length = (
            data[pos],
            data[pos + 1],
            data[pos + 2],
            data[pos + 3 : pos + 5],
        )
        size = struct.unpack("!H", length)[0]
        if kind not in (20, 21, 22, 23) or major != 3 or minor not in (1, 2, 3) or size > 16640:
            return 0
        count += 1
        pos += 5 + size
    return count

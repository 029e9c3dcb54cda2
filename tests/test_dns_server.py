"""The DNS server on real sockets, queried with real dig; dnsmasq as the recursor."""

from __future__ import annotations

import functools
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from conftest import agent_config, running_agent, trio_test
from dnslib import DNSRecord

from hostmesh.agent import Agent
from hostmesh.catalog import Node, NodeRecord, ServiceInstance

pytestmark = pytest.mark.sockets


def add_node(agent: Agent, name: str, address: str, az: str,
             services: list[tuple[str, int, tuple[str, ...]]]) -> None:  # fmt: skip
    """Put another node's record in the agent's catalog, as gossip would."""
    agent.catalog.merge(
        NodeRecord(
            Node(name, address, az=az, region="eu-west-1", meta={"rack": "r1"}),
            generation=1,
            version=1,
            services=tuple(
                ServiceInstance(f"{svc}-{name}", svc, "", port, tags)
                for svc, port, tags in services
            ),
        )
    )
    agent.notify()


async def dig(port: int, *args: str) -> str:
    done = await trio.run_process(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1", *args],
        capture_stdout=True,
        check=False,
    )
    return done.stdout.decode()


def short(out: str) -> list[str]:
    return sorted(line for line in out.split("\n") if line)


@asynccontextmanager
async def mesh(tmp_path: Path, **dns: object) -> AsyncIterator[tuple[Agent, int]]:
    cfg = agent_config(tmp_path, az="eu-west-1a")
    cfg = replace(cfg, dns=replace(cfg.dns, **dns))  # type: ignore[arg-type]
    async with running_agent(cfg) as (agent, addrs):
        add_node(agent, "a1", "10.1.0.1", "eu-west-1a", [("udvr", 8080, ("v1",))])
        add_node(agent, "a2", "10.1.0.2", "eu-west-1a", [("udvr", 8080, ("v2",))])
        add_node(agent, "b1", "10.2.0.1", "eu-west-1b", [("udvr", 8081, ("v2",)),
                                                          ("db", 5432, ())])  # fmt: skip
        yield agent, addrs.dns[1]


@trio_test(timeout=60)
async def test_every_name_form_with_dig(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (_agent, port):
        # Same-AZ preference: the agent is in eu-west-1a.
        assert short(await dig(port, "udvr.svc.mesh", "+short")) == ["10.1.0.1", "10.1.0.2"]
        assert short(await dig(port, "UDVR.Svc.Mesh", "+short")) == ["10.1.0.1", "10.1.0.2"]
        # db only runs in eu-west-1b: all healthy instances.
        assert short(await dig(port, "db.svc.mesh", "+short")) == ["10.2.0.1"]
        # Filters: AZ, tag, both.
        assert short(await dig(port, "eu-west-1b.udvr.svc.mesh", "+short")) == ["10.2.0.1"]
        assert short(await dig(port, "v2.udvr.svc.mesh", "+short")) == ["10.1.0.2"]
        assert short(await dig(port, "v2.eu-west-1b.udvr.svc.mesh", "+short")) == ["10.2.0.1"]
        # SRV with the addresses in the additional section.
        out = await dig(port, "_udvr._tcp.svc.mesh", "SRV")
        assert "1 1 8080 a1.node.mesh." in out and "1 1 8080 a2.node.mesh." in out
        assert "ADDITIONAL SECTION" in out and "a1.node.mesh.\t\t0\tIN\tA\t10.1.0.1" in out
        out = await dig(port, "_udvr._v2.svc.mesh", "SRV", "+short")
        assert short(out) == ["1 1 8080 a2.node.mesh."]
        # Nodes: address and meta as TXT.
        assert short(await dig(port, "b1.node.mesh", "+short")) == ["10.2.0.1"]
        assert short(await dig(port, "b1.node.mesh", "TXT", "+short")) == ['"rack=r1"']
        # Apex SOA and NS.
        assert "ns.mesh. hostmaster.mesh." in await dig(port, "mesh", "SOA", "+short")
        assert short(await dig(port, "mesh", "NS", "+short")) == ["ns.mesh."]
        # NXDOMAIN and NODATA, both with the SOA in authority.
        out = await dig(port, "nope.svc.mesh")
        assert "status: NXDOMAIN" in out and "AUTHORITY: 1" in out
        out = await dig(port, "v9.udvr.svc.mesh")
        assert "status: NXDOMAIN" in out
        out = await dig(port, "udvr.svc.mesh", "AAAA")
        assert "status: NOERROR" in out and "ANSWER: 0" in out and "AUTHORITY: 1" in out
        out = await dig(port, "what.ever.mesh")
        assert "status: NXDOMAIN" in out
        # Outside the domain with no recursor configured: REFUSED.
        assert "status: REFUSED" in await dig(port, "example.test")


@trio_test(timeout=60)
async def test_catalog_changes_show_in_the_next_answer(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (agent, port):
        assert short(await dig(port, "db.svc.mesh", "+short")) == ["10.2.0.1"]
        agent.catalog.set_node_dead("b1", True)
        out = await dig(port, "db.svc.mesh")
        assert "status: NXDOMAIN" in out
        agent.catalog.set_node_dead("b1", False)
        add_node(agent, "a3", "10.1.0.3", "eu-west-1a", [("db", 5432, ())])
        assert short(await dig(port, "db.svc.mesh", "+short")) == ["10.1.0.3"]


@trio_test(timeout=60)
async def test_truncation_and_tcp(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (agent, port):
        for i in range(80):
            add_node(agent, f"w{i}", f"10.9.{i // 200}.{i % 200 + 1}", "eu-west-1a",
                     [("wide", 80, ())])  # fmt: skip
        # Plain UDP without EDNS: 512 bytes, TC set.
        out = await dig(port, "wide.svc.mesh", "+notcp", "+ignore", "+noedns")
        assert " tc" in out.split("flags:")[1].split(";")[0]
        assert "MSG SIZE  rcvd: " in out and int(out.split("MSG SIZE  rcvd: ")[1].split()[0]) <= 512
        # EDNS0 buffer: up to the client's size, capped at udp_max_payload (1232).
        out = await dig(port, "wide.svc.mesh", "+notcp", "+ignore", "+bufsize=1000")
        size = int(out.split("MSG SIZE  rcvd: ")[1].split()[0])
        assert 512 < size <= 1000 and "udp: 1232" in out
        # dig retries a truncated answer over TCP by default and gets all 80.
        assert len(short(await dig(port, "wide.svc.mesh", "+short"))) == 80
        assert len(short(await dig(port, "wide.svc.mesh", "+short", "+tcp"))) == 80


@trio_test(timeout=60)
async def test_several_queries_on_one_tcp_connection(tmp_path: Path) -> None:
    async with mesh(tmp_path) as (_agent, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            names = ["udvr.svc.mesh", "db.svc.mesh", "b1.node.mesh"]
            # Pipelined: all three queries in one write, in byte-at-a-time pieces.
            payload = b""
            for i, name in enumerate(names):
                q = DNSRecord.question(name)
                q.header.id = 1000 + i
                wire = bytes(q.pack())
                payload += struct.pack("!H", len(wire)) + wire
            for byte in payload:
                await stream.send_all(bytes([byte]))
            got = []
            buf = b""
            while len(got) < 3:
                buf += await stream.receive_some(65536)
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = struct.unpack("!H", buf[:2])[0]
                    got.append(DNSRecord.parse(buf[2 : 2 + n]))
                    buf = buf[2 + n :]
        assert [r.header.id for r in got] == [1000, 1001, 1002]
        assert [str(r.q.qname) for r in got] == [n + "." for n in names]
        assert all(r.rr for r in got)


@pytest.fixture
def dnsmasq_path() -> str:
    path = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    assert Path(path).exists(), "dnsmasq is installed by scripts/test.sh"
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def dnsmasq(binary: str) -> AsyncIterator[int]:
    """A real dnsmasq on loopback answering example.test, never recursing further."""
    port = free_udp_port()
    async with trio.open_nursery() as nursery:
        argv = [
            binary, "-k", "--no-resolv", "--no-hosts", "--no-poll", "--pid-file=",
            "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}",
            "--address=/example.test/192.0.2.10", "--user=root", "--log-facility=-",
        ]  # fmt: skip
        proc = await nursery.start(functools.partial(trio.run_process, argv, check=False))
        # Wait until it answers.
        with trio.fail_after(10):
            while "192.0.2.10" not in await dig(port, "example.test", "+short"):
                await trio.sleep(0.05)
        try:
            yield port
        finally:
            proc.terminate()


@trio_test(timeout=60)
async def test_recursion_through_a_real_resolver(tmp_path: Path, dnsmasq_path: str) -> None:
    async with dnsmasq(dnsmasq_path) as upstream:
        dead = free_udp_port()  # nothing listens: the first recursor times out
        async with mesh(
            tmp_path, recursors=(f"127.0.0.1:{dead}", f"127.0.0.1:{upstream}"),
            recursor_timeout=0.3,
        ) as (agent, port):  # fmt: skip
            out = await dig(port, "example.test")
            assert "status: NOERROR" in out and "192.0.2.10" in out
            assert " ra" in out.split("flags:")[1].split(";")[0]
            assert short(await dig(port, "example.test", "+short", "+tcp")) == ["192.0.2.10"]
            # The mesh domain is still ours, not the recursor's.
            assert short(await dig(port, "db.svc.mesh", "+short")) == ["10.2.0.1"]
            metrics = agent.metrics.render()
            assert 'hostmesh_dns_recursor_seconds_count{result="ok"} 2' in metrics
            assert 'hostmesh_dns_recursor_seconds_count{result="failed"} 2' in metrics
    async with mesh(tmp_path / "2", recursors=(f"127.0.0.1:{free_udp_port()}",),
                    recursor_timeout=0.3) as (_agent, port):  # fmt: skip
        assert "status: SERVFAIL" in await dig(port, "example.test")


async def closed_by_server(port: int, payload: bytes) -> bool:
    """Send ``payload`` and report whether the server closed (EOF or reset) within 5 s."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        with trio.fail_after(5):
            try:
                return await stream.receive_some(10) == b""
            except trio.BrokenResourceError:
                return True


@trio_test(timeout=60)
async def test_hostile_packets_on_real_sockets(tmp_path: Path) -> None:
    async with mesh(tmp_path, tcp_idle_timeout=0.5) as (agent, port):
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp:
            await udp.connect(("127.0.0.1", port))
            response = DNSRecord.question("db.svc.mesh").reply().pack()
            for packet in (b"", b"\x01", bytes(response), b"\x00" * 11, b"\xff" * 2000):
                await udp.send(bytes(packet))
            # A compression loop in the question: FORMERR, not a hang.
            loop = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
            await udp.send(loop)
            reply = DNSRecord.parse(await udp.recv(4096))
            assert reply.header.id == 7 and reply.header.rcode == 1  # FORMERR
        dropped = agent.dns[0].stats.dropped
        assert dropped.get("response") == 1 and dropped.get("short", 0) >= 3
        assert dropped.get("oversized") == 1

        # TCP: a length prefix larger than any query closes the connection.
        assert await closed_by_server(port, b"\xff\xff" + b"x" * 100)
        # A slow client that never finishes is cut off after the idle timeout.
        assert await closed_by_server(port, b"\x00\x20\x00")
        assert dropped.get("tcp_bad_length") == 1 and dropped.get("tcp_timeout") == 1
        # Still serving.
        assert short(await dig(port, "db.svc.mesh", "+short")) == ["10.2.0.1"]
        metrics = agent.metrics.render()
        assert 'hostmesh_dns_dropped_total{reason="response"} 1' in metrics
        assert 'hostmesh_dns_queries_total{qtype="A",rcode="NOERROR"}' in metrics

"""External services: registered through the management API, checked by the leader with the
agent's check runner, seen by a real agent (through the real sync protocol) in its health API
and DNS, and gone when deleted."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import agent_config, running_agent, trio_test
from dnslib import QTYPE, RCODE, DNSRecord
from http_backend import Backend
from sync_env import node_tls, server_verify
from test_sync import FAST_SYNC, counter, running_server, server_config

from hostmesh.catalog import Health
from hostmesh.catalog._codec import decode_record
from hostmesh.server import AsyncSQLiteStore, Server, SyncHub
from hostmesh.server._external import ExternalChecks

pytestmark = pytest.mark.sockets

INTERVAL = 0.2  # s between probes of the checks below


@contextlib.asynccontextmanager
async def serving(backend: Backend) -> AsyncIterator[trio.CancelScope]:
    """Run ``backend`` on a loopback port until the block ends or the scope is cancelled
    (the port is closed then: connections are refused)."""
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run(*, task_status: trio.TaskStatus[int]) -> None:
            with scope:
                await backend.serve(task_status=task_status)

        await nursery.start(run)
        yield scope
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def management(server: Server, address: str) -> AsyncIterator[httpx.AsyncClient]:
    token = server.management_token_file.read_text().strip()
    async with httpx.AsyncClient(
        base_url=f"https://{address}", verify=server_verify(server), timeout=10,
        headers={"Authorization": f"Bearer {token}"},
    ) as http:  # fmt: skip
        yield http


async def dns_a(agent_dns: tuple[str, int], name: str) -> tuple[int, list[str]]:
    """The agent's DNS answer to an A query: (rcode, addresses)."""
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(agent_dns)
        await sock.send(DNSRecord.question(name, "A").pack())
        reply = DNSRecord.parse(await sock.recv(4096))
    return reply.header.rcode, [str(r.rdata) for r in reply.rr if r.rtype == QTYPE.A]


async def health(api: httpx.AsyncClient, service: str) -> dict[str, str]:
    """``/v1/health/service/<service>`` on the agent: instance id -> its check's status."""
    rows = (await api.get(f"/v1/health/service/{service}")).json()
    return {
        row["Service"]["ID"]: next(
            c["Status"] for c in row["Checks"] if c["CheckID"] != "serfHealth"
        )
        for row in rows
    }


async def until(predicate: Any) -> None:
    """Wait (bounded by the test's timeout) until ``await predicate()`` is true."""
    while not await predicate():
        await trio.sleep(0.05)


@trio_test(timeout=40)
async def test_an_external_http_service_is_checked_seen_by_agents_and_removed(
    tmp_path: Path,
) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    backend = Backend("rds")
    async with (
        running_server(server) as address,
        serving(backend) as backend_scope,
        management(server, address) as http,
    ):
        cfg = agent_config(tmp_path / "a", servers=(address,), sync=FAST_SYNC)
        async with running_agent(cfg, sync_tls=await node_tls(server, "node-a")) as (agent, addrs):
            api = httpx.AsyncClient(base_url=addrs.api_url, timeout=10)
            db = {
                "name": "db", "address": "127.0.0.1", "port": backend.port, "az": "eu-west-1b",
                "tags": ["primary"],
                "checks": [{"http": f"http://127.0.0.1:{backend.port}/", "interval": INTERVAL,
                            "failures_before_critical": 3}],
            }  # fmt: skip
            r = await http.put("/v1/catalog/external/rds-1", json=db)
            assert r.status_code == 200, r.text

            # The leader probes it, and the agent sees a passing instance: health API and DNS.
            async def passing() -> bool:
                return await health(api, "db") == {"rds-1": "passing"}

            await until(passing)
            rows = (await api.get("/v1/health/service/db?passing")).json()
            assert [(r["Node"]["Node"], r["Service"]["Port"]) for r in rows] == [
                ("external-rds-1", backend.port)]  # fmt: skip
            assert rows[0]["Node"]["Locality"]["Zone"] == "eu-west-1b"
            assert rows[0]["Checks"][1]["Output"].startswith(
                f"HTTP GET http://127.0.0.1:{backend.port}/: 200"
            )
            assert backend.hits >= 1
            assert await dns_a(addrs.dns, "db.svc.mesh") == (RCODE.NOERROR, ["127.0.0.1"])
            assert await dns_a(addrs.dns, "external-rds-1.node.mesh") == (
                RCODE.NOERROR, ["127.0.0.1"])  # fmt: skip

            # The backend stops: critical once three probes in a row failed, not before.
            backend_scope.cancel()
            stopped = trio.current_time()

            async def critical() -> bool:
                return await health(api, "db") == {"rds-1": "critical"}

            await until(critical)
            assert trio.current_time() - stopped >= 2 * INTERVAL  # three failures, not one
            rows = (await api.get("/v1/health/service/db")).json()
            assert "Connection refused" in rows[0]["Checks"][1]["Output"]
            assert (await api.get("/v1/health/service/db?passing")).json() == []
            assert (await dns_a(addrs.dns, "db.svc.mesh"))[0] == RCODE.NXDOMAIN

            # Deleting it removes it from every agent's catalog (a tombstone, as a leave).
            assert (await http.delete("/v1/catalog/external/rds-1")).status_code == 200

            async def gone() -> bool:
                return (await api.get("/v1/health/service/db")).json() == []

            await until(gone)
            assert (await dns_a(addrs.dns, "db.svc.mesh"))[0] == RCODE.NXDOMAIN
            record = agent.catalog.record("external-rds-1")  # a tombstone, or forgotten
            assert record is None or (record.left and not record.services)
            # The leader wrote a tombstone; its reaper of left nodes then removes the key.
            assert counter(server.metrics, "hostmesh_external_records_total",
                           kind="tombstone") == 1  # fmt: skip
            while await server.store.get("catalog/nodes/external-rds-1") is not None:
                await trio.sleep(0.05)
            await api.aclose()


@trio_test(timeout=30)
async def test_an_external_tcp_service_follows_its_listener(tmp_path: Path) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    async with running_server(server) as address, management(server, address) as http:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, trio.aclose_forcefully, listeners)
            cache = {"name": "cache", "address": "127.0.0.1", "port": port, "az": "eu-west-1a",
                     "checks": [{"tcp": f"127.0.0.1:{port}", "interval": INTERVAL}]}  # fmt: skip
            assert (await http.put("/v1/catalog/external/redis", json=cache)).status_code == 200

            async def status() -> tuple[Health, str] | None:
                entry = await server.store.get("catalog/nodes/external-redis")
                if entry is None:
                    return None
                [check] = decode_record(entry.value).checks
                return check.status, check.output

            while (got := await status()) is None or got[0] is not Health.PASSING:
                await trio.sleep(0.05)
            assert got == (Health.PASSING, f"TCP connect 127.0.0.1:{port}: Success")
            nursery.cancel_scope.cancel()  # the listener closes
        while (got := await status()) is None or got[0] is not Health.CRITICAL:
            await trio.sleep(0.05)
        assert got[1] == f"TCP connect 127.0.0.1:{port}: Connection refused"


@trio_test(timeout=30)
async def test_hostile_external_registrations_are_refused_counted_and_write_nothing(
    tmp_path: Path,
) -> None:
    server = Server(server_config(tmp_path), print_token=False)
    async with running_server(server) as address, management(server, address) as http:
        good = {"name": "db", "address": "10.0.9.10", "port": 5432}
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("db-1", {**good, "address": "10.0.9.10; rm -rf /"}, "invalid address"),
            ("db-1", {**good, "address": ""}, "needs an address"),
            ("db-1", {**good, "checks": [{"grpc": "10.0.9.10:5432"}]}, "grpc"),
            ("db-1", {**good, "checks": [{"args": ["/bin/sh", "-c", "id"]}]}, "script checks"),
            ("db-1", {**good, "checks": [{"ttl": "30s"}]}, "TTL checks"),
            ("db-1", {**good, "checks": [{"http": "file:///etc/shadow"}]}, "invalid URL"),
            ("db-1", {**good, "checks": [{"tcp": "10.0.9.10"}]}, "host:port"),
            ("db_1", good, "node is external-<id>"),  # not a DNS label: no node name
            # EC2's metadata service: its answers (IAM credentials) would go to every agent
            (
                "db-1",
                {**good, "checks": [{"http": "http://169.254.169.254/latest/meta-data/"}]},
                "link-local",
            ),
            ("db-1", {**good, "checks": [{"tcp": "[fd00:ec2::254]:80"}]}, "link-local"),
            ("db-1", {**good, "address": "169.254.169.254"}, "link-local"),
            ("db-1", {**good, "az": 7}, "az must be a string"),
        ]
        before = await server.store.current_revision()
        for ident, body, words in cases:
            r = await http.put(f"/v1/catalog/external/{ident}", json=body)
            assert r.status_code == 400 and words in r.text, (body, r.status_code, r.text)
        r = await http.put("/v1/catalog/external/db-1", content=b"{not json")
        assert r.status_code == 400
        assert await server.store.current_revision() == before  # nothing written
        assert (await http.get("/v1/catalog/external")).json() == []
        metrics = (await http.get("/metrics")).text
        refused = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('hostmesh_server_bad_requests_total{endpoint="external"')
        )
        assert refused == len(cases) + 1


@trio_test(timeout=30)
async def test_a_lost_leadership_stops_the_checks_and_a_new_leader_continues_without_flapping(
    tmp_path: Path,
) -> None:
    # The duty driven directly, as LeaderElection.run_while_leader runs it: started when a
    # server becomes the leader, cancelled when it stops being one.
    store = AsyncSQLiteStore(tmp_path / "store.db")
    hub = SyncHub(store)
    backend = Backend("svc")
    key = "catalog/nodes/external-svc"

    async def record() -> Any:
        entry = await store.get(key)
        return decode_record(entry.value) if entry is not None else None

    try:
        async with serving(backend) as backend_scope, trio.open_nursery() as nursery:
            body = {
                "name": "svc",
                "id": "svc",
                "address": "127.0.0.1",
                "port": backend.port,
                "checks": [{"http": f"http://127.0.0.1:{backend.port}/", "interval": INTERVAL}],
            }
            await store.put("catalog/external/svc", json.dumps(body).encode())  # fmt: skip
            leadership = trio.CancelScope()

            async def lead() -> None:
                with leadership:
                    await ExternalChecks(store, hub.merge_record).run()

            nursery.start_soon(lead)
            while (rec := await record()) is None or rec.checks[0].status is not Health.PASSING:
                await trio.sleep(0.05)
            assert rec.node.meta["external-node"] == "true" and rec.node.address == "127.0.0.1"
            # Leadership lost: the checks stop at once; a dead backend goes unnoticed ...
            leadership.cancel()
            hits = backend.hits
            await trio.sleep(3 * INTERVAL)
            assert backend.hits == hits
            # ... until another server leads. It starts from the stored status (passing:
            # no flap to critical) and continues the record's version.
            passing_version = (await record()).version
            nursery.start_soon(ExternalChecks(store, hub.merge_record).run)
            while backend.hits == hits:
                await trio.sleep(0.02)
            rec = await record()
            assert rec.checks[0].status is Health.PASSING and rec.version == passing_version
            backend_scope.cancel()
            while (rec := await record()).checks[0].status is not Health.CRITICAL:
                await trio.sleep(0.05)
            assert rec.version == passing_version + 1 and rec.generation > 1
            nursery.cancel_scope.cancel()
        # Deleted while no leader runs: the next leader finds the record and tombstones it.
        await store.delete("catalog/external/svc")
        async with trio.open_nursery() as nursery:
            await nursery.start(ExternalChecks(store, hub.merge_record).run)
            rec = await record()
            assert rec is not None and rec.left and not rec.services
            assert rec.version == passing_version + 2
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()

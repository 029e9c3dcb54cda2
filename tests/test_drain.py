"""Graceful stop and reload of a real agent process under traffic.

A stopping agent (SIGTERM) stops accepting, lets every request already sent
to it finish, closes idle keep-alive connections, then leaves and exits; a
SIGHUP reload re-reads services.d without touching live connections. Traffic
is 8 keep-alive httpx clients looping through the agent's proxy to a real
backend on loopback that takes 200 ms per request, so requests are always
in flight when the signal lands.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from conftest import trio_test
from http_backend import Backend
from test_cli import read_until

pytestmark = [pytest.mark.sockets, pytest.mark.slow]

HOSTMESH = str(Path(sys.executable).with_name("hostmesh"))
CLIENTS = 8
DRAIN_TIMEOUT = 10.0  # s; a drain that waits for it instead of the requests fails the test


def _write_agent(tmp: Path, backend_port: int) -> None:
    (tmp / "services.d").mkdir()
    (tmp / "services.d" / "slow.toml").write_text(
        f'name = "slow"\naddress = "127.0.0.1"\nport = {backend_port}\n'
    )
    (tmp / "agent.toml").write_text(
        f'node_name = "drainer"\naz = "az-1"\ndata_dir = "{tmp / "data"}"\n'
        f'services_dir = "{tmp / "services.d"}"\n[api]\nbind = "127.0.0.1:0"\n'
        '[dns]\nbind = "127.0.0.1:0"\nresolv_conf = ""\n[gossip]\nbind = "127.0.0.1:0"\n'
        f'[proxy]\nbind = "127.0.0.1:0"\ndrain_timeout = "{DRAIN_TIMEOUT:g}s"\n'
    )


def _start(tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    proc = subprocess.Popen(
        [HOSTMESH, "agent", "-c", str(tmp / "agent.toml"), "--log-format", "json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, bufsize=0, cwd=tmp,
    )  # fmt: skip
    match, _ = read_until(proc, "stderr", r'"msg": ?"agent started".*')
    started = json.loads(match.string)
    return proc, started["api"], started["proxy"]


class Traffic:
    """Clients looping on keep-alive connections; every outcome is counted."""

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self.outcomes: Counter[str] = Counter()
        self.stopping = False  # set before the signal: a refused connect is then expected

    async def client(self, path: str) -> None:
        async with httpx.AsyncClient(base_url=f"http://{self.proxy}", timeout=10) as c:
            while True:
                try:
                    r = await c.get(path, headers={"Host": "slow"})
                except httpx.ConnectError:
                    # The agent no longer accepts (or is gone): the request was never sent.
                    self.outcomes["refused" if self.stopping else "refused-early"] += 1
                    return
                except httpx.HTTPError as exc:  # sent, and lost: what a drain must prevent
                    self.outcomes[f"failed: {type(exc).__name__}"] += 1
                    return
                self.outcomes[str(r.status_code)] += 1
                if r.headers.get("connection") == "close":
                    self.outcomes["told to close"] += 1


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    api: str
    traffic: Traffic
    backend: Backend
    log: str = ""  # the agent's stderr, once it has exited


@contextlib.asynccontextmanager
async def agent_under_traffic(tmp: Path, path: str) -> AsyncIterator[Run]:
    """A real agent process, CLIENTS looping through it to a real backend on ``path``.

    The block signals the agent; leaving it waits for the clients to end
    (every one ends when its connect is refused) and for the agent to exit.
    """
    backend = Backend("slow-1")
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        _write_agent(tmp, backend.port)
        proc, api, proxy = _start(tmp)
        run = Run(proc, api, Traffic(proxy), backend)
        try:
            async with trio.open_nursery() as clients:
                for _ in range(CLIENTS):
                    clients.start_soon(run.traffic.client, path)
                yield run
            await trio.to_thread.run_sync(proc.wait, 15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                run.log = proc.stderr.read().decode()
                proc.stderr.close()
        nursery.cancel_scope.cancel()


async def until_answered(traffic: Traffic, n: int) -> None:
    while traffic.outcomes["200"] < n:
        await trio.sleep(0.05)


def failures(traffic: Traffic) -> dict[str, int]:
    """Requests that reached the agent and were lost, or refused before any signal."""
    return {k: n for k, n in traffic.outcomes.items() if k.startswith(("failed", "refused-e"))}


@trio_test(60)
async def test_sigterm_finishes_requests_in_flight_then_exits(tmp_path: Path) -> None:
    async with agent_under_traffic(tmp_path, "/sleep/0.2") as run:
        await until_answered(run.traffic, 4 * CLIENTS)
        hits_at_signal = run.backend.hits
        run.traffic.stopping = True
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
    took = time.monotonic() - t0
    traffic = run.traffic
    assert run.proc.returncode == 0, run.log
    assert failures(traffic) == {}, (traffic.outcomes, run.log)
    # Every client had a request in flight at the signal: each got its answer,
    # told to close, and then found the listener closed.
    assert traffic.outcomes["told to close"] == CLIENTS
    assert traffic.outcomes["refused"] == CLIENTS
    assert run.backend.hits >= hits_at_signal
    assert took < DRAIN_TIMEOUT / 2, "the drain waited for its timeout, not for the requests"
    assert '"drained"' in run.log and '"left the cluster"' in run.log


@trio_test(60)
async def test_sighup_reload_under_traffic_fails_no_request(tmp_path: Path) -> None:
    async with agent_under_traffic(tmp_path, "/sleep/0.05") as run:
        await until_answered(run.traffic, 2 * CLIENTS)
        # A new service in services.d, and a route for "slow" in agent.toml.
        (tmp_path / "services.d" / "web.toml").write_text('name = "web"\nport = 8080\n')
        agent_toml = tmp_path / "agent.toml"
        agent_toml.write_text(
            agent_toml.read_text() + '[[traffic.slow.routes]]\nname = "reloaded"\n'
        )
        os.kill(run.proc.pid, signal.SIGHUP)
        async with httpx.AsyncClient(base_url=f"http://{run.api}") as c:
            while "web" not in (await c.get("/v1/catalog/services")).json():
                await trio.sleep(0.05)
            await until_answered(run.traffic, run.traffic.outcomes["200"] + 2 * CLIENTS)
            metrics = (await c.get("/metrics")).text
        assert 'hostmesh_proxy_requests_total{service="slow",route="reloaded"}' in metrics
        # A broken file changes nothing: the agent keeps its config and its clients.
        broken = agent_toml.read_text().replace('[proxy]\nbind = "127.0.0.1:0"',
                                                '[proxy]\nbind = "nowhere"')  # fmt: skip
        assert "nowhere" in broken
        agent_toml.write_text(broken)
        os.kill(run.proc.pid, signal.SIGHUP)
        await until_answered(run.traffic, run.traffic.outcomes["200"] + 2 * CLIENTS)
        run.traffic.stopping = True
        run.proc.send_signal(signal.SIGTERM)
    assert failures(run.traffic) == {}, run.traffic.outcomes
    assert "agent.toml not reloaded" in run.log and "nowhere" in run.log
    # The reload kept every keep-alive connection: no client was told to close
    # before the final SIGTERM.
    assert run.traffic.outcomes["told to close"] <= CLIENTS

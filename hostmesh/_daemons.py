"""Run the daemons: ``hostmesh agent``, ``hostmesh server`` and ``hostmesh dev``.

Each runs until SIGINT or SIGTERM, then cancels its nursery so every listener
and task closes in order.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import trio
from rich.console import Console

from ._config import AgentConfig, ApiConfig, DnsConfig, GossipConfig, ServerConfig
from ._log import get_logger

__all__ = ["run_agent", "run_dev", "run_server", "wait_for_stop_signal"]

log = get_logger("hostmesh")

#: Seconds a stopping agent spends telling the cluster it leaves.
LEAVE_TIMEOUT = 2.0


async def wait_for_stop_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            return


async def run_agent(config: AgentConfig) -> None:
    from hostmesh.agent import Agent

    agent = Agent(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_for_stop_signal()
        with trio.move_on_after(LEAVE_TIMEOUT):
            await agent.leave()
        nursery.cancel_scope.cancel()


async def run_server(config: ServerConfig) -> None:
    from hostmesh.server import Server

    server = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await wait_for_stop_signal()
        nursery.cancel_scope.cancel()


async def run_dev(
    *,
    api_bind: str = "127.0.0.1:4191",
    server_bind: str = "127.0.0.1:4150",
    dns_bind: str = "127.0.0.1:8600",
    gossip_bind: str = "127.0.0.1:7946",
    out: Console | None = None,
) -> None:
    """A server on a temporary store and one agent (AZ dev-1a), until Ctrl-C."""
    from hostmesh.agent import Agent
    from hostmesh.server import Server

    out = out or Console()
    with tempfile.TemporaryDirectory(prefix="hostmesh-dev-") as tmp:
        server = Server(ServerConfig(bind=server_bind, data_dir=str(Path(tmp) / "server")))
        cfg = AgentConfig.dev(data_dir=str(Path(tmp) / "agent"))
        cfg = replace(cfg, node_name=socket.gethostname().split(".")[0] or "dev",
                      api=ApiConfig(bind=api_bind), dns=DnsConfig(bind=dns_bind),
                      gossip=GossipConfig(bind=gossip_bind),
                      servers=(server_bind,))  # fmt: skip
        agent = Agent(cfg)
        async with trio.open_nursery() as nursery:
            server_addr = await nursery.start(server.run)
            addrs = await nursery.start(agent.run)
            api = f"{addrs.api[0]}:{addrs.api[1]}"
            dns = addrs.dns
            agent_flag = "" if api == "127.0.0.1:4191" else f" --agent {api}"
            # The suggested commands must work as printed, venv activated or not.
            cli = (
                "hostmesh"
                if shutil.which("hostmesh")
                else str(Path(sys.executable).with_name("hostmesh"))
            )
            out.print(
                f"[bold]hostmesh dev[/]: a server and an agent in one process\n"
                f"  node        {cfg.node_name} (AZ {cfg.az}, region {cfg.region})\n"
                f"  agent API   http://{api}  (Consul-compatible; /metrics, /ready)\n"
                f"  DNS         {dns[0]}:{dns[1]} UDP and TCP  (domain {cfg.dns.domain})\n"
                f"  server API  http://{server_addr[0]}:{server_addr[1]}  (KV: /v1/kv/)\n"
                f"  data        {tmp}  (removed on exit)\n"
                "  the proxy on :4140 is not part of this build yet\n"
                "\nTry:\n"
                f"  curl -X PUT http://{api}/v1/agent/service/register "
                """-d '{"Name": "web", "Port": 8080, "Check": {"TTL": "30s"}}'\n"""
                f"  {cli} check pass service:web{agent_flag}\n"
                f"  {cli} services{agent_flag}\n"
                f"  dig @{dns[0]} -p {dns[1]} web.svc.{cfg.dns.domain} +short\n"
                "\nCtrl-C stops.",
                highlight=False,
                soft_wrap=True,
            )
            await wait_for_stop_signal()
            nursery.cancel_scope.cancel()

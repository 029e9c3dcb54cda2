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
from typing import TYPE_CHECKING

import trio
from rich.console import Console

if TYPE_CHECKING:
    from hostmesh.agent import AgentAddresses

from ._config import (
    AgentConfig,
    ApiConfig,
    DnsConfig,
    GossipConfig,
    ProxyConfig,
    ServerConfig,
    parse_hostport,
)
from ._errors import ConfigError
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
    proxy_bind: str = "127.0.0.1:4140",
    nodes: int = 1,
    azs: int = 1,
    out: Console | None = None,
) -> None:
    """A server on a temporary store and ``nodes`` agents in ``azs`` AZs, until Ctrl-C.

    With one node it listens where the binds say. With several, agent i runs on
    127.0.0.i with the default ports (or the binds' ports) and joins agent 1
    over gossip, so a newcomer sees a multi-AZ mesh on one machine.
    """
    from hostmesh.agent import Agent
    from hostmesh.server import Server

    out = out or Console()
    if not 1 <= nodes <= 254 or not 1 <= azs <= 26:
        raise ConfigError("hostmesh dev", "--nodes/--azs", "use 1..254 nodes in 1..26 AZs")
    with tempfile.TemporaryDirectory(prefix="hostmesh-dev-") as tmp:
        server = Server(ServerConfig(bind=server_bind, data_dir=str(Path(tmp) / "server")))
        name = socket.gethostname().split(".")[0] or "dev"
        configs: list[AgentConfig] = []
        started: list[AgentAddresses] = []
        async with trio.open_nursery() as nursery:
            server_addr = await nursery.start(server.run)
            for i in range(1, nodes + 1):
                host = "127.0.0.1" if nodes == 1 else f"127.0.0.{i}"

                def on(bind: str, host: str = host) -> str:
                    return bind if nodes == 1 else f"{host}:{parse_hostport(bind)[1]}"

                # Agents 2..N join agent 1 at the address it bound (port 0 works too).
                seeds = (started[0].gossip,) if started else ()
                cfg = replace(
                    AgentConfig.dev(data_dir=str(Path(tmp) / f"agent{i}")),
                    node_name=name if nodes == 1 else f"{name}-{i}", address=host,
                    az=f"dev-1{chr(ord('a') + (i - 1) % azs)}",
                    api=ApiConfig(bind=on(api_bind)), dns=DnsConfig(bind=on(dns_bind)),
                    proxy=ProxyConfig(bind=on(proxy_bind)),
                    gossip=GossipConfig.for_profile("local", bind=on(gossip_bind), seeds=seeds),
                    servers=(server_bind,),
                )  # fmt: skip
                configs.append(cfg)
                started.append(await nursery.start(Agent(cfg).run))
            _print_dev(out, configs, started, server_addr, tmp)
            await wait_for_stop_signal()
            nursery.cancel_scope.cancel()


def _print_dev(
    out: Console,
    configs: list[AgentConfig],
    started: list[AgentAddresses],
    server_addr: tuple[str, int],
    tmp: str,
) -> None:
    cfg, addrs = configs[0], started[0]
    api = f"{addrs.api[0]}:{addrs.api[1]}"
    dns = addrs.dns
    proxy = f"{addrs.proxy[0]}:{addrs.proxy[1]}"
    agent_flag = "" if api == "127.0.0.1:4191" else f" --agent {api}"
    # The suggested commands must work as printed, venv activated or not.
    cli = (
        "hostmesh" if shutil.which("hostmesh") else str(Path(sys.executable).with_name("hostmesh"))
    )
    if len(configs) == 1:
        where = (
            f"  node        {cfg.node_name} (AZ {cfg.az}, region {cfg.region})\n"
            f"  agent API   http://{api}  (Consul-compatible; /metrics, /ready)\n"
            f"  DNS         {dns[0]}:{dns[1]} UDP and TCP  (domain {cfg.dns.domain})\n"
            f"  proxy       http://{proxy}  (Host: <service> or http_proxy)\n"
        )
    else:
        where = "".join(
            f"  {c.node_name:<14} AZ {c.az}  API http://{a.api[0]}:{a.api[1]}  "
            f"DNS {a.dns[0]}:{a.dns[1]}  proxy {a.proxy[0]}:{a.proxy[1]}  gossip {a.gossip}\n"
            for c, a in zip(configs, started, strict=True)
        )
    out.print(
        f"[bold]hostmesh dev[/]: a server and {len(configs)} agent(s) in one process\n"
        + where
        + f"  server API  http://{server_addr[0]}:{server_addr[1]}  (KV: /v1/kv/)\n"
        f"  data        {tmp}  (removed on exit)\n"
        "\nTry:\n"
        f"  curl -X PUT http://{api}/v1/agent/service/register "
        """-d '{"Name": "web", "Port": 8080, "Check": {"TTL": "30s"}}'\n"""
        f"  {cli} check pass service:web{agent_flag}\n"
        f"  {cli} services{agent_flag}\n"
        f"  dig @{dns[0]} -p {dns[1]} web.svc.{cfg.dns.domain} +short\n"
        f"  curl -si -H 'Host: web' http://{proxy}/\n"
        + (f"  {cli} members{agent_flag}\n" if len(configs) > 1 else "")
        + "\nCtrl-C stops.",
        highlight=False,
        soft_wrap=True,
    )

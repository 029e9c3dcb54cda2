"""Run the daemons: ``hostmesh agent``, ``hostmesh server`` and ``hostmesh dev``.

Each runs until SIGINT or SIGTERM, then cancels its nursery so every listener
and task closes in order.
"""

from __future__ import annotations

import gc
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from rich.console import Console

    from hostmesh.agent import AgentAddresses
    from hostmesh.server import Server

from ._config import (
    AgentConfig,
    AgentServerConfig,
    ApiConfig,
    DnsConfig,
    GossipConfig,
    ProxyConfig,
    ServerConfig,
    parse_hostport,
)
from ._errors import ConfigError
from ._imds import resolve_placement
from ._log import get_logger
from ._pki import spki_pin
from ._systemd import notifier

__all__ = ["run_agent", "run_dev", "run_server", "stop_signals", "wait_for_stop_signal"]

log = get_logger("hostmesh")

#: Seconds a stopping agent spends telling the cluster it leaves.
LEAVE_TIMEOUT = 2.0


def stop_signals() -> AbstractContextManager[AsyncIterator[int]]:
    """Catch SIGINT and SIGTERM from here on (open it before starting anything: a
    SIGTERM that lands during start-up is then a clean stop, not a kill)."""
    return trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)


async def wait_for_stop_signal(signals: AsyncIterator[int]) -> None:
    """Return on the first SIGINT or SIGTERM caught by ``signals`` (:func:`stop_signals`)."""
    async for signum in signals:
        log.info("stopping", signal=signal.Signals(signum).name)
        notifier().stopping(f"stopping ({signal.Signals(signum).name})")
        return


async def run_agent(
    config: AgentConfig, load_config: Callable[[], AgentConfig] | None = None
) -> None:
    """Run an agent until SIGINT/SIGTERM; ``load_config`` re-reads its file on SIGHUP."""
    from hostmesh.agent import Agent

    config = await resolve_placement(config)  # az/region "auto": EC2 IMDSv2
    agent = Agent(config, load_config=load_config)
    with stop_signals() as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            # Everything made while starting (modules, config, catalog) lives as long
            # as the process: keep it out of the collector's full passes, which
            # otherwise walk it all and stall the proxy for milliseconds.
            gc.freeze()
            await wait_for_stop_signal(signals)
            await agent.drain()  # stop accepting, finish requests in flight
            with trio.move_on_after(LEAVE_TIMEOUT):
                await agent.leave()
            nursery.cancel_scope.cancel()


async def run_server(config: ServerConfig) -> None:
    from hostmesh.server import Server

    server = Server(config)
    with stop_signals() as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(_server_sighup, server)
            await nursery.start(server.run)
            await wait_for_stop_signal(signals)
            nursery.cancel_scope.cancel()


async def _server_sighup(
    server: Server, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """``systemctl reload`` sends SIGHUP: the server has nothing to re-read yet, so it
    says so instead of dying of the signal (a clean exit that Restart= would not undo)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            notifier().reloading("SIGHUP")
            log.warning("SIGHUP: the server reloads nothing; restart it to apply server.toml")
            address = server.address or ("", 0)
            notifier().ready(f"serving: api {address[0]}:{address[1]}")


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

    if out is None:
        from rich.console import Console  # the dev command's output; not in the daemons

        out = Console()
    if not 1 <= nodes <= 254 or not 1 <= azs <= 26:
        raise ConfigError("hostmesh dev", "--nodes/--azs", "use 1..254 nodes in 1..26 AZs")
    with tempfile.TemporaryDirectory(prefix="hostmesh-dev-") as tmp, stop_signals() as signals:
        server = Server(
            ServerConfig(bind=server_bind, data_dir=str(Path(tmp) / "server")), print_token=False
        )
        name = socket.gethostname().split(".")[0] or "dev"
        configs: list[AgentConfig] = []
        started: list[AgentAddresses] = []
        async with trio.open_nursery() as nursery:
            server_addr = await nursery.start(server.run)
            # The agents join like any agent: a join token and the CA roots in files.
            secret, _ = await server.tokens.create("join", description="hostmesh dev agents")
            (Path(tmp) / "join-token").write_text(secret + "\n")
            (Path(tmp) / "ca.pem").write_bytes(server.ca.bundle_pem())
            trust = AgentServerConfig(
                ca_file=str(Path(tmp) / "ca.pem"), join_token_file=str(Path(tmp) / "join-token")
            )
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
                    servers=(f"{server_addr[0]}:{server_addr[1]}",), server=trust,
                )  # fmt: skip
                configs.append(cfg)
                started.append(await nursery.start(Agent(cfg).run))
            _print_dev(out, configs, started, server_addr, tmp, server.management_token or "",
                       spki_pin(server.ca.active.cert))  # fmt: skip
            await wait_for_stop_signal(signals)
            nursery.cancel_scope.cancel()


def _print_dev(
    out: Console,
    configs: list[AgentConfig],
    started: list[AgentAddresses],
    server_addr: tuple[str, int],
    tmp: str,
    token: str = "",
    pin: str = "",
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
        + f"  server API  https://{server_addr[0]}:{server_addr[1]}  (KV: /v1/kv/)\n"
        f"  token       {token}  (management: export HOSTMESH_TOKEN={token})\n"
        f"  CA pin      {pin}  (export HOSTMESH_CA_PIN={pin})\n"
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

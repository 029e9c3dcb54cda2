"""Shared test helpers: run Trio code with a bound, start real agents on loopback."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ParamSpec

import trio
import trio.testing
from hypothesis import settings

from hostmesh import AgentConfig, ApiConfig, DnsConfig, GossipConfig, InboundConfig, ProxyConfig
from hostmesh.agent import Agent, AgentAddresses

# Wall-clock deadlines per example make property tests fail on a busy 2-core CI
# machine without finding anything; the example counts stay as each test sets them.
settings.register_profile("hostmesh", deadline=None)
settings.load_profile("hostmesh")

P = ParamSpec("P")


def trio_test(
    timeout: float = 20.0, *, mock_clock: bool = False
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, None]]:
    """Run an async test under ``trio.run`` with a ``fail_after`` bound.

    With ``mock_clock`` time is a MockClock that jumps when every task is
    blocked (no real sleeping); the bound is then in virtual seconds.
    """

    def decorate(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
            async def main() -> None:
                with trio.fail_after(timeout):
                    await fn(*args, **kwargs)

            clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
            trio.run(main, clock=clock)

        return wrapper

    return decorate


def agent_config(tmp_path: Path, **overrides: Any) -> AgentConfig:
    """A dev config on loopback with the API and DNS on free ports, data under tmp_path.

    DNS recursion is off unless a test configures loopback recursors: tests
    never send queries to the machine's own resolver.
    """
    cfg = AgentConfig.dev(
        data_dir=str(tmp_path / "data"), services_dir=str(tmp_path / "services.d")
    )
    overrides.setdefault("dns", DnsConfig(bind="127.0.0.1:0", resolv_conf=""))
    overrides.setdefault("gossip", GossipConfig(bind="127.0.0.1:0"))
    overrides.setdefault("proxy", ProxyConfig(bind="127.0.0.1:0"))
    overrides.setdefault("inbound", InboundConfig(bind="127.0.0.1:0"))
    return replace(cfg, node_name="node-a", api=ApiConfig(bind="127.0.0.1:0"), **overrides)


@contextlib.asynccontextmanager
async def running_agent(
    config: AgentConfig, **kwargs: Any
) -> AsyncIterator[tuple[Agent, AgentAddresses]]:
    """Start an agent in a nursery; stop it when the block ends."""
    agent = Agent(config, **kwargs)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(functools.partial(agent.run, handle_signals=False))
        try:
            yield agent, addrs
        finally:
            nursery.cancel_scope.cancel()

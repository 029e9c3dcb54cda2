"""The per-host agent: local state, health checks, the local API, daemon wiring."""

from __future__ import annotations

from ._api import AgentApi
from ._checks import CheckRunner, CheckStatusMachine
from ._consul import service_from_consul, service_to_consul
from ._daemon import Agent, AgentAddresses
from ._state import LocalState
from ._sync import SyncClient, TrustBundle

__all__ = [
    "Agent",
    "AgentAddresses",
    "AgentApi",
    "CheckRunner",
    "CheckStatusMachine",
    "LocalState",
    "SyncClient",
    "TrustBundle",
    "service_from_consul",
    "service_to_consul",
]

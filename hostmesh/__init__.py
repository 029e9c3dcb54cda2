"""hostmesh: a per-host service mesh agent for fleets of EC2 instances and VMs."""

from __future__ import annotations

from ._config import (
    AgentConfig,
    ApiConfig,
    CheckDefinition,
    DnsConfig,
    GossipConfig,
    ProxyConfig,
    ServerConfig,
    ServiceDefinition,
    load_agent_config,
    load_server_config,
    load_service_file,
    parse_duration,
)
from ._errors import (
    AgentUnreachableError,
    ConfigError,
    HostmeshError,
    LocalProtocolError,
    NotFoundError,
    ProtocolError,
    RemoteProtocolError,
    ValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "AgentConfig",
    "AgentUnreachableError",
    "ApiConfig",
    "CheckDefinition",
    "ConfigError",
    "DnsConfig",
    "GossipConfig",
    "HostmeshError",
    "LocalProtocolError",
    "NotFoundError",
    "ProtocolError",
    "ProxyConfig",
    "RemoteProtocolError",
    "ServerConfig",
    "ServiceDefinition",
    "ValidationError",
    "__version__",
    "load_agent_config",
    "load_server_config",
    "load_service_file",
    "parse_duration",
]

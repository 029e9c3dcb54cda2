"""The exception tree of hostmesh.

Every error hostmesh raises on purpose derives from :class:`HostmeshError`::

    HostmeshError
    ├── ConfigError            a config file or value is wrong (file, key, reason)
    ├── ProtocolError          a message broke a protocol's rules
    │   ├── LocalProtocolError     we were about to send something invalid
    │   └── RemoteProtocolError    a peer sent something invalid
    ├── ValidationError        a request body or field from a client is invalid
    ├── NotFoundError          a named object (service, check, node) does not exist
    └── AgentUnreachableError  the CLI could not talk to the agent or server

Library errors (OSError, httpx, tomllib, json) are translated at the boundary
with ``raise New(...) from exc``.
"""

from __future__ import annotations

__all__ = [
    "AgentUnreachableError",
    "ConfigError",
    "HostmeshError",
    "LocalProtocolError",
    "NotFoundError",
    "ProtocolError",
    "RemoteProtocolError",
    "ValidationError",
]


class HostmeshError(Exception):
    """Root of every error hostmesh raises on purpose."""


class ConfigError(HostmeshError):
    """A configuration file or value is invalid.

    The message always names the file, the key (dotted path) and the reason.
    """

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class ProtocolError(HostmeshError):
    """A protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug of ours)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol forbids."""


class ValidationError(HostmeshError):
    """A client's request body or field is invalid; the message is one line."""


class NotFoundError(HostmeshError):
    """A named service, check or node does not exist."""


class AgentUnreachableError(HostmeshError):
    """The CLI could not reach the agent or server API."""

"""The exception tree of hostmesh.

Every error hostmesh raises on purpose derives from :class:`HostmeshError`::

    HostmeshError
    ├── ConfigError            a config file or value is wrong (file, key, reason)
    ├── ProtocolError          a message broke a protocol's rules
    │   ├── LocalProtocolError     we were about to send something invalid
    │   └── RemoteProtocolError    a peer sent something invalid
    ├── ValidationError        a request body or field from a client is invalid
    ├── NotFoundError          a named object (service, check, node) does not exist
    ├── AgentUnreachableError  the CLI could not talk to the agent or server
    ├── AuthError              a request's token or client certificate was refused
    ├── CertificateError       a certificate, CSR or CA state is unusable
    │   ├── CsrRejectedError       the CA refused a CSR (signature, key type, node name)
    │   ├── PeerCertificateError   a TLS peer's certificate was refused (CA, expiry, revoked, name)
    │   └── CaStateError           the CA state cannot be loaded (permissions, seal key, format)
    ├── RateLimitedError       too many requests; ``retry_after`` says when to try again
    ├── ImdsError              EC2 instance metadata (IMDSv2) could not be read
    └── StoreError             the server's store (SQLite or etcd) refused or failed a call
        ├── StoreValueError        a key, value, prefix, TTL or revision is out of bounds
        │                          (also a ValueError: the caller passed it)
        ├── StoreUnavailable       no store endpoint answered in time, or a write's outcome
        │                          is unknown because the connection broke mid-request
        ├── StoreProtocolError     the store sent something that is not its protocol
        │                          (also a RemoteProtocolError)
        ├── Compacted              a watch asked for history the store no longer keeps;
        │                          ``oldest_revision`` is where a watch may still start
        └── LeaseNotFound          the lease expired, was revoked or never existed

Library errors (OSError, httpx, tomllib, json) are translated at the boundary
with ``raise New(...) from exc``.
"""

from __future__ import annotations

__all__ = [
    "AgentUnreachableError",
    "AuthError",
    "CaStateError",
    "CertificateError",
    "Compacted",
    "ConfigError",
    "CsrRejectedError",
    "HostmeshError",
    "ImdsError",
    "LeaseNotFound",
    "LocalProtocolError",
    "NotFoundError",
    "PeerCertificateError",
    "ProtocolError",
    "RateLimitedError",
    "RemoteProtocolError",
    "StoreError",
    "StoreProtocolError",
    "StoreUnavailable",
    "StoreValueError",
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


class AuthError(HostmeshError):
    """A request's credentials were refused (the server's management API).

    ``reason`` is one short word for counters and logs: ``missing`` (no token),
    ``invalid`` (unknown or revoked token), ``expired``, ``forbidden`` (a valid
    token of the wrong kind, or a join token for another node name) or
    ``certificate`` (no or an unusable TLS client certificate).
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class CertificateError(HostmeshError):
    """A certificate, a certificate request or the CA's state is unusable."""


class CsrRejectedError(CertificateError):
    """The CA refused a certificate signing request; the message says which rule it broke."""


class PeerCertificateError(CertificateError):
    """A TLS peer's certificate was refused.

    ``reason`` is one short word for counters and logs: ``untrusted`` (no chain
    to a current root), ``expired`` (or not yet valid), ``revoked``,
    ``identity`` (no or the wrong SPIFFE ID) or ``missing`` (no certificate).
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class CaStateError(CertificateError):
    """The CA's persisted state cannot be used: unsafe file permissions, a wrong
    sealing key, tampered or malformed data. The message names the file or blob."""


class RateLimitedError(HostmeshError):
    """Too many requests (e.g. CSRs); ``retry_after`` is in seconds."""

    def __init__(self, what: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"{what}: rate limit reached, retry in {retry_after:.3f} s")


class ImdsError(HostmeshError):
    """EC2's instance metadata service was unreachable or gave an unusable answer."""


class StoreError(HostmeshError):
    """The store refused or failed an operation; the message says which and why."""


class StoreValueError(StoreError, ValueError):
    """A key, value, prefix, lease TTL or revision passed to the store is out of bounds."""


class StoreUnavailable(StoreError):
    """No store endpoint answered in time (the message names those tried and the last error).

    For a write this may also mean the outcome is unknown: the request was sent
    and the connection broke before the answer. Repeating a plain put is safe;
    a compare-and-swap should re-read first.
    """


class StoreProtocolError(StoreError, RemoteProtocolError):
    """The store answered with something that is not its protocol (bad JSON, wrong shapes)."""


class Compacted(StoreError):
    """A watch asked for revisions the store no longer keeps.

    Attributes:
        oldest_revision: the oldest revision a watch can still start from.
    """

    def __init__(self, revision: int, oldest_revision: int) -> None:
        self.revision = revision
        self.oldest_revision = oldest_revision
        super().__init__(
            f"revision {revision} has been compacted; the oldest revision to watch from"
            f" is {oldest_revision}"
        )


class LeaseNotFound(StoreError):
    """The lease expired, was revoked or never existed."""

    def __init__(self, lease: int) -> None:
        self.lease = lease
        super().__init__(f"lease {lease} not found (expired, revoked or never granted)")

"""Configuration: TOML files mapped onto frozen dataclasses, one per component.

Every field has its default here and a comment with meaning and unit. Loading
is strict: an unknown key, a wrong type or a bad value fails with the file,
the dotted key and the reason (:class:`~hostmesh.ConfigError`), so nothing
starts half-configured. Durations are seconds, written as numbers or as
Consul/Go style strings (``"500ms"``, ``"10s"``, ``"5m"``, ``"72h"``).
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ._errors import ConfigError

__all__ = [
    "GOSSIP_PROFILES",
    "MINUTES",
    "SECONDS",
    "AgentConfig",
    "AgentServerConfig",
    "ApiConfig",
    "CheckDefinition",
    "DnsConfig",
    "Ec2Config",
    "FieldError",
    "GossipConfig",
    "HealthConfig",
    "InboundConfig",
    "IntentionsConfig",
    "ProxyConfig",
    "ServerCaConfig",
    "ServerConfig",
    "ServiceDefinition",
    "StoreConfig",
    "SyncConfig",
    "UpstreamConfig",
    "from_mapping",
    "load_agent_config",
    "load_server_config",
    "load_service_file",
    "parse_duration",
    "parse_hostport",
]

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES

#: Consul caps check output at 4 KB; we keep the same bound.
MAX_CHECK_OUTPUT = 4 * 1024
#: A service definition file larger than this is refused (they are a few hundred bytes).
MAX_CONFIG_FILE = 1024 * 1024

T = TypeVar("T")


class FieldError(ValueError):
    """Raised by validators: ``key`` is relative to the object being validated."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": SECONDS,
    "m": MINUTES,
    "h": HOURS,
}


def parse_duration(value: str | float | int) -> float:
    """Parse ``"1m30s"``, ``"500ms"``, ``"10s"`` or a number of seconds.

    Raises:
        ValueError: the value is not a non-negative duration.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"invalid duration {value!r}: too large") from None
    elif not isinstance(value, str):
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    else:
        text = value.strip()
        if not text:
            raise ValueError("empty duration")
        pos = 0
        seconds = 0.0
        for match in _DURATION_RE.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text):
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(
                    f"invalid duration {value!r} (use seconds or e.g. '500ms', '10s', '5m')"
                ) from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"invalid duration {value!r}: must be finite and >= 0")
    return seconds


def parse_hostport(value: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port``; port 0 means "any free port".

    Raises:
        ValueError: not a host:port with a port in 0..65535.
    """
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"invalid address {value!r}: expected host:port")
    return (host or default_host), int(port)


def _check_name(value: str, what: str) -> None:
    if not value or len(value) > 128 or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", value):
        raise FieldError(
            what,
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_', ':' or '-'",
        )


@dataclass(frozen=True)
class CheckDefinition:
    """One health check of a local service (Consul's check definition).

    The kind comes from which of ``http``, ``tcp``, ``args`` or ``ttl`` is set;
    exactly one must be.
    """

    id: str = ""  # unique on the node; default "service:<service id>[:<n>]"
    name: str = ""  # for people; default "Service '<name>' check"
    http: str = ""  # URL; 2xx passing, 429 warning, anything else critical
    method: str = "GET"  # HTTP method for http checks
    header: Mapping[str, str] = field(default_factory=dict)  # extra request headers
    tls_skip_verify: bool = False  # http checks: accept any server certificate
    tcp: str = ""  # host:port; a completed connect is passing
    args: tuple[str, ...] = ()  # script argv; exit 0 passing, 1 warning, else critical
    ttl: float = 0.0  # s; TTL check: critical unless updated through the API within ttl
    interval: float = 10 * SECONDS  # s between runs (not for ttl); first run jittered
    timeout: float = 0.0  # s per run; 0 = Consul's default: 10 s, script 30 s
    success_before_passing: int = 0  # consecutive passes needed before passing
    failures_before_critical: int = 0  # consecutive failures needed before critical
    status: Literal["passing", "warning", "critical"] = "critical"  # initial status
    notes: str = ""  # free text shown with the check
    deregister_critical_service_after: float = 0.0  # s; 0 = never; Consul's minimum: 60 s

    @property
    def kind(self) -> str:
        """``"http"``, ``"tcp"``, ``"script"`` or ``"ttl"``."""
        if self.http:
            return "http"
        if self.tcp:
            return "tcp"
        if self.args:
            return "script"
        return "ttl"

    @property
    def effective_timeout(self) -> float:
        """The run timeout: the configured one, or Consul's 10 s (30 s for scripts)."""
        if self.timeout > 0:
            return self.timeout
        return 30 * SECONDS if self.kind == "script" else 10 * SECONDS

    def __post_init__(self) -> None:
        kinds = [
            k
            for k, v in (
                ("http", self.http),
                ("tcp", self.tcp),
                ("args", self.args),
                ("ttl", self.ttl),
            )
            if v
        ]
        if len(kinds) != 1:
            raise FieldError(
                "http" if not kinds else kinds[1],
                "a check needs exactly one of http, tcp, args or ttl"
                + (f" (got {', '.join(kinds)})" if kinds else ""),
            )
        if self.http and not re.match(r"https?://[^\s/]+", self.http):
            raise FieldError("http", f"invalid URL {self.http!r}: expected http(s)://host...")
        if self.tcp:
            try:
                parse_hostport(self.tcp)
            except ValueError as exc:
                raise FieldError("tcp", str(exc)) from None
        if self.kind != "ttl" and self.interval <= 0:
            raise FieldError("interval", "must be > 0")
        if self.id:
            _check_name(self.id, "id")
        for name in ("success_before_passing", "failures_before_critical"):
            if getattr(self, name) < 0:
                raise FieldError(name, "must be >= 0")
        if 0 < self.deregister_critical_service_after < MINUTES:
            raise FieldError(
                "deregister_critical_service_after", "must be 0 (never) or at least 1m"
            )
        if not re.fullmatch(r"[A-Z]{1,16}", self.method):
            raise FieldError("method", f"invalid HTTP method {self.method!r}")


@dataclass(frozen=True)
class ServiceDefinition:
    """A service instance on this node (a ``services.d/*.toml`` file or an API registration)."""

    name: str  # service name, as in udvr.svc.mesh
    id: str = ""  # instance id, unique on the node; default = name
    address: str = ""  # where the instance listens; "" = the node's address
    port: int = 0  # TCP port of the instance
    tags: tuple[str, ...] = ()  # free labels; usable as DNS and proxy filters (v2, canary)
    meta: Mapping[str, str] = field(default_factory=dict)  # key/values; meta.version names a subset
    weight: int = 1  # relative weight in balancing and SRV answers, 1..65535
    weight_warning: int = 1  # weight while the instance's health is warning
    user: str = ""  # Unix user whose processes are this service (workload identity)
    checks: tuple[CheckDefinition, ...] = ()  # health checks run by the agent

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        if not self.id:
            object.__setattr__(self, "id", self.name)
        _check_name(self.id, "id")
        if not 0 <= self.port <= 65535:
            raise FieldError("port", f"{self.port} is not a TCP port (0..65535)")
        if not 0 <= self.weight <= 65535:
            raise FieldError("weight", "must be in 0..65535")
        if not 0 <= self.weight_warning <= 65535:
            raise FieldError("weight_warning", "must be in 0..65535")
        if self.address:
            try:
                ipaddress.ip_address(self.address)
            except ValueError:
                if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", self.address):
                    raise FieldError("address", f"invalid address {self.address!r}") from None
        for tag in self.tags:
            if not tag or len(tag) > 128 or any(c.isspace() for c in tag):
                raise FieldError("tags", f"invalid tag {tag!r}")
        ids = set()
        for i in range(len(self.checks)):
            check_id = self.check_id(i)
            if check_id in ids:
                raise FieldError(f"checks[{i}].id", f"duplicate check id {check_id!r}")
            ids.add(check_id)

    def check_id(self, index: int) -> str:
        """The id of ``checks[index]``: its own, or Consul's ``service:<id>[:<n>]``."""
        check = self.checks[index]
        if check.id:
            return check.id
        if len(self.checks) == 1:
            return f"service:{self.id}"
        return f"service:{self.id}:{index + 1}"

    def check_name(self, index: int) -> str:
        check = self.checks[index]
        return check.name or f"Service '{self.name}' check"


@dataclass(frozen=True)
class ApiConfig:
    """The agent's local HTTP API (Consul-compatible subset, /metrics, /ready)."""

    bind: str = "127.0.0.1:4191"  # host:port; loopback only in production (no auth)
    max_body: int = 1024 * 1024  # bytes; request bodies above this get 413
    max_connections: int = 256  # concurrent API connections; more are closed at once
    header_timeout: float = 10 * SECONDS  # s to receive request headers (slow clients)
    max_blocking_wait: float = 10 * MINUTES  # s; cap on ?wait= (Consul's cap too)

    def __post_init__(self) -> None:
        try:
            parse_hostport(self.bind)
        except ValueError as exc:
            raise FieldError("bind", str(exc)) from None


@dataclass(frozen=True)
class DnsConfig:
    """The agent's DNS resolver (Consul's DNS semantics, ``svc`` for ``service``)."""

    bind: str = "127.0.0.1:8600"  # host:port for UDP and TCP; systemd-resolved routes ~mesh here
    domain: str = "mesh"  # the zone answered locally; everything else is recursed
    ttl: float = 0.0  # s; TTL of service answers (Consul's default 0: always fresh)
    node_ttl: float = 0.0  # s; TTL of <node>.node answers
    # s per service-name prefix ("web" or "web*"; "*" = all); the longest prefix wins over ttl
    service_ttl: Mapping[str, float] = field(default_factory=dict)
    only_passing: bool = False  # answer only passing instances (default: warning counts)
    a_record_limit: int = 0  # most A/AAAA/SRV records per answer; 0 = no limit
    # host or host:port recursors for names outside the domain, tried in order;
    # empty = the nameservers in resolv_conf (minus ourselves)
    recursors: tuple[str, ...] = ()
    resolv_conf: str = "/etc/resolv.conf"  # where default recursors come from; "" = none (REFUSED)
    recursor_timeout: float = 2 * SECONDS  # s per recursor before the next is tried
    max_recursions: int = 256  # forwarded queries in flight; more get SERVFAIL
    udp_max_payload: int = 1232  # bytes; EDNS0 cap (DNS flag day 2020: no IP fragmentation)
    tcp_idle_timeout: float = 10 * SECONDS  # s a TCP client may stay idle (RFC 7766 suggests s)
    max_tcp_connections: int = 256  # concurrent TCP clients; more are closed at once
    cache_size: int = 10_000  # encoded answers kept; cleared whenever the catalog changes
    soa_refresh: int = 3600  # s; SOA fields as in Consul
    soa_retry: int = 600
    soa_expire: int = 86400
    soa_min_ttl: int = 0  # s; the negative-answer TTL (NXDOMAIN, NODATA)

    def __post_init__(self) -> None:
        try:
            parse_hostport(self.bind)
        except ValueError as exc:
            raise FieldError("bind", str(exc)) from None
        labels = self.domain.strip(".").split(".")
        if not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x) for x in labels):
            raise FieldError("domain", f"invalid domain {self.domain!r}")
        object.__setattr__(self, "domain", self.domain.strip(".").lower())
        for server in self.recursors:
            try:
                parse_hostport(server if ":" in server else f"{server}:53")
            except ValueError as exc:
                raise FieldError("recursors", str(exc)) from None
        if not 512 <= self.udp_max_payload <= 65535:
            raise FieldError("udp_max_payload", "must be in 512..65535")
        for name in ("a_record_limit", "soa_min_ttl", "soa_refresh", "soa_retry", "soa_expire"):
            if getattr(self, name) < 0:
                raise FieldError(name, "must be >= 0")
        for name in ("max_recursions", "max_tcp_connections", "cache_size"):
            if getattr(self, name) < 1:
                raise FieldError(name, "must be >= 1")


#: memberlist's WAN and Local configs, as overrides of the LAN defaults below
#: (memberlist config.go: DefaultWANConfig, DefaultLocalConfig).
GOSSIP_PROFILES: dict[str, dict[str, Any]] = {
    "lan": {},
    "wan": {
        "probe_interval": 5.0,
        "probe_timeout": 3.0,
        "gossip_interval": 0.5,
        "gossip_nodes": 4,
        "suspicion_mult": 6,
        "push_pull_interval": 60.0,
    },
    "local": {
        "probe_interval": 1.0,
        "probe_timeout": 0.2,
        "indirect_checks": 1,
        "gossip_interval": 0.1,
        "retransmit_mult": 2,
        "suspicion_mult": 3,
        "push_pull_interval": 15.0,
    },
}


@dataclass(frozen=True)
class GossipConfig:
    """SWIM gossip with Lifeguard; defaults are memberlist's LAN config.

    ``profile = "wan"`` or ``"local"`` in TOML starts from memberlist's WAN or
    Local values; keys given next to it override the profile.
    """

    profile: Literal["lan", "wan", "local"] = "lan"  # which memberlist config the defaults follow
    bind: str = ""  # host:port for UDP and TCP; "" = the agent's address, port 7946
    seeds: tuple[str, ...] = ()  # host[:port] of members to join through; tried in order
    probe_interval: float = 1 * SECONDS  # s between failure probes (x awareness score)
    probe_timeout: float = 0.5 * SECONDS  # s to wait for a direct ack; a LAN RTT plus slack
    indirect_checks: int = 3  # members asked to probe for us when the direct probe fails
    gossip_interval: float = (
        0.2 * SECONDS
    )  # s between gossip rounds; lower spreads faster, costs packets
    gossip_nodes: int = 3  # members each gossip round sends to (fanout)
    retransmit_mult: int = 4  # each broadcast is sent mult x ceil(log10(N+1)) times
    suspicion_mult: int = 4  # suspicion min = mult x max(1, log10 N) x probe_interval
    suspicion_max_timeout_mult: int = 6  # suspicion max = this x min (Lifeguard's upper bound)
    push_pull_interval: float = (
        30 * SECONDS
    )  # s between full state syncs (TCP); scaled above 32 nodes
    awareness_max_multiplier: int = 8  # Lifeguard: probe interval x up to this under local trouble
    packet_budget: int = 1400  # bytes per UDP packet (below a 1500 MTU with headers)
    dead_node_reclaim_time: float = (
        0.0  # s after which a dead node's name may rejoin at a new address; 0 = at once
    )
    gossip_to_the_dead_time: float = 30 * SECONDS  # s dead members still receive gossip (to refute)
    # s between push-pulls with a random failed member, so that a healed partition
    # rejoins (Serf's reconnect_interval)
    reconnect_interval: float = 30 * SECONDS
    # s a failed member is remembered and retried before it is forgotten (Serf: 24 h;
    # the servers reap dead nodes from the catalog on their own schedule)
    reconnect_timeout: float = 24 * HOURS
    join_retries: int = 5  # attempts per seed before giving up on it
    join_backoff: float = 1 * SECONDS  # s before the first retry; doubles, with jitter
    keyring: tuple[
        str, ...
    ] = ()  # base64 AES-256 keys; the first is primary; empty = no encryption
    keyring_file: str = (
        ""  # where `hostmesh keyring` changes are kept; "" = <data_dir>/keyring.json
    )
    # bound into every packet as AES-GCM associated data: clusters with other labels never talk
    label: str = ""

    def __post_init__(self) -> None:
        if self.bind:
            try:
                parse_hostport(self.bind)
            except ValueError as exc:
                raise FieldError("bind", str(exc)) from None
        for name in ("probe_interval", "probe_timeout", "gossip_interval", "push_pull_interval",
                     "reconnect_interval", "reconnect_timeout"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise FieldError(name, "must be > 0")
        if self.probe_timeout >= self.probe_interval:
            raise FieldError("probe_timeout", "must be shorter than probe_interval")
        at_least_one = (
            "indirect_checks", "gossip_nodes", "retransmit_mult", "suspicion_mult",
            "suspicion_max_timeout_mult", "awareness_max_multiplier", "join_retries",
        )  # fmt: skip
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise FieldError(name, "must be >= 1")
        if not 512 <= self.packet_budget <= 65000:
            raise FieldError("packet_budget", "must be in 512..65000")
        for i, key in enumerate(self.keyring):
            try:
                raw = base64.b64decode(key, validate=True)
            except ValueError:
                raise FieldError(f"keyring[{i}]", "not valid base64") from None
            if len(raw) != 32:
                raise FieldError(f"keyring[{i}]", f"an AES-256 key is 32 bytes, got {len(raw)}")

    @classmethod
    def for_profile(cls, profile: str, **overrides: Any) -> GossipConfig:
        """The ``lan``, ``wan`` or ``local`` defaults with ``overrides``."""
        return cls(profile=profile, **{**GOSSIP_PROFILES[profile], **overrides})  # type: ignore[arg-type]


@dataclass(frozen=True)
class ProxyConfig:
    """The outbound HTTP proxy (Linkerd 1's port 4140)."""

    bind: str = "127.0.0.1:4140"  # host:port; loopback: only this host's programs use it
    max_connections: int = 10_000  # concurrent client connections; more get 503 and are closed
    header_timeout: float = 10 * SECONDS  # s to receive a request head once it started (408)
    idle_timeout: float = 60 * SECONDS  # s a keep-alive client connection may sit idle; also
    # the longest pause inside a streamed body before it is cut
    connect_timeout: float = 1 * SECONDS  # s per connect attempt; a LAN connect takes < 1 ms
    pool_max_idle: int = 64  # idle keep-alive connections kept per instance
    pool_max_per_instance: int = 1024  # open connections per instance (idle + busy)
    # s an idle upstream connection is kept; below common server keep-alive
    # timeouts (nginx 75 s, Go 90 s) so the server rarely closes one under us
    pool_idle_timeout: float = 30 * SECONDS
    # s a stopping agent (SIGTERM) waits for requests in flight after it stops
    # accepting; below systemd's TimeoutStopSec (90 s) so the drain ends first
    drain_timeout: float = 15 * SECONDS

    def __post_init__(self) -> None:
        try:
            parse_hostport(self.bind)
        except ValueError as exc:
            raise FieldError("bind", str(exc)) from None
        if not self.drain_timeout >= 0:
            raise FieldError("drain_timeout", "must be >= 0")
        for name in ("max_connections", "pool_max_per_instance"):
            if getattr(self, name) < 1:
                raise FieldError(name, "must be at least 1")
        if self.pool_max_idle < 0:
            raise FieldError("pool_max_idle", "must be >= 0")
        for name in ("header_timeout", "idle_timeout", "connect_timeout", "pool_idle_timeout"):
            if not getattr(self, name) > 0:
                raise FieldError(name, "must be > 0")


@dataclass(frozen=True)
class InboundConfig:
    """The inbound mTLS listener (``[inbound]``): other agents' requests for this
    node's instances. It runs when the agent has servers (and so a node certificate)."""

    bind: str = ""  # host:port; "" = <address>:4141; port 0 = any free port (published)
    max_connections: int = 10_000  # concurrent connections from other agents
    handshake_timeout: float = 10 * SECONDS  # s for TLS and the first request head

    def __post_init__(self) -> None:
        if self.bind:
            try:
                parse_hostport(self.bind)
            except ValueError as exc:
                raise FieldError("bind", str(exc)) from None
        if self.max_connections < 1:
            raise FieldError("max_connections", "must be at least 1")
        if not self.handshake_timeout > 0:
            raise FieldError("handshake_timeout", "must be > 0")


@dataclass(frozen=True)
class UpstreamConfig:
    """A local TCP listener for a service (``[[upstream]]``): each connection
    goes to an instance picked by the proxy's balancer."""

    service: str  # the service name in the catalog
    bind: str  # host:port of the local listener, e.g. "127.0.0.1:15432"
    connect_attempts: int = 3  # instances tried before the client connection is closed

    def __post_init__(self) -> None:
        _check_name(self.service, "service")
        try:
            parse_hostport(self.bind)
        except ValueError as exc:
            raise FieldError("bind", str(exc)) from None
        if not 1 <= self.connect_attempts <= 10:
            raise FieldError("connect_attempts", "must be in 1..10")


@dataclass(frozen=True)
class Ec2Config:
    """EC2 placement for ``az = "auto"`` / ``region = "auto"`` (IMDSv2, ``hostmesh._imds``)."""

    # base URL of the instance metadata service; IPv6-only instances use
    # "http://[fd00:ec2::254]"; tests point it at a loopback server
    imds_endpoint: str = "http://169.254.169.254"
    # s per request (token PUT, each GET); IMDS answers on the host in ~1 ms,
    # so 1 s only bounds the start of an agent where there is no IMDS
    imds_timeout: float = 1 * SECONDS
    imds_attempts: int = 2  # tries of the whole token + GET sequence
    # false: IMDS failing logs a warning and the agent runs with no AZ/region ("");
    # true: the agent refuses to start (the unit fails and is restarted)
    imds_required: bool = False

    def __post_init__(self) -> None:
        try:
            url = urllib.parse.urlsplit(self.imds_endpoint)
            _ = url.port  # raises on a bad port
        except ValueError:
            url = urllib.parse.urlsplit("")
        if url.scheme != "http" or not url.hostname or url.path not in ("", "/") or url.query:
            raise FieldError(
                "imds_endpoint", f"expected http://host[:port], got {self.imds_endpoint!r}"
            )
        if not 0 < self.imds_timeout <= 30:
            raise FieldError("imds_timeout", "must be > 0 and at most 30 s")
        if not 1 <= self.imds_attempts <= 5:
            raise FieldError("imds_attempts", "must be in 1..5")


_CA_PIN_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class AgentServerConfig:
    """How the agent trusts the servers and gets its node certificate (``[server]``).

    The first certificate comes from a join (join token + CSR over TLS); the
    agent trusts the server either by ``ca_pin``, the SHA-256 of a CA root's
    SubjectPublicKeyInfo (as kubeadm's discovery hash; ``hostmesh certs
    --server`` and ``GET /v1/ca/roots`` show it), or by a PEM ``ca_file``.
    Later renewals use mutual TLS with the node certificate.
    """

    ca_pin: str = ""  # "sha256:<64 hex>"; "" = use ca_file
    ca_file: str = ""  # PEM file with the CA roots; "" = use ca_pin
    join_token_file: str = "/etc/hostmesh/join-token"  # the join token (one line), read at join
    request_timeout: float = 10 * SECONDS  # s per call to a server (connect, TLS, answer)
    # s before retrying a failed renewal; doubles up to renew_retry_max. The
    # certificate is renewed at 2/3 of its life, so 72 h leaves 24 h of retries
    renew_retry: float = 30 * SECONDS
    renew_retry_max: float = 5 * MINUTES

    def __post_init__(self) -> None:
        if self.ca_pin and not _CA_PIN_RE.fullmatch(self.ca_pin):
            raise FieldError("ca_pin", "expected 'sha256:' and 64 lower-case hex digits")
        if self.ca_pin and self.ca_file:
            raise FieldError("ca_pin", "set ca_pin or ca_file, not both")
        if not 0 < self.request_timeout <= 5 * MINUTES:
            raise FieldError("request_timeout", "must be > 0 and at most 5 min")
        if not 0 < self.renew_retry <= self.renew_retry_max:
            raise FieldError("renew_retry", "must be > 0 and at most renew_retry_max")


@dataclass(frozen=True)
class SyncConfig:
    """The agent's websocket to a server (``[sync]``; the addresses are ``servers``).

    The agent keeps one connection to one server from ``servers`` (shuffled),
    and fails over to the next with exponential backoff and jitter.
    """

    mesh: str = "mesh"  # SPIFFE trust domain the servers' certificates must name ([ca] mesh)
    # s between our heartbeats when nothing else is sent; the server closes a
    # session silent for 3 of its own intervals (30 s)
    heartbeat_interval: float = 10 * SECONDS
    # s without a message from the server (it heartbeats every 10 s) before we reconnect
    heartbeat_timeout: float = 30 * SECONDS
    connect_timeout: float = 5 * SECONDS  # s for TCP, TLS and the websocket handshake together
    # s before the first reconnect; doubles per failure up to backoff_max. Each wait
    # is drawn from [d/2, d] (jitter) so that agents cut off together do not return together
    backoff_base: float = 0.5 * SECONDS
    backoff_max: float = 30 * SECONDS
    # s between writes of the last snapshot and config to the data dir (a burst of
    # changes is one write); the file is what the agent serves from after a restart
    persist_interval: float = 1 * SECONDS

    def __post_init__(self) -> None:
        from ._errors import ValidationError
        from ._pki import validate_trust_domain

        try:
            validate_trust_domain(self.mesh)
        except ValidationError as exc:
            raise FieldError("mesh", str(exc)) from None
        for name in ("heartbeat_interval", "heartbeat_timeout", "connect_timeout",
                     "backoff_base", "backoff_max", "persist_interval"):  # fmt: skip
            if not 0 < getattr(self, name) <= 1 * HOURS:
                raise FieldError(name, "must be > 0 and at most 1 h")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise FieldError("heartbeat_timeout", "must be longer than heartbeat_interval")
        if self.backoff_max < self.backoff_base:
            raise FieldError("backoff_max", "must be at least backoff_base")


def _default_node_name() -> str:
    import socket  # here, so that sans-IO modules may import this one

    return socket.gethostname().split(".")[0] or "node"


@dataclass(frozen=True)
class AgentConfig:
    """The per-host agent (``/etc/hostmesh/agent.toml``)."""

    node_name: str = field(default_factory=_default_node_name)  # default: short hostname
    address: str = "127.0.0.1"  # address other hosts reach this one on
    az: str = ""  # availability zone (eu-west-1a); "" = none; "auto" = from EC2 IMDSv2
    region: str = ""  # region (eu-west-1); "" = none; "auto" = from EC2 IMDSv2
    datacenter: str = "dc1"  # reported as Consul's Datacenter
    meta: Mapping[str, str] = field(default_factory=dict)  # node meta (DNS TXT, catalog)
    data_dir: str = "/var/lib/hostmesh"  # generation, registrations, last catalog
    services_dir: str = "/etc/hostmesh/services.d"  # *.toml service definitions
    servers: tuple[str, ...] = ()  # server addresses host:port; empty = run alone (no sync)
    sync: SyncConfig = field(default_factory=SyncConfig)  # [sync]: the websocket to a server
    api: ApiConfig = field(default_factory=ApiConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)  # :4141, mTLS from agents
    ec2: Ec2Config = field(default_factory=Ec2Config)  # IMDSv2 for az/region "auto"
    server: AgentServerConfig = field(default_factory=AgentServerConfig)  # join, CA trust
    # per-service routes, splits, retries, limits and ejection ([traffic.<service>]);
    # the servers push the same structure
    traffic: Mapping[str, TrafficPolicy] = field(default_factory=dict)
    upstream: tuple[UpstreamConfig, ...] = ()  # [[upstream]] TCP listeners
    # s a deleted instance's or left node's tombstone is kept before GC; must
    # exceed the time an update needs to reach every node (seconds at 1,000 nodes)
    tombstone_ttl: float = 24 * HOURS
    check_reap_interval: float = 30 * SECONDS  # s between DeregisterCriticalServiceAfter sweeps

    def __post_init__(self) -> None:
        _check_name(self.node_name, "node_name")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise FieldError("address", f"{self.address!r} is not an IP address") from None
        for server in self.servers:
            try:
                parse_hostport(server)
            except ValueError as exc:
                raise FieldError("servers", str(exc)) from None
        if self.tombstone_ttl <= 0:
            raise FieldError("tombstone_ttl", "must be > 0")
        for name in self.traffic:
            try:
                _check_name(name, "service")
            except FieldError as exc:
                raise FieldError(f"traffic.{name}", exc.reason) from None
        binds = [u.bind for u in self.upstream]
        if len(set(binds)) != len(binds):
            raise FieldError("upstream", "two upstreams bind the same address")

    @classmethod
    def dev(cls, data_dir: str, services_dir: str = "") -> AgentConfig:
        """The config ``hostmesh dev`` and tests use: loopback, AZ dev-1a."""
        return cls(
            az="dev-1a",
            region="dev-1",
            data_dir=data_dir,
            services_dir=services_dir or str(Path(data_dir) / "services.d"),
        )


#: Longest timeout the ``[store]`` section accepts; a store call should not hang longer.
MAX_STORE_TIMEOUT = 5 * MINUTES


@dataclass(frozen=True)
class StoreConfig:
    """Where a server keeps its state (``[store]`` in server.toml).

    ``sqlite`` is one server with a local file; ``etcd`` is several stateless
    servers on one etcd cluster (the highly available setup).
    """

    backend: Literal["sqlite", "etcd"] = "sqlite"  # which store; see above
    path: str = ""  # sqlite: the database file; "" = <data_dir>/store.db
    # sqlite: changes kept so that a watch (a reconnecting agent) can resume from a
    # past revision; older ones are compacted away and such a watch must re-read
    history_events: int = 10_000
    # sqlite: bytes of keys and values in that history (bounds its disk use); at least 1 MiB
    history_bytes: int = 64 * 1024 * 1024
    # etcd: client URLs (http://host:port or https://...), all members of one
    # cluster; calls stick to one and fail over to the next when it is unreachable
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    connect_timeout: float = 1 * SECONDS  # etcd: s per TCP connect; a LAN connect takes < 1 ms
    # etcd: s for one request to one member; etcd itself gives up on a write after
    # 5 s + 2 election timeouts, so a longer wait would rarely help
    request_timeout: float = 5 * SECONDS
    # etcd: s a call keeps trying the members (with backoff) before StoreUnavailable;
    # longer than an election (1 s by default) with margin for a loaded machine
    failover_timeout: float = 10 * SECONDS

    def __post_init__(self) -> None:
        if self.history_events < 1:
            raise FieldError("history_events", "must be >= 1")
        if self.history_bytes < 1024 * 1024:
            raise FieldError("history_bytes", "must be at least 1 MiB (two of the largest values)")
        for name in ("connect_timeout", "request_timeout", "failover_timeout"):
            if not 0 < getattr(self, name) <= MAX_STORE_TIMEOUT:
                raise FieldError(name, f"must be > 0 and at most {MAX_STORE_TIMEOUT:.0f} s")
        if self.backend == "etcd" and not self.endpoints:
            raise FieldError("endpoints", "the etcd backend needs at least one endpoint")
        for i, endpoint in enumerate(self.endpoints):
            try:
                url = urllib.parse.urlsplit(endpoint)
                port = url.port  # raises on a bad port
            except ValueError:
                url, port = urllib.parse.urlsplit(""), None
            if (
                url.scheme not in ("http", "https")
                or not url.hostname
                or port is None
                or url.path not in ("", "/")
                or url.query
                or url.fragment
                or url.username is not None
            ):
                raise FieldError(
                    f"endpoints[{i}]", f"expected http(s)://host:port, got {endpoint!r}"
                )
        if len(set(self.endpoints)) != len(self.endpoints):
            raise FieldError("endpoints", "an endpoint is listed twice")


@dataclass(frozen=True)
class ServerCaConfig:
    """The servers' certificate authority (``[ca]`` in server.toml).

    The CA state (root keys) is a 0600 file in the data dir with SQLite; with
    etcd it is kept in the store, sealed with AES-256-GCM under the key in
    ``sealing_key_file`` (the same file on every server; the key never reaches etcd).
    """

    mesh: str = "mesh"  # SPIFFE trust domain: nodes are spiffe://<mesh>/node/<node>
    # s a node certificate lives (Consul's leaf_cert_ttl); agents renew at 2/3.
    # Shorter: a stolen key is useful for less time, more CSRs
    leaf_ttl: float = 72 * HOURS
    # etcd only (required there): a file with the 32-byte sealing key, base64 or
    # hex (make one: openssl rand -base64 32), mode 0600
    sealing_key_file: str = ""
    csr_rate: int = (
        50  # CSRs signed per second per server (Consul's csr_max_per_second); 0 = no limit
    )

    def __post_init__(self) -> None:
        from ._errors import ValidationError
        from ._pki import validate_trust_domain

        try:
            validate_trust_domain(self.mesh)
        except ValidationError as exc:
            raise FieldError("mesh", str(exc)) from None
        if not 60 * SECONDS <= self.leaf_ttl <= 365 * 24 * HOURS:
            raise FieldError("leaf_ttl", "must be at least 1 min and at most 1 year")
        if self.csr_rate < 0:
            raise FieldError("csr_rate", "must be >= 0 (0 = no limit)")


@dataclass(frozen=True)
class HealthConfig:
    """The leader's node-health duties (``[health]`` in server.toml; server/_health.py)."""

    # s a node confirmed dead stays in the catalog (shown dead, out of DNS and the
    # proxy) before it is reaped. Consul keeps dead nodes 72 h, which an autoscaled
    # fleet pays for with days of terminated instances in every listing; an hour
    # outlasts a reboot or a network blip and leaves time to see what died. Reaping
    # early costs nothing: a node that comes back re-sends its record on reconnect
    reap_after: float = 1 * HOURS
    # s per TCP connect to a reported node's gossip port; a LAN connect takes
    # < 1 ms, a refused one fails at once, only an unreachable host waits this long
    probe_timeout: float = 1 * SECONDS
    # connects tried before a death is confirmed; a node whose accept queue is
    # full for a moment (CPU spike) answers one of them
    probe_attempts: int = 3
    probe_pause: float = 0.5 * SECONDS  # s between tries
    # the agents' gossip port (their [gossip] bind); an agent whose gossip listens
    # elsewhere puts its port in its node meta gossip_port, which wins
    gossip_port: int = 7946
    # s between sweeps when nothing changes (a new report or record wakes one at
    # once; a reap coming due too): bounds how late a missed change is handled
    sweep_interval: float = 10 * SECONDS

    def __post_init__(self) -> None:
        if not 1 * SECONDS <= self.reap_after <= 30 * 24 * HOURS:
            raise FieldError("reap_after", "must be at least 1 s and at most 30 days")
        if not 0 < self.probe_timeout <= 60 * SECONDS:
            raise FieldError("probe_timeout", "must be > 0 and at most 60 s")
        if not 1 <= self.probe_attempts <= 10:
            raise FieldError("probe_attempts", "must be 1..10")
        if not 0 <= self.probe_pause <= 60 * SECONDS:
            raise FieldError("probe_pause", "must be 0..60 s")
        if not 1 <= self.gossip_port <= 65535:
            raise FieldError("gossip_port", "must be a port, 1..65535")
        if not 0 < self.sweep_interval <= 1 * HOURS:
            raise FieldError("sweep_interval", "must be > 0 and at most 1 h")


@dataclass(frozen=True)
class IntentionsConfig:
    """``[intentions]`` in server.toml: the policy for a request no intention matches."""

    # "allow" or "deny". allow: a mesh works before anyone writes a rule, and
    # deny rules close paths (Consul's default with ACLs off); deny: zero trust,
    # every call needs an allow rule. Agents read it with the intentions
    default: str = "allow"

    def __post_init__(self) -> None:
        if self.default not in ("allow", "deny"):
            raise FieldError("default", f"must be allow or deny, not {self.default!r}")


@dataclass(frozen=True)
class ServerConfig:
    """A server (``/etc/hostmesh/server.toml``)."""

    bind: str = "0.0.0.0:4150"  # host:port of the server API
    data_dir: str = "/var/lib/hostmesh-server"  # SQLite store and CA files
    store: StoreConfig = field(default_factory=StoreConfig)  # [store]: SQLite or etcd
    ca: ServerCaConfig = field(default_factory=ServerCaConfig)  # [ca]: mesh name, TTL, sealing
    health: HealthConfig = field(default_factory=HealthConfig)  # [health]: deaths, reaping
    # [intentions]: the default policy
    intentions: IntentionsConfig = field(default_factory=IntentionsConfig)

    def __post_init__(self) -> None:
        try:
            parse_hostport(self.bind)
        except ValueError as exc:
            raise FieldError("bind", str(exc)) from None
        if self.store.backend == "etcd" and not self.ca.sealing_key_file:
            raise FieldError(
                "ca.sealing_key_file",
                "the etcd store keeps the CA's root key, sealed with this key: set it to a"
                " file holding a 32-byte key (openssl rand -base64 32 > FILE; chmod 600 FILE)",
            )


# --- the generic loader -----------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number or duration"
    if tp is bool:
        return "true or false"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if dataclasses.is_dataclass(tp) or origin in (dict, Mapping):
        return "a table"
    return str(tp)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(arm, value, key)
            except FieldError as exc:
                errors.append(exc.reason)
        raise FieldError(key, "; ".join(errors))
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is float:
        try:
            return parse_duration(value)
        except (ValueError, TypeError) as exc:
            raise FieldError(key, str(exc)) from None
    if tp is str:
        if not isinstance(value, str):
            raise FieldError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise FieldError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise FieldError(key, f"expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise FieldError(key, f"expected a table, got {value!r}")
        _key_tp, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise FieldError(key, f"keys must be strings, got {k!r}")
            out[k] = _convert(val_tp, v, f"{key}.{k}")
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise FieldError(key, f"expected a table, got {value!r}")
        return _build(tp, value, key)
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in a dataclass, not input


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise FieldError(key, f"unknown key (known: {', '.join(sorted(fields))})")
        kwargs[name] = _convert(hints[name], value, key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise FieldError(key, "required key is missing")
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise FieldError(f"{prefix}.{exc.key}" if prefix else exc.key, exc.reason) from None


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str = "<config>") -> T:
    """Build the dataclass ``cls`` from a parsed TOML/JSON mapping.

    Raises:
        ConfigError: naming ``source``, the dotted key and the reason.
    """
    try:
        return _build(cls, data, "")
    except FieldError as exc:
        raise ConfigError(source, exc.key, exc.reason) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "", exc.strerror or str(exc)) from None
    if len(raw) > MAX_CONFIG_FILE:
        raise ConfigError(str(path), "", f"file is larger than {MAX_CONFIG_FILE} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "", f"not UTF-8: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"invalid TOML: {exc}") from None


def load_agent_config(path: str | Path | None) -> AgentConfig:
    """Load ``agent.toml``; ``None`` gives the defaults."""
    if path is None:
        return AgentConfig()
    data = _read_toml(Path(path))
    gossip = data.get("gossip")
    if isinstance(gossip, dict):
        profile = gossip.get("profile", "lan")
        if profile not in GOSSIP_PROFILES:
            raise ConfigError(
                str(path), "gossip.profile", f"expected one of {', '.join(GOSSIP_PROFILES)}"
            )
        data = {**data, "gossip": {**GOSSIP_PROFILES[profile], **gossip}}
    return from_mapping(AgentConfig, data, source=str(path))


def load_server_config(path: str | Path | None) -> ServerConfig:
    """Load ``server.toml``; ``None`` gives the defaults."""
    if path is None:
        return ServerConfig()
    return from_mapping(ServerConfig, _read_toml(Path(path)), source=str(path))


def load_service_file(path: str | Path) -> list[ServiceDefinition]:
    """Load a ``services.d`` file: one service at top level, or ``[[services]]``.

    Raises:
        ConfigError: the file, key and reason of the first problem.
    """
    data = _read_toml(Path(path))
    if "services" in data:
        if set(data) != {"services"} or not isinstance(data["services"], list):
            raise ConfigError(
                str(path), "services", "use either [[services]] tables or one top-level service"
            )
        out = []
        for i, item in enumerate(data["services"]):
            if not isinstance(item, Mapping):
                raise ConfigError(str(path), f"services[{i}]", f"expected a table, got {item!r}")
            try:
                out.append(_build(ServiceDefinition, item, f"services[{i}]"))
            except FieldError as exc:
                raise ConfigError(str(path), exc.key, exc.reason) from None
        return out
    return [from_mapping(ServiceDefinition, data, source=str(path))]


# At the end: the route config needs FieldError and SECONDS from this module.
from ._routes import TrafficPolicy  # noqa: E402

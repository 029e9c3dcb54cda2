"""Workload identity: which local service opened a connection to the proxy (127.0.0.1:4140)?

The kernel knows the uid that owns each TCP socket and prints it in
``/proc/net/tcp`` and ``/proc/net/tcp6`` (proc(5)). A connection accepted by
the proxy is the row whose *local* address is the client's (the peer the proxy
sees) and whose *remote* address is the proxy's listener; its uid is mapped to
the registered service whose ``user`` is that Unix user (DESIGN.md, Security).
A client no service claims is ``host:<node>``.

- :func:`parse_proc_net_tcp` is sans-IO: text in, rows out; malformed lines
  are skipped (a row that cannot be read names no one).
- :func:`uid_of` reads the two files (blocking file reads: run it in a thread
  from Trio) and finds the client's row.
- :class:`IdentityMap` maps uids to service names; :meth:`IdentityMap.identify`
  is what the proxy calls once per accepted connection. Its answer is the
  connection's identity for the connection's life: the proxy keeps it with
  the connection. There is deliberately no cache keyed by address: after a
  connection closes, another user may get the same client port.
"""

from __future__ import annotations

import ipaddress
import pwd
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hostmesh._config import ServiceDefinition

__all__ = [
    "PROC_NET_TCP",
    "Identity",
    "IdentityMap",
    "SocketRow",
    "find_uid",
    "parse_proc_net_tcp",
    "uid_of",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The kernel's socket tables, IPv4 then IPv6 (a v4 client of a dual-stack
#: listener is a row in tcp; a v6 client in tcp6).
PROC_NET_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
#: TCP states (include/net/tcp_states.h) whose rows never own a live client socket:
#: TIME_WAIT rows carry uid 0 and inode 0; LISTEN sockets are not connections.
_TCP_TIME_WAIT = 0x06
_TCP_LISTEN = 0x0A
#: Longest line we read; a real row is under 200 characters.
MAX_LINE = 512
#: Largest table we read (16 MiB: ~100k sockets); a bigger file is read no further.
MAX_TABLE = 16 * 1024 * 1024


@dataclass(frozen=True)
class SocketRow:
    """One socket of /proc/net/tcp{,6}. IPv4-mapped IPv6 addresses are kept as IPv4."""

    local: tuple[IPAddress, int]
    remote: tuple[IPAddress, int]
    state: int
    uid: int
    inode: int


def _address(field_: str) -> tuple[IPAddress, int]:
    """``0100007F:1F90`` -> (127.0.0.1, 8080). The kernel prints each 32-bit word of the
    address as a host-order integer in hex (so 127.0.0.1 is 0100007F on little-endian)."""
    host, sep, port_hex = field_.partition(":")
    if not sep or len(port_hex) != 4 or len(host) not in (8, 32):
        raise ValueError(field_)
    packed = b"".join(
        int(host[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(host), 8)
    )
    addr: IPAddress = ipaddress.ip_address(packed)
    return _plain(addr), int(port_hex, 16)


def _hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)


def _plain(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_proc_net_tcp(text: str) -> list[SocketRow]:
    """The rows of a /proc/net/tcp or /proc/net/tcp6 text (header and bad lines skipped).

    Fields (proc(5)): ``sl local_address rem_address st tx:rx tr:when retrnsmt uid
    timeout inode ...``.
    """
    rows = []
    for line in text.splitlines():
        if len(line) > MAX_LINE:
            continue
        parts = line.split()
        if len(parts) < 10 or not parts[0].endswith(":") or not parts[0][:-1].isdigit():
            continue  # the header, or not a row
        local, remote, state, uid, inode = parts[1], parts[2], parts[3], parts[7], parts[9]
        if not all(_hex(f.replace(":", "", 1)) for f in (local, remote)) or not _hex(state):
            continue
        if not (uid.isascii() and uid.isdigit() and inode.isascii() and inode.isdigit()):
            continue
        try:
            row = SocketRow(_address(local), _address(remote), int(state, 16), int(uid),
                            int(inode))  # fmt: skip
        except ValueError:
            continue
        rows.append(row)
    return rows


def find_uid(
    rows: Iterable[SocketRow], client: tuple[IPAddress, int], server: tuple[IPAddress, int]
) -> int | None:
    """The uid owning the client socket ``client`` -> ``server``; None if no live row."""
    for row in rows:
        if row.state in (_TCP_TIME_WAIT, _TCP_LISTEN) or row.inode == 0:
            continue
        if row.local == client and row.remote == server:
            return row.uid
    return None


def _endpoint(addr: str, port: int) -> tuple[IPAddress, int]:
    host = addr.split("%", 1)[0]  # a scope id (fe80::1%eth0) is not in /proc
    return _plain(ipaddress.ip_address(host)), port


def _read(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return f.read(MAX_TABLE).decode("ascii", "replace")
    except OSError:
        return ""  # no IPv6 in this kernel, or no /proc: nothing found there


def uid_of(
    peer_addr: str,
    peer_port: int,
    local_addr: str,
    local_port: int,
    *,
    tables: Iterable[Path] = PROC_NET_TCP,
) -> int | None:
    """The uid of the process that owns the client socket of an accepted connection.

    Args:
        peer_addr, peer_port: the client, as the accepted socket's peer.
        local_addr, local_port: the proxy's end (the accepted socket's local address).
        tables: the files to read (tests may pass their own).

    Returns:
        The uid, or None if no table holds the client's socket (a connection from
        another host, a client already gone, an unparsable address).
    """
    try:
        client = _endpoint(peer_addr, peer_port)
        server = _endpoint(local_addr, local_port)
    except ValueError:
        return None
    for path in tables:
        uid = find_uid(parse_proc_net_tcp(_read(path)), client, server)
        if uid is not None:
            return uid
    return None


def _uid_of_user(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


@dataclass(frozen=True)
class Identity:
    """Who a connection is: ``service`` (or ``host:<node>``) and the socket's uid."""

    name: str
    uid: int | None  # None: the client's socket was not found
    service: bool  # True if ``name`` is a registered service


@dataclass(frozen=True)
class IdentityMap:
    """uid -> local service name, from the registered services' ``user`` field.

    Build a new one when the registrations change (:meth:`from_services`).
    A user that runs two differently named services identifies neither: the
    connection cannot tell them apart, so it gets the host identity; such users
    are in ``ambiguous`` for a warning. Users unknown to the system are in
    ``unknown_users``.
    """

    node: str
    by_uid: dict[int, str] = field(default_factory=dict)
    ambiguous: frozenset[str] = frozenset()
    unknown_users: frozenset[str] = frozenset()

    @classmethod
    def from_services(
        cls,
        services: Iterable[ServiceDefinition],
        node: str,
        *,
        uid_of_user: Callable[[str], int] = _uid_of_user,
    ) -> IdentityMap:
        names: dict[int, set[str]] = {}
        users: dict[int, str] = {}
        unknown = set()
        for service in services:
            if not service.user:
                continue
            try:
                uid = uid_of_user(service.user)
            except (KeyError, ValueError):
                unknown.add(service.user)
                continue
            names.setdefault(uid, set()).add(service.name)
            users[uid] = service.user
        by_uid = {uid: next(iter(n)) for uid, n in names.items() if len(n) == 1}
        ambiguous = frozenset(users[uid] for uid, n in names.items() if len(n) > 1)
        return cls(node, by_uid, ambiguous, frozenset(unknown))

    @property
    def host_identity(self) -> str:
        return f"host:{self.node}"

    def name_of(self, uid: int | None) -> Identity:
        """The identity of a socket owned by ``uid`` (None: not found)."""
        if uid is not None and uid in self.by_uid:
            return Identity(self.by_uid[uid], uid, True)
        return Identity(self.host_identity, uid, False)

    def identify(
        self,
        peer: tuple[str, int],
        local: tuple[str, int],
        *,
        tables: Iterable[Path] = PROC_NET_TCP,
    ) -> Identity:
        """The identity of one accepted connection: call once, when accepted.

        Args:
            peer: the accepted socket's peer address (the client), ``(host, port)``;
                an IPv6 socket's 4-tuple may be passed as its first two items.
            local: the accepted socket's own address (the proxy's listener).
        """
        uid = uid_of(peer[0], peer[1], local[0], local[1], tables=tables)
        return self.name_of(uid)

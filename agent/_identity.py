"""Workload identity: which local service opened a connection to the proxy (127.0.0.1:4140)?

The kernel knows the uid that owns each TCP socket and prints it in
``/proc/net/tcp`` and ``/proc/net/tcp6`` (proc(5)). A connection accepted by
the proxy is the row whose *local* address is the client's (the peer the proxy
sees) and whose *remote* address is the proxy's listener; its uid is mapped to
the registered service whose ``user`` is that Unix user (DESIGN.md, Security).
A client no service claims is ``host:<node>``.

- :func:`parse_proc_net_tcp` is sans-IO: text in, rows out; malformed lines
  are skipped (a row that cannot be read names no one).
- :func:`uid_by_sock_diag` asks the kernel for the one socket over netlink
  (``NETLINK_SOCK_DIAG``, as ``ss`` does): ~30 us whatever the number of
  sockets, where the kernel prints every socket into /proc/net/tcp (~5 ms
  with a few hundred). :func:`uid_of` uses it and falls back to reading the two
  files (blocking reads: run it in a thread from Trio) where netlink is not
  available; :meth:`IdentityMap.identify_now` is the netlink-only, non-blocking
  path the proxy tries first.
- :class:`IdentityMap` maps uids to service names; :meth:`IdentityMap.identify`
  is what the proxy calls once per accepted connection. Its answer is the
  connection's identity for the connection's life: the proxy keeps it with
  the connection. There is deliberately no cache keyed by address: after a
  connection closes, another user may get the same client port.
"""

from __future__ import annotations

import errno
import ipaddress
import pwd
import socket
import struct
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
    "uid_by_sock_diag",
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
    netlink: bool = True,
) -> int | None:
    """The uid of the process that owns the client socket of an accepted connection.

    Asks the kernel for that one socket (netlink sock_diag) and falls back to
    reading the /proc tables where netlink is not available.

    Args:
        peer_addr, peer_port: the client, as the accepted socket's peer.
        local_addr, local_port: the proxy's end (the accepted socket's local address).
        tables: the files to read (tests may pass their own).
        netlink: try sock_diag first (False: the tables only).

    Returns:
        The uid, or None if no table holds the client's socket (a connection from
        another host, a client already gone, an unparsable address).
    """
    try:
        client = _endpoint(peer_addr, peer_port)
        server = _endpoint(local_addr, local_port)
    except ValueError:
        return None
    if netlink:
        try:
            return uid_by_sock_diag(client, server)
        except OSError:
            pass  # no sock_diag here: the tables
    # Only rows naming the client's port can match: pick them out with a substring
    # test first, so that a host with many sockets costs the kernel's read, not a
    # parse of each row.
    port = f":{client[1]:04X} "
    for path in tables:
        text = _read(path)
        rows = parse_proc_net_tcp("\n".join(line for line in text.splitlines() if port in line))
        uid = find_uid(rows, client, server)
        if uid is not None:
            return uid
    return None


#: Netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h): one exact-match
#: lookup of a TCP socket by its 4-tuple, what ``ss`` uses.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# family, protocol, ext, pad, states; then the socket id: sport, dport (big-endian),
# src[16], dst[16] (network order), interface, cookie
_DIAG_HEAD = struct.Struct("=BBBxI")
_DIAG_PORTS = struct.Struct(">HH")
_DIAG_TAIL = struct.Struct("=16s16sI8s")
_DIAG_UID_AT = _NLMSG_HDR.size + 4 + 48 + 12  # inet_diag_msg: ..., expires, rqueue, wqueue, uid
_NO_COOKIE = b"\xff" * 8  # INET_DIAG_NOCOOKIE: match by address alone
_LIVE_STATES = 0xFFF & ~(1 << _TCP_TIME_WAIT) & ~(1 << _TCP_LISTEN)


def uid_by_sock_diag(
    client: tuple[IPAddress, int], server: tuple[IPAddress, int], *, timeout: float = 0.5
) -> int | None:
    """The uid of the socket ``client`` -> ``server``, asked of the kernel directly.

    One netlink request answered by one message: tens of microseconds
    whatever the number of sockets on the host, where /proc/net/tcp prints
    every socket. Returns None when the kernel has no such live socket.

    Raises:
        OSError: no netlink sock_diag here (not Linux, a sandbox that forbids
            AF_NETLINK, an old kernel): use :func:`uid_of`'s /proc tables.
    """
    (caddr, cport), (saddr, sport) = client, server
    if caddr.version != saddr.version:
        return None
    family = socket.AF_INET if caddr.version == 4 else socket.AF_INET6
    req = (
        _DIAG_HEAD.pack(family, socket.IPPROTO_TCP, 0, _LIVE_STATES)
        + _DIAG_PORTS.pack(cport, sport)
        + _DIAG_TAIL.pack(caddr.packed.ljust(16, b"\0"), saddr.packed.ljust(16, b"\0"), 0,
                          _NO_COOKIE)
    )  # fmt: skip
    msg = _NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                          1, 0) + req  # fmt: skip
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    try:
        nl.settimeout(timeout)
        nl.sendto(msg, (0, 0))
        reply = nl.recv(8192)
    finally:
        nl.close()
    if len(reply) < _NLMSG_HDR.size:
        raise OSError("short sock_diag reply")
    _length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        (errno_,) = struct.unpack_from("=i", reply, _NLMSG_HDR.size)
        if -errno_ in (errno.ENOENT, 0):
            return None  # no such socket (the client is gone, or not on this host)
        raise OSError(-errno_, "sock_diag refused the lookup")
    if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < _DIAG_UID_AT + 8:
        raise OSError("unexpected sock_diag reply")
    uid, inode = struct.unpack_from("=II", reply, _DIAG_UID_AT)
    return None if inode == 0 else int(uid)  # no inode: orphaned, its process has closed it


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

    def identify_now(self, peer: tuple[str, int], local: tuple[str, int]) -> Identity | None:
        """:meth:`identify` by sock_diag alone: never blocks, so an event loop may call
        it. None when netlink is not available here (then :meth:`identify` in a thread)."""
        try:
            client, server = _endpoint(*peer[:2]), _endpoint(*local[:2])
        except ValueError:
            return self.name_of(None)
        try:
            return self.name_of(uid_by_sock_diag(client, server))
        except OSError:
            return None

    def identify(
        self,
        peer: tuple[str, int],
        local: tuple[str, int],
        *,
        tables: Iterable[Path] = PROC_NET_TCP,
        netlink: bool = True,
    ) -> Identity:
        """The identity of one accepted connection: call once, when accepted.

        Args:
            peer: the accepted socket's peer address (the client), ``(host, port)``;
                an IPv6 socket's 4-tuple may be passed as its first two items.
            local: the accepted socket's own address (the proxy's listener).
        """
        uid = uid_of(peer[0], peer[1], local[0], local[1], tables=tables, netlink=netlink)
        return self.name_of(uid)

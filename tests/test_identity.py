"""Workload identity: /proc/net/tcp{,6} rows, the client socket's uid, uid -> service."""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hostmesh._config import ServiceDefinition
from hostmesh.agent._identity import (
    IdentityMap,
    SocketRow,
    find_uid,
    parse_proc_net_tcp,
    uid_of,
)

# Real lines, as Linux on a little-endian CPU (x86-64, arm64) prints them (proc(5)).
HEADER4 = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode"
)
# 127.0.0.1:43856 -> 127.0.0.1:4140, ESTABLISHED, uid 1000
V4_CLIENT = (
    "   1: 0100007F:AB50 0100007F:102C 01 00000000:00000000 00:00000000 00000000"
    "  1000        0 81234 1 00000000ae0fb4c0 20 4 30 10 -1"
)
# 0.0.0.0:2024 LISTEN, root
V4_LISTEN = (
    "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
    "     0        0 1603 1 00000000b9ed48e0 100 0 0 10 0"
)
# The same 4-tuple in TIME_WAIT: uid 0, inode 0
V4_TIME_WAIT = (
    "   2: 0100007F:AB50 0100007F:102C 06 00000000:00000000 03:00000B98 00000000"
    "     0        0 0 3 00000000ae0fb4c0"
)
HEADER6 = (
    "  sl  local_address                         remote_address                        st"
    " tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
)
# [::1]:50000 -> [::1]:4140, ESTABLISHED, uid 65534
V6_CLIENT = (
    "   0: 00000000000000000000000001000000:C350 00000000000000000000000001000000:102C 01"
    " 00000000:00000000 00:00000000 00000000 65534        0 99881 1 0000000000000000"
    " 20 4 30 10 -1"
)
# [::ffff:127.0.0.1]:50001 -> [::ffff:127.0.0.1]:4140 (a v6 socket talking IPv4), uid 33
V6_MAPPED = (
    "   1: 0000000000000000FFFF00000100007F:C351 0000000000000000FFFF00000100007F:102C 01"
    " 00000000:00000000 00:00000000 00000000    33        0 99882 1 0000000000000000"
    " 20 4 30 10 -1"
)
LOOP4 = ipaddress.IPv4Address("127.0.0.1")
LOOP6 = ipaddress.IPv6Address("::1")


def test_ipv4_rows_are_parsed() -> None:
    rows = parse_proc_net_tcp("\n".join([HEADER4, V4_LISTEN, V4_CLIENT]))
    assert rows == [
        SocketRow((ipaddress.IPv4Address("0.0.0.0"), 2024), (ipaddress.IPv4Address("0.0.0.0"), 0),
                  0x0A, 0, 1603),
        SocketRow((LOOP4, 43856), (LOOP4, 4140), 0x01, 1000, 81234),
    ]  # fmt: skip


def test_ipv6_and_v4_mapped_rows_are_parsed() -> None:
    rows = parse_proc_net_tcp("\n".join([HEADER6, V6_CLIENT, V6_MAPPED]))
    assert rows[0] == SocketRow((LOOP6, 50000), (LOOP6, 4140), 0x01, 65534, 99881)
    # The mapped address is kept as the IPv4 address it carries.
    assert rows[1].local == (LOOP4, 50001) and rows[1].remote == (LOOP4, 4140)
    assert rows[1].uid == 33


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage",
        V4_CLIENT.replace("0100007F:AB50", "0100007G:AB50"),  # not hex
        V4_CLIENT.replace("0100007F:AB50", "0100007F"),  # no port
        V4_CLIENT.replace("0100007F:AB50", "100007F:AB50"),  # 7 digits
        V4_CLIENT.replace("0100007F:AB50", "0100007F:AB5"),  # 3-digit port
        V4_CLIENT.replace("  1000  ", " -1000  "),  # negative uid
        V4_CLIENT.replace("  1000  ", "  1e3   "),
        V4_CLIENT.replace(" 81234 ", " 8x234 "),
        V4_CLIENT.replace("   1:", "   x:"),
        " ".join(V4_CLIENT.split()[:8]),  # truncated
        V4_CLIENT + " " + "A" * 600,  # too long
        V6_CLIENT.replace("01000000:C350", "0100000:C350"),  # 31 digits
        V4_CLIENT.replace("0100007F:AB50", "0100007F:AB50:1"),
        "\x00" * 40,
        V4_CLIENT.replace("  1000  ", "  \u0661\u0660\u0660\u0660  "),  # Arabic-Indic digits
        V4_CLIENT.replace("0100007F:AB50", "\u0660100007F:AB50"),
    ],
)
def test_malformed_lines_are_skipped_and_the_rest_read(line: str) -> None:
    rows = parse_proc_net_tcp("\n".join([HEADER4, line, V4_LISTEN]))
    assert [r.inode for r in rows] == [1603]


def test_the_client_row_is_the_one_from_client_to_listener() -> None:
    rows = parse_proc_net_tcp("\n".join([HEADER4, V4_LISTEN, V4_TIME_WAIT, V4_CLIENT]))
    assert find_uid(rows, (LOOP4, 43856), (LOOP4, 4140)) == 1000
    # The opposite direction is the proxy's own accepted socket, not the client's.
    assert find_uid(rows, (LOOP4, 4140), (LOOP4, 43856)) is None
    # Only the TIME_WAIT row left: nobody owns that socket.
    only_tw = parse_proc_net_tcp(V4_TIME_WAIT)
    assert find_uid(only_tw, (LOOP4, 43856), (LOOP4, 4140)) is None


def test_uid_of_reads_the_tables_and_accepts_mapped_and_scoped_addresses(tmp_path: Path) -> None:
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text("\n".join([HEADER4, V4_CLIENT]) + "\n")
    tcp6.write_text("\n".join([HEADER6, V6_CLIENT, V6_MAPPED]) + "\n")
    tables = (tcp, tcp6)

    def lookup(*args: Any, tables: tuple[Path, ...] = tables) -> int | None:
        return uid_of(*args, tables=tables, netlink=False)  # the files, not the kernel

    assert lookup("127.0.0.1", 43856, "127.0.0.1", 4140) == 1000
    # A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.1.
    assert lookup("::ffff:127.0.0.1", 43856, "::ffff:127.0.0.1", 4140) == 1000
    assert lookup("::1", 50000, "::1", 4140) == 65534
    assert lookup("127.0.0.1", 50001, "127.0.0.1", 4140) == 33
    assert lookup("127.0.0.1", 1, "127.0.0.1", 4140) is None
    assert lookup("not an address", 1, "127.0.0.1", 4140) is None
    missing = (tmp_path / "nope", tcp6)
    assert lookup("::1", 50000, "::1", 4140, tables=missing) == 65534


def _svc(name: str, user: str, ident: str = "") -> ServiceDefinition:
    return ServiceDefinition(name=name, id=ident, user=user)


def test_the_map_names_the_service_of_a_user_else_the_host() -> None:
    uids = {"web": 1001, "db": 1002, "shared": 1003}

    def lookup(user: str) -> int:
        return uids[user]

    services = [
        _svc("web", "web", "web-1"),
        _svc("web", "web", "web-2"),  # two instances of one service: still web
        _svc("db", "db"),
        _svc("a", "shared"),
        _svc("b", "shared"),  # one user, two services: neither
        _svc("ghost", "nosuchuser"),
        _svc("anyone", ""),  # no user: claims nothing
    ]
    m = IdentityMap.from_services(services, "node-a", uid_of_user=lookup)
    assert m.name_of(1001).name == "web" and m.name_of(1001).service
    assert m.name_of(1002).name == "db"
    assert m.name_of(1003).name == "host:node-a" and not m.name_of(1003).service
    assert m.name_of(None).name == "host:node-a"
    assert m.name_of(4242).name == "host:node-a"
    assert m.ambiguous == {"shared"}
    assert m.unknown_users == {"nosuchuser"}


# --- real sockets ---------------------------------------------------------------------


@contextmanager
def _listener(family: socket.AddressFamily, host: str) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, 0))
        sock.listen(8)
        sock.settimeout(10)
        yield sock
    finally:
        sock.close()


@contextmanager
def _client_as_nobody(host: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A bash run as nobody (uid 65534) holding a connection open until its stdin closes."""
    script = f"exec 3<>/dev/tcp/{host}/{port}; read -r _ ; exec 3>&-"
    proc = subprocess.Popen(["/bin/bash", "-c", script], user=65534, group=65534,
                            stdin=subprocess.PIPE, cwd="/")  # fmt: skip
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


@pytest.mark.sockets
@pytest.mark.parametrize(
    ("family", "bind", "connect"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # dual-stack: the peer is ::ffff:127.0.0.1
    ],
)
def test_a_connection_from_another_user_maps_to_that_users_service(
    family: socket.AddressFamily, bind: str, connect: str
) -> None:
    assert os.geteuid() == 0, "the test machine runs as root"
    nobody = pwd.getpwuid(65534).pw_name
    identities = IdentityMap.from_services([_svc("web", nobody), _svc("db", "root")], "node-a")
    only_web = IdentityMap.from_services([_svc("web", nobody)], "node-a")
    with _listener(family, bind) as lst:
        port = lst.getsockname()[1]
        with _client_as_nobody(connect, port):
            conn, peer = lst.accept()
            with conn:
                local = conn.getsockname()
                assert uid_of(peer[0], peer[1], local[0], local[1]) == 65534  # sock_diag
                assert uid_of(peer[0], peer[1], local[0], local[1], netlink=False) == 65534
                who = identities.identify(peer, local)
                assert (who.name, who.uid, who.service) == ("web", 65534, True)
        # The test's own connection: uid 0, root's service or the host.
        with socket.create_connection((connect, port), timeout=10) as mine:
            conn, peer = lst.accept()
            with conn:
                local = conn.getsockname()
                assert identities.identify(peer, local).name == "db"
                who = only_web.identify(peer, local)
                assert (who.name, who.uid) == ("host:node-a", 0)
                assert mine.fileno() >= 0


@pytest.mark.sockets
def test_a_client_that_is_gone_is_the_host() -> None:
    identities = IdentityMap.from_services([_svc("web", "root")], "node-a")
    with _listener(socket.AF_INET, "127.0.0.1") as lst:
        port = lst.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn, peer = lst.accept()
        with conn:
            client.close()  # the client side goes to FIN_WAIT/TIME_WAIT, uid 0, inode 0
            local = conn.getsockname()
            conn.recv(1)
            conn.close()
            who = identities.identify(peer, local)
            assert who.name == "host:node-a" and who.uid is None
            tables_only = identities.identify(peer, local, netlink=False)
            assert tables_only.name == "host:node-a" and tables_only.uid is None

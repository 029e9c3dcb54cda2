#!/usr/bin/env python3
"""The least a proxied request can cost in CPython on this machine: a bare epoll relay.

    python bench/floor_proxy.py PORT BACKEND_PORT

No Trio, no routing, no validation, no metrics: one epoll loop that reads a
request head from a client, sends it on an idle keep-alive connection to
``127.0.0.1:BACKEND_PORT`` (opened when none is idle), reads a
``Content-Length`` response and writes it back. Requests without a body and
responses with Content-Length only; anything else breaks it. ``bench/proxy.py``
runs it beside hostmesh, nginx and HAProxy: its distance to nginx is what
CPython's per-request cost allows at all, and hostmesh's distance to it is
the price of what hostmesh does per request. Loopback only; runs until killed.
"""

from __future__ import annotations

import select
import socket
import sys


class _Conn:
    __slots__ = ("buf", "client", "sock", "upstream")

    def __init__(self, sock: socket.socket, *, upstream: bool) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buf = b""
        self.upstream = upstream
        self.client: _Conn | None = None  # upstream: the client its response goes to


def main() -> int:
    port, backend = int(sys.argv[1]), int(sys.argv[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, _Conn] = {}
    idle: list[_Conn] = []

    def add(conn: _Conn) -> _Conn:
        conns[conn.sock.fileno()] = conn
        ep.register(conn.sock.fileno(), select.EPOLLIN)
        return conn

    def close(conn: _Conn) -> None:
        if conn in idle:
            idle.remove(conn)
        if conn.sock.fileno() in conns:
            del conns[conn.sock.fileno()]
            ep.unregister(conn.sock.fileno())
        conn.sock.close()

    while True:
        for fd, _ in ep.poll():
            if fd == listener.fileno():
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    add(_Conn(sock, upstream=False))
                continue
            conn = conns.get(fd)
            if conn is None:
                continue  # closed earlier in this batch
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:  # reset: as good as closed
                data = b""
            if not data:
                close(conn)
                if conn.client is not None:
                    close(conn.client)  # its upstream went away mid-response
                continue
            buf = conn.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                conn.buf = buf
                continue
            if not conn.upstream:
                conn.buf = buf[end + 4 :]
                while True:
                    if idle:
                        up = idle.pop()
                    else:
                        up = add(
                            _Conn(socket.create_connection(("127.0.0.1", backend)), upstream=True)
                        )
                    try:
                        up.sock.send(buf[: end + 4])
                    except OSError:  # closed while idle
                        close(up)
                        continue
                    up.client = conn
                    break
                continue
            at = buf.lower().find(b"content-length:", 0, end)
            length = int(buf[at + 15 : buf.find(b"\r\n", at)])
            if len(buf) < end + 4 + length:
                conn.buf = buf
                continue
            conn.buf = buf[end + 4 + length :]
            client, conn.client = conn.client, None
            idle.append(conn)
            if client is not None:
                try:
                    client.sock.send(buf[: end + 4 + length])
                except OSError:
                    close(client)


if __name__ == "__main__":
    sys.exit(main())

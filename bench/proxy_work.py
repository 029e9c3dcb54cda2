#!/usr/bin/env python3
"""CPU instructions per proxied request, counted by valgrind: the proxy's work, free of VM noise.

    python bench/proxy_work.py [--requests N]

On a shared VM the same build's requests per second move by half from one
minute to the next, so small changes to the request path cannot be judged
by timing. Instructions executed are deterministic. This runs the real
:class:`~hostmesh.agent._proxy.Proxy` (its connection loop, deadlines,
routing, balancer and metrics) between a client and a backend in the same
process, over loopback sockets, under ``valgrind --tool=cachegrind``; twice
with N and 2N requests through the proxy and twice with the client talking
to the backend directly, so that start-up and the client's and backend's
own work cancel out. It prints user-space instructions per request (the
kernel's share of a request is not counted). Not a speed goal: bench/proxy.py
measures those against nginx and HAProxy. Needs valgrind; loopback only.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys

C = 16  # client connections
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 15:58:35 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\n"
            b"Connection: keep-alive\r\n\r\nok\n")  # fmt: skip
REQUEST = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"


def run(count: int, direct: bool) -> None:
    """The measured process: ``count`` requests, through the proxy unless ``direct``."""
    import trio

    from hostmesh import ProxyConfig
    from hostmesh._metrics import Registry
    from hostmesh.agent._proxy import Proxy
    from hostmesh.agent._routing import Router, build_snapshot
    from hostmesh.catalog import Catalog, Node, NodeRecord, ServiceInstance

    async def backend_conn(s: trio.socket.SocketType) -> None:
        buf = b""
        while data := await s.recv(65536):
            buf += data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                await s.send(RESPONSE)

    async def backend(listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            s, _ = await listener.accept()
            nursery.start_soon(backend_conn, s)

    async def client(addr: tuple[str, int], n: int) -> None:
        s = trio.socket.socket()
        await s.connect(addr)
        for _ in range(n):
            await s.send(REQUEST)
            got = b""
            while not got.endswith(b"ok\n"):
                got += await s.recv(65536)
        s.close()

    async def main() -> None:
        bl = trio.socket.socket()
        await bl.bind(("127.0.0.1", 0))
        bl.listen(128)
        port = bl.getsockname()[1]
        catalog = Catalog()
        catalog.merge(NodeRecord(Node("bench", "127.0.0.1", az="bench-1a"), generation=1,
                                 version=1, services=(ServiceInstance("backend", "backend",
                                                      "127.0.0.1", port, (), {}),)))  # fmt: skip
        router = Router(Registry())
        router.update(build_snapshot(catalog, {}, "bench-1a"))
        proxy = Proxy(ProxyConfig(), router)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend, bl, nursery)
            addr = await nursery.start(proxy.serve, listener)
            async with trio.open_nursery() as clients:
                for _ in range(C):
                    clients.start_soon(client, ("127.0.0.1", port) if direct else addr, count // C)
            nursery.cancel_scope.cancel()

    trio.run(main)


def instructions(count: int, direct: bool) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")  # the same dict layouts in every run
    done = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, __file__, "--child", str(count), *(["--direct"] if direct else [])],
        capture_output=True, text=True, env=env, timeout=1800, check=True,
    )  # fmt: skip
    m = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if m is None:
        raise SystemExit(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(m.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="N (multiple of 16)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run(args.child, args.direct)
        return 0
    n = args.requests
    proxied = (instructions(2 * n, False) - instructions(n, False)) / n
    direct = (instructions(2 * n, True) - instructions(n, True)) / n
    print(f"client and backend alone: {direct:,.0f} instructions per request")
    version = sys.version.split()[0]
    print(f"hostmesh proxy: {proxied - direct:,.0f} instructions per request (user space, "
          f"python {version}, {n} and {2 * n} requests over {C} connections)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

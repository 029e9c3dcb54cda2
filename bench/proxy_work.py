#!/usr/bin/env python3
"""CPU instructions per proxied request, counted by valgrind: the proxy's work, free of VM noise.

    python bench/proxy_work.py [--requests N]

On a shared VM the same build's requests per second move by half from one
minute to the next, so small changes to the request path cannot be judged
by timing. Instructions executed are deterministic. This runs the real
:class:`~hostmesh.agent._proxy.Proxy` (its connection loop, deadlines,
routing, balancer and metrics) alone in a process under ``valgrind
--tool=cachegrind``, and a backend and 16 keep-alive clients in another
process (not under valgrind), over loopback sockets; twice, with N and 2N
requests, so that start-up and shutdown cancel out. It prints the proxy
process's user-space instructions per request (the kernel's share of a
request is not counted).

The clients are in their own process, as wrk is in bench/proxy.py: the
proxy, slowed by valgrind, then finds every connection ready at each poll,
as a saturated proxy does. A client in the proxy's own Trio run made it poll
after every request or two, and counted Trio's work per batch (about a
seventh of the total) several times too often. For the same reason the
proxy's batch time (:data:`~hostmesh.agent._loop.BATCH_TIME`) is stretched
by valgrind's slowdown: else a batch ends after four steps.

Not a speed goal: bench/proxy.py measures those against nginx and HAProxy.
Needs valgrind; loopback only.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from typing import IO

C = 16  # client connections
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 15:58:35 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\n"
            b"Connection: keep-alive\r\n\r\nok\n")  # fmt: skip
REQUEST = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
#: About how much slower valgrind runs the proxy: its batch time is stretched by this.
VALGRIND_SLOWDOWN = 50
TIMEOUT = 1800.0  # s for one measured run


def peer(count: int) -> None:
    """The backend and the clients: prints the backend's port, reads the proxy's from
    stdin, sends ``count`` requests through it over :data:`C` connections."""
    import trio

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
        print(bl.getsockname()[1], flush=True)
        port = int(await trio.to_thread.run_sync(sys.stdin.readline))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend, bl, nursery)
            async with trio.open_nursery() as clients:
                for _ in range(C):
                    clients.start_soon(client, ("127.0.0.1", port), count // C)
            nursery.cancel_scope.cancel()

    trio.run(main)


def proxy(backend_port: int) -> None:
    """The measured process: a proxy to the backend; prints its port, runs until a line
    arrives on stdin."""
    import trio

    from hostmesh import ProxyConfig
    from hostmesh._metrics import Registry
    from hostmesh.agent import _loop
    from hostmesh.agent._proxy import Proxy
    from hostmesh.agent._routing import Router, build_snapshot
    from hostmesh.catalog import Catalog, Node, NodeRecord, ServiceInstance

    _loop.BATCH_TIME *= VALGRIND_SLOWDOWN

    async def main() -> None:
        catalog = Catalog()
        catalog.merge(NodeRecord(Node("bench", "127.0.0.1", az="bench-1a"), generation=1,
                                 version=1, services=(ServiceInstance("backend", "backend",
                                 "127.0.0.1", backend_port, (), {}),)))  # fmt: skip
        router = Router(Registry())
        router.update(build_snapshot(catalog, {}, "bench-1a"))
        p = Proxy(ProxyConfig(), router)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(p.serve, listener)
            print(addr[1], flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            nursery.cancel_scope.cancel()

    trio.run(main)


def _line(stream: IO[str] | None) -> str:
    assert stream is not None
    return stream.readline().strip()


def instructions(count: int) -> int:
    """The proxy process's instructions over a run of ``count`` requests."""
    env = dict(os.environ, PYTHONHASHSEED="0")  # the same dict layouts in every run
    me = [sys.executable, __file__]
    with subprocess.Popen([*me, "--peer", str(count)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env) as clients:  # fmt: skip
        backend_port = _line(clients.stdout)
        with subprocess.Popen(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                               "--cachegrind-out-file=/dev/null", *me, "--proxy", backend_port],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) as measured:  # fmt: skip
            try:
                port = _line(measured.stdout)
                if not port:
                    raise SystemExit(f"the proxy did not start:\n{measured.communicate()[1]}")
                assert clients.stdin is not None
                clients.stdin.write(port + "\n")
                clients.stdin.flush()
                if clients.wait(timeout=TIMEOUT) != 0:
                    raise SystemExit("the clients failed (their error is above)")
                _, err = measured.communicate("stop\n", timeout=TIMEOUT)
            finally:
                measured.kill()
                clients.kill()
    m = re.search(r"I\s+refs:\s+([\d,]+)", err)
    if m is None:
        raise SystemExit(f"no instruction count from valgrind:\n{err[-2000:]}")
    return int(m.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="N (multiple of 16)")
    parser.add_argument("--peer", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--proxy", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer is not None:
        peer(args.peer)
        return 0
    if args.proxy is not None:
        proxy(args.proxy)
        return 0
    n = args.requests
    per_request = (instructions(2 * n) - instructions(n)) / n
    version = sys.version.split()[0]
    print(f"hostmesh proxy: {per_request:,.0f} instructions per request (user space, the "
          f"proxy process alone; python {version}, {n} and {2 * n} requests over {C} "
          "connections)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

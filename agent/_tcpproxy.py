"""TCP upstreams: a local listener per ``[[upstream]]`` that forwards each
connection to an instance of the service picked by the proxy's balancer.

``127.0.0.1:15432 -> postgres``: the connect is retried on other instances
(up to ``connect_attempts``), then bytes are copied both ways; a half-close
on one side is passed on to the other, and the connection ends when both
directions have finished.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import trio

from hostmesh._config import UpstreamConfig
from hostmesh._log import get_logger

from ._deadline import DeadlineExceeded
from ._http1 import HttpError
from ._pool import ConnectError, Stream
from ._proxy import Proxy, tunnel

__all__ = ["serve_tcp_upstream"]

_log = get_logger(__name__)


async def serve_tcp_upstream(
    listener: socket.socket,
    upstream: UpstreamConfig,
    proxy: Proxy,
    *,
    connect_timeout: float,
    clock: Callable[[], float] = time.monotonic,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listener`` (bound and listening; closed here). Never returns.

    Instances are picked by ``proxy``'s router and reached as the proxy reaches
    them: dialled, or through their node's agent over mTLS (the destination
    named before the stream starts), with the caller's identity and intentions.
    """
    listener.setblocking(False)
    router = proxy.router
    service = upstream.service
    stats = router.tcp_stats(service)

    async def handle(sock: socket.socket, addr: tuple[str, int]) -> None:
        client = Stream(sock)
        target: Stream | None = None
        dl = proxy.timer.deadline()
        try:
            source = await proxy.caller(sock, addr) if proxy.mesh is not None else ""
            allowed, why = proxy.decide(source, service)
            if not allowed:
                stats["denied"] += 1
                _log.info("tcp upstream: denied", service=service, source=source, reason=why)
                return
            tried: set[str] = set()
            for _ in range(upstream.connect_attempts):
                try:
                    state = router.tcp_route(service, clock())
                    endpoint = state.pick(tried, clock())
                except HttpError as exc:
                    stats["refused"] += 1
                    _log.warning("tcp upstream: no instance", service=service, reason=exc.reason)
                    return
                tried.add(endpoint.uid)
                t0 = clock()
                dl.after(connect_timeout)
                try:
                    target = await proxy.open_tcp(endpoint, service, source, dl)
                except HttpError as exc:  # the destination's intentions: not retried
                    stats["denied"] += 1
                    _log.info("tcp upstream: denied", service=service, instance=endpoint.id,
                              error=exc.detail)  # fmt: skip
                    return
                except (ConnectError, DeadlineExceeded) as exc:
                    state.finish(endpoint, False, clock() - t0, clock())
                    stats["connect_failures"] += 1
                    _log.info("tcp upstream: connect failed", service=service,
                              instance=endpoint.id, error=str(exc) or "timeout")  # fmt: skip
                    continue
                state.finish(endpoint, True, clock() - t0, clock())
                break
            if target is None:
                stats["refused"] += 1
                return
            stats["connections"] += 1
            dl.clear()
            await tunnel(client, target)
        finally:
            dl.close()
            client.close()
            if target is not None:
                target.close()

    try:
        async with trio.open_nursery() as nursery:
            task_status.started(listener.getsockname()[:2])
            while True:
                await trio.lowlevel.wait_readable(listener)
                while True:
                    try:
                        sock, peer = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        _log.warning("tcp upstream accept failed", error=exc)
                        await trio.sleep(0.1)
                        break
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    nursery.start_soon(handle, sock, peer)
    finally:
        listener.close()

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

from ._http1 import HttpError
from ._pool import ConnectError, Stream, connect
from ._proxy import tunnel
from ._routing import Router

__all__ = ["serve_tcp_upstream"]

_log = get_logger(__name__)


async def serve_tcp_upstream(
    listener: socket.socket,
    upstream: UpstreamConfig,
    router: Router,
    *,
    connect_timeout: float,
    clock: Callable[[], float] = time.monotonic,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listener`` (bound and listening; closed here). Never returns."""
    listener.setblocking(False)
    stats = router.tcp_stats(upstream.service)

    async def handle(sock: socket.socket) -> None:
        client = Stream(sock)
        target: Stream | None = None
        try:
            tried: set[str] = set()
            for _ in range(upstream.connect_attempts):
                try:
                    state = router.tcp_route(upstream.service, clock())
                    endpoint = state.pick(tried, clock())
                except HttpError as exc:
                    stats["refused"] += 1
                    _log.warning("tcp upstream: no instance", service=upstream.service,
                                 reason=exc.reason)  # fmt: skip
                    return
                tried.add(endpoint.id)
                t0 = clock()
                try:
                    with trio.fail_after(connect_timeout):
                        target = await connect(endpoint.host, endpoint.port)
                except (ConnectError, trio.TooSlowError) as exc:
                    state.finish(endpoint, False, clock() - t0, clock())
                    stats["connect_failures"] += 1
                    _log.info("tcp upstream: connect failed", service=upstream.service,
                              instance=endpoint.id, error=str(exc) or "timeout")  # fmt: skip
                    continue
                state.finish(endpoint, True, clock() - t0, clock())
                break
            if target is None:
                stats["refused"] += 1
                return
            stats["connections"] += 1
            await tunnel(client, target)
        finally:
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
                        sock, _peer = listener.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        _log.warning("tcp upstream accept failed", error=exc)
                        await trio.sleep(0.1)
                        break
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    nursery.start_soon(handle, sock)
    finally:
        listener.close()

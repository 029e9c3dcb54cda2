"""The server's listener on :4150: TLS 1.3, then HTTP or the agents' sync websocket.

Every connection is TLS. Client certificates are optional at the TLS level
(a joining agent has none yet); when one is sent, OpenSSL verifies its chain
in the handshake and :func:`~hostmesh._tls.check_peer` its node identity and
the revocation list afterwards. The first request's head is read (bounded)
to route the connection:

- ``GET /v1/sync`` with ``Upgrade: websocket`` goes to the sync handler, with
  the bytes already read replayed in front of the stream (``_Replay``), so
  trio-websocket parses the handshake itself;
- everything else is HTTP/1.1 for ``Server.handle`` through
  :func:`hostmesh._httpserver.serve_connection`, with the verified identity
  on ``Request.peer_identity``.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from hostmesh._errors import CertificateError, PeerCertificateError
from hostmesh._httpserver import MAX_HEADER_BYTES, RECV_SIZE, Handler, HttpLimits, serve_connection
from hostmesh._log import get_logger
from hostmesh._metrics import Registry
from hostmesh._pki import NodeIdentity, RevocationList
from hostmesh._tls import check_peer, peer_certificate, server_context

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_SYNC_CONNECTIONS",
    "SYNC_PATH",
    "ServerTls",
    "SyncHandler",
    "is_sync_upgrade",
    "listener_context",
    "serve_tls",
    "server_name",
]

log = get_logger("hostmesh.server.listener")

#: The websocket endpoint agents sync on.
SYNC_PATH = "/v1/sync"
#: s for a client to finish the TLS handshake (a LAN handshake takes ms; a
#: slow or silent client must not hold a connection slot).
HANDSHAKE_TIMEOUT = 10.0
#: Concurrent sync websockets per server: above the 10,000 agents of
#: REFERENCE.md's Consul scale on one server (when the others are down).
MAX_SYNC_CONNECTIONS = 16_384

#: ``(stream, identity, peer, serial)``: the verified node identity and the serial of its
#: certificate (to drop the session if it is revoked later), None without one.
SyncHandler = Callable[[trio.abc.Stream, "NodeIdentity | None", str, "int | None"], Awaitable[None]]


def listener_context(chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    """The server's TLS context: :func:`~hostmesh._tls.server_context` with client
    certificates optional (a joining agent has none yet).

    Raises:
        CertificateError: the certificate, key or roots do not load.
    """
    ctx = server_context(chain_pem, key_pem, roots_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


@dataclass(frozen=True)
class ServerTls:
    """What the listener needs: its context and the mesh (trust domain) of client identities."""

    context: ssl.SSLContext
    mesh: str


class _Replay(trio.abc.Stream):
    """A stream that first returns ``head`` (bytes already read from ``inner``)."""

    def __init__(self, inner: trio.abc.Stream, head: bytes) -> None:
        self._inner = inner
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._head:
            n = len(self._head) if max_bytes is None else max_bytes
            out, self._head = self._head[:n], self._head[n:]
            await trio.lowlevel.checkpoint()
            return out
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _read_head(stream: trio.abc.Stream) -> bytes:
    """Bytes up to the end of the first request head (or all there were, at EOF/limit)."""
    data = bytearray()
    while b"\r\n\r\n" not in data and len(data) <= MAX_HEADER_BYTES:
        chunk = await stream.receive_some(RECV_SIZE)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def is_sync_upgrade(head: bytes) -> bool:
    """The head is ``GET /v1/sync[?...]`` asking for a websocket upgrade."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    if parts[1].split(b"?", 1)[0].decode("latin-1") != SYNC_PATH:
        return False
    for header in rest.split(b"\r\n"):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


async def serve_tls(
    http_handler: Handler,
    sync_handler: SyncHandler,
    host: str,
    port: int,
    *,
    tls: Callable[[], ServerTls],
    revocations: Callable[[], RevocationList | None],
    limits: HttpLimits | None = None,
    metrics: Registry | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve TLS on ``host:port`` until cancelled; reports the bound address.

    Args:
        tls: the current context (called per connection, so a renewed server
            certificate or a new CA bundle applies to new connections only).
        revocations: the current revocation list for client certificates.
        sync_handler: called as ``(stream, identity, peer, serial)`` for a sync
            upgrade; ``identity`` (and ``serial``) is None when the client sent no
            valid node certificate (the handler refuses it). The listener closes
            the stream.
    """
    limits = limits or HttpLimits()
    metrics = metrics or Registry()
    m_refused = metrics.counter(
        "hostmesh_server_connections_refused_total",
        "Server connections closed before a request, by reason", ("reason",))  # fmt: skip
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    counts = {"http": 0, "sync": 0}

    async def on_connection(tcp: trio.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*tcp.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        current = tls()
        stream = trio.SSLStream(tcp, current.context, server_side=True)
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                await stream.do_handshake()
            if scope.cancelled_caught:
                m_refused.labels("handshake_timeout").inc()
                return
            identity: NodeIdentity | None = None
            serial: int | None = None
            if stream.getpeercert(binary_form=True):
                try:
                    identity = check_peer(stream, mesh=current.mesh, revocations=revocations())
                    serial = peer_certificate(stream).serial_number
                except (PeerCertificateError, CertificateError) as exc:
                    log.warning("client certificate refused", peer=peer, error=str(exc))
                    m_refused.labels(getattr(exc, "reason", "certificate")).inc()
            with trio.move_on_after(limits.header_timeout):
                head = await _read_head(stream)
            if not head:
                return
            replay = _Replay(stream, head)
            kind = "sync" if is_sync_upgrade(head) else "http"
            limit = MAX_SYNC_CONNECTIONS if kind == "sync" else limits.max_connections
            if counts[kind] >= limit:
                m_refused.labels(f"{kind}_connections").inc()
                with trio.move_on_after(1):
                    await stream.send_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n"
                        b"content-length: 21\r\n\r\ntoo many connections\n"
                    )
                return
            counts[kind] += 1
            try:
                if kind == "sync":
                    await sync_handler(replay, identity, peer, serial)
                else:
                    await serve_connection(replay, http_handler, limits, peer, identity)
            finally:
                counts[kind] -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            m_refused.labels("broken").inc()
        except Exception as exc:  # a handler bug must not kill the listener
            log.exception("connection handler failed", peer=peer, error=repr(exc))
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await _close(stream)

    log.info("listening", listener="server", address=f"{bound[0]}:{bound[1]}", tls=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started((bound[0], bound[1]))


async def _close(stream: Any) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()


def server_name() -> str:
    """This server's node name in its certificate: the short host name, when it is a
    valid node name (one DNS label), else ``server``."""
    import socket

    from hostmesh._errors import ValidationError
    from hostmesh._pki import validate_node_name

    name = socket.gethostname().split(".")[0]
    try:
        return validate_node_name(name)
    except ValidationError:
        return "server"

"""The inbound listener on the host address, :4141: other agents' requests over mTLS.

Another agent that picked an instance on this node sends the request here,
over TLS 1.3 with its node certificate, with the mesh headers naming the
caller (``hostmesh-source``), the service and the instance. For each
connection and request this agent:

1. shakes hands and verifies the client's certificate: a chain to a current
   root, within validity, a ``spiffe://<mesh>/node/<node>`` identity, not
   revoked (also re-checked per request against a newer revocation list), and
   a node the catalog knows. Plaintext, a foreign CA, an expired or revoked
   certificate: the connection is closed, counted by reason and logged with
   the peer;
2. checks the claimed source: ``host:<node>`` of that very node, or a service
   with an instance on it (a node cannot speak for services it does not run);
3. finds the instance among this node's registrations (gone: 503 ``no-instance``,
   which the caller retries elsewhere);
4. evaluates the intentions for (source, service, method, path): denied is a
   403 with the deciding rule;
5. forwards to the instance with the mesh headers removed, through the same
   streaming, pooling and error handling as the outbound proxy (one try: the
   caller owns retries and timeouts). ``CONNECT <instance>`` opens a TCP
   stream to the instance instead (the TCP upstreams' hop).

An instance that registered no address of its own is dialled on loopback
(127.0.0.1:<port>): a service that binds loopback only is reachable from
other hosts through the mesh and nowhere else.
"""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import trio

from hostmesh._config import ProxyConfig
from hostmesh._errors import CertificateError
from hostmesh._log import get_logger
from hostmesh._metrics import Registry
from hostmesh._routes import RetryPolicy, Route
from hostmesh.catalog import Catalog

from ._deadline import Deadline, DeadlineExceeded
from ._http1 import Head, HttpError, parse_request_head
from ._intentions import Intentions
from ._mtls import (
    MESH_DESTINATION,
    MESH_INSTANCE,
    MESH_SOURCE,
    HopRefused,
    MeshTls,
    TlsStream,
    tls_accept,
)
from ._pool import ConnectError, Stream, connect
from ._proxy import Conn, Proxy, RouteLike, error_response, tunnel
from ._routing import Endpoint, Router

__all__ = ["InboundProxy", "LocalInstance"]

_log = get_logger(__name__)

#: The inbound agent's route for every request: one try, no timeout of its own
#: (the calling agent's route timeout bounds the request and cuts its connection).
_INBOUND_ROUTE = Route(name="inbound", timeout=0, retries=RetryPolicy(max=0, on=()))
#: Refusal log lines per second before they are only counted (a scan of :4141
#: must not fill the disk); the counters always count every refusal.
LOG_REFUSALS_PER_SECOND = 10


@dataclass(frozen=True)
class LocalInstance:
    """An instance registered on this node, as the inbound agent dials it."""

    id: str
    service: str
    host: str
    port: int


@functools.lru_cache(maxsize=1024)
def _local_endpoint(instance: LocalInstance, node: str) -> Endpoint:
    """The endpoint the inbound agent dials for ``instance`` (built once per instance)."""
    return Endpoint(id=instance.id, host=instance.host, port=instance.port, az="", node=node,
                    weight=1.0, healthy=True, tags=(), meta={})  # fmt: skip


class _Fixed:
    """The route of one inbound request: the instance the caller picked, tried once."""

    __slots__ = ("_metrics", "endpoint", "route", "service")

    def __init__(self, service: str, endpoint: Endpoint, metrics: _InboundMetrics) -> None:
        self.service = service
        self.endpoint = endpoint
        self.route = _INBOUND_ROUTE
        self._metrics = metrics

    def admit(self, now: float) -> None:
        pass

    def release(self) -> None:
        pass

    def deposit(self, now: float) -> None:
        pass

    def withdraw(self, now: float) -> bool:
        return False

    def pick(self, tried: Collection[str], now: float) -> Endpoint:
        return self.endpoint

    def finish(self, endpoint: Endpoint, ok: bool, latency: float, now: float) -> None:
        pass

    def count_response(self, status: int, duration: float) -> None:
        self._metrics.responses.labels(self.service, f"{status // 100}xx").inc()
        self._metrics.latency.labels(self.service).observe(duration)


class _InboundMetrics:
    def __init__(self, registry: Registry) -> None:
        from ._routing import LATENCY_BUCKETS

        self.responses = registry.counter(
            "hostmesh_inbound_responses_total",
            "Responses to other agents' requests by service and status class", ("service", "code"),
        )  # fmt: skip
        self.latency = registry.histogram(
            "hostmesh_inbound_request_duration_seconds",
            "Inbound requests from the request head to the response head, by service",
            ("service",), buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.denied = registry.counter(
            "hostmesh_intentions_denied_total",
            "Requests refused by intentions at this destination, by source and destination",
            ("source", "destination"),
        )  # fmt: skip


class InboundProxy(Proxy):
    """Accepts other agents on :4141 and forwards to this node's instances.

    Args:
        mesh: this node's TLS contexts and the revocation list.
        catalog: to check that a caller's node and claimed service exist.
        local: instance ID -> this node's instance, or None.
        intentions: the current intentions.
        router: unused for routing (each request names its instance); shared
            with the outbound proxy for its types.
    """

    def __init__(
        self,
        config: ProxyConfig,
        router: Router,
        *,
        node: str,
        mesh: MeshTls,
        catalog: Catalog,
        local: Callable[[str], LocalInstance | None],
        intentions: Callable[[], Intentions],
        registry: Registry,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, router, clock=clock)
        self.node = node
        self.mesh = mesh
        self.intentions = intentions
        self.catalog = catalog
        self._local = local
        self._metrics = _InboundMetrics(registry)
        self._log_window = (0.0, 0)  # (second, lines logged in it)

    # --- connections ------------------------------------------------------------

    def _refuse_peer(self, reason: str, peer: tuple[str, int], detail: str, **fields: str) -> None:
        """Count a refused connection and log it."""
        self._refuse(reason)
        self._log_refusal(reason, peer, detail, **fields)

    def _log_refusal(self, reason: str, peer: tuple[str, int], detail: str, **fields: str) -> None:
        """Log a refusal with its peer, unless refusals flood in (they are counted anyway)."""
        now = trio.current_time()
        second, lines = self._log_window
        if int(now) != int(second):
            second, lines = now, 0
        if lines < LOG_REFUSALS_PER_SECOND:
            _log.warning("inbound refused", reason=reason, peer=f"{peer[0]}:{peer[1]}",
                         error=detail, **fields)  # fmt: skip
        self._log_window = (second, lines + 1)

    async def _open_client(self, sock: socket.socket, dl: Deadline, conn: Conn) -> Stream | None:
        assert self.mesh is not None
        dl.after(self.config.header_timeout)
        try:
            ctx, domain = self.mesh.server()
        except CertificateError as exc:
            self._refuse_peer("no-certificate", conn.addr, str(exc))
            return None
        try:
            stream = await tls_accept(sock, ctx, dl, mesh=domain, revocations=self.mesh.revocations)
        except HopRefused as exc:
            self._refuse_peer(exc.reason, conn.addr, exc.detail)
            return None
        record = self.catalog.record(stream.peer.node)
        if record is None or record.left:
            self._refuse_peer("unknown-node", conn.addr, "the catalog has no such node",
                              node=stream.peer.node)  # fmt: skip
            stream.close()
            return None
        conn.identity = f"node:{stream.peer.node}"
        return stream

    # --- requests ---------------------------------------------------------------

    def _destination(self, req: Head) -> tuple[bytes, bytes]:
        service = req.get(MESH_DESTINATION)
        if service is None:
            raise HttpError(400, "missing-mesh-headers", "no hostmesh-destination header")
        if req.method != b"CONNECT" and req.target[:1] != b"/":
            raise HttpError(400, "bad-request-target", "expected an origin-form target")
        return service, req.target

    def _route(self, req: Head, service: bytes, path: bytes, conn: Conn,
               now: float) -> tuple[RouteLike, bytes]:  # fmt: skip
        stream = conn.stream
        assert isinstance(stream, TlsStream) and self.mesh is not None
        peer_node = stream.peer.node
        if self.mesh.revoked(stream):
            raise HttpError(403, "revoked", f"the certificate of {peer_node} is revoked")
        source_b, instance_b = req.get(MESH_SOURCE), req.get(MESH_INSTANCE)
        if source_b is None or instance_b is None:
            raise HttpError(400, "missing-mesh-headers",
                            "hostmesh-source and hostmesh-instance are required")  # fmt: skip
        source = source_b.decode("ascii", "replace")
        name = service.decode("ascii", "replace")
        if not self._runs_on(source, peer_node):
            self._log_refusal("source-not-on-node", conn.addr, "claimed source does not run there",
                              node=peer_node, source=source)  # counted with the 403  # fmt: skip
            raise HttpError(403, "source-not-on-node",
                            f"{source} has no instance on {peer_node}")  # fmt: skip
        instance = self._local(instance_b.decode("ascii", "replace"))
        if instance is None or instance.service != name:
            raise HttpError(503, "no-instance",
                            f"no instance {instance_b.decode('ascii', 'replace')} of {name} "
                            f"on {self.node}")  # fmt: skip
        connect_ = req.method == b"CONNECT"
        assert self.intentions is not None
        decision = self.intentions().decide(
            source, name, None if connect_ else req.method.decode("ascii"),
            None if connect_ else path.split(b"?", 1)[0].decode("latin-1"),
        )  # fmt: skip
        if not decision.allowed:
            self._metrics.denied.labels(source, name).inc()
            _log.info("request denied", source=source, destination=name, node=peer_node,
                      reason=decision.reason)  # fmt: skip
            raise HttpError(403, "intention-denied", decision.reason)
        return _Fixed(name, _local_endpoint(instance, self.node), self._metrics), b""

    def _runs_on(self, source: str, node: str) -> bool:
        if source == f"host:{node}":
            return True
        record = self.catalog.record(node)
        return record is not None and any(inst.name == source for inst in record.services)

    async def _exchange(self, client: Stream, dl: Deadline, head_bytes: bytes, conn: Conn) -> bool:
        if not head_bytes.startswith(b"CONNECT "):
            return await super()._exchange(client, dl, head_bytes, conn)
        return await self._open_tunnel(client, dl, parse_request_head(head_bytes), conn)

    async def _open_tunnel(self, client: Stream, dl: Deadline, req: Head, conn: Conn) -> bool:
        """``CONNECT``: a TCP stream to the instance, after the same checks as a request."""
        try:
            service, _ = self._destination(req)
            state, _ = self._route(req, service, b"", conn, self._clock())
        except HttpError as exc:
            self._refuse(exc.reason)
            dl.after(self.config.header_timeout)
            await client.send(error_response(exc.status, exc.reason, exc.detail, close=True), dl)
            return False
        endpoint = state.pick(set(), self._clock())
        dl.after(self.config.connect_timeout)
        try:
            upstream = await connect(endpoint.host, endpoint.port, dl)
        except (ConnectError, DeadlineExceeded) as exc:
            self._refuse("connect-failed")
            dl.after(self.config.header_timeout)
            await client.send(error_response(502, "connect-failed", f"connect to {endpoint.id} "
                                             f"failed: {exc}", close=True), dl)  # fmt: skip
            return False
        try:
            await client.send(b"HTTP/1.1 200 Connection Established\r\n\r\n", dl)
            state.count_response(200, 0.0)
            dl.clear()  # a tunnel lives as long as both ends want
            self.stats.upstream_connections += 1
            try:
                await tunnel(client, upstream)
            finally:
                self.stats.upstream_connections -= 1
        finally:
            upstream.close()
        return False

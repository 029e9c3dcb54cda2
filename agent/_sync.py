"""The agent side of server sync: one TLS websocket to one server, failover, persistence.

:class:`SyncClient` connects to a server from the agent's ``servers`` list
(shuffled once, then tried in turn), presents the node certificate (the
``client_tls`` seam: a factory of ``ssl.SSLContext``, so that a renewed
certificate applies to the next connection), checks the server's
certificate names ``spiffe://<mesh>/server/<name>``, and runs the protocol of
:mod:`hostmesh.catalog._syncproto`:

- HELLO with our record and the last revision we saw; the server answers with
  a snapshot or resumes from that revision; deltas follow;
- our record again whenever :class:`LocalState` makes a new version, and the
  nodes gossip saw die;
- heartbeats both ways: a server silent for ``heartbeat_timeout`` is left;
- after a failure, the next server after ``backoff`` (exponential, jittered).

Everything received goes into the agent's catalog through the normal merge;
config (``config/...``) and the CA bundle and revocations are kept in
:class:`ClientState` and handed to the agent (``on_change``). The state is
written atomically to ``<data_dir>/sync-state.json`` (at most every
``persist_interval``) and loaded at start, so an agent with no reachable
server, even a restarted one, serves the last catalog and config it had.
"""

from __future__ import annotations

import contextlib
import random
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from hostmesh._config import AgentConfig, parse_hostport
from hostmesh._errors import (
    CertificateError,
    ConfigError,
    HostmeshError,
    PeerCertificateError,
    RemoteProtocolError,
    ValidationError,
)
from hostmesh._log import get_logger
from hostmesh._metrics import Registry
from hostmesh._pki import RevocationList, parse_spiffe_id
from hostmesh._tls import peer_certificate
from hostmesh.catalog import Catalog, NodeRecord
from hostmesh.catalog._syncproto import (
    CA_REVOCATIONS_KEY,
    CA_ROOTS_KEY,
    MAX_DEATHS_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    Applied,
    ClientState,
    SyncError,
)

from ._intentions import INTENTIONS_DEFAULT_KEY, INTENTIONS_PREFIX, Intentions, Policy
from ._state import atomic_write

__all__ = [
    "STATE_FILE",
    "SYNC_PATH",
    "SyncClient",
    "TrustBundle",
    "backoff_delay",
    "check_server_peer",
    "sync_websocket",
]

log = get_logger("hostmesh.agent.sync")

#: The server's websocket endpoint (hostmesh.server._listener.SYNC_PATH).
SYNC_PATH = "/v1/sync"
#: In the data dir: the last snapshot, config, CA entries and revision.
STATE_FILE = "sync-state.json"
#: s for a websocket's closing handshake and the TCP close after it.
CLOSE_TIMEOUT = 1.0
#: A state file larger than this is not loaded (a 10,000 node catalog is ~20 MB).
MAX_STATE_FILE = 256 * 1024 * 1024


class TrustBundle:
    """The CA roots and revocation list the servers pushed, for the agent's TLS users
    (the inbound mTLS listener, the proxy's hops, certificate renewal).

    ``roots_pem`` is None until a server (or the persisted state) provided it.
    Readers build new SSL contexts when ``version`` changes.
    """

    def __init__(self) -> None:
        self.roots_pem: bytes | None = None
        self.revocations: RevocationList | None = None
        self.version = 0

    def update(self, roots_pem: bytes | None, revocations: RevocationList | None) -> bool:
        if roots_pem == self.roots_pem and revocations == self.revocations:
            return False
        self.roots_pem, self.revocations = roots_pem, revocations
        self.version += 1
        return True


def backoff_delay(attempt: int, base: float, maximum: float, rand: float) -> float:
    """Seconds before reconnect attempt ``attempt`` (1, 2, ...): ``d = min(maximum,
    base * 2**(attempt-1))``, drawn from ``[d/2, d]`` by ``rand`` in [0, 1)."""
    d: float = min(maximum, base * 2.0 ** min(attempt - 1, 32))
    return d / 2 + d / 2 * rand


def check_server_peer(stream: trio.SSLStream[Any], mesh: str) -> str:
    """The server name in the peer's ``spiffe://<mesh>/server/<name>`` certificate.

    The chain was verified in the handshake; a node certificate (``/node/``)
    is refused, so that no agent can pose as a server.

    Raises:
        PeerCertificateError: no certificate, another mesh, or not a server identity.
    """
    from cryptography import x509

    cert = peer_certificate(stream)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        raise PeerCertificateError("identity", "server certificate has no SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    prefix = f"spiffe://{mesh}/server/"
    if len(uris) != 1 or not uris[0].startswith(prefix):
        raise PeerCertificateError(
            "identity", f"the server's certificate names {uris!r}, not {prefix}<name>"
        )
    name = uris[0].removeprefix(prefix)
    try:  # the same label rules as a node name
        parse_spiffe_id(f"spiffe://{mesh}/node/{name}")
    except ValidationError as exc:
        raise PeerCertificateError("identity", f"bad server name: {exc}") from None
    return name


@contextlib.asynccontextmanager
async def sync_websocket(
    address: str, context: ssl.SSLContext, mesh: str
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """TCP, TLS (our node certificate; the server's checked) and the websocket handshake;
    closes the websocket and the connection when the block ends.

    Raises:
        OSError, trio.BrokenResourceError, trio_websocket.HandshakeError: unreachable or
            refused (trio-websocket's reader task raises them in an ExceptionGroup).
        PeerCertificateError: the server's certificate is not a server's of ``mesh``.
    """
    host, port = parse_hostport(address)
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, context, server_hostname=None)
    try:
        await stream.do_handshake()
        check_server_peer(stream, mesh)
        async with trio.open_nursery() as nursery:  # trio-websocket's reader task
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, host, SYNC_PATH, max_message_size=MAX_MESSAGE_BYTES
            )
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose()
                # The reader waits for the server to close TCP (RFC 6455 7.1.1), not forever.
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
    finally:
        # trio-websocket leaves a client's stream open when the server closed first.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(CLOSE_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.aclose()


class SyncClient:
    """Keeps the agent in sync with a server. Owned by the agent; :meth:`run` never returns.

    Args:
        config: the agent's config (``servers``, ``sync``, ``data_dir``).
        catalog: the agent's catalog (records are merged into it).
        own_record: returns our current record (LocalState's).
        client_tls: returns the SSL context with our node certificate.
        on_change: called with what each message changed.
        rand: randomness for the server order and jitter (tests may seed it).
    """

    def __init__(
        self,
        config: AgentConfig,
        catalog: Catalog,
        own_record: Callable[[], NodeRecord],
        client_tls: Callable[[], ssl.SSLContext],
        *,
        on_change: Callable[[Applied], None] = lambda applied: None,
        metrics: Registry | None = None,
        rand: random.Random | None = None,
    ) -> None:
        self.config = config
        self.cfg = config.sync
        self.catalog = catalog
        self._own_record = own_record
        self._client_tls = client_tls
        self._on_change = on_change
        self._rand = rand or random.Random()
        self.state = ClientState(catalog, config.node_name)
        self.path = Path(config.data_dir) / STATE_FILE
        self.servers = list(config.servers)
        self._rand.shuffle(self.servers)
        self.connected: str | None = None  # the server we are synced with now
        self.last_start = ""  # "snapshot" or "resumed": how the last session began
        self.sent_record = (0, 0)  # the key of our record last sent to a server
        self._sent = trio.Event()
        self._wake = trio.Event()
        self._dirty = False
        self._persisted = trio.Event()
        metrics = metrics or Registry()
        self.m_sessions = metrics.counter(
            "hostmesh_sync_client_sessions_total",
            "Sessions with a server, by how they ended", ("result",))  # fmt: skip
        self.m_messages = metrics.counter(
            "hostmesh_sync_client_messages_total", "Messages received from servers, by kind",
            ("kind",))  # fmt: skip
        metrics.gauge_func("hostmesh_sync_connected", "1 while synced with a server",
                           lambda: 1 if self.connected else 0)  # fmt: skip
        metrics.gauge_func("hostmesh_sync_revision", "The last store revision received",
                           lambda: self.state.revision)  # fmt: skip

    # --- persistence --------------------------------------------------------------

    def load_persisted(self) -> bool:
        """Load the state file of an earlier run (its catalog and config); True if there was one.

        A broken file is logged and ignored: the next snapshot replaces it.
        """
        try:
            if self.path.stat().st_size > MAX_STATE_FILE:
                raise ValueError(f"larger than {MAX_STATE_FILE} bytes")
            data = self.path.read_bytes()
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            log.warning("sync state not loaded", path=str(self.path), error=str(exc))
            return False
        try:
            taken = self.state.load(data)
        except (ValueError, HostmeshError) as exc:
            log.warning("sync state not loaded", path=str(self.path), error=str(exc))
            return False
        log.info("sync state loaded", revision=self.state.revision, records=taken,
                 config=len(self.state.config))  # fmt: skip
        self._on_change(Applied(catalog=True, config=True, ca=True))
        return True

    def persist(self) -> None:
        """Write the state file now (atomically)."""
        self._dirty = False
        atomic_write(self.path, self.state.to_bytes())
        self._wrote()

    def _wrote(self) -> None:
        self._persisted.set()
        self._persisted = trio.Event()

    async def _persister(self) -> None:
        try:
            while True:
                if self._dirty:
                    self._dirty = False
                    data = self.state.to_bytes()  # here: the state changes on this thread
                    try:
                        await trio.to_thread.run_sync(atomic_write, self.path, data)
                    except OSError as exc:
                        self._dirty = True
                        log.warning("sync state not written", path=str(self.path), error=str(exc))
                    else:
                        self._wrote()
                await trio.sleep(self.cfg.persist_interval)
        finally:
            if self._dirty:
                with contextlib.suppress(OSError):
                    self.persist()

    async def wait_persisted(self) -> None:
        """Return after the next write of the state file (tests, shutdown)."""
        await self._persisted.wait()

    # --- the connection -----------------------------------------------------------

    def _mark_sent(self, key: tuple[int, int]) -> None:
        self.sent_record = max(self.sent_record, key)
        self._sent.set()
        self._sent = trio.Event()

    async def wait_sent(self, key: tuple[int, int]) -> None:
        """Return once our record at ``key`` (or a later one) was sent to a server
        (a graceful leave waits for its tombstone to go out)."""
        while self.sent_record < key:
            await self._sent.wait()

    def poke(self) -> None:
        """Our record or the catalog changed: the sender looks at what to send."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay synced with some server until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._persister)
            task_status.started()
            attempt = 0
            index = 0
            while True:
                address = self.servers[index % len(self.servers)]
                synced = await self._session(address)
                index += 1
                attempt = 1 if synced else attempt + 1
                delay = backoff_delay(
                    attempt, self.cfg.backoff_base, self.cfg.backoff_max, self._rand.random()
                )
                await trio.sleep(delay)

    async def _session(self, address: str) -> bool:
        """One connection to ``address``; True when it got as far as being synced."""
        outcome: list[Any] = ["unreachable", False]  # result, synced
        try:
            with trio.fail_after(self.cfg.connect_timeout) as connecting:
                async with sync_websocket(address, self._client_tls(), self.cfg.mesh) as ws:
                    connecting.deadline = float("inf")
                    try:
                        hello = self._own_record()
                        await ws.send_message(self.state.hello(hello))
                        self._mark_sent(hello.key)
                        outcome[0] = "closed"
                        async with trio.open_nursery() as inner:
                            inner.start_soon(self._sender, ws, hello.key)
                            outcome[1], outcome[0] = await self._receiver(ws, address)
                            inner.cancel_scope.cancel()
                    finally:
                        self.connected = None
        except* trio.TooSlowError:
            outcome[0] = "timeout"
        except* PeerCertificateError as group:
            outcome[0] = "server_certificate"
            log.warning("server refused: its certificate", server=address,
                        error=str(group.exceptions[0]))  # fmt: skip
        except* (CertificateError, ssl.SSLError) as group:
            outcome[0] = "certificate"
            log.warning("no usable node certificate", error=str(group.exceptions[0]))
        except* trio_websocket.HandshakeError as group:
            outcome[0] = "rejected"
            log.warning("server refused the sync", server=address, error=repr(group.exceptions[0]))
        except* (OSError, trio.BrokenResourceError, trio_websocket.ConnectionClosed,
                 RemoteProtocolError) as group:  # fmt: skip
            log.info("server unreachable", server=address, error=repr(group.exceptions[0]))
        result, synced = str(outcome[0]), bool(outcome[1])
        self.m_sessions.labels(result).inc()
        if synced:
            log.info("sync session ended", server=address, result=result)
        return synced

    async def _receiver(
        self, ws: trio_websocket.WebSocketConnection, address: str
    ) -> tuple[bool, str]:
        synced = False
        while True:
            try:
                with trio.fail_after(self.cfg.heartbeat_timeout):
                    data = await ws.get_message()
            except trio.TooSlowError:
                return synced, "heartbeat_timeout"
            except trio_websocket.ConnectionClosed:
                return synced, "closed"
            try:
                applied = self.state.receive(data)
            except SyncError as exc:
                log.warning("bad message from server", server=address, error=str(exc))
                self.m_messages.labels(f"bad_{exc.reason}").inc()
                return synced, "protocol_error"
            if applied.error:
                log.warning("server ended the session", server=address, error=applied.error)
                return synced, "refused"
            if applied.snapshot or applied.resumed:
                synced = True
                self.connected = address
                self.last_start = "snapshot" if applied.snapshot else "resumed"
                log.info("synced", server=address, start=self.last_start,
                         revision=self.state.revision)  # fmt: skip
            kind = "snapshot" if applied.snapshot else "heartbeat" if applied.heartbeat else "data"
            self.m_messages.labels(kind).inc()
            if not applied.heartbeat:
                self._dirty = True
            if applied.catalog or applied.config or applied.ca:
                self._on_change(applied)

    async def _sender(self, ws: trio_websocket.WebSocketConnection, sent: tuple[int, int]) -> None:
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await self._send_loop(ws, sent)

    async def _send_loop(
        self, ws: trio_websocket.WebSocketConnection, sent: tuple[int, int]
    ) -> None:
        reported: dict[str, tuple[int, int]] = {}
        last_sent = trio.current_time()  # the HELLO
        while True:
            record = self._own_record()
            if record.key != sent:
                await ws.send_message(ClientState.record(record))
                sent = record.key
                self._mark_sent(sent)
                last_sent = trio.current_time()
            dead = self._dead_nodes()
            fresh = {n: k for n, k in dead.items() if reported.get(n) != k}
            if fresh:
                items = sorted((n, g, v) for n, (g, v) in fresh.items())
                for i in range(0, len(items), MAX_DEATHS_PER_MESSAGE):
                    await ws.send_message(
                        ClientState.deaths_message(items[i : i + MAX_DEATHS_PER_MESSAGE])
                    )
                last_sent = trio.current_time()
            reported = dead
            # A heartbeat once nothing was sent for an interval: a wake-up (poke) that
            # sent nothing must not push it back, or a busy catalog starves it and
            # the server drops the session as silent.
            due = last_sent + self.cfg.heartbeat_interval
            if trio.current_time() >= due:
                await ws.send_message(self.state.heartbeat())
                last_sent = trio.current_time()
                continue
            self._wake = trio.Event()
            with trio.move_on_at(due):
                await self._wake.wait()

    def _dead_nodes(self) -> dict[str, tuple[int, int]]:
        """Nodes our catalog holds as dead (gossip's view), with their record keys."""
        out = {}
        for node in self.catalog.dead_nodes() - {self.config.node_name}:
            record = self.catalog.record(node)
            if record is not None and not record.left:
                out[node] = record.key
        return out

    # --- what the agent reads ------------------------------------------------------

    def traffic_documents(self) -> dict[str, Any]:
        """``config/traffic/<service>`` documents: service -> the policy's JSON."""
        prefix = "config/traffic/"
        return {
            key.removeprefix(prefix): value
            for key, (_rev, value) in self.state.config.items()
            if key.startswith(prefix) and "/" not in key.removeprefix(prefix)
        }

    def intentions(self) -> Intentions:
        """The intentions and default policy the servers pushed (allow and no rules
        before any). A broken rule is logged and refuses the whole set: evaluating
        without it could allow what it denies."""
        entries = [value for key, (_rev, value) in sorted(self.state.config.items())
                   if key.startswith(INTENTIONS_PREFIX)]  # fmt: skip
        found = self.state.config.get(INTENTIONS_DEFAULT_KEY)
        pushed: object = "allow"  # none pushed yet
        if found is not None:
            doc = found[1]
            pushed = doc.get("default") if isinstance(doc, dict) else None  # not our format
        default: Policy = "allow" if pushed == "allow" else "deny"
        if pushed not in ("allow", "deny"):
            log.warning("pushed intentions default refused; denying", default=str(pushed))
        try:
            return Intentions.from_json(entries, default)
        except ConfigError as exc:
            log.error("pushed intentions refused; denying every mesh call", error=str(exc))
            return Intentions((), "deny")

    def trust(self) -> tuple[bytes | None, RevocationList | None]:
        """The CA roots (PEM) and revocation list the servers pushed (None: not yet)."""
        roots = self.state.ca.get(CA_ROOTS_KEY)
        revs = self.state.ca.get(CA_REVOCATIONS_KEY)
        revocations = None
        if revs is not None:
            try:
                revocations = RevocationList.from_bytes(revs[1].encode())
            except CertificateError as exc:
                log.warning("pushed revocation list does not parse", error=str(exc))
        return (roots[1].encode() if roots is not None else None), revocations

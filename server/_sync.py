"""The server side of agent sync: one shared store watch fanned out to every agent's session.

:class:`SyncHub` keeps, per server process:

- a mirror of the synced keys (:func:`~hostmesh.catalog._syncproto.is_synced_key`),
  loaded at start and kept current by *one* watch on the store, so that a
  connecting agent's snapshot costs no store read (10,000 agents reconnecting
  after a failover would otherwise be 10,000 prefix reads);
- a bounded history of the changes it saw (``HISTORY_CHANGES``), from which a
  reconnecting agent is resumed; an agent whose revision is older than that
  (or than this server's start) gets a snapshot;
- each change batch encoded once and the same string queued on every
  session (:class:`~hostmesh.catalog._syncproto.ServerSession`, bounded: an
  agent that cannot keep up is resynced with a snapshot, encoded once per
  revision and shared).

Agents' records are merged into ``catalog/nodes/<node>`` with the catalog's
merge rule under compare-and-swap (two servers cannot lose an update), and
their gossip death reports into ``catalog/dead/<node>``. A message that breaks
the protocol closes the session with an ERROR, a counter, and nothing written.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import Iterable
from typing import Any

import trio
import trio_websocket

from hostmesh._errors import (
    Compacted,
    HostmeshError,
    LocalProtocolError,
    StoreError,
)
from hostmesh._log import get_logger
from hostmesh._metrics import Registry
from hostmesh._pki import NodeIdentity, RevocationList
from hostmesh.catalog import NodeRecord, newer, record_to_json
from hostmesh.catalog._codec import DecodeError, decode_record, encode_record
from hostmesh.catalog._syncproto import (
    CA_REVOCATIONS_KEY,
    CA_ROOTS_KEY,
    DEAD_PREFIX,
    MAX_MESSAGE_BYTES,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
    NODES_PREFIX,
    Change,
    Deaths,
    ErrorMessage,
    Heartbeat,
    Hello,
    RecordUpdate,
    Resumed,
    ServerSession,
    SyncError,
    delta_messages,
    encode,
    is_synced_key,
    snapshot_messages,
)

from ._store import MAX_VALUE, Entry, Event, Store

__all__ = [
    "CAS_ATTEMPTS",
    "DELTA_BATCH",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TIMEOUT",
    "HELLO_TIMEOUT",
    "HISTORY_BYTES",
    "HISTORY_CHANGES",
    "MAX_DEATH_REPORTERS",
    "SyncHub",
]

log = get_logger("hostmesh.server.sync")

#: Changes kept in memory for resuming agents. At 100 changes/s (a busy 10,000
#: node mesh) that is ~100 s: longer than an agent's reconnect backoff.
HISTORY_CHANGES = 10_000
#: Bytes of values in that history: 10,000 changes of the largest value (512 KiB)
#: would be 5 GB; 64 MiB keeps a server's memory for it bounded.
HISTORY_BYTES = 64 * 1024 * 1024
#: Store events taken from the watch per fan-out round; their changes are
#: encoded once (cut into DELTA messages by size) for every session.
DELTA_BATCH = 512
#: s between server heartbeats on a quiet session.
HEARTBEAT_INTERVAL = 10.0
#: s without any message from an agent (its heartbeats included) before the
#: session is closed: three missed heartbeats of the agent's default interval.
HEARTBEAT_TIMEOUT = 30.0
#: s for a new session to send HELLO.
HELLO_TIMEOUT = 10.0
#: Compare-and-swap rounds for one record merge before giving up (two servers
#: writing the same node's record at once retry; more rounds mean a hot loop).
CAS_ATTEMPTS = 8
#: Reporters kept in a death report (for operators; the leader confirms anyway).
MAX_DEATH_REPORTERS = 16
#: Channel between the store watch task and the fan-out loop.
WATCH_CHANNEL_SIZE = 1024
#: s between attempts to re-establish a failed store watch (doubling to the max).
WATCH_RETRY_MIN, WATCH_RETRY_MAX = 0.1, 5.0
#: s to finish a websocket's closing handshake.
CLOSE_TIMEOUT = 1.0
#: Websocket close codes (RFC 6455 section 7.4.1).
CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_GOING_AWAY = 1008, 1009, 1001


def _wire_value(entry: Entry) -> Any:
    """A store value as the JSON value agents get, or raise ValueError."""
    key = entry.key
    if key.startswith(NODES_PREFIX):
        try:
            return record_to_json(decode_record(entry.value))
        except DecodeError as exc:
            raise ValueError(str(exc)) from None
    if key in (CA_ROOTS_KEY, CA_REVOCATIONS_KEY):
        return entry.value.decode("utf-8")
    return json.loads(entry.value)


def _size(value: Any) -> int:
    """About the bytes a wire value takes (records and documents as JSON, PEM as text)."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, separators=(",", ":")))


class _Subscriber:
    """A session plus the event that wakes its sender."""

    def __init__(self, session: ServerSession, serial: int | None = None) -> None:
        self.session = session
        self.wake = trio.Event()
        self.serial = serial  # of the agent's certificate
        self.revoked = False  # the certificate was revoked: the sender ends the session

    def kick(self) -> None:
        self.wake.set()


class SyncHub:
    """Sync for one server: owns the shared watch, the mirror, the history and the sessions.

    Args:
        store: the server's store (not closed here).
        metrics: where the counters go.
        history, history_bytes: changes (and bytes of their values) kept for resuming agents.
        heartbeat_interval, heartbeat_timeout: see the constants.
        max_queued_messages, max_queued_bytes: each session's queue bounds.

    :meth:`run` must be started (``nursery.start``) before sessions are served.
    """

    def __init__(
        self,
        store: Store,
        *,
        metrics: Registry | None = None,
        history: int = HISTORY_CHANGES,
        history_bytes: int = HISTORY_BYTES,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self.store = store
        self.metrics = metrics or Registry()
        self.revision = 0  # the highest store revision applied to the mirror
        self._mirror: dict[str, Change] = {}
        self._history: deque[Change] = deque()
        self._history_sizes: deque[int] = deque()  # bytes of each change's stored value
        self._history_bytes = 0
        self._history_max = history
        self._history_max_bytes = history_bytes
        self._history_from = 1  # every change with a revision >= this is in _history
        self._snapshot: tuple[int, list[str]] | None = None
        self._subscribers: set[_Subscriber] = set()
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._max_messages = max_queued_messages
        self._max_bytes = max_queued_bytes
        self.revocations: RevocationList | None = None
        m = self.metrics
        self.m_closed = m.counter(
            "hostmesh_sync_sessions_closed_total",
            "Sync sessions closed, by reason", ("reason",))  # fmt: skip
        self.m_started = m.counter(
            "hostmesh_sync_sessions_started_total",
            "Sync sessions started, by how the agent was brought up to date",
            ("start",))  # fmt: skip
        self.m_resyncs = m.counter(
            "hostmesh_sync_resyncs_total",
            "Snapshots sent to agents whose queue overflowed")  # fmt: skip
        self.m_records = m.counter(
            "hostmesh_sync_records_total",
            "Agent records received, by outcome", ("outcome",))  # fmt: skip
        self.m_skipped = m.counter(
            "hostmesh_sync_store_values_skipped_total",
            "Store values not streamed because they do not parse, by key prefix",
            ("prefix",))  # fmt: skip
        m.gauge_func("hostmesh_sync_sessions", "Open sync sessions", lambda: len(self._subscribers))
        m.gauge_func("hostmesh_sync_revision", "Store revision the sync mirror is at",
                     lambda: self.revision)  # fmt: skip
        m.gauge_func(
            "hostmesh_sync_queued_bytes", "Bytes queued for agents over every session",
            lambda: sum(s.session.queued[1] for s in self._subscribers))  # fmt: skip
        self._ready = trio.Event()

    # --- the mirror and its watch ---------------------------------------------------

    def _change_of(self, event: Event) -> Change | None:
        entry = event.entry
        if event.kind == "delete":
            return Change(entry.key, event.revision, None, True)
        try:
            return Change(entry.key, event.revision, _wire_value(entry))
        except (ValueError, UnicodeDecodeError):
            self.m_skipped.labels(entry.key.partition("/")[0]).inc()
            log.warning("store value not streamed: does not parse", key=entry.key)
            return None

    async def _load(self) -> int:
        """Fill the mirror from the store; returns the revision to watch from."""
        revision = await self.store.current_revision()
        mirror: dict[str, Change] = {}
        for prefix in ("catalog/", "config/", "ca/"):
            for entry in await self.store.list(prefix):
                if is_synced_key(entry.key):
                    change = self._change_of(Event("put", entry, entry.mod_revision))
                    if change is not None:
                        mirror[entry.key] = change
        self._mirror = mirror
        loaded = mirror.get(CA_REVOCATIONS_KEY)
        if loaded is not None:
            self._note_revocations([loaded])
        self._history.clear()
        self._history_sizes.clear()
        self._history_bytes = 0
        self._history_from = revision + 1
        self.revision = revision
        self._snapshot = None
        return revision + 1

    def _apply(self, changes: list[Change]) -> None:
        """Apply a batch to the mirror and history; queue one DELTA on every session."""
        for change in changes:
            current = self._mirror.get(change.key)
            if current is not None and current.revision > change.revision:
                continue  # replayed from before the list (load races the watch)
            if change.deleted:
                self._mirror.pop(change.key, None)
            else:
                self._mirror[change.key] = change
            size = len(change.key) + _size(change.value)
            self._history.append(change)
            self._history_sizes.append(size)
            self._history_bytes += size
        while self._history and (
            len(self._history) > self._history_max or self._history_bytes > self._history_max_bytes
        ):
            gone = self._history.popleft()
            self._history_bytes -= self._history_sizes.popleft()
            self._history_from = max(self._history_from, gone.revision + 1)
        self.revision = max(self.revision, max(c.revision for c in changes))
        self._snapshot = None
        texts = delta_messages(changes)  # encoded once for every session
        for sub in self._subscribers:
            pending = sub.session.resync
            for text in texts:
                if not sub.session.push(text) and not pending:
                    self.m_resyncs.inc()  # the queue overflowed: the sender sends a snapshot
                    pending = True
            sub.kick()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the mirror, then follow the store until cancelled."""
        start = await self._load()
        self._ready.set()
        task_status.started()
        retry = WATCH_RETRY_MIN
        while True:
            try:
                await self._follow(start)
            except Compacted:
                log.warning("sync watch fell behind the store history: reloading")
                start = await self._reload()
            except StoreError as exc:
                log.warning("sync watch failed; retrying", error=str(exc), retry=f"{retry:g}s")
                await trio.sleep(retry)
                retry = min(2 * retry, WATCH_RETRY_MAX)
                start = self.revision + 1
            else:
                retry = WATCH_RETRY_MIN

    async def _reload(self) -> int:
        start = await self._load()
        for sub in self._subscribers:
            sub.session.resync = True  # what they missed is gone from the history
            sub.kick()
        return start

    async def _follow(self, start: int) -> None:
        send, receive = trio.open_memory_channel[Event](WATCH_CHANNEL_SIZE)
        failed: list[StoreError] = []

        async def pump() -> None:
            try:
                async with send, self.store.watch("", start) as events:
                    async for event in events:
                        await send.send(event)
            except StoreError as exc:  # raised after the nursery, not as an ExceptionGroup
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            async with receive:
                async for first in receive:
                    batch = [first]
                    while len(batch) < DELTA_BATCH:
                        try:
                            batch.append(receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    changes = [
                        c
                        for e in batch
                        if is_synced_key(e.entry.key) and (c := self._change_of(e)) is not None
                    ]
                    if changes:
                        self._apply(changes)
                        self._note_revocations(changes)
                    self.revision = max(self.revision, batch[-1].revision)
        if failed:
            raise failed[0]

    def _note_revocations(self, changes: Iterable[Change]) -> None:
        """Keep the pushed revocation list; end the sessions of revoked certificates."""
        for change in changes:
            if change.key == CA_REVOCATIONS_KEY and not change.deleted:
                try:
                    self.revocations = RevocationList.from_bytes(change.value.encode())
                except HostmeshError as exc:
                    log.warning("revocation list does not parse", error=str(exc))
                    continue
                for sub in self._subscribers:
                    if sub.serial is not None and sub.serial in self.revocations:
                        sub.revoked = True
                        sub.kick()

    def snapshot(self) -> tuple[int, list[str]]:
        """The mirror as encoded SNAPSHOT messages at :attr:`revision` (cached per revision)."""
        if self._snapshot is None or self._snapshot[0] != self.revision:
            entries = sorted(self._mirror.values(), key=lambda c: c.key)
            self._snapshot = (self.revision, snapshot_messages(self.revision, entries))
        return self._snapshot

    # --- sessions -----------------------------------------------------------------

    def attach(self, session: ServerSession, serial: int | None = None) -> tuple[_Subscriber, str]:
        """Subscribe a session that sent HELLO; returns how it starts: resume or snapshot.

        A resumed session gets RESUMED and every change in the history with a
        revision >= its own (the agent's revision is replayed: applying is
        idempotent and a revision split over two messages is completed).
        """
        sub = _Subscriber(session, serial)
        agent_rev = session.revision
        if agent_rev > 0 and self._history_from <= agent_rev <= self.revision + 1:
            session.push(encode(Resumed(agent_rev)))
            for text in delta_messages(c for c in self._history if c.revision >= agent_rev):
                session.push(text)  # too much for the queue: it resyncs with a snapshot
            how = "resumed"
        else:
            session.resync = True
            how = "snapshot"
        self._subscribers.add(sub)
        self.m_started.labels(how).inc()
        return sub, how

    def detach(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)
        sub.session.close()

    @property
    def sessions(self) -> int:
        return len(self._subscribers)

    async def merge_record(self, record: NodeRecord) -> bool:
        """Merge an agent's record into ``catalog/nodes/<node>`` by the catalog's rule.

        Returns True when the store took it (False: the stored one is as new).

        Raises:
            StoreError: the store failed, or CAS_ATTEMPTS rounds all lost.
            LocalProtocolError: the record does not fit a store value.
        """
        key = NODES_PREFIX + record.node.name
        value = encode_record(record)
        if len(value) > MAX_VALUE:
            raise LocalProtocolError(f"record of {len(value)} bytes; the store takes {MAX_VALUE}")
        for _ in range(CAS_ATTEMPTS):
            current = await self.store.get(key)
            if current is not None:
                try:
                    stored = decode_record(current.value)
                except DecodeError:
                    stored = None  # a broken stored value loses to any valid record
                if stored is not None and not newer(record, stored):
                    self.m_records.labels("not_newer").inc()
                    return False
            cas = current.mod_revision if current is not None else 0
            if await self.store.put(key, value, cas=cas) is not None:
                self.m_records.labels("stored").inc()
                await self._clear_death(record)
                return True
            self.m_records.labels("cas_retry").inc()
        raise StoreError(f"{key}: {CAS_ATTEMPTS} compare-and-swap rounds lost")

    async def _clear_death(self, record: NodeRecord) -> None:
        """A record newer than a death report supersedes it (the node is back)."""
        key = DEAD_PREFIX + record.node.name
        current = await self.store.get(key)
        if current is None:
            return
        try:
            report = json.loads(current.value)
            reported = (int(report["generation"]), int(report["version"]))
        except (ValueError, KeyError, TypeError):
            reported = (-1, -1)
        if record.key > reported:
            await self.store.delete(key, cas=current.mod_revision)

    async def merge_deaths(self, reporter: str, dead: Iterable[tuple[str, int, int]]) -> int:
        """Merge gossip death reports into ``catalog/dead/<node>``; returns how many were written.

        A report counts for the record version it names: it is dropped when the
        stored record is already newer, and keeps the larger (generation,
        version) of two reports (the catalog's merge order). ``confirmed`` is
        left to the leader's own probe.
        """
        written = 0
        for node, generation, version in dead:
            if node == reporter:
                continue  # an agent does not report itself
            key = DEAD_PREFIX + node
            for _ in range(CAS_ATTEMPTS):
                rec_entry = await self.store.get(NODES_PREFIX + node)
                if rec_entry is not None:
                    try:
                        if decode_record(rec_entry.value).key > (generation, version):
                            break  # the node has a newer record than the one seen dead
                    except DecodeError:
                        pass
                current = await self.store.get(key)
                report: dict[str, Any] = {"generation": generation, "version": version,
                                          "reporters": [reporter], "confirmed": False}  # fmt: skip
                if current is not None:
                    try:
                        old = json.loads(current.value)
                        old_key = (int(old["generation"]), int(old["version"]))
                        reporters = [str(r) for r in old.get("reporters", [])]
                    except (ValueError, KeyError, TypeError, AttributeError):
                        old, old_key, reporters = {}, (-1, -1), []
                    if old_key > (generation, version) or (
                        old_key == (generation, version) and reporter in reporters
                    ):
                        break
                    if old_key == (generation, version):
                        report = {**old, "reporters": [*reporters, reporter][-MAX_DEATH_REPORTERS:]}
                cas = current.mod_revision if current is not None else 0
                body = json.dumps(report, separators=(",", ":")).encode()
                if await self.store.put(key, body, cas=cas) is not None:
                    written += 1
                    break
        return written

    # --- one agent's connection ------------------------------------------------------

    async def serve(
        self,
        stream: trio.abc.Stream,
        identity: NodeIdentity | None,
        peer: str,
        serial: int | None = None,
    ) -> None:
        """Run one agent's websocket on ``stream`` (the listener owns and closes it)."""
        await self._ready.wait()
        async with trio.open_nursery() as nursery:
            try:
                request = await trio_websocket.wrap_server_stream(
                    nursery, stream, max_message_size=MAX_MESSAGE_BYTES
                )
            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError) as exc:
                self.m_closed.labels("bad_handshake").inc()
                log.info("sync websocket handshake failed", peer=peer, error=repr(exc))
                return
            if identity is None:
                self.m_closed.labels("no_certificate").inc()
                await request.reject(403, body=b"a node certificate is required for /v1/sync\n")
                return
            ws = await request.accept()
            try:
                await self._session(ws, identity, peer, serial)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose()
                # trio-websocket's reader answers a close the agent began, then ends.
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT

    async def _refuse(
        self, ws: trio_websocket.WebSocketConnection, reason: str, message: str, code: int
    ) -> None:
        self.m_closed.labels(reason).inc()
        log.warning("sync session refused", reason=reason, error=message)
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(encode(ErrorMessage(f"{reason}: {message}")))
            await ws.aclose(code, reason)

    async def _session(
        self,
        ws: trio_websocket.WebSocketConnection,
        identity: NodeIdentity,
        peer: str,
        serial: int | None,
    ) -> None:
        session = ServerSession(
            identity.node, trio.current_time(),
            max_messages=self._max_messages, max_bytes=self._max_bytes,
        )  # fmt: skip
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                hello = session.receive(await ws.get_message(), trio.current_time())
        except trio.TooSlowError:
            await self._refuse(ws, "hello_timeout", "no HELLO in time", CLOSE_POLICY)
            return
        except SyncError as exc:
            await self._refuse(ws, exc.reason, str(exc), _close_code(exc))
            return
        except trio_websocket.ConnectionClosed as exc:
            self.m_closed.labels(_closed_reason(exc)).inc()
            return
        assert isinstance(hello, Hello)
        sub, how = self.attach(session, serial)
        log.info("sync session", node=identity.node, peer=peer, start=how,
                 revision=hello.revision)  # fmt: skip
        try:
            if not await self._store_record(ws, hello.record):
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, ws, sub)
                reason = await self._receiver(ws, sub)
                nursery.cancel_scope.cancel()
            if reason:
                self.m_closed.labels(reason).inc()
        finally:
            self.detach(sub)

    async def _store_record(self, ws: trio_websocket.WebSocketConnection, rec: NodeRecord) -> bool:
        """Merge an agent's record; False when the session was closed for it."""
        try:
            await self.merge_record(rec)
        except LocalProtocolError as exc:
            await self._refuse(ws, "too_large", str(exc), CLOSE_TOO_BIG)
            return False
        except StoreError as exc:
            # The agent sends its record again on the next change or reconnect.
            self.m_records.labels("store_error").inc()
            log.warning("could not store an agent record", node=rec.node.name, error=str(exc))
        return True

    async def _receiver(self, ws: trio_websocket.WebSocketConnection, sub: _Subscriber) -> str:
        """Handle the agent's messages until the session ends; returns the reason to
        count ("" when it was counted already)."""
        session = sub.session
        while True:
            try:
                with trio.fail_after(self.heartbeat_timeout):
                    data = await ws.get_message()
                msg = session.receive(data, trio.current_time())
            except trio.TooSlowError:
                await self._refuse(ws, "heartbeat_timeout", "agent silent", CLOSE_POLICY)
                return ""
            except SyncError as exc:
                await self._refuse(ws, exc.reason, str(exc), _close_code(exc))
                return ""
            except trio_websocket.ConnectionClosed as exc:
                return "" if sub.revoked else _closed_reason(exc)
            if isinstance(msg, RecordUpdate):
                if not await self._store_record(ws, msg.record):
                    return ""
            elif isinstance(msg, Deaths):
                try:
                    await self.merge_deaths(session.peer_node, msg.dead)
                except StoreError as exc:
                    log.warning("could not store death reports", error=str(exc))

    async def _sender(self, ws: trio_websocket.WebSocketConnection, sub: _Subscriber) -> None:
        session = sub.session
        try:
            while True:
                if sub.revoked:
                    await self._refuse(ws, "revoked", "the node certificate was revoked",
                                       CLOSE_POLICY)  # fmt: skip
                    return
                if session.resync:
                    revision, messages = self.snapshot()
                    session.snapshot_sent(revision)
                    for text in messages:
                        await ws.send_message(text)
                    continue
                queued = session.pop()
                if queued is not None:
                    await ws.send_message(queued)
                    continue
                sub.wake = trio.Event()
                with trio.move_on_after(self.heartbeat_interval) as idle:
                    await sub.wake.wait()
                if idle.cancelled_caught:
                    await ws.send_message(encode(Heartbeat(self.revision)))
        except trio_websocket.ConnectionClosed:
            return


def _close_code(exc: SyncError) -> int:
    return CLOSE_TOO_BIG if exc.reason == "too_large" else CLOSE_POLICY


def _closed_reason(exc: trio_websocket.ConnectionClosed) -> str:
    code = getattr(exc.reason, "code", None)
    if code == CLOSE_TOO_BIG:
        return "too_large"  # trio-websocket closed it: a message over MAX_MESSAGE_BYTES
    return "disconnected"

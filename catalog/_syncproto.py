"""The agent <-> server sync protocol (sans-IO): messages, the server's session, the agent's state.

An agent keeps one websocket (``wss://server:4150/v1/sync``, TLS with its node
certificate) to one server. The conversation::

    agent                                   server
    HELLO {node, revision, record}  ---->
                                    <----   SNAPSHOT {revision, entries, more} ... (more=false)
                                    or      RESUMED {revision}  (the agent's revision is still
                                            in the server's history: only what came after)
                                    <----   DELTA {revision, changes}            (every change)
    RECORD {record}                 ---->   (whenever the agent's own record changes)
    DEATHS {dead}                   ---->   (nodes gossip saw die)
    HEARTBEAT {revision}            <--->   (both ways, every heartbeat interval)
                                    <----   ERROR {reason} then close (a broken rule)

Entries and changes are store entries keyed by their store key:
``catalog/nodes/<node>`` (a node record, as :func:`~hostmesh.catalog.record_to_json`),
``catalog/dead/<node>`` (a death report), ``config/...`` (opaque JSON documents:
routes, splits, intentions), ``ca/roots`` (the PEM bundle) and
``ca/revocations`` (the revocation list's JSON), each with the store revision
that wrote it. ``revision`` is the store revision the agent has seen;
resuming from it replays that revision too (applying is idempotent), so a
revision whose events were split over two messages is never half-applied.

Wire: one JSON object per websocket text message, ``{"v": PROTOCOL_VERSION,
"t": MsgType, ...}``. JSON because config values are JSON documents already
and records have a JSON form; every message is bounded (``MAX_MESSAGE_BYTES``)
and every list in it too. A message that breaks a rule raises
:class:`SyncError` whose ``reason`` is one word for a counter; the adapter
closes the connection and writes nothing.

Bounded queues: the server's :class:`ServerSession` queues outgoing messages up
to ``MAX_QUEUED_MESSAGES`` / ``MAX_QUEUED_BYTES``; past that it drops the queue
and marks the session to be sent a fresh snapshot (``resync``) instead of
buffering for an agent that cannot keep up.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hostmesh._errors import LocalProtocolError, RemoteProtocolError

from ._catalog import Catalog
from ._model import NodeRecord, record_from_json, record_to_json

__all__ = [
    "CA_REVOCATIONS_KEY",
    "CA_ROOTS_KEY",
    "CONFIG_PREFIX",
    "DEAD_PREFIX",
    "MAX_CHANGES_PER_MESSAGE",
    "MAX_DEATHS_PER_MESSAGE",
    "MAX_KEY_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_QUEUED_BYTES",
    "MAX_QUEUED_MESSAGES",
    "MAX_SNAPSHOT_ENTRIES",
    "NODES_PREFIX",
    "PROTOCOL_VERSION",
    "SNAPSHOT_CHUNK_BYTES",
    "Applied",
    "Change",
    "ClientState",
    "Deaths",
    "Delta",
    "ErrorMessage",
    "Heartbeat",
    "Hello",
    "Message",
    "MsgType",
    "RecordUpdate",
    "Resumed",
    "ServerSession",
    "Snapshot",
    "SyncError",
    "decode",
    "delta_messages",
    "encode",
    "is_synced_key",
    "snapshot_messages",
]

#: Sent in every message; a peer speaking another version is refused ("version").
PROTOCOL_VERSION = 1

#: Largest websocket message either side accepts. A node record is at most
#: 1 MiB in the binary codec (MAX_RECORD_SIZE) and about twice that as JSON;
#: a snapshot chunk is ~SNAPSHOT_CHUNK_BYTES plus one entry. 4 MiB holds both
#: and bounds what one message makes a peer buffer.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: A snapshot is cut into messages of about this many bytes, so that a 10,000
#: node catalog (~20 MB) streams as ~20 messages instead of one huge one.
SNAPSHOT_CHUNK_BYTES = 1024 * 1024
#: Changes in one DELTA or SNAPSHOT message (a prefix delete of many keys is one revision).
MAX_CHANGES_PER_MESSAGE = 20_000
#: Entries one snapshot may hold across its messages: 10,000 nodes (REFERENCE.md's
#: Consul scale), their death reports and config, with room to spare. The agent
#: buffers an incomplete snapshot, so this bounds that buffer.
MAX_SNAPSHOT_ENTRIES = 200_000
#: Death reports in one DEATHS message: a gossip view of a large partition.
MAX_DEATHS_PER_MESSAGE = 1024
#: Store keys are at most 1,024 bytes (hostmesh.server's MAX_KEY).
MAX_KEY_BYTES = 1024
#: Messages the server queues for one agent before it gives up and resyncs it ...
MAX_QUEUED_MESSAGES = 256
#: ... and bytes: with 10,000 agents 8 MiB each would be 80 GB, but a queue only
#: fills for a stalled agent, and a snapshot (shared by every session) replaces it.
MAX_QUEUED_BYTES = 8 * 1024 * 1024
#: Longest ERROR reason sent or kept.
MAX_REASON = 200

NODES_PREFIX = "catalog/nodes/"
DEAD_PREFIX = "catalog/dead/"
CONFIG_PREFIX = "config/"
CA_ROOTS_KEY = "ca/roots"
CA_REVOCATIONS_KEY = "ca/revocations"


def is_synced_key(key: str) -> bool:
    """The store keys streamed to agents (never the CA's private state under ``ca/``)."""
    return key.startswith((NODES_PREFIX, DEAD_PREFIX, CONFIG_PREFIX)) or key in (
        CA_ROOTS_KEY,
        CA_REVOCATIONS_KEY,
    )


class MsgType(enum.IntEnum):
    """Sync message types. ONLY APPEND TO THIS LIST."""

    HELLO = 1
    SNAPSHOT = 2
    DELTA = 3
    RECORD = 4
    HEARTBEAT = 5
    DEATHS = 6
    RESUMED = 7
    ERROR = 8


class SyncError(RemoteProtocolError):
    """A sync message broke the protocol; ``reason`` is one word for counters.

    Reasons: ``malformed`` (not JSON or wrong shapes), ``too_large``,
    ``version``, ``unexpected`` (a message not allowed in this state or from
    this side), ``identity`` (a record for another node than the certificate's).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One store change: ``value`` is the decoded JSON value, None when ``deleted``."""

    key: str
    revision: int
    value: Any = None
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.deleted:
            return {"k": self.key, "r": self.revision, "del": True}
        return {"k": self.key, "r": self.revision, "v": self.value}


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    revision: int  # the last revision the agent has seen; 0: none
    record: NodeRecord


@dataclass(frozen=True, slots=True)
class Snapshot:
    revision: int
    entries: tuple[Change, ...]
    more: bool  # another SNAPSHOT message of the same snapshot follows


@dataclass(frozen=True, slots=True)
class Delta:
    revision: int  # the highest revision among the changes
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class RecordUpdate:
    record: NodeRecord


@dataclass(frozen=True, slots=True)
class Heartbeat:
    revision: int


@dataclass(frozen=True, slots=True)
class Deaths:
    """Nodes the sender's gossip saw die: node -> the (generation, version) it had then."""

    dead: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class Resumed:
    revision: int  # the server continues after this revision (inclusive replay)


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    reason: str


Message = Hello | Snapshot | Delta | RecordUpdate | Heartbeat | Deaths | Resumed | ErrorMessage


def _dumps(obj: dict[str, Any]) -> str:
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise LocalProtocolError(f"cannot encode a sync message: {exc}") from None
    if len(text.encode()) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"a sync message over {MAX_MESSAGE_BYTES} bytes")
    return text


def encode(msg: Message) -> str:
    """One message as the text of one websocket message.

    Raises:
        LocalProtocolError: the message would exceed a bound.
    """
    body: dict[str, Any] = {"v": PROTOCOL_VERSION}
    if isinstance(msg, Hello):
        body.update(t=MsgType.HELLO, node=msg.node, revision=msg.revision,
                    record=record_to_json(msg.record))  # fmt: skip
    elif isinstance(msg, Snapshot):
        _check_count(len(msg.entries), MAX_CHANGES_PER_MESSAGE, "snapshot entries")
        body.update(t=MsgType.SNAPSHOT, revision=msg.revision,
                    entries=[c.to_json() for c in msg.entries], more=msg.more)  # fmt: skip
    elif isinstance(msg, Delta):
        _check_count(len(msg.changes), MAX_CHANGES_PER_MESSAGE, "delta changes")
        body.update(t=MsgType.DELTA, revision=msg.revision,
                    changes=[c.to_json() for c in msg.changes])  # fmt: skip
    elif isinstance(msg, RecordUpdate):
        body.update(t=MsgType.RECORD, record=record_to_json(msg.record))
    elif isinstance(msg, Heartbeat):
        body.update(t=MsgType.HEARTBEAT, revision=msg.revision)
    elif isinstance(msg, Deaths):
        _check_count(len(msg.dead), MAX_DEATHS_PER_MESSAGE, "death reports")
        body.update(t=MsgType.DEATHS, dead=[list(d) for d in msg.dead])
    elif isinstance(msg, Resumed):
        body.update(t=MsgType.RESUMED, revision=msg.revision)
    else:
        body.update(t=MsgType.ERROR, reason=msg.reason[:MAX_REASON])
    return _dumps(body)


def _check_count(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise LocalProtocolError(f"{n} {what} in one message; at most {limit}")


def _malformed(why: str) -> SyncError:
    return SyncError("malformed", f"malformed sync message: {why}")


def _int(obj: Mapping[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise _malformed(f"{name} must be an integer in 0..2**63-1")
    return value


def _str(obj: Mapping[str, Any], name: str, limit: int = MAX_KEY_BYTES) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value or len(value.encode(errors="replace")) > limit:
        raise _malformed(f"{name} must be a non-empty string of at most {limit} bytes")
    return value


def _list(obj: Mapping[str, Any], name: str, limit: int) -> list[Any]:
    value = obj.get(name)
    if not isinstance(value, list):
        raise _malformed(f"{name} must be a list")
    if len(value) > limit:
        raise SyncError("too_large", f"{len(value)} {name} in one message; at most {limit}")
    return value


def _record(obj: Mapping[str, Any]) -> NodeRecord:
    try:
        return record_from_json(obj.get("record"))
    except (ValueError, OverflowError) as exc:
        raise _malformed(str(exc)) from None


def _change(item: Any) -> Change:
    if not isinstance(item, dict):
        raise _malformed("a change must be an object")
    key = _str(item, "k")
    revision = _int(item, "r")
    if item.get("del") is True:
        return Change(key, revision, None, True)
    if "v" not in item:
        raise _malformed(f"change of {key!r} has neither a value nor del")
    return Change(key, revision, item["v"])


def decode(data: str | bytes) -> Message:
    """Parse one websocket message.

    Raises:
        SyncError: too large, not JSON, another version, unknown type or bad fields.
    """
    size = len(data.encode(errors="replace")) if isinstance(data, str) else len(data)
    if size > MAX_MESSAGE_BYTES:
        raise SyncError("too_large", f"a sync message of {size} bytes; at most {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _malformed("not a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise SyncError("version", f"sync protocol version {obj.get('v')!r}, "
                        f"expected {PROTOCOL_VERSION}")  # fmt: skip
    kind = obj.get("t")
    if (
        isinstance(kind, bool)
        or not isinstance(kind, int)
        or kind not in MsgType._value2member_map_
    ):
        raise _malformed(f"unknown message type {kind!r}")
    t = MsgType(kind)
    if t is MsgType.HELLO:
        return Hello(_str(obj, "node"), _int(obj, "revision"), _record(obj))
    if t is MsgType.SNAPSHOT:
        more = obj.get("more")
        if not isinstance(more, bool):
            raise _malformed("more must be a boolean")
        entries = _list(obj, "entries", MAX_CHANGES_PER_MESSAGE)
        return Snapshot(_int(obj, "revision"), tuple(_change(e) for e in entries), more)
    if t is MsgType.DELTA:
        changes = _list(obj, "changes", MAX_CHANGES_PER_MESSAGE)
        return Delta(_int(obj, "revision"), tuple(_change(c) for c in changes))
    if t is MsgType.RECORD:
        return RecordUpdate(_record(obj))
    if t is MsgType.HEARTBEAT:
        return Heartbeat(_int(obj, "revision"))
    if t is MsgType.DEATHS:
        dead = []
        for item in _list(obj, "dead", MAX_DEATHS_PER_MESSAGE):
            if not isinstance(item, list) or len(item) != 3:
                raise _malformed("a death report is [node, generation, version]")
            parts = dict(zip(("node", "generation", "version"), item, strict=True))
            dead.append((_str(parts, "node"), _int(parts, "generation"), _int(parts, "version")))
        return Deaths(tuple(dead))
    if t is MsgType.RESUMED:
        return Resumed(_int(obj, "revision"))
    reason = obj.get("reason")
    return ErrorMessage(reason[:MAX_REASON] if isinstance(reason, str) else "?")


def _chunks(changes: Iterable[Change]) -> list[list[Change]]:
    """``changes`` cut into runs of about SNAPSHOT_CHUNK_BYTES (and MAX_CHANGES_PER_MESSAGE)."""
    chunks: list[list[Change]] = [[]]
    size = 0
    for change in changes:
        cost = len(json.dumps(change.to_json(), separators=(",", ":"), ensure_ascii=False))
        if chunks[-1] and (
            size + cost > SNAPSHOT_CHUNK_BYTES or len(chunks[-1]) >= MAX_CHANGES_PER_MESSAGE
        ):
            chunks.append([])
            size = 0
        chunks[-1].append(change)
        size += cost
    return chunks


def delta_messages(changes: Iterable[Change]) -> list[str]:
    """Changes in revision order as encoded DELTA messages, each within the size bound.

    Each message's revision is its highest change's; an agent that stops
    between two messages of one revision resumes from that revision
    (inclusive), so nothing is lost.
    """
    return [
        encode(Delta(max(c.revision for c in chunk), tuple(chunk)))
        for chunk in _chunks(changes)
        if chunk
    ]


def snapshot_messages(revision: int, entries: Iterable[Change]) -> list[str]:
    """A snapshot at ``revision`` as encoded SNAPSHOT messages of ~SNAPSHOT_CHUNK_BYTES each.

    The server encodes one snapshot per revision and sends the same strings to
    every agent that needs it.
    """
    chunks = _chunks(entries)
    last = len(chunks) - 1
    return [encode(Snapshot(revision, tuple(chunk), i < last)) for i, chunk in enumerate(chunks)]


# --- the server's side of one connection ----------------------------------------------


class ServerSession:
    """One agent's session on a server: its state, identity check and outgoing queue.

    Args:
        peer_node: the node named by the agent's verified certificate; every
            record it sends must be that node's.
        now: the time the connection was accepted (s, monotonic).
        max_messages, max_bytes: the outgoing queue's bounds.

    States: ``hello`` (waiting for HELLO) -> ``streaming`` -> ``closed``.
    """

    def __init__(
        self,
        peer_node: str,
        now: float,
        *,
        max_messages: int = MAX_QUEUED_MESSAGES,
        max_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self.peer_node = peer_node
        self.state = "hello"
        self.revision = 0  # the agent's revision as of HELLO, then what was queued for it
        self.last_received = now
        self.resync = False  # the queue overflowed: send a fresh snapshot next
        self.resyncs = 0
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes

    # incoming

    def receive(self, data: str | bytes, now: float) -> Message:
        """Parse and check one message from the agent.

        Raises:
            SyncError: see the class; the caller closes the connection.
        """
        msg = decode(data)
        self.last_received = now
        if self.state == "closed":
            raise SyncError("unexpected", "a message after the session closed")
        if self.state == "hello":
            if not isinstance(msg, Hello):
                raise SyncError("unexpected", f"expected HELLO first, got {type(msg).__name__}")
            self._check_node(msg.node)
            self._check_node(msg.record.node.name)
            self.state = "streaming"
            self.revision = msg.revision
            return msg
        if isinstance(msg, RecordUpdate):
            self._check_node(msg.record.node.name)
        elif isinstance(msg, Heartbeat | Deaths):
            pass
        else:
            raise SyncError("unexpected", f"an agent may not send {type(msg).__name__}")
        return msg

    def _check_node(self, node: str) -> None:
        if node != self.peer_node:
            raise SyncError(
                "identity", f"the certificate names node {self.peer_node!r}, the message {node!r}"
            )

    # outgoing

    def push(self, text: str) -> bool:
        """Queue an encoded message; False (and ``resync`` set) when the queue is full."""
        if self.resync or self.state == "closed":
            return False  # a snapshot will carry it, or nobody is listening
        size = len(text)
        if len(self._queue) >= self._max_messages or self._queued_bytes + size > self._max_bytes:
            self._queue.clear()
            self._queued_bytes = 0
            self.resync = True
            self.resyncs += 1
            return False
        self._queue.append(text)
        self._queued_bytes += size
        return True

    def pop(self) -> str | None:
        """The next queued message, or None."""
        if not self._queue:
            return None
        text = self._queue.popleft()
        self._queued_bytes -= len(text)
        return text

    def snapshot_sent(self, revision: int) -> None:
        """A snapshot at ``revision`` replaces whatever was queued before it."""
        self._queue.clear()
        self._queued_bytes = 0
        self.resync = False
        self.revision = revision

    @property
    def queued(self) -> tuple[int, int]:
        """(messages, characters of text) waiting to be sent."""
        return len(self._queue), self._queued_bytes

    def close(self) -> None:
        self.state = "closed"
        self._queue.clear()
        self._queued_bytes = 0


# --- the agent's side -------------------------------------------------------------------


@dataclass
class Applied:
    """What one incoming message changed on the agent."""

    catalog: bool = False  # records merged, forgotten, or liveness changed
    config: bool = False  # config/ entries changed
    ca: bool = False  # CA roots or revocations changed
    snapshot: bool = False  # a snapshot completed
    resumed: bool = False  # the server resumed from our revision
    heartbeat: bool = False
    error: str = ""  # the server's ERROR reason


@dataclass
class _Pending:
    revision: int
    entries: list[Change] = field(default_factory=list)


class ClientState:
    """The agent's view of the server state, fed by SNAPSHOT and DELTA messages.

    Node records go into ``catalog`` through its normal merge (the same as
    gossip's, so duplicates are free); ``config`` and ``ca`` keep the latest
    value per store key with its revision. ``own_node``'s record is never taken
    from a server: the agent owns it.
    """

    FORMAT = "hostmesh-sync"
    VERSION = 1

    def __init__(self, catalog: Catalog, own_node: str) -> None:
        self.catalog = catalog
        self.own_node = own_node
        self.revision = 0
        self.config: dict[str, tuple[int, Any]] = {}
        self.ca: dict[str, tuple[int, str]] = {}
        self.deaths: dict[str, tuple[int, Any]] = {}
        self._marked_dead: set[str] = set()  # nodes set dead because of a server report
        self._from_server: set[str] = set()  # nodes whose records the servers hold
        self._pending: _Pending | None = None

    # outgoing

    def hello(self, record: NodeRecord) -> str:
        return encode(Hello(record.node.name, self.revision, record))

    @staticmethod
    def record(record: NodeRecord) -> str:
        return encode(RecordUpdate(record))

    def heartbeat(self) -> str:
        return encode(Heartbeat(self.revision))

    @staticmethod
    def deaths_message(dead: Iterable[tuple[str, int, int]]) -> str:
        return encode(Deaths(tuple(dead)))

    # incoming

    def receive(self, data: str | bytes) -> Applied:
        """Apply one message from the server.

        Raises:
            SyncError: a broken message; the state is unchanged by it.
        """
        msg = decode(data)
        out = Applied()
        if isinstance(msg, Snapshot):
            if self._pending is None or self._pending.revision != msg.revision:
                self._pending = _Pending(msg.revision)
            checked = [self._check(c) for c in msg.entries]
            if len(self._pending.entries) + len(checked) > MAX_SNAPSHOT_ENTRIES:
                self._pending = None
                raise SyncError("too_large", f"a snapshot of more than {MAX_SNAPSHOT_ENTRIES} "
                                "entries")  # fmt: skip
            self._pending.entries.extend(checked)
            if not msg.more:
                self._apply_snapshot(self._pending, out)
                self._pending = None
        elif isinstance(msg, Delta):
            checked = [self._check(c) for c in msg.changes]
            for change in checked:
                self._apply(change, out)
            self.revision = max(self.revision, msg.revision)
        elif isinstance(msg, Resumed):
            out.resumed = True
            self.revision = max(self.revision, msg.revision)
        elif isinstance(msg, Heartbeat):
            out.heartbeat = True
        elif isinstance(msg, ErrorMessage):
            out.error = msg.reason
        else:
            raise SyncError("unexpected", f"a server may not send {type(msg).__name__}")
        return out

    def _check(self, change: Change) -> Change:
        """Validate a change's value for its key; records are parsed here."""
        key = change.key
        if change.deleted:
            return change
        if key.startswith(NODES_PREFIX):
            try:
                record = record_from_json(change.value)
            except (ValueError, OverflowError) as exc:
                raise _malformed(f"{key}: {exc}") from None
            if record.node.name != key.removeprefix(NODES_PREFIX):
                raise _malformed(f"{key} holds the record of {record.node.name!r}")
            return Change(key, change.revision, record)
        if key.startswith(DEAD_PREFIX):
            value = change.value
            if not isinstance(value, dict):
                raise _malformed(f"{key}: a death report must be an object")
            _int(value, "generation")
            _int(value, "version")
            return change
        if key in (CA_ROOTS_KEY, CA_REVOCATIONS_KEY):
            if not isinstance(change.value, str):
                raise _malformed(f"{key} must be a string")
            return change
        if key.startswith(CONFIG_PREFIX):
            return change
        raise _malformed(f"{key!r} is not a synced key")

    def _apply(self, change: Change, out: Applied) -> None:
        key = change.key
        if key.startswith(NODES_PREFIX):
            node = key.removeprefix(NODES_PREFIX)
            if node == self.own_node:
                return
            if change.deleted:
                self._from_server.discard(node)
                out.catalog |= self.catalog.forget(node)
            else:
                assert isinstance(change.value, NodeRecord)
                self._from_server.add(node)
                if self.catalog.merge(change.value):
                    out.catalog = True
                    self._refresh_death(node, out)
            return
        if key.startswith(DEAD_PREFIX):
            node = key.removeprefix(DEAD_PREFIX)
            if change.deleted:
                self.deaths.pop(node, None)
            elif self._newer(self.deaths, key=node, revision=change.revision):
                self.deaths[node] = (change.revision, change.value)
            if node != self.own_node:
                self._refresh_death(node, out)
            return
        table: dict[str, Any] = self.ca if key.startswith("ca/") else self.config
        if change.deleted:
            if key in table and table[key][0] <= change.revision:
                del table[key]
                self._flag(key, out)
        elif self._newer(table, key=key, revision=change.revision):
            table[key] = (change.revision, change.value)
            self._flag(key, out)

    @staticmethod
    def _newer(table: Mapping[str, tuple[int, Any]], *, key: str, revision: int) -> bool:
        current = table.get(key)
        return current is None or current[0] < revision

    @staticmethod
    def _flag(key: str, out: Applied) -> None:
        if key.startswith("ca/"):
            out.ca = True
        else:
            out.config = True

    def _refresh_death(self, node: str, out: Applied) -> None:
        """A confirmed death report marks the node dead unless its record is newer.

        Only reports a server confirmed (``"confirmed": true``, written by the
        leader after its own probe) count: one agent's gossip view must not
        take a node out of every agent's DNS.
        """
        report = self.deaths.get(node)
        dead = False
        if report is not None and report[1].get("confirmed") is True:
            rec = self.catalog.record(node)
            reported = (report[1]["generation"], report[1]["version"])
            dead = rec is None or rec.key <= reported
        if dead:
            self._marked_dead.add(node)
            out.catalog |= self.catalog.set_node_dead(node, True)
        elif node in self._marked_dead:
            self._marked_dead.discard(node)
            out.catalog |= self.catalog.set_node_dead(node, False)

    def _apply_snapshot(self, pending: _Pending, out: Applied) -> None:
        config: dict[str, tuple[int, Any]] = {}
        ca: dict[str, tuple[int, str]] = {}
        deaths: dict[str, tuple[int, Any]] = {}
        nodes: set[str] = set()
        for change in pending.entries:
            key = change.key
            if change.deleted:
                continue
            if key.startswith(NODES_PREFIX):
                node = key.removeprefix(NODES_PREFIX)
                nodes.add(node)
                if node != self.own_node:
                    assert isinstance(change.value, NodeRecord)
                    out.catalog |= self.catalog.merge(change.value)
            elif key.startswith(DEAD_PREFIX):
                deaths[key.removeprefix(DEAD_PREFIX)] = (change.revision, change.value)
            elif key.startswith("ca/"):
                ca[key] = (change.revision, change.value)
            else:
                config[key] = (change.revision, change.value)
        # Nodes the servers held before and no longer do were reaped meanwhile; nodes
        # only gossip knows (not yet synced with a server) stay.
        for node in self._from_server - nodes - {self.own_node}:
            out.catalog |= self.catalog.forget(node)
        self._from_server = nodes
        out.config = config != self.config
        out.ca = ca != self.ca
        self.config, self.ca = config, ca
        touched = set(self.deaths) | set(deaths)
        self.deaths = deaths
        for node in touched - {self.own_node}:
            self._refresh_death(node, out)
        self.revision = pending.revision
        out.snapshot = True

    # persistence

    def to_bytes(self) -> bytes:
        """The revision, config, CA entries, death reports and the catalog's other
        records: what the agent needs to serve with no server after a restart."""
        records = [
            record_to_json(r) for r in self.catalog if r.node.name != self.own_node and not r.left
        ]
        doc = {
            "format": self.FORMAT,
            "version": self.VERSION,
            "revision": self.revision,
            "config": [[k, r, v] for k, (r, v) in sorted(self.config.items())],
            "ca": [[k, r, v] for k, (r, v) in sorted(self.ca.items())],
            "deaths": [[k, r, v] for k, (r, v) in sorted(self.deaths.items())],
            "records": records,
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    def load(self, data: bytes) -> int:
        """Restore :meth:`to_bytes` output; merges its records; returns how many were taken.

        Raises:
            ValueError: not such a file (the caller starts without it).
        """
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != self.FORMAT:
            raise ValueError("not a hostmesh sync state file")
        if doc.get("version") != self.VERSION:
            raise ValueError(f"unsupported sync state version {doc.get('version')!r}")
        revision = doc.get("revision")
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise ValueError("bad revision")

        def table(name: str) -> dict[str, tuple[int, Any]]:
            rows = doc.get(name)
            if not isinstance(rows, list):
                raise ValueError(f"{name} is not a list")
            out: dict[str, tuple[int, Any]] = {}
            for row in rows:
                if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                        and isinstance(row[1], int)):  # fmt: skip
                    raise ValueError(f"bad {name} entry")
                out[row[0]] = (row[1], row[2])
            return out

        config, ca, deaths = table("config"), table("ca"), table("deaths")
        raw_records = doc.get("records")
        if not isinstance(raw_records, list):
            raise ValueError("records is not a list")
        records = [record_from_json(r) for r in raw_records]
        if any(not isinstance(v, str) for _, v in ca.values()):
            raise ValueError("bad ca entry")
        for _, report in deaths.values():
            if not isinstance(report, dict):
                raise ValueError("bad death report")
            try:
                _int(report, "generation")
                _int(report, "version")
            except SyncError as exc:
                raise ValueError(str(exc)) from None
        self.revision, self.config, self.ca, self.deaths = revision, config, ca, deaths
        records = [r for r in records if r.node.name != self.own_node]
        self._from_server = {r.node.name for r in records}
        taken = self.catalog.merge_all(records)
        scratch = Applied()
        for node in set(deaths) - {self.own_node}:
            self._refresh_death(node, scratch)
        return taken

"""The embedded store: SQLite in WAL mode with fsync on every commit.

Two layers:

- :class:`SQLiteStore`, the synchronous engine: tables, revisions,
  compare-and-swap, the bounded event history and leases. It is thread-safe
  (one lock) and does not know about Trio, so a script or a test can use it
  directly.
- :class:`AsyncSQLiteStore`, the :class:`~hostmesh.server.Store` the server
  uses: every call runs the engine in a worker thread, one at a time, so a
  commit's fsync (milliseconds on a busy disk) never stalls the Trio loop.

Acknowledged means durable: ``synchronous=FULL`` fsyncs the WAL before a
commit returns (``tests/test_server.py`` kills a writer with SIGKILL and
counts). Only one process may use a database file at a time; watches see
the changes made through the same :class:`AsyncSQLiteStore`.

Leases expire on access: every call first revokes the leases whose deadline
has passed, and an idle watch wakes at the next deadline to do it, so
watchers see the delete events without anyone else calling. Deadlines come
from an injectable clock (``time.monotonic`` by default) and are kept in
memory; reopening the file gives every lease a full TTL again (etcd does the
same after a restart or a new leader).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import trio

from hostmesh._errors import Compacted, LeaseNotFound, StoreError, StoreValueError

from ._store import (
    MAX_VALUE,
    Entry,
    Event,
    check_cas,
    check_key,
    check_lease,
    check_prefix,
    check_revision,
    check_ttl,
    check_value,
)

__all__ = ["HISTORY_BYTES", "HISTORY_EVENTS", "AsyncSQLiteStore", "SQLiteStore"]

#: Events kept for watches from a past revision (a reconnecting agent resumes
#: from its revision; older than this, it gets Compacted and re-reads). At a
#: change per second per 100 nodes that is well over a minute of history.
HISTORY_EVENTS = 10_000
#: Bytes of keys and values kept in that history: bounds the disk an event
#: history of large values can take (10,000 x 512 KiB would be 5 GiB).
HISTORY_BYTES = 64 * 1024 * 1024
#: Revisions one watch reads per query; bounds a watcher's memory per step.
WATCH_BATCH_REVISIONS = 256

_PUT, _DELETE = 0, 1
_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL,"
    " create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER)",
    "CREATE TABLE IF NOT EXISTS events (rev INTEGER NOT NULL, seq INTEGER NOT NULL,"
    " kind INTEGER NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,"
    " create_rev INTEGER NOT NULL, lease INTEGER NOT NULL, PRIMARY KEY (rev, seq))"
    " WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " ttl INTEGER NOT NULL)",
)


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string starting with ``prefix`` (None: no bound).

    SQLite compares TEXT bytewise in UTF-8, which is code point order, so
    bumping the last code point bounds the range.
    """
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            bumped = last + 1 if last + 1 != 0xD800 else 0xE000  # skip the surrogates
            return prefix[:-1] + chr(bumped)
        prefix = prefix[:-1]
    return None


def _range(prefix: str, column: str = "key") -> tuple[str, list[Any]]:
    end = _prefix_end(prefix)
    if end is None:
        return f"{column} >= ?", [prefix]
    return f"{column} >= ? AND {column} < ?", [prefix, end]


_P = ParamSpec("_P")


def _locked(
    fn: Callable[Concatenate[SQLiteStore, _P], _T],
) -> Callable[Concatenate[SQLiteStore, _P], _T]:
    """A public engine method: under the lock, expired leases first, sqlite errors translated."""

    @functools.wraps(fn)
    def wrapper(self: SQLiteStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with self._lock, self._translate():
            self._expire_due()
            return fn(self, *args, **kwargs)

    return wrapper


class SQLiteStore:
    """The synchronous engine over one SQLite file; thread-safe.

    Args:
        path: the database file (created if missing); its directory must exist.
        clock: seconds, for lease deadlines (monotonic; tests pass a fake one).
        history_events, history_bytes: the bounds of the event history; the
            oldest revisions are compacted away to stay within both.

    The caller owns the store and closes it with :meth:`close`.

    Raises:
        StoreError: the file cannot be opened or is not a hostmesh store.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        history_events: int = HISTORY_EVENTS,
        history_bytes: int = HISTORY_BYTES,
    ) -> None:
        if history_events < 1 or history_bytes < 2 * MAX_VALUE:
            raise StoreValueError(
                f"history must keep at least 1 event and {2 * MAX_VALUE} bytes (two largest values)"
            )
        self._path = path
        self._clock = clock
        self._history_events = history_events
        self._history_bytes = history_bytes
        self._lock = threading.RLock()
        self._deadlines: dict[int, float] = {}
        with self._translate():
            # check_same_thread=False: the async layer calls from worker threads, one at a time.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                self._open()
            except BaseException:
                self._db.close()
                raise

    def _open(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # fsync on commit: acknowledged = durable
        with self._tx():
            fresh = (
                db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
                ).fetchone()
                is None
            )
            had_events = (
                fresh
                or db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='events'"
                ).fetchone()
                is not None
            )
            for statement in _SCHEMA:
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(kv)")}
            if "lease" not in columns:  # a store from before leases
                db.execute("ALTER TABLE kv ADD COLUMN lease INTEGER NOT NULL DEFAULT 0")
            db.execute("CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('revision', 1)")
            revision = self._meta("revision")
            # The oldest revision a watch may start from: 1 in a fresh store; a store
            # from before the history has none of its past.
            oldest = 1 if had_events else revision + 1
            db.execute("INSERT OR IGNORE INTO meta VALUES ('oldest', ?)", (oldest,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('history_events', 0)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('history_bytes', 0)")
        self._revision = self._meta("revision")
        now = self._clock()
        self._deadlines = {
            int(lease): now + ttl for lease, ttl in db.execute("SELECT id, ttl FROM leases")
        }

    # --- plumbing ---------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self._path}: {exc}") from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):  # no meta table yet while opening
                self._revision = self._meta("revision")
            raise
        self._db.execute("COMMIT")

    def _meta(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return int(row[0])

    def _set_meta(self, name: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value=? WHERE name=?", (value, name))

    def _next_revision(self) -> int:
        self._revision += 1
        self._set_meta("revision", self._revision)
        return self._revision

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def revision(self) -> int:
        """The revision of the last change (kept in memory; no query)."""
        return self._revision

    @property
    def path(self) -> Path:
        return self._path

    # --- reads ------------------------------------------------------------------

    @_locked
    def get(self, key: str) -> Entry | None:
        check_key(key)
        return self._get(key)

    def _get(self, key: str) -> Entry | None:
        row = self._db.execute(
            "SELECT key, value, create_rev, mod_rev, lease FROM kv WHERE key=?", (key,)
        ).fetchone()
        return Entry(row[0], bytes(row[1]), row[2], row[3], row[4]) if row else None

    @_locked
    def list(self, prefix: str) -> builtins.list[Entry]:
        """Entries whose key starts with ``prefix``, sorted by key."""
        check_prefix(prefix)
        where, args = _range(prefix)
        rows = self._db.execute(
            f"SELECT key, value, create_rev, mod_rev, lease FROM kv WHERE {where} ORDER BY key",
            args,
        ).fetchall()
        return [Entry(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows]

    @_locked
    def events(self, prefix: str, from_revision: int) -> tuple[builtins.list[Event], int]:
        """Events under ``prefix`` from ``from_revision`` on, for a bounded window of revisions.

        Returns:
            The events and the revision to continue from.

        Raises:
            Compacted: ``from_revision`` is older than the history.
        """
        oldest = self._meta("oldest")
        if from_revision < oldest:
            raise Compacted(from_revision, oldest)
        upto = min(from_revision + WATCH_BATCH_REVISIONS, self._revision + 1)
        where, args = _range(prefix)
        rows = self._db.execute(
            "SELECT rev, kind, key, value, create_rev, lease FROM events"
            f" WHERE rev >= ? AND rev < ? AND {where} ORDER BY rev, seq",
            [from_revision, upto, *args],
        ).fetchall()
        out = []
        for rev, kind, key, value, create_rev, lease in rows:
            if kind == _PUT:
                out.append(Event("put", Entry(key, bytes(value), create_rev, rev, lease), rev))
            else:
                out.append(Event("delete", Entry(key, b"", 0, rev, 0), rev))
        return out, max(upto, from_revision)

    # --- writes -----------------------------------------------------------------

    @_locked
    def put(self, key: str, value: bytes, *, cas: int | None = None, lease: int = 0) -> int | None:
        """Write ``key``; returns the new revision, or None when ``cas`` did not match.

        ``cas`` is the entry's expected ``mod_revision`` (0: the key must not exist).

        Raises:
            StoreValueError: the key or value is out of bounds.
            LeaseNotFound: ``lease`` is not alive.
        """
        raw_key = check_key(key)
        value = check_value(value)
        check_cas(cas)
        check_lease(lease)
        with self._tx():
            if lease and lease not in self._deadlines:
                raise LeaseNotFound(lease)
            current = self._get(key)
            if cas is not None and (current.mod_revision if current else 0) != cas:
                return None
            rev = self._next_revision()
            create = current.create_revision if current else rev
            self._db.execute(
                "INSERT INTO kv VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE"
                " SET value=excluded.value, mod_rev=excluded.mod_rev, lease=excluded.lease",
                (key, value, create, rev, lease),
            )
            self._record(rev, [(_PUT, key, value, create, lease)], len(raw_key) + len(value))
            return rev

    @_locked
    def delete(self, key: str, *, prefix: bool = False, cas: int | None = None) -> int:
        """Delete a key (or every key under a prefix); returns how many went."""
        if prefix:
            check_prefix(key)
            if cas is not None:
                raise StoreValueError("cas cannot be combined with a prefix delete")
        else:
            check_key(key)
            check_cas(cas)
        with self._tx():
            if prefix:
                where, args = _range(key)
                keys = [r[0] for r in self._db.execute(
                    f"SELECT key FROM kv WHERE {where} ORDER BY key", args
                )]  # fmt: skip
            else:
                current = self._get(key)
                if current is None or (cas is not None and current.mod_revision != cas):
                    return 0
                keys = [key]
            self._delete_keys(keys)
            return len(keys)

    def _delete_keys(self, keys: builtins.list[str]) -> None:
        if not keys:
            return
        rev = self._next_revision()
        self._db.executemany("DELETE FROM kv WHERE key=?", [(k,) for k in keys])
        self._record(
            rev, [(_DELETE, k, b"", 0, 0) for k in keys], sum(len(k.encode()) for k in keys)
        )

    def _record(self, rev: int, events: builtins.list[tuple[Any, ...]], size: int) -> None:
        """Append one revision's events to the history; trim the oldest beyond the bounds."""
        self._db.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(rev, seq, *event) for seq, event in enumerate(events)],
        )
        count = self._meta("history_events") + len(events)
        size += self._meta("history_bytes")
        oldest = self._meta("oldest")
        while count > self._history_events or size > self._history_bytes:
            first, n, b = self._db.execute(
                "SELECT rev, COUNT(*), SUM(length(value) + length(CAST(key AS BLOB)))"
                " FROM events WHERE rev = (SELECT MIN(rev) FROM events)"
            ).fetchone()
            if first is None:
                count = size = 0
                break
            self._db.execute("DELETE FROM events WHERE rev=?", (first,))
            count, size, oldest = count - n, size - b, first + 1
        self._set_meta("history_events", count)
        self._set_meta("history_bytes", size)
        self._set_meta("oldest", oldest)

    @_locked
    def compact(self, revision: int) -> None:
        """Drop the history before ``revision``."""
        check_revision(revision)
        if revision > self._revision:
            raise StoreValueError(
                f"cannot compact to revision {revision}: the current one is {self._revision}"
            )
        with self._tx():
            if revision <= self._meta("oldest"):
                return
            n, b = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(length(value) + length(CAST(key AS BLOB))), 0)"
                " FROM events WHERE rev < ?",
                (revision,),
            ).fetchone()
            self._db.execute("DELETE FROM events WHERE rev < ?", (revision,))
            self._set_meta("history_events", self._meta("history_events") - n)
            self._set_meta("history_bytes", self._meta("history_bytes") - b)
            self._set_meta("oldest", revision)

    def oldest_revision(self) -> int:
        """The oldest revision a watch can start from."""
        with self._lock, self._translate():
            return self._meta("oldest")

    # --- leases -----------------------------------------------------------------

    @_locked
    def lease_grant(self, ttl: int) -> int:
        check_ttl(ttl)
        with self._tx():
            cur = self._db.execute("INSERT INTO leases (ttl) VALUES (?)", (ttl,))
            lease = int(cur.lastrowid or 0)
        self._deadlines[lease] = self._clock() + ttl
        return lease

    @_locked
    def lease_keepalive(self, lease: int) -> int:
        check_lease(lease)
        if lease not in self._deadlines:
            raise LeaseNotFound(lease)
        (ttl,) = self._db.execute("SELECT ttl FROM leases WHERE id=?", (lease,)).fetchone()
        self._deadlines[lease] = self._clock() + ttl
        return int(ttl)

    @_locked
    def lease_revoke(self, lease: int) -> None:
        check_lease(lease)
        if lease not in self._deadlines:
            raise LeaseNotFound(lease)
        self._revoke(lease)

    def _revoke(self, lease: int) -> None:
        with self._tx():
            keys = [r[0] for r in self._db.execute(
                "SELECT key FROM kv WHERE lease=? ORDER BY key", (lease,)
            )]  # fmt: skip
            self._delete_keys(keys)
            self._db.execute("DELETE FROM leases WHERE id=?", (lease,))
        del self._deadlines[lease]

    def _expire_due(self) -> None:
        if not self._deadlines:
            return
        now = self._clock()
        for lease in sorted(k for k, deadline in self._deadlines.items() if deadline <= now):
            self._revoke(lease)

    def seconds_to_next_expiry(self) -> float:
        """Seconds until the next lease deadline by the store's clock (inf: no lease)."""
        with self._lock:
            if not self._deadlines:
                return math.inf
            return max(0.0, min(self._deadlines.values()) - self._clock())

    @_locked
    def expire(self) -> None:
        """Revoke the leases whose deadline has passed (every call does this first)."""


class AsyncSQLiteStore:
    """The :class:`~hostmesh.server.Store` on SQLite, for Trio.

    Opens (and, if needed, creates) the file at construction; the caller owns
    the store and closes it with :meth:`aclose`. Each call runs the engine in
    a worker thread under a lock: calls are serialized, and a cancelled call
    waits for its thread, so a write is either committed or not.

    Args: as :class:`SQLiteStore`.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        history_events: int = HISTORY_EVENTS,
        history_bytes: int = HISTORY_BYTES,
    ) -> None:
        self.engine = SQLiteStore(
            path, clock=clock, history_events=history_events, history_bytes=history_bytes
        )
        self._lock = trio.Lock()
        self._changed = trio.Event()
        self._closed = False

    async def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        if self._closed:
            raise StoreError(f"sqlite store {self.engine.path} is closed")
        async with self._lock:
            before = self.engine.revision
            try:
                return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
            finally:
                if self.engine.revision != before:
                    self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def current_revision(self) -> int:
        await self._run(self.engine.expire)
        return self.engine.revision

    async def get(self, key: str) -> Entry | None:
        return await self._run(self.engine.get, key)

    async def list(self, prefix: str) -> builtins.list[Entry]:
        return await self._run(self.engine.list, prefix)

    async def put(
        self, key: str, value: bytes, *, cas: int | None = None, lease: int = 0
    ) -> int | None:
        return await self._run(self.engine.put, key, value, cas=cas, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False, cas: int | None = None) -> int:
        return await self._run(self.engine.delete, key, prefix=prefix, cas=cas)

    @contextlib.asynccontextmanager
    async def watch(self, prefix: str, from_revision: int = 0) -> AsyncIterator[_SQLiteWatch]:
        check_prefix(prefix)
        check_revision(from_revision, "from_revision")
        start = from_revision or await self.current_revision() + 1
        yield _SQLiteWatch(self, prefix, start)

    async def compact(self, revision: int) -> None:
        await self._run(self.engine.compact, revision)

    async def lease_grant(self, ttl: int) -> int:
        lease = await self._run(self.engine.lease_grant, ttl)
        self._notify()  # idle watches recompute when to wake for expiries
        return lease

    async def lease_keepalive(self, lease: int) -> int:
        return await self._run(self.engine.lease_keepalive, lease)

    async def lease_revoke(self, lease: int) -> None:
        await self._run(self.engine.lease_revoke, lease)

    async def aclose(self) -> None:
        if self._closed:
            return
        async with self._lock:
            self._closed = True
            self.engine.close()
        self._notify()


class _SQLiteWatch:
    """The iterator of one watch; reads the event history, so it never holds more
    than a window of revisions and a slow reader only falls behind (then Compacted)."""

    def __init__(self, store: AsyncSQLiteStore, prefix: str, start: int) -> None:
        self._store = store
        self._prefix = prefix
        self._next = start
        self._buffer: deque[Event] = deque()

    def __aiter__(self) -> _SQLiteWatch:
        return self

    async def __anext__(self) -> Event:
        store = self._store
        while not self._buffer:
            changed = store._changed  # taken before reading: no change is missed
            events, self._next = await store._run(store.engine.events, self._prefix, self._next)
            self._buffer.extend(events)
            if events or self._next <= store.engine.revision:
                continue
            # Idle: wait for a change, or until the next lease expires and deletes keys.
            with trio.move_on_after(store.engine.seconds_to_next_expiry()):
                await changed.wait()
        return self._buffer.popleft()

"""The embedded store: SQLite in WAL mode with fsync on every commit.

Keys are strings, values bytes; every write takes the next store-wide
revision (like etcd's), which is what compare-and-swap checks against. The
server issue adds watches, leases and the etcd backend behind the same
interface.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Entry", "SQLiteStore"]

#: Largest value accepted (etcd's default request limit is 1.5 MiB; Consul KV's is 512 KiB).
MAX_VALUE = 512 * 1024
#: Longest key accepted.
MAX_KEY = 1024


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int


class SQLiteStore:
    """A revisioned key/value store in one SQLite file.

    The caller owns the store and closes it with :meth:`close`.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync on commit: acknowledged = durable
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL,"
            " create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('revision', 1)")

    def close(self) -> None:
        self._db.close()

    @property
    def revision(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name='revision'").fetchone()
        return int(row[0])

    def get(self, key: str) -> Entry | None:
        row = self._db.execute(
            "SELECT key, value, create_rev, mod_rev FROM kv WHERE key=?", (key,)
        ).fetchone()
        return Entry(row[0], bytes(row[1]), row[2], row[3]) if row else None

    def list(self, prefix: str) -> list[Entry]:
        """Entries whose key starts with ``prefix``, sorted by key."""
        rows = self._db.execute(
            "SELECT key, value, create_rev, mod_rev FROM kv WHERE substr(key, 1, ?) = ?"
            " ORDER BY key",
            (len(prefix), prefix),
        ).fetchall()
        return [Entry(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

    def put(self, key: str, value: bytes, *, cas: int | None = None) -> int | None:
        """Write ``key``; returns the new revision, or None when ``cas`` did not match.

        ``cas`` is the entry's expected ``mod_revision`` (0: the key must not exist).

        Raises:
            ValueError: the key or value is out of bounds.
        """
        if not key or len(key) > MAX_KEY:
            raise ValueError(f"key must be 1..{MAX_KEY} characters")
        if len(value) > MAX_VALUE:
            raise ValueError(f"value larger than {MAX_VALUE} bytes")
        with self._tx():
            current = self.get(key)
            if cas is not None and (current.mod_revision if current else 0) != cas:
                return None
            rev = self._next_revision()
            self._db.execute(
                "INSERT INTO kv VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE"
                " SET value=excluded.value, mod_rev=excluded.mod_rev",
                (key, value, rev, rev),
            )
            return rev

    def delete(self, key: str, *, prefix: bool = False, cas: int | None = None) -> int:
        """Delete a key (or every key under a prefix); returns how many went."""
        with self._tx():
            if prefix:
                cur = self._db.execute(
                    "DELETE FROM kv WHERE substr(key, 1, ?) = ?", (len(key), key)
                )
            else:
                current = self.get(key)
                if cas is not None and (current is None or current.mod_revision != cas):
                    return 0
                cur = self._db.execute("DELETE FROM kv WHERE key=?", (key,))
            if cur.rowcount:
                self._next_revision()
            return cur.rowcount

    def _next_revision(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name='revision'")
        return self.revision

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")

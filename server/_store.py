"""The store interface: one revisioned key/value API with watches and leases.

The server keeps its state behind :class:`Store`; two backends implement it
and pass one contract suite (``tests/test_store.py``):
:class:`~hostmesh.server.AsyncSQLiteStore` (one server, a local file) and
:class:`~hostmesh.server.EtcdStore` (several servers on an etcd cluster).

The model is etcd v3's:

- Keys are non-empty strings (at most :data:`MAX_KEY` bytes of UTF-8, no NUL),
  values bytes (at most :data:`MAX_VALUE`).
- Every change takes the next store-wide revision. A delete of several keys
  (a prefix, or the keys of an expired lease) is one revision. A fresh store
  is at revision 1.
- ``cas`` is the ``mod_revision`` a write expects; ``cas=0`` means "the key
  must not exist" (create-only).
- A watch yields every event on a prefix with a revision >= ``from_revision``,
  in revision order (and key order within a revision); ``from_revision=0``
  means "after the watch was created". History is bounded: a watch from a
  compacted revision raises :class:`~hostmesh.Compacted`, whose
  ``oldest_revision`` is where a watch can still start.
- A lease has a TTL in whole seconds (etcd's granularity). Keys put with a
  lease vanish (a delete event) when it expires or is revoked; a keepalive
  restarts the TTL. After a restart of the store (SQLite reopened, a new etcd
  leader) every lease starts a full TTL again, as in etcd.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from hostmesh._errors import StoreValueError

if TYPE_CHECKING:
    from hostmesh._config import StoreConfig

__all__ = [
    "MAX_KEY",
    "MAX_LEASE_TTL",
    "MAX_VALUE",
    "Entry",
    "Event",
    "Store",
    "check_cas",
    "check_key",
    "check_lease",
    "check_prefix",
    "check_revision",
    "check_ttl",
    "check_value",
    "open_store",
]

#: Largest value accepted (Consul KV's limit is 512 KiB; etcd's whole request
#: limit is 1.5 MiB, and base64 in its JSON gateway adds a third).
MAX_VALUE = 512 * 1024
#: Longest key accepted, in bytes of UTF-8 (our keys are paths of names).
MAX_KEY = 1024
#: Longest lease TTL (s). Leases are for liveness (leaders, sessions); state
#: meant to live for weeks is put without one.
MAX_LEASE_TTL = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Entry:
    """A key's current value and revisions (etcd's ``KeyValue``).

    ``lease`` is the lease the key is attached to, 0 for none. In a delete
    :class:`Event`, ``value`` is empty, ``create_revision`` 0 and
    ``mod_revision`` the revision of the delete.
    """

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch: a put or a delete of ``entry.key`` at ``revision``."""

    kind: Literal["put", "delete"]
    entry: Entry
    revision: int


class Store(Protocol):
    """A revisioned key/value store with compare-and-swap, watches and leases.

    The creator owns a store and closes it with :meth:`aclose` (after closing
    its watches). Every method may raise :class:`~hostmesh.StoreValueError`
    for out-of-bounds arguments (before anything is sent or written),
    :class:`~hostmesh.StoreUnavailable` when the backend cannot be reached,
    and :class:`~hostmesh.StoreError` for anything else the backend refused.
    """

    async def current_revision(self) -> int:
        """The revision of the last change (1 for a fresh store)."""
        ...

    async def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or None."""
        ...

    async def list(self, prefix: str) -> builtins.list[Entry]:
        """Entries whose key starts with ``prefix`` ("" = all), sorted by key (bytewise)."""
        ...

    async def put(
        self, key: str, value: bytes, *, cas: int | None = None, lease: int = 0
    ) -> int | None:
        """Write ``key``; returns the new revision, or None when ``cas`` did not match.

        Args:
            cas: the ``mod_revision`` the key must have; 0: it must not exist.
            lease: attach the key to this lease (0: none; a put without a lease
                detaches the key from the one it had).

        Raises:
            LeaseNotFound: ``lease`` is not alive.
        """
        ...

    async def delete(self, key: str, *, prefix: bool = False, cas: int | None = None) -> int:
        """Delete ``key`` (or every key under it with ``prefix``); returns how many went.

        With ``cas`` the key is deleted only if its ``mod_revision`` is ``cas``
        (``cas`` and ``prefix`` together are refused). Deleting nothing takes no
        revision.
        """
        ...

    def watch(
        self, prefix: str, from_revision: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        """Watch ``prefix``: ``async with store.watch(p, rev) as events: async for e in events``.

        Entering returns once the watch is established: with ``from_revision=0``
        every change after that is seen. The iterator never ends on its own;
        leaving the block closes the watch. The iterator raises
        :class:`~hostmesh.Compacted` when ``from_revision`` (or, for a watcher
        that fell behind, its next revision) is no longer in the history.
        """
        ...

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision``; watches from earlier revisions fail.

        Compacting to a revision at or below the current compaction point does
        nothing; a revision above the current one is refused.
        """
        ...

    async def lease_grant(self, ttl: int) -> int:
        """A new lease living ``ttl`` seconds (1..:data:`MAX_LEASE_TTL`); returns its id (> 0)."""
        ...

    async def lease_keepalive(self, lease: int) -> int:
        """Restart the lease's TTL; returns the TTL.

        Raises:
            LeaseNotFound: the lease expired or was revoked: its keys are gone.
        """
        ...

    async def lease_revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys (one revision).

        Raises:
            LeaseNotFound: the lease expired, was revoked or never existed.
        """
        ...

    async def aclose(self) -> None:
        """Release the file or connections. Open watches fail afterwards."""
        ...


# --- argument checks shared by the backends, so both refuse the same things ----------


def check_key(key: str) -> bytes:
    """The key's UTF-8 bytes.

    Raises:
        StoreValueError: empty, longer than :data:`MAX_KEY` bytes, NUL or not encodable.
    """
    if not isinstance(key, str) or not key:
        raise StoreValueError("a key must be a non-empty string")
    return _encode(key, "key")


def check_prefix(prefix: str) -> bytes:
    """Like :func:`check_key`, but "" (every key) is allowed."""
    if not isinstance(prefix, str):
        raise StoreValueError("a prefix must be a string")
    return _encode(prefix, "prefix")


def _encode(text: str, what: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreValueError(f"the {what} is not valid Unicode (a lone surrogate)") from None
    if len(raw) > MAX_KEY:
        raise StoreValueError(f"the {what} is {len(raw)} bytes; keys are at most {MAX_KEY} bytes")
    if b"\0" in raw:
        raise StoreValueError(f"the {what} contains a NUL character")
    return raw


def check_value(value: bytes) -> bytes:
    """Raises StoreValueError unless ``value`` is bytes of at most :data:`MAX_VALUE`."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise StoreValueError(f"a value must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) > MAX_VALUE:
        raise StoreValueError(f"value larger than {MAX_VALUE} bytes ({len(value)} bytes)")
    return value


def check_cas(cas: int | None) -> None:
    if cas is not None and (not isinstance(cas, int) or isinstance(cas, bool) or cas < 0):
        raise StoreValueError(f"cas must be a revision >= 0, got {cas!r}")


def check_revision(revision: int, what: str = "revision") -> None:
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise StoreValueError(f"{what} must be an integer >= 0, got {revision!r}")
    if revision >= 2**63:
        raise StoreValueError(f"{what} {revision} is out of range")


def check_ttl(ttl: int) -> None:
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_LEASE_TTL:
        raise StoreValueError(f"a lease TTL must be 1..{MAX_LEASE_TTL} whole seconds, got {ttl!r}")


def check_lease(lease: int) -> None:
    if not isinstance(lease, int) or isinstance(lease, bool) or not 0 <= lease < 2**63:
        raise StoreValueError(f"a lease id must be an integer in 0..2**63-1, got {lease!r}")


def open_store(config: StoreConfig, data_dir: str | Path) -> Store:
    """The store ``config`` (the server's ``[store]``) names; the caller owns and closes it.

    SQLite's file defaults to ``<data_dir>/store.db``; the directory must exist.
    """
    if config.backend == "etcd":
        from ._etcd import EtcdStore

        return EtcdStore(
            config.endpoints,
            connect_timeout=config.connect_timeout,
            request_timeout=config.request_timeout,
            failover_timeout=config.failover_timeout,
        )
    from ._sqlite import AsyncSQLiteStore

    path = Path(config.path) if config.path else Path(data_dir) / "store.db"
    return AsyncSQLiteStore(
        path, history_events=config.history_events, history_bytes=config.history_bytes
    )

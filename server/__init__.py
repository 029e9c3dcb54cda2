"""Server cluster: stores, CA, agent sync, management API, leader duties."""

from __future__ import annotations

from ._etcd import EtcdStore
from ._external import ExternalChecks
from ._server import Server
from ._sqlite import AsyncSQLiteStore, SQLiteStore
from ._store import MAX_KEY, MAX_LEASE_TTL, MAX_VALUE, Entry, Event, Store, open_store
from ._sync import SyncHub

__all__ = [
    "MAX_KEY",
    "MAX_LEASE_TTL",
    "MAX_VALUE",
    "AsyncSQLiteStore",
    "Entry",
    "EtcdStore",
    "Event",
    "ExternalChecks",
    "SQLiteStore",
    "Server",
    "Store",
    "SyncHub",
    "open_store",
]

"""Server cluster: stores, CA, agent sync, management API, leader duties."""

from __future__ import annotations

from ._server import Server
from ._store import Entry, SQLiteStore

__all__ = ["Entry", "SQLiteStore", "Server"]

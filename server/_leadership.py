"""The leader's lease bookkeeping (sans-IO): when to renew, when leadership ends.

:class:`Leadership` counts the lease from the moment the grant or the last
successful keepalive was *sent*, so its local deadline is never later than the
store's (which counts from receipt): past it, or at the first
``LeaseNotFound``, the server stops acting as the leader before the store can
give the key to another server. The Trio adapter is server/_leader.py.
"""

from __future__ import annotations

import json
import math

from ._store import Entry

__all__ = ["KEEPALIVE_RETRY", "Leadership", "leader_address"]

#: s between retries of a keepalive that failed because the store did not answer
#: (an etcd member failing over answers again within about an election timeout).
KEEPALIVE_RETRY = 0.25


class Leadership:
    """The leader's lease bookkeeping, without I/O: decisions take ``now``.

    Args:
        ttl: the lease TTL (s).
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.leader = False
        self.renewed = -math.inf  # when the last successful grant/keepalive was sent

    def acquired(self, sent_at: float) -> None:
        """The key was created under a lease granted by a request sent at ``sent_at``."""
        self.leader = True
        self.renewed = sent_at

    def renewed_at(self, sent_at: float) -> None:
        """A keepalive sent at ``sent_at`` succeeded."""
        self.renewed = max(self.renewed, sent_at)

    def lost(self) -> None:
        self.leader = False

    @property
    def expires(self) -> float:
        """The local deadline: past it the store may have dropped the lease."""
        return self.renewed + self.ttl

    @property
    def next_keepalive(self) -> float:
        """When to send the next keepalive: a third of the TTL after the last one, so that
        two can fail before the lease runs out."""
        return self.renewed + self.ttl / 3

    def still_leader(self, now: float) -> bool:
        return self.leader and now < self.expires

    def retry_after_failure(self, now: float) -> float | None:
        """When to retry a keepalive that failed at ``now`` (store unreachable), or None
        when the lease may have expired: the leadership is lost."""
        if not self.still_leader(now):
            return None
        return min(now + KEEPALIVE_RETRY, self.expires)


def leader_address(entry: Entry | None) -> str:
    """The address in the leader key's value ("" for none or an unreadable value)."""
    if entry is None:
        return ""
    try:
        doc = json.loads(entry.value)
        address = doc["address"]
    except (ValueError, KeyError, TypeError):
        return ""
    return address if isinstance(address, str) else ""

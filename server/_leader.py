"""Leader election through the store: one server at a time runs the singleton duties.

The leader is the server whose entry sits at :data:`LEADER_KEY`. A server
campaigns by granting itself a lease and creating the key with ``cas=0``
under it (etcd's election recipe, on the :class:`~hostmesh.server.Store`
interface only, so SQLite and etcd behave alike); it keeps the lease alive at
a third of its TTL. Followers watch the key and campaign when it is deleted
(the leader resigned, or its lease expired because it died). With the
embedded SQLite store there is one server, and it is simply the leader.

Safety: a leader stops acting as one *before* the store could have given the
key to another server (:class:`~hostmesh.server._leadership.Leadership`, the
sans-IO bookkeeping, counts the lease from when a grant or keepalive was
sent). A keepalive that fails because the store is briefly unreachable is
retried until the lease's local deadline (one failed call to one etcd member
during an etcd election does not drop the leadership); ``LeaseNotFound``, or
the key gone or held under another lease (checked after every keepalive),
ends it at once.

Duties run under :meth:`LeaderElection.run_while_leader`, which starts them
when this server becomes the leader and cancels them when it stops being one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from hostmesh._errors import LeaseNotFound, StoreError
from hostmesh._log import get_logger
from hostmesh._metrics import Registry

from ._leadership import Leadership, leader_address
from ._store import Store

__all__ = ["LEADER_KEY", "LEASE_TTL", "RESIGN_TIMEOUT", "LeaderElection"]

log = get_logger("hostmesh.server.leader")

#: The store key the leader holds under its lease (Consul: /v1/status/leader).
LEADER_KEY = "leader"
#: s the leader's lease lives (whole seconds: etcd's granularity). A dead
#: leader's duties move within this; 5 s is five etcd election timeouts (1 s
#: default), so an etcd leader change alone does not cost a leadership, while
#: a confirmation or a reap waits at most 5 s for a new leader (none of them
#: is urgent at that scale: gossip already took the node out of its peers' view).
LEASE_TTL = 5
#: s to revoke the lease when a leader stops (shielded; the lease expires anyway).
RESIGN_TIMEOUT = 2.0
#: s between retries when the store fails while following or campaigning.
RETRY_MIN, RETRY_MAX = 0.1, 2.0


class LeaderElection:
    """This server's side of the election; :meth:`run` is its task (never returns).

    Args:
        store: the server's store (not closed here).
        single: the only server (the SQLite store): leader from the start, nothing stored.
        name: this server's name (in the key, for operators).
        ttl: the lease TTL.
        metrics: where the gauge and the counter go.
        resign_on_exit: revoke the lease when cancelled (a graceful stop hands the
            duties over at once); tests turn it off to play a crashed server.

    ``address`` ("host:port" of the API) must be set before :meth:`run`.
    """

    def __init__(
        self,
        store: Store,
        *,
        single: bool,
        name: str = "",
        ttl: int = LEASE_TTL,
        metrics: Registry | None = None,
        resign_on_exit: bool = True,
    ) -> None:
        self.store = store
        self.single = single
        self.name = name
        self.address = ""
        self.resign_on_exit = resign_on_exit
        self.state = Leadership(ttl)
        self.ttl = ttl
        self._leader_address = ""  # the current leader's, as last seen
        self._changed = trio.Event()
        metrics = metrics or Registry()
        self.m_changes = metrics.counter(
            "hostmesh_server_leader_changes_total",
            "Times this server became the leader (acquired) or stopped being it (lost).",
            ("change",),
        )
        metrics.gauge_func(
            "hostmesh_server_leader", "1 while this server is the leader",
            lambda: 1 if self.is_leader else 0,
        )  # fmt: skip

    # --- what others read -------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True while this server may run the leader's duties."""
        if self.single:
            return self.state.leader
        return self.state.still_leader(trio.current_time())

    @property
    def leader_address(self) -> str:
        """The leader's API address ("host:port"; "" while there is none)."""
        return self.address if self.is_leader else self._leader_address

    async def wait_change(self) -> None:
        """Return at the next change of leadership or leader address."""
        await self._changed.wait()

    async def wait_leader(self) -> None:
        while not self.is_leader:
            await self._changed.wait()

    async def wait_follower(self) -> None:
        while self.state.leader:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _set_leader(self, sent_at: float) -> None:
        self.state.acquired(sent_at)
        self.m_changes.labels("acquired").inc()
        log.info("this server is now the leader", server=self.name, address=self.address)
        self._notify()

    def _set_follower(self, why: str) -> None:
        if self.state.leader:
            self.state.lost()
            self._leader_address = ""  # unknown until the key is read again
            self.m_changes.labels("lost").inc()
            log.warning("this server is no longer the leader", server=self.name, reason=why)
            self._notify()

    def _see(self, address: str) -> None:
        if address != self._leader_address:
            self._leader_address = address
            self._notify()

    # --- duties -----------------------------------------------------------------------

    async def run_while_leader(self, duty: Callable[[], Awaitable[Any]]) -> None:
        """Run ``duty()`` whenever this server is the leader; cancel it when it is not.
        Never returns."""
        while True:
            await self.wait_leader()
            async with trio.open_nursery() as nursery:

                async def watch(scope: trio.CancelScope = nursery.cancel_scope) -> None:
                    await self.wait_follower()
                    scope.cancel()

                nursery.start_soon(watch)
                await duty()
                nursery.cancel_scope.cancel()

    # --- the election -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Campaign and follow until cancelled. Reports started once this server knows
        whether it leads (or who does)."""
        if not self.address:
            raise RuntimeError("set LeaderElection.address before run()")
        if self.single:
            self._set_leader(trio.current_time())
            task_status.started()
            await trio.sleep_forever()
        retry = RETRY_MIN
        started = False

        def ready() -> None:  # once: the first outcome, whichever it is
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                entry = await self.store.get(LEADER_KEY)
                if entry is None:
                    await self._campaign(ready)
                else:
                    self._see(leader_address(entry))
                    ready()
                    await self._follow(entry.mod_revision + 1)
                retry = RETRY_MIN
            except StoreError as exc:
                ready()  # the server serves meanwhile, as a follower
                self._set_follower(f"store error: {exc}")
                log.warning("leader election: store error; retrying", error=str(exc),
                            retry=f"{retry:g}s")  # fmt: skip
                await trio.sleep(retry)
                retry = min(2 * retry, RETRY_MAX)

    async def _follow(self, from_revision: int) -> None:
        """Follow the leader key until it is deleted (or for one TTL: then look again,
        which also lets a store that expires leases lazily, SQLite, notice)."""
        with trio.move_on_after(self.ttl):
            async with self.store.watch(LEADER_KEY, from_revision) as events:
                async for event in events:
                    if event.entry.key != LEADER_KEY:
                        continue
                    if event.kind == "delete":
                        self._see("")
                        return
                    self._see(leader_address(event.entry))

    async def _campaign(self, ready: Callable[[], None]) -> None:
        """Try to take the key; while it is ours, keep the lease alive. Returns when the
        attempt failed or the leadership ended."""
        sent_at = trio.current_time()
        lease = await self.store.lease_grant(self.ttl)
        value = json.dumps(
            {"address": self.address, "server": self.name, "since": time.time()},
            separators=(",", ":"),
        ).encode()
        try:
            rev = await self.store.put(LEADER_KEY, value, cas=0, lease=lease)
        except BaseException:
            await self._revoke(lease)
            raise
        if rev is None:  # someone else was faster
            with contextlib.suppress(StoreError):
                await self.store.lease_revoke(lease)
            self._see(leader_address(await self.store.get(LEADER_KEY)))
            ready()
            return
        self._set_leader(sent_at)
        ready()
        try:
            await self._keep(lease)
        finally:
            self._set_follower("lease lost" if self.state.leader else "stopped")
            if self.resign_on_exit:
                await self._revoke(lease)

    async def _revoke(self, lease: int) -> None:
        """Revoke ``lease`` (best effort, shielded, bounded): the key goes at once."""
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(RESIGN_TIMEOUT),
            contextlib.suppress(StoreError),
        ):
            await self.store.lease_revoke(lease)

    async def _keep(self, lease: int) -> None:
        """Keep the lease alive; returns when the leadership is lost."""
        state = self.state
        at = state.next_keepalive
        while True:
            await trio.sleep_until(at)
            sent_at = trio.current_time()
            if not state.still_leader(sent_at):
                self._set_follower("the lease ran out before a keepalive succeeded")
                return
            try:
                with trio.move_on_at(state.expires) as scope:
                    await self.store.lease_keepalive(lease)
            except LeaseNotFound:
                self._set_follower("the lease expired in the store")
                return
            except StoreError as exc:
                retry = state.retry_after_failure(trio.current_time())
                log.warning("leader keepalive failed", error=str(exc))
                if retry is None:
                    self._set_follower(f"keepalives failed: {exc}")
                    return
                at = retry
                continue
            if scope.cancelled_caught:
                self._set_follower("a keepalive did not answer before the lease ran out")
                return
            state.renewed_at(sent_at)
            at = state.next_keepalive
            try:  # the key itself: someone with store access may have deleted it
                entry = await self.store.get(LEADER_KEY)
            except StoreError:
                continue  # the lease is alive; the next round looks again
            if entry is None or entry.lease != lease:
                self._set_follower("the leader key was deleted or taken over")
                return

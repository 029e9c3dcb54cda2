"""The store contract, run against both backends: SQLite in tmp_path and a real etcd.

One suite, parametrized: revisions, compare-and-swap, delete, prefix lists,
watches from now and from the past, compaction, leases (expiry, keepalive,
revoke) and hostile arguments. Then what only one backend has: SQLite's
bounded history and injectable lease clock; etcd's handling of hostile
answers and failover, and a 3-member cluster losing the member a store talks
to (kill -9) without losing an acknowledged write.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import trio_test
from etcd_cluster import EtcdCluster, free_ports

from hostmesh import (
    Compacted,
    ConfigError,
    LeaseNotFound,
    StoreError,
    StoreProtocolError,
    StoreUnavailable,
    StoreValueError,
)
from hostmesh._config import ServerCaConfig, ServerConfig, StoreConfig, from_mapping
from hostmesh.server import (
    MAX_KEY,
    MAX_VALUE,
    AsyncSQLiteStore,
    EtcdStore,
    Event,
    Server,
    SQLiteStore,
    Store,
    open_store,
)
from hostmesh.server._ca_keys import generate_sealing_key

_namespaces = itertools.count()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One real etcd member for the whole module (each test writes under its own prefix)."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1) as cluster:
        yield cluster


class Backend:
    """Opens the store under test inside the test's trio.run; ``ns`` is the test's key prefix."""

    def __init__(self, name: str, tmp_path: Path, etcd: EtcdCluster | None) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.etcd = etcd
        self.ns = f"t{next(_namespaces)}/"

    def make(self) -> Store:
        if self.etcd is not None:
            return EtcdStore(self.etcd.endpoints, failover_timeout=5.0)
        return AsyncSQLiteStore(self.tmp_path / "store.db")

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Store]:
        store = self.make()
        try:
            yield store
        finally:
            await store.aclose()


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.sockets)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    etcd = request.getfixturevalue("etcd") if request.param == "etcd" else None
    return Backend(request.param, tmp_path, etcd)


async def collect(events: AsyncIterator[Event], count: int) -> list[tuple[str, str, bytes, int]]:
    out = []
    async for event in events:
        out.append((event.kind, event.entry.key, event.entry.value, event.revision))
        if len(out) == count:
            break
    return out


# --- the contract -----------------------------------------------------------------


@trio_test(timeout=20)
async def test_revisions_increase_and_compare_and_swap(backend: Backend) -> None:
    ns = backend.ns
    async with backend.open() as store:
        start = await store.current_revision()
        r1 = await store.put(f"{ns}a", b"1")
        assert r1 is not None and r1 > start
        assert await store.current_revision() == r1
        assert await store.put(f"{ns}a", b"x", cas=0) is None  # create-only: it exists
        r2 = await store.put(f"{ns}a", b"2", cas=r1)
        assert r2 is not None and r2 > r1
        assert await store.put(f"{ns}a", b"3", cas=r1) is None  # a stale revision loses
        entry = await store.get(f"{ns}a")
        assert entry is not None
        assert (entry.value, entry.create_revision, entry.mod_revision) == (b"2", r1, r2)
        assert await store.current_revision() == r2  # a failed cas takes no revision
        r3 = await store.put(f"{ns}new", b"", cas=0)  # create-only: it did not exist
        assert r3 is not None and r3 > r2
        created = await store.get(f"{ns}new")
        assert created is not None and (created.value, created.mod_revision) == (b"", r3)
        assert await store.get(f"{ns}missing") is None


@trio_test(timeout=20)
async def test_delete_single_with_cas_and_by_prefix(backend: Backend) -> None:
    ns = backend.ns
    async with backend.open() as store:
        ra = await store.put(f"{ns}a", b"1")
        assert ra is not None
        for key in ("p/1", "p/2", "p/3/x", "pq"):
            await store.put(f"{ns}{key}", b"v")
        before = await store.current_revision()
        assert await store.delete(f"{ns}missing") == 0
        assert await store.current_revision() == before  # deleting nothing takes no revision
        assert await store.delete(f"{ns}a", cas=ra + 100) == 0  # wrong revision: kept
        assert await store.get(f"{ns}a") is not None
        assert await store.delete(f"{ns}a", cas=ra) == 1
        assert await store.get(f"{ns}a") is None
        assert await store.current_revision() == before + 1
        assert await store.delete(f"{ns}p/", prefix=True) == 3
        assert await store.current_revision() == before + 2  # three keys, one revision
        assert [e.key for e in await store.list(ns)] == [f"{ns}pq"]
        with pytest.raises(StoreValueError, match="cas cannot be combined"):
            await store.delete(f"{ns}p", prefix=True, cas=1)


@trio_test(timeout=20)
async def test_list_by_prefix_is_sorted_and_exact(backend: Backend) -> None:
    ns = backend.ns
    keys = ["b", "a/2", "a/10", "a", "a/1", "ab", "a%", "a_", "é", "a/\U0001f600", "z"]
    async with backend.open() as store:
        for key in keys:
            await store.put(f"{ns}{key}", key.encode())
        await store.put("outside/" + ns, b"x")
        listed = await store.list(ns)
        assert [e.key for e in listed] == sorted((f"{ns}{k}" for k in keys), key=str.encode)
        assert all(e.value == e.key.removeprefix(ns).encode() for e in listed)
        assert [e.key.removeprefix(ns) for e in await store.list(f"{ns}a/")] == [
            "a/1", "a/10", "a/2", "a/\U0001f600",
        ]  # fmt: skip
        assert await store.list(f"{ns}a%") == [listed[1]]  # no LIKE wildcards
        assert await store.list(f"{ns}nothing") == []


@trio_test(timeout=20)
async def test_watch_from_now_sees_later_changes_in_order(backend: Backend) -> None:
    ns = backend.ns
    async with backend.open() as store:
        await store.put(f"{ns}w/old", b"before the watch")
        async with store.watch(f"{ns}w/") as events:
            r1 = await store.put(f"{ns}w/a", b"1")
            await store.put(f"{ns}other", b"not watched")
            r2 = await store.put(f"{ns}w/a", b"2")
            r3 = await store.put(f"{ns}w/b", b"3")
            await store.delete(f"{ns}w/", prefix=True)
            r4 = await store.current_revision()
            seen = await collect(events, 6)
        assert seen == [
            ("put", f"{ns}w/a", b"1", r1),
            ("put", f"{ns}w/a", b"2", r2),
            ("put", f"{ns}w/b", b"3", r3),
            ("delete", f"{ns}w/a", b"", r4),
            ("delete", f"{ns}w/b", b"", r4),
            ("delete", f"{ns}w/old", b"", r4),
        ]


@trio_test(timeout=20)
async def test_watch_from_a_past_revision_replays_every_event_then_follows(
    backend: Backend,
) -> None:
    ns = backend.ns
    async with backend.open() as store:
        r1 = await store.put(f"{ns}k/1", b"a")
        r2 = await store.put(f"{ns}k/2", b"b")
        await store.put(f"{ns}zzz", b"elsewhere")
        r3 = await store.put(f"{ns}k/1", b"c")
        await store.delete(f"{ns}k/2")
        r4 = await store.current_revision()
        async with store.watch(f"{ns}k/", from_revision=r2) as events:
            past = await collect(events, 3)
            r5 = await store.put(f"{ns}k/3", b"d")
            live = await collect(events, 1)
        assert past == [
            ("put", f"{ns}k/2", b"b", r2),
            ("put", f"{ns}k/1", b"c", r3),
            ("delete", f"{ns}k/2", b"", r4),
        ]
        assert live == [("put", f"{ns}k/3", b"d", r5)]
        async with store.watch(f"{ns}k/1", from_revision=r1) as events:
            first = await collect(events, 2)
        assert [(kind, value) for kind, _, value, _ in first] == [("put", b"a"), ("put", b"c")]


@trio_test(timeout=20)
async def test_watch_from_a_compacted_revision_fails_with_the_oldest_one(
    backend: Backend,
) -> None:
    ns = backend.ns
    async with backend.open() as store:
        r1 = await store.put(f"{ns}c", b"1")
        r2 = await store.put(f"{ns}c", b"2")
        r3 = await store.put(f"{ns}c", b"3")
        assert r1 is not None and r2 is not None and r3 is not None
        await store.compact(r2)
        await store.compact(r1)  # behind the compaction point: nothing happens
        with pytest.raises(Compacted) as caught:
            async with store.watch(f"{ns}c", from_revision=r1) as events:
                await collect(events, 1)
        assert caught.value.oldest_revision == r2
        assert f"revision {r1} has been compacted" in str(caught.value)
        async with store.watch(f"{ns}c", from_revision=r2) as events:
            assert [v for _, _, v, _ in await collect(events, 2)] == [b"2", b"3"]
        assert (await store.get(f"{ns}c")) is not None  # compaction keeps the data
        with pytest.raises(StoreValueError):
            await store.compact(r3 + 1000)  # a future revision


@trio_test(timeout=30)
async def test_leases_expire_keepalive_holds_and_revoke_deletes(backend: Backend) -> None:
    ns = backend.ns
    async with backend.open() as store:
        short = await store.lease_grant(1)
        held = await store.lease_grant(2)
        assert short > 0 and held > 0 and short != held
        granted = trio.current_time()
        await store.put(f"{ns}l/short", b"s", lease=short)
        await store.put(f"{ns}l/held", b"h", lease=held)
        await store.put(f"{ns}l/plain", b"p")
        entry = await store.get(f"{ns}l/short")
        assert entry is not None and entry.lease == short

        async def keep_alive() -> None:
            while True:
                assert await store.lease_keepalive(held) == 2
                await trio.sleep(0.4)

        async with store.watch(f"{ns}l/") as events, trio.open_nursery() as nursery:
            nursery.start_soon(keep_alive)
            expired = await collect(events, 1)
            elapsed = trio.current_time() - granted
            assert expired[0][:2] == ("delete", f"{ns}l/short")
            assert elapsed >= 0.8, f"a 1 s lease expired after {elapsed:.2f} s"
            assert await store.get(f"{ns}l/short") is None
            with pytest.raises(LeaseNotFound):
                await store.lease_keepalive(short)
            await trio.sleep_until(granted + 3.0)  # 1.5 TTLs of the held lease
            assert await store.get(f"{ns}l/held") is not None
            nursery.cancel_scope.cancel()
        before = await store.current_revision()
        await store.lease_revoke(held)
        assert await store.get(f"{ns}l/held") is None
        assert await store.current_revision() == before + 1
        assert [e.key for e in await store.list(f"{ns}l/")] == [f"{ns}l/plain"]
        with pytest.raises(LeaseNotFound):
            await store.lease_keepalive(held)
        with pytest.raises(LeaseNotFound):
            await store.lease_revoke(held)
        with pytest.raises(LeaseNotFound):
            await store.put(f"{ns}l/late", b"x", lease=held)
        # A put without the lease detaches the key: it outlives the lease.
        lease = await store.lease_grant(60)
        await store.put(f"{ns}l/moved", b"1", lease=lease)
        await store.put(f"{ns}l/moved", b"2")
        await store.lease_revoke(lease)
        moved = await store.get(f"{ns}l/moved")
        assert moved is not None and (moved.value, moved.lease) == (b"2", 0)


@trio_test(timeout=20)
async def test_hostile_arguments_get_clear_errors_and_nothing_is_written(
    backend: Backend,
) -> None:
    ns = backend.ns
    async with backend.open() as store:
        before = await store.current_revision()
        refused: list[tuple[Callable[[], Any], str]] = [
            (lambda: store.put(f"{ns}big", b"x" * (MAX_VALUE + 1)), "value larger than"),
            (lambda: store.put(ns + "k" * MAX_KEY, b""), f"at most {MAX_KEY} bytes"),
            (lambda: store.put("", b"v"), "non-empty"),
            (lambda: store.put(f"{ns}nul\0", b"v"), "NUL"),
            (lambda: store.put(f"{ns}\udc80", b"v"), "surrogate"),
            (lambda: store.put(f"{ns}s", "text"), "must be bytes"),  # type: ignore[arg-type]
            (lambda: store.put(f"{ns}c", b"v", cas=-1), "cas must be"),
            (lambda: store.get(ns + "é" * MAX_KEY), "bytes"),
            (lambda: store.list(ns + "x" * (MAX_KEY + 1)), "prefix"),
            (lambda: store.lease_grant(0), "lease TTL"),
            (lambda: store.lease_grant(10**12), "lease TTL"),
            (lambda: store.lease_keepalive(-5), "lease id"),
            (lambda: store.compact(-1), "revision"),
        ]
        for call, message in refused:
            with pytest.raises(StoreValueError, match=message):
                await call()
        with pytest.raises(StoreValueError, match="from_revision"):
            async with store.watch(ns, from_revision=-1):
                pass
        with pytest.raises(LeaseNotFound):
            await store.put(f"{ns}l", b"v", lease=123456789)
        assert await store.current_revision() == before
        assert await store.list(ns) == []
        # The largest value and key are accepted and come back whole.
        biggest = bytes(range(256)) * (MAX_VALUE // 256)
        longest = ns + "k" * (MAX_KEY - len(ns))
        assert await store.put(longest, biggest) is not None
        entry = await store.get(longest)
        assert entry is not None and entry.value == biggest


# --- SQLite only -------------------------------------------------------------------


@trio_test(timeout=20)
async def test_sqlite_history_is_bounded_and_compacts_itself(tmp_path: Path) -> None:
    store = AsyncSQLiteStore(tmp_path / "s.db", history_events=5)
    try:
        revisions = [await store.put(f"h/{i}", b"v") for i in range(10)]
        with pytest.raises(Compacted) as caught:
            async with store.watch("h/", from_revision=revisions[0] or 0) as events:
                await collect(events, 1)
        assert caught.value.oldest_revision == revisions[5]
        async with store.watch("h/", from_revision=revisions[5] or 0) as events:
            assert [k for _, k, _, _ in await collect(events, 5)] == [
                f"h/{i}" for i in range(5, 10)
            ]
    finally:
        await store.aclose()
    with pytest.raises(StoreValueError):
        SQLiteStore(tmp_path / "t.db", history_bytes=100)


@trio_test(timeout=20)
async def test_sqlite_leases_follow_the_injected_clock_and_restart_full_after_reopen(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    store = AsyncSQLiteStore(tmp_path / "s.db", clock=lambda: now[0])
    try:
        lease = await store.lease_grant(10)
        r1 = await store.put("k", b"v", lease=lease)
        now[0] += 9.9
        assert await store.get("k") is not None
        assert await store.lease_keepalive(lease) == 10  # deadline: now + 10
        now[0] += 9.9
        assert await store.get("k") is not None
        now[0] += 0.2
        assert await store.get("k") is None  # expired on access
        assert await store.current_revision() == (r1 or 0) + 1
        async with store.watch("k", from_revision=r1 or 0) as events:
            assert [kind for kind, *_ in await collect(events, 2)] == ["put", "delete"]
        with pytest.raises(LeaseNotFound):
            await store.lease_keepalive(lease)
        survivor = await store.lease_grant(10)
        await store.put("s", b"v", lease=survivor)
    finally:
        await store.aclose()
    # Reopened much later: the lease gets a full TTL again (as etcd after a restart).
    now[0] += 3600
    store = AsyncSQLiteStore(tmp_path / "s.db", clock=lambda: now[0])
    try:
        assert await store.get("s") is not None
        now[0] += 10.1
        assert await store.get("s") is None
        assert await store.lease_grant(5) > survivor  # ids are never reused
    finally:
        await store.aclose()


@trio_test(timeout=10)
async def test_sqlite_idle_watch_wakes_to_expire_a_lease(tmp_path: Path) -> None:
    """No other call touches the store: the watch itself expires the lease on time."""
    store = AsyncSQLiteStore(tmp_path / "s.db")
    try:
        lease = await store.lease_grant(1)
        granted = trio.current_time()
        await store.put("idle/k", b"v", lease=lease)
        async with store.watch("idle/") as events:
            [(kind, key, _, _)] = await collect(events, 1)
        elapsed = trio.current_time() - granted
        assert (kind, key) == ("delete", "idle/k")
        assert 0.9 <= elapsed < 2.0, elapsed
    finally:
        await store.aclose()


def test_sqlite_opens_a_store_from_before_history_and_leases(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute(
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL,"
        " create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL)"
    )
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER)")
    db.execute("INSERT INTO meta VALUES ('revision', 7)")
    db.execute("INSERT INTO kv VALUES ('kv/a', x'31', 3, 7)")
    db.commit()
    db.close()
    store = SQLiteStore(tmp_path / "old.db")
    try:
        entry = store.get("kv/a")
        assert entry is not None and (entry.value, entry.mod_revision, entry.lease) == (b"1", 7, 0)
        with pytest.raises(Compacted) as caught:
            store.events("kv/", 1)
        assert caught.value.oldest_revision == 8
        assert store.put("kv/a", b"2") == 8
        assert store.events("kv/", 8)[0][0].entry.value == b"2"
    finally:
        store.close()
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        SQLiteStore(tmp_path / "junk.db")


# --- etcd only: hostile answers and failover, with a mock transport ----------------


def mock_etcd(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> EtcdStore:
    return EtcdStore(
        kw.pop("endpoints", ["http://a.test:2379"]),
        transport=httpx.MockTransport(handler),
        failover_timeout=kw.pop("failover_timeout", 0.3),
        **kw,
    )


HEADER = {"header": {"revision": "7"}}


def _kvs(*kvs: dict[str, Any]) -> bytes:
    return json.dumps({**HEADER, "kvs": list(kvs)}).encode()


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (200, b"<html>hello</html>", StoreProtocolError, "not JSON"),
        (200, b"[1, 2]", StoreProtocolError, "not an object"),
        (200, b"{}", StoreProtocolError, "header"),
        (200, json.dumps({"header": {"revision": "-3"}}).encode(), StoreProtocolError, "revision"),
        (200, _kvs({"key": "%%%"}), StoreProtocolError, "base64"),
        (200, _kvs({"key": "/w=="}), StoreProtocolError, "UTF-8"),
        (200, json.dumps({**HEADER, "kvs": {"a": 1}}).encode(), StoreProtocolError, "not a list"),
        (200, _kvs({"key": "YQ==", "mod_revision": "9" * 30}), StoreProtocolError, "mod_revision"),
        (200, b"[" * 100_000, StoreProtocolError, "not JSON"),
        (500, b"Internal Server Error", StoreProtocolError, "not JSON"),
        (404, b'{"error": "x"}', StoreProtocolError, "without a code"),
        (400, b'{"code": 3, "message": "etcdserver: key is not provided"}', StoreValueError,
         "key is not provided"),
        (400, json.dumps({"code": 9, "message": "m" * 5000}).encode(), Exception, "gRPC code 9"),
    ],
)  # fmt: skip
@trio_test(timeout=10)
async def test_etcd_hostile_answers_are_clear_errors(
    status: int, body: bytes, error: type[Exception], message: str
) -> None:
    store = mock_etcd(lambda request: httpx.Response(status, content=body))
    try:
        with pytest.raises(error, match=message) as caught:
            await store.get("a")
        assert len(str(caught.value)) < 600  # a hostile error text is cut short
    finally:
        await store.aclose()


@trio_test(timeout=10)
async def test_etcd_fails_over_and_reports_every_endpoint_when_all_are_down() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "down.test":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"header": {"revision": "12"}})

    store = mock_etcd(handler, endpoints=["http://down.test:2379", "http://up.test:2379"])
    try:
        assert await store.current_revision() == 12
        assert store.endpoint == "http://up.test:2379"
        assert await store.current_revision() == 12
        assert seen == ["down.test", "up.test", "up.test"]  # sticks to the one that answers
    finally:
        await store.aclose()

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    store = mock_etcd(down, endpoints=["http://a.test:1", "http://b.test:2"])
    try:
        start = trio.current_time()
        with pytest.raises(StoreUnavailable, match=r"a\.test.*b\.test"):
            await store.put("k", b"v")
        assert trio.current_time() - start < 2.0
    finally:
        await store.aclose()


@trio_test(timeout=10)
async def test_etcd_lost_answers_retry_reads_but_not_writes() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1 or request.url.path == "/v3/kv/put":
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(200, json=HEADER)

    store = mock_etcd(handler, endpoints=["http://a.test:1", "http://b.test:2"])
    try:
        assert await store.get("k") is None  # the read was repeated on the other member
        with pytest.raises(StoreUnavailable, match="may or may not have been applied"):
            await store.put("k", b"v")
        assert calls == ["/v3/kv/range", "/v3/kv/range", "/v3/kv/put"]
    finally:
        await store.aclose()


@trio_test(timeout=10)
async def test_etcd_watch_stream_hostile_messages() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        created = json.dumps({"result": {**HEADER, "created": True}})
        bad = json.dumps({"result": {"events": [{"type": "EXPLODE", "kv": {"key": "YQ=="}}]}})
        return httpx.Response(200, content=(created + "\n" + bad + "\n").encode())

    store = mock_etcd(handler)
    try:
        with pytest.raises(StoreProtocolError, match="EXPLODE"):
            async with store.watch("a") as events:
                await collect(events, 1)
    finally:
        await store.aclose()


@trio_test(timeout=10)
async def test_etcd_watch_reconnects_with_backoff_when_streams_keep_ending() -> None:
    """A member that confirms the watch and hangs up at once is not hammered in a loop."""
    opened: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        opened.append(json.loads(request.content)["create_request"])
        created = json.dumps({"result": {**HEADER, "created": True}})
        return httpx.Response(200, content=(created + "\n").encode())

    store = mock_etcd(handler)
    try:
        async with store.watch("a") as events:
            with trio.move_on_after(1.0):
                await collect(events, 1)
        assert 3 <= len(opened) <= 10, opened  # 0, 50, 100, 200, 400 ms... apart
        # The first watch starts "now" (revision 7 + 1); every reopening resumes there.
        assert "start_revision" not in opened[0]
        assert {r.get("start_revision") for r in opened[1:]} == {"8"}
    finally:
        await store.aclose()


# --- config and the server on each backend -----------------------------------------


def test_store_config_defaults_and_strict_validation() -> None:
    cfg = from_mapping(ServerConfig, {})
    assert cfg.store == StoreConfig() and cfg.store.backend == "sqlite"
    etcd = from_mapping(
        ServerConfig,
        {
            "store": {
                "backend": "etcd",
                "endpoints": ["http://10.0.0.1:2379"],
                "request_timeout": "2s",
            },
            "ca": {"sealing_key_file": "/etc/hostmesh/ca-sealing.key"},  # etcd needs one
        },
    )
    assert etcd.store.endpoints == ("http://10.0.0.1:2379",) and etcd.store.request_timeout == 2.0
    bad = [
        ({"backend": "zookeeper"}, "store.backend", "one of 'sqlite', 'etcd'"),
        ({"backend": "etcd", "endpoints": []}, "store.endpoints", "at least one"),
        ({"endpoints": ["10.0.0.1:2379"]}, "store.endpoints[0]", "http(s)://host:port"),
        ({"endpoints": ["http://h:2379/v3"]}, "store.endpoints[0]", "http(s)://host:port"),
        ({"endpoints": ["http://h:99999"]}, "store.endpoints[0]", "http(s)://host:port"),
        ({"endpoints": ["http://h:1", "http://h:1"]}, "store.endpoints", "twice"),
        ({"failover_timeout": 0}, "store.failover_timeout", "> 0"),
        ({"request_timeout": "1h"}, "store.request_timeout", "at most"),
        ({"history_events": 0}, "store.history_events", ">= 1"),
        ({"history_bytes": 1000}, "store.history_bytes", "1 MiB"),
        ({"etcd": True}, "store.etcd", "unknown key"),
    ]
    for store, key, reason in bad:
        with pytest.raises(ConfigError) as caught:
            from_mapping(ServerConfig, {"store": store}, source="server.toml")
        assert caught.value.file == "server.toml"
        assert caught.value.key == key, store
        assert reason in caught.value.reason, (store, caught.value.reason)


@pytest.mark.sockets
@trio_test(timeout=30)
async def test_server_kv_api_on_each_backend(backend: Backend) -> None:
    """The Consul KV API works the same on either store; store errors are HTTP errors."""
    ca = ServerCaConfig()
    if backend.etcd is not None:
        store_cfg = StoreConfig(backend="etcd", endpoints=tuple(backend.etcd.endpoints))
        seal_key = backend.tmp_path / "seal.key"  # etcd keeps the CA root key sealed with it
        seal_key.write_text(generate_sealing_key())
        seal_key.chmod(0o600)
        ca = ServerCaConfig(sealing_key_file=str(seal_key))
    else:
        store_cfg = StoreConfig(path=str(backend.tmp_path / "kv.db"))
    cfg = ServerConfig(
        bind="127.0.0.1:0", data_dir=str(backend.tmp_path / "srv"), store=store_cfg, ca=ca
    )
    key = f"/v1/kv/{backend.ns}cfg"
    async with trio.open_nursery() as nursery:
        server = Server(cfg, print_token=False)
        host, port = await nursery.start(server.run)
        token = server.management_token_file.read_text().strip()
        tls = ssl.create_default_context(cadata=server.ca.bundle_pem().decode())
        tls.check_hostname = False  # the server is spiffe://mesh/server/<name>
        async with httpx.AsyncClient(
            base_url=f"https://{host}:{port}",
            timeout=10,
            headers={"Authorization": f"Bearer {token}"},
            verify=tls,
        ) as http:
            assert (await http.put(key, content=b"1")).json() is True
            [entry] = (await http.get(key)).json()
            index = entry["ModifyIndex"]
            assert int((await http.get(key)).headers["X-Consul-Index"]) >= index
            assert not (await http.put(f"{key}?cas={index + 1000}", content=b"2")).json()
            assert (await http.put(f"{key}?cas={index}", content=b"2")).json()
            assert (await http.get(f"{key}?raw")).content == b"2"
            r = await http.put(f"/v1/kv/{backend.ns}{'k' * 2000}", content=b"")
            assert r.status_code == 400 and "at most" in r.text
            r = await http.delete(f"/v1/kv/{backend.ns}?recurse&cas=3")
            assert r.status_code == 400
        nursery.cancel_scope.cancel()
    store = open_store(store_cfg, backend.tmp_path / "srv")
    try:
        entry_after = await store.get(f"kv/{backend.ns}cfg")
        assert entry_after is not None and entry_after.value == b"2"
    finally:
        await store.aclose()


@pytest.mark.sockets
@trio_test(timeout=20)
async def test_server_does_not_start_when_etcd_is_unreachable(tmp_path: Path) -> None:
    """The CA and the tokens live in the store: without it the server refuses to start,
    naming the endpoint (systemd restarts it), instead of listening without a CA."""
    [dead] = [f"http://127.0.0.1:{port}" for port in free_ports(1)]  # nothing listens there
    store = StoreConfig(backend="etcd", endpoints=(dead,), failover_timeout=0.5)
    seal_key = tmp_path / "seal.key"
    seal_key.write_text(generate_sealing_key())
    seal_key.chmod(0o600)
    ca = ServerCaConfig(sealing_key_file=str(seal_key))
    cfg = ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path), store=store, ca=ca)
    with pytest.raises(StoreUnavailable, match=dead):
        await Server(cfg).run()


# --- HA: a 3-member cluster loses the member the store talks to --------------------


@pytest.mark.sockets
def test_etcd_fails_over_on_kill_9_and_loses_no_acknowledged_write(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path, size=3, heartbeat_ms=100, election_ms=1000) as cluster:

        @trio_test(timeout=60)
        async def scenario() -> None:
            store = EtcdStore(cluster.endpoints, failover_timeout=20.0)
            acked: dict[str, bytes] = {}
            seen: dict[str, bytes] = {}
            killed: list[str] = []
            try:
                async with store.watch("ha/") as events, trio.open_nursery() as nursery:

                    async def watch() -> None:
                        async for event in events:
                            seen[event.entry.key] = event.entry.value

                    nursery.start_soon(watch)
                    for i in range(120):
                        key, value = f"ha/{i:04}", f"value {i}".encode()
                        if i == 40:
                            killed.append(store.endpoint)
                            cluster.kill(store.endpoint)
                        while True:
                            try:
                                await store.put(key, value)
                            except StoreUnavailable:
                                continue  # outcome unknown: a plain put may be repeated
                            acked[key] = value
                            break
                    with trio.fail_after(20):
                        while len(seen) < len(acked):
                            await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
                assert store.endpoint != killed[0]
                stored = {e.key: e.value for e in await store.list("ha/")}
                assert stored == acked  # every acknowledged write is there
                assert seen == acked  # and the watch, moved to a survivor, missed none
            finally:
                await store.aclose()

        scenario()
        assert len(cluster.endpoints) == 3

"""The sync protocol without sockets: messages, the server's session, the agent's state."""

from __future__ import annotations

import json

import pytest

from hostmesh import ConfigError, LocalProtocolError
from hostmesh._config import AgentConfig, SyncConfig, from_mapping
from hostmesh.agent._sync import backoff_delay
from hostmesh.catalog import Catalog, Node, NodeRecord, ServiceInstance, record_to_json
from hostmesh.catalog._syncproto import (
    MAX_CHANGES_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    Change,
    ClientState,
    Deaths,
    Delta,
    ErrorMessage,
    Heartbeat,
    Hello,
    RecordUpdate,
    Resumed,
    ServerSession,
    Snapshot,
    SyncError,
    decode,
    delta_messages,
    encode,
    is_synced_key,
    snapshot_messages,
)


def rec(node: str, version: int = 1, generation: int = 1, **kw: object) -> NodeRecord:
    return NodeRecord(Node(node, "10.0.0.1", az="a"), generation, version, **kw)  # type: ignore[arg-type]


def web(node: str, version: int = 1) -> NodeRecord:
    return rec(node, version, services=(ServiceInstance("web-1", "web", "", 8080),))


def put(key: str, revision: int, value: object) -> Change:
    return Change(key, revision, value)


def node_change(record: NodeRecord, revision: int) -> Change:
    return Change(f"catalog/nodes/{record.node.name}", revision, record_to_json(record))


MESSAGES = [
    Hello("a", 7, web("a")),
    Snapshot(9, (put("config/traffic/web", 3, {"rate_limit": 5}),), True),
    Delta(10, (Change("config/x", 10, None, True), node_change(web("b"), 9))),
    RecordUpdate(web("a", 2)),
    Heartbeat(10),
    Deaths((("b", 1, 4),)),
    Resumed(8),
    ErrorMessage("identity: no"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_and_every_prefix_is_refused(msg: object) -> None:
    text = encode(msg)  # type: ignore[arg-type]
    again = decode(text)
    assert encode(again) == text
    if not isinstance(msg, Delta | Snapshot):  # records come back parsed there
        assert again == msg
    # Fed one byte at a time, no proper prefix is a message: each is a clean SyncError.
    for end in range(len(text)):
        with pytest.raises(SyncError):
            decode(text[:end])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe garbage", "malformed"),
        ("[1, 2]", "malformed"),
        ('{"v": 2, "t": 5, "revision": 1}', "version"),
        ('{"v": 1, "t": 99}', "malformed"),
        ('{"v": 1, "t": true, "revision": 1}', "malformed"),
        ('{"v": 1, "t": 5, "revision": -1}', "malformed"),
        ('{"v": 1, "t": 5, "revision": 1.5}', "malformed"),
        ('{"v": 1, "t": 3, "revision": 1, "changes": [{"k": "", "r": 1, "v": 1}]}', "malformed"),
        ('{"v": 1, "t": 3, "revision": 1, "changes": [{"k": "config/a", "r": 1}]}', "malformed"),
        ('{"v": 1, "t": 4, "record": {"node": {}}}', "malformed"),
        ('{"v": 1, "t": 6, "dead": [["b", 1]]}', "malformed"),
        ("[" * 100_000 + "]" * 100_000, "malformed"),
        ("x" * (MAX_MESSAGE_BYTES + 1), "too_large"),
        (
            json.dumps(
                {
                    "v": 1,
                    "t": 3,
                    "revision": 1,
                    "changes": [{"k": "config/a", "r": 1, "v": 0}] * (MAX_CHANGES_PER_MESSAGE + 1),
                }
            ),
            "too_large",
        ),
    ],
)
def test_hostile_messages_are_refused_with_a_reason(data: str | bytes, reason: str) -> None:
    with pytest.raises(SyncError) as info:
        decode(data)
    assert info.value.reason == reason


def test_encoder_refuses_what_the_decoder_would() -> None:
    too_many = tuple(put("config/a", 1, 0) for _ in range(MAX_CHANGES_PER_MESSAGE + 1))
    with pytest.raises(LocalProtocolError):
        encode(Delta(1, too_many))
    with pytest.raises(LocalProtocolError):
        encode(Delta(1, (put("config/a", 1, "x" * MAX_MESSAGE_BYTES),)))


def test_only_public_keys_are_synced() -> None:
    assert is_synced_key("catalog/nodes/a") and is_synced_key("config/traffic/web")
    assert is_synced_key("ca/roots") and is_synced_key("ca/revocations")
    assert not is_synced_key("ca/state")  # the CA's sealed private state
    assert not is_synced_key("kv/app") and not is_synced_key("tokens/x")


# --- the server's session ---------------------------------------------------------------


def test_session_wants_hello_first_and_checks_the_identity() -> None:
    s = ServerSession("a", now=0.0)
    with pytest.raises(SyncError) as info:
        s.receive(encode(Heartbeat(1)), now=1.0)
    assert info.value.reason == "unexpected"

    s = ServerSession("a", now=0.0)
    with pytest.raises(SyncError) as info:
        s.receive(encode(Hello("a", 0, web("evil"))), now=1.0)
    assert info.value.reason == "identity"

    s = ServerSession("a", now=0.0)
    hello = s.receive(encode(Hello("a", 42, web("a"))), now=1.0)
    assert isinstance(hello, Hello) and s.state == "streaming" and s.revision == 42
    assert isinstance(s.receive(encode(RecordUpdate(web("a", 2))), now=2.0), RecordUpdate)
    assert s.last_received == 2.0
    with pytest.raises(SyncError) as info:
        s.receive(encode(RecordUpdate(web("b", 2))), now=3.0)
    assert info.value.reason == "identity"
    for server_only in (Snapshot(1, (), False), Delta(1, ()), Resumed(1), Hello("a", 0, web("a"))):
        with pytest.raises(SyncError) as info:
            s.receive(encode(server_only), now=4.0)
        assert info.value.reason == "unexpected"


def test_a_full_queue_is_dropped_for_a_resync_not_grown() -> None:
    s = ServerSession("a", now=0.0, max_messages=4, max_bytes=1000)
    s.receive(encode(Hello("a", 0, web("a"))), now=0.0)
    for i in range(4):
        assert s.push(f"m{i}")
    assert s.queued == (4, 8)
    assert not s.push("overflow") and s.resync and s.queued == (0, 0) and s.resyncs == 1
    assert not s.push("more")  # while a snapshot is due nothing is queued
    assert s.queued == (0, 0)
    s.snapshot_sent(77)
    assert not s.resync and s.revision == 77
    assert s.push("x" * 600) and not s.push("y" * 600)  # the byte bound, too
    assert s.resync and s.resyncs == 2


# --- the agent's state ---------------------------------------------------------------------


def snapshot_of(revision: int, changes: list[Change]) -> list[str]:
    return snapshot_messages(revision, changes)


def test_snapshot_in_chunks_applies_whole_and_replaces_config() -> None:
    catalog = Catalog()
    state = ClientState(catalog, "me")
    state.receive(encode(Delta(5, (put("config/old", 5, 1), put("config/keep", 4, "old")))))
    big = "x" * (600 * 1024)
    entries = [
        node_change(web("b"), 6),
        node_change(web("me", 99), 6),  # our own record never comes from a server
        put("config/big1", 7, big),
        put("config/big2", 8, big),
        put("config/keep", 9, "new"),
        put("ca/roots", 3, "PEM"),
    ]
    messages = snapshot_of(10, entries)
    assert len(messages) >= 2  # the 600 KiB values do not share one chunk
    for text in messages[:-1]:
        out = state.receive(text)
        assert not out.snapshot and state.config["config/keep"] == (4, "old")
        assert catalog.record("b") is None  # nothing applied before the snapshot is whole
    out = state.receive(messages[-1])
    assert out.snapshot and out.catalog and out.config and out.ca
    assert set(state.config) == {"config/big1", "config/big2", "config/keep"}
    assert state.config["config/keep"] == (9, "new") and state.revision == 10
    assert catalog.record("b") == web("b") and catalog.record("me") is None
    assert state.ca["ca/roots"] == (3, "PEM")


def test_deltas_are_idempotent_and_ordered_by_revision() -> None:
    catalog = Catalog()
    state = ClientState(catalog, "me")
    batch = encode(Delta(12, (put("config/a", 11, "v11"), node_change(web("b", 2), 12))))
    first = state.receive(batch)
    assert first.config and first.catalog and state.revision == 12
    again = state.receive(batch)  # a resumed session replays the revision it stopped at
    assert not again.config and not again.catalog and state.config["config/a"] == (11, "v11")
    state.receive(encode(Delta(12, (put("config/a", 9, "stale"), node_change(web("b", 1), 8)))))
    assert state.config["config/a"] == (11, "v11") and catalog.record("b") == web("b", 2)
    out = state.receive(encode(Delta(13, (Change("config/a", 13, None, True),))))
    assert out.config and "config/a" not in state.config
    out = state.receive(encode(Delta(14, (Change("catalog/nodes/b", 14, None, True),))))
    assert out.catalog and catalog.record("b") is None  # reaped by the servers


def test_confirmed_deaths_mark_a_node_until_a_newer_record() -> None:
    catalog = Catalog()
    state = ClientState(catalog, "me")
    state.receive(encode(Delta(1, (node_change(web("b", 3), 1),))))
    report = {"generation": 1, "version": 3, "reporters": ["c"], "confirmed": False}
    state.receive(encode(Delta(2, (put("catalog/dead/b", 2, report),))))
    assert catalog.node_live("b")  # one agent's gossip view is not enough
    out = state.receive(
        encode(Delta(3, (put("catalog/dead/b", 3, {**report, "confirmed": True}),)))
    )
    assert out.catalog and not catalog.node_live("b")
    out = state.receive(encode(Delta(4, (node_change(web("b", 4), 4),))))  # b is back, newer
    assert out.catalog and catalog.node_live("b")


def test_record_messages_must_match_their_key() -> None:
    state = ClientState(Catalog(), "me")
    with pytest.raises(SyncError):
        state.receive(encode(Delta(1, (Change("catalog/nodes/x", 1, record_to_json(web("y"))),))))
    with pytest.raises(SyncError):
        state.receive(encode(Delta(1, (put("kv/secret", 1, "v"),))))
    with pytest.raises(SyncError):
        state.receive(encode(Hello("a", 1, web("a"))))  # a server never says HELLO
    assert state.revision == 0 and not state.config


def test_persisted_state_round_trips_and_a_broken_file_is_refused() -> None:
    catalog = Catalog()
    state = ClientState(catalog, "me")
    catalog.merge(web("me", 5))
    state.receive(encode(Delta(20, (node_change(web("b", 2), 19), put("config/traffic/web", 20,
                                    {"rate_limit": 5}), put("ca/roots", 18, "PEM")))))  # fmt: skip
    data = state.to_bytes()
    fresh_catalog = Catalog()
    fresh = ClientState(fresh_catalog, "me")
    assert fresh.load(data) == 1
    assert fresh.revision == 20 and fresh.config == state.config and fresh.ca == state.ca
    assert fresh_catalog.record("b") == web("b", 2) and fresh_catalog.record("me") is None
    for end in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            ClientState(Catalog(), "me").load(data[:end])
    with pytest.raises(ValueError):
        ClientState(Catalog(), "me").load(json.dumps({"format": "other"}).encode())


def test_sync_config_defaults_and_bad_values() -> None:
    cfg = from_mapping(AgentConfig, {"node_name": "a", "servers": ["10.0.0.1:4150"]})
    assert cfg.sync == SyncConfig() and cfg.sync.heartbeat_interval == 10.0
    tuned = from_mapping(AgentConfig, {"node_name": "a", "sync": {"backoff_base": "100ms"}})
    assert tuned.sync.backoff_base == 0.1
    for bad, key in [
        ({"mesh": "Not A Domain"}, "sync.mesh"),
        ({"heartbeat_interval": "0s"}, "sync.heartbeat_interval"),
        ({"heartbeat_timeout": "5s", "heartbeat_interval": "10s"}, "sync.heartbeat_timeout"),
        ({"backoff_base": "10s", "backoff_max": "1s"}, "sync.backoff_max"),
        ({"resync": True}, "sync.resync"),
    ]:
        with pytest.raises(ConfigError) as info:
            from_mapping(AgentConfig, {"node_name": "a", "sync": bad})
        assert info.value.key == key


def test_backoff_doubles_to_its_maximum_with_jitter() -> None:
    assert backoff_delay(1, 0.5, 30.0, 0.0) == 0.25 and backoff_delay(1, 0.5, 30.0, 0.999) < 0.5
    assert backoff_delay(3, 0.5, 30.0, 0.0) == 1.0
    assert backoff_delay(50, 0.5, 30.0, 0.0) == 15.0 and backoff_delay(50, 0.5, 30.0, 1.0) == 30.0


def test_large_batches_become_several_deltas_within_the_bound() -> None:
    big = "y" * (300 * 1024)
    changes = [put(f"config/k{i}", 100 + i // 2, big) for i in range(12)]  # two per revision
    texts = delta_messages(changes)
    assert len(texts) > 1 and all(len(t.encode()) <= MAX_MESSAGE_BYTES for t in texts)
    state = ClientState(Catalog(), "me")
    for text in texts:
        state.receive(text)
    assert len(state.config) == 12 and state.revision == 105


def test_a_snapshot_forgets_nodes_the_servers_reaped_but_not_gossip_only_ones() -> None:
    catalog = Catalog()
    state = ClientState(catalog, "me")
    state.receive(encode(Delta(3, (node_change(web("b"), 2), node_change(web("c"), 3)))))
    catalog.merge(web("g"))  # learnt through gossip only
    [text] = snapshot_messages(9, [node_change(web("c"), 3)])  # b was reaped meanwhile
    out = state.receive(text)
    assert out.catalog and catalog.record("b") is None
    assert catalog.record("c") is not None and catalog.record("g") is not None

"""The catalog: merge laws, tombstones, liveness, queries and the JSON form of records."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostmesh.catalog import (
    Catalog,
    CheckState,
    Health,
    Node,
    NodeRecord,
    ServiceInstance,
    healthy_instances,
    record_from_json,
    record_to_json,
    service_instances,
    service_names,
)

# --- strategies for merge tests ----------------------------------------------------
#
# Small domains on purpose: few node names and small (generation, version)
# values make equal keys with different content (the digest tie-break) common.

NAMES = ("n1", "n2", "n3")

# Content is drawn from small precomputed sets (one draw each) to keep
# hundreds of examples cheap; they still differ in every field the digest sees.
_INSTANCES = (
    ServiceInstance(id="web-1", name="web", address="", port=8080, tags=("v1",)),
    ServiceInstance(id="web-1", name="web", address="", port=8081, tags=("v2", "canary")),
    ServiceInstance(id="web-2", name="web", address="10.0.9.9", port=8080, weight=3),
    ServiceInstance(id="db-1", name="db", address="", port=5432, meta={"version": "16"}),
)
SERVICE_SETS = ((), *((i,) for i in _INSTANCES), (_INSTANCES[0], _INSTANCES[3]))
CHECK_SETS = (
    (),
    *(
        (CheckState(id="c1", name="", status=status, service_id=sid),)
        for status in Health
        for sid in ("", "web-1")
    ),
    (
        CheckState(id="c1", name="", status=Health.PASSING, service_id="web-1"),
        CheckState(id="c2", name="", status=Health.WARNING, service_id="db-1", output="slow"),
    ),
)


# Module-level strategies: building new ones inside every draw is what makes
# composite strategies slow.
_bools = st.booleans()
_small = st.integers(1, 3)
_names = st.sampled_from(NAMES)
_azs = st.sampled_from(["az-a", "az-b"])
_service_sets = st.sampled_from(SERVICE_SETS)
_check_sets = st.sampled_from(CHECK_SETS)
_stamps = st.sampled_from([0.0, 100.0])


def draw_record(
    draw: st.DrawFn, name: str | None = None, key: tuple[int, int] | None = None
) -> NodeRecord:
    """A record for one of NAMES (or ``name``), at a random key (or ``key``)."""
    left = draw(_bools)
    generation, version = key or (draw(_small), draw(_small))
    return NodeRecord(
        node=Node(name=name or draw(_names), address="10.0.0.1", az=draw(_azs)),
        generation=generation,
        version=version,
        services=() if left else draw(_service_sets),
        checks=() if left else draw(_check_sets),
        left=left,
        stamp=draw(_stamps),
    )


@st.composite
def updates(draw: st.DrawFn, max_size: int = 8) -> list[NodeRecord]:
    """Records with some same-key twins: same node and (generation, version), other content."""
    out = [draw_record(draw) for _ in range(draw(st.integers(1, max_size)))]
    for rec in list(out):
        if draw(_bools):
            out.append(draw_record(draw, name=rec.node.name, key=rec.key))
    return out


@st.composite
def record_pairs(draw: st.DrawFn) -> tuple[NodeRecord, NodeRecord]:
    a = draw_record(draw)
    if draw(_bools):
        return a, draw_record(draw, name=a.node.name, key=a.key)
    return a, draw_record(draw)


def catalog_of(recs: Any) -> Catalog:
    cat = Catalog()
    cat.merge_all(recs)
    return cat


def content(cat: Catalog) -> dict[str, NodeRecord]:
    return {rec.node.name: rec for rec in cat}


def expected_winners(recs: list[NodeRecord]) -> dict[str, NodeRecord]:
    """The documented result: per node, the largest (generation, version, digest)."""
    best: dict[str, NodeRecord] = {}
    for rec in recs:
        cur = best.get(rec.node.name)
        if cur is None or (rec.key, rec.digest()) > (cur.key, cur.digest()):
            best[rec.node.name] = rec
    return best


# --- merge laws ---------------------------------------------------------------------


@settings(max_examples=300)
@given(record_pairs())
def test_merge_is_commutative(pair: tuple[NodeRecord, NodeRecord]) -> None:
    a, b = pair
    assert content(catalog_of([a, b])) == content(catalog_of([b, a]))


@settings(max_examples=150)
@given(updates(max_size=4), updates(max_size=4), updates(max_size=4))
def test_merge_is_associative(
    xs: list[NodeRecord], ys: list[NodeRecord], zs: list[NodeRecord]
) -> None:
    def join(left: Catalog, right: Catalog) -> Catalog:
        return catalog_of([*left, *right])

    a, b, c = catalog_of(xs), catalog_of(ys), catalog_of(zs)
    assert content(join(join(a, b), c)) == content(join(a, join(b, c)))


@settings(max_examples=200)
@given(updates())
def test_merge_is_idempotent(recs: list[NodeRecord]) -> None:
    cat = catalog_of(recs)
    before, index = content(cat), cat.index
    for rec in recs:
        assert cat.merge(rec) is False
        assert cat.merge(replace(rec)) is False  # an equal copy, not the same object
    assert cat.merge_all(list(cat)) == 0
    assert content(cat) == before
    assert cat.index == index


@settings(max_examples=200)
@given(updates(), st.data())
def test_every_delivery_order_converges(recs: list[NodeRecord], data: st.DataObject) -> None:
    duplicates = data.draw(st.lists(st.sampled_from(recs), max_size=6))
    delivery = data.draw(st.permutations(recs + duplicates))
    cat = catalog_of(delivery)
    assert content(cat) == expected_winners(recs)
    assert content(cat) == content(catalog_of(recs))
    assert cat.digest() == {name: rec.key for name, rec in expected_winners(recs).items()}


@settings(max_examples=200)
@given(updates())
def test_index_grows_exactly_on_accepted_merges(recs: list[NodeRecord]) -> None:
    cat = Catalog()
    for rec in recs:
        current = cat.record(rec.node.name)
        should_take = current is None or (rec.key, rec.digest()) > (
            current.key,
            current.digest(),
        )
        index = cat.index
        took = cat.merge(rec)
        assert took is should_take
        assert cat.index == index + (1 if took else 0)
        assert cat.record(rec.node.name) is (rec if took else current)


def test_equal_keys_are_broken_by_the_digest_in_any_order() -> None:
    one = rec_for("n1", version=5, services=(web("web-1"),))
    two = replace(one, services=(web("web-1", port=9090),))
    winner = max(one, two, key=lambda r: r.digest())
    for order in ([one, two], [two, one], [one, two, one, two]):
        assert catalog_of(order).record("n1") is winner


def test_merge_all_counts_taken_records() -> None:
    v1 = rec_for("n1", version=1)
    v2 = v1.bump()
    cat = Catalog()
    assert cat.merge_all([v1, v2, v1, rec_for("n2")]) == 3
    assert cat.record("n1") is v2
    assert len(cat) == 2


def test_restarted_node_supersedes_a_larger_old_version() -> None:
    old = rec_for("n1", generation=1, version=500, services=(web("web-1"),))
    restarted = rec_for("n1", generation=2, version=1, services=(web("web-1", port=9090),))
    cat = catalog_of([old])
    assert cat.merge(restarted) is True
    assert cat.record("n1") is restarted
    # A late copy from before the restart, even one more change later, loses.
    assert cat.merge(old.bump()) is False
    assert cat.record("n1") is restarted
    assert [v.instance.port for v in service_instances(cat, "web")] == [9090]


# --- helpers for example-based tests ------------------------------------------------


def web(
    instance_id: str,
    *,
    name: str = "web",
    tags: tuple[str, ...] = (),
    address: str = "",
    port: int = 8080,
    weight: int = 1,
    weight_warning: int = 1,
) -> ServiceInstance:
    return ServiceInstance(
        id=instance_id,
        name=name,
        address=address,
        port=port,
        tags=tags,
        weight=weight,
        weight_warning=weight_warning,
    )


def check(service_id: str, status: Health, check_id: str = "") -> CheckState:
    return CheckState(
        id=check_id or f"service:{service_id or 'node'}",
        name="",
        status=status,
        service_id=service_id,
    )


def rec_for(
    name: str,
    *,
    az: str = "az-a",
    address: str = "",
    generation: int = 1,
    version: int = 1,
    services: tuple[ServiceInstance, ...] = (),
    checks: tuple[CheckState, ...] = (),
    left: bool = False,
    stamp: float = 0.0,
) -> NodeRecord:
    return NodeRecord(
        node=Node(name=name, address=address or f"10.0.0.{name[-1]}", az=az),
        generation=generation,
        version=version,
        services=services,
        checks=checks,
        left=left,
        stamp=stamp,
    )


def ids(views: Any) -> list[str]:
    return [v.instance.id for v in views]


# --- tombstones and liveness -----------------------------------------------------------


@pytest.fixture
def two_nodes() -> Catalog:
    return catalog_of(
        [
            rec_for("n1", services=(web("web-1", tags=("canary",)),)),
            rec_for("n2", services=(web("web-2", tags=("v1",)),)),
        ]
    )


def test_left_record_hides_the_node(two_nodes: Catalog) -> None:
    cat = two_nodes
    assert cat.merge(rec_for("n1", version=2, left=True, stamp=1000.0)) is True
    assert [n.name for n in cat.nodes()] == ["n2"]
    assert service_names(cat) == {"web": ["v1"]}
    assert ids(service_instances(cat, "web")) == ["web-2"]
    assert ids(healthy_instances(cat, "web")) == ["web-2"]
    assert not cat.node_live("n1")
    assert cat.digest()["n1"] == (1, 2)  # the tombstone is still gossiped


def test_left_node_with_services_still_hidden() -> None:
    # A tombstone should carry no services, but if one does they stay hidden.
    cat = catalog_of([rec_for("n1", left=True, services=(web("web-1", tags=("x",)),))])
    assert cat.nodes() == []
    assert service_names(cat) == {}
    assert service_instances(cat, "web") == []


def test_older_copy_does_not_resurrect_a_left_node(two_nodes: Catalog) -> None:
    cat = two_nodes
    stale = cat.record("n1")
    assert stale is not None
    cat.merge(rec_for("n1", version=2, left=True, stamp=1000.0))
    index = cat.index
    assert cat.merge(stale) is False
    assert cat.merge(replace(stale, services=(web("web-9"),))) is False
    assert cat.index == index
    assert [n.name for n in cat.nodes()] == ["n2"]
    assert ids(service_instances(cat, "web")) == ["web-2"]


def test_gc_drops_tombstones_only_after_the_ttl(two_nodes: Catalog) -> None:
    cat = two_nodes
    cat.merge(rec_for("n1", version=2, left=True, stamp=1000.0))
    index = cat.index
    assert cat.gc(now=1000.0 + 60.0, ttl=60.0) == []
    assert cat.record("n1") is not None
    assert cat.index == index
    assert cat.gc(now=1000.0 + 61.0, ttl=60.0) == ["n1"]
    assert cat.record("n1") is None
    assert cat.index == index + 1
    # Live records are never collected, however old their stamp.
    assert cat.gc(now=1e12, ttl=60.0) == []
    assert [n.name for n in cat.nodes()] == ["n2"]
    # The name is free again: the node rejoins after a restart.
    assert cat.merge(rec_for("n1", generation=2, services=(web("web-1"),))) is True
    assert ids(healthy_instances(cat, "web")) == ["web-1", "web-2"]


def test_dead_node_is_hidden_from_healthy_instances(two_nodes: Catalog) -> None:
    cat = two_nodes
    index = cat.index
    assert cat.set_node_dead("n1", True) is True
    assert cat.index == index + 1
    assert cat.set_node_dead("n1", True) is False
    assert cat.index == index + 1
    assert ids(healthy_instances(cat, "web")) == ["web-2"]
    everything = service_instances(cat, "web")
    assert [(v.instance.id, v.node_live) for v in everything] == [
        ("web-1", False),
        ("web-2", True),
    ]
    assert [n.name for n in cat.nodes()] == ["n1", "n2"]  # dead is not gone
    assert cat.set_node_dead("n1", False) is True
    assert cat.index == index + 2
    assert cat.set_node_dead("n1", False) is False
    assert cat.index == index + 2
    assert ids(healthy_instances(cat, "web")) == ["web-1", "web-2"]


# --- queries ----------------------------------------------------------------------------


def test_service_instances_filters_by_all_tags_and_az() -> None:
    cat = catalog_of(
        [
            rec_for("n1", az="az-a", services=(web("web-1", tags=("v1", "canary")),)),
            rec_for("n2", az="az-b", services=(web("web-2", tags=("v1",)),)),
            rec_for("n3", az="az-a", services=(web("web-3", tags=("v2",)),)),
            rec_for("n4", az="az-b", services=(web("db-1", name="db", tags=("v1",)),)),
        ]
    )
    assert ids(service_instances(cat, "web")) == ["web-1", "web-2", "web-3"]
    assert ids(service_instances(cat, "web", tags=["v1"])) == ["web-1", "web-2"]
    assert ids(service_instances(cat, "web", tags=["v1", "canary"])) == ["web-1"]
    assert ids(service_instances(cat, "web", tags=["v1", "v2"])) == []
    assert ids(service_instances(cat, "web", az="az-a")) == ["web-1", "web-3"]
    assert ids(service_instances(cat, "web", tags=["v1"], az="az-b")) == ["web-2"]
    assert service_instances(cat, "nope") == []


def test_service_instances_are_sorted_by_node_then_id() -> None:
    cat = catalog_of(
        [
            rec_for("n2", services=(web("b"), web("a"))),
            rec_for("n1", services=(web("z"),)),
        ]
    )
    assert [(v.node.name, v.instance.id) for v in service_instances(cat, "web")] == [
        ("n1", "z"),
        ("n2", "a"),
        ("n2", "b"),
    ]


def test_critical_check_on_instance_or_node_excludes() -> None:
    cat = catalog_of(
        [
            rec_for("n1", services=(web("web-1"),), checks=(check("web-1", Health.PASSING),)),
            rec_for("n2", services=(web("web-2"),), checks=(check("web-2", Health.CRITICAL),)),
            rec_for(
                "n3",
                services=(web("web-3"), web("web-4")),
                checks=(check("", Health.CRITICAL), check("web-3", Health.PASSING)),
            ),
            rec_for(
                "n4",
                services=(web("web-5"), web("db-1", name="db")),
                # Another instance's critical check does not touch web-5.
                checks=(check("db-1", Health.CRITICAL),),
            ),
        ]
    )
    assert ids(healthy_instances(cat, "web")) == ["web-1", "web-5"]
    health = {v.instance.id: v.health for v in service_instances(cat, "web")}
    assert health == {
        "web-1": Health.PASSING,
        "web-2": Health.CRITICAL,
        "web-3": Health.CRITICAL,
        "web-4": Health.CRITICAL,
        "web-5": Health.PASSING,
    }


def test_warning_is_healthy_unless_passing_only() -> None:
    cat = catalog_of(
        [
            rec_for("n1", services=(web("web-1"),), checks=(check("web-1", Health.PASSING),)),
            rec_for("n2", services=(web("web-2"),), checks=(check("web-2", Health.WARNING),)),
            rec_for("n3", services=(web("web-3"),), checks=(check("", Health.WARNING),)),
        ]
    )
    assert ids(healthy_instances(cat, "web")) == ["web-1", "web-2", "web-3"]
    assert ids(healthy_instances(cat, "web", passing_only=True)) == ["web-1"]


def test_worst_check_wins() -> None:
    cat = catalog_of(
        [
            rec_for(
                "n1",
                services=(web("web-1"),),
                checks=(
                    check("web-1", Health.PASSING, "a"),
                    check("web-1", Health.WARNING, "b"),
                    check("", Health.PASSING, "c"),
                ),
            ),
        ]
    )
    (view,) = service_instances(cat, "web")
    assert view.health is Health.WARNING
    assert {c.id for c in view.checks} == {"a", "b", "c"}


def prefer_az_catalog(local_status: Health) -> Catalog:
    return catalog_of(
        [
            rec_for(
                "n1", az="az-a", services=(web("web-1"),), checks=(check("web-1", local_status),)
            ),
            rec_for("n2", az="az-b", services=(web("web-2"),)),
            rec_for(
                "n3", az="az-c", services=(web("web-3"),), checks=(check("", Health.CRITICAL),)
            ),
        ]
    )


def test_prefer_az_keeps_only_local_healthy_instances() -> None:
    cat = prefer_az_catalog(Health.PASSING)
    assert ids(healthy_instances(cat, "web", prefer_az="az-a")) == ["web-1"]
    assert ids(healthy_instances(cat, "web", prefer_az="az-b")) == ["web-2"]


def test_prefer_az_falls_back_to_all_healthy() -> None:
    cat = prefer_az_catalog(Health.PASSING)
    # No instance in az-z, and az-c only has a critical one.
    assert ids(healthy_instances(cat, "web", prefer_az="az-z")) == ["web-1", "web-2"]
    assert ids(healthy_instances(cat, "web", prefer_az="az-c")) == ["web-1", "web-2"]


def test_prefer_az_falls_back_when_local_instances_are_all_critical() -> None:
    cat = prefer_az_catalog(Health.CRITICAL)
    assert ids(healthy_instances(cat, "web", prefer_az="az-a")) == ["web-2"]


def test_prefer_az_falls_back_when_local_node_is_dead() -> None:
    cat = prefer_az_catalog(Health.PASSING)
    cat.set_node_dead("n1", True)
    assert ids(healthy_instances(cat, "web", prefer_az="az-a")) == ["web-2"]


def test_prefer_az_respects_passing_only() -> None:
    cat = prefer_az_catalog(Health.WARNING)
    assert ids(healthy_instances(cat, "web", prefer_az="az-a")) == ["web-1"]
    assert ids(healthy_instances(cat, "web", prefer_az="az-a", passing_only=True)) == ["web-2"]


def test_instance_address_falls_back_to_node_address() -> None:
    cat = catalog_of(
        [
            rec_for("n1", address="10.1.0.1", services=(web("web-1"),)),
            rec_for("n2", address="10.1.0.2", services=(web("web-2", address="192.0.2.7"),)),
        ]
    )
    assert [v.address for v in service_instances(cat, "web")] == ["10.1.0.1", "192.0.2.7"]


def test_instance_weight_follows_health() -> None:
    svc = (web("web-1", weight=5, weight_warning=2),)
    weights = {}
    for status in Health:
        cat = catalog_of([rec_for("n1", services=svc, checks=(check("web-1", status),))])
        (view,) = service_instances(cat, "web")
        weights[status] = view.weight
    assert weights == {Health.PASSING: 5, Health.WARNING: 2, Health.CRITICAL: 0}


def test_service_names_is_the_tag_union() -> None:
    cat = catalog_of(
        [
            rec_for("n1", services=(web("web-1", tags=("v2", "canary")),)),
            rec_for("n2", services=(web("web-2", tags=("v1", "v2")), web("db-1", name="db"))),
            rec_for("n3", services=(web("cache-1", name="cache", tags=("lru",)),)),
        ]
    )
    names = service_names(cat)
    assert names == {"cache": ["lru"], "db": [], "web": ["canary", "v1", "v2"]}
    assert list(names) == ["cache", "db", "web"]


# --- JSON form -----------------------------------------------------------------------------

texts = st.text(max_size=4)
finite = st.floats(allow_nan=False, allow_infinity=False)


def json_records(min_size: int = 0, max_size: int = 3) -> st.SearchStrategy[NodeRecord]:
    """Any record that JSON can carry; ``min_size`` 1 fills every list and map."""

    def maps() -> st.SearchStrategy[dict[str, str]]:
        return st.dictionaries(texts, texts, min_size=min_size, max_size=max_size)

    def tuples(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
        return st.lists(elements, min_size=min_size, max_size=max_size).map(tuple)

    return st.builds(
        NodeRecord,
        node=st.builds(
            Node,
            name=texts,
            address=texts,
            az=texts,
            region=texts,
            datacenter=texts,
            meta=maps(),
            id=texts,
        ),
        generation=st.integers(),
        version=st.integers(),
        services=tuples(
            st.builds(
                ServiceInstance,
                id=texts,
                name=texts,
                address=texts,
                port=st.integers(0, 65535),
                tags=tuples(texts),
                meta=maps(),
                weight=st.integers(0, 65535),
                weight_warning=st.integers(0, 65535),
                user=texts,
            )
        ),
        checks=tuples(
            st.builds(
                CheckState,
                id=texts,
                name=texts,
                status=st.sampled_from(Health),
                service_id=texts,
                output=texts,
                kind=texts,
                notes=texts,
            )
        ),
        removed=tuples(st.tuples(texts, finite)),
        left=st.booleans(),
        stamp=finite,
    )


any_records = json_records()
rich_records = json_records(min_size=1, max_size=2)


@settings(max_examples=150)
@given(any_records)
def test_json_round_trip(rec: NodeRecord) -> None:
    assert record_from_json(record_to_json(rec)) == rec
    wire = json.loads(json.dumps(record_to_json(rec)))
    back = record_from_json(wire)
    assert back == rec
    assert back.digest() == rec.digest()


def test_json_defaults_for_optional_keys() -> None:
    rec = record_from_json(
        {
            "node": {"name": "n1", "address": "10.0.0.1"},
            "generation": 3,
            "version": 7,
            "services": [{"id": "web-1", "name": "web", "port": 80}],
            "checks": [{"id": "c", "status": "warning"}],
            "stamp": 12,
        }
    )
    assert rec == NodeRecord(
        node=Node(name="n1", address="10.0.0.1"),
        generation=3,
        version=7,
        services=(ServiceInstance(id="web-1", name="web", address="", port=80),),
        checks=(CheckState(id="c", name="", status=Health.WARNING),),
        stamp=12.0,
    )


# Random JSON-like values; keys partly from the record's vocabulary so that
# parsing gets past the first lookups.
KEYS = [
    "node",
    "name",
    "address",
    "az",
    "region",
    "datacenter",
    "meta",
    "generation",
    "version",
    "services",
    "id",
    "port",
    "tags",
    "weight",
    "weight_warning",
    "user",
    "checks",
    "status",
    "service_id",
    "output",
    "kind",
    "notes",
    "removed",
    "left",
    "stamp",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), inner, max_size=6)
    ),
    max_leaves=15,
)


def parse_or_value_error(data: Any) -> NodeRecord | None:
    """record_from_json's outcome, or None for ValueError (any other exception escapes)."""
    try:
        return record_from_json(data)
    except ValueError:
        return None


@settings(max_examples=200)
@given(json_values)
def test_random_json_raises_only_value_error(data: Any) -> None:
    result = parse_or_value_error(data)
    assert result is None or isinstance(result, NodeRecord)


# Path patterns of record_to_json output: ("type", required). "*" is any list
# index or meta key; deleting a list element or a meta entry is always valid.
SCHEMA: dict[tuple[Any, ...], tuple[str, bool]] = {
    (): ("object", True),
    ("node",): ("object", True),
    ("node", "name"): ("string", True),
    ("node", "address"): ("string", True),
    ("node", "az"): ("string", False),
    ("node", "region"): ("string", False),
    ("node", "datacenter"): ("string", False),
    ("node", "meta"): ("object", False),
    ("node", "meta", "*"): ("string", False),
    ("node", "id"): ("string", False),
    ("generation",): ("int", True),
    ("version",): ("int", True),
    ("services",): ("list", False),
    ("services", "*"): ("object", False),
    ("services", "*", "id"): ("string", True),
    ("services", "*", "name"): ("string", True),
    ("services", "*", "address"): ("string", False),
    ("services", "*", "port"): ("int", True),
    ("services", "*", "tags"): ("list", False),
    ("services", "*", "tags", "*"): ("string", False),
    ("services", "*", "meta"): ("object", False),
    ("services", "*", "meta", "*"): ("string", False),
    ("services", "*", "weight"): ("int", False),
    ("services", "*", "weight_warning"): ("int", False),
    ("services", "*", "user"): ("string", False),
    ("checks",): ("list", False),
    ("checks", "*"): ("object", False),
    ("checks", "*", "id"): ("string", True),
    ("checks", "*", "name"): ("string", False),
    ("checks", "*", "status"): ("status", True),
    ("checks", "*", "service_id"): ("string", False),
    ("checks", "*", "output"): ("string", False),
    ("checks", "*", "kind"): ("string", False),
    ("checks", "*", "notes"): ("string", False),
    ("removed",): ("list", False),
    ("removed", "*"): ("list", False),
    ("removed", "*", 0): ("string", True),
    ("removed", "*", 1): ("number", True),
    ("left",): ("bool", False),
    ("stamp",): ("number", False),
}

# What a deleted optional field reads back as.
DEFAULTS: dict[str, Any] = {
    "id": "",
    "az": "",
    "region": "",
    "datacenter": "dc1",
    "meta": {},
    "services": (),
    "checks": (),
    "removed": (),
    "left": False,
    "stamp": 0.0,
    "address": "",
    "tags": (),
    "weight": 1,
    "weight_warning": 1,
    "user": "",
    "name": "",
    "service_id": "",
    "output": "",
    "kind": "",
    "notes": "",
}


def fits(kind: str, value: Any) -> bool:
    """Whether ``value`` is an acceptable value of the schema ``kind``."""
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and abs(value) < float("inf")
        )
    if kind == "status":
        return value in ("passing", "warning", "critical")
    python_type = {"string": str, "bool": bool, "list": list, "object": dict}[kind]
    return isinstance(value, python_type)


# A value of every JSON type, with edge cases; each path is tried with all that do not fit.
SAMPLE_VALUES: tuple[Any, ...] = (
    *(None, True, False, 0, -1, 2**70, 10**400, 1.5, float("nan"), float("inf")),
    *("", "x", "passing", "12"),
    *([], ["x"], ["x", 1.0], [1, 2, 3], {}, {"k": "v"}, {"id": "x", "status": "passing"}),
)


def all_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += all_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += all_paths(v, (*prefix, i))
    return out


def pattern(path: tuple[Any, ...]) -> tuple[Any, ...]:
    out: list[Any] = []
    for step in path:
        if (out and out[-1] == "meta") or (
            isinstance(step, int) and tuple(out) != ("removed", "*")
        ):
            out.append("*")
        else:
            out.append(step)
    return tuple(out)


def walk(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def test_schema_covers_every_path() -> None:
    # Keeps SCHEMA honest: a new field in record_to_json must be added there.
    doc = record_to_json(
        rec_for(
            "n1",
            services=(replace(web("web-1", tags=("t",)), meta={"k": "v"}),),
            checks=(check("web-1", Health.PASSING),),
        )
    )
    doc["node"]["meta"] = {"k": "v"}
    doc["removed"] = [["old-1", 1.0]]
    assert {pattern(p) for p in all_paths(doc)} == set(SCHEMA)


@settings(max_examples=80)
@given(rich_records)
def test_deleting_a_key_fails_only_when_it_is_required(rec: NodeRecord) -> None:
    for path in all_paths(record_to_json(rec))[1:]:
        doc = record_to_json(rec)
        _kind, required = SCHEMA[pattern(path)]
        del walk(doc, path[:-1])[path[-1]]
        result = parse_or_value_error(doc)
        if required:
            assert result is None, f"deleting {path} was accepted"
            continue
        assert result is not None, f"deleting optional {path} was rejected"
        field = path[-1]
        if isinstance(field, str) and pattern(path)[-1] != "*":
            # Navigate the parsed record the same way and find the default.
            obj: Any = result
            for step in path[:-1]:
                obj = obj[step] if isinstance(step, int) else getattr(obj, step)
            assert getattr(obj, field) == DEFAULTS[field], path


@settings(max_examples=40)
@given(rich_records)
def test_a_value_of_the_wrong_type_is_rejected(rec: NodeRecord) -> None:
    for path in all_paths(record_to_json(rec)):
        kind, _required = SCHEMA[pattern(path)]
        for value in SAMPLE_VALUES:
            if fits(kind, value):
                continue
            doc: Any = record_to_json(rec)
            if path:
                walk(doc, path[:-1])[path[-1]] = value
            else:
                doc = value
            assert parse_or_value_error(doc) is None, f"{path} = {value!r} was accepted"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", 0, "tags"), "web"),  # a string is not a list of tags
        (("services",), {}),
        (("stamp",), "12.5"),
        (("stamp",), True),
        (("stamp",), float("nan")),
        (("stamp",), 10**400),
        (("removed", 0), "ab"),
        (("removed", 0), ["old-1", 1.0, 2.0]),
        (("generation",), 1.0),
        (("version",), True),
        (("left",), 0),
        (("checks", 0, "status"), "ok"),
        (("checks", 0, "status"), ["passing"]),
        (("node", "meta"), [["k", "v"]]),
    ],
)
def test_specific_malformed_values(path: tuple[Any, ...], value: Any) -> None:
    rec = rec_for("n1", services=(web("web-1"),), checks=(check("web-1", Health.PASSING),))
    doc = record_to_json(replace(rec, removed=(("old-1", 1.0),)))
    walk(doc, path[:-1])[path[-1]] = value
    with pytest.raises(ValueError):
        record_from_json(doc)

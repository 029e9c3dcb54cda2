"""The sans-IO DNS core: every naming, health, TTL, size and hostile-input rule, no sockets.

Queries are built and replies parsed with dnslib, the way a stub resolver
would see them; hostile packets are built by hand.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, DNSRecord

from hostmesh import DnsConfig
from hostmesh.catalog import Catalog, CheckState, Health, Node, NodeRecord, ServiceInstance
from hostmesh.dns import DnsCore, Forward, Rcode, parse_query

LOCAL_AZ = "eu-west-1a"

# --- building catalogs and asking ------------------------------------------------------


def inst(
    iid: str,
    name: str = "udvr",
    *,
    port: int = 8080,
    address: str = "",
    tags: tuple[str, ...] = (),
    weight: int = 1,
    weight_warning: int = 1,
) -> ServiceInstance:
    return ServiceInstance(
        id=iid,
        name=name,
        address=address,
        port=port,
        tags=tags,
        weight=weight,
        weight_warning=weight_warning,
    )


def node(
    name: str,
    address: str,
    az: str = LOCAL_AZ,
    services: Iterable[ServiceInstance] = (),
    checks: Iterable[CheckState] = (),
    meta: dict[str, str] | None = None,
) -> NodeRecord:
    return NodeRecord(
        node=Node(name=name, address=address, az=az, meta=meta or {}),
        generation=1,
        version=1,
        services=tuple(services),
        checks=tuple(checks),
    )


def check(status: Health, service_id: str = "") -> CheckState:
    return CheckState(id=f"c-{service_id or 'node'}", name="", status=status, service_id=service_id)


def fleet() -> Catalog:
    """udvr in two AZs (one instance with its own address), db on IPv6, cache on one node."""
    cat = Catalog()
    cat.merge_all(
        [
            node("a1", "10.0.1.1", services=[inst("u1", tags=("v2",))], meta={"rack": "r1"}),
            node("a2", "10.0.1.2", services=[inst("u2", tags=("v1",), port=8081)]),
            node("b1", "10.0.2.1", "eu-west-1b", [inst("u3", tags=("v2",))]),
            node("b2", "10.0.2.2", "eu-west-1b", [inst("u4", tags=("v1",), address="10.0.9.9")]),
            node("c1", "2001:db8::1", "eu-west-1c", [inst("d1", "db", port=5432)]),
            node("k1", "10.0.3.1", services=[inst("k1", "cache"), inst("k2", "cache")]),
        ]
    )
    return cat


def make_core(
    cat: Catalog | None = None,
    *,
    local_az: str = LOCAL_AZ,
    ns_address: str = "192.0.2.53",
    **config: Any,
) -> DnsCore:
    return DnsCore(
        DnsConfig(**config),
        cat if cat is not None else fleet(),
        local_az=local_az,
        ns_address=ns_address,
        rng=random.Random(7),
    )


def query(
    name: str,
    qtype: str = "A",
    *,
    qid: int = 4242,
    rd: bool = True,
    edns: int | None = None,
    edns_version: int = 0,
) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    q.header.rd = int(rd)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, version=edns_version))
    return bytes(q.pack())


def ask(core: DnsCore, name: str, qtype: str = "A", *, tcp: bool = False, **kw: Any) -> DNSRecord:
    out = core.handle(query(name, qtype, **kw), tcp=tcp)
    assert isinstance(out, bytes), out
    return DNSRecord.parse(out)


def rdatas(reply: DNSRecord, rtype: str | None = None) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rtype is None or QTYPE[rr.rtype] == rtype]


def addresses(reply: DNSRecord) -> set[str]:
    return {str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)}


def rcode(reply: DNSRecord) -> int:
    """The full rcode: header bits plus the OPT record's extended rcode (RFC 6891 6.1.3)."""
    ext = [rr.ttl >> 24 for rr in reply.ar if rr.rtype == QTYPE.OPT]
    return (ext[0] << 4 if ext else 0) | int(reply.header.rcode)


def soa_of(records: list[Any]) -> Any:
    (soa,) = [rr for rr in records if rr.rtype == QTYPE.SOA]
    return soa


def assert_negative(reply: DNSRecord, code: Rcode, min_ttl: int) -> None:
    """NXDOMAIN or NODATA: no answers, the SOA in authority, negative TTL = SOA minimum."""
    assert rcode(reply) == code
    assert reply.rr == []
    soa = soa_of(reply.auth)
    assert str(soa.rname) == "mesh."
    assert soa.ttl == min_ttl
    assert soa.rdata.times[4] == min_ttl  # the minimum field
    assert reply.header.aa == 1


def bump(cat: Catalog, name: str, **changes: Any) -> None:
    rec = cat.record(name)
    assert rec is not None
    assert cat.merge(rec.bump(**changes))


# --- <service>.svc.mesh ----------------------------------------------------------------


def test_service_answers_only_the_local_az_when_it_has_healthy_instances() -> None:
    reply = ask(make_core(), "udvr.svc.mesh")
    assert reply.header.rcode == Rcode.NOERROR
    assert reply.header.aa == 1
    assert addresses(reply) == {"10.0.1.1", "10.0.1.2"}
    assert {str(rr.rname) for rr in reply.rr} == {"udvr.svc.mesh."}


def test_service_answers_every_healthy_instance_when_none_is_local() -> None:
    cat = fleet()
    bump(cat, "a1", checks=(check(Health.CRITICAL),))
    bump(cat, "a2", checks=(check(Health.CRITICAL, "u2"),))
    assert addresses(ask(make_core(cat), "udvr.svc.mesh")) == {"10.0.2.1", "10.0.9.9"}


def test_service_without_a_local_az_answers_everything() -> None:
    reply = ask(make_core(local_az=""), "udvr.svc.mesh")
    assert addresses(reply) == {"10.0.1.1", "10.0.1.2", "10.0.2.1", "10.0.9.9"}


def test_local_az_of_another_agent_sees_its_own_az() -> None:
    assert addresses(ask(make_core(local_az="EU-West-1B"), "udvr.svc.mesh")) == {
        "10.0.2.1",
        "10.0.9.9",
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # an explicit AZ filter wins over the local preference
        ("eu-west-1b.udvr.svc.mesh", {"10.0.2.1", "10.0.9.9"}),
        ("eu-west-1a.udvr.svc.mesh", {"10.0.1.1", "10.0.1.2"}),
        # a tag filter keeps the local preference
        ("v2.udvr.svc.mesh", {"10.0.1.1"}),
        ("v1.udvr.svc.mesh", {"10.0.1.2"}),
        # every filter must match, in either order, any case
        ("v2.eu-west-1b.udvr.svc.mesh", {"10.0.2.1"}),
        ("eu-west-1b.v2.udvr.svc.mesh", {"10.0.2.1"}),
        ("V1.EU-WEST-1B.UDVR.SVC.MESH", {"10.0.9.9"}),
    ],
)
def test_filter_labels_are_azs_or_tags_and_all_must_match(name: str, expected: set[str]) -> None:
    reply = ask(make_core(), name)
    assert reply.header.rcode == Rcode.NOERROR
    assert addresses(reply) == expected


def test_tag_filter_falls_back_to_other_azs() -> None:
    cat = fleet()
    bump(cat, "a1", checks=(check(Health.CRITICAL, "u1"),))
    assert addresses(ask(make_core(cat), "v2.udvr.svc.mesh")) == {"10.0.2.1"}


@pytest.mark.parametrize(
    "name",
    [
        "nope.svc.mesh",
        "v3.udvr.svc.mesh",  # no such tag
        "eu-west-1c.udvr.svc.mesh",  # no instance in that AZ
        "v2.v1.udvr.svc.mesh",  # no instance has both
        "_nope._tcp.svc.mesh",
    ],
)
def test_unknown_service_or_unmatched_filters_are_nxdomain(name: str) -> None:
    assert_negative(ask(make_core(soa_min_ttl=30), name), Rcode.NXDOMAIN, 30)


def test_ipv6_instances_answer_aaaa() -> None:
    reply = ask(make_core(), "db.svc.mesh", "AAAA")
    assert rdatas(reply, "AAAA") == ["2001:db8::1"]


def test_any_returns_both_families() -> None:
    cat = fleet()
    cat.merge(node("a3", "2001:db8::3", services=[inst("u9")]))
    reply = ask(make_core(cat), "udvr.svc.mesh", "ANY")
    assert addresses(reply) == {"10.0.1.1", "10.0.1.2", "2001:db8::3"}


# --- SRV --------------------------------------------------------------------------------


def srv_records(reply: DNSRecord) -> dict[str, tuple[int, int, int]]:
    """target -> (priority, weight, port)."""
    return {
        str(rr.rdata.target): (rr.rdata.priority, rr.rdata.weight, rr.rdata.port)
        for rr in reply.rr
        if rr.rtype == QTYPE.SRV
    }


def additional(reply: DNSRecord) -> dict[str, str]:
    return {str(rr.rname): str(rr.rdata) for rr in reply.ar if rr.rtype != QTYPE.OPT}


def test_srv_lists_each_instance_with_its_node_target_and_glue() -> None:
    reply = ask(make_core(), "_udvr._tcp.svc.mesh", "SRV")
    assert reply.header.rcode == Rcode.NOERROR
    assert srv_records(reply) == {
        "a1.node.mesh.": (1, 1, 8080),
        "a2.node.mesh.": (1, 1, 8081),
    }
    assert additional(reply) == {"a1.node.mesh.": "10.0.1.1", "a2.node.mesh.": "10.0.1.2"}


def test_srv_tag_form_filters_by_tag() -> None:
    reply = ask(make_core(local_az=""), "_udvr._v2.svc.mesh", "SRV")
    assert set(srv_records(reply)) == {"a1.node.mesh.", "b1.node.mesh."}


def test_srv_weight_follows_health() -> None:
    cat = Catalog()
    cat.merge(node("a1", "10.0.1.1", services=[inst("p", weight=10, weight_warning=2)]))
    cat.merge(
        node(
            "a2",
            "10.0.1.2",
            services=[inst("w", weight=10, weight_warning=2)],
            checks=[check(Health.WARNING, "w")],
        )
    )
    reply = ask(make_core(cat), "_udvr._tcp.svc.mesh", "SRV")
    assert srv_records(reply) == {"a1.node.mesh.": (1, 10, 8080), "a2.node.mesh.": (1, 2, 8080)}


def test_srv_instance_with_its_own_address_gets_an_addr_target_that_resolves() -> None:
    core = make_core(local_az="eu-west-1b")
    reply = ask(core, "_udvr._tcp.svc.mesh", "SRV")
    assert set(srv_records(reply)) == {"b1.node.mesh.", "0a000909.addr.mesh."}
    assert additional(reply)["0a000909.addr.mesh."] == "10.0.9.9"
    assert rdatas(ask(core, "0a000909.addr.mesh"), "A") == ["10.0.9.9"]


def test_srv_ipv6_own_address_target_resolves_to_aaaa() -> None:
    cat = Catalog()
    cat.merge(node("a1", "10.0.1.1", services=[inst("u1", address="2001:db8::9")]))
    core = make_core(cat)
    reply = ask(core, "_udvr._tcp.svc.mesh", "SRV")
    target = "20010db8000000000000000000000009.addr.mesh."
    assert set(srv_records(reply)) == {target}
    assert additional(reply) == {target: "2001:db8::9"}
    assert rdatas(ask(core, target, "AAAA"), "AAAA") == ["2001:db8::9"]


def test_srv_name_asked_for_a_is_nodata() -> None:
    assert_negative(ask(make_core(), "_udvr._tcp.svc.mesh", "A"), Rcode.NOERROR, 0)


def test_bad_addr_label_is_nxdomain() -> None:
    assert_negative(ask(make_core(), "zz000909.addr.mesh"), Rcode.NXDOMAIN, 0)


def test_srv_survives_catalog_data_that_is_no_dns_name() -> None:
    """Regression: a 64+ character node name (valid in config), a port out of range or a
    hostname with an empty label used to raise out of handle() and stop the listener."""
    long_name = "n" * 70
    cat = Catalog()
    cat.merge_all(
        [
            node(long_name, "10.0.1.1", services=[inst("u1")]),
            node("a2", "10.0.1.2", services=[inst("u2", port=70000)]),
            node("a3", "10.0.1.3", services=[inst("u3", address="bad..host")]),
            node("a4", "10.0.1.4", services=[inst("u4", address="db.example.com", port=9)]),
        ]
    )
    core = make_core(cat)
    reply = ask(core, "_udvr._tcp.svc.mesh", "SRV")
    assert srv_records(reply) == {
        "0a000101.addr.mesh.": (1, 1, 8080),
        "db.example.com.": (1, 1, 9),
    }
    assert additional(reply) == {"0a000101.addr.mesh.": "10.0.1.1"}


def test_dotted_node_name_is_a_target_that_resolves() -> None:
    cat = Catalog()
    cat.merge(node("web.prod", "10.0.1.1", services=[inst("u1")]))
    core = make_core(cat)
    reply = ask(core, "_udvr._tcp.svc.mesh", "SRV")
    assert set(srv_records(reply)) == {"web.prod.node.mesh."}
    assert rdatas(ask(core, "web.prod.node.mesh"), "A") == ["10.0.1.1"]


# --- nodes --------------------------------------------------------------------------------


def test_node_answers_its_address_with_the_node_ttl() -> None:
    reply = ask(make_core(node_ttl=20, ttl=5), "A1.node.mesh")
    assert rdatas(reply, "A") == ["10.0.1.1"]
    assert [rr.ttl for rr in reply.rr] == [20]


def test_node_meta_is_txt_key_value() -> None:
    cat = fleet()
    bump(cat, "a1", node=Node(name="a1", address="10.0.1.1", meta={"rack": "r1", "env": "prod"}))
    reply = ask(make_core(cat, node_ttl=20), "a1.node.mesh", "TXT")
    assert sorted(rdatas(reply, "TXT")) == ['"env=prod"', '"rack=r1"']
    assert {rr.ttl for rr in reply.rr} == {20}


def test_node_any_has_address_and_meta() -> None:
    reply = ask(make_core(), "a1.node.mesh", "ANY")
    assert rdatas(reply, "A") == ["10.0.1.1"]
    assert rdatas(reply, "TXT") == ['"rack=r1"']


def test_node_ipv6_address() -> None:
    core = make_core()
    assert rdatas(ask(core, "c1.node.mesh", "AAAA"), "AAAA") == ["2001:db8::1"]
    assert_negative(ask(core, "c1.node.mesh", "A"), Rcode.NOERROR, 0)


@pytest.mark.parametrize(
    ("name", "qtype"),
    [("a1.node.mesh", "AAAA"), ("a2.node.mesh", "TXT"), ("a1.node.mesh", "MX")],
)
def test_node_without_the_asked_type_is_nodata(name: str, qtype: str) -> None:
    assert_negative(ask(make_core(soa_min_ttl=9), name, qtype), Rcode.NOERROR, 9)


def test_unknown_or_left_node_is_nxdomain() -> None:
    cat = fleet()
    bump(cat, "a2", services=(), left=True)
    core = make_core(cat)
    assert_negative(ask(core, "zz.node.mesh"), Rcode.NXDOMAIN, 0)
    assert_negative(ask(core, "a2.node.mesh"), Rcode.NXDOMAIN, 0)


# --- zone apex, NS, invalid names ---------------------------------------------------------


def test_apex_soa() -> None:
    cat = fleet()
    reply = ask(
        make_core(cat, soa_min_ttl=15, soa_refresh=100, soa_retry=50, soa_expire=1000),
        "MESH",
        "SOA",
    )
    soa = soa_of(reply.rr)
    assert str(soa.rdata.mname) == "ns.mesh."
    assert str(soa.rdata.rname) == "hostmaster.mesh."
    assert soa.rdata.times == (cat.index, 100, 50, 1000, 15)
    assert soa.ttl == 15
    assert additional(reply) == {"ns.mesh.": "192.0.2.53"}


def test_apex_ns_and_its_address() -> None:
    core = make_core()
    reply = ask(core, "mesh", "NS")
    assert rdatas(reply, "NS") == ["ns.mesh."]
    assert additional(reply) == {"ns.mesh.": "192.0.2.53"}
    assert rdatas(ask(core, "ns.mesh"), "A") == ["192.0.2.53"]


def test_ipv6_listener_address_is_aaaa_glue() -> None:
    """Regression: an IPv6 ns_address made every SOA/NS query raise (A record of '::1')."""
    core = make_core(ns_address="::1")
    for qtype in ("SOA", "NS", "ANY"):
        assert additional(ask(core, "mesh", qtype)) == {"ns.mesh.": "::1"}
    assert rdatas(ask(core, "ns.mesh", "AAAA"), "AAAA") == ["::1"]


def test_soa_serial_follows_the_catalog() -> None:
    cat = fleet()
    core = make_core(cat)
    before = soa_of(ask(core, "mesh", "SOA").rr).rdata.times[0]
    bump(cat, "a1", services=())
    assert soa_of(ask(core, "mesh", "SOA").rr).rdata.times[0] > before


@pytest.mark.parametrize(
    "name", ["foo.mesh", "x.ns.mesh", "udvr.service.mesh", "a1.x.node.mesh", "1.2.addr.mesh"]
)
def test_invalid_names_in_the_zone_are_nxdomain(name: str) -> None:
    assert_negative(ask(make_core(soa_min_ttl=60), name), Rcode.NXDOMAIN, 60)


@pytest.mark.parametrize(("name", "qtype"), [("mesh", "A"), ("svc.mesh", "A")])
def test_existing_names_without_data_are_nodata(name: str, qtype: str) -> None:
    assert_negative(ask(make_core(), name, qtype), Rcode.NOERROR, 0)


# --- health ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "gone"),
    [
        ({"checks": (check(Health.CRITICAL),)}, True),  # node-level critical
        ({"checks": (check(Health.CRITICAL, "u1"),)}, True),  # instance critical
        ({"checks": (check(Health.WARNING, "u1"),)}, False),  # warning still serves
        ({"checks": (check(Health.PASSING, "u1"), check(Health.WARNING))}, False),
    ],
)
def test_critical_checks_hide_an_instance(change: dict[str, Any], gone: bool) -> None:
    cat = fleet()
    bump(cat, "a1", **change)
    got = addresses(ask(make_core(cat), "udvr.svc.mesh"))
    assert got == ({"10.0.1.2"} if gone else {"10.0.1.1", "10.0.1.2"})


def test_only_passing_hides_warning_instances() -> None:
    cat = fleet()
    bump(cat, "a1", checks=(check(Health.WARNING, "u1"),))
    assert addresses(ask(make_core(cat, only_passing=True), "udvr.svc.mesh")) == {"10.0.1.2"}


def test_dead_node_is_hidden() -> None:
    cat = fleet()
    cat.set_node_dead("a1", True)
    assert addresses(ask(make_core(cat), "udvr.svc.mesh")) == {"10.0.1.2"}


def test_service_with_no_healthy_instance_is_nxdomain() -> None:
    cat = fleet()
    bump(cat, "c1", checks=(check(Health.CRITICAL, "d1"),))
    core = make_core(cat, soa_min_ttl=5)
    assert_negative(ask(core, "db.svc.mesh", "AAAA"), Rcode.NXDOMAIN, 5)
    assert_negative(ask(core, "_db._tcp.svc.mesh", "SRV"), Rcode.NXDOMAIN, 5)


# --- NODATA --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "qtype"),
    [("udvr.svc.mesh", "AAAA"), ("udvr.svc.mesh", "TXT"), ("db.svc.mesh", "A")],
)
def test_known_name_without_the_asked_type_is_nodata(name: str, qtype: str) -> None:
    assert_negative(ask(make_core(soa_min_ttl=42), name, qtype), Rcode.NOERROR, 42)


def test_other_classes_are_refused() -> None:
    q = DNSRecord.question("udvr.svc.mesh", "A", "CH")
    out = make_core().handle(bytes(q.pack()))
    assert isinstance(out, bytes)
    assert DNSRecord.parse(out).header.rcode == Rcode.REFUSED


# --- TTLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "ttl"),
    [
        ("udvr", 2),  # "udv*" is longer than "u"
        ("db", 4),  # "db" without a star is a prefix too
        ("cache", 10),  # no prefix: the default
    ],
)
def test_service_ttl_longest_prefix_wins(service: str, ttl: int) -> None:
    core = make_core(local_az="", ttl=10, service_ttl={"u": 1, "udv*": 2, "db": 4, "da*": 5})
    reply = ask(core, f"{service}.svc.mesh", "ANY")
    assert reply.rr
    assert {rr.ttl for rr in reply.rr} == {ttl}
    srv = ask(core, f"_{service}._tcp.svc.mesh", "SRV")
    assert {rr.ttl for rr in srv.rr} == {ttl}


def test_star_alone_covers_every_service() -> None:
    core = make_core(ttl=10, service_ttl={"*": 3, "cache": 8})
    assert {rr.ttl for rr in ask(core, "udvr.svc.mesh").rr} == {3}
    assert {rr.ttl for rr in ask(core, "cache.svc.mesh").rr} == {8}


# --- shuffling, dedup, limits ----------------------------------------------------------------


def big_catalog(n: int, service: str = "web", *, own_address: bool = False) -> Catalog:
    cat = Catalog()
    for i in range(n):
        addr = f"10.1.{i // 250}.{i % 250 + 1}"
        svc = inst(f"{service}-{i}", service, address=f"10.2.{i // 250}.{i % 250 + 1}")
        if not own_address:
            svc = replace(svc, address="")
        cat.merge(node(f"n{i}", addr, services=[svc]))
    return cat


def test_answers_are_shuffled_per_response() -> None:
    core = make_core(big_catalog(5))
    orders = {tuple(rdatas(ask(core, "web.svc.mesh", qid=i))) for i in range(40)}
    assert len(orders) > 1
    assert {frozenset(o) for o in orders} == {frozenset(f"10.1.0.{i}" for i in range(1, 6))}
    assert all(len(o) == 5 for o in orders)


@pytest.mark.parametrize("n", [2, 3])
def test_small_answers_serve_every_order_in_turn(n: int) -> None:
    """With 2 or 3 records every order is served within n! consecutive answers."""
    core = make_core(big_catalog(n))
    orders = [tuple(rdatas(ask(core, "web.svc.mesh", qid=i))) for i in range(12)]
    window = 2 if n == 2 else 6
    for start in range(len(orders) - window + 1):
        assert len(set(orders[start : start + window])) == window


def test_srv_answers_are_shuffled_per_response() -> None:
    core = make_core(big_catalog(4))
    orders = {tuple(srv_records(ask(core, "_web._tcp.svc.mesh", "SRV", qid=i))) for i in range(40)}
    assert len(orders) > 1
    assert {frozenset(o) for o in orders} == {frozenset(f"n{i}.node.mesh." for i in range(4))}


def test_two_instances_on_one_address_give_one_a_record() -> None:
    reply = ask(make_core(), "cache.svc.mesh")
    assert rdatas(reply, "A") == ["10.0.3.1"]


def test_a_record_limit_cuts_after_shuffling() -> None:
    """Regression: the limit was applied before shuffling, so the same
    instances were always returned and the others got no traffic."""
    core = make_core(big_catalog(6), a_record_limit=2)
    seen: set[str] = set()
    for i in range(40):
        got = rdatas(ask(core, "web.svc.mesh", qid=i), "A")
        assert len(got) == 2
        seen.update(got)
    assert len(seen) > 2


def test_a_record_limit_applies_to_srv_with_matching_glue() -> None:
    core = make_core(big_catalog(6), a_record_limit=3)
    seen: set[str] = set()
    for i in range(40):
        reply = ask(core, "_web._tcp.svc.mesh", "SRV", qid=i)
        targets = set(srv_records(reply))
        assert len(targets) == 3
        assert set(additional(reply)) == targets  # no glue for targets left out
        seen |= targets
    assert len(seen) > 3


# --- sizes and truncation --------------------------------------------------------------------

A_RR_SIZE = 16  # a compressed A record: name pointer, type, class, TTL, rdlength, address


def assert_trimmed(out: bytes | Forward | None, limit: int, n: int) -> DNSRecord:
    assert isinstance(out, bytes)
    assert len(out) <= limit
    reply = DNSRecord.parse(out)
    assert reply.header.tc == 1
    assert reply.header.rcode == Rcode.NOERROR
    assert 0 < len(reply.rr) < n
    assert len(out) + A_RR_SIZE > limit  # as many answers as fit, not fewer
    return reply


def test_udp_answer_is_trimmed_to_512_bytes_with_tc() -> None:
    core = make_core(big_catalog(60))
    reply = assert_trimmed(core.handle(query("web.svc.mesh")), 512, 60)
    assert reply.ar == []


@pytest.mark.parametrize(
    ("client", "cap", "limit"), [(4096, 1232, 1232), (800, 1232, 800), (100, 1232, 512)]
)
def test_udp_answer_is_trimmed_to_the_edns_size_capped_by_udp_max_payload(
    client: int, cap: int, limit: int
) -> None:
    core = make_core(big_catalog(120), udp_max_payload=cap)
    reply = assert_trimmed(core.handle(query("web.svc.mesh", edns=client)), limit, 120)
    (opt,) = reply.ar
    assert opt.rtype == QTYPE.OPT
    assert opt.rclass == cap  # our payload size


def test_opt_is_echoed_only_when_the_query_had_one() -> None:
    core = make_core()
    assert [rr.rtype for rr in ask(core, "udvr.svc.mesh", edns=1232).ar] == [QTYPE.OPT]
    assert ask(core, "udvr.svc.mesh").ar == []


def test_tcp_answers_are_not_trimmed() -> None:
    core = make_core(big_catalog(600))
    out = core.handle(query("web.svc.mesh"), tcp=True)
    assert isinstance(out, bytes)
    assert 512 < len(out) <= 65535
    reply = DNSRecord.parse(out)
    assert reply.header.tc == 0
    assert len(reply.rr) == 600


def test_srv_glue_that_does_not_fit_is_dropped_without_tc() -> None:
    """Regression (RFC 2181 9): TC was set when only additional records were
    dropped, sending clients to TCP for a complete answer."""
    core = make_core(big_catalog(12))
    out = core.handle(query("_web._tcp.svc.mesh", "SRV"))
    assert isinstance(out, bytes)
    assert len(out) <= 512
    reply = DNSRecord.parse(out)
    assert reply.header.tc == 0
    assert len(srv_records(reply)) == 12
    # over TCP the glue is there
    tcp = ask(core, "_web._tcp.svc.mesh", "SRV", tcp=True)
    assert len(additional(tcp)) == 12


def test_srv_trimmed_when_the_answers_do_not_fit() -> None:
    core = make_core(big_catalog(60, own_address=True))
    out = core.handle(query("_web._tcp.svc.mesh", "SRV"))
    assert isinstance(out, bytes)
    assert len(out) <= 512
    reply = DNSRecord.parse(out)
    assert reply.header.tc == 1
    assert 0 < len(srv_records(reply)) < 60


def test_trimming_a_big_fleet_is_fast() -> None:
    """Regression: trimming popped one answer and re-packed each time (quadratic);
    1,000 SRV answers over UDP took about a minute and blocked the agent."""
    core = make_core(big_catalog(1000))
    start = time.perf_counter()
    reply = ask(core, "_web._tcp.svc.mesh", "SRV")
    assert time.perf_counter() - start < 5.0
    assert reply.header.tc == 1


# --- recursion ---------------------------------------------------------------------------------


def test_outside_names_are_forwarded_when_there_are_recursors() -> None:
    core = DnsCore(DnsConfig(), fleet(), has_recursors=True)
    data = query("Example.COM", "MX")
    out = core.handle(data)
    assert isinstance(out, Forward)
    assert out.data == data
    assert out.query.name == "example.com"
    assert out.query.qtype == QTYPE.MX
    # RA is advertised on local answers too
    assert ask(core, "udvr.svc.mesh").header.ra == 1


@pytest.mark.parametrize("edns", [None, 4096])
def test_outside_names_are_refused_without_recursors(edns: int | None) -> None:
    core = make_core()
    reply = ask(core, "example.com", "A", qid=77, edns=edns)
    assert reply.header.rcode == Rcode.REFUSED
    assert reply.header.id == 77
    assert reply.header.ra == 0
    assert str(reply.q.qname) == "example.com."
    opt = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    assert [rr.rclass for rr in opt] == ([] if edns is None else [1232])
    assert core.stats.answers[("A", "REFUSED")] == 1


def test_reply_for_failed_recursion_carries_our_payload_size() -> None:
    core = DnsCore(DnsConfig(udp_max_payload=1400), fleet(), has_recursors=True)
    fwd = core.handle(query("example.com", edns=4096))
    assert isinstance(fwd, Forward)
    reply = DNSRecord.parse(core.reply(fwd.query, Rcode.SERVFAIL))
    assert reply.header.rcode == Rcode.SERVFAIL
    assert [rr.rclass for rr in reply.ar] == [1400]


def test_names_merely_ending_in_the_domain_are_not_ours() -> None:
    assert ask(make_core(), "notmesh").header.rcode == Rcode.REFUSED
    assert ask(make_core(), "udvr.svc.xmesh").header.rcode == Rcode.REFUSED


# --- catalog changes are seen by the very next query ---------------------------------------


def _register(cat: Catalog) -> None:
    bump(cat, "a2", services=(inst("u2", tags=("v1",), port=8081), inst("u5", address="10.0.1.9")))


def _deregister(cat: Catalog) -> None:
    bump(cat, "a1", services=())


def _critical(cat: Catalog) -> None:
    bump(cat, "a1", checks=(check(Health.CRITICAL, "u1"),))


def _dead(cat: Catalog) -> None:
    cat.set_node_dead("a1", True)


@pytest.mark.parametrize(
    ("change", "after"),
    [
        (_register, {"10.0.1.1", "10.0.1.2", "10.0.1.9"}),
        (_deregister, {"10.0.1.2"}),
        (_critical, {"10.0.1.2"}),
        (_dead, {"10.0.1.2"}),
    ],
)
@pytest.mark.parametrize("tcp", [False, True])
def test_a_catalog_change_is_seen_by_the_next_identical_query(
    change: Callable[[Catalog], None], after: set[str], tcp: bool
) -> None:
    cat = fleet()
    core = make_core(cat)
    for _ in range(3):  # cached after the first
        assert addresses(ask(core, "udvr.svc.mesh", tcp=tcp)) == {"10.0.1.1", "10.0.1.2"}
    assert core.stats.hits == 2
    change(cat)
    assert addresses(ask(core, "udvr.svc.mesh", tcp=tcp)) == after


def test_nxdomain_is_not_cached_past_a_registration() -> None:
    cat = fleet()
    core = make_core(cat)
    assert ask(core, "new.svc.mesh").header.rcode == Rcode.NXDOMAIN
    cat.merge(node("z1", "10.0.5.1", services=[inst("n1", "new")]))
    assert rdatas(ask(core, "new.svc.mesh"), "A") == ["10.0.5.1"]


# --- header rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["udvr.svc.mesh", "a1.node.mesh", "nope.svc.mesh"])
def test_cache_hits_get_their_own_id(name: str) -> None:
    core = make_core()
    first = ask(core, name, qid=1)
    second = ask(core, name, qid=0xBEEF)
    assert (first.header.id, second.header.id) == (1, 0xBEEF)
    assert core.stats.hits == 1
    assert addresses(first) == addresses(second)
    assert first.header.rcode == second.header.rcode


def test_question_case_is_echoed_as_sent() -> None:
    core = make_core(big_catalog(3))
    for _ in range(2):  # miss, then hit
        out = core.handle(query("WeB.SvC.MeSh"))
        assert isinstance(out, bytes)
        assert b"\x03WeB\x03SvC\x04MeSh\x00" in out
        reply = DNSRecord.parse(out)
        assert reply.q.qname.label == (b"WeB", b"SvC", b"MeSh")
        assert len(reply.rr) == 3
        assert all(rr.rname.label == (b"WeB", b"SvC", b"MeSh") for rr in reply.rr)


@pytest.mark.parametrize("rd", [False, True])
def test_rd_is_copied_and_aa_set(rd: bool) -> None:
    core = make_core()
    for name in ("udvr.svc.mesh", "nope.svc.mesh"):
        reply = ask(core, name, rd=rd)
        assert reply.header.rd == int(rd)
        assert reply.header.aa == 1
        assert reply.header.qr == 1
        assert reply.header.ra == 0


def test_stats_count_answers_by_type_and_rcode() -> None:
    core = make_core()
    ask(core, "udvr.svc.mesh")
    ask(core, "udvr.svc.mesh", qid=9)
    ask(core, "nope.svc.mesh", "SRV")
    ask(core, "udvr.svc.mesh", "AAAA")
    assert core.stats.answers == {
        ("A", "NOERROR"): 2,
        ("SRV", "NXDOMAIN"): 1,
        ("AAAA", "NOERROR"): 1,
    }
    assert (core.stats.hits, core.stats.misses) == (1, 3)


# --- hostile and malformed packets --------------------------------------------------------------


def header(
    qid: int = 0x1234,
    flags: int = 0x0100,
    qd: int = 1,
    an: int = 0,
    ns: int = 0,
    ar: int = 0,
) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, ns, ar)


QUESTION = b"\x04udvr\x03svc\x04mesh\x00" + struct.pack("!HH", 1, 1)
OPT_V0 = b"\x00" + struct.pack("!HHBBHH", 41, 1232, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "short"),
        (b"\x12", "short"),
        (header()[:11], "short"),
        (header(flags=0x8000) + QUESTION, "response"),
        (header(flags=0x8400) + QUESTION, "response"),
        (header() + QUESTION + b"\x00" * 1100, "oversized"),
    ],
)
@pytest.mark.parametrize("tcp", [False, True])
def test_packets_without_a_sane_reply_are_dropped(packet: bytes, reason: str, tcp: bool) -> None:
    core = make_core()
    assert core.handle(packet, tcp=tcp) is None
    assert core.stats.dropped == {reason: 1}
    assert core.stats.answers == {}


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (header(qd=0), Rcode.FORMERR),
        (header(qd=2) + QUESTION + QUESTION, Rcode.FORMERR),
        (header(an=1) + QUESTION, Rcode.FORMERR),
        (header(ns=1) + QUESTION, Rcode.FORMERR),
        (header(ar=2) + QUESTION + OPT_V0 + OPT_V0, Rcode.FORMERR),
        (header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", Rcode.FORMERR),  # label > 63
        (header() + b"\x80\x00\x00\x01\x00\x01", Rcode.FORMERR),  # reserved label type
        (header() + b"\x10udvr\x00\x00\x01\x00\x01", Rcode.FORMERR),  # label past the end
        (header() + b"\x04udvr\x03svc", Rcode.FORMERR),  # no terminating root label
        (header() + b"\xc0\x0c\x00\x01\x00\x01", Rcode.FORMERR),  # compression pointer
        (header() + b"\x04udvr\xc0\x00\x00\x01\x00\x01", Rcode.FORMERR),  # pointer to header
        (header() + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63
         + b"\x3f" + b"d" * 63 + b"\x00\x00\x01\x00\x01", Rcode.FORMERR),  # name > 255 bytes
        (header() + QUESTION[:-2], Rcode.FORMERR),  # question truncated
        (header() + QUESTION + b"\x00", Rcode.FORMERR),  # trailing garbage
        (header() + QUESTION + b"junk" * 5, Rcode.FORMERR),
        (header(ar=1) + QUESTION, Rcode.FORMERR),  # announced OPT missing
        (header(ar=1) + QUESTION + OPT_V0[:-3], Rcode.FORMERR),  # OPT truncated
        (header(ar=1) + QUESTION + b"\x00" + struct.pack("!HHIH", 1, 1, 0, 0), Rcode.FORMERR),
        (header(ar=1) + QUESTION + OPT_V0[:-2] + b"\x00\x04", Rcode.FORMERR),  # rdata missing
        (header(ar=1) + QUESTION + OPT_V0 + b"\x00", Rcode.FORMERR),  # garbage after OPT
        (header(flags=0x1000) + QUESTION, Rcode.NOTIMP),  # STATUS
        (header(flags=0x2100) + QUESTION, Rcode.NOTIMP),  # NOTIFY
        (header(flags=0x2800) + QUESTION, Rcode.NOTIMP),  # UPDATE
        (header(flags=0x7900) + QUESTION, Rcode.NOTIMP),  # opcode 15
    ],
)  # fmt: skip
@pytest.mark.parametrize("tcp", [False, True])
def test_malformed_queries_get_an_error_with_their_id(
    packet: bytes, code: Rcode, tcp: bool
) -> None:
    core = make_core()
    out = core.handle(packet, tcp=tcp)
    assert isinstance(out, bytes)
    reply = DNSRecord.parse(out)
    assert reply.header.id == 0x1234
    assert reply.header.qr == 1
    assert reply.header.rcode == code
    assert reply.header.opcode == (struct.unpack("!H", packet[2:4])[0] >> 11) & 0xF
    assert reply.header.rd == (packet[2] & 1)
    assert reply.rr == []
    assert core.stats.answers == {("other", code.name): 1}
    assert core.stats.dropped == {}


def test_edns_version_1_gets_badvers_in_the_opt_record() -> None:
    core = make_core()
    reply = ask(core, "udvr.svc.mesh", qid=5, edns=1232, edns_version=1)
    assert reply.header.id == 5
    assert reply.header.rcode == 0  # the low bits; BADVERS is 16
    assert rcode(reply) == Rcode.BADVERS
    assert reply.rr == []
    assert core.stats.answers == {("other", "BADVERS"): 1}


def test_edns_version_0_answers_normally() -> None:
    reply = ask(make_core(), "udvr.svc.mesh", edns=1232)
    assert rcode(reply) == Rcode.NOERROR
    assert len(reply.rr) == 2


def test_small_edns_size_means_512() -> None:
    """RFC 6891 6.2.5: a payload size below 512 is treated as 512."""
    core = make_core(big_catalog(60))
    assert_trimmed(core.handle(query("web.svc.mesh", edns=1)), 512, 60)


def test_every_prefix_of_a_query_is_an_error_or_a_drop() -> None:
    """Fed one byte at a time: no prefix is answered as if it were the query."""
    data = query("v2.eu-west-1b.udvr.svc.mesh", "SRV", edns=1232)
    core = make_core()
    for n in range(len(data)):
        out = core.handle(data[:n])
        if n < 12:
            assert out is None
        else:
            assert isinstance(out, bytes)
            assert DNSRecord.parse(out).header.rcode == Rcode.FORMERR
    assert core.stats.dropped == {"short": 12}
    assert ask(core, "v2.eu-west-1b.udvr.svc.mesh", "SRV", edns=1232).rr


def test_query_names_fold_only_ascii_case() -> None:
    """Regression (RFC 4343): non-ASCII bytes were case-folded as latin-1."""
    q = DNSRecord.question("x.mesh")
    q.q.qname.label = (b"\xc9T\xc0", b"MESH")
    parsed = parse_query(bytes(q.pack()))
    assert parsed.name == "\xc9t\xc0.mesh"
    assert parsed.labels == (b"\xc9T\xc0", b"MESH")

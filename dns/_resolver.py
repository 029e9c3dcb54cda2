"""The sans-IO DNS resolver: query bytes + catalog -> reply bytes.

Names (domain ``mesh`` by default, case-insensitive), after Consul's DNS
interface with ``svc`` for ``service``:

- ``[filter.]...<service>.svc.mesh`` A/AAAA/SRV: healthy instances; each
  filter label is an AZ or a tag and all must match; without an AZ filter the
  instances in this agent's AZ are preferred when any is healthy.
- ``_<service>._tcp.svc.mesh`` / ``_<service>._<tag>.svc.mesh`` SRV (RFC 2782).
- ``<node>.node.mesh`` A/AAAA and TXT (node meta); ``<hex>.addr.mesh`` for SRV
  targets of instances with their own address; ``ns.mesh`` for the NS record.
- SOA and NS at the apex; NXDOMAIN (SOA in authority) for unknown names and for
  services without a healthy instance; NOERROR + SOA (NODATA) for a known name
  without records of the asked type; the negative TTL is the SOA minimum.

Answers are encoded once and cached, keyed by the query bytes after the ID
(so case, flags and EDNS size are part of the key); a hit patches in the ID.
The cache is dropped whenever the catalog's index moves, so a change is seen
by the very next query. Several shuffled encodings of each answer are kept and
served in turn, so answers are shuffled per response at the cost of a hit.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from dataclasses import dataclass
from typing import Any

from dnslib import (
    AAAA,
    EDNS0,
    NS,
    QTYPE,
    RR,
    SOA,
    SRV,
    TXT,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)
from dnslib import A as ARecord

from hostmesh._config import DnsConfig
from hostmesh.catalog import Catalog, Health, InstanceView, service_instances

from ._wire import (
    HEADER_SIZE,
    MAX_LABEL,
    MAX_NAME,
    Drop,
    FormatError,
    QType,
    Query,
    Rcode,
    error_reply,
    parse_query,
)

__all__ = ["TCP_MAX_SIZE", "DnsCore", "DnsStats", "Forward"]

#: Largest DNS message over TCP (a two-byte length prefix).
TCP_MAX_SIZE = 65535
#: Shuffled encodings kept per cached answer; served in turn.
SHUFFLE_VARIANTS = 8
#: Answers with at most this many records get every order as a variant (3! <= 8).
PERMUTE_MAX = 3
#: The SOA serial wraps at 2**32 (RFC 1982).
_SERIAL_MOD = 2**32
#: The smallest resource record on the wire: a one-byte root name plus type,
#: class, TTL and rdlength (RFC 1035 4.1.3). Bounds how many answers can fit
#: in a size limit before anything is packed.
_MIN_RR_SIZE = 11

_QTYPE_NAMES = {int(t): t.name for t in QType}


def qtype_name(qtype: int) -> str:
    """A bounded label for metrics: the known names, else "other"."""
    return _QTYPE_NAMES.get(qtype, "other")


@dataclass(frozen=True, slots=True)
class Forward:
    """The name is outside our domain: the adapter asks the recursors."""

    query: Query
    data: bytes


class DnsStats:
    """Counters the adapter exports as metrics.

    Cache hits are counted on the cache entries themselves (one attribute add
    on the hot path) and folded in here when a cache is dropped; ``hits`` and
    ``answers`` add up both.
    """

    def __init__(self) -> None:
        self.misses = 0
        self.dropped: dict[str, int] = {}
        self._hits = 0
        self._answers: dict[tuple[str, ...], int] = {}
        self._live: list[dict[bytes, _Entry]] = []

    @property
    def hits(self) -> int:
        return self._hits + sum(e.hits for cache in self._live for e in cache.values())

    @property
    def answers(self) -> dict[tuple[str, ...], int]:
        """Answers by (qtype, rcode), cached ones included."""
        out = dict(self._answers)
        for cache in self._live:
            for entry in cache.values():
                if entry.hits:
                    out[entry.key] = out.get(entry.key, 0) + entry.hits
        return out

    def count(self, qtype: int, rcode: int) -> None:
        key = (
            qtype_name(qtype),
            Rcode(rcode).name if rcode in Rcode._value2member_map_ else "other",
        )
        self._answers[key] = self._answers.get(key, 0) + 1

    def fold(self, cache: dict[bytes, _Entry]) -> None:
        """Keep the counts of a cache about to be cleared."""
        for entry in cache.values():
            if entry.hits:
                self._hits += entry.hits
                self._answers[entry.key] = self._answers.get(entry.key, 0) + entry.hits

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class _Entry:
    __slots__ = ("first", "hits", "key", "n", "turn", "variants")

    def __init__(self, variants: list[bytes], key: tuple[str, ...]) -> None:
        self.variants = variants
        self.first = variants[0]
        self.n = len(variants)
        self.key = key
        self.hits = 0  # answers served from this entry
        self.turn = 0  # which shuffled variant comes next


@dataclass(slots=True)
class _Answer:
    rcode: Rcode = Rcode.NOERROR
    answers: list[Any] | None = None
    authority: list[Any] | None = None
    additional: list[Any] | None = None
    # The answers are an RRset to shuffle and cut to a_record_limit (A/AAAA/SRV).
    shuffle: bool = False
    # SRV target labels -> its A/AAAA record, added for the answers kept.
    targets: dict[tuple[bytes, ...], Any] | None = None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class DnsCore:
    """Answers queries for the mesh domain from a catalog.

    Args:
        config: the DNS settings.
        catalog: the agent's catalog (read on every cache miss).
        local_az: this agent's AZ; its instances are preferred.
        ns_address: the address reported for ``ns.<domain>`` (our listener).
        has_recursors: whether names outside the domain can be recursed
            (sets RA; without recursors they are REFUSED).
        rng: randomness for shuffling (seeded in tests).
    """

    def __init__(
        self,
        config: DnsConfig,
        catalog: Catalog,
        *,
        local_az: str = "",
        ns_address: str = "127.0.0.1",
        has_recursors: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.local_az = local_az.lower()
        self.ns_address = ns_address
        self.has_recursors = has_recursors
        self.stats = DnsStats()
        self._rng = rng or random.Random()
        self._domain = tuple(config.domain.split("."))
        self._origin = DNSLabel(config.domain + ".")
        self._cache: dict[bytes, _Entry] = {}
        self._tcp_cache: dict[bytes, _Entry] = {}
        self._index = -1
        self.stats._live = [self._cache, self._tcp_cache]
        self._ttl_prefixes = sorted(
            ((k.rstrip("*").lower(), v) for k, v in config.service_ttl.items()),
            key=lambda kv: len(kv[0]),
            reverse=True,
        )

    # --- the hot path -----------------------------------------------------------

    def handle(self, data: bytes, *, tcp: bool = False) -> bytes | Forward | None:
        """Answer one query: reply bytes, a :class:`Forward`, or None (drop)."""
        if not tcp:
            return self.handle_udp(data)
        if self._index != self.catalog.index:
            self._reset_caches()
        key = data[2:]
        entry = self._tcp_cache.get(key)
        if entry is None:
            return self._miss(data, key, self._tcp_cache, True)
        return data[:2] + _serve(entry)

    @property
    def udp_cache(self) -> dict[bytes, _Entry]:
        """The UDP answer cache (for the adapter's inlined hit path; cleared in place)."""
        return self._cache

    @property
    def cache_index(self) -> int:
        """The catalog index the caches were filled at."""
        return self._index

    def handle_udp(self, data: bytes) -> bytes | Forward | None:
        """:meth:`handle` for UDP, the hot path: a dict lookup and an ID patch on a hit."""
        if self._index != self.catalog.index:
            self._reset_caches()
        key = data[2:]
        entry = self._cache.get(key)
        if entry is None:
            return self._miss(data, key, self._cache, False)
        entry.hits += 1
        if entry.n == 1:
            return data[:2] + entry.first
        entry.turn = turn = (entry.turn + 1) % entry.n
        return data[:2] + entry.variants[turn]

    def _reset_caches(self) -> None:
        for cache in (self._cache, self._tcp_cache):
            self.stats.fold(cache)
            cache.clear()
        self._index = self.catalog.index

    def _miss(
        self, data: bytes, key: bytes, cache: dict[bytes, _Entry], tcp: bool
    ) -> bytes | Forward | None:
        try:
            query = parse_query(data)
        except Drop as exc:
            self.stats.drop(exc.reason)
            return None
        except FormatError as exc:
            self.stats.count(0, exc.rcode)
            return error_reply(exc.query_id, exc.flags, exc.rcode)
        # RFC 4343: only ASCII letters fold.
        labels = tuple(label.lower().decode("latin-1") for label in query.labels)
        n = len(self._domain)
        if labels[-n:] != self._domain:
            if not self.has_recursors:
                return self.reply(query, Rcode.REFUSED)
            return Forward(query, data)
        self.stats.misses += 1
        answer = self._resolve(query, labels[:-n])
        limit = TCP_MAX_SIZE if tcp else min(query.edns_size or 512, self.config.udp_max_payload)
        variants = self._encode(query, answer, limit)
        entry = _Entry(variants, (qtype_name(query.qtype), answer.rcode.name))
        if len(cache) >= self.config.cache_size:
            self.stats.fold(cache)
            cache.clear()
        cache[key] = entry
        self.stats._answers[entry.key] = self.stats._answers.get(entry.key, 0) + 1
        return data[:2] + entry.first

    def reply(self, query: Query, rcode: Rcode) -> bytes:
        """An empty reply with ``rcode`` (the adapter's SERVFAIL for recursion)."""
        self.stats.count(query.qtype, rcode)
        # RFC 6891 6.2.3: a reply's OPT carries the responder's payload size.
        edns = None if query.edns_size is None else self.config.udp_max_payload
        return error_reply(query.id, query.flags, rcode, query.question, edns)

    # --- names ------------------------------------------------------------------

    def _resolve(self, query: Query, rel: tuple[str, ...]) -> _Answer:
        if query.qclass not in (1, 255):  # IN or ANY
            return _Answer(Rcode.REFUSED)
        if not rel:
            return self._apex(query)
        if rel == ("ns",):
            return self._address_answer(query, [self.ns_address], self._soa_ttl())
        kind = rel[-1]
        if kind == "svc":
            if len(rel) == 1:
                return self._nodata()
            if len(rel) == 3 and rel[0].startswith("_") and rel[1].startswith("_"):
                service, proto = rel[0][1:], rel[1][1:]
                tags = () if proto == "tcp" else (proto,)
                return self._service(query, service, tags, srv_only=True)
            return self._service(query, rel[-2], rel[:-2], srv_only=False)
        if kind == "node" and len(rel) >= 2:
            return self._node(query, ".".join(rel[:-1]))  # node names may hold dots
        if kind == "addr" and len(rel) == 2:
            addr = _decode_addr(rel[0])
            if addr is None:
                return self._nxdomain()
            return self._address_answer(query, [addr], self._service_ttl(""))
        return self._nxdomain()

    def _apex(self, query: Query) -> _Answer:
        soa = self._soa_rr()
        ns = RR(self._origin, QTYPE.NS, rdata=NS(self._ns_name()), ttl=self._soa_ttl())
        glue = _address_rr(self._ns_name(), self.ns_address, self._soa_ttl())
        additional = [glue] if glue is not None else []
        if query.qtype == QType.SOA:
            return _Answer(answers=[soa], authority=[ns], additional=additional)
        if query.qtype == QType.NS:
            return _Answer(answers=[ns], additional=additional)
        if query.qtype == QType.ANY:
            return _Answer(answers=[soa, ns], additional=additional)
        return self._nodata()

    def _node(self, query: Query, name: str) -> _Answer:
        rec = next((r for r in self.catalog if r.node.name.lower() == name and not r.left), None)
        if rec is None:
            return self._nxdomain()
        ttl = int(self.config.node_ttl)
        answer = self._address_answer(query, [rec.node.address], ttl)
        if query.qtype in (QType.TXT, QType.ANY) and rec.node.meta:
            txt = [
                RR(
                    _qname(query),
                    QTYPE.TXT,
                    rdata=TXT(f"{k}={v}".encode()[:255]),
                    ttl=ttl,
                )
                for k, v in sorted(rec.node.meta.items())
            ]
            if answer.rcode is Rcode.NOERROR and answer.answers:
                answer = _Answer(answers=answer.answers + txt)
            else:
                answer = _Answer(answers=txt)
        return answer

    def _address_answer(self, query: Query, addresses: list[str], ttl: int) -> _Answer:
        """A/AAAA records for ``addresses`` as the qtype asks; NODATA if none fit."""
        records = []
        seen = set()
        for text in addresses:
            ip = _ip(text)
            if ip is None or ip in seen:
                continue
            seen.add(ip)
            if ip.version == 4 and query.qtype in (QType.A, QType.ANY):
                records.append(RR(_qname(query), QTYPE.A, rdata=ARecord(str(ip)), ttl=ttl))
            elif ip.version == 6 and query.qtype in (QType.AAAA, QType.ANY):
                records.append(RR(_qname(query), QTYPE.AAAA, rdata=AAAA(str(ip)), ttl=ttl))
        if not records:
            return self._nodata()
        return _Answer(answers=records, shuffle=True)

    def _service(
        self, query: Query, name: str, filters: tuple[str, ...], *, srv_only: bool
    ) -> _Answer:
        views = self._healthy(name, filters)
        if not views:
            return self._nxdomain()
        ttl = self._service_ttl(name)
        if query.qtype == QType.SRV:
            return self._srv(query, views, ttl)
        if srv_only:
            return self._nodata()
        return self._address_answer(query, [v.address for v in views], ttl)

    def _srv(self, query: Query, views: list[InstanceView], ttl: int) -> _Answer:
        """One SRV per instance (RFC 2782); the targets' addresses go in additional.

        Catalog data is not trusted to be a valid DNS name: a node name that
        is not one gets the ``<hex>.addr`` target, and an instance that cannot
        be expressed at all (bad port, bad hostname) is left out.
        """
        answers = []
        targets: dict[tuple[bytes, ...], Any] = {}
        for view in views:
            port = view.instance.port
            if not 0 <= port <= 65535:
                continue
            address = view.address
            ip = _ip(address)
            target = None
            if not view.instance.address or view.instance.address == view.node.address:
                target = _dns_name(f"{view.node.name}.node.{self.config.domain}")
            if target is None:
                if ip is not None:
                    target = _dns_name(f"{_encode_addr(ip)}.addr.{self.config.domain}")
                else:
                    target = _dns_name(address)
            if target is None:
                continue
            weight = max(0, min(view.weight, 65535))
            answers.append(
                RR(
                    _qname(query),
                    QTYPE.SRV,
                    rdata=SRV(priority=1, weight=weight, port=port, target=target),
                    ttl=ttl,
                )
            )
            glue = _address_rr(target, address, ttl)
            if glue is not None and target.label not in targets:
                targets[target.label] = glue
        if not answers:
            return self._nodata()
        return _Answer(answers=answers, targets=targets, shuffle=True)

    def _healthy(self, name: str, filters: tuple[str, ...]) -> list[InstanceView]:
        """Healthy instances of ``name`` matching every filter label, same-AZ first."""
        allowed = (Health.PASSING,) if self.config.only_passing else (
            Health.PASSING, Health.WARNING)  # fmt: skip
        actual = self._service_name(name)
        if actual is None:
            return []
        views = []
        for view in service_instances(self.catalog, actual):
            if not view.node_live or view.health not in allowed:
                continue
            az = view.node.az.lower()
            tags = {t.lower() for t in view.instance.tags}
            if all(f == az or f in tags for f in filters):
                views.append(view)
        if self.local_az and not any(f == v.node.az.lower() for f in filters for v in views):
            local = [v for v in views if v.node.az.lower() == self.local_az]
            if local:
                return local
        return views

    def _service_name(self, lowered: str) -> str | None:
        for rec in self.catalog:
            if rec.left:
                continue
            for svc in rec.services:
                if svc.name.lower() == lowered:
                    return svc.name
        return None

    # --- TTLs and negative answers ------------------------------------------------

    def _service_ttl(self, name: str) -> int:
        for prefix, ttl in self._ttl_prefixes:
            if name.startswith(prefix):
                return int(ttl)
        return int(self.config.ttl)

    def _soa_ttl(self) -> int:
        return self.config.soa_min_ttl

    def _ns_name(self) -> DNSLabel:
        return DNSLabel(f"ns.{self.config.domain}.")

    def _soa_rr(self) -> Any:
        cfg = self.config
        serial = self.catalog.index % _SERIAL_MOD
        return RR(
            self._origin,
            QTYPE.SOA,
            rdata=SOA(
                self._ns_name(),
                DNSLabel(f"hostmaster.{cfg.domain}."),
                (serial, cfg.soa_refresh, cfg.soa_retry, cfg.soa_expire, cfg.soa_min_ttl),
            ),
            ttl=cfg.soa_min_ttl,
        )

    def _nxdomain(self) -> _Answer:
        return _Answer(Rcode.NXDOMAIN, authority=[self._soa_rr()])

    def _nodata(self) -> _Answer:
        return _Answer(Rcode.NOERROR, authority=[self._soa_rr()])

    # --- encoding -------------------------------------------------------------------

    def _encode(self, query: Query, answer: _Answer, limit: int) -> list[bytes]:
        """Encoded replies without the 2-byte ID: several shuffles when it has many records.

        a_record_limit cuts each shuffled order (Consul shuffles, then cuts), so
        every instance gets its share of answers.
        """
        answers = answer.answers or []
        orders: list[list[Any]] = [answers]
        if answer.shuffle and len(answers) > 1:
            if len(answers) <= PERMUTE_MAX:
                orders = [list(p) for p in itertools.permutations(answers)]
            else:
                orders = [self._rng.sample(answers, len(answers)) for _ in range(SHUFFLE_VARIANTS)]
        cut = self.config.a_record_limit if answer.shuffle else 0
        if cut:
            orders = [order[:cut] for order in orders]
        return [self._pack(query, answer, order, limit)[2:] for order in orders]

    def _pack(self, query: Query, answer: _Answer, order: list[Any], limit: int) -> bytes:
        """The reply with ``order`` as its answers, trimmed to ``limit`` bytes.

        RFC 2181 9: dropping additional records does not set TC; dropping
        answers does. The number of answers kept is found by bisection (each
        try packs the whole reply), capped first by what could possibly fit.
        """

        def build(answers: list[Any], additional: list[Any], truncated: bool) -> bytes:
            record = DNSRecord(
                DNSHeader(
                    id=0,
                    qr=1,
                    aa=1,
                    rd=int(query.rd),
                    ra=int(self.has_recursors),
                    tc=int(truncated),
                    rcode=int(answer.rcode),
                ),
                q=DNSQuestion(DNSLabel(query.labels), query.qtype, query.qclass),
            )
            for rr in answers:
                record.add_answer(rr)
            for rr in answer.authority or []:
                record.add_auth(rr)
            for rr in additional:
                record.add_ar(rr)
            if query.edns_size is not None:
                record.add_ar(EDNS0(udp_len=self.config.udp_max_payload))
            packed: bytes = record.pack()
            return packed

        additional = list(answer.additional or [])
        if answer.targets:
            seen = set()
            for rr in order:
                target = rr.rdata.target.label
                if target in answer.targets and target not in seen:
                    seen.add(target)
                    additional.append(answer.targets[target])
        most = (limit - HEADER_SIZE) // _MIN_RR_SIZE  # answers that could fit at all
        if len(order) <= most:
            if additional:
                packed = build(order, additional, False)
                if len(packed) <= limit:
                    return packed
            packed = build(order, [], False)
            if len(packed) <= limit:
                return packed
        # The largest k with order[:k] fitting; k = 0 always fits (a question
        # and at most an SOA stay under 512 bytes).
        lo, hi = 0, min(len(order) - 1, most)
        best = build([], [], True)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            packed = build(order[:mid], [], True)
            if len(packed) <= limit:
                lo, best = mid, packed
            else:
                hi = mid - 1
        return best


def _qname(query: Query) -> DNSLabel:
    return DNSLabel(query.labels)


def _dns_name(text: str) -> DNSLabel | None:
    """``text`` as a name if it is a valid one (RFC 1035 2.3.4), else None.

    Built from raw labels: ``DNSLabel(str)`` runs IDNA and raises on long labels.
    """
    try:
        raw = text.rstrip(".").encode("ascii")
    except UnicodeEncodeError:
        return None
    labels = tuple(raw.split(b"."))
    if len(raw) + 2 > MAX_NAME or not all(0 < len(x) <= MAX_LABEL for x in labels):
        return None
    return DNSLabel(labels)


def _address_rr(name: DNSLabel, address: str, ttl: int) -> Any:
    """An A or AAAA record for ``address``; None when it is not an IP address."""
    ip = _ip(address)
    if ip is None:
        return None
    if ip.version == 4:
        return RR(name, QTYPE.A, rdata=ARecord(str(ip)), ttl=ttl)
    return RR(name, QTYPE.AAAA, rdata=AAAA(str(ip)), ttl=ttl)


def _encode_addr(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Consul's ``<hex>.addr`` form: the address bytes in hex."""
    return ip.packed.hex()


def _decode_addr(label: str) -> str | None:
    if len(label) not in (8, 32):
        return None
    try:
        raw = bytes.fromhex(label)
    except ValueError:
        return None
    return str(ipaddress.ip_address(raw))


def _serve(entry: _Entry) -> bytes:
    """The entry's next encoding (without the ID), counted as a hit."""
    entry.hits += 1
    if entry.n == 1:
        return entry.first
    entry.turn = turn = (entry.turn + 1) % entry.n
    return entry.variants[turn]

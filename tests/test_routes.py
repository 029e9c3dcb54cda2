"""Traffic policy: loading from TOML, route matching, weighted targets, retries."""

from __future__ import annotations

import ast
import copy
import json
import math
import pickle
import random
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_layout import forbidden_imports, source_of

from hostmesh import ConfigError
from hostmesh._config import from_mapping
from hostmesh._routes import (
    DEFAULT_POLICY,
    DEFAULT_ROUTE,
    MAX_HEADER_MATCHES,
    MAX_REGEX_LENGTH,
    MAX_ROUTES,
    MAX_TARGET_WEIGHT,
    MAX_TARGETS,
    HeaderMatch,
    OutlierPolicy,
    RetryPolicy,
    Route,
    RouteMatch,
    Target,
    TrafficPolicy,
    match_route,
    pick_target,
    pick_target_among,
)
from hostmesh.catalog import ServiceInstance


@dataclass(frozen=True)
class Agent:
    """Stands in for AgentConfig with the ``traffic`` table the lead will add."""

    traffic: Mapping[str, TrafficPolicy] = field(default_factory=dict)


EXAMPLE = """
[traffic.udvr]
rate_limit = 100
rate_burst = 0
max_concurrent = 64

[traffic.udvr.outlier]
consecutive_failures = 7
base_ejection = "10s"
max_ejection_percent = 30

[[traffic.udvr.routes]]
name = "canary-header"
match = { path_prefix = "/api", method = "GET", headers = [{ name = "X-Canary", exact = "1" }] }
timeout = "15s"
per_try_timeout = "500ms"
retries = { max = 3, on = ["connection-error", "gateway-error", "429"] }
targets = [
  { version = "v1", weight = 3 }, { tag = "v2", weight = 1 }, { version = "v3", weight = 0 },
]

[[traffic.udvr.routes]]
match = { headers = [{ name = "x-user", regex = "[a-z]+-[0-9]{2}", invert = true }] }
timeout = 0

[traffic.web]
"""


def load(text: str) -> Mapping[str, TrafficPolicy]:
    return from_mapping(Agent, tomllib.loads(text), source="agent.toml").traffic


def policy(routes_toml: str, extra: str = "") -> TrafficPolicy:
    """One service's policy from ``[[traffic.s.routes]]`` text."""
    return load(f"[traffic.s]\n{extra}\n{routes_toml}")["s"]


def request(
    routes: tuple[Route, ...], method: str = "GET", path: str = "/", **headers: str
) -> str | None:
    """The name of the route a request takes (header names: '_' for '-')."""
    pairs = [(k.replace("_", "-"), v) for k, v in headers.items()]
    route = match_route(routes, method, path, pairs)
    return None if route is None else route.name


# --- loading ----------------------------------------------------------------------


def test_the_example_loads_with_every_field() -> None:
    traffic = load(EXAMPLE)
    udvr = traffic["udvr"]
    assert (udvr.rate_limit, udvr.burst, udvr.max_concurrent) == (100, 100, 64)
    assert udvr.outlier == OutlierPolicy(
        consecutive_failures=7, base_ejection=10.0, max_ejection_percent=30
    )
    canary, second = udvr.routes
    assert canary.name == "canary-header"
    assert second.name == "route-1"  # default name: its index
    assert canary.match.path_prefix == "/api"
    assert canary.match.method == "GET"
    assert canary.match.headers == (HeaderMatch(name="x-canary", exact="1"),)
    assert (canary.timeout, canary.per_try_timeout) == (15.0, 0.5)
    assert canary.retries.max == 3
    assert canary.retries.retry_statuses == {429, 502, 503, 504}
    assert canary.retries.retry_on_connection_error
    assert canary.targets == (
        Target(version="v1", weight=3),
        Target(tag="v2", weight=1),
        Target(version="v3", weight=0),
    )
    assert second.timeout == 0.0
    assert second.retries == RetryPolicy()  # default: 2 on connection-error
    assert second.targets == (Target(),)  # default: all instances
    assert traffic["web"] == DEFAULT_POLICY
    assert traffic["web"].routes == ()


def test_defaults() -> None:
    assert DEFAULT_POLICY.rate_limit == DEFAULT_POLICY.max_concurrent == DEFAULT_POLICY.burst == 0
    assert DEFAULT_POLICY.outlier == OutlierPolicy(5, 30.0, 300.0, 50)
    assert DEFAULT_ROUTE.match == RouteMatch()
    assert DEFAULT_ROUTE.timeout == 15.0
    assert DEFAULT_ROUTE.per_try_timeout == 0.0
    assert DEFAULT_ROUTE.targets == (Target(),)
    assert DEFAULT_ROUTE.retries.max == 2
    assert DEFAULT_ROUTE.retries.retry_on_connection_error
    assert DEFAULT_ROUTE.retries.retry_statuses == frozenset()


def _targets(n: int) -> str:
    return "targets = [" + ", ".join(f'{{ tag = "t{i}" }}' for i in range(n)) + "]"


R = "[[traffic.s.routes]]\n"


def _load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load("[traffic.s]\n" + text)
    assert info.value.file == "agent.toml"
    assert str(info.value).startswith(f"agent.toml: {info.value.key}: ")
    return info.value


@pytest.mark.parametrize(
    ("header", "key", "reason"),
    [
        ('{ name = "a", exact = "1", prefix = "2" }', "prefix", "exactly one"),
        ('{ name = "a" }', "exact", "exactly one"),
        ('{ exact = "1" }', "name", "required"),
        ('{ name = "x canary", exact = "1" }', "name", "invalid header name"),
        ('{ name = "a", regex = "(" }', "regex", "invalid regular expression"),
        (f'{{ name = "a", regex = "{"a" * (MAX_REGEX_LENGTH + 1)}" }}', "regex", "longer than"),
        ('{ name = "a", present = "yes" }', "present", "true or false"),
        ('{ name = "a", exact = 1 }', "exact", "expected a string"),
        ('{ name = "a", suffix = "1" }', "suffix", "unknown key"),
    ],
)
def test_bad_header_match_names_the_dotted_key(header: str, key: str, reason: str) -> None:
    error = _load_error(R + f"match = {{ headers = [{header}] }}")
    assert error.key == f"traffic.s.routes[0].match.headers[0].{key}"
    assert reason in error.reason


@pytest.mark.parametrize(
    ("route", "key", "reason"),
    [
        ('match = { path = "/a", path_prefix = "/b" }', "match.path", "at most one"),
        ('match = { path_prefix = "api" }', "match.path_prefix", "start with '/'"),
        ('match = { path = "/a?b=1" }', "match.path", "query string"),
        ('match = { method = "get" }', "match.method", "upper case"),
        ("match = { method = 1 }", "match.method", "expected a string"),
        ('match = { host = "x" }', "match.host", "unknown key"),
        (
            "match = { headers = ["
            + ", ".join(
                f'{{ name = "h{i}", present = true }}' for i in range(MAX_HEADER_MATCHES + 1)
            )
            + "] }",
            "match.headers",
            "at most",
        ),
        ('targets = [{ tag = "v2", version = "v2" }]', "targets[0].version", "at most one"),
        ('targets = [{ tag = "v2", weight = -1 }]', "targets[0].weight", "0.."),
        ('targets = [{ tag = "v2", weight = "3" }]', "targets[0].weight", "an integer"),
        (
            'targets = [{ tag = "a", weight = 0 }, { tag = "b", weight = 0 }]',
            "targets",
            "weight > 0",
        ),
        ("targets = []", "targets", "1.."),
        (_targets(MAX_TARGETS + 1), "targets", "1.."),
        ('targets = [{ tag = "a" }, { tag = "a", weight = 2 }]', "targets[1]", "twice"),
        ("retries = { max = 11 }", "retries.max", "0..10"),
        ('retries = { on = ["gateway-error", "stream-error"] }', "retries.on[1]", "unknown event"),
        ('retries = { on = ["200"] }', "retries.on[0]", "unknown event"),
        ("retries = { on = [] }", "retries.on", "at least one"),
        ("retries = { retry_statuses = [503] }", "retries.retry_statuses", "unknown key"),
        ('timeout = "1s"\nper_try_timeout = "2s"', "per_try_timeout", "longer"),
        ('timeout = "forever"', "timeout", "invalid duration"),
        ('timeout = "-1s"', "timeout", "invalid duration"),
        ("weight = 3", "weight", "unknown key"),
        ('name = "canary header"', "name", "invalid route name"),
    ],
)
def test_bad_route_names_the_dotted_key(route: str, key: str, reason: str) -> None:
    error = _load_error(R + route)
    assert error.key == f"traffic.s.routes[0].{key}"
    assert reason in error.reason


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (R + 'name = "a"\n' + R + 'name = "a"', "routes[1].name", "duplicate"),
        (R + R + 'name = "route-0"', "routes[1].name", "duplicate"),  # clashes with a default
        (R * (MAX_ROUTES + 1), "routes", "at most"),
        ("routes = 3", "routes", "a list"),
        (
            "[traffic.s.outlier]\nmax_ejection_percent = 101",
            "outlier.max_ejection_percent",
            "0..100",
        ),
        ("[traffic.s.outlier]\nbase_ejection = 0", "outlier.base_ejection", "> 0"),
        ('[traffic.s.outlier]\nbase_ejection = "10m"', "outlier.max_ejection", "at least"),
        ("[traffic.s.outlier]\nconsecutive_failures = -1", "outlier.consecutive_failures", ">= 0"),
        ("rate_limit = -1", "rate_limit", ">= 0"),
        ("rate_burst = 5", "rate_burst", "needs a rate_limit"),
        ("rate_limit = 1.5", "rate_limit", "an integer"),
        ("limit = 5", "limit", "unknown key"),
    ],
)
def test_bad_policy_names_the_dotted_key(text: str, key: str, reason: str) -> None:
    error = _load_error(text)
    assert error.key == f"traffic.s.{key}"
    assert reason in error.reason


def test_limits_are_inclusive() -> None:
    p = policy(
        R + _targets(MAX_TARGETS) + "\n" + R * (MAX_ROUTES - 1),
    )
    assert len(p.routes) == MAX_ROUTES
    assert len(p.routes[0].targets) == MAX_TARGETS
    regex = "a" * MAX_REGEX_LENGTH
    assert HeaderMatch(name="a", regex=regex).matches(regex)
    assert RetryPolicy(max=10).max == 10


def test_round_trip_through_json() -> None:
    for p in load(EXAMPLE).values():
        plain = p.to_json()
        assert from_mapping(TrafficPolicy, plain) == p
        # JSON-ready (what the servers push) and with no nulls, so TOML could hold it too.
        assert from_mapping(TrafficPolicy, json.loads(json.dumps(plain))) == p
        assert "null" not in json.dumps(plain)
    udvr = load(EXAMPLE)["udvr"].to_json()
    assert udvr["routes"][0]["match"]["headers"] == [
        {"name": "x-canary", "exact": "1", "invert": False}
    ]
    assert udvr["routes"][1]["name"] == "route-1"
    assert udvr["routes"][0]["retries"] == {
        "max": 3,
        "on": ["connection-error", "gateway-error", "429"],
    }


def test_copies_and_pickles_keep_working() -> None:
    """Derived values live outside the fields; copies rebuild them."""
    p = load(EXAMPLE)["udvr"]
    for clone in (copy.deepcopy(p), copy.copy(p), pickle.loads(pickle.dumps(p))):
        assert clone == p
        route = clone.routes[0]
        assert pick_target(route, 0.9) == Target(tag="v2", weight=1)
        assert route.retries.retry_statuses == {429, 502, 503, 504}
        assert clone.routes[1].match.headers[0].matches("bob-1")


# --- matching ---------------------------------------------------------------------


def test_first_match_wins() -> None:
    routes = policy(
        R + 'name = "api"\nmatch = { path_prefix = "/api" }\n'
        + R + 'name = "api-v2"\nmatch = { path_prefix = "/api/v2" }\n'
        + R + 'name = "rest"\n'
    ).routes  # fmt: skip
    assert request(routes, path="/api/v2/users") == "api"  # the earlier, broader route
    assert request(routes, path="/other") == "rest"
    swapped = (routes[1], routes[0], routes[2])
    assert request(swapped, path="/api/v2/users") == "api-v2"
    assert request(swapped, path="/api/v1/users") == "api"


def test_no_routes_means_the_default_route_and_no_match_means_none() -> None:
    assert match_route((), "DELETE", "/anything", [("x", "y")]) is DEFAULT_ROUTE
    assert match_route(DEFAULT_POLICY.routes, "GET", "/", []) is DEFAULT_ROUTE
    routes = policy(R + 'match = { path_prefix = "/api" }').routes
    assert match_route(routes, "GET", "/static/app.js", []) is None  # the proxy's 404


def test_an_empty_match_takes_everything() -> None:
    routes = policy(R + 'name = "all"').routes
    for method, path in [("GET", "/"), ("POST", "/a/b?c=d"), ("BREW", "*"), ("GET", "")]:
        assert request(routes, method, path, x_any="1") == "all"


def test_exact_path_and_prefix() -> None:
    routes = policy(
        R + 'name = "exact"\nmatch = { path = "/api" }\n'
        + R + 'name = "prefix"\nmatch = { path_prefix = "/api" }\n'
        + R + 'name = "root"\nmatch = { path_prefix = "/" }\n'
    ).routes  # fmt: skip
    assert request(routes, path="/api") == "exact"
    assert request(routes, path="/api?x=1") == "exact"  # the query string is not the path
    assert request(routes, path="/api/") == "prefix"
    assert request(routes, path="/apiary") == "prefix"  # a plain string prefix
    assert request(routes, path="/API") == "root"  # case-sensitive
    assert request(routes, path="/x?/api") == "root"
    assert request(routes, path="") is None
    assert request(routes, path="*") is None


def test_method() -> None:
    routes = policy(
        R + 'name = "reads"\nmatch = { method = "GET" }\n'
        + R + 'name = "posts"\nmatch = { method = "POST", path_prefix = "/api" }\n'
    ).routes  # fmt: skip
    assert request(routes, "GET", "/x") == "reads"
    assert request(routes, "POST", "/api/x") == "posts"
    assert request(routes, "POST", "/x") is None
    assert request(routes, "get", "/x") is None  # methods are case-sensitive
    assert request(routes, "HEAD", "/x") is None


@pytest.mark.parametrize(
    ("header", "sent", "expected"),
    [
        # exact: case-sensitive value, case-insensitive name
        ({"exact": "1"}, [("x-h", "1")], True),
        ({"exact": "1"}, [("X-H", "1")], True),
        ({"exact": "abc"}, [("x-h", "ABC")], False),
        ({"exact": "1"}, [("x-h", "10")], False),
        ({"exact": "1"}, [], False),
        ({"exact": ""}, [("x-h", "")], True),
        ({"exact": "1", "invert": True}, [("x-h", "1")], False),
        ({"exact": "1", "invert": True}, [("x-h", "2")], True),
        ({"exact": "1", "invert": True}, [], True),  # missing, inverted: Envoy's rule
        # prefix
        ({"prefix": "Mozilla/"}, [("x-h", "Mozilla/5.0")], True),
        ({"prefix": "Mozilla/"}, [("x-h", "curl/8")], False),
        ({"prefix": "Mozilla/"}, [], False),
        ({"prefix": "Mozilla/", "invert": True}, [("x-h", "curl/8")], True),
        ({"prefix": "Mozilla/", "invert": True}, [("x-h", "Mozilla/5.0")], False),
        # regex: the whole value must match
        ({"regex": r"\d{3}"}, [("x-h", "123")], True),
        ({"regex": r"\d{3}"}, [("x-h", "1234")], False),
        ({"regex": r"\d{3}"}, [("x-h", "a123")], False),
        ({"regex": r"\d{3}"}, [], False),
        ({"regex": r"\d{3}", "invert": True}, [("x-h", "1234")], True),
        ({"regex": r"\d{3}", "invert": True}, [("x-h", "123")], False),
        # present
        ({"present": True}, [("x-h", "")], True),
        ({"present": True}, [("other", "1")], False),
        ({"present": False}, [], True),
        ({"present": False}, [("x-h", "1")], False),
        ({"present": True, "invert": True}, [], True),
        ({"present": False, "invert": True}, [("X-h", "1")], True),
        ({"present": False, "invert": True}, [], False),
        # a repeated header is matched as its values joined with ","
        ({"exact": "a,b"}, [("x-h", "a"), ("other", "z"), ("X-H", "b")], True),
        ({"exact": "a"}, [("x-h", "a"), ("x-h", "b")], False),
        ({"regex": "a,.*"}, [("x-h", "a"), ("x-h", "b")], True),
    ],
)
def test_header_match_kinds(
    header: dict[str, Any], sent: list[tuple[str, str]], expected: bool
) -> None:
    route = Route(name="h", match=RouteMatch(headers=(HeaderMatch(name="X-H", **header),)))
    assert (match_route((route,), "GET", "/", sent) is route) is expected


def test_header_matches_combine_with_and() -> None:
    routes = policy(
        R + 'name = "both"\n'
        'match = { headers = [{ name = "a", exact = "1" }, { name = "b", present = false }] }\n'
        + R + 'name = "rest"\n'
    ).routes  # fmt: skip
    assert request(routes, a="1") == "both"
    assert request(routes, a="1", b="") == "rest"
    assert request(routes, b="x") == "rest"


def test_headers_are_read_only_when_a_route_needs_them() -> None:
    class Untouchable:
        def __iter__(self) -> Iterator[tuple[str, str]]:
            raise AssertionError("headers read")

    routes = policy(
        R + 'match = { path_prefix = "/a" }\n' + R + 'match = { method = "GET" }'
    ).routes
    assert match_route(routes, "GET", "/b", Untouchable()) is routes[1]
    routes = policy(
        R + 'match = { path = "/a", headers = [{ name = "x", present = true }] }'
    ).routes
    assert match_route(routes, "GET", "/b", Untouchable()) is None


# --- targets ----------------------------------------------------------------------


def instance(tags: tuple[str, ...] = (), **meta: str) -> ServiceInstance:
    return ServiceInstance(id="i", name="udvr", address="", port=80, tags=tags, meta=meta)


def test_target_selects_by_tag_version_or_all() -> None:
    v1 = instance(("canary",), version="v1")
    v2 = instance(("v2",), version="v2")
    bare = instance()
    assert [Target(version="v1").selects(i) for i in (v1, v2, bare)] == [True, False, False]
    assert [Target(tag="v2").selects(i) for i in (v1, v2, bare)] == [False, True, False]
    assert [Target(tag="canary").selects(i) for i in (v1, v2, bare)] == [True, False, False]
    assert [Target().selects(i) for i in (v1, v2, bare)] == [True, True, True]


CANARY = Route(
    name="canary",
    targets=(
        Target(version="v1", weight=3),
        Target(tag="v2", weight=1),
        Target(version="v3", weight=0),
    ),
)
V1, V2, V3 = CANARY.targets


def test_split_follows_the_weights() -> None:
    rng = random.Random(20240501)
    draws = 40_000
    counts = {V1: 0, V2: 0, V3: 0}
    for _ in range(draws):
        counts[pick_target(CANARY, rng.random())] += 1
    assert counts[V3] == 0
    sd = math.sqrt(draws * 0.75 * 0.25)
    assert abs(counts[V1] - 0.75 * draws) < 4 * sd
    assert counts[V1] + counts[V2] == draws


def test_split_boundaries() -> None:
    assert pick_target(CANARY, 0.0) is V1
    assert pick_target(CANARY, 0.7499) is V1
    assert pick_target(CANARY, 0.75) is V2
    assert pick_target(CANARY, math.nextafter(1.0, 0.0)) is V2
    # The largest draw stays below the total for every total the limits allow,
    # so the bisection always lands on a target.
    below_one = math.nextafter(1.0, 0.0)
    assert all(below_one * t < t for t in range(1, MAX_TARGETS * MAX_TARGET_WEIGHT + 1))
    # A leading weight-0 target is never chosen, not even by r = 0.
    drained_first = Route(targets=(Target(tag="old", weight=0), Target(tag="new", weight=5)))
    assert pick_target(drained_first, 0.0).tag == "new"
    for r in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="r must be in"):
            pick_target(CANARY, r)


def test_many_targets_each_get_their_slice() -> None:
    route = policy(R + _targets(MAX_TARGETS)).routes[0]
    n = len(route.targets)
    assert n == MAX_TARGETS > 10
    picked = [pick_target(route, (i + 0.5) / n).tag for i in range(n)]
    assert picked == [f"t{i}" for i in range(n)]
    rng = random.Random(7)
    seen = {pick_target(route, rng.random()).tag for _ in range(2_000)}
    assert len(seen) == n


def test_pick_among_available_renormalises_over_weighted_targets() -> None:
    rng = random.Random(99)
    draws = 20_000
    route = Route(
        targets=(Target(tag="a", weight=3), Target(tag="b", weight=5), Target(tag="c", weight=2))
    )
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(draws):
        chosen = pick_target_among(route, rng.random(), lambda t: t.tag != "b")
        assert chosen is not None
        counts[chosen.tag] += 1
    assert counts["b"] == 0
    sd = math.sqrt(draws * 0.6 * 0.4)
    assert abs(counts["a"] - 0.6 * draws) < 4 * sd  # 3 / (3 + 2)


def test_pick_among_available() -> None:
    everyone = lambda t: True  # noqa: E731
    for r in (0.0, 0.3, 0.75, 0.99):
        assert pick_target_among(CANARY, r, everyone) is pick_target(CANARY, r)
    # v1 has no healthy instance: everything goes to v2, never to the drained v3.
    for r in (0.0, 0.5, math.nextafter(1.0, 0.0)):
        assert pick_target_among(CANARY, r, lambda t: t is not V1) is V2
    # Nothing weighted is available: None, the proxy's 503; v3 is not a fallback.
    assert pick_target_among(CANARY, 0.5, lambda t: t is V3) is None
    asked: list[Target] = []

    def available(target: Target) -> bool:
        asked.append(target)
        return True

    pick_target_among(CANARY, 0.5, available)
    assert asked == [V1, V2]  # weight-0 targets are not even looked at
    with pytest.raises(ValueError, match="r must be in"):
        pick_target_among(CANARY, 1.0, everyone)


# --- retries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on", "statuses", "connection"),
    [
        (["server-error"], {500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511}, False),
        (["gateway-error"], {502, 503, 504}, False),
        (["client-error"], {409}, False),
        (["connection-error"], set(), True),
        (["429", "503"], {429, 503}, False),
        (["gateway-error", "client-error", "connection-error"], {409, 502, 503, 504}, True),
        (["server-error", "gateway-error"], set(range(500, 509)) | {510, 511}, False),
    ],
)
def test_retry_events(on: list[str], statuses: set[int], connection: bool) -> None:
    retries = policy(R + f"retries = {{ max = 2, on = {json.dumps(on)} }}").routes[0].retries
    assert retries.retry_statuses == statuses
    assert isinstance(retries.retry_statuses, frozenset)
    assert retries.retry_on_connection_error is connection
    assert 509 not in retries.retry_statuses


def test_no_retries() -> None:
    retries = policy(R + "retries = { max = 0, on = [] }").routes[0].retries
    assert retries.max == 0
    assert retries.retry_statuses == frozenset()
    assert not retries.retry_on_connection_error


# --- layout -----------------------------------------------------------------------


def test_route_selection_is_sans_io() -> None:
    path = source_of("hostmesh._routes")
    assert forbidden_imports(ast.parse(path.read_text(), str(path))) == []

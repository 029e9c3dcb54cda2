"""Intentions: precedence, HTTP matches, the default policy and the explanation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostmesh._config import FieldError, ServerConfig, from_mapping
from hostmesh._errors import ConfigError
from hostmesh.agent._intentions import HttpIntention, Intention, Intentions


def rule(
    src: str, dst: str, action: str, path: str = "", methods: tuple[str, ...] = ()
) -> Intention:
    return Intention(src, dst, action, HttpIntention(path, methods))


def test_no_rule_uses_the_default_policy_and_says_so() -> None:
    for default in ("allow", "deny"):
        d = Intentions([rule("web", "cache", "deny")], default).decide("web", "db")
        assert d.allowed is (default == "allow")
        assert d.rule is None
        assert f"default policy ({default})" in d.reason
        assert "web -> db" in d.reason


def test_exact_pair_beats_wildcard_source() -> None:
    s = Intentions([rule("*", "db", "deny"), rule("web", "db", "allow")], "deny")
    d = s.decide("web", "db")
    assert d.allowed and d.rule == rule("web", "db", "allow")
    assert "intention web -> db allow" in d.reason
    other = s.decide("api", "db")
    assert not other.allowed and other.rule == rule("*", "db", "deny")
    assert "intention * -> db deny" in other.reason


def test_a_wildcard_destination_is_refused_as_the_server_refuses_it() -> None:
    with pytest.raises(FieldError, match="invalid destination"):
        rule("web", "*", "allow")


def test_http_rule_beats_plain_rule_of_the_same_pair_when_it_matches() -> None:
    s = Intentions([rule("web", "db", "allow"), rule("web", "db", "deny", "/admin")], "deny")
    admin = s.decide("web", "db", "GET", "/admin/users")
    assert not admin.allowed
    assert "path /admin" in admin.reason
    assert s.decide("web", "db", "GET", "/public").rule == rule("web", "db", "allow")


def test_an_unmatched_http_rule_falls_through_to_less_specific_rules() -> None:
    s = Intentions([rule("web", "db", "allow", "/api", ("GET",)), rule("*", "db", "deny")])
    assert s.decide("web", "db", "GET", "/api/x").allowed
    wrong_method = s.decide("web", "db", "POST", "/api/x")
    assert not wrong_method.allowed and wrong_method.rule == rule("*", "db", "deny")
    assert not s.decide("web", "db", "GET", "/other").allowed
    # A TCP stream (no method, no path) never matches an HTTP rule.
    tcp = s.decide("web", "db")
    assert not tcp.allowed and tcp.rule == rule("*", "db", "deny")


def test_a_more_specific_pair_wins_over_an_http_rule_of_a_less_specific_pair() -> None:
    s = Intentions([rule("*", "db", "deny", "/admin"), rule("web", "db", "allow")], "deny")
    assert s.decide("web", "db", "GET", "/admin").allowed


def test_longer_path_prefix_beats_shorter_then_methods_beat_none() -> None:
    s = Intentions(
        [
            rule("web", "db", "deny", "/api"),
            rule("web", "db", "allow", "/api/public"),
            rule("web", "db", "deny", "/api/public", ("DELETE",)),
        ],
        "allow",
    )
    assert not s.decide("web", "db", "GET", "/api/x").allowed
    assert s.decide("web", "db", "GET", "/api/public/1").allowed
    d = s.decide("web", "db", "DELETE", "/api/public/1")
    assert not d.allowed and "methods DELETE" in d.reason


def test_path_prefix_is_a_plain_string_prefix() -> None:
    s = Intentions([rule("web", "db", "allow", "/api")], "deny")
    assert s.decide("web", "db", "GET", "/api2").allowed
    assert not s.decide("web", "db", "GET", "/ap").allowed


def test_methods_are_case_sensitive_tokens() -> None:
    s = Intentions([rule("web", "db", "allow", methods=("GET", "HEAD"))], "deny")
    assert s.decide("web", "db", "HEAD", "/").allowed
    assert not s.decide("web", "db", "get", "/").allowed


def test_equal_specificity_deny_wins_whatever_the_order() -> None:
    a, d = rule("web", "db", "allow", "/x"), rule("web", "db", "deny", "/x")
    for rules in ([a, d], [d, a]):
        got = Intentions(rules, "allow").decide("web", "db", "GET", "/x")
        assert not got.allowed and got.rule == d


def test_rules_are_listed_most_specific_first() -> None:
    rules = [rule("*", "db", "deny"), rule("*", "db", "allow", "/a"),
             rule("web", "db", "allow"), rule("web", "db", "deny", "/a")]  # fmt: skip
    s = Intentions(reversed(rules), "allow")
    assert s.rules == (rules[3], rules[2], rules[1], rules[0])
    assert len(s) == 4


def test_from_json_reads_the_servers_stored_shape() -> None:
    stored = [
        rule("*", "db", "deny").to_json(),
        {"source": "web", "destination": "db", "action": "allow",
         "http": {"path_prefix": "/api", "methods": ["GET"]}, "description": "reads"},
    ]  # fmt: skip
    s = Intentions.from_json(stored, "deny")
    assert s.default == "deny"
    assert s.decide("web", "db", "GET", "/api/1").rule == Intention(
        "web", "db", "allow", HttpIntention("/api", ("GET",)), "reads"
    )


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"source": "web", "destination": "db", "action": "maybe"}, "allow or deny"),
        ({"source": "we b", "destination": "db", "action": "allow"}, "invalid source"),
        ({"source": "web", "destination": "../x", "action": "allow"}, "invalid destination"),
        (
            {
                "source": "web",
                "destination": "db",
                "action": "allow",
                "http": {"path_prefix": "admin"},
            },
            "must start with '/'",
        ),
        (
            {"source": "web", "destination": "db", "action": "allow", "http": {"methods": ["get"]}},
            "invalid HTTP method",
        ),
        ({"destination": "db", "action": "allow"}, "required"),
        ("web -> db", "must be an object"),
    ],
)
def test_from_json_refuses_a_broken_entry_naming_it(entry: object, words: str) -> None:
    good = rule("*", "db", "deny").to_json()
    with pytest.raises(ConfigError, match=r"intentions\[1\]") as info:
        Intentions.from_json([good, entry], "allow")  # type: ignore[list-item]
    assert words in str(info.value)


def test_an_invalid_default_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="allow or deny"):
        Intentions([], "maybe")  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------

NAMES = st.sampled_from(["web", "db", "api"])
SOURCES = st.sampled_from(["web", "db", "api", "*"])
HTTP = st.one_of(
    st.just(HttpIntention()),
    st.builds(
        HttpIntention,
        st.sampled_from(["", "/", "/a", "/a/b"]),
        st.sampled_from([(), ("GET",), ("POST", "GET")]),
    ),
)
RULES = st.builds(Intention, SOURCES, NAMES, st.sampled_from(["allow", "deny"]), HTTP)
REQUESTS = st.tuples(
    NAMES, NAMES, st.sampled_from([None, "GET", "POST"]), st.sampled_from([None, "/", "/a/b/c"])
)
DEFAULTS = st.sampled_from(["allow", "deny"])


@given(st.lists(RULES, max_size=8), REQUESTS, DEFAULTS, st.randoms())
def test_order_of_the_rules_never_changes_a_decision(
    rules: list[Intention], req: tuple[str, str, str | None, str | None], default: str, rnd: object
) -> None:
    shuffled = list(rules)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a = Intentions(rules, default).decide(*req)  # type: ignore[arg-type]
    b = Intentions(shuffled, default).decide(*req)  # type: ignore[arg-type]
    assert a == b


@given(st.lists(RULES, max_size=8), RULES, REQUESTS, DEFAULTS)
def test_adding_a_less_specific_rule_never_changes_a_rule_made_decision(
    rules: list[Intention], extra: Intention, req: tuple[str, str, str | None, str | None],
    default: str,
) -> None:  # fmt: skip
    before = Intentions(rules, default).decide(*req)  # type: ignore[arg-type]
    if before.rule is None or extra.precedence >= before.rule.precedence:
        return
    after = Intentions([*rules, extra], default).decide(*req)  # type: ignore[arg-type]
    assert after == before


@given(st.lists(RULES, max_size=8), REQUESTS, DEFAULTS)
def test_the_decision_is_the_deciding_rules_action_or_the_default(
    rules: list[Intention], req: tuple[str, str, str | None, str | None], default: str
) -> None:
    d = Intentions(rules, default).decide(*req)  # type: ignore[arg-type]
    src, dst, method, path = req
    applying = [r for r in rules if r.applies_to(src, dst, method, path)]
    if not applying:
        assert d.rule is None and d.allowed is (default == "allow")
        return
    assert d.rule in applying
    assert d.allowed is (d.rule is not None and d.rule.action == "allow")
    top = max(r.precedence for r in applying)
    assert d.rule is not None and d.rule.precedence == top
    if any(r.precedence == top and r.action == "deny" for r in applying):
        assert not d.allowed
    assert d.rule.describe() in d.reason


def test_the_servers_default_policy_is_allow_unless_configured() -> None:
    assert from_mapping(ServerConfig, {}).intentions.default == "allow"
    cfg = from_mapping(ServerConfig, {"intentions": {"default": "deny"}})
    assert cfg.intentions.default == "deny"
    with pytest.raises(ConfigError, match=r"intentions\.default: must be allow or deny"):
        from_mapping(ServerConfig, {"intentions": {"default": "block"}}, source="server.toml")

"""Per-service traffic policy and route selection, in the spirit of AWS App Mesh routes.

Sans-IO: the proxy asks :func:`match_route` which route a request takes and
:func:`pick_target` / :func:`pick_target_among` which subset of instances
serves it; this module never touches a socket or a clock.

The policy is loaded from the agent's TOML (``[traffic.<service>]``) through
:func:`hostmesh._config.from_mapping`, and will be pushed by the servers as the
plain dict :meth:`TrafficPolicy.to_json` returns
(``from_mapping(TrafficPolicy, p.to_json()) == p``)::

    [traffic.udvr]
    rate_limit = 100
    [traffic.udvr.outlier]
    consecutive_failures = 5
    [[traffic.udvr.routes]]
    name = "canary-header"
    match = { path_prefix = "/api", headers = [{ name = "x-canary", exact = "1" }] }
    timeout = "15s"
    retries = { max = 2, on = ["connection-error", "gateway-error"] }
    targets = [{ version = "v1", weight = 3 }, { tag = "v2", weight = 1 }]

Rules, with where they differ from App Mesh (REFERENCE.md, "AWS App Mesh"):

- Routes are tried in the order written; the first match wins.
- A service with no routes gets :data:`DEFAULT_ROUTE`: every request, every
  instance, 15 s, two retries on connection errors only (the safe kind).
- A service *with* routes where none matches: :func:`match_route` returns
  ``None`` and the proxy answers 404 with ``hostmesh-error: no-route``, as App
  Mesh does. Add a last route with an empty match for a catch-all.
- When the subsets chosen by weight have no usable instance,
  :func:`pick_target_among` spreads the request over the other weighted
  subsets (App Mesh and Envoy answer 503). Weight 0 stays "never".

Everything derived (lower-case header names, compiled regexes, cumulative
weights, retry status sets) is computed once at load, in slots next to the
dataclass fields; equality and :meth:`to_json` see only the fields.
"""

from __future__ import annotations

import dataclasses
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Protocol

from ._config import SECONDS, FieldError

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_ROUTE",
    "GATEWAY_ERROR_STATUSES",
    "IDEMPOTENT_METHODS",
    "MAX_HEADER_MATCHES",
    "MAX_REGEX_LENGTH",
    "MAX_RETRIES",
    "MAX_ROUTES",
    "MAX_TARGETS",
    "MAX_TARGET_WEIGHT",
    "RETRY_EVENTS",
    "SERVER_ERROR_STATUSES",
    "HeaderMatch",
    "OutlierPolicy",
    "RetryPolicy",
    "Route",
    "RouteMatch",
    "Target",
    "TrafficPolicy",
    "match_route",
    "pick_target",
    "pick_target_among",
]

#: App Mesh allows 10 weighted targets per route; 16 leaves room for a canary
#: next to a ten-way split and keeps the per-request scan of targets trivial.
MAX_TARGETS = 16
#: The largest target weight: the instance/SRV weight range, so sums stay small ints.
MAX_TARGET_WEIGHT = 65535
#: App Mesh's default quota of routes per virtual router; routes are scanned in
#: order for every request, so the list must stay short.
MAX_ROUTES = 50
#: App Mesh's limit of header matches per route.
MAX_HEADER_MATCHES = 10
#: Retries per request. Each retry adds load to an upstream that is already
#: failing; the proxy's retry budget bounds the fleet-wide rate, this bounds one request.
MAX_RETRIES = 10
#: Characters in a header regex. Python's ``re`` backtracks, so patterns stay
#: short enough to read and reason about (Envoy caps RE2 programs for the same reason).
MAX_REGEX_LENGTH = 256

#: App Mesh ``server-error``: 500-508, 510 and 511 (509 is not a standard status).
SERVER_ERROR_STATUSES = frozenset((*range(500, 509), 510, 511))
#: App Mesh ``gateway-error``: bad gateway, service unavailable, gateway timeout.
GATEWAY_ERROR_STATUSES = frozenset((502, 503, 504))
#: Retry events and the response statuses they retry on; ``connection-error``
#: has none (connect failure or reset before any response byte).
RETRY_EVENTS: Mapping[str, frozenset[int]] = {
    "server-error": SERVER_ERROR_STATUSES,
    "gateway-error": GATEWAY_ERROR_STATUSES,
    "client-error": frozenset((409,)),
    "connection-error": frozenset(),
}
#: RFC 9110 section 9.2.2. The proxy retries other methods only when the
#: connect itself failed (the request never left this host).
IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 section 5.6.2
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
_ROUTE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # also a metrics label
_STATUS_RE = re.compile(r"[45][0-9][0-9]")
_VALUE_KINDS = ("exact", "prefix", "regex", "present")


class _Derived:
    """Base of dataclasses that keep derived values in slots beside their fields.

    Copies and pickles go through ``__init__`` again, so the derived slots are
    recomputed rather than lost.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return (type(self), tuple(getattr(self, f.name) for f in fields))


def _to_plain(value: Any) -> Any:
    """A dataclass tree as JSON-ready dicts and lists; ``None`` fields are left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is not None:
                out[f.name] = _to_plain(item)
        return out
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


class _HeaderMatchDerived(_Derived):
    __slots__ = ("_kind", "_regex")
    _kind: str
    _regex: re.Pattern[str] | None


@dataclass(frozen=True, slots=True)
class HeaderMatch(_HeaderMatchDerived):
    """One header condition of a route; exactly one of ``exact``, ``prefix``,
    ``regex`` or ``present`` is set.

    A header sent several times is matched as its values joined with ``,``
    (RFC 9110 section 5.3). A missing header fails ``exact``/``prefix``/``regex``;
    ``invert`` then flips the outcome, so an inverted match on a missing header
    succeeds (Envoy's rule).
    """

    name: str  # header name; case-insensitive, kept lower-case
    exact: str | None = None  # the value equals this (case-sensitive)
    prefix: str | None = None  # the value starts with this
    regex: str | None = None  # Python re, must match the whole value; <= MAX_REGEX_LENGTH
    present: bool | None = None  # true: the header is sent; false: it is not
    invert: bool = False  # flip the outcome of the condition

    def __post_init__(self) -> None:
        if not _TOKEN_RE.fullmatch(self.name):
            raise FieldError("name", f"invalid header name {self.name!r}")
        object.__setattr__(self, "name", self.name.lower())
        kinds = [k for k in _VALUE_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise FieldError(
                kinds[1] if kinds else "exact",
                "a header match needs exactly one of exact, prefix, regex or present"
                + (f" (got {', '.join(kinds)})" if kinds else ""),
            )
        object.__setattr__(self, "_kind", kinds[0])
        compiled = None
        if self.regex is not None:
            if len(self.regex) > MAX_REGEX_LENGTH:
                raise FieldError("regex", f"longer than {MAX_REGEX_LENGTH} characters")
            try:
                compiled = re.compile(self.regex)
            except re.error as exc:
                raise FieldError("regex", f"invalid regular expression: {exc}") from None
        object.__setattr__(self, "_regex", compiled)

    def matches(self, value: str | None) -> bool:
        """Whether a request whose (joined) header value is ``value`` passes;
        ``None`` = the header was not sent."""
        kind = self._kind
        if kind == "present":
            result = (value is not None) == self.present
        elif value is None:
            result = False
        elif kind == "exact":
            result = value == self.exact
        elif kind == "prefix":
            assert self.prefix is not None
            result = value.startswith(self.prefix)
        else:
            assert self._regex is not None
            result = self._regex.fullmatch(value) is not None
        return result != self.invert


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a request must look like to take a route; the empty match takes everything.

    Paths are compared as sent, without the query string and without
    percent-decoding or dot-segment removal; ``path_prefix`` is a plain string
    prefix ("/api" also matches "/apiary"; write "/api/" to avoid that).
    """

    path_prefix: str = ""  # the path starts with this; "" = any path
    path: str = ""  # the path is exactly this; at most one of path and path_prefix
    method: str = ""  # HTTP method, case-sensitive (RFC 9110 section 9.1); "" = any
    headers: tuple[HeaderMatch, ...] = ()  # all must pass; <= MAX_HEADER_MATCHES

    def __post_init__(self) -> None:
        if self.path_prefix and self.path:
            raise FieldError("path", "set at most one of path and path_prefix")
        for name in ("path_prefix", "path"):
            value = getattr(self, name)
            if value and not value.startswith("/"):
                raise FieldError(name, f"must start with '/', got {value!r}")
            if "?" in value:
                raise FieldError(name, "paths are matched without the query string; drop '?...'")
        if self.method and not _METHOD_RE.fullmatch(self.method):
            raise FieldError(
                "method", f"invalid method {self.method!r}: methods are upper case (GET, POST)"
            )
        if len(self.headers) > MAX_HEADER_MATCHES:
            raise FieldError("headers", f"at most {MAX_HEADER_MATCHES} header matches")

    def matches_line(self, method: str, path: str) -> bool:
        """Method and path (without the query string) pass."""
        return (
            (not self.method or method == self.method)
            and (not self.path or path == self.path)
            and path.startswith(self.path_prefix)
        )

    def matches_headers(self, headers: Mapping[str, str]) -> bool:
        """Every header condition passes; ``headers`` maps lower-case names to joined values."""
        return all(h.matches(headers.get(h.name)) for h in self.headers)


class _Labelled(Protocol):
    """What a target looks at: :class:`hostmesh.catalog.ServiceInstance` fits."""

    @property
    def tags(self) -> tuple[str, ...]: ...

    @property
    def meta(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class Target(_Derived):
    """A subset of a service's instances and its share of a route's requests."""

    tag: str = ""  # instances carrying this tag; "" = no tag condition
    version: str = ""  # instances with meta version = this; at most one of tag and version
    weight: int = 1  # relative share, 0..MAX_TARGET_WEIGHT; 0 = never chosen (drained)

    def __post_init__(self) -> None:
        if self.tag and self.version:
            raise FieldError("version", "set at most one of tag and version")
        if not 0 <= self.weight <= MAX_TARGET_WEIGHT:
            raise FieldError("weight", f"must be in 0..{MAX_TARGET_WEIGHT}")

    def selects(self, instance: _Labelled) -> bool:
        """Whether ``instance`` belongs to this subset (neither tag nor version: all do)."""
        if self.tag:
            return self.tag in instance.tags
        if self.version:
            return instance.meta.get("version") == self.version
        return True


class _RetryDerived(_Derived):
    __slots__ = ("retry_on_connection_error", "retry_statuses")
    retry_statuses: frozenset[int]  # response statuses that are retried
    retry_on_connection_error: bool  # connect failure / reset before a response is retried


@dataclass(frozen=True, slots=True)
class RetryPolicy(_RetryDerived):
    """When a failed try is tried again (App Mesh's HTTP retry policy).

    ``on`` lists events: ``server-error`` (500-508, 510, 511), ``gateway-error``
    (502-504), ``client-error`` (409), ``connection-error`` (connect failure,
    or the connection reset before any response), or a status such as ``"429"``.
    The proxy retries non-idempotent requests (see :data:`IDEMPOTENT_METHODS`)
    only when the connect failed, and every retry also needs the retry budget.
    """

    max: int = 2  # retries after the first try, 0..MAX_RETRIES; 0 = no retries
    on: tuple[str, ...] = ("connection-error",)  # events retried; the default is always safe

    def __post_init__(self) -> None:
        if not 0 <= self.max <= MAX_RETRIES:
            raise FieldError("max", f"must be in 0..{MAX_RETRIES}")
        if self.max and not self.on:
            raise FieldError("on", "list at least one event, or set max = 0")
        statuses: set[int] = set()
        for i, event in enumerate(self.on):
            if event in RETRY_EVENTS:
                statuses |= RETRY_EVENTS[event]
            elif _STATUS_RE.fullmatch(event):
                statuses.add(int(event))
            else:
                raise FieldError(
                    f"on[{i}]",
                    f"unknown event {event!r}: use {', '.join(RETRY_EVENTS)} or a 4xx/5xx status",
                )
        object.__setattr__(self, "retry_statuses", frozenset(statuses))
        object.__setattr__(self, "retry_on_connection_error", "connection-error" in self.on)


class _RouteDerived(_Derived):
    __slots__ = ("_cumulative", "_total")
    _cumulative: tuple[int, ...]  # running sums of target weights
    _total: int  # sum of weights


def _all_instances() -> tuple[Target, ...]:
    return (Target(),)


@dataclass(frozen=True, slots=True)
class Route(_RouteDerived):
    """A match, where matching requests go, and how long and how often they are tried."""

    name: str = ""  # for metrics and logs; default in a policy "route-<index>"
    match: RouteMatch = field(default_factory=RouteMatch)  # default: every request
    timeout: float = 15 * SECONDS  # s for the whole request, retries included (App Mesh); 0 = none
    per_try_timeout: float = 0.0  # s per try; 0 = only timeout applies
    retries: RetryPolicy = field(default_factory=RetryPolicy)  # default: 2 on connection-error
    # 1..MAX_TARGETS subsets with weights, at least one weight > 0; default: all instances
    targets: tuple[Target, ...] = field(default_factory=_all_instances)

    def __post_init__(self) -> None:
        if self.name and not _ROUTE_NAME_RE.fullmatch(self.name):
            raise FieldError(
                "name", f"invalid route name {self.name!r}: use letters, digits, '.', '_', '-'"
            )
        if self.timeout and self.per_try_timeout > self.timeout:
            raise FieldError("per_try_timeout", "must not be longer than timeout")
        if not 1 <= len(self.targets) <= MAX_TARGETS:
            raise FieldError("targets", f"a route needs 1..{MAX_TARGETS} targets")
        seen = set()
        for i, target in enumerate(self.targets):
            subset = (target.tag, target.version)
            if subset in seen:
                raise FieldError(f"targets[{i}]", "the same subset is listed twice")
            seen.add(subset)
        cumulative = []
        total = 0
        for target in self.targets:
            total += target.weight
            cumulative.append(total)
        if total == 0:
            raise FieldError("targets", "at least one target needs a weight > 0")
        object.__setattr__(self, "_cumulative", tuple(cumulative))
        object.__setattr__(self, "_total", total)


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Outlier ejection: an instance that keeps failing is left out for a while.

    Defaults from DESIGN.md (Envoy's outlier detection): 5 consecutive
    failures, 30 s base ejection, at most 50% of a service's instances ejected.
    """

    consecutive_failures: int = 5  # 5xx responses or connect failures in a row; 0 = never eject
    base_ejection: float = 30 * SECONDS  # s; ejection n of an instance lasts n x this
    max_ejection: float = 300 * SECONDS  # s; cap on one ejection (Envoy's max_ejection_time)
    max_ejection_percent: int = 50  # most instances of the service ejected at once, 0..100

    def __post_init__(self) -> None:
        if self.consecutive_failures < 0:
            raise FieldError("consecutive_failures", "must be >= 0")
        if self.base_ejection <= 0:
            raise FieldError("base_ejection", "must be > 0")
        if self.max_ejection < self.base_ejection:
            raise FieldError("max_ejection", "must be at least base_ejection")
        if not 0 <= self.max_ejection_percent <= 100:
            raise FieldError("max_ejection_percent", "must be in 0..100")


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """Everything about how requests to one service are routed and limited.

    Kept in the agent config as ``traffic: Mapping[str, TrafficPolicy]`` keyed
    by service name. Rate and concurrency limits apply in the proxy that
    enforces them, so they are per agent, not fleet-wide.
    """

    rate_limit: int = 0  # requests/s admitted (token bucket refill); 0 = unlimited
    rate_burst: int = 0  # token bucket size in requests; 0 = same as rate_limit
    max_concurrent: int = 0  # requests in flight at once; 0 = unlimited
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    # tried in order, first match wins; none = DEFAULT_ROUTE; <= MAX_ROUTES
    routes: tuple[Route, ...] = ()

    def __post_init__(self) -> None:
        for name in ("rate_limit", "rate_burst", "max_concurrent"):
            if getattr(self, name) < 0:
                raise FieldError(name, "must be >= 0 (0 = unlimited)")
        if self.rate_burst and not self.rate_limit:
            raise FieldError("rate_burst", "needs a rate_limit")
        if len(self.routes) > MAX_ROUTES:
            raise FieldError("routes", f"at most {MAX_ROUTES} routes")
        named = tuple(
            r if r.name else dataclasses.replace(r, name=f"route-{i}")
            for i, r in enumerate(self.routes)
        )
        seen = set()
        for i, route in enumerate(named):
            if route.name in seen:
                raise FieldError(f"routes[{i}].name", f"duplicate route name {route.name!r}")
            seen.add(route.name)
        object.__setattr__(self, "routes", named)

    @property
    def burst(self) -> int:
        """The token bucket size: ``rate_burst``, or ``rate_limit`` when that is 0."""
        return self.rate_burst or self.rate_limit

    def to_json(self) -> dict[str, Any]:
        """A plain JSON/TOML-ready dict; ``from_mapping(TrafficPolicy, d)`` gives ``self`` back."""
        out: dict[str, Any] = _to_plain(self)
        return out


#: The route of a service without configured routes: every request, all
#: instances, App Mesh's 15 s timeout, and up to 2 retries on connection errors
#: only. Those are the safe retries: a failed connect never reached the
#: upstream (any method may be retried), a reset before any response byte is
#: retried for idempotent methods only. 5xx retries are opt-in per route,
#: because the upstream did run the request.
DEFAULT_ROUTE = Route(name="default")
#: The policy of a service missing from ``traffic``: no limits, default outlier
#: ejection, :data:`DEFAULT_ROUTE`.
DEFAULT_POLICY = TrafficPolicy()


def _join_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        previous = joined.get(key)
        joined[key] = value if previous is None else f"{previous},{value}"
    return joined


def match_route(
    routes: Sequence[Route], method: str, path: str, headers: Iterable[tuple[str, str]]
) -> Route | None:
    """The first route in ``routes`` that the request matches.

    Args:
        routes: a service's :attr:`TrafficPolicy.routes`, in order.
        method: the request method as sent (``"GET"``).
        path: the request target in origin form; anything from ``?`` on is ignored.
        headers: ``(name, value)`` pairs as received, names in any case; only
            read when a route has header conditions.

    Returns:
        The first matching route; :data:`DEFAULT_ROUTE` when ``routes`` is
        empty; ``None`` when there are routes and none matches: the proxy
        answers 404 with ``hostmesh-error: no-route`` (App Mesh's behaviour).
    """
    if not routes:
        return DEFAULT_ROUTE
    query = path.find("?")
    if query >= 0:
        path = path[:query]
    joined: dict[str, str] | None = None
    for route in routes:
        match = route.match
        if not match.matches_line(method, path):
            continue
        if match.headers:
            if joined is None:
                joined = _join_headers(headers)
            if not match.matches_headers(joined):
                continue
        return route
    return None


def pick_target(route: Route, r: float) -> Target:
    """The target a uniform draw ``r`` in [0, 1) lands on, by weight.

    Target ``i`` gets ``weight_i / sum(weights)`` of the draws; weight 0 is
    never chosen.

    Raises:
        ValueError: ``r`` is outside [0, 1).
    """
    if not 0.0 <= r < 1.0:
        raise ValueError(f"r must be in [0, 1), got {r!r}")
    # The first target whose running sum exceeds r * total: a weight-0 target
    # adds nothing, so it is never first. For r < 1 and an integer total
    # below 2**53, the rounded product stays below total, so an index exists.
    return route.targets[bisect_right(route._cumulative, r * route._total)]


def pick_target_among(route: Route, r: float, available: Callable[[Target], bool]) -> Target | None:
    """Like :func:`pick_target`, over the weighted targets for which ``available``
    is true (the subset has a healthy, non-ejected instance).

    Unavailable targets' shares go to the others in proportion to their
    weights: a canary whose instances all failed sends its traffic to the
    stable version instead of failing it (App Mesh and Envoy answer 503 here).
    Weight-0 targets are never used, even as a fallback: weight 0 is how an
    operator drains a version.

    Args:
        route: the matched route.
        r: a uniform draw in [0, 1).
        available: called once per target with weight > 0.

    Returns:
        The chosen target, or ``None`` when no weighted target is available:
        the proxy answers 503 with ``hostmesh-error: no-healthy-instance``.

    Raises:
        ValueError: ``r`` is outside [0, 1).
    """
    if not 0.0 <= r < 1.0:
        raise ValueError(f"r must be in [0, 1), got {r!r}")
    usable = []
    total = 0
    for target in route.targets:
        if target.weight and available(target):
            usable.append(target)
            total += target.weight
    if total == route._total:  # every weighted target is available
        return route.targets[bisect_right(route._cumulative, r * total)]
    if not usable:
        return None
    cumulative = list(accumulate(t.weight for t in usable))
    return usable[bisect_right(cumulative, r * cumulative[-1])]

"""Intentions: may service ``source`` call service ``destination``? Sans-IO.

The model (:class:`Intention`, :class:`HttpIntention`) is the one the server's
management API validates and stores (``config/intentions/<dst>/<src>``, see
server/_api.py); it lives here so that the agent can evaluate it without
importing the server or any I/O library. :class:`Intentions` is an immutable
set of them plus a default policy, and :meth:`Intentions.decide` answers one
request with a :class:`Decision` that names the rule that decided.

Precedence, most specific first (Consul's intention precedence: an exact
source outranks the wildcard ``*``). Destinations are always exact: the
management API refused ``web -> *`` before this module existed, and still does::

    rank  source  destination
    2     web     db            exact pair
    1     *       db
    0     (no rule matches: the default policy)

Within one rank, a rule with an HTTP match (path prefix and/or methods) is
more specific than a plain one; between HTTP rules, a longer path prefix is
more specific, then a rule that lists methods is more specific than one that
does not. A rule with an HTTP match applies only to a request that it
matches: a request without a method or path (a TCP stream, or ``check``
without ``--method``/``--path``) does not match a rule that constrains that
field, and falls through to less specific rules. Path prefixes are plain
string prefixes (``/api`` matches ``/api2``), as in Consul. Several matching
rules of the same specificity (only possible in a set built by hand, the store
keeps one rule per pair): deny wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from hostmesh._config import FieldError, _check_name, from_mapping
from hostmesh._errors import ConfigError

__all__ = [
    "INTENTIONS_DEFAULT_KEY",
    "INTENTIONS_PREFIX",
    "MAX_INTENTION_METHODS",
    "Decision",
    "HttpIntention",
    "Intention",
    "Intentions",
    "Policy",
]

#: Methods an intention may list (RFC 9110 tokens, upper case, as in _routes).
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
#: Intentions per method list; more is a config that wanted a deny rule.
MAX_INTENTION_METHODS = 16
#: Longest path prefix; a request line longer than this is refused by the proxy anyway.
MAX_PATH_PREFIX = 1024

WILDCARD = "*"

Policy = Literal["allow", "deny"]

#: Store keys the servers keep intentions under, streamed to agents with the
#: rest of ``config/``: one entry per rule (``<prefix><destination>/<source>``)
#: and the default policy (``{"default": "allow"|"deny"}``, from server.toml).
INTENTIONS_PREFIX = "config/intentions/"
INTENTIONS_DEFAULT_KEY = "config/intentions-default"


@dataclass(frozen=True)
class HttpIntention:
    """The HTTP part of an intention: which requests it applies to."""

    path_prefix: str = ""  # "" = every path; else starts with "/"
    methods: tuple[str, ...] = ()  # () = every method

    def __post_init__(self) -> None:
        if self.path_prefix and (
            not self.path_prefix.startswith("/") or len(self.path_prefix) > MAX_PATH_PREFIX
        ):
            raise FieldError(
                "path_prefix", f"must start with '/' (at most {MAX_PATH_PREFIX} characters)"
            )
        if len(self.methods) > MAX_INTENTION_METHODS:
            raise FieldError("methods", f"at most {MAX_INTENTION_METHODS}")
        for i, method in enumerate(self.methods):
            if not _METHOD_RE.fullmatch(method):
                raise FieldError(f"methods[{i}]", f"invalid HTTP method {method!r}")

    @property
    def is_plain(self) -> bool:
        """True if this matches every request (no path prefix, no methods)."""
        return not self.path_prefix and not self.methods

    def matches(self, method: str | None, path: str | None) -> bool:
        """Does a request with ``method`` and ``path`` (None: unknown) fall under this?"""
        if self.path_prefix and (path is None or not path.startswith(self.path_prefix)):
            return False
        return not self.methods or (method is not None and method in self.methods)


@dataclass(frozen=True)
class Intention:
    """May ``source`` call ``destination``? (Consul's intentions.) ``source`` may be ``*``
    (every service)."""

    source: str
    destination: str
    action: str  # "allow" or "deny"
    http: HttpIntention = field(default_factory=HttpIntention)
    description: str = ""

    def __post_init__(self) -> None:
        if self.source != WILDCARD:
            _check_name(self.source, "source")
        _check_name(self.destination, "destination")
        if self.action not in ("allow", "deny"):
            raise FieldError("action", f"must be allow or deny, not {self.action!r}")
        if len(self.description) > 256:
            raise FieldError("description", "at most 256 characters")

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "action": self.action,
            "http": {"path_prefix": self.http.path_prefix, "methods": list(self.http.methods)},
            "description": self.description,
        }

    @property
    def precedence(self) -> tuple[int, int, int, int]:
        """Sort key, higher = more specific: (pair rank 1-2, HTTP match, prefix length,
        methods listed). See the module docstring."""
        rank = 1 + (self.source != WILDCARD)
        http = self.http
        return (rank, int(not http.is_plain), len(http.path_prefix), int(bool(http.methods)))

    def applies_to(
        self, source: str, destination: str, method: str | None, path: str | None
    ) -> bool:
        return (
            self.source in (WILDCARD, source)
            and self.destination == destination
            and self.http.matches(method, path)
        )

    def describe(self) -> str:
        """``web -> db deny [path /admin, methods GET|POST]``: how a person names this rule."""
        parts = []
        if self.http.path_prefix:
            parts.append(f"path {self.http.path_prefix}")
        if self.http.methods:
            parts.append(f"methods {'|'.join(self.http.methods)}")
        match = f" [{', '.join(parts)}]" if parts else ""
        return f"{self.source} -> {self.destination} {self.action}{match}"


@dataclass(frozen=True)
class Decision:
    """The answer for one request: ``rule`` is the intention that decided, None if the
    default policy did; ``reason`` is one line for logs, 403 bodies and ``check``."""

    allowed: bool
    rule: Intention | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "rule": self.rule.to_json() if self.rule else None,
            "reason": self.reason,
        }


class Intentions:
    """An immutable set of intentions and the default policy for requests none matches.

    Args:
        rules: the intentions, in any order (the order never changes a decision).
        default: ``"allow"`` or ``"deny"``.

    Raises:
        ValueError: ``default`` is neither allow nor deny.
    """

    __slots__ = ("_by_precedence", "default")

    def __init__(self, rules: Iterable[Intention] = (), default: Policy = "allow") -> None:
        if default not in ("allow", "deny"):
            raise ValueError(f"default policy must be allow or deny, not {default!r}")
        self.default: Policy = default
        # Most specific first; deny before allow at equal specificity; then by name so
        # that equal rules always report the same one.
        self._by_precedence: tuple[Intention, ...] = tuple(
            sorted(
                rules,
                key=lambda r: (
                    tuple(-x for x in r.precedence),
                    r.action != "deny",
                    r.source,
                    r.destination,
                    r.http.path_prefix,
                    r.http.methods,
                ),
            )
        )

    @classmethod
    def from_json(
        cls, entries: Iterable[Mapping[str, Any]], default: Policy = "allow"
    ) -> Intentions:
        """Build from the stored entries (the body of ``GET /v1/config/intentions``).

        Raises:
            ConfigError: an entry is not a valid intention (named by index); a set
                with a broken rule is refused whole rather than evaluated without it.
        """
        rules = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ConfigError(f"intentions[{i}]", "", "must be an object")
            rules.append(from_mapping(Intention, entry, source=f"intentions[{i}]"))
        return cls(rules, default)

    @property
    def rules(self) -> tuple[Intention, ...]:
        """The rules, most specific first."""
        return self._by_precedence

    def __len__(self) -> int:
        return len(self._by_precedence)

    def decide(
        self, source: str, destination: str, method: str | None = None, path: str | None = None
    ) -> Decision:
        """May ``source`` call ``destination`` with this request?

        Args:
            method, path: the HTTP request's; None for a TCP stream (or unknown).

        Returns:
            The decision of the most specific rule that applies, else the default's.
        """
        for rule in self._by_precedence:
            if rule.applies_to(source, destination, method, path):
                verb = "allowed" if rule.action == "allow" else "denied"
                return Decision(
                    rule.action == "allow",
                    rule,
                    f"{verb} by intention {rule.describe()}"
                    f" (the most specific that matches {source} -> {destination})",
                )
        verb = "allowed" if self.default == "allow" else "denied"
        return Decision(
            self.default == "allow",
            None,
            f"{verb} by the default policy ({self.default}):"
            f" no intention matches {source} -> {destination}",
        )

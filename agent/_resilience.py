"""What the proxy does when an upstream fails: retries, ejection, admission limits.

Sans-IO, like the rest of the routing core: every time-dependent call takes
``now`` in seconds (``trio.current_time()`` in the proxy, a plain float in
tests); nothing here sleeps, schedules a timer or reads a clock. Expiry is
computed lazily when a method is called.

- :class:`RetryBudget` caps retries at a share of the original requests plus a
  floor per second, over a sliding window (Linkerd's budget, from Finagle).
- :class:`OutlierDetector` ejects an instance of a service after consecutive
  failures, for a time that grows with each ejection, never ejecting more than
  a set share of the service (Envoy's consecutive-5xx detector, App Mesh's
  outlier detection).
- :class:`TokenBucket` and :class:`ConcurrencyLimit` admit or refuse requests
  (rate limits and an in-flight cap).
- :data:`IDEMPOTENT_METHODS`, :func:`may_retry` and :data:`REPLAY_BUFFER` say
  which requests may be retried at all.

Retries happen at once, with no delay between attempts: Finagle's requeue
filter, which Linkerd 1 retries through, defaults to no backoff, and the
budget, not a delay, is what keeps retries from multiplying load. A retry
goes back through the balancer, so it usually lands on another instance, and
the outlier detector takes a failing instance out after a few failures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .._config import SECONDS, FieldError

__all__ = [
    "IDEMPOTENT_METHODS",
    "MAX_EJECTION_MULTIPLIER",
    "MULTIPLIER_DECAY",
    "REPLAY_BUFFER",
    "ConcurrencyLimit",
    "Ejection",
    "InstanceState",
    "OutlierConfig",
    "OutlierDetector",
    "RetryBudget",
    "RetryBudgetConfig",
    "TokenBucket",
    "may_retry",
]


# --- which requests may be retried ----------------------------------------------------

#: Methods a proxy may send twice (RFC 9110 §9.2.2: idempotent, so a retry after
#: a failure the client never saw cannot cause a second effect). Linkerd 1's
#: ``io.l5d.http.retryableRead5XX`` classifier retries GET, HEAD, OPTIONS and
#: TRACE; ``retryableIdempotent5XX`` adds PUT and DELETE. Methods are
#: case-sensitive (RFC 9110 §9.1), so ``get`` is not GET.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_IDEMPOTENT_BYTES = frozenset(m.encode() for m in IDEMPOTENT_METHODS)

#: bytes of request body the proxy keeps so that it can send the request again.
#: Linkerd 2's proxy does the same and never retries a request whose body
#: exceeds 64 KiB: a larger body would cost memory per in-flight request and,
#: if held back until complete, latency. A body that outgrows the buffer is
#: streamed on and the buffer dropped; that request is then not retryable.
REPLAY_BUFFER = 64 * 1024


def may_retry(method: str | bytes, *, body_replayable: bool) -> bool:
    """Whether a failed request may be sent again.

    Args:
        method: the request method as received (h11 gives bytes).
        body_replayable: the whole request body, if any, is held in the replay
            buffer (at most :data:`REPLAY_BUFFER` bytes). False once any of it
            was streamed upstream without being kept. A chunked body counts as
            replayable only when its last chunk arrived within the buffer
            (Linkerd 2; Linkerd 1 never retried chunked bodies).

    Returns:
        True for an idempotent method with a replayable body. The caller still
        needs a retryable failure (connect failure, reset, 5xx) and a
        :meth:`RetryBudget.try_withdraw`.
    """
    if isinstance(method, bytes):
        return body_replayable and method in _IDEMPOTENT_BYTES
    return body_replayable and method in IDEMPOTENT_METHODS


# --- retry budget ---------------------------------------------------------------------

#: Time slices per budget window. Finagle's leaky token bucket (behind
#: ``RetryBudget``) counts in a ``WindowedAdder`` of 10 slices, so a deposit
#: expires between 0.9 and 1 ``ttl`` after it was made.
_BUDGET_SLICES = 10
#: Tolerance when comparing the allowance (a float) with a retry count, so that
#: 0.2 x 5 deposits allow exactly one retry despite rounding.
_BUDGET_EPSILON = 1e-9


@dataclass(frozen=True)
class RetryBudgetConfig:
    """How many retries a :class:`RetryBudget` allows (defaults: Linkerd's).

    Over any window of ``ttl`` seconds, retries are capped at
    ``percent x requests + min_per_second x ttl``: with the defaults, 100
    requests/s that all fail get at most 20 + 10 = 30 retries/s.
    """

    # share of original requests that may be retried; Linkerd retryRatio /
    # Finagle percentCanRetry, default 0.2. Higher rescues more requests when
    # an upstream fails, and adds that much load to an upstream in trouble.
    percent: float = 0.2
    # retries/s allowed whatever the traffic, for clients with few requests;
    # Linkerd minRetriesPerSecond, default 10. Granted as a reserve of
    # min_per_second x ttl per window (Finagle), so it can be spent in a burst.
    min_per_second: int = 10
    # s a deposit (and a withdrawal) counts for; Linkerd/Finagle ttl, default
    # 10 s, Finagle requires 1..60 s. Longer smooths bursts, reacts slower.
    ttl: float = 10 * SECONDS

    def __post_init__(self) -> None:
        if not 0 <= self.percent <= 1000:  # Finagle's bound (ScaleFactor)
            raise FieldError("percent", "must be in 0..1000")
        if self.min_per_second < 0:
            raise FieldError("min_per_second", "must not be negative")
        if not 1 * SECONDS <= self.ttl <= 60 * SECONDS:
            raise FieldError("ttl", "must be between 1 s and 60 s (Finagle's bound)")


class RetryBudget:
    """Linkerd's retry budget: retries allowed per original request and per second.

    Call :meth:`deposit` once per original request (never for a retry) and
    :meth:`try_withdraw` before each retry; on False the caller answers with
    the last error and counts a budget exhaustion. Same rule as Finagle's
    ``RetryBudget(ttl, minRetriesPerSec, percentCanRetry)``, which Linkerd 1
    uses and Linkerd 2 copies: a retry is allowed while the retries in the
    window stay within ``percent x deposits + min_per_second x ttl``.

    Deposits and withdrawals are counted in 10 one-slice buckets (memory O(1)
    whatever the traffic); a bucket is cleared when the window moves past it.
    Share one budget across every request to one service.
    """

    __slots__ = ("_deposits", "_head", "_index", "_reserve", "_retries", "_slice", "_until",
                 "config")  # fmt: skip

    def __init__(self, config: RetryBudgetConfig | None = None) -> None:
        self.config = config or RetryBudgetConfig()
        self._slice = self.config.ttl / _BUDGET_SLICES
        self._reserve = self.config.min_per_second * self.config.ttl
        self._deposits = [0] * _BUDGET_SLICES
        self._retries = [0] * _BUDGET_SLICES
        self._head: int | None = None  # slice number of the newest bucket
        self._index = 0  # its bucket
        self._until = -math.inf  # a time before which the newest bucket is still current

    def _advance(self, now: float) -> int:
        """Clear the buckets the window left behind; the index of the current one."""
        if now < self._until:  # still in the newest bucket's slice (or a clock went back)
            return self._index
        current = math.floor(now / self._slice)
        if self._head is None:
            self._head = current
        elif current > self._head:
            for step in range(1, min(current - self._head, _BUDGET_SLICES) + 1):
                index = (self._head + step) % _BUDGET_SLICES
                self._deposits[index] = 0
                self._retries[index] = 0
            self._head = current
        # A clock that went back counts into the newest bucket.
        self._index = self._head % _BUDGET_SLICES
        # Just short of the next slice's start, so that rounding never keeps an old bucket.
        start = (self._head + 1) * self._slice
        self._until = start - 1e-9 * max(1.0, abs(start))
        return self._index

    def _spare(self) -> float:
        """Allowance minus retries already made in the window."""
        allowance = self.config.percent * sum(self._deposits) + self._reserve
        return allowance - sum(self._retries)

    def deposit(self, now: float) -> None:
        """Count one original request (it earns ``percent`` of a retry)."""
        self._deposits[self._advance(now)] += 1

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget; False, and nothing taken, when it is spent."""
        index = self._advance(now)
        if self._spare() < 1 - _BUDGET_EPSILON:
            return False
        self._retries[index] += 1
        return True

    def balance(self, now: float) -> int:
        """Retries allowed right now (a gauge for metrics)."""
        self._advance(now)
        return max(0, math.floor(self._spare() + _BUDGET_EPSILON))


# --- outlier detection ----------------------------------------------------------------

#: Cap on the ejection multiplier: at most 10 x ``base_ejection`` (300 s with
#: the defaults, Envoy's default ``max_ejection_time``), so an instance that
#: recovers is tried again within five minutes.
MAX_EJECTION_MULTIPLIER = 10
#: s an instance must stay in service for its multiplier to drop by one.
#: Envoy decrements it at each outlier sweep (``interval``, default 10 s) that
#: finds the host in service; here it is computed at the next ejection from
#: the time since the last one ended.
MULTIPLIER_DECAY = 10 * SECONDS


@dataclass(frozen=True)
class OutlierConfig:
    """When an :class:`OutlierDetector` ejects an instance, and for how long.

    Sans-IO runtime settings; the route config's ``outlier`` table carries the
    same three fields.
    """

    # failures in a row (5xx response or connect failure) that eject an
    # instance; Envoy consecutive_5xx and App Mesh maxServerErrors, default 5.
    # Lower ejects a bad instance sooner, and a healthy one on a short blip.
    consecutive_failures: int = 5
    # s of the first ejection, multiplied by the times ejected (30 s, 60 s,
    # 90 s ... up to MAX_EJECTION_MULTIPLIER x); Envoy base_ejection_time,
    # App Mesh baseEjectionDuration, default 30 s.
    base_ejection: float = 30 * SECONDS
    # % of the service's instances that may be out at once; App Mesh
    # maxEjectionPercent (hostmesh default 50; Envoy's own default is 10).
    # Bounds how much capacity detection can remove; 0 disables ejection.
    max_ejection_percent: int = 50

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise FieldError("consecutive_failures", "must be at least 1")
        if not self.base_ejection > 0:
            raise FieldError("base_ejection", "must be positive")
        if not 0 <= self.max_ejection_percent <= 100:
            raise FieldError("max_ejection_percent", "must be in 0..100")


@dataclass(frozen=True, slots=True)
class Ejection:
    """Returned by :meth:`OutlierDetector.record` when that call ejected an instance."""

    instance_id: str
    until: float  # s, on the caller's clock: back in service from then
    duration: float  # s; base_ejection x multiplier
    multiplier: int  # 1 on a first ejection, up to MAX_EJECTION_MULTIPLIER


class InstanceState:
    """One instance's failure count and ejection (kept by :class:`OutlierDetector`)."""

    __slots__ = ("ejected_until", "failures", "multiplier")

    def __init__(self) -> None:
        self.failures = 0  # consecutive failures since the last success or ejection
        self.multiplier = 0  # times ejected, less decay; 0 = no recent ejection
        self.ejected_until = -math.inf  # s; in service when <= now


class OutlierDetector:
    """Consecutive-failure ejection for the instances of one service (Envoy, App Mesh).

    Rules:

    - ``consecutive_failures`` failures in a row eject an instance; a success
      resets the count. Ejection resets it too, so a returning instance gets a
      full run of chances.
    - An ejection lasts ``base_ejection x multiplier``. The multiplier goes up
      by one per ejection, to :data:`MAX_EJECTION_MULTIPLIER`, and down by one
      per :data:`MULTIPLIER_DECAY` seconds the instance spent in service since
      its last ejection ended (as Envoy decrements it per sweep). So an
      instance that fails again right after returning is ejected for 30 s,
      60 s, 90 s ...; one that served well for a while starts again at 30 s.
    - An ejection that would leave more than ``max_ejection_percent`` of the
      service's instances ejected is skipped (counted in
      :attr:`overflow_total`); so one instance of one is never ejected, nor a
      second of two. Envoy ejects at least one host whatever the percentage;
      hostmesh does not: with one instance, a failing one beats none. A
      skipped instance keeps its failure count, so its next failure ejects it
      if room has been made by then.
    - Failures reported while an instance is ejected (late responses) are
      ignored and never extend the ejection.
    - Ejections end by time, checked on each query; no timers.

    Only ids given to :meth:`set_instances` are tracked; results for others are
    ignored, and ids dropped from the set are forgotten, so memory follows the
    catalog.
    """

    __slots__ = ("_instances", "config", "ejected_until", "ejections_total", "overflow_total")

    def __init__(self, config: OutlierConfig | None = None) -> None:
        self.config = config or OutlierConfig()
        self._instances: dict[str, InstanceState] = {}
        #: s: the latest end of an ejection; none is in force from then on (any_ejected)
        self.ejected_until = -math.inf
        #: ejections made (Envoy outlier_detection.ejections_enforced_total).
        self.ejections_total = 0
        #: ejections skipped by the percentage cap (Envoy ejections_overflow).
        self.overflow_total = 0

    @property
    def instances(self) -> frozenset[str]:
        """The instance ids tracked."""
        return frozenset(self._instances)

    def set_instances(self, ids: Iterable[str]) -> None:
        """Track exactly ``ids``: keep the state of those known, forget the rest.

        Call with the service's instances the balancer may pick (on each catalog
        change); the percentage cap is taken of this set.
        """
        old = self._instances
        self._instances = {i: old.get(i) or InstanceState() for i in ids}
        self.ejected_until = max(
            (s.ejected_until for s in self._instances.values()), default=-math.inf
        )

    def record(self, instance_id: str, ok: bool, now: float) -> Ejection | None:
        """Feed the outcome of one attempt to ``instance_id``.

        Args:
            instance_id: the instance the attempt went to.
            ok: False for a 5xx response or a failed connect (or reset before
                a response); True for any other response.
            now: s.

        Returns:
            The :class:`Ejection` when this call ejected the instance (to count
            and log), else None.
        """
        state = self._instances.get(instance_id)
        if state is None:
            return None
        if ok:
            state.failures = 0
            return None
        if state.ejected_until > now:
            return None
        state.failures += 1
        if state.failures < self.config.consecutive_failures:
            return None
        if not self._room_to_eject(now):
            self.overflow_total += 1
            return None
        if state.multiplier:
            in_service = now - state.ejected_until
            state.multiplier = max(0, state.multiplier - int(in_service // MULTIPLIER_DECAY))
        state.multiplier = min(state.multiplier + 1, MAX_EJECTION_MULTIPLIER)
        duration = self.config.base_ejection * state.multiplier
        state.ejected_until = now + duration
        self.ejected_until = max(self.ejected_until, state.ejected_until)
        state.failures = 0
        self.ejections_total += 1
        return Ejection(instance_id, state.ejected_until, duration, state.multiplier)

    def _room_to_eject(self, now: float) -> bool:
        """One more ejection keeps the ejected share within max_ejection_percent."""
        out = sum(1 for s in self._instances.values() if s.ejected_until > now)
        return (out + 1) * 100 <= self.config.max_ejection_percent * len(self._instances)

    def is_ejected(self, instance_id: str, now: float) -> bool:
        """Whether the balancer must skip ``instance_id`` at ``now`` (False if unknown)."""
        state = self._instances.get(instance_id)
        return state is not None and state.ejected_until > now

    def state(self, instance_id: str) -> InstanceState | None:
        """``instance_id``'s state, for a caller that records successes itself
        (``failures = 0``: :meth:`record` of a success); None: not an instance here."""
        return self._instances.get(instance_id)

    def any_ejected(self, now: float) -> bool:
        """Whether any instance is ejected at ``now`` (one comparison: asked per request)."""
        return self.ejected_until > now

    def ejected(self, now: float) -> set[str]:
        """The ids ejected at ``now``."""
        return {i for i, s in self._instances.items() if s.ejected_until > now}


# --- admission ------------------------------------------------------------------------

#: Tolerance in tokens, so that a request exactly one refill interval after the
#: last is admitted despite float rounding of ``elapsed x rate``.
_TOKEN_EPSILON = 1e-9


class TokenBucket:
    """A rate limit: ``burst`` requests at once, then ``rate`` per second.

    Kept as the generic cell rate algorithm (GCRA), which admits exactly what
    a token bucket of ``burst`` tokens refilled at ``rate`` would: it stores
    the start of the current busy period and the count taken since, and
    computes the refill from elapsed time as ``(now - start) x rate``. No
    per-call increments are summed, so nothing drifts over long runs, and an
    idle bucket fills to ``burst`` and no further. Envoy's local rate limit is
    a token bucket with the same two parameters (max_tokens, tokens_per_fill).

    Args:
        rate: requests/s; 0 = unlimited (every take succeeds).
        burst: requests admitted at once from a full bucket, at least 1 when
            ``rate`` > 0.

    Raises:
        ValueError: ``rate`` negative or not finite, or ``burst`` < 1.
    """

    __slots__ = ("_start", "_taken", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, not {rate!r}")
        if rate > 0 and burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.rate = rate
        self.burst = burst
        self._start = -math.inf  # s; start of the busy period
        self._taken = 0  # taken since _start

    def _used(self, now: float) -> float:
        """Tokens missing from a full bucket at ``now`` (0 = full)."""
        if self._start + self._taken / self.rate <= now:  # refilled: a new period
            self._start, self._taken = now, 0
        return self._taken - (now - self._start) * self.rate

    def try_take(self, now: float) -> bool:
        """Take one token; False, and nothing taken, when the bucket is empty."""
        if self.rate == 0:
            return True
        if self._used(now) > self.burst - 1 + _TOKEN_EPSILON:
            return False
        self._taken += 1
        return True

    def wait_time(self, now: float) -> float:
        """s until :meth:`try_take` would succeed; 0 if now (for ``Retry-After``)."""
        if self.rate == 0:
            return 0.0
        excess = self._used(now) - (self.burst - 1)
        return max(0.0, excess / self.rate) if excess > _TOKEN_EPSILON else 0.0


class ConcurrencyLimit:
    """A cap on requests in flight (Envoy's ``max_requests`` circuit breaker).

    :meth:`try_acquire` before forwarding, :meth:`release` exactly once when
    the exchange ends (in a ``finally``). :attr:`limit` may be changed at any
    time: lowering it refuses new requests until enough in-flight ones end.

    Args:
        limit: requests in flight at most; 0 = unlimited (still counted).
    """

    __slots__ = ("_in_flight", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit!r}")
        self.limit = limit
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Requests acquired and not yet released (a gauge)."""
        return self._in_flight

    def try_acquire(self) -> bool:
        """Take a slot; False, and nothing taken, when ``limit`` are in flight."""
        if self.limit and self._in_flight >= self.limit:
            return False
        self._in_flight += 1
        return True

    def release(self) -> None:
        """Give a slot back. An unmatched release is ignored: the count never goes negative."""
        if self._in_flight > 0:
            self._in_flight -= 1

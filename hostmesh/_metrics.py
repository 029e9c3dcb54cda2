"""Prometheus metrics: a small registry rendered in the text exposition format 0.0.4.

Reference: Prometheus "Exposition formats", text format version 0.0.4, and
"Metric and label naming". Usage::

    registry = Registry()
    requests = registry.counter(
        "hostmesh_proxy_requests_total", "Requests proxied.", ("service", "code")
    )
    requests.labels("udvr", "200").inc()        # per request: a dict lookup and an add
    body = registry.render()                    # serve with CONTENT_TYPE

Single-threaded (one Trio thread): there are no locks, and ``inc()`` is a plain
attribute add. Children returned by ``labels()`` are cached; keep one around
on a hot path to skip even the lookup.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from ._log import get_logger

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "Counter",
    "CounterChild",
    "CounterFunc",
    "Gauge",
    "GaugeChild",
    "GaugeFunc",
    "Histogram",
    "HistogramChild",
    "Registry",
]

#: The Content-Type of :meth:`Registry.render`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Histogram upper bounds in seconds, the Prometheus clients' defaults (5 ms to 10 s).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# "Metric and label naming" / data model: the names' grammar.
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

_log = get_logger(__name__)

_C = TypeVar("_C")
_F = TypeVar("_F", bound="_Family[Any]")


def _format_value(value: float) -> str:
    """A sample value as Go's strconv would write it: ``+Inf``, ``NaN``, ``3``, ``0.25``."""
    if value != value:
        return "NaN"
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _check_metric_name(name: str) -> None:
    if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}: must match [a-zA-Z_:][a-zA-Z0-9_:]*")


def _check_labelnames(metric: str, labelnames: Iterable[str], reserved: Sequence[str]) -> None:
    seen: set[str] = set()
    for label in labelnames:
        if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
            raise ValueError(
                f"{metric}: invalid label name {label!r}: must match [a-zA-Z_][a-zA-Z0-9_]*"
            )
        if label.startswith("__"):
            raise ValueError(f"{metric}: label name {label!r}: names starting with __ are reserved")
        if label in reserved:
            raise ValueError(f"{metric}: label name {label!r} is reserved for this metric type")
        if label in seen:
            raise ValueError(f"{metric}: duplicate label name {label!r}")
        seen.add(label)


class _Family(Generic[_C]):
    """A metric's name, help and labelled children (a "metric family")."""

    kind: ClassVar[str]
    _reserved_labels: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, help: str, labelnames: Iterable[str]) -> None:
        _check_metric_name(name)
        labelnames = tuple(labelnames)
        _check_labelnames(name, labelnames, self._reserved_labels)
        self.name = name
        self.help = str(help)
        self.labelnames: tuple[str, ...] = labelnames
        self._children: dict[tuple[str, ...], _C] = {}

    def labels(self, *values: str) -> _C:
        """The child for these label values, in ``labelnames`` order (created once).

        Raises:
            ValueError: the number of values differs from the number of label names.
        """
        child = self._children.get(values)
        if child is not None:
            return child
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"{self.name}: expected {len(self.labelnames)} label values "
                f"{self.labelnames}, got {len(values)}"
            )
        key = tuple(v if type(v) is str else str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _new_child(self) -> _C:
        raise NotImplementedError

    def _no_labels(self) -> ValueError:
        return ValueError(
            f"{self.name} has labels {self.labelnames}: use .labels(...) to get a child"
        )

    def _sample_names(self) -> tuple[str, ...]:
        return (self.name,)

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for key in sorted(self._children):
            self._render_child(out, self._label_text(key), self._children[key])

    def _render_child(self, out: list[str], labels: str, child: _C) -> None:
        raise NotImplementedError

    def _label_text(self, values: tuple[str, ...], extra: str = "") -> str:
        """``{a="x",b="y"}`` (empty string when there are no labels)."""
        pairs = [
            f'{n}="{_escape_label_value(v)}"' for n, v in zip(self.labelnames, values, strict=True)
        ]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""


class CounterChild:
    """A monotonically increasing value (one labelled series of a counter).

    The proxy's express lane (``agent._routing.Lane``) adds 1 to ``_value`` in
    place: the call of :meth:`inc` per counter was 1% of a proxied request.
    """

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (default 1). Raises ValueError if it is negative or NaN."""
        if not amount >= 0:  # also refuses NaN
            raise ValueError(f"counters only go up: inc({amount!r})")
        self._value += amount

    @property
    def value(self) -> float:
        return self._value


class Counter(_Family[CounterChild], CounterChild):
    """A counter; its name must end in ``_total`` (Prometheus naming convention)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        _check_metric_name(name)
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        _Family.__init__(self, name, help, labelnames)
        CounterChild.__init__(self)
        if not self.labelnames:
            self._children[()] = self

    def inc(self, amount: float = 1.0) -> None:
        if self.labelnames:
            raise self._no_labels()
        if not amount >= 0:  # also refuses NaN
            raise ValueError(f"counters only go up: inc({amount!r})")
        self._value += amount

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _render_child(self, out: list[str], labels: str, child: CounterChild) -> None:
        out.append(f"{self.name}{labels} {_format_value(child._value)}")


class GaugeChild:
    """A value that goes up and down (one labelled series of a gauge)."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = value

    def inc(self, amount: float = 1.0) -> None:
        self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        self._value -= amount

    @property
    def value(self) -> float:
        return self._value


class Gauge(_Family[GaugeChild], GaugeChild):
    """A gauge."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        _Family.__init__(self, name, help, labelnames)
        GaugeChild.__init__(self)
        if not self.labelnames:
            self._children[()] = self

    def set(self, value: float) -> None:
        if self.labelnames:
            raise self._no_labels()
        self._value = value

    def inc(self, amount: float = 1.0) -> None:
        if self.labelnames:
            raise self._no_labels()
        self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        if self.labelnames:
            raise self._no_labels()
        self._value -= amount

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _render_child(self, out: list[str], labels: str, child: GaugeChild) -> None:
        out.append(f"{self.name}{labels} {_format_value(child._value)}")


class GaugeFunc(_Family[None]):
    """A gauge whose value is ``fn()``, read at render time (no labels).

    If ``fn`` raises, the sample is written as NaN and the error is logged, so
    that one broken gauge does not take /metrics down.
    """

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        super().__init__(name, help, ())
        self._fn = fn

    def _new_child(self) -> None:
        raise ValueError(f"{self.name} is a gauge function: it has no children")

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        try:
            value = float(self._fn())
        except Exception as exc:
            _log.warning("gauge function failed", metric=self.name, error=exc)
            value = math.nan
        out.append(f"{self.name} {_format_value(value)}")


class CounterFunc(_Family[None]):
    """A labelled counter whose samples are ``fn()``, read at render time.

    ``fn`` returns label values (in ``labelnames`` order) -> count. For hot
    paths that keep plain integers and pay nothing per event for metrics. A
    failing ``fn`` renders no samples and is logged.
    """

    kind = "counter"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str],
        fn: Callable[[], Mapping[tuple[str, ...], float]],
    ) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: counter names must end in _total")
        super().__init__(name, help, labelnames)
        self._fn = fn

    def _new_child(self) -> None:
        raise ValueError(f"{self.name} is a counter function: it has no children")

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        try:
            samples = dict(self._fn())
        except Exception as exc:
            _log.warning("counter function failed", metric=self.name, error=exc)
            return
        for key in sorted(samples):
            values = tuple(str(v) for v in key)
            if len(values) != len(self.labelnames):
                _log.warning("counter function returned wrong labels", metric=self.name)
                continue
            out.append(f"{self.name}{self._label_text(values)} {_format_value(samples[key])}")


class HistogramChild:
    """Observations counted into buckets (one labelled series of a histogram)."""

    __slots__ = ("_count", "_counts", "_sum", "_upper")

    def __init__(self, upper: tuple[float, ...]) -> None:
        self._upper = upper  # finite upper bounds, increasing; +Inf is implicit
        self._counts = [0] * (len(upper) + 1)  # per bucket, not cumulative; last is +Inf
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        """Count ``value`` into the first bucket whose upper bound is >= it."""
        self._counts[bisect.bisect_left(self._upper, value)] += 1
        self._sum += value
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum


class Histogram(_Family[HistogramChild], HistogramChild):
    """A histogram: ``_bucket{le=...}`` (cumulative, ending in ``+Inf``), ``_sum``, ``_count``."""

    kind = "histogram"
    _reserved_labels = ("le",)

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> None:
        _Family.__init__(self, name, help, labelnames)
        upper = [float(b) for b in buckets]
        if upper and upper[-1] == math.inf:
            upper.pop()
        for b in upper:
            if not math.isfinite(b):
                raise ValueError(f"{name}: bucket bounds must be finite numbers, got {b!r}")
        if any(a >= b for a, b in itertools.pairwise(upper)):
            raise ValueError(f"{name}: bucket bounds must be strictly increasing, got {upper}")
        HistogramChild.__init__(self, tuple(upper))
        self._le = [_format_value(b) for b in upper] + ["+Inf"]
        if not self.labelnames:
            self._children[()] = self

    def observe(self, value: float) -> None:
        if self.labelnames:
            raise self._no_labels()
        self._counts[bisect.bisect_left(self._upper, value)] += 1
        self._sum += value
        self._count += 1

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._upper)

    def _sample_names(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def _render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for key in sorted(self._children):
            child = self._children[key]
            cumulative = 0
            for le, n in zip(self._le, child._counts, strict=True):
                cumulative += n
                labels = self._label_text(key, f'le="{le}"')
                out.append(f"{self.name}_bucket{labels} {cumulative}")
            labels = self._label_text(key)
            out.append(f"{self.name}_sum{labels} {_format_value(child._sum)}")
            out.append(f"{self.name}_count{labels} {child._count}")


class Registry:
    """The metrics of one process (or one component in tests), rendered together."""

    def __init__(self) -> None:
        self._families: list[_Family[Any]] = []
        self._names: set[str] = set()  # every sample name taken, e.g. x_bucket

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        """Register a counter; ``name`` ends in ``_total``.

        Raises:
            ValueError: a bad or already registered name, or bad label names.
        """
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        """Register a gauge. Raises ValueError on a bad or taken name."""
        return self._add(Gauge(name, help, labelnames))

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """Register a histogram. Raises ValueError on a bad or taken name, or bad buckets."""
        return self._add(Histogram(name, help, labelnames, buckets))

    def gauge_func(self, name: str, help: str, fn: Callable[[], float]) -> GaugeFunc:
        """Register a gauge whose value is ``fn()`` at render time."""
        return self._add(GaugeFunc(name, help, fn))

    def counter_func(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str],
        fn: Callable[[], Mapping[tuple[str, ...], float]],
    ) -> CounterFunc:
        """Register a labelled counter whose samples are ``fn()`` at render time."""
        return self._add(CounterFunc(name, help, labelnames, fn))

    def render(self) -> str:
        """Every metric in registration order, in text format 0.0.4 (ends with a newline)."""
        out: list[str] = []
        for family in self._families:
            family._render(out)
        return "\n".join(out) + "\n" if out else ""

    def _add(self, family: _F) -> _F:
        names = family._sample_names()
        taken = self._names.intersection(names)
        if taken:
            raise ValueError(
                f"metric {family.name!r}: name {sorted(taken)[0]!r} is already registered"
            )
        self._names.update(names)
        self._families.append(family)
        return family

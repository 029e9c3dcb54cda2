"""Prometheus text exposition 0.0.4: exact output, escaping, validation, and the grammar."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest

from hostmesh._metrics import CONTENT_TYPE, DEFAULT_BUCKETS, Registry

# --- a strict parser of the text format, written from the spec --------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN)"
_HELP_RE = re.compile(rf"# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)")
_TYPE_RE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_SAMPLE_RE = re.compile(
    rf"({_NAME})(?:\{{((?:{_LABEL}={_LABEL_VALUE}(?:,{_LABEL}={_LABEL_VALUE})*)?,?)\}})? "
    rf"({_VALUE})(?: -?\d+)?"
)
_PAIR_RE = re.compile(rf"({_LABEL})=({_LABEL_VALUE})")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


def _float(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf}.get(text, float(text))


@dataclass
class Family:
    name: str
    kind: str = "untyped"
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse(text: str) -> dict[str, Family]:
    """Parse an exposition, asserting every rule of the 0.0.4 text format we rely on."""
    assert text == "" or text.endswith("\n"), "the last line must end with a newline"
    families: dict[str, Family] = {}
    current: Family | None = None
    done: set[str] = set()

    def family_of(sample: str) -> str:
        for suffix in ("_bucket", "_sum", "_count"):
            base = sample.removesuffix(suffix)
            if base != sample and base in families and families[base].kind == "histogram":
                return base
        return sample

    for line in text.split("\n")[:-1]:
        if m := _HELP_RE.fullmatch(line):
            name = m.group(1)
            fam = families.setdefault(name, Family(name))
            assert fam.help is None, f"second HELP for {name}"
            assert not fam.samples, f"HELP after samples for {name}"
            fam.help = _unescape(m.group(2))
        elif m := _TYPE_RE.fullmatch(line):
            name = m.group(1)
            fam = families.setdefault(name, Family(name))
            assert fam.kind == "untyped", f"second TYPE for {name}"
            assert not fam.samples, f"TYPE after samples for {name}"
            fam.kind = m.group(2)
        elif m := _SAMPLE_RE.fullmatch(line):
            sample, labels_text, value = m.groups()
            name = family_of(sample)
            assert name in families, f"sample {sample} before its TYPE"
            fam = families[name]
            if current is not fam:
                assert name not in done, f"samples of {name} are not contiguous"
                if current is not None:
                    done.add(current.name)
                current = fam
            labels: dict[str, str] = {}
            for pm in _PAIR_RE.finditer(labels_text or ""):
                assert pm.group(1) not in labels, f"duplicate label in {line!r}"
                labels[pm.group(1)] = _unescape(pm.group(2)[1:-1])
            fam.samples.append((sample, labels, _float(value)))
        else:
            raise AssertionError(f"line does not match the exposition grammar: {line!r}")

    for fam in families.values():
        if fam.kind == "counter":
            assert all(s == fam.name for s, _, _ in fam.samples)
        if fam.kind == "histogram":
            _check_histogram(fam)
    return families


def _check_histogram(fam: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], dict[str, list[tuple[float, float]]]] = {}
    for sample, sample_labels, value in fam.samples:
        labels = dict(sample_labels)
        le = labels.pop("le", None)
        key = tuple(sorted(labels.items()))
        parts = series.setdefault(key, {"bucket": [], "sum": [], "count": []})
        kind = sample.removeprefix(fam.name + "_")
        assert kind in parts, f"unexpected sample {sample}"
        if kind == "bucket":
            assert le is not None
            parts[kind].append((_float(le), value))
        else:
            assert le is None
            parts[kind].append((0.0, value))
    for parts in series.values():
        buckets = parts["bucket"]
        assert buckets and buckets[-1][0] == math.inf, "missing +Inf bucket"
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(set(bounds)), "bucket bounds not increasing"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), "buckets not cumulative"
        assert len(parts["count"]) == len(parts["sum"]) == 1
        assert parts["count"][0][1] == buckets[-1][1], "_count differs from +Inf bucket"


# --- exact output -----------------------------------------------------------


def test_counter_exact_text() -> None:
    reg = Registry()
    c = reg.counter("hostmesh_requests_total", "Requests proxied.", ("service", "code"))
    c.labels("udvr", "200").inc()
    c.labels("udvr", "200").inc(2)
    c.labels("db", "503").inc(0.5)
    plain = reg.counter("hostmesh_restarts_total", "Restarts.")
    plain.inc()
    assert reg.render() == (
        "# HELP hostmesh_requests_total Requests proxied.\n"
        "# TYPE hostmesh_requests_total counter\n"
        'hostmesh_requests_total{service="db",code="503"} 0.5\n'
        'hostmesh_requests_total{service="udvr",code="200"} 3\n'
        "# HELP hostmesh_restarts_total Restarts.\n"
        "# TYPE hostmesh_restarts_total counter\n"
        "hostmesh_restarts_total 1\n"
    )
    assert c.labels("udvr", "200").value == 3
    assert plain.value == 1


def test_gauge_exact_text() -> None:
    reg = Registry()
    g = reg.gauge("hostmesh_inflight", "Requests in flight.", ("service",))
    g.labels("udvr").inc()
    g.labels("udvr").inc(3)
    g.labels("udvr").dec()
    g.labels("db").set(-1.5)
    up = reg.gauge("hostmesh_up", "1 when up.")
    up.set(1)
    temp = reg.gauge("hostmesh_temp", "Odd values.")
    temp.set(math.inf)
    assert reg.render() == (
        "# HELP hostmesh_inflight Requests in flight.\n"
        "# TYPE hostmesh_inflight gauge\n"
        'hostmesh_inflight{service="db"} -1.5\n'
        'hostmesh_inflight{service="udvr"} 3\n'
        "# HELP hostmesh_up 1 when up.\n"
        "# TYPE hostmesh_up gauge\n"
        "hostmesh_up 1\n"
        "# HELP hostmesh_temp Odd values.\n"
        "# TYPE hostmesh_temp gauge\n"
        "hostmesh_temp +Inf\n"
    )
    temp.set(math.nan)
    assert reg.render().endswith("hostmesh_temp NaN\n")
    temp.set(-math.inf)
    assert reg.render().endswith("hostmesh_temp -Inf\n")


def test_histogram_exact_text() -> None:
    reg = Registry()
    h = reg.histogram("hostmesh_latency_seconds", "Latency.", ("service",), buckets=(0.1, 1, 2.5))
    child = h.labels("udvr")
    for v in (0.05, 0.1, 0.5, 3, 1000):  # 0.1 lands in le="0.1": bounds are inclusive
        child.observe(v)
    assert reg.render() == (
        "# HELP hostmesh_latency_seconds Latency.\n"
        "# TYPE hostmesh_latency_seconds histogram\n"
        'hostmesh_latency_seconds_bucket{service="udvr",le="0.1"} 2\n'
        'hostmesh_latency_seconds_bucket{service="udvr",le="1"} 3\n'
        'hostmesh_latency_seconds_bucket{service="udvr",le="2.5"} 3\n'
        'hostmesh_latency_seconds_bucket{service="udvr",le="+Inf"} 5\n'
        'hostmesh_latency_seconds_sum{service="udvr"} 1003.65\n'
        'hostmesh_latency_seconds_count{service="udvr"} 5\n'
    )
    assert child.count == 5
    assert child.sum == pytest.approx(1003.65)


def test_unlabelled_histogram_with_default_buckets() -> None:
    reg = Registry()
    h = reg.histogram("hostmesh_sync_seconds", "Sync time.")
    h.observe(0.003)
    h.observe(7)
    lines = reg.render().splitlines()
    assert lines[2:] == [
        'hostmesh_sync_seconds_bucket{le="0.005"} 1',
        'hostmesh_sync_seconds_bucket{le="0.01"} 1',
        'hostmesh_sync_seconds_bucket{le="0.025"} 1',
        'hostmesh_sync_seconds_bucket{le="0.05"} 1',
        'hostmesh_sync_seconds_bucket{le="0.1"} 1',
        'hostmesh_sync_seconds_bucket{le="0.25"} 1',
        'hostmesh_sync_seconds_bucket{le="0.5"} 1',
        'hostmesh_sync_seconds_bucket{le="1"} 1',
        'hostmesh_sync_seconds_bucket{le="2.5"} 1',
        'hostmesh_sync_seconds_bucket{le="5"} 1',
        'hostmesh_sync_seconds_bucket{le="10"} 2',
        'hostmesh_sync_seconds_bucket{le="+Inf"} 2',
        "hostmesh_sync_seconds_sum 7.003",
        "hostmesh_sync_seconds_count 2",
    ]
    assert len(DEFAULT_BUCKETS) == 11


def test_histogram_buckets_are_cumulative_for_many_values() -> None:
    reg = Registry()
    bounds = (0.5, 1, 2, 4, 8)
    h = reg.histogram("h_seconds", "H.", ("k",), buckets=(*bounds, math.inf))
    values = [i / 7 for i in range(100)]
    for v in values:
        h.labels("a").observe(v)
    fam = parse(reg.render())["h_seconds"]
    buckets = {labels["le"]: v for s, labels, v in fam.samples if s == "h_seconds_bucket"}
    for b in bounds:
        assert buckets[str(b).removesuffix(".0")] == sum(1 for v in values if v <= b)
    assert buckets["+Inf"] == len(values)


def test_labelled_metric_without_children_renders_only_header() -> None:
    reg = Registry()
    reg.counter("x_total", "X.", ("a",))
    reg.histogram("y_seconds", "Y.", ("a",))
    assert reg.render() == (
        "# HELP x_total X.\n"
        "# TYPE x_total counter\n"
        "# HELP y_seconds Y.\n"
        "# TYPE y_seconds histogram\n"
    )


def test_empty_registry_renders_nothing() -> None:
    assert Registry().render() == ""


def test_gauge_func_is_read_at_render_time() -> None:
    reg = Registry()
    box = [1.0]
    reg.gauge_func("hostmesh_catalog_nodes", "Nodes known.", lambda: box[0])
    assert reg.render().endswith("hostmesh_catalog_nodes 1\n")
    box[0] = 42
    assert reg.render().endswith("hostmesh_catalog_nodes 42\n")


def test_gauge_func_that_raises_renders_nan_and_keeps_the_rest() -> None:
    reg = Registry()
    reg.gauge_func("broken", "Broken.", lambda: 1 / 0)
    reg.gauge("fine", "Fine.").set(2)
    text = reg.render()
    assert "broken NaN\n" in text
    assert text.endswith("fine 2\n")
    parse(text)


def test_value_formatting() -> None:
    reg = Registry()
    g = reg.gauge("g", "G.", ("v",))
    for label, value in [
        ("int", 3.0),
        ("frac", 0.1),
        ("neg", -2.0),
        ("zero", 0.0),
        ("big", 1e20),
        ("tiny", 1e-7),
    ]:
        g.labels(label).set(value)
    samples = {labels["v"]: line for line, labels in _lines_with_labels(reg.render())}
    assert samples["int"].endswith(" 3")
    assert samples["frac"].endswith(" 0.1")
    assert samples["neg"].endswith(" -2")
    assert samples["zero"].endswith(" 0")
    assert samples["big"].endswith(" 1e+20")
    assert samples["tiny"].endswith(" 1e-07")


def _lines_with_labels(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            out.append((line, dict(_PAIR_RE.findall(line))))
    return [(line, {k: _unescape(v[1:-1]) for k, v in labels.items()}) for line, labels in out]


# --- escaping -----------------------------------------------------------------


def test_label_values_are_escaped() -> None:
    reg = Registry()
    c = reg.counter("esc_total", "E.", ("v",))
    hostile = 'back\\slash "quoted"\nnew line, comma} brace=eq'
    c.labels(hostile).inc()
    text = reg.render()
    assert 'esc_total{v="back\\\\slash \\"quoted\\"\\nnew line, comma} brace=eq"} 1\n' in text
    fam = parse(text)["esc_total"]
    assert fam.samples == [("esc_total", {"v": hostile}, 1.0)]


def test_help_is_escaped() -> None:
    reg = Registry()
    reg.gauge("h", 'Backslash \\ and\nnewline, "quotes" stay.')
    text = reg.render()
    assert text.startswith('# HELP h Backslash \\\\ and\\nnewline, "quotes" stay.\n')
    assert parse(text)["h"].help == 'Backslash \\ and\nnewline, "quotes" stay.'


def test_unicode_label_values_pass_through() -> None:
    reg = Registry()
    reg.gauge("u", "U.", ("v",)).labels("zürich ✓").set(1)
    assert 'u{v="zürich ✓"} 1\n' in reg.render()


# --- labels -------------------------------------------------------------------


def test_labels_are_cached() -> None:
    reg = Registry()
    c = reg.counter("c_total", "C.", ("a", "b"))
    assert c.labels("x", "y") is c.labels("x", "y")
    assert c.labels("x", "y") is not c.labels("y", "x")


def test_non_str_label_values_share_the_series_of_their_text() -> None:
    reg = Registry()
    c = reg.counter("codes_total", "C.", ("code",))
    c.labels(200).inc()  # type: ignore[arg-type]
    c.labels("200").inc()
    assert c.labels(200) is c.labels("200")  # type: ignore[arg-type]
    assert reg.render().endswith('codes_total{code="200"} 2\n')


@pytest.mark.parametrize("values", [(), ("a",), ("a", "b", "c")])
def test_wrong_label_count_is_a_value_error(values: tuple[str, ...]) -> None:
    c = Registry().counter("c_total", "C.", ("a", "b"))
    with pytest.raises(ValueError, match=r"expected 2 label values"):
        c.labels(*values)


def test_unlabelled_metric_refuses_label_values() -> None:
    c = Registry().counter("c_total", "C.")
    with pytest.raises(ValueError, match="expected 0 label values"):
        c.labels("a")


def test_labelled_metric_refuses_direct_updates() -> None:
    reg = Registry()
    c = reg.counter("c_total", "C.", ("a",))
    g = reg.gauge("g", "G.", ("a",))
    h = reg.histogram("h", "H.", ("a",))
    for call in (c.inc, g.inc, g.dec, lambda: g.set(1), lambda: h.observe(1)):
        with pytest.raises(ValueError, match=r"has labels \('a',\): use .labels"):
            call()
    assert "} " not in reg.render()


# --- validation -----------------------------------------------------------------


@pytest.mark.parametrize("amount", [-1, -0.001, math.nan])
def test_counter_refuses_negative_and_nan(amount: float) -> None:
    reg = Registry()
    c = reg.counter("c_total", "C.", ("a",))
    plain = reg.counter("p_total", "P.")
    with pytest.raises(ValueError, match="counters only go up"):
        c.labels("x").inc(amount)
    with pytest.raises(ValueError, match="counters only go up"):
        plain.inc(amount)
    assert c.labels("x").value == 0
    assert plain.value == 0


def test_counter_name_must_end_in_total() -> None:
    with pytest.raises(ValueError, match="must end in _total"):
        Registry().counter("hostmesh_requests", "R.")


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "a.b", "ü", "a\n"])
def test_invalid_metric_names(name: str) -> None:
    reg = Registry()
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.gauge(name, "G.")
    with pytest.raises(ValueError, match="invalid metric name"):
        reg.histogram(name, "H.")
    if name:
        with pytest.raises(ValueError, match="invalid metric name"):
            reg.counter(name + "_total", "C.")


@pytest.mark.parametrize("name", ["a", "_a", "a:b", ":a", "A_1"])
def test_valid_metric_names(name: str) -> None:
    Registry().gauge(name, "G.")


@pytest.mark.parametrize("label", ["", "1a", "a:b", "a-b", "ü"])
def test_invalid_label_names(label: str) -> None:
    with pytest.raises(ValueError, match="invalid label name"):
        Registry().gauge("g", "G.", (label,))


def test_reserved_and_duplicate_label_names() -> None:
    reg = Registry()
    with pytest.raises(ValueError, match="names starting with __ are reserved"):
        reg.gauge("g1", "G.", ("__name__",))
    with pytest.raises(ValueError, match="duplicate label name 'a'"):
        reg.gauge("g2", "G.", ("a", "a"))
    with pytest.raises(ValueError, match="'le' is reserved"):
        reg.histogram("h", "H.", ("le",))
    reg.gauge("g3", "G.", ("le",))  # le is only special for histograms


def test_registering_a_name_twice() -> None:
    reg = Registry()
    reg.gauge("x", "X.")
    with pytest.raises(ValueError, match="'x' is already registered"):
        reg.gauge("x", "X again.")
    with pytest.raises(ValueError, match="already registered"):
        reg.histogram("x", "X.")
    with pytest.raises(ValueError, match="already registered"):
        reg.gauge_func("x", "X.", lambda: 1.0)
    assert reg.render().count("# TYPE") == 1


def test_histogram_sample_names_are_taken_too() -> None:
    reg = Registry()
    reg.histogram("rpc_seconds", "R.")
    with pytest.raises(ValueError, match="'rpc_seconds_count' is already registered"):
        reg.gauge("rpc_seconds_count", "C.")
    reg.gauge("jobs_count", "C.")
    with pytest.raises(ValueError, match="'jobs_count' is already registered"):
        reg.histogram("jobs", "J.")


@pytest.mark.parametrize("buckets", [(1, 1), (2, 1), (1, math.nan), (-math.inf, 1), (math.inf, 1)])
def test_bad_buckets(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bucket bounds"):
        Registry().histogram("h", "H.", buckets=buckets)


def test_separate_registries_are_independent() -> None:
    a, b = Registry(), Registry()
    a.gauge("x", "X.").set(1)
    b.gauge("x", "X.").set(2)
    assert a.render().endswith("x 1\n")
    assert b.render().endswith("x 2\n")


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


# --- the grammar, over a registry with everything in it ---------------------------


def test_every_line_matches_the_exposition_grammar() -> None:
    reg = Registry()
    c = reg.counter("hostmesh_requests_total", "Requests.\nSecond line \\ here.", ("svc", "code"))
    g = reg.gauge("hostmesh_inflight", "In flight.", ("svc",))
    h = reg.histogram("hostmesh_latency_seconds", "Latency.", ("svc", "az"))
    reg.gauge_func("hostmesh_nodes", "Nodes.", lambda: 3)
    reg.counter("hostmesh_unused_total", "Never incremented.", ("x",))
    reg.histogram("hostmesh_empty_seconds", "", buckets=())
    nasty = ['"', "\\", "\n", "}", ",", "=", " ", "", "\\n", 'a\\"b']
    for i, value in enumerate(nasty):
        c.labels(value, str(200 + i)).inc(i + 0.25)
        g.labels(value).set(-i / 3)
        for k in range(i + 1):
            h.labels(value, "eu-west-1a").observe(k * 0.37)
    families = parse(reg.render())
    assert set(families) == {
        "hostmesh_requests_total",
        "hostmesh_inflight",
        "hostmesh_latency_seconds",
        "hostmesh_nodes",
        "hostmesh_unused_total",
        "hostmesh_empty_seconds",
    }
    assert families["hostmesh_requests_total"].help == "Requests.\nSecond line \\ here."
    got = {labels["svc"] for _, labels, _ in families["hostmesh_requests_total"].samples}
    assert got == set(nasty)
    assert families["hostmesh_latency_seconds"].kind == "histogram"
    assert families["hostmesh_empty_seconds"].samples == [
        ("hostmesh_empty_seconds_bucket", {"le": "+Inf"}, 0.0),
        ("hostmesh_empty_seconds_sum", {}, 0.0),
        ("hostmesh_empty_seconds_count", {}, 0.0),
    ]


def test_the_parser_rejects_broken_text() -> None:
    """The grammar check above could not pass on everything: show it fails."""
    for bad in [
        "x 1\n",  # sample before TYPE
        '# TYPE x gauge\nx{a="unterminated} 1\n',
        '# TYPE x gauge\nx{a="new\nline"} 1\n',
        "# TYPE x gauge\nx one\n",
        "# TYPE x gauge\nx 1",  # no final newline
        "# TYPE x gauge\n# TYPE x gauge\n",
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_sum 1\nh_count 2\n',  # no +Inf
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na 2\n",  # not contiguous
    ]:
        with pytest.raises(AssertionError):
            parse(bad)


def test_counter_func_renders_labelled_samples_at_render_time() -> None:
    counts: dict[tuple[str, ...], float] = {("A", "NOERROR"): 3}
    reg = Registry()
    reg.counter_func("dns_queries_total", "Queries.", ("qtype", "rcode"), lambda: counts)
    counts[("SRV", "NXDOMAIN")] = 1
    assert reg.render() == (
        "# HELP dns_queries_total Queries.\n"
        "# TYPE dns_queries_total counter\n"
        'dns_queries_total{qtype="A",rcode="NOERROR"} 3\n'
        'dns_queries_total{qtype="SRV",rcode="NXDOMAIN"} 1\n'
    )
    with pytest.raises(ValueError, match="_total"):
        reg.counter_func("dns_queries", "x", (), dict)


def test_counter_func_that_fails_renders_no_samples() -> None:
    def broken() -> dict[tuple[str, ...], float]:
        raise RuntimeError("boom")

    reg = Registry()
    reg.counter_func("broken_total", "Broken.", ("a",), broken)
    assert reg.render() == "# HELP broken_total Broken.\n# TYPE broken_total counter\n"

"""Structured logs: logfmt and JSON lines, one record per line whatever the values."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from hostmesh._log import MAX_VALUE_CHARS, get_logger, setup_logging

# A logfmt line: key=bare or key="quoted with \" \\ \n \uXXXX escapes".
_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s="\\]+)')
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def parse_logfmt(line: str) -> dict[str, str]:
    """Parse one logfmt line strictly: every character must belong to a pair."""
    assert "\n" not in line and "\r" not in line
    assert "\u2028" not in line and "\u2029" not in line and "\x85" not in line
    out: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        assert m, f"not logfmt at {pos}: {line[pos : pos + 40]!r}"
        key, raw = m.groups()
        assert key not in out, f"duplicate key {key}"
        out[key] = json.loads(raw) if raw.startswith('"') else raw
        pos = m.end()
        if pos < len(line):
            assert line[pos] == " "
            pos += 1
    return out


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def capture(level: str = "info", fmt: str = "text") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(level, fmt, stream)  # type: ignore[arg-type]
    return stream


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n") or text == ""
    return text.splitlines()


pytestmark = pytest.mark.usefixtures("restore_logging")


def test_text_line_matches_the_documented_shape() -> None:
    out = capture()
    get_logger("hostmesh.agent").info("agent started", api="127.0.0.1:4191")
    [line] = lines(out)
    assert re.fullmatch(
        r"ts=\S+ level=info logger=hostmesh.agent msg=\"agent started\" api=127.0.0.1:4191",
        line,
    )
    rec = parse_logfmt(line)
    assert _TS.fullmatch(rec["ts"])
    assert list(rec) == ["ts", "level", "logger", "msg", "api"]


def test_json_line_has_the_same_content() -> None:
    out = capture(fmt="json")
    get_logger("hostmesh.agent").warning("slow", ms=12.5, n=3, ok=True, none=None, who="a b")
    [line] = lines(out)
    rec = json.loads(line)
    assert _TS.fullmatch(rec.pop("ts"))
    assert rec == {
        "level": "warning",
        "logger": "hostmesh.agent",
        "msg": "slow",
        "ms": 12.5,
        "n": 3,
        "ok": True,
        "none": None,
        "who": "a b",
    }


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "two words",
        "a=b",
        'say "hi"',
        "back\\slash",
        "line1\nline2",
        "cr\rlf\r\n",
        "tab\there",
        "",
        " ",
        "nul\x00bell\x07del\x7f",
        "unicode line\u2028sep\u2029para\x85nel",
        "ünïcödé ✓",
        '\\"',
        "\\n",
    ],
)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_values_round_trip_on_one_line(fmt: str, value: str) -> None:
    out = capture(fmt=fmt)
    get_logger("hostmesh.t").info(value, v=value)
    [line] = lines(out)
    rec = parse_logfmt(line) if fmt == "text" else json.loads(line)
    assert rec["msg"] == value
    assert rec["v"] == value


def test_text_quotes_only_when_needed() -> None:
    out = capture()
    get_logger("hostmesh.t").info("m", a="x", b="x y", c="", d='q"', e="k=v", f="a\nb")
    [line] = lines(out)
    assert line.endswith(' msg=m a=x b="x y" c="" d="q\\"" e="k=v" f="a\\nb"')


def test_level_filtering() -> None:
    out = capture("warning")
    log = get_logger("hostmesh.t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [parse_logfmt(x)["msg"] for x in lines(out)] == ["w", "e"]
    assert not log.enabled("info")
    assert log.enabled("error")


def test_debug_level_lets_everything_through() -> None:
    out = capture("DEBUG")
    log = get_logger("hostmesh.t")
    log.debug("d")
    log.info("i")
    assert [parse_logfmt(x)["level"] for x in lines(out)] == ["debug", "info"]


@pytest.mark.parametrize("level", ["verbose", "", "warn ", "critical"])
def test_unknown_level_is_a_clear_value_error(level: str) -> None:
    with pytest.raises(ValueError, match=r"unknown log level .*expected one of debug, info"):
        setup_logging(level)


def test_unknown_format_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        setup_logging("info", "xml", io.StringIO())  # type: ignore[arg-type]


def test_setup_twice_replaces_its_handler() -> None:
    first = capture()
    second = capture()
    get_logger("hostmesh.t").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def _raise_and_log(level: str, fmt: str) -> list[str]:
    out = capture(level, fmt)
    log = get_logger("hostmesh.t")
    try:
        raise KeyError("no such\nservice")
    except KeyError:
        log.exception("lookup failed", service="udvr")
    return lines(out)


def test_exception_at_info_is_one_line_with_error_field() -> None:
    [line] = _raise_and_log("info", "text")
    rec = parse_logfmt(line)
    assert rec["level"] == "error"
    assert rec["msg"] == "lookup failed"
    assert rec["service"] == "udvr"
    assert rec["error"] == "KeyError: 'no such\\nservice'"
    assert "traceback" not in rec


def test_exception_at_debug_carries_the_traceback_as_a_field() -> None:
    [line] = _raise_and_log("debug", "text")
    rec = parse_logfmt(line)
    assert rec["traceback"].startswith("Traceback (most recent call last):\n")
    assert "_raise_and_log" in rec["traceback"]
    assert rec["traceback"].endswith("KeyError: 'no such\\nservice'")


def test_exception_in_json() -> None:
    [line] = _raise_and_log("info", "json")
    rec = json.loads(line)
    assert rec["error"].startswith("KeyError: ")
    assert rec["service"] == "udvr"


def test_exception_outside_except_adds_nothing() -> None:
    out = capture()
    get_logger("hostmesh.t").exception("no active exception")
    rec = parse_logfmt(lines(out)[0])
    assert "error" not in rec


def test_exception_object_as_field_value() -> None:
    out = capture()
    get_logger("hostmesh.t").warning("check failed", error=TimeoutError("after 5 s"))
    assert parse_logfmt(lines(out)[0])["error"] == "TimeoutError: after 5 s"


def test_fields_named_like_ours_do_not_clobber_them() -> None:
    out = capture()
    log = get_logger("hostmesh.t")
    log.info("real", msg="fake", level="fake", ts="fake", logger="fake")
    rec = parse_logfmt(lines(out)[0])
    assert (rec["msg"], rec["level"], rec["logger"]) == ("real", "info", "hostmesh.t")
    assert rec["msg_"] == rec["level_"] == rec["ts_"] == rec["logger_"] == "fake"


def test_odd_keys_are_made_safe() -> None:
    out = capture()
    get_logger("hostmesh.t").info("m", **{"a b": 1, "x=y": 2, "": 3})
    rec = parse_logfmt(lines(out)[0])
    assert rec["a_b"] == "1"
    assert rec["x_y"] == "2"
    assert rec["_"] == "3"


class _Hostile:
    def __str__(self) -> str:
        raise RuntimeError("no")


class _Weird:
    def __str__(self) -> str:
        return 'multi\nline "thing"'


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_hostile_values_never_break_a_line(fmt: str) -> None:
    out = capture(fmt=fmt)
    get_logger("hostmesh.t").info(
        "hostile",
        obj=_Hostile(),
        weird=_Weird(),
        data=b"\x00\xff\n",
        mapping={"k": "v\n"},
        huge_int=10**5000,
        nan=float("nan"),
        inf=float("-inf"),
        cls=_Hostile,
    )
    [line] = lines(out)
    rec = parse_logfmt(line) if fmt == "text" else json.loads(line)
    assert rec["obj"] == "<unprintable _Hostile>"
    assert rec["weird"] == 'multi\nline "thing"'
    assert rec["data"] == repr(b"\x00\xff\n")
    assert rec["mapping"] == "{'k': 'v\\n'}"
    assert rec["huge_int"] == "<unprintable int>"  # int -> str refuses 5000 digits
    assert rec["nan"] == "nan"
    assert rec["inf"] == "-inf"


def test_text_renders_scalars_plainly() -> None:
    out = capture()
    get_logger("hostmesh.t").info("m", n=3, f=0.25, t=True, no=False, none=None)
    assert lines(out)[0].endswith(" msg=m n=3 f=0.25 t=true no=false none=null")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_huge_values_are_cut_and_stay_on_one_line(fmt: str) -> None:
    out = capture(fmt=fmt)
    huge = ("x" * 999 + "\n") * 1000  # 1,000,000 characters with newlines
    get_logger("hostmesh.t").info(huge, v=huge)
    [line] = lines(out)
    rec = parse_logfmt(line) if fmt == "text" else json.loads(line)
    for key in ("msg", "v"):
        assert rec[key].startswith(huge[:MAX_VALUE_CHARS])
        assert rec[key].endswith(f"...[{len(huge) - MAX_VALUE_CHARS} more chars]")
    assert len(line) < 4 * MAX_VALUE_CHARS + 1000


def test_bind_adds_context_fields() -> None:
    out = capture()
    log = get_logger("hostmesh.t").bind(node="n1", az="eu-west-1a")
    log.info("m", az="override", x=1)
    rec = parse_logfmt(lines(out)[0])
    assert (rec["node"], rec["az"], rec["x"]) == ("n1", "override", "1")
    assert log.name == "hostmesh.t"


def test_percent_in_message_is_literal() -> None:
    out = capture()
    get_logger("hostmesh.t").info("100% done %s %(x)s")
    assert parse_logfmt(lines(out)[0])["msg"] == "100% done %s %(x)s"


def test_foreign_stdlib_records_use_the_same_format() -> None:
    out = capture()
    logging.getLogger("trio.something").warning("peer %s went away", "10.0.0.1")
    [line] = lines(out)
    foreign = parse_logfmt(line)
    assert foreign["logger"] == "trio.something"
    assert foreign["level"] == "warning"
    assert foreign["msg"] == "peer 10.0.0.1 went away"


def test_stream_defaults_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", "text")
    get_logger("hostmesh.t").info("to stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert 'msg="to stderr"' in captured.err

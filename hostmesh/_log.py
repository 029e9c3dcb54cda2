"""Structured logs: logfmt (``key=value``) or JSON lines, one record per line.

Usage::

    setup_logging("info", "text")          # once, at process start (CLI)
    log = get_logger(__name__)
    log.info("agent started", port=4191)

prints::

    ts=2026-11-22T02:13:47.123Z level=info logger=hostmesh.agent msg="agent started" port=4191

Every record is exactly one line in both formats, whatever the values hold
(newlines and quotes are escaped), so journald, ``grep`` and log shippers see
one event per line. An exception is logged as ``error="Type: message"`` on the
same line; with level ``debug`` its traceback follows as a ``traceback`` field.

Records of other libraries (trio, httpx) that reach the root logger are
formatted the same way, with no fields.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Literal, TextIO

__all__ = ["LEVELS", "MAX_VALUE_CHARS", "Logger", "get_logger", "setup_logging"]

#: Accepted level names (the config's ``log_level`` values) -> stdlib levels.
LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Longest value (message, field, traceback) written, in characters; longer ones
#: are cut with a marker. journald splits lines longer than its LineMax (48 KiB
#: by default, journald.conf(5)) into several entries, which would break the
#: one-record-one-line promise; 16 Ki characters keep a whole record below it.
MAX_VALUE_CHARS = 16 * 1024

# The attribute of a LogRecord that carries a record's fields.
_FIELDS_ATTR = "hostmesh_fields"
# A bare logfmt value may not hold these (go-logfmt's rules, plus backslash and
# the Unicode line breaks that str.splitlines and some viewers honour).
_NEEDS_QUOTES = re.compile(r'[\x00-\x20="\\\x7f\x85\u2028\u2029]')
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
# json.dumps leaves these unescaped; escape them so no reader splits the line.
_LINE_BREAKS = str.maketrans(
    {"\x7f": "\\u007f", "\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)
# Larger ints are written as strings: JSON readers keep about 2**53 exactly,
# and int -> str refuses past 4300 digits (sys.set_int_max_str_digits).
_JSON_INT_LIMIT = 2**63
# Marks the handler setup_logging installs, so that a second call replaces it.
_HANDLER_NAME = "hostmesh"


class Logger:
    """A named logger whose calls take a message and ``key=value`` fields.

    Cheap when a level is disabled: one cached level check, no formatting.
    Never raises because of a field's value: values that cannot be turned into
    text are written as ``<unprintable TYPE>``.
    """

    __slots__ = ("_context", "_logger")

    def __init__(self, logger: logging.Logger, context: Mapping[str, object] | None = None) -> None:
        self._logger = logger
        self._context: dict[str, object] = dict(context or {})

    @property
    def name(self) -> str:
        return self._logger.name

    def bind(self, **fields: object) -> Logger:
        """A logger of the same name that adds ``fields`` to every record."""
        return Logger(self._logger, {**self._context, **fields})

    def enabled(self, level: str) -> bool:
        """Whether a record at ``level`` would be written (to skip costly fields)."""
        return self._logger.isEnabledFor(_level_number(level))

    def debug(self, msg: str, /, **fields: object) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, msg, fields, exc_info=False)

    def info(self, msg: str, /, **fields: object) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, msg, fields, exc_info=False)

    def warning(self, msg: str, /, **fields: object) -> None:
        if self._logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, msg, fields, exc_info=False)

    def error(self, msg: str, /, **fields: object) -> None:
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, msg, fields, exc_info=False)

    def exception(self, msg: str, /, **fields: object) -> None:
        """Log at error level with the exception being handled (call it in ``except``)."""
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, msg, fields, exc_info=True)

    def _emit(self, level: int, msg: str, fields: dict[str, object], *, exc_info: bool) -> None:
        if self._context:
            fields = {**self._context, **fields}
        # stacklevel=3: the record's caller is whoever called info()/debug()...
        self._logger.log(level, msg, exc_info=exc_info, extra={_FIELDS_ATTR: fields}, stacklevel=3)


def get_logger(name: str) -> Logger:
    """The logger called ``name`` (pass ``__name__``)."""
    return Logger(logging.getLogger(name))


def setup_logging(
    level: str = "info",
    fmt: Literal["text", "json"] = "text",
    stream: TextIO | None = None,
) -> None:
    """Configure the root logger: one handler writing ``fmt`` lines to ``stream``.

    Calling it again replaces the handler it installed before (other handlers,
    such as pytest's, are left alone).

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error`` (any case).
        fmt: ``text`` (logfmt) or ``json`` (one object per line).
        stream: where lines go; ``sys.stderr`` when None. The caller owns it.

    Raises:
        ValueError: unknown level or format.
    """
    number = _level_number(level)
    formatter: logging.Formatter
    if fmt == "text":
        formatter = _LogfmtFormatter(tracebacks=number <= logging.DEBUG)
    elif fmt == "json":
        formatter = _JsonFormatter(tracebacks=number <= logging.DEBUG)
    else:
        raise ValueError(f"unknown log format {fmt!r}: expected 'text' or 'json'")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)


def _level_number(level: str) -> int:
    try:
        return LEVELS[str(level).lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}"
        ) from None


# --- formatting -------------------------------------------------------------


def _record_items(record: logging.LogRecord, *, tracebacks: bool) -> dict[str, object]:
    """The ordered key -> value pairs of a record, fields last."""
    try:
        msg = record.getMessage()
    except Exception:  # a foreign record whose %-args do not match its message
        msg = f"{record.msg!s} {record.args!r}"
    created = record.created
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    items: dict[str, object] = {
        "ts": f"{ts}.{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": msg,
    }
    extra: dict[str, object] = {}
    exc = record.exc_info
    if exc and exc[1] is not None:
        extra["error"] = _describe_exception(exc[1])
        if tracebacks:
            extra["traceback"] = "".join(traceback.format_exception(exc[1])).rstrip("\n")
    fields = getattr(record, _FIELDS_ATTR, None)
    if isinstance(fields, dict):
        for key, value in fields.items():
            # A field named like one of ours gets "_" appended rather than
            # hiding it or writing the key twice.
            name = _BAD_KEY_CHARS.sub("_", str(key)) or "_"
            while name in items or name in extra:
                name += "_"
            items[name] = value
    items.update(extra)
    return items


def _describe_exception(exc: BaseException) -> str:
    text = _to_text(exc, describe=False)
    name = type(exc).__qualname__
    return f"{name}: {text}" if text else name


def _to_text(value: object, *, describe: bool = True) -> str:
    """Any value as text; never raises."""
    try:
        if isinstance(value, str):
            text = value
        elif value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif describe and isinstance(value, BaseException):
            text = _describe_exception(value)
        else:
            text = str(value)
    except Exception:
        text = f"<unprintable {type(value).__qualname__}>"
    return _clip(text)


def _clip(text: str) -> str:
    if len(text) <= MAX_VALUE_CHARS:
        return text
    return f"{text[:MAX_VALUE_CHARS]}...[{len(text) - MAX_VALUE_CHARS} more chars]"


def _logfmt_value(text: str) -> str:
    if text and not _NEEDS_QUOTES.search(text):
        return text
    # A JSON string is a quoted logfmt value with \" \\ \n \t \uXXXX escapes.
    return json.dumps(text, ensure_ascii=False).translate(_LINE_BREAKS)


class _LogfmtFormatter(logging.Formatter):
    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__()
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        items = _record_items(record, tracebacks=self._tracebacks)
        return " ".join(f"{k}={_logfmt_value(_to_text(v))}" for k, v in items.items())


class _JsonFormatter(logging.Formatter):
    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__()
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        items = _record_items(record, tracebacks=self._tracebacks)
        out = {k: _json_value(v) for k, v in items.items()}
        return json.dumps(out, ensure_ascii=False).translate(_LINE_BREAKS)


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, int) and -_JSON_INT_LIMIT < value < _JSON_INT_LIMIT:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN/Infinity
    return _to_text(value)

"""The ``hostmesh`` command's entry point: daemons start here without the CLI's libraries.

``hostmesh agent`` and ``hostmesh server`` run for months; typer, click and
rich, which only the admin commands need, would stay resident in them (about
4 MB of the agent's RSS, whose goal is 50 MB). So the daemon commands are
parsed here with argparse, taking exactly the typer commands' options, and
run without importing :mod:`hostmesh.cli`; anything else (``--help``, a typo,
a missing value, every other command) goes to typer as usual.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._errors import HostmeshError

__all__ = ["main", "run_agent_command", "run_server_command"]


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _setup_logs(level: str, fmt: str) -> None:
    from ._log import setup_logging

    if fmt not in ("text", "json"):
        raise HostmeshError(f"--log-format must be text or json, not {fmt!r}")
    try:
        setup_logging(level, "json" if fmt == "json" else "text")
    except ValueError as exc:
        raise HostmeshError(str(exc)) from None


def _run_daemon(make: Callable[[], Any]) -> None:
    """Run a trio main until it ends, Ctrl-C or SIGTERM; known errors are one line."""
    import trio

    try:
        trio.run(make)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr, flush=True)
    except BaseExceptionGroup as group:
        # Trio nurseries wrap errors; show the first one we know as one line.
        leaf = _first_leaf(group)
        if isinstance(leaf, HostmeshError | OSError):
            raise leaf from None
        raise


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def run_agent_command(config: Path | None, log_level: str, log_format: str) -> None:
    """``hostmesh agent``: run the per-host daemon until stopped.

    Raises:
        HostmeshError, OSError: a bad option or config, or a failure to start.
    """
    from ._config import load_agent_config
    from ._daemons import run_agent

    _setup_logs(log_level, log_format)
    cfg = load_agent_config(config)
    reload = (lambda: load_agent_config(config)) if config is not None else None
    _run_daemon(lambda: run_agent(cfg, reload))


def run_server_command(config: Path | None, log_level: str, log_format: str) -> None:
    """``hostmesh server``: run a server until stopped (raises as above)."""
    from ._config import load_server_config
    from ._daemons import run_server

    _setup_logs(log_level, log_format)
    cfg = load_server_config(config)
    _run_daemon(lambda: run_server(cfg))


def _run_daemon_command(argv: list[str]) -> bool:
    """Run ``hostmesh agent|server [-c FILE] [--log-level L] [--log-format F]``; False
    for anything this parser does not take whole, which typer then answers."""
    if not argv or argv[0] not in ("agent", "server"):
        return False
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("-c", "--config", type=Path, default=None)
    parser.add_argument("--log-level", default=None)
    parser.add_argument("--log-format", default="text")
    try:
        ns, extra = parser.parse_known_args(argv[1:])
    except argparse.ArgumentError:
        return False
    if extra:
        return False
    command = run_agent_command if argv[0] == "agent" else run_server_command
    command(ns.config, ns.log_level or "info", ns.log_format)
    return True


def main() -> None:
    """Console-script entry point: a failure is one line and exit status 1."""
    try:
        if _run_daemon_command(sys.argv[1:]):
            return
    except (HostmeshError, OSError) as exc:
        _error(str(exc))
        sys.exit(1)
    from .cli import main as cli_main

    cli_main()

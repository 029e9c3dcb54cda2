"""The ``hostmesh`` command line (typer + rich).

Commands are thin: daemons are started from here, everything else calls the
agent's HTTP API through httpx and prints a rich table for people or JSON
(``--json``) for scripts. A failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ._config import load_service_file
from ._errors import AgentUnreachableError, HostmeshError

if TYPE_CHECKING:
    import httpx  # imported by the commands that call an API, not by the daemons

__all__ = ["app", "main"]

DEFAULT_AGENT = "127.0.0.1:4191"
#: Seconds the CLI waits for the agent API.
CLI_TIMEOUT = 10.0
#: Seconds to wait for a keyring change: the agent waits up to 5 s for every member.
KEYRING_TIMEOUT = 30.0

app = typer.Typer(
    name="hostmesh",
    help="hostmesh: a per-host service mesh for fleets of EC2 instances and VMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
check_app = typer.Typer(help="Set the status of a TTL check.", no_args_is_help=True)
app.add_typer(check_app, name="check")
keyring_app = typer.Typer(
    help="Rotate the gossip encryption keys on every member: install, use, then remove.",
    no_args_is_help=True,
)
app.add_typer(keyring_app, name="keyring")

console = Console()
err_console = Console(stderr=True)

AgentOpt = Annotated[
    str,
    typer.Option(
        "--agent",
        envvar="HOSTMESH_AGENT",
        help="Agent API address (host:port or URL).",
        show_default=True,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")]
LogFormatOpt = Annotated[str, typer.Option("--log-format", help="text (key=value) or json.")]

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """Print one line on stderr and exit 1."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _base_url(agent: str) -> str:
    return agent if agent.startswith(("http://", "https://")) else f"http://{agent}"


def _call(
    agent: str, method: str, path: str, *, timeout: float = CLI_TIMEOUT, **kwargs: Any
) -> httpx.Response:
    """One API call; non-2xx answers become a one-line error."""
    import httpx

    url = _base_url(agent) + path
    try:
        with httpx.Client(timeout=timeout) as client:
            response = client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise AgentUnreachableError(
            f"cannot reach the agent at {_base_url(agent)}: {exc or type(exc).__name__}"
            " (is it running? set --agent or HOSTMESH_AGENT)"
        ) from None
    if response.status_code >= 400:
        reason = response.text.strip().splitlines()[0] if response.text.strip() else ""
        raise HostmeshError(f"{method} {path}: {response.status_code} {reason}".rstrip())
    return response


def _setup_logs(level: str, fmt: str) -> None:
    from ._log import setup_logging

    if fmt not in ("text", "json"):
        fail(f"--log-format must be text or json, not {fmt!r}")
    try:
        setup_logging(level, "json" if fmt == "json" else "text")
    except ValueError as exc:
        fail(str(exc))


def _run_daemon(make: Callable[[], Any]) -> None:
    """Run a trio main until it ends, Ctrl-C or SIGTERM; errors are one line."""
    import trio

    try:
        trio.run(make)
    except KeyboardInterrupt:
        err_console.print("stopped", highlight=False)
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


# --- daemons -----------------------------------------------------------------------


@app.command()
def agent(
    config: Annotated[
        Path | None, typer.Option("-c", "--config", help="agent.toml (default: built-in)")
    ] = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run the agent (the per-host daemon)."""
    from ._config import load_agent_config
    from ._daemons import run_agent

    _setup_logs(log_level, log_format)
    cfg = load_agent_config(config)
    _run_daemon(lambda: run_agent(cfg))


@app.command()
def server(
    config: Annotated[
        Path | None, typer.Option("-c", "--config", help="server.toml (default: built-in)")
    ] = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run a server."""
    from ._config import load_server_config
    from ._daemons import run_server

    _setup_logs(log_level, log_format)
    cfg = load_server_config(config)
    _run_daemon(lambda: run_server(cfg))


@app.command()
def dev(
    log_level: LogLevelOpt = "warning",
    log_format: LogFormatOpt = "text",
    api: Annotated[str, typer.Option(help="Agent API address (port 0: any).")] = DEFAULT_AGENT,
    server_api: Annotated[
        str, typer.Option(help="Server API address (port 0: any).")
    ] = "127.0.0.1:4150",
    dns: Annotated[str, typer.Option(help="DNS address, UDP and TCP (port 0: any).")] = (
        "127.0.0.1:8600"
    ),
    gossip: Annotated[str, typer.Option(help="Gossip address, UDP and TCP (port 0: any).")] = (
        "127.0.0.1:7946"
    ),
    proxy: Annotated[str, typer.Option(help="HTTP proxy address (port 0: any).")] = (
        "127.0.0.1:4140"
    ),
    nodes: Annotated[int, typer.Option(help="Agents to run, on 127.0.0.1..127.0.0.N.")] = 1,
    azs: Annotated[int, typer.Option(help="Availability zones to spread them over.")] = 1,
) -> None:
    """Run a server and an agent in one process on built-in defaults: try hostmesh."""
    from ._daemons import run_dev

    _setup_logs(log_level, log_format)
    _run_daemon(
        lambda: run_dev(
            api_bind=api,
            server_bind=server_api,
            dns_bind=dns,
            gossip_bind=gossip,
            proxy_bind=proxy,
            nodes=nodes,
            azs=azs,
            out=console,
        )
    )


# --- queries -----------------------------------------------------------------------

_HEALTH_STYLE = {"passing": "green", "warning": "yellow", "critical": "red"}


def _instance_rows(agent: str, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        for entry in _call(agent, "GET", f"/v1/health/service/{name}").json():
            node, svc, checks = entry["Node"], entry["Service"], entry["Checks"]
            statuses = [c["Status"] for c in checks]
            health = next((s for s in ("critical", "warning") if s in statuses), "passing")
            rows.append(
                {
                    "service": svc["Service"],
                    "id": svc["ID"],
                    "node": node["Node"],
                    "az": node.get("Locality", {}).get("Zone", ""),
                    "address": svc["Address"] or node["Address"],
                    "port": svc["Port"],
                    "tags": svc["Tags"],
                    "health": health,
                }
            )
    return rows


@app.command()
def services(
    name: Annotated[str | None, typer.Argument(help="Only this service.")] = None,
    agent: AgentOpt = DEFAULT_AGENT,
    as_json: JsonOpt = False,
) -> None:
    """List service instances with their node, AZ, address and health."""
    names = [name] if name else list(_call(agent, "GET", "/v1/catalog/services").json())
    rows = _instance_rows(agent, names)
    if name and not rows:
        fail(f"no instances of service {name!r}")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} instance(s)", title_justify="left")
    for col in ("SERVICE", "INSTANCE", "NODE", "AZ", "ADDRESS", "TAGS", "HEALTH"):
        table.add_column(col, no_wrap=col != "TAGS")
    for r in rows:
        style = _HEALTH_STYLE.get(r["health"], "")
        table.add_row(
            r["service"],
            r["id"],
            r["node"],
            r["az"] or "-",
            f"{r['address']}:{r['port']}",
            ",".join(r["tags"]) or "-",
            f"[{style}]{r['health']}[/]",
        )
    console.print(table)


_STATE_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


@app.command()
def members(agent: AgentOpt = DEFAULT_AGENT, as_json: JsonOpt = False) -> None:
    """List the gossip members this agent knows, with their AZ and state."""
    rows = [
        {
            "name": m["Name"],
            "address": f"{m['Addr']}:{m['Port']}",
            "az": m["Tags"].get("az", ""),
            "status": m["State"],
            "incarnation": m["Incarnation"],
        }
        for m in _call(agent, "GET", "/v1/agent/members").json()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} member(s)", title_justify="left")
    for col in ("NAME", "ADDRESS", "AZ", "STATUS", "INCARNATION"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        style = _STATE_STYLE.get(r["status"], "")
        table.add_row(r["name"], r["address"], r["az"] or "-", f"[{style}]{r['status']}[/]",
                      str(r["incarnation"]))  # fmt: skip
    console.print(table)


@app.command()
def register(
    file: Annotated[Path, typer.Argument(help="A services.d style TOML file.")],
    agent: AgentOpt = DEFAULT_AGENT,
) -> None:
    """Register the service(s) defined in FILE with the agent."""
    from hostmesh.agent import service_to_consul

    for defn in load_service_file(file):
        _call(agent, "PUT", "/v1/agent/service/register", json=service_to_consul(defn))
        console.print(f"registered [bold]{defn.id}[/] ({defn.name})", highlight=False)


@app.command()
def deregister(
    instance_id: Annotated[str, typer.Argument(metavar="ID", help="Instance id.")],
    agent: AgentOpt = DEFAULT_AGENT,
) -> None:
    """Deregister a service instance from the agent."""
    _call(agent, "PUT", f"/v1/agent/service/deregister/{instance_id}")
    console.print(f"deregistered [bold]{instance_id}[/]", highlight=False)


def _check_command(verb: str) -> Callable[..., None]:
    def command(
        check_id: Annotated[str, typer.Argument(metavar="ID", help="TTL check id.")],
        note: Annotated[str, typer.Option(help="Output to record with the status.")] = "",
        agent: AgentOpt = DEFAULT_AGENT,
    ) -> None:
        _call(agent, "PUT", f"/v1/agent/check/{verb}/{check_id}", params={"note": note})
        console.print(f"check [bold]{check_id}[/]: {verb}", highlight=False)

    command.__doc__ = f"Mark a TTL check {verb}."
    return command


for _verb in ("pass", "warn", "fail"):
    check_app.command(_verb)(_check_command(_verb))


@keyring_app.command("list")
def keyring_list(agent: AgentOpt = DEFAULT_AGENT, as_json: JsonOpt = False) -> None:
    """The keys installed across the cluster and how many members hold each."""
    (entry,) = _call(agent, "GET", "/v1/operator/keyring").json()
    rows = [
        {"key": k, "members": n, "primary": entry["PrimaryKeys"].get(k, 0)}
        for k, n in sorted(entry["Keys"].items())
    ]
    if as_json:
        print(json.dumps({"members": entry["NumNodes"], "keys": rows}, indent=2))
        return
    table = Table(title=f"{entry['NumResp']} of {entry['NumNodes']} member(s) answered",
                  title_justify="left")  # fmt: skip
    for col in ("KEY", "INSTALLED ON", "PRIMARY ON"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(r["key"], str(r["members"]), str(r["primary"]))
    console.print(table)


def _keyring_command(verb: str, method: str, doc: str) -> Callable[..., None]:
    def command(
        key: Annotated[str, typer.Argument(help="A base64 AES-256 key.")],
        agent: AgentOpt = DEFAULT_AGENT,
    ) -> None:
        _call(agent, method, "/v1/operator/keyring", json={"Key": key},
              timeout=KEYRING_TIMEOUT)  # fmt: skip
        console.print(f"{verb}: done on every member", highlight=False)

    command.__doc__ = doc
    return command


keyring_app.command("install")(
    _keyring_command("install", "POST", "Install a key on every member (step 1).")
)
keyring_app.command("use")(
    _keyring_command("use", "PUT", "Make an installed key the primary everywhere (step 2).")
)
keyring_app.command("remove")(
    _keyring_command("remove", "DELETE", "Remove an old key from every member (step 3).")
)


def main() -> None:
    """Console-script entry point: a failure is one line and exit status 1."""
    try:
        app()
    except HostmeshError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

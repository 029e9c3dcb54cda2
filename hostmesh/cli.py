"""The ``hostmesh`` command line (typer + rich).

Commands are thin: daemons are started from here, everything else calls the
agent's HTTP API through httpx and prints a rich table for people or JSON
(``--json``) for scripts. A failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ._config import load_service_file
from ._errors import AgentUnreachableError, HostmeshError

if TYPE_CHECKING:
    import httpx  # imported by the commands that call an API, not by the daemons

    from .agent._intentions import Policy

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
    from ._entry import run_agent_command

    run_agent_command(config, log_level, log_format)


@app.command()
def server(
    config: Annotated[
        Path | None, typer.Option("-c", "--config", help="server.toml (default: built-in)")
    ] = None,
    log_level: LogLevelOpt = "info",
    log_format: LogFormatOpt = "text",
) -> None:
    """Run a server."""
    from ._entry import run_server_command

    run_server_command(config, log_level, log_format)


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
    from ._entry import _run_daemon, _setup_logs

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


# --- the server's management API: tokens, KV, routes and splits, the CA ------------------

DEFAULT_SERVER = "127.0.0.1:4150"

token_app = typer.Typer(help="Management and join tokens of the servers.", no_args_is_help=True)
app.add_typer(token_app, name="token")
kv_app = typer.Typer(help="The servers' key/value store (Consul's KV API).", no_args_is_help=True)
app.add_typer(kv_app, name="kv")
route_app = typer.Typer(
    help="Routes, splits, retries and limits per service ([traffic.<service>]).",
    no_args_is_help=True,
)
app.add_typer(route_app, name="route")
node_app = typer.Typer(help="Nodes of the mesh.", no_args_is_help=True)
app.add_typer(node_app, name="node")
ca_app = typer.Typer(help="The mesh's certificate authority.", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
intention_app = typer.Typer(
    help="Intentions: which service may call which (* = every source).", no_args_is_help=True
)
app.add_typer(intention_app, name="intention")

ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="HOSTMESH_SERVER", help="Server API (host:port or URL)."),
]
TokenOpt = Annotated[
    str,
    typer.Option(
        "--token", envvar="HOSTMESH_TOKEN", show_default=False,
        help="Management token (the server prints the first one at its first start).",
    ),
]  # fmt: skip
CaFileOpt = Annotated[
    str,
    typer.Option("--ca-file", envvar="HOSTMESH_CACERT", show_default=False,
                 help="PEM roots to verify the server's TLS certificate."),
]  # fmt: skip
CaPinOpt = Annotated[
    str,
    typer.Option("--ca-pin", envvar="HOSTMESH_CA_PIN", show_default=False,
                 help="sha256:<hex> pin of a CA root, instead of --ca-file."),
]  # fmt: skip
CasOpt = Annotated[
    int | None,
    typer.Option("--cas", help="Write only if the modify index is still this (0: create only)."),
]


@dataclass(frozen=True)
class _Server:
    """Where and how the CLI reaches a server's management API."""

    address: str
    token: str = ""
    ca_file: str = ""
    ca_pin: str = ""

    @property
    def url(self) -> str:
        if self.address.startswith(("http://", "https://")):
            return self.address.rstrip("/")
        return f"https://{self.address}"

    def _context(self) -> ssl.SSLContext | bool:
        """TLS trust: the roots file, or the roots the server sends that match the pin."""
        import httpx

        from ._pki import load_certificates

        if not self.url.startswith("https://"):
            return True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the identity is the URI SAN spiffe://<mesh>/server/...
        if self.ca_file:
            try:
                ctx.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise HostmeshError(f"--ca-file {self.ca_file}: {exc}") from None
            return ctx
        if not self.ca_pin:
            raise HostmeshError(
                "the server API is HTTPS: pass --ca-pin sha256:... (printed by the server at"
                " its first start, shown by `hostmesh certs`) or --ca-file, or set"
                " HOSTMESH_CA_PIN / HOSTMESH_CACERT"
            )
        from ._pki import spki_pin

        insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # the pin below decides, then a verified call
        try:
            with httpx.Client(verify=insecure, timeout=CLI_TIMEOUT) as client:
                roots_pem = client.get(self.url + "/v1/ca/roots").json()["roots_pem"]
            roots = load_certificates(roots_pem.encode())
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, TypeError,
                HostmeshError) as exc:  # fmt: skip
            raise AgentUnreachableError(
                f"cannot read the CA roots of {self.url}: {exc or type(exc).__name__}"
            ) from None
        if not any(spki_pin(r) == self.ca_pin.strip() for r in roots):
            raise HostmeshError(f"{self.url}: no CA root matches --ca-pin {self.ca_pin}")
        ctx.load_verify_locations(cadata=roots_pem)
        return ctx

    def call(
        self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any
    ) -> httpx.Response:
        """One API call; a non-2xx answer (other than ``ok``) is a one-line error."""
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            with httpx.Client(verify=self._context(), timeout=CLI_TIMEOUT) as client:
                response = client.request(method, self.url + path, headers=headers, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise AgentUnreachableError(
                f"cannot reach the server at {self.url}: {exc or type(exc).__name__}"
                " (set --server or HOSTMESH_SERVER)"
            ) from None
        if response.status_code >= 400 and response.status_code not in ok:
            reason = response.text.strip().splitlines()[0] if response.text.strip() else ""
            if response.headers.get("content-type", "").startswith("application/json"):
                with contextlib.suppress(ValueError, AttributeError):
                    reason = response.json().get("error", reason)
            if response.status_code == 401 and not self.token:
                reason += " (pass --token or set HOSTMESH_TOKEN)"
            raise HostmeshError(f"{method} {path}: {response.status_code} {reason}".rstrip())
        return response


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")  # a narrow terminal wraps, never cuts a pin
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


@token_app.command("create")
def token_create(
    kind: Annotated[str, typer.Option(help="join (for agents) or management.")] = "join",
    description: Annotated[str, typer.Option(help="For people.")] = "",
    ttl: Annotated[str, typer.Option(help="Expire after this (e.g. 24h); default never.")] = "",
    node_pattern: Annotated[
        str, typer.Option(help="Join tokens: node names it may join as (e.g. 'web-*').")
    ] = "*",
    secret_file: Annotated[
        Path | None, typer.Option(help="Use the secret in this file (e.g. a vaulted one).")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once."""
    body: dict[str, Any] = {"kind": kind, "description": description}
    if ttl:
        body["ttl"] = ttl
    if kind == "join":
        body["node_pattern"] = node_pattern
    if secret_file is not None:
        try:
            body["secret"] = secret_file.read_text().strip()
        except OSError as exc:
            fail(f"{secret_file}: {exc.strerror}")
    made = _Server(server, token, ca_file, ca_pin).call("POST", "/v1/tokens", json=body).json()
    if as_json:
        _print_json(made)
        return
    console.print(made["secret"], highlight=False, soft_wrap=True)
    pattern = f", nodes {made['node_pattern']}" if made["kind"] == "join" else ""
    expires = made["expires_at"] or "never"
    note = f"{made['kind']} token {made['accessor']}{pattern}, expires {expires}"
    err_console.print(f"{note} (the secret above is not shown again)", highlight=False,
                      soft_wrap=True)  # fmt: skip


@token_app.command("list")
def token_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """List tokens (never their secrets)."""
    tokens = _Server(server, token, ca_file, ca_pin).call("GET", "/v1/tokens").json()
    if as_json:
        _print_json(tokens)
        return
    rows = [[t["accessor"], t["kind"], t["node_pattern"] or "-", t["expires_at"] or "never",
             t["description"] or "-"] for t in tokens]  # fmt: skip
    _table(f"{len(tokens)} token(s)", ["ACCESSOR", "KIND", "NODES", "EXPIRES", "DESCRIPTION"],
           rows)  # fmt: skip


@token_app.command("revoke")
def token_revoke(
    accessor: Annotated[str, typer.Argument(help="The token's accessor id (token list).")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
) -> None:
    """Revoke a token: it stops working at once."""
    gone = _Server(server, token, ca_file, ca_pin).call("DELETE", f"/v1/tokens/{accessor}").json()
    console.print(
        f"revoked {gone['kind']} token [bold]{gone['accessor']}[/]", highlight=False, soft_wrap=True
    )


def _key_path(key: str) -> str:
    from urllib.parse import quote

    return quote(key.lstrip("/"), safe="/")


@kv_app.command("get")
def kv_get(
    key: Annotated[str, typer.Argument(help="The key.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Print a key's value (--json: with its indexes)."""
    conn = _Server(server, token, ca_file, ca_pin)
    response = conn.call("GET", f"/v1/kv/{_key_path(key)}", ok=(404,))
    if response.status_code == 404:
        fail(f"no key {key!r}")
    [entry] = response.json()
    value = base64.b64decode(entry["Value"]) if entry["Value"] else b""
    if as_json:
        _print_json({"key": entry["Key"], "value": value.decode("utf-8", "replace"),
                     "modify_index": entry["ModifyIndex"]})  # fmt: skip
        return
    sys.stdout.buffer.write(value + (b"" if value.endswith(b"\n") else b"\n"))


@kv_app.command("put")
def kv_put(
    key: Annotated[str, typer.Argument(help="The key.")],
    value: Annotated[str, typer.Argument(help="The value; @FILE reads a file, - stdin.")],
    cas: CasOpt = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
) -> None:
    """Write a key (with --cas only if nobody changed it since you read it)."""
    if value == "-":
        data = sys.stdin.buffer.read()
    elif value.startswith("@"):
        try:
            data = Path(value[1:]).read_bytes()
        except OSError as exc:
            fail(f"{value[1:]}: {exc.strerror}")
    else:
        data = value.encode()
    params = {"cas": str(cas)} if cas is not None else {}
    conn = _Server(server, token, ca_file, ca_pin)
    if conn.call("PUT", f"/v1/kv/{_key_path(key)}", content=data, params=params).json() is not True:
        fail(f"{key}: not written: --cas {cas} does not match (someone changed it; read it again)")
    console.print(f"put [bold]{key}[/]", highlight=False, soft_wrap=True)


@kv_app.command("delete")
def kv_delete(
    key: Annotated[str, typer.Argument(help="The key (or prefix with --recurse).")],
    recurse: Annotated[bool, typer.Option(help="Delete every key under this prefix.")] = False,
    cas: CasOpt = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
) -> None:
    """Delete a key or a prefix."""
    params = {"cas": str(cas)} if cas is not None else {}
    if recurse:
        params["recurse"] = ""
    conn = _Server(server, token, ca_file, ca_pin)
    if conn.call("DELETE", f"/v1/kv/{_key_path(key)}", params=params).json() is not True:
        fail(f"{key}: not deleted: --cas {cas} does not match")
    console.print(f"deleted [bold]{key}[/]", highlight=False, soft_wrap=True)


@kv_app.command("list")
def kv_list(
    prefix: Annotated[str, typer.Argument(help="Only keys under this prefix.")] = "",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """List keys with their modify index and size."""
    conn = _Server(server, token, ca_file, ca_pin)
    response = conn.call("GET", f"/v1/kv/{_key_path(prefix)}", params={"recurse": ""}, ok=(404,))
    entries = response.json() if response.status_code == 200 else []
    rows = [{"key": e["Key"], "modify_index": e["ModifyIndex"],
             "size": len(base64.b64decode(e["Value"])) if e["Value"] else 0}
            for e in entries]  # fmt: skip
    if as_json:
        _print_json(rows)
        return
    _table(f"{len(rows)} key(s)", ["KEY", "MODIFY INDEX", "BYTES"],
           [[r["key"], str(r["modify_index"]), str(r["size"])] for r in rows])  # fmt: skip


def _read_policy(file: Path, service: str) -> dict[str, Any]:
    """A [traffic.<service>] table from a TOML or JSON file: the table itself, or a file
    with ``[traffic.<service>]`` in it (an agent.toml excerpt)."""
    import tomllib

    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{file}: {getattr(exc, 'strerror', None) or exc}")
    try:
        doc = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        fail(f"{file}: not {'JSON' if file.suffix == '.json' else 'TOML'}: {exc}")
    if not isinstance(doc, dict):
        fail(f"{file}: expected a table")
    traffic = doc.get("traffic")
    if isinstance(traffic, dict) and set(doc) == {"traffic"}:
        if service not in traffic:
            fail(f"{file}: no [traffic.{service}] in it")
        policy = traffic[service]
        return policy if isinstance(policy, dict) else fail(f"{file}: traffic.{service}: a table")
    return doc


def _route_rows(service: str, policy: dict[str, Any]) -> list[list[str]]:
    rows = []
    for route in policy.get("routes", []) or [{"name": "default (built in)"}]:
        match = route.get("match", {})
        parts = [f"{k}={v}" for k, v in match.items() if v and k != "headers"]
        parts += [f"header {h['name']}" for h in match.get("headers", [])]
        targets = route.get("targets", [{}])
        split = " ".join(
            f"{t.get('version') or t.get('tag') or '*'}={t.get('weight', 1)}" for t in targets
        )
        rows.append([service, route.get("name", ""), " ".join(parts) or "*", split])
    return rows


@route_app.command("set")
def route_set(
    service: Annotated[str, typer.Argument(help="The service.")],
    file: Annotated[Path, typer.Argument(help="TOML or JSON: the [traffic.<service>] table.")],
    cas: CasOpt = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
) -> None:
    """Set a service's routes, splits, retries and limits (validated by the server)."""
    params = {"cas": str(cas)} if cas is not None else {}
    conn = _Server(server, token, ca_file, ca_pin)
    done = conn.call("PUT", f"/v1/config/traffic/{service}", json=_read_policy(file, service),
                     params=params).json()  # fmt: skip
    console.print(f"routes of [bold]{service}[/] set (modify index {done['modify_index']})",
                  highlight=False, soft_wrap=True)  # fmt: skip


@route_app.command("get")
def route_get(
    service: Annotated[str, typer.Argument(help="The service.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Show a service's traffic policy."""
    conn = _Server(server, token, ca_file, ca_pin)
    response = conn.call("GET", f"/v1/config/traffic/{service}", ok=(404,))
    if response.status_code == 404:
        fail(f"no routes set for {service!r} (it uses the default route)")
    doc = response.json()
    if as_json:
        _print_json(doc)
        return
    title = f"{service} (modify index {doc['modify_index']})"
    _table(title, ["SERVICE", "ROUTE", "MATCH", "SPLIT"],
           _route_rows(service, doc["policy"]))  # fmt: skip


@route_app.command("list")
def route_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """List the services that have a traffic policy, with their routes."""
    docs = _Server(server, token, ca_file, ca_pin).call("GET", "/v1/config/traffic").json()
    if as_json:
        _print_json(docs)
        return
    rows = [row for name, doc in docs.items() for row in _route_rows(name, doc["policy"])]
    _table(f"{len(docs)} service(s)", ["SERVICE", "ROUTE", "MATCH", "SPLIT"], rows)


@route_app.command("delete")
def route_delete(
    service: Annotated[str, typer.Argument(help="The service.")],
    cas: CasOpt = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
) -> None:
    """Delete a service's traffic policy (it goes back to the default route)."""
    params = {"cas": str(cas)} if cas is not None else {}
    _Server(server, token, ca_file, ca_pin).call("DELETE", f"/v1/config/traffic/{service}",
                                                 params=params)  # fmt: skip
    console.print(f"routes of [bold]{service}[/] deleted", highlight=False, soft_wrap=True)


@app.command()
def split(
    service: Annotated[str, typer.Argument(help="The service.")],
    weights: Annotated[
        list[str], typer.Argument(help="SUBSET=WEIGHT ... (v1=3 v2=1; tag:canary=1 for a tag).")
    ],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
) -> None:
    """Split a service's traffic by weight over versions (meta version) or tags.

    Sets the targets of the service's last route (its catch-all; a route named
    "default" is made when there is none) and keeps everything else. The write
    is compare-and-swap: if someone changed the policy meanwhile, nothing is written.
    """
    targets: list[dict[str, Any]] = []
    for item in weights:
        subset, sep, weight = item.rpartition("=")
        if not sep or not subset or not weight.isdigit():
            fail(f"{item!r}: expected SUBSET=WEIGHT, e.g. v1=3")
        if subset.startswith("tag:"):
            targets.append({"tag": subset[4:], "weight": int(weight)})
        else:
            targets.append({"version": subset, "weight": int(weight)})
    conn = _Server(server, token, ca_file, ca_pin)
    current = conn.call("GET", f"/v1/config/traffic/{service}", ok=(404,))
    if current.status_code == 404:
        policy: dict[str, Any] = {}
        cas = 0
    else:
        policy, cas = current.json()["policy"], current.json()["modify_index"]
    routes = list(policy.get("routes", []))
    if routes:
        routes[-1] = {**routes[-1], "targets": targets}
    else:
        routes = [{"name": "default", "targets": targets}]
    done = conn.call("PUT", f"/v1/config/traffic/{service}", json={**policy, "routes": routes},
                     params={"cas": str(cas)}).json()  # fmt: skip
    shares = " ".join(f"{t.get('version') or 'tag:' + t['tag']}={t['weight']}" for t in targets)
    console.print(f"[bold]{service}[/]: {shares} (modify index {done['modify_index']})",
                  highlight=False, soft_wrap=True)  # fmt: skip


# --- intentions -------------------------------------------------------------------

SrcArg = Annotated[str, typer.Argument(help="The calling service, or * for every service.")]
DstArg = Annotated[str, typer.Argument(help="The called service.")]


def _intention_path(source: str, destination: str) -> str:
    """The API path of a pair, checked first so that a bad name (``../db``) is our one-line
    error, not a URL httpx rewrites. The model's own name check, without importing the
    agent package (a third of a second per command); the server checks the rest."""
    from ._config import _check_name

    try:
        if source != "*":
            _check_name(source, "source")
        _check_name(destination, "destination")
    except ValueError as exc:
        fail(str(exc))
    return f"/v1/config/intentions/{source}/{destination}"


def _intention_match(rule: dict[str, Any]) -> str:
    http = rule.get("http") or {}
    parts = []
    if http.get("path_prefix"):
        parts.append(f"path {http['path_prefix']}")
    if http.get("methods"):
        parts.append("methods " + "|".join(http["methods"]))
    return ", ".join(parts) or "every request"


def _intention_write(action: str) -> Callable[..., None]:
    def command(
        source: SrcArg,
        destination: DstArg,
        path_prefix: Annotated[
            str, typer.Option("--path-prefix", help="Only HTTP requests under this path.")
        ] = "",
        method: Annotated[
            list[str] | None,
            typer.Option("--method", help="Only these HTTP methods (repeat the option)."),
        ] = None,
        description: Annotated[str, typer.Option(help="Why this rule exists.")] = "",
        cas: CasOpt = None,
        server: ServerOpt = DEFAULT_SERVER,
        token: TokenOpt = "",
        ca_file: CaFileOpt = "",
        ca_pin: CaPinOpt = "",
    ) -> None:
        path = _intention_path(source, destination)
        methods = [m.upper() for m in method or []]
        body = {"action": action, "description": description,
                "http": {"path_prefix": path_prefix, "methods": methods}}  # fmt: skip
        params = {"cas": str(cas)} if cas is not None else {}
        conn = _Server(server, token, ca_file, ca_pin)
        response = conn.call("PUT", path, json=body, params=params, ok=(409,))
        if response.status_code == 409:
            fail(f"{source} -> {destination}: {response.json()['error']}")
        match = _intention_match(body)
        console.print(f"[bold]{source} -> {destination}[/] {action} ({match})",
                      highlight=False, soft_wrap=True)  # fmt: skip

    command.__doc__ = f"{action.capitalize()} SRC to call DST (optionally only some HTTP requests)."
    return command


intention_app.command("allow")(_intention_write("allow"))
intention_app.command("deny")(_intention_write("deny"))


@intention_app.command("delete")
def intention_delete(
    source: SrcArg,
    destination: DstArg,
    cas: CasOpt = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
) -> None:
    """Delete the intention of a pair (its requests fall to less specific rules)."""
    path = _intention_path(source, destination)
    params = {"cas": str(cas)} if cas is not None else {}
    response = _Server(server, token, ca_file, ca_pin).call("DELETE", path, params=params,
                                                            ok=(404, 409))  # fmt: skip
    if response.status_code == 404:
        fail(f"no intention {source} -> {destination}")
    if response.status_code == 409:
        fail(f"{source} -> {destination}: {response.json()['error']}")
    console.print(f"intention [bold]{source} -> {destination}[/] deleted",
                  highlight=False, soft_wrap=True)  # fmt: skip


def _fetch_intentions(conn: _Server) -> tuple[list[dict[str, Any]], Policy]:
    """The stored intentions and the server's default policy ([intentions] default)."""
    response = conn.call("GET", "/v1/config/intentions")
    # server/_api.py INTENTIONS_DEFAULT_HEADER (not imported: the server pulls in trio)
    default = response.headers.get("x-hostmesh-intentions-default", "")
    if default not in ("allow", "deny"):
        raise HostmeshError(
            f"{conn.url} did not say its default policy ([intentions] default): got {default!r}"
        )
    items = response.json()
    if not isinstance(items, list):
        raise HostmeshError(f"{conn.url}: GET /v1/config/intentions did not answer a list")
    return items, "allow" if default == "allow" else "deny"


@intention_app.command("list")
def intention_list(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """List the intentions, most specific first, and the default policy."""
    from .agent._intentions import Intentions

    items, default = _fetch_intentions(_Server(server, token, ca_file, ca_pin))
    rules = Intentions.from_json(items, default).rules
    if as_json:
        _print_json({"default": default, "intentions": [r.to_json() for r in rules]})
        return
    rows = [[r.source, r.destination, r.action, _intention_match(r.to_json()), r.description]
            for r in rules]  # fmt: skip
    _table(f"{len(rows)} intention(s), default policy: {default}",
           ["SOURCE", "DESTINATION", "ACTION", "MATCH", "DESCRIPTION"], rows)  # fmt: skip


@intention_app.command("check")
def intention_check(
    source: SrcArg,
    destination: DstArg,
    method: Annotated[str, typer.Option("--method", help="The HTTP request's method.")] = "",
    path: Annotated[str, typer.Option("--path", help="The HTTP request's path.")] = "",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """May SRC call DST? Prints the decision and the rule that made it (exit 0 either way)."""
    from .agent._intentions import Intentions

    if source == "*":
        fail("check needs a concrete source service, not *")
    _intention_path(source, destination)
    if path and not path.startswith("/"):
        fail(f"--path {path!r} must start with '/'")
    items, default = _fetch_intentions(_Server(server, token, ca_file, ca_pin))
    decision = Intentions.from_json(items, default).decide(
        source, destination, method.upper() or None, path or None
    )
    if as_json:
        _print_json({"source": source, "destination": destination, "method": method.upper()
                     or None, "path": path or None, **decision.to_json()})  # fmt: skip
        return
    verdict = "[bold green]ALLOWED[/]" if decision.allowed else "[bold red]DENIED[/]"
    console.print(f"{verdict} {source} -> {destination}", highlight=False, soft_wrap=True)
    console.print(decision.reason, highlight=False, soft_wrap=True, markup=False)


@node_app.command("revoke")
def node_revoke(
    node: Annotated[str, typer.Argument(help="The node name.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Revoke every certificate of NODE; the revocation list reaches every agent."""
    done = _Server(server, token, ca_file, ca_pin).call("POST", f"/v1/node/{node}/revoke").json()
    if as_json:
        _print_json(done)
        return
    what = f"{len(done['revoked'])} certificate(s) of [bold]{node}[/]"
    console.print(f"revoked {what} (revocation list revision {done['revision']})",
                  highlight=False, soft_wrap=True)  # fmt: skip


@app.command("force-leave")
def force_leave(
    node: Annotated[str, typer.Argument(help="The node name.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Mark NODE left and remove it from the catalog now (a node that will not come back)."""
    conn = _Server(server, token, ca_file, ca_pin)
    done = conn.call("PUT", f"/v1/agent/force-leave/{node}").json()
    if as_json:
        _print_json(done)
        return
    console.print(f"[bold]{node}[/] left: removed from the catalog", highlight=False,
                  soft_wrap=True)  # fmt: skip


@ca_app.command("rotate")
def ca_rotate(
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Make a new root, cross-signed by the current one; agents keep trusting both."""
    done = _Server(server, token, ca_file, ca_pin).call("POST", "/v1/ca/rotate").json()
    if as_json:
        _print_json(done)
        return
    console.print(f"new root [bold]{done['pin']}[/]; the old one stays trusted until"
                  f" {done['overlap_ends']}", highlight=False, soft_wrap=True)  # fmt: skip


def _cert_row(cert: Any, now: datetime) -> dict[str, str]:
    left = cert.not_valid_after_utc - now
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "expires_in": (
            f"{left.days}d {left.seconds // 3600}h" if left.total_seconds() > 0 else "EXPIRED"
        ),
    }


@app.command()
def certs(
    data_dir: Annotated[
        Path, typer.Option(envvar="HOSTMESH_DATA_DIR", help="The agent's data_dir.")
    ] = Path("/var/lib/hostmesh"),
    server: Annotated[
        str,
        typer.Option(
            "--server",
            envvar="HOSTMESH_SERVER",
            show_default=False,
            help="Also show this server's roots (and their pins for ca_pin).",
        ),
    ] = "",
    ca_file: CaFileOpt = "",
    ca_pin: CaPinOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Show this node's certificate, its expiry and renewal time, and the CA roots."""
    from ._pki import load_certificates, node_identity, renew_at, spki_pin

    now = datetime.now(UTC)
    out: dict[str, Any] = {"node": None, "roots": [], "server_roots": None}
    folder = data_dir / "certs"  # hostmesh.agent._certs.CERTS_DIR
    try:
        chain = load_certificates((folder / "node.pem").read_bytes())
        leaf = chain[0]
        out["node"] = {
            "identity": str(node_identity(leaf)),
            **_cert_row(leaf, now),
            "renew_at": renew_at(leaf).isoformat(),
            "chain_length": len(chain),
        }
        out["roots"] = [
            {"pin": spki_pin(r), **_cert_row(r, now)}
            for r in load_certificates((folder / "roots.pem").read_bytes())
        ]
    except FileNotFoundError:
        if not server:
            fail(f"no node certificate in {folder} (has the agent joined? --data-dir?)")
    if server:
        doc = _Server(server, "", ca_file, ca_pin).call("GET", "/v1/ca/roots").json()
        out["server_roots"] = [
            {"pin": r["pin"], "subject": r["subject"], "not_after": r["not_after"],
             "active": r["active"]} for r in doc["roots"]]  # fmt: skip
    if as_json:
        _print_json(out)
        return
    if out["node"]:
        n = out["node"]
        row = [n["identity"], n["serial"], n["not_after"], n["expires_in"], n["renew_at"]]
        _table(f"node certificate ({folder})",
               ["IDENTITY", "SERIAL", "EXPIRES", "IN", "RENEW AT"], [row])  # fmt: skip
        _table("trusted roots", ["PIN", "SUBJECT", "EXPIRES"],
               [[r["pin"], r["subject"], r["not_after"]] for r in out["roots"]])  # fmt: skip
    if out["server_roots"] is not None:
        _table(f"roots of {server}", ["PIN", "SUBJECT", "EXPIRES", "ACTIVE"],
               [[r["pin"], r["subject"], r["not_after"], "yes" if r["active"] else "-"]
                for r in out["server_roots"]])  # fmt: skip


def main() -> None:
    """Console-script entry point: a failure is one line and exit status 1."""
    try:
        app()
    except typer.Exit as exc:  # fail() outside typer's own handling (daemon commands)
        sys.exit(exc.exit_code)
    except HostmeshError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

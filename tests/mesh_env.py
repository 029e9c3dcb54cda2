"""A mesh of real processes: one ``hostmesh server``, N ``hostmesh agent``s, HTTP
backends and clients, each process under an optional command prefix (e.g.
``["ip", "netns", "exec", ns]``), so the same harness runs loopback tests and
network-namespace tests.

- :class:`Mesh` starts and owns every process (each in its own session; stopped by
  process group in :meth:`Mesh.close`, which the :func:`mesh` context manager calls
  on any exit) and keeps their logs in its directory. :meth:`Mesh.logs` is what a
  failing assertion should print.
- :meth:`Mesh.server` writes server.toml, starts the server and reads the management
  token and CA pin it prints; :meth:`ServerProc.cli` runs the CLI against it.
- :meth:`Mesh.agent` writes agent.toml (joining the server with a fresh join token,
  trusting it by its pin) and services.d, starts the agent and waits until it listens;
  :meth:`AgentProc.api` calls its local API from inside its prefix (curl).
- :meth:`Mesh.backend` starts a process with real HTTP backends
  (:class:`http_backend.Backend`, whose body names the instance that answered).

Run as a script, this file is the other half of those processes (it runs where the
prefix puts it, e.g. inside a namespace or as another Unix user):

- ``backend NAME HOST PORT [PORT...]``: a Backend per port, named ``NAME`` (``NAME:PORT``
  with several ports); prints ``listening HOST:PORT`` per port;
- ``fetch URL SERVICE N [--concurrency C]``: N GETs with ``Host: SERVICE``; prints
  JSON counts by answering backend, by status and by ``hostmesh-error``;
- ``load URL SERVICE SECONDS [--concurrency C]``: a closed loop for that long; prints
  JSON counts per 0.5 s bucket (wall-clock start times) and per backend;
- ``probe HOST PORT``: sends a plain HTTP/1.1 request, prints JSON with what came back
  and whether the connection was closed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
HOSTMESH = str(Path(sys.executable).with_name("hostmesh"))
#: s for a daemon to log that it listens (a server makes its CA; an agent binds).
START_TIMEOUT = 20.0
#: s for a stopped process to exit before it is killed (agents drain for 1 s here).
STOP_TIMEOUT = 10.0
#: s for one API call or short CLI run.
CALL_TIMEOUT = 30.0
#: Lines of each log shown by :meth:`Mesh.logs`.
LOG_TAIL = 40
#: Width of a ``load`` bucket, s.
BUCKET = 0.5


def wait_until(check: Callable[[], bool], within: float, what: str, *,
               on_fail: Callable[[], str] = lambda: "") -> float:  # fmt: skip
    """Poll ``check`` every 0.1 s; returns the seconds it took.

    Raises:
        AssertionError: naming ``what`` (plus ``on_fail()``), when not true ``within`` s.
    """
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not true within {within} s\n{on_fail()}")
        time.sleep(0.1)
    return time.monotonic() - start


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log records in ``path`` (other lines are skipped)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


@dataclass
class Proc:
    """A process the mesh started; stdout and stderr both go to ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = LOG_TAIL) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def records(self) -> list[dict[str, Any]]:
        return json_lines(self.log)

    def wait_record(self, msg: str, within: float = START_TIMEOUT) -> dict[str, Any]:
        """The first JSON log record with this ``msg``; fails if the process exits without
        logging it."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            alive = self.alive()  # before reading: a record written before exiting counts
            found.extend(r for r in self.records() if r.get("msg") == msg)
            if not found and not alive:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode} before"
                                     f" logging {msg!r}:\n{self.tail()}")  # fmt: skip
            return bool(found)

        wait_until(seen, within, f"{self.name} logs {msg!r}", on_fail=self.tail)
        return found[0]

    def wait_line(self, pattern: str, within: float = START_TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` (re.MULTILINE) in the log; fails if the process
        exits without printing it."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            alive = self.alive()
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            found.extend(m for m in [re.search(pattern, text, re.MULTILINE)] if m)
            if not found and not alive:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode} before"
                                     f" printing {pattern!r}:\n{self.tail()}")  # fmt: skip
            return bool(found)

        wait_until(seen, within, f"{self.name} prints {pattern!r}", on_fail=self.tail)
        return found[0]


@dataclass
class ServerProc:
    proc: Proc
    address: str  # host:port of the server API (and agent sync)
    token: str  # the management token it printed
    pin: str  # its CA pin, sha256:...
    prefix: list[str]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "HOSTMESH_SERVER": self.address, "HOSTMESH_TOKEN": self.token,
                "HOSTMESH_CA_PIN": self.pin, "HOSTMESH_CACERT": "", "COLUMNS": "200"}  # fmt: skip

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``hostmesh ARGS`` against this server, run inside its prefix."""
        return subprocess.run([*self.prefix, HOSTMESH, *args], capture_output=True, text=True,
                              timeout=CALL_TIMEOUT, env=self.env)  # fmt: skip

    def cli_ok(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, f"hostmesh {shlex.join(args)}: {done.stderr}{done.stdout}"
        return done.stdout


@dataclass
class AgentProc:
    proc: Proc
    name: str
    address: str  # the node address
    directory: Path  # agent.toml, services.d, data
    prefix: list[str]
    api_address: str  # host:port, as the agent logged it
    proxy_address: str

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.proxy_address}/"

    def run(self, *argv: str, timeout: float = CALL_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """A command on this agent's host (inside its prefix)."""
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    def api(self, method: str, path: str) -> tuple[int, str]:
        """One call to the agent's local API: (status, body); status 0 if it did not answer."""
        done = self.run("curl", "-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}",
                        f"http://{self.api_address}{path}")  # fmt: skip
        body, _, status = done.stdout.rpartition("\n")
        return (int(status) if status.isdigit() else 0), body

    def api_json(self, method: str, path: str) -> Any:
        status, body = self.api(method, path)
        assert status == 200, f"{self.name} {method} {path}: {status} {body}\n{self.proc.tail()}"
        return json.loads(body)

    def catalog_services(self) -> dict[str, list[str]]:
        status, body = self.api("GET", "/v1/catalog/services")
        return json.loads(body) if status == 200 else {}

    def catalog_nodes(self) -> set[str]:
        status, body = self.api("GET", "/v1/catalog/nodes")
        return {n["Node"] for n in json.loads(body)} if status == 200 else set()

    def passing(self, service: str) -> dict[str, int]:
        """Passing instances of ``service`` this agent knows, counted by node."""
        status, body = self.api("GET", f"/v1/health/service/{service}?passing")
        if status != 200:
            return {}
        return dict(Counter(entry["Node"]["Node"] for entry in json.loads(body)))

    def client_argv(self, *args: str, user: str = "") -> list[str]:
        """The command line of this file's ``fetch``/``load``/``probe`` on this agent's
        host, as ``user`` (a Unix user name; "" = as we are)."""
        as_user: list[str] = []
        if user:
            import pwd

            entry = pwd.getpwnam(user)
            as_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                       "--clear-groups"]  # fmt: skip
        return [*self.prefix, *as_user, PYTHON, str(HERE / "mesh_env.py"), *args]

    def client(self, *args: str, user: str = "", timeout: float = 60) -> dict[str, Any]:
        """Run :meth:`client_argv` to its end; the JSON it prints."""
        done = subprocess.run(self.client_argv(*args, user=user), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        assert done.returncode == 0, f"client {args} on {self.name}: {done.stderr}"
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def fetch(self, service: str, n: int, *, user: str = "", concurrency: int = 4,
              path: str = "/") -> dict[str, Any]:  # fmt: skip
        url = f"http://{self.proxy_address}{path}"
        return self.client("fetch", url, service, str(n), "--concurrency", str(concurrency),
                           user=user)  # fmt: skip

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the agent's /metrics samples of ``name`` with these labels."""
        status, body = self.api("GET", "/metrics")
        assert status == 200, body
        total = 0.0
        for line in body.splitlines():
            sample, _, value = line.rpartition(" ")
            metric, _, rest = sample.partition("{")
            found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            if metric == name and all(found.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total

    def wait_answering(self, service: str, n: int = 10, within: float = 10.0) -> None:
        """Until ``n`` requests through the proxy to ``service`` all answer 200."""
        last: list[dict[str, Any]] = []

        def answering() -> bool:
            last[:] = [self.fetch(service, n)]
            return bool(last[0]["statuses"] == {"200": n})

        wait_until(answering, within, f"{service} answers through {self.name}'s proxy",
                   on_fail=lambda: f"last: {last}\n{self.proc.tail()}")  # fmt: skip


@dataclass
class BackendProc:
    proc: Proc
    addresses: list[str]  # host:port per backend, in the order asked

    @property
    def ports(self) -> list[int]:
        return [int(a.rpartition(":")[2]) for a in self.addresses]


def service_toml(name: str, port: int, *, id: str = "", tags: Sequence[str] = (),
                 meta: Mapping[str, str] | None = None, user: str = "") -> str:  # fmt: skip
    """A services.d file for one instance (no checks: passing while its node lives)."""
    lines = [f'name = "{name}"', f'id = "{id or name}"', f"port = {port}"]
    if tags:
        lines.append("tags = [" + ", ".join(f'"{t}"' for t in tags) + "]")
    if user:
        lines.append(f'user = "{user}"')
    if meta:
        lines.append("meta = { " + ", ".join(f'{k} = "{v}"' for k, v in meta.items()) + " }")
    return "\n".join(lines) + "\n"


@dataclass
class Mesh:
    """Every process of one test; :meth:`close` stops them all (see the module doc)."""

    root: Path
    procs: list[Proc] = field(default_factory=list)
    server_proc: ServerProc | None = None
    agents: dict[str, AgentProc] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], prefix: Sequence[str] = ()) -> Proc:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen([*prefix, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        proc = Proc(name, popen, log, [*prefix, *argv])
        self.procs.append(proc)
        return proc

    def server(self, bind: str = "127.0.0.1:0", *, prefix: Sequence[str] = (),
               extra_toml: str = "") -> ServerProc:  # fmt: skip
        """Start ``hostmesh server`` (SQLite store); returns once it serves."""
        d = self.root / "server"
        d.mkdir(parents=True)
        (d / "server.toml").write_text(f'bind = "{bind}"\ndata_dir = "{d / "data"}"\n{extra_toml}')
        proc = self.start("server", [HOSTMESH, "server", "-c", str(d / "server.toml"),
                                     "--log-format", "json"], prefix)  # fmt: skip
        started = proc.wait_record("server started")
        printed = proc.wait_line(r"management token.*\n\s+(\S+)\n.*\n\s+(sha256:[0-9a-f]{64})$")
        self.server_proc = ServerProc(proc, started["api"], printed.group(1), printed.group(2),
                                      list(prefix))  # fmt: skip
        return self.server_proc

    def backend(self, name: str, host: str, ports: Sequence[int] = (0,), *,
                prefix: Sequence[str] = ()) -> BackendProc:  # fmt: skip
        """A process serving a :class:`http_backend.Backend` on each port (0 = any)."""
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        proc = self.start(f"backend-{tag}", [PYTHON, str(HERE / "mesh_env.py"), "backend", name,
                                             host, *map(str, ports)], prefix)  # fmt: skip

        def listening() -> bool:
            text = proc.log.read_text() if proc.log.exists() else ""
            return text.count("listening ") >= len(ports) or not proc.alive()

        wait_until(listening, START_TIMEOUT, f"backend {name} listens", on_fail=proc.tail)
        assert proc.alive(), proc.tail()
        addresses = re.findall(r"^listening (\S+)$", proc.log.read_text(), re.MULTILINE)
        return BackendProc(proc, addresses)

    def agent(
        self,
        name: str,
        address: str,
        az: str,
        *,
        services: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        ports: str = "default",
        inbound: str | None = None,
        seeds: Sequence[str] = (),
        extra_toml: str = "",
        wait: bool = True,
    ) -> AgentProc:
        """Start ``hostmesh agent`` as node ``name`` joined to the mesh's server.

        Args:
            services: services.d file name (without .toml) -> its TOML (:func:`service_toml`).
            ports: ``"default"``: every listener on its default port (the API, proxy
                and DNS on 127.0.0.1, as in a namespace); ``"any"``: each on
                ``address`` port 0 (many agents on one loopback).
            inbound: the ``[inbound] bind`` value; None leaves the section out (default).
            wait: return once the agent has logged "agent started" (else at once; call
                :meth:`wait_agent`).
        """
        assert self.server_proc is not None, "start the server first"
        d = self.root / name
        (d / "services.d").mkdir(parents=True)
        for file, text in (services or {}).items():
            (d / "services.d" / f"{file}.toml").write_text(text)
        (d / "join-token").write_text(self.server_proc.cli_ok("token", "create").strip() + "\n")
        if ports == "any":
            binds = {"api": f"{address}:0", "proxy": f"{address}:0", "dns": f"{address}:0",
                     "gossip": f"{address}:0"}  # fmt: skip
        else:
            binds = {"api": "127.0.0.1:4191", "proxy": "127.0.0.1:4140",
                     "dns": "127.0.0.1:8600", "gossip": f"{address}:7946"}  # fmt: skip
        inbound_toml = f'[inbound]\nbind = "{inbound}"\n' if inbound is not None else ""
        (d / "agent.toml").write_text(
            f'node_name = "{name}"\naddress = "{address}"\naz = "{az}"\n'
            f'region = "{az[:-1]}"\ndata_dir = "{d / "data"}"\n'
            f'services_dir = "{d / "services.d"}"\nservers = ["{self.server_proc.address}"]\n'
            f'[server]\nca_pin = "{self.server_proc.pin}"\n'
            f'join_token_file = "{d / "join-token"}"\n'
            f'[api]\nbind = "{binds["api"]}"\n'
            f'[dns]\nbind = "{binds["dns"]}"\nresolv_conf = ""\n'
            # A stopping agent drains for 1 s, not 15: cleanup stays quick.
            f'[proxy]\nbind = "{binds["proxy"]}"\ndrain_timeout = "1s"\n'
            f'[gossip]\nprofile = "local"\nbind = "{binds["gossip"]}"\n'
            f"seeds = {json.dumps(list(seeds))}\n"
            f"{inbound_toml}{extra_toml}"
        )
        proc = self.start(f"agent-{name}", [HOSTMESH, "agent", "-c", str(d / "agent.toml"),
                                            "--log-format", "json"], prefix)  # fmt: skip
        agent = AgentProc(proc, name, address, d, list(prefix), "", "")
        self.agents[name] = agent
        if wait:
            self.wait_agent(agent)
        return agent

    def wait_agent(self, agent: AgentProc) -> None:
        started = agent.proc.wait_record("agent started")
        agent.api_address, agent.proxy_address = started["api"], started["proxy"]

    def wait_synced(self, within: float = 20.0) -> None:
        """Until every agent has its certificate and its catalog holds every agent."""
        everyone = set(self.agents)
        for agent in self.agents.values():
            agent.proc.wait_record("joined: node certificate issued", within)
        wait_until(lambda: all(a.catalog_nodes() >= everyone for a in self.agents.values()),
                   within, f"every agent's catalog holds {sorted(everyone)}",
                   on_fail=self.logs)  # fmt: skip

    def logs(self) -> str:
        """The tail of every process's log, for an assertion message."""
        return "\n".join(f"--- {p.name} ({'running' if p.alive() else p.popen.returncode}):\n"
                         f"{p.tail()}" for p in self.procs)  # fmt: skip

    def close(self) -> None:
        """SIGTERM every process group, then SIGKILL what is left after STOP_TIMEOUT."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()


@contextlib.contextmanager
def mesh(root: Path) -> Iterator[Mesh]:
    """A :class:`Mesh` in ``root``; every process is stopped when the block ends."""
    m = Mesh(root)
    try:
        yield m
    finally:
        m.close()


# --- wrk ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    socket_errors: dict[str, int]  # connect, read, write, timeout
    non_2xx_3xx: int
    text: str

    @property
    def failed(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    """wrk's summary: ``N requests in ...``, ``Socket errors: connect a, read b, write c,
    timeout d`` and ``Non-2xx or 3xx responses: n`` (the last two only when not zero).

    Raises:
        AssertionError: no request count in ``text``.
    """
    match = re.search(r"^\s*(\d+) requests in ", text, re.MULTILINE)
    assert match, f"no request count in wrk's output:\n{text}"
    errors = {}
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      text)  # fmt: skip
    if found:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, found.groups()),
                          strict=True))  # fmt: skip
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(int(match.group(1)), errors, int(non.group(1)) if non else 0, text)


# --- the processes' side (run as a script) ----------------------------------------------


def _serve_backends(name: str, host: str, ports: list[int]) -> None:
    import trio
    from http_backend import Backend

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for port in ports:
                backend = Backend(name, host)
                backend.port = port
                bound = await nursery.start(backend.serve)
                if len(ports) > 1:
                    backend.name = f"{name}:{bound}"  # read per answer
                print(f"listening {host}:{bound}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main)


def _client(url: str, service: str, concurrency: int, run: Callable[[Any], bool]) -> None:
    """``concurrency`` threads, each with its own keep-alive connection, call ``run(client)``
    until it returns False."""
    import httpx

    def worker() -> None:
        with httpx.Client(base_url=url, headers={"Host": service}, timeout=10) as client:
            while run(client):
                pass

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _one(client: Any) -> tuple[str, str, str]:
    """One GET: (backend or "", status or "error:<Exception>", hostmesh-error or "")."""
    import httpx

    try:
        response = client.get("")
    except httpx.HTTPError as exc:
        return "", f"error:{type(exc).__name__}", ""
    backend = response.headers.get("x-backend", "") if response.status_code == 200 else ""
    return backend, str(response.status_code), response.headers.get("hostmesh-error", "")


def _fetch(url: str, service: str, n: int, concurrency: int) -> dict[str, Any]:
    backends: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    left = [n]
    lock = threading.Lock()

    def run(client: Any) -> bool:
        with lock:
            if left[0] <= 0:
                return False
            left[0] -= 1
        backend, status, error = _one(client)
        with lock:
            backends[backend] += bool(backend)
            statuses[status] += 1
            errors[error] += bool(error)
        return True

    _client(url, service, concurrency, run)
    return {"backends": {k: v for k, v in backends.items() if v}, "statuses": dict(statuses),
            "errors": {k: v for k, v in errors.items() if v}}  # fmt: skip


def _load(url: str, service: str, seconds: float, concurrency: int) -> dict[str, Any]:
    start = time.time()
    end = time.monotonic() + seconds
    buckets: dict[int, Counter[str]] = {}
    backends: dict[int, Counter[str]] = {}
    failures: list[dict[str, Any]] = []
    lock = threading.Lock()

    def run(client: Any) -> bool:
        if time.monotonic() >= end:
            return False
        sent = time.time()
        backend, status, error = _one(client)
        slot = int((sent - start) / BUCKET)
        with lock:
            buckets.setdefault(slot, Counter())["ok" if status == "200" else "failed"] += 1
            if backend:
                backends.setdefault(slot, Counter())[backend] += 1
            if status != "200" and len(failures) < 50:
                failures.append({"t": sent, "status": status, "error": error})
        return True

    _client(url, service, concurrency, run)
    return {"start": start, "bucket": BUCKET,
            "buckets": {k: dict(v) for k, v in sorted(buckets.items())},
            "backends": {k: dict(v) for k, v in sorted(backends.items())},
            "failures": failures}  # fmt: skip


def _probe(host: str, port: int) -> dict[str, Any]:
    """A plaintext request to host:port: the bytes that came back and how it ended."""
    reply = b""
    ended = "timeout"
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: udvr\r\nConnection: close\r\n\r\n")
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    ended = "closed"
                    break
                reply += chunk
        except ConnectionResetError:
            ended = "reset"
        except TimeoutError:
            ended = "timeout"
    return {"reply_hex": reply.hex(), "ended": ended}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mesh_env.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backend")
    p.add_argument("name")
    p.add_argument("host")
    p.add_argument("ports", nargs="+", type=int)
    for command in ("fetch", "load"):
        p = sub.add_parser(command)
        p.add_argument("url")
        p.add_argument("service")
        p.add_argument("amount", type=float)  # requests (fetch) or seconds (load)
        p.add_argument("--concurrency", type=int, default=4)
    p = sub.add_parser("probe")
    p.add_argument("host")
    p.add_argument("port", type=int)
    args = parser.parse_args(argv)
    if args.command == "backend":
        _serve_backends(args.name, args.host, args.ports)
    elif args.command == "fetch":
        print(json.dumps(_fetch(args.url, args.service, int(args.amount), args.concurrency)))
    elif args.command == "load":
        print(json.dumps(_load(args.url, args.service, args.amount, args.concurrency)))
    else:
        print(json.dumps(_probe(args.host, args.port)))


if __name__ == "__main__":
    main()

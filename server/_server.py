"""The server daemon (minimal for now): the embedded store behind an HTTP API.

It serves ``/ready``, ``/v1/status/leader`` and Consul's KV API
(``/v1/kv/<key>`` with ``?recurse``, ``?keys``, ``?raw`` and ``?cas=``). The
server issue adds agent sync, the CA, config and leader duties.
"""

from __future__ import annotations

import base64
import functools
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from hostmesh._config import ServerConfig, parse_hostport
from hostmesh._errors import StoreError, StoreUnavailable, StoreValueError
from hostmesh._httpserver import HttpLimits, Request, Response
from hostmesh._log import get_logger
from hostmesh._metrics import CONTENT_TYPE, Registry
from hostmesh._pki import spki_pin
from hostmesh._systemd import notifier
from hostmesh.agent._intentions import INTENTIONS_DEFAULT_KEY

from ._api import ManagementApi
from ._ca import CertificateAuthority
from ._ca_store import CaKeeper, issue_server_certificate, open_ca
from ._external import ExternalChecks
from ._health import NodeHealth
from ._leader import LeaderElection
from ._listener import ServerTls, listener_context, serve_tls, server_name
from ._store import MAX_VALUE, Entry, Store, open_store
from ._sync import SyncHub
from ._tokens import MANAGEMENT_TOKEN_FILE, TokenStore

__all__ = ["Server"]

log = get_logger("hostmesh.server")

KV_PREFIX = "kv/"


def _kv_json(entry: Entry) -> dict[str, Any]:
    return {
        "Key": entry.key.removeprefix(KV_PREFIX),
        "Value": base64.b64encode(entry.value).decode() if entry.value else None,
        "Flags": 0,
        "LockIndex": 0,
        "CreateIndex": entry.create_revision,
        "ModifyIndex": entry.mod_revision,
    }


class Server:
    """One server process. The caller owns it; :meth:`run` closes the store on exit.

    The store is the one ``config.store`` names (SQLite in the data dir by
    default), or ``store`` when given; either way the server owns it.
    """

    def __init__(
        self, config: ServerConfig, *, store: Store | None = None, print_token: bool = True
    ) -> None:
        self.config = config
        Path(config.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        if store is None:
            store = open_store(config.store, config.data_dir)
        self.store: Store = store
        self.address: tuple[str, int] | None = None
        self.metrics = Registry()
        self.tokens = TokenStore(self.store)  # API tokens (hashed in the store)
        self.ca_keeper: CaKeeper | None = None  # set by start(): the CA and its persistence
        self.api: ManagementApi | None = None
        # The first start's management token goes to stdout once (never to the log);
        # dev mode prints it itself.
        self.print_token = print_token
        self.management_token: str | None = None  # set when this start created it
        self.sync = SyncHub(self.store, metrics=self.metrics)  # agents' /v1/sync websockets
        # The leader's checks of external services, published through the sync merge.
        self.external = ExternalChecks(self.store, self.sync.merge_record, metrics=self.metrics)
        self.tls: ServerTls | None = None  # the listener's certificate, renewed by run()
        # Singleton duties run only while self.leader.is_leader (run_while_leader):
        # with SQLite this is the one server; with etcd, whoever holds the lease.
        self.leader = LeaderElection(self.store, single=config.store.backend != "etcd",
                                     name=server_name(), metrics=self.metrics)  # fmt: skip
        self.health = NodeHealth(self.store, config.health, server=server_name(),
                                 metrics=self.metrics)  # fmt: skip

    @property
    def ca(self) -> CertificateAuthority:
        """The CA (roots, verify, revocations); changes go through ``ca_keeper.update``."""
        if self.ca_keeper is None:
            raise RuntimeError("the server has not started: no CA loaded yet")
        return self.ca_keeper.ca

    @property
    def management_token_file(self) -> Path:
        return Path(self.config.data_dir) / MANAGEMENT_TOKEN_FILE

    async def start(self) -> None:
        """Load or make the CA and the first management token (before listening).

        Raises:
            ConfigError, CaStateError, StoreError: the server cannot start.
        """
        self.ca_keeper = await open_ca(self.store, self.config, self.config.data_dir)
        self.management_token = await self.tokens.bootstrap(self.config.data_dir)
        pin = spki_pin(self.ca.active.cert)  # public: agents' [server] ca_pin, the CLI's --ca-pin
        log.info("CA loaded", mesh=self.ca.mesh, ca_pin=pin, roots=len(self.ca.roots))
        if self.management_token is not None and self.print_token:
            print(
                f"hostmesh server: management token (shown once; also in"
                f" {self.management_token_file}, mode 0600):\n  {self.management_token}\n"
                f"CA pin (agent.toml [server] ca_pin, HOSTMESH_CA_PIN):\n  {pin}",
                flush=True,
            )
        await self._publish_intentions_default()
        if self.api is None:  # once: its counters are registered in self.metrics
            self.api = ManagementApi(
                store=self.store,
                tokens=self.tokens,
                keeper=self.ca_keeper,
                kv=self._kv_handler,
                metrics=self.metrics,
                csr_rate=self.config.ca.csr_rate,
                force_leave=self.health.force_leave,
                intentions_default=self.config.intentions.default,
            )
        self.api.keeper = self.ca_keeper

    async def _publish_intentions_default(self) -> None:
        """Put server.toml's ``[intentions] default`` where agents read it (synced config).

        Servers on one etcd should agree; the last one started wins, and says so.
        """
        want = json.dumps({"default": self.config.intentions.default}).encode()
        current = await self.store.get(INTENTIONS_DEFAULT_KEY)
        if current is not None and current.value == want:
            return
        if current is not None:
            log.warning("intentions default policy changed", default=self.config.intentions.default)
        await self.store.put(INTENTIONS_DEFAULT_KEY, want)

    async def handle(self, req: Request) -> Response:
        if req.path == "/ready" and req.method == "GET":
            return Response.text("ready")
        if req.path == "/v1/status/leader" and req.method == "GET":
            return Response.json(self.leader.leader_address)  # Consul's: "" without a leader
        if req.path == "/metrics" and req.method == "GET":
            return Response(200, self.metrics.render().encode(), content_type=CONTENT_TYPE)
        if req.path.startswith("/v1/") and self.api is not None:
            return await self.api.handle(req)  # tokens checked there; KV comes back below
        return Response.text(f"no such endpoint: {req.path}", 404)

    async def _kv_handler(self, req: Request) -> Response:
        if req.path.startswith("/v1/kv/"):
            try:
                return await self._kv(req, req.path.removeprefix("/v1/kv/"))
            except StoreValueError as exc:
                return Response.text(str(exc), 400)
            except StoreUnavailable as exc:
                log.warning("store unavailable", error=str(exc))
                return Response.text(f"store unavailable: {exc}", 503)
            except StoreError as exc:
                log.error("store error", error=str(exc))
                return Response.text(f"store error: {exc}", 500)
        return Response.text(f"no such endpoint: {req.path}", 404)

    async def _kv(self, req: Request, key: str) -> Response:
        index = [("X-Consul-Index", str(await self.store.current_revision()))]
        full = KV_PREFIX + key
        if req.method == "GET":
            if req.has("keys"):
                keys = [e.key.removeprefix(KV_PREFIX) for e in await self.store.list(full)]
                return Response.json(keys, headers=index) if keys else Response(404, headers=index)
            entries = await self.store.list(full) if req.has("recurse") else []
            if not req.has("recurse"):
                one = await self.store.get(full)
                entries = [one] if one else []
            if not entries:
                return Response(404, headers=index)
            if req.has("raw"):
                return Response(200, entries[0].value, index, "application/octet-stream")
            return Response.json([_kv_json(e) for e in entries], headers=index)
        if req.method == "PUT":
            if not key:
                return Response.text("a key is required", 400)
            cas_arg = req.arg("cas")
            try:
                cas = int(cas_arg) if cas_arg is not None else None
            except ValueError:
                return Response.text(f"invalid cas {cas_arg!r}", 400)
            if len(req.body) > MAX_VALUE:
                return Response.text(f"value exceeds {MAX_VALUE} bytes", 413)
            rev = await self.store.put(full, req.body, cas=cas)
            return Response.json(rev is not None)
        if req.method == "DELETE":
            cas_arg = req.arg("cas")
            try:
                cas = int(cas_arg) if cas_arg is not None else None
            except ValueError:
                return Response.text(f"invalid cas {cas_arg!r}", 400)
            n = await self.store.delete(full, prefix=req.has("recurse"), cas=cas)
            return Response.json(cas is None or n > 0)
        return Response.text(
            f"method {req.method} not allowed", 405, [("allow", "GET, PUT, DELETE")]
        )

    def _current_tls(self) -> ServerTls:
        assert self.tls is not None, "run() sets it before listening"
        return self.tls

    async def _server_certificate(
        self, host: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Issue the listener's certificate from the CA and renew it at 2/3 of its life:
        new connections get the new one, open ones keep theirs."""
        addresses = [host] if host not in ("", "0.0.0.0", "::") else []
        while True:
            cert = issue_server_certificate(self.ca, server_name(), addresses)
            self.tls = ServerTls(
                listener_context(cert.chain_pem, cert.key_pem, cert.roots_pem), self.ca.mesh
            )
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(max(1.0, (cert.renew_at - datetime.now(UTC)).total_seconds()))

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the bound address."""
        host, port = parse_hostport(self.config.bind)
        try:
            await self.start()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier().watchdog)  # WATCHDOG=1 while this loop runs
                await nursery.start(self._server_certificate, host)
                await nursery.start(self.sync.run)
                self.address = await nursery.start(
                    functools.partial(
                        serve_tls, self.handle, self.sync.serve, host, port, tls=self._current_tls,
                        revocations=lambda: self.sync.revocations or self.ca.revocations,
                        limits=HttpLimits(),
                        metrics=self.metrics,
                    )
                )  # fmt: skip
                self.leader.address = f"{self.address[0]}:{self.address[1]}"
                await nursery.start(self.leader.run)
                nursery.start_soon(self.leader.run_while_leader, self.health.run)
                nursery.start_soon(self.leader.run_while_leader, self.external.run)
                log.info("server started", api=f"{self.address[0]}:{self.address[1]}")
                notifier().ready(f"serving: api {self.address[0]}:{self.address[1]}")
                task_status.started(self.address)
        finally:
            notifier().stopping()
            with trio.CancelScope(shield=True):
                await self.store.aclose()

"""The server daemon (minimal for now): the embedded store behind an HTTP API.

It serves ``/ready``, ``/v1/status/leader`` and Consul's KV API
(``/v1/kv/<key>`` with ``?recurse``, ``?keys``, ``?raw`` and ``?cas=``). The
server issue adds agent sync, the CA, config and leader duties.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import Any

import trio

from hostmesh._config import ServerConfig, parse_hostport
from hostmesh._httpserver import HttpLimits, Request, Response, serve_http
from hostmesh._log import get_logger

from ._store import MAX_VALUE, Entry, SQLiteStore

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
    """One server process. The caller owns it; :meth:`run` closes the store on exit."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        Path(config.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = SQLiteStore(Path(config.data_dir) / "store.db")
        self.address: tuple[str, int] | None = None

    async def handle(self, req: Request) -> Response:
        if req.path == "/ready" and req.method == "GET":
            return Response.text("ready")
        if req.path == "/v1/status/leader" and req.method == "GET":
            host, port = self.address or ("", 0)
            return Response.json(f"{host}:{port}")
        if req.path.startswith("/v1/kv/"):
            return self._kv(req, req.path.removeprefix("/v1/kv/"))
        return Response.text(f"no such endpoint: {req.path}", 404)

    def _kv(self, req: Request, key: str) -> Response:
        index = [("X-Consul-Index", str(self.store.revision))]
        full = KV_PREFIX + key
        if req.method == "GET":
            if req.has("keys"):
                keys = [e.key.removeprefix(KV_PREFIX) for e in self.store.list(full)]
                return Response.json(keys, headers=index) if keys else Response(404, headers=index)
            entries = self.store.list(full) if req.has("recurse") else []
            if not req.has("recurse"):
                one = self.store.get(full)
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
            rev = self.store.put(full, req.body, cas=cas)
            return Response.json(rev is not None)
        if req.method == "DELETE":
            cas_arg = req.arg("cas")
            try:
                cas = int(cas_arg) if cas_arg is not None else None
            except ValueError:
                return Response.text(f"invalid cas {cas_arg!r}", 400)
            n = self.store.delete(full, prefix=req.has("recurse"), cas=cas)
            return Response.json(cas is None or n > 0)
        return Response.text(
            f"method {req.method} not allowed", 405, [("allow", "GET, PUT, DELETE")]
        )

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the bound address."""
        host, port = parse_hostport(self.config.bind)
        try:
            async with trio.open_nursery() as nursery:
                self.address = await nursery.start(
                    functools.partial(serve_http, self.handle, host, port, limits=HttpLimits(),
                                      name="server")
                )  # fmt: skip
                log.info("server started", api=f"{self.address[0]}:{self.address[1]}")
                task_status.started(self.address)
        finally:
            self.store.close()

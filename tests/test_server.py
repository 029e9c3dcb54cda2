"""The minimal server: the SQLite store and Consul's KV API on a real socket."""

from __future__ import annotations

import base64
import functools
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from conftest import trio_test

from hostmesh import ServerConfig
from hostmesh.server import Server, SQLiteStore


def test_store_revisions_cas_and_prefixes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    try:
        r1 = store.put("kv/a", b"1")
        assert r1 is not None and store.revision == r1
        assert store.put("kv/a", b"x", cas=0) is None  # create-only: exists
        r2 = store.put("kv/a", b"2", cas=r1)
        assert r2 is not None and r2 > r1
        assert store.put("kv/a", b"3", cas=r1) is None  # stale revision loses
        entry = store.get("kv/a")
        assert entry is not None
        assert (entry.value, entry.create_revision, entry.mod_revision) == (b"2", r1, r2)
        store.put("kv/b/c", b"")
        store.put("other", b"z")
        assert [e.key for e in store.list("kv/")] == ["kv/a", "kv/b/c"]
        assert store.list("kv/a%") == []  # LIKE wildcards are not special
        assert store.delete("kv/", prefix=True) == 2
        assert store.get("kv/a") is None and store.get("other") is not None
        with pytest.raises(ValueError, match="value larger"):
            store.put("big", b"x" * (512 * 1024 + 1))
    finally:
        store.close()


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from hostmesh.server import SQLiteStore\n"
        f"s = SQLiteStore(Path({str(tmp_path / 's.db')!r}))\n"
        "for i in range(200):\n"
        "    s.put(f'k/{i}', b'v')\n"
        "    print(i, flush=True)\n"
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    acknowledged = len(proc.stdout.split())
    assert acknowledged == 200
    store = SQLiteStore(tmp_path / "s.db")
    try:
        assert len(store.list("k/")) == acknowledged
    finally:
        store.close()


@pytest.mark.sockets
@trio_test()
async def test_consul_kv_api(tmp_path: Path) -> None:
    server = Server(ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path / "srv")))
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.run)
        token = server.management_token_file.read_text().strip()  # made at first start
        auth = {"Authorization": f"Bearer {token}"}
        tls = ssl.create_default_context(cadata=server.ca.bundle_pem().decode())
        tls.check_hostname = False  # the server is spiffe://mesh/server/<name>
        async with httpx.AsyncClient(
            base_url=f"https://{host}:{port}", timeout=10, headers=auth, verify=tls
        ) as http:
            assert (await http.get("/ready")).status_code == 200
            unauthorized = await http.get("/v1/kv/app/config", headers={"Authorization": ""})
            assert unauthorized.status_code == 401
            assert (await http.get("/v1/kv/app/config")).status_code == 404
            assert (await http.put("/v1/kv/app/config", content=b"debug=1")).json() is True
            entry = (await http.get("/v1/kv/app/config")).json()[0]
            assert entry["Key"] == "app/config"
            assert base64.b64decode(entry["Value"]) == b"debug=1"
            index = entry["ModifyIndex"]
            assert (await http.get("/v1/kv/app/config?raw")).content == b"debug=1"

            # Check-and-set: a stale index loses, the current one wins.
            assert (await http.put(f"/v1/kv/app/config?cas={index}", content=b"2")).json()
            assert not (await http.put(f"/v1/kv/app/config?cas={index}", content=b"3")).json()
            assert (await http.get("/v1/kv/app/config?raw")).content == b"2"
            assert (await http.put("/v1/kv/app/config?cas=x", content=b"")).status_code == 400

            await http.put("/v1/kv/app/flags/a", content=b"on")
            keys = (await http.get("/v1/kv/app/?keys")).json()
            assert keys == ["app/config", "app/flags/a"]
            assert len((await http.get("/v1/kv/app?recurse")).json()) == 2
            assert (await http.delete("/v1/kv/app/flags?recurse")).json() is True
            assert (await http.get("/v1/kv/app/?keys")).json() == ["app/config"]
            r = await http.put("/v1/kv/big", content=b"x" * (600 * 1024))
            assert r.status_code == 413
        nursery.cancel_scope.cancel()
    # The store is durable across a restart of the server.
    again = Server(ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path / "srv")))
    entry = await again.store.get("kv/app/config")
    await again.store.aclose()
    assert entry is not None and entry.value == b"2"


def test_server_run_binds_and_reports(tmp_path: Path) -> None:
    async def main() -> None:
        server = Server(ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path)))
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(functools.partial(server.run))
            assert addr[0] == "127.0.0.1" and addr[1] > 0
            nursery.cancel_scope.cancel()

    trio.run(main)

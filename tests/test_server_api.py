"""The server's management API on a real socket: tokens, config with ?cas=, KV behind
the token check, joins, rotation, revocation, and the CA kept in SQLite's data dir or
sealed in a real etcd."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import trio_test
from cryptography.hazmat.primitives import hashes
from etcd_cluster import EtcdCluster

from hostmesh import ConfigError, ServerCaConfig, ServerConfig, StoreConfig
from hostmesh._config import from_mapping
from hostmesh._errors import CaStateError
from hostmesh._httpserver import Request, serve_http
from hostmesh._pki import RevocationList, load_certificates, verify_node_certificate
from hostmesh._routes import TrafficPolicy
from hostmesh._tls import make_node_key_and_csr
from hostmesh.server import Server
from hostmesh.server._ca_keys import generate_sealing_key
from hostmesh.server._ca_store import CA_STATE_KEY, REVOCATIONS_KEY, ROOTS_KEY

pytestmark = pytest.mark.sockets

POLICY = {
    "rate_limit": 100,
    "routes": [
        {"name": "canary", "match": {"headers": [{"name": "x-canary", "exact": "1"}]},
         "targets": [{"tag": "canary"}]},
        {"name": "default", "timeout": "15s",
         "targets": [{"version": "v1", "weight": 3}, {"version": "v2", "weight": 1}]},
    ],
}  # fmt: skip


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == want:
            return float(value)
    return 0.0


@contextlib.asynccontextmanager
async def running_server(
    data_dir: Path, config: ServerConfig | None = None
) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    """A started server (CA and tokens loaded) answering HTTP on a loopback port; the
    client sends the management token."""
    config = config or ServerConfig(bind="127.0.0.1:0", data_dir=str(data_dir))
    server = Server(replace(config, data_dir=str(data_dir)), print_token=False)
    try:
        await server.start()
        path = server.management_token_file
        token = path.read_text().strip() if path.exists() else ""  # another server made it
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                functools.partial(serve_http, server.handle, "127.0.0.1", 0)
            )
            async with httpx.AsyncClient(
                base_url=f"http://{host}:{port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            ) as http:
                yield server, http
            nursery.cancel_scope.cancel()
    finally:
        await server.store.aclose()


async def store_dump(server: Server) -> dict[str, bytes]:
    return {e.key: e.value for e in await server.store.list("")}


# --- tokens -------------------------------------------------------------------------


@trio_test(timeout=30)
async def test_first_start_makes_one_management_token_printed_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path))
    server = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)  # start() runs before the listener is bound
        nursery.cancel_scope.cancel()
    out = capsys.readouterr().out
    path = tmp_path / "management.token"
    secret = path.read_text().strip()
    assert secret in out and "shown once" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A restart prints nothing and makes no other token.
    again = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        assert [t.kind for t in await again.tokens.list()] == ["management"]
        dump = await store_dump(again)
        nursery.cancel_scope.cancel()
    assert capsys.readouterr().out == ""
    assert path.read_text().strip() == secret
    # The store holds only the hash of the secret.
    assert not any(secret.encode() in k.encode() + v for k, v in dump.items())


@trio_test(timeout=30)
async def test_wrong_expired_revoked_and_wrong_kind_tokens_are_refused_and_counted(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as (server, http):
        anon = httpx.AsyncClient(base_url=http.base_url, timeout=10)
        r = await anon.put("/v1/kv/app", content=b"1")
        assert r.status_code == 401 and "token is required" in r.text
        assert r.headers["www-authenticate"] == "Bearer"
        r = await http.put("/v1/kv/app", content=b"1", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and "not valid" in r.text
        r = await http.put("/v1/kv/app", content=b"1", headers={"Authorization": "Basic eDp5"})
        assert r.status_code == 401
        # Consul's header works too.
        token = server.management_token_file.read_text().strip()
        r = await anon.put("/v1/kv/app", content=b"1", headers={"X-Consul-Token": token})
        assert r.status_code == 200 and r.json() is True
        # A join token may not touch the config.
        made = (await http.post("/v1/tokens", json={"kind": "join"})).json()
        join = {"Authorization": f"Bearer {made['secret']}"}
        r = await http.put("/v1/kv/app", content=b"2", headers=join)
        assert r.status_code == 403 and "join token may not" in r.text
        # Expired: the token store's clock moves past its TTL.
        short = (await http.post("/v1/tokens", json={"kind": "management", "ttl": "1h"})).json()
        later = datetime.now(UTC) + timedelta(hours=2)
        server.tokens.now = lambda: later
        r = await http.get("/v1/kv/app", headers={"Authorization": f"Bearer {short['secret']}"})
        assert r.status_code == 401 and "expired" in r.text
        server.tokens.now = lambda: datetime.now(UTC)
        # Revoked: works before, not after.
        extra = (await http.post("/v1/tokens", json={"kind": "management"})).json()
        extra_auth = {"Authorization": f"Bearer {extra['secret']}"}
        assert (await http.get("/v1/kv/app", headers=extra_auth)).status_code == 200
        assert (await http.delete(f"/v1/tokens/{extra['accessor']}")).status_code == 200
        assert (await http.get("/v1/kv/app", headers=extra_auth)).status_code == 401
        assert (await http.delete(f"/v1/tokens/{extra['accessor']}")).status_code == 404

        await anon.aclose()
        entry = await server.store.get("kv/app")
        assert entry is not None and entry.value == b"1"  # no refused write got through
        metrics = (await http.get("/metrics")).text
        fails = "hostmesh_server_auth_failures_total"
        assert metric(metrics, fails, reason="missing") == 1
        assert metric(metrics, fails, reason="invalid") == 3
        assert metric(metrics, fails, reason="forbidden") == 1
        assert metric(metrics, fails, reason="expired") == 1


@trio_test(timeout=30)
async def test_tokens_are_listed_without_secrets_and_join_tokens_carry_a_pattern(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as (server, http):
        vaulted = "0123456789abcdef" * 4  # as `openssl rand -hex 32` makes them
        body = {"kind": "join", "node_pattern": "web-*", "description": "web fleet",
                "secret": vaulted}  # fmt: skip
        r = await http.post("/v1/tokens", json=body)
        assert r.status_code == 200 and r.json()["secret"] == vaulted
        listed = (await http.get("/v1/tokens")).json()
        assert [t["kind"] for t in listed] == ["management", "join"]
        assert listed[1]["node_pattern"] == "web-*" and listed[1]["description"] == "web fleet"
        assert vaulted not in json.dumps(listed) and "secret" not in json.dumps(listed)
        # The same secret twice, a short one, a bad kind, a bad pattern, a bad TTL: 400.
        for body in (
            {"kind": "join", "secret": vaulted},
            {"kind": "join", "secret": "short"},
            {"kind": "root"},
            {"kind": "join", "node_pattern": "web/../*"},
            {"kind": "join", "ttl": "soon"},
            {"kind": "management", "node_pattern": "web-*"},
            {"kind": "join", "colour": "red"},
        ):
            r = await http.post("/v1/tokens", json=body)
            assert r.status_code == 400, (body, r.text)
        assert len(await server.tokens.list()) == 2
        r = await http.post("/v1/tokens", content=b"{not json")
        assert r.status_code == 400 and "invalid JSON" in r.text


# --- config: traffic, intentions, external services, KV ----------------------------


@trio_test(timeout=30)
async def test_traffic_policy_round_trips_and_cas_stops_a_second_operator(tmp_path: Path) -> None:
    async with running_server(tmp_path) as (server, http):
        assert (await http.get("/v1/config/traffic/udvr")).status_code == 404
        r = await http.put("/v1/config/traffic/udvr?cas=0", json=POLICY)
        assert r.status_code == 200, r.text
        index = r.json()["modify_index"]
        got = await http.get("/v1/config/traffic/udvr")
        assert int(got.headers["X-Consul-Index"]) >= index
        doc = got.json()
        assert doc["modify_index"] == index and doc["service"] == "udvr"
        # What is stored is what the agent's parser reads for [traffic.udvr].
        policy = from_mapping(TrafficPolicy, doc["policy"])
        assert policy == from_mapping(TrafficPolicy, POLICY)
        assert [t.weight for t in policy.routes[1].targets] == [3, 1]

        # Operator A writes with the index read; operator B, with the same stale index, loses.
        a = await http.put(f"/v1/config/traffic/udvr?cas={index}", json={"rate_limit": 5})
        assert a.status_code == 200
        b = await http.put(f"/v1/config/traffic/udvr?cas={index}", json={"rate_limit": 7})
        assert b.status_code == 409 and b.json()["modify_index"] == a.json()["modify_index"]
        assert "someone else changed it" in b.json()["error"]
        assert (await http.put("/v1/config/traffic/udvr?cas=0", json={})).status_code == 409
        current = (await http.get("/v1/config/traffic/udvr")).json()
        assert current["policy"]["rate_limit"] == 5

        # Invalid policies are refused with the key that is wrong; nothing is written.
        before = await store_dump(server)
        bad_routes = {"routes": [{"targets": [{"version": "v1", "weight": -1}]}]}
        for body, words in (
            (bad_routes, "routes[0].targets[0].weight"),
            ({"rate_limit": "fast"}, "rate_limit"),
            ({"retries": {}}, "unknown key"),
            ([1, 2], "JSON object"),
        ):
            r = await http.put("/v1/config/traffic/udvr", json=body)
            assert r.status_code == 400 and words in r.text, r.text
        assert (await http.put("/v1/config/traffic/bad%20name", json={})).status_code == 400
        assert (await http.put("/v1/config/traffic/udvr?cas=-1", json={})).status_code == 400
        assert (await http.put("/v1/config/traffic/udvr", content=b"{")).status_code == 400
        assert await store_dump(server) == before
        metrics = (await http.get("/metrics")).text
        bad = functools.partial(metric, metrics, "hostmesh_server_bad_requests_total")
        assert bad(endpoint="traffic", reason="invalid") == 4
        assert bad(endpoint="traffic", reason="bad-json") == 2
        assert bad(endpoint="traffic", reason="bad-cas") == 1

        listed = (await http.get("/v1/config/traffic")).json()
        assert list(listed) == ["udvr"] and listed["udvr"]["policy"]["rate_limit"] == 5
        stale = await http.delete(f"/v1/config/traffic/udvr?cas={index}")
        assert stale.status_code == 409
        r = await http.delete(f"/v1/config/traffic/udvr?cas={a.json()['modify_index']}")
        assert r.status_code == 200
        assert (await http.delete("/v1/config/traffic/udvr")).status_code == 404
        r = await http.post("/v1/config/traffic/udvr", json={})
        assert r.status_code == 405 and "PUT" in r.headers["allow"]


@trio_test(timeout=30)
async def test_intentions_and_external_services_are_validated_and_stored(tmp_path: Path) -> None:
    async with running_server(tmp_path) as (_, http):
        body = {"action": "allow", "http": {"path_prefix": "/api", "methods": ["GET"]}}
        r = await http.put("/v1/config/intentions/web/udvr?cas=0", json=body)
        assert r.status_code == 200, r.text
        assert (await http.put("/v1/config/intentions/*/db", json={"action": "deny"})).is_success
        got = (await http.get("/v1/config/intentions/web/udvr")).json()
        assert got["intention"]["http"] == {"path_prefix": "/api", "methods": ["GET"]}
        listed = (await http.get("/v1/config/intentions")).json()
        assert {(i["source"], i["destination"], i["action"]) for i in listed} == {
            ("web", "udvr", "allow"), ("*", "db", "deny")}  # fmt: skip
        for path, bad in (
            ("web/udvr", {"action": "maybe"}),
            ("web/udvr", {"action": "allow", "http": {"path_prefix": "api"}}),
            ("web/udvr", {"action": "allow", "http": {"methods": ["get"]}}),
            ("web/udvr", {"action": "allow", "source": "other"}),
            ("we%20b/udvr", {"action": "allow"}),
            ("web/*", {"action": "allow"}),
        ):
            r = await http.put(f"/v1/config/intentions/{path}", json=bad)
            assert r.status_code == 400, (path, bad, r.text)
        assert (await http.delete("/v1/config/intentions/*/db")).status_code == 200

        rds = {"name": "postgres", "address": "10.0.9.10", "port": 5432, "az": "eu-west-1a",
               "checks": [{"tcp": "10.0.9.10:5432", "interval": "10s"}]}  # fmt: skip
        r = await http.put("/v1/catalog/external/rds-1", json=rds)
        assert r.status_code == 200, r.text
        got = (await http.get("/v1/catalog/external/rds-1")).json()["service"]
        assert got["az"] == "eu-west-1a" and got["id"] == "rds-1" and got["port"] == 5432
        for bad in (
            {"name": "postgres", "port": 5432},  # no address: nobody else knows it
            {"name": "postgres", "address": "10.0.9.10", "port": 70000},
            {"name": "postgres", "address": "10.0.9.10", "checks": [{"interval": "1s"}]},
            {"name": "postgres", "address": "10.0.9.10", "id": "other"},
        ):
            r = await http.put("/v1/catalog/external/rds-2", json=bad)
            assert r.status_code == 400, (bad, r.text)
        assert [s["id"] for s in (await http.get("/v1/catalog/external")).json()] == ["rds-1"]
        assert (await http.delete("/v1/catalog/external/rds-1?cas=1")).status_code == 409
        assert (await http.delete("/v1/catalog/external/rds-1")).status_code == 200


# --- joins, renewals, rotation, revocation -----------------------------------------


async def join(
    http: httpx.AsyncClient, token: str, node: str, csr: bytes | None = None
) -> httpx.Response:
    csr = csr if csr is not None else make_node_key_and_csr(node).csr_pem
    return await http.post("/v1/ca/sign", json={"node": node, "csr": csr.decode()},
                           headers={"Authorization": f"Bearer {token}"})  # fmt: skip


@trio_test(timeout=30)
async def test_join_token_gets_a_node_certificate_only_for_its_pattern(tmp_path: Path) -> None:
    async with running_server(tmp_path) as (server, http):
        body = {"kind": "join", "node_pattern": "web-*"}
        join_token = (await http.post("/v1/tokens", json=body)).json()
        r = await join(http, join_token["secret"], "web-1")
        assert r.status_code == 200, r.text
        issued = r.json()
        chain = load_certificates(issued["chain"].encode())
        roots = load_certificates(issued["roots"].encode())
        now = datetime.now(UTC)
        identity = verify_node_certificate(chain, roots, now=now, mesh="mesh")
        assert identity.spiffe_id == "spiffe://mesh/node/web-1"
        life = chain[0].not_valid_after_utc - now
        assert timedelta(hours=71) < life <= timedelta(hours=72)
        assert datetime.fromisoformat(issued["renew_at"]) < chain[0].not_valid_after_utc
        # The CA's ledger was saved: the certificate can be revoked later.
        assert list(server.ca.certificates_of("web-1")) == [chain[0].serial_number]

        ca_file = tmp_path / "ca.json"
        state_before = ca_file.read_bytes()
        r = await join(http, join_token["secret"], "db-1")
        assert r.status_code == 403 and "'web-*'" in r.text and "'db-1'" in r.text
        management = server.management_token_file.read_text().strip()
        r = await join(http, management, "web-2")
        assert r.status_code == 403 and "join token" in r.text
        assert (await join(http, "hm_wrong", "web-2")).status_code == 401
        r = await join(http, join_token["secret"], "web-3", b"-----BEGIN CERTIFICATE REQUEST-----")
        assert r.status_code == 400 and "CSR refused" in r.text
        r = await join(http, join_token["secret"], "web_3", make_node_key_and_csr("web-3").csr_pem)
        assert r.status_code == 400 and "invalid node name" in r.text
        auth = {"Authorization": f"Bearer {join_token['secret']}"}
        r = await http.post("/v1/ca/sign", content=b"[]", headers=auth)
        assert r.status_code == 400
        assert ca_file.read_bytes() == state_before  # nothing issued, nothing written
        assert set(server.ca.certificates_of("web-3")) == set()

        metrics = (await http.get("/metrics")).text
        certs = "hostmesh_server_certificates_total"
        assert metric(metrics, certs, endpoint="sign", result="issued") == 1
        assert metric(metrics, certs, endpoint="sign", result="forbidden") == 1
        assert metric(metrics, certs, endpoint="sign", result="rejected") == 1
        # Renewal needs the node's client certificate; plain HTTP has none.
        r = await http.post("/v1/ca/renew", json={"csr": "x"})
        assert r.status_code == 401 and "client certificate" in r.text


@trio_test(timeout=30)
async def test_csrs_are_rate_limited(tmp_path: Path) -> None:
    config = ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path), ca=ServerCaConfig(csr_rate=1))
    async with running_server(tmp_path, config) as (server, http):
        secret = (await http.post("/v1/tokens", json={"kind": "join"})).json()["secret"]
        server.api.clock = lambda: 100.0  # type: ignore[union-attr]  # time stands still
        assert (await join(http, secret, "node-1")).status_code == 200
        r = await join(http, secret, "node-2")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert server.ca.certificates_of("node-2") == {}
        server.api.clock = lambda: 101.5  # type: ignore[union-attr]
        assert (await join(http, secret, "node-2")).status_code == 200


@trio_test(timeout=30)
async def test_renewal_takes_the_node_name_from_the_client_certificate(tmp_path: Path) -> None:
    from hostmesh._pki import NodeIdentity

    async with running_server(tmp_path) as (server, _):
        csr = make_node_key_and_csr("web-1").csr_pem.decode()

        def renew(identity: Any) -> Request:
            body = json.dumps({"csr": csr}).encode()
            return Request(method="POST", target="/v1/ca/renew", path="/v1/ca/renew", query={},
                           headers={}, body=body, peer="test", peer_identity=identity)  # fmt: skip

        response = await server.handle(renew(NodeIdentity("mesh", "web-1")))
        assert response.status == 200, response.body
        chain = load_certificates(json.loads(response.body)["chain"].encode())
        assert (
            verify_node_certificate(chain, server.ca.roots, now=datetime.now(UTC)).node == "web-1"
        )
        assert (await server.handle(renew(NodeIdentity("other", "web-1")))).status == 401
        assert (await server.handle(renew(None))).status == 401


@trio_test(timeout=30)
async def test_rotation_cross_signs_and_revocation_bumps_the_list(tmp_path: Path) -> None:
    async with running_server(tmp_path) as (server, http):
        secret = (await http.post("/v1/tokens", json={"kind": "join"})).json()["secret"]
        old = (await join(http, secret, "web-1")).json()
        roots = (await http.get("/v1/ca/roots", headers={"Authorization": ""})).json()
        assert len(roots["roots"]) == 1 and roots["trust_domain"] == "mesh"
        old_pin = roots["active_pin"]
        assert old_pin.startswith("sha256:") and len(old_pin) == 7 + 64

        r = await http.post("/v1/ca/rotate")
        assert r.status_code == 200 and r.json()["pin"] != old_pin
        roots = (await http.get("/v1/ca/roots")).json()
        assert [x["active"] for x in roots["roots"]] == [False, True]
        new = (await join(http, secret, "web-2")).json()
        new_chain = load_certificates(new["chain"].encode())
        assert len(new_chain) == 2  # leaf + the new root cross-signed by the old one
        old_roots = load_certificates(old["roots"].encode())
        now = datetime.now(UTC)
        # An agent that only knows the old root trusts the new leaf, and vice versa.
        assert verify_node_certificate(new_chain, old_roots, now=now).node == "web-2"
        old_chain = load_certificates(old["chain"].encode())
        new_roots = load_certificates(new["roots"].encode())
        assert verify_node_certificate(old_chain, new_roots, now=now).node == "web-1"
        r = await http.post("/v1/ca/rotate")
        assert r.status_code == 409 and "overlap" in r.text
        stored_roots = await server.store.get(ROOTS_KEY)
        assert stored_roots is not None and len(load_certificates(stored_roots.value)) == 2

        r = await http.post("/v1/node/web-1/revoke")
        assert r.status_code == 200
        assert r.json()["revoked"] == [format(old_chain[0].serial_number, "x")]
        revision = r.json()["revision"]
        assert revision >= 1
        public = await http.get("/v1/ca/revocations", headers={"Authorization": ""})
        listed = RevocationList.from_bytes(public.content)
        assert listed.revision == revision and old_chain[0].serial_number in listed
        stored = await server.store.get(REVOCATIONS_KEY)
        assert stored is not None and RevocationList.from_bytes(stored.value) == listed
        again = await http.post("/v1/node/web-1/revoke")  # idempotent: no new revision
        assert again.status_code == 200 and again.json()["revision"] == revision
        assert (await http.post("/v1/node/nobody/revoke")).status_code == 404
        r = await http.post("/v1/ca/rotate", headers={"Authorization": ""})
        assert r.status_code == 401


# --- the CA's persistence ----------------------------------------------------------


@trio_test(timeout=30)
async def test_sqlite_ca_is_a_0600_file_reused_on_restart_and_refused_when_readable(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path) as (server, _):
        pin = server.ca.active.cert.fingerprint(hashes.SHA256())
    ca_file = tmp_path / "ca.json"
    assert stat.S_IMODE(ca_file.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in ca_file.read_bytes()
    async with running_server(tmp_path) as (server, _):
        assert server.ca.active.cert.fingerprint(hashes.SHA256()) == pin
    os.chmod(ca_file, 0o644)
    server = Server(ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path)), print_token=False)
    with pytest.raises(CaStateError, match="readable by others"):
        await server.start()
    await server.store.aclose()
    # Another mesh name would invalidate every certificate: refused too.
    os.chmod(ca_file, 0o600)
    other = ServerConfig(bind="127.0.0.1:0", data_dir=str(tmp_path), ca=ServerCaConfig(mesh="m2"))
    server = Server(other, print_token=False)
    with pytest.raises(CaStateError, match="mesh 'mesh'"):
        await server.start()
    await server.store.aclose()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1) as cluster:
        yield cluster


def test_etcd_needs_a_sealing_key_in_the_config() -> None:
    with pytest.raises(ConfigError) as caught:
        from_mapping(ServerConfig, {"store": {"backend": "etcd"}}, source="server.toml")
    assert caught.value.key == "ca.sealing_key_file" and "openssl rand" in caught.value.reason


@trio_test(timeout=60)
async def test_etcd_ca_is_sealed_shared_by_servers_and_changed_under_cas(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    key_file = tmp_path / "seal.key"
    key_file.write_text(generate_sealing_key() + "\n")
    key_file.chmod(0o600)
    config = ServerConfig(
        bind="127.0.0.1:0",
        store=StoreConfig(backend="etcd", endpoints=tuple(etcd.endpoints)),
        ca=ServerCaConfig(sealing_key_file=str(key_file)),
    )
    async with running_server(tmp_path / "a", config) as (a, http_a):
        sealed = await a.store.get(CA_STATE_KEY)
        assert sealed is not None and sealed.value.startswith(b"HMSEAL")
        assert b"PRIVATE KEY" not in sealed.value and b"BEGIN" not in sealed.value
        assert not (tmp_path / "a" / "ca.json").exists()
        async with running_server(tmp_path / "b", config) as (b, http_b):
            # One CA and one bootstrap token for the cluster.
            assert b.ca.active.cert == a.ca.active.cert
            assert b.management_token is None and not (tmp_path / "b" / "management.token").exists()
            http_b.headers["Authorization"] = http_a.headers["Authorization"]
            secret = (await http_a.post("/v1/tokens", json={"kind": "join"})).json()["secret"]
            # Certificates issued by both servers: neither save loses the other's.
            assert (await join(http_a, secret, "node-a")).status_code == 200
            assert (await join(http_b, secret, "node-b")).status_code == 200
            r = await http_a.post("/v1/node/node-b/revoke")
            assert r.status_code == 200, r.text
            await b.ca_keeper.refresh()  # type: ignore[union-attr]
            assert set(b.ca.certificates_of("node-a")) and b.ca.revocations.revision == 1
    # The wrong sealing key cannot open it: a clear refusal at start.
    wrong = tmp_path / "wrong.key"
    wrong.write_text(generate_sealing_key())
    wrong.chmod(0o600)
    server = Server(
        replace(
            config, data_dir=str(tmp_path / "c"), ca=ServerCaConfig(sealing_key_file=str(wrong))
        ),
        print_token=False,
    )
    with pytest.raises(CaStateError, match="wrong sealing key"):
        await server.start()
    await server.store.aclose()

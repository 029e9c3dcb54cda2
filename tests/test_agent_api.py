"""The agent's Consul-compatible HTTP API on a real socket, with httpx and curl."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest
import trio
from conftest import agent_config, running_agent, trio_test

from hostmesh import ConfigError
from hostmesh.agent import Agent

pytestmark = pytest.mark.sockets

WEB = {
    "Name": "web",
    "ID": "web-1",
    "Port": 8080,
    "Tags": ["v1", "primary"],
    "Meta": {"version": "v1"},
    "Weights": {"Passing": 3, "Warning": 1},
    "Check": {"TTL": "30s", "Notes": "app heartbeat"},
}


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=10)


@trio_test()
async def test_register_and_query_like_consul(tmp_path: Path) -> None:
    async with (
        running_agent(agent_config(tmp_path)) as (_agent, addrs),
        client(addrs.api_url) as http,
    ):
        r = await http.put("/v1/agent/service/register", json=WEB)
        assert r.status_code == 200

        services = (await http.get("/v1/agent/services")).json()
        assert services["web-1"]["Service"] == "web"
        assert services["web-1"]["Tags"] == ["v1", "primary"]
        assert services["web-1"]["Weights"] == {"Passing": 3, "Warning": 1}
        assert services["web-1"]["Meta"] == {"version": "v1"}

        checks = (await http.get("/v1/agent/checks")).json()
        assert checks["service:web-1"]["Status"] == "critical"  # new checks start critical
        assert checks["service:web-1"]["ServiceName"] == "web"
        assert checks["service:web-1"]["Type"] == "ttl"

        # Critical: listed by health, not by ?passing.
        health = (await http.get("/v1/health/service/web")).json()
        assert [e["Service"]["ID"] for e in health] == ["web-1"]
        assert health[0]["Node"]["Node"] == "node-a"
        assert health[0]["Node"]["Locality"] == {"Region": "dev-1", "Zone": "dev-1a"}
        assert (await http.get("/v1/health/service/web?passing")).json() == []

        assert (await http.put("/v1/agent/check/pass/service:web-1?note=ok")).status_code == 200
        passing = (await http.get("/v1/health/service/web", params={"passing": ""})).json()
        assert [e["Service"]["ID"] for e in passing] == ["web-1"]
        statuses = {c["CheckID"]: (c["Status"], c["Output"]) for c in passing[0]["Checks"]}
        assert statuses["service:web-1"] == ("passing", "ok")
        assert statuses["serfHealth"][0] == "passing"

        await http.put("/v1/agent/check/warn/service:web-1")
        assert (await http.get("/v1/health/service/web?passing")).json() == []
        r = await http.put(
            "/v1/agent/check/update/service:web-1",
            json={"Status": "passing", "Output": "all good"},
        )
        assert r.status_code == 200
        checks = (await http.get("/v1/agent/checks")).json()
        assert checks["service:web-1"]["Output"] == "all good"

        assert (await http.get("/v1/catalog/services")).json() == {"web": ["primary", "v1"]}
        cat = (await http.get("/v1/catalog/service/web", params={"tag": "v1"})).json()
        assert [(e["ServiceID"], e["ServicePort"], e["Node"]) for e in cat] == [
            ("web-1", 8080, "node-a")
        ]
        assert (await http.get("/v1/catalog/service/web?tag=v2")).json() == []
        nodes = (await http.get("/v1/catalog/nodes")).json()
        assert [(n["Node"], n["Address"]) for n in nodes] == [("node-a", "127.0.0.1")]

        me = (await http.get("/v1/agent/self")).json()
        assert me["Config"]["NodeName"] == "node-a"
        assert me["Config"]["Datacenter"] == "dc1"
        assert me["Member"]["Addr"] == "127.0.0.1"

        r = await http.put("/v1/agent/service/deregister/web-1")
        assert r.status_code == 200
        assert (await http.get("/v1/agent/services")).json() == {}
        assert (await http.get("/v1/agent/checks")).json() == {}
        assert (await http.get("/v1/catalog/services")).json() == {}


@trio_test()
async def test_consul_style_field_spellings_and_defaults(tmp_path: Path) -> None:
    async with (
        running_agent(agent_config(tmp_path)) as (_agent, addrs),
        client(addrs.api_url) as http,
    ):
        # Consul accepts any case and snake_case; zero-valued unsupported fields are ignored.
        body = {
            "name": "api",
            "port": 9000,
            "Kind": "",
            "Connect": None,
            "EnableTagOverride": False,
            "checks": [
                {"ttl": "10s", "status": "passing"},
                {
                    "tcp": "127.0.0.1:9000",
                    "interval": "1m",
                    "deregister_critical_service_after": "90m",
                },
            ],
        }
        assert (await http.put("/v1/agent/service/register", json=body)).status_code == 200
        checks = (await http.get("/v1/agent/checks")).json()
        assert checks["service:api:1"]["Status"] == "passing"  # Status sets the initial state
        assert checks["service:api:2"]["Type"] == "tcp"
        services = (await http.get("/v1/agent/services")).json()
        assert services["api"]["ID"] == "api"  # ID defaults to the name


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{bad", "Request decode failed"),
        (b"[]", "expected a JSON object"),
        (json.dumps({"Port": 80}).encode(), "name: required key is missing"),
        (json.dumps({"Name": 5}).encode(), "name: expected a string"),
        (json.dumps({"Name": "web", "Port": 70000}).encode(), "port: 70000 is not a TCP port"),
        (json.dumps({"Name": "web", "Port": "80"}).encode(), "port: expected an integer"),
        (json.dumps({"Name": "we b"}).encode(), "invalid name"),
        (json.dumps({"Name": "web", "Tags": "v1"}).encode(), "tags: expected a list"),
        (
            json.dumps({"Name": "web", "Check": {"HTTP": "http://x/", "TTL": "1s"}}).encode(),
            "exactly one of http, tcp, args or ttl",
        ),
        (json.dumps({"Name": "web", "Check": {"TTL": "soon"}}).encode(), "invalid duration"),
        (json.dumps({"Name": "web", "Kind": "connect-proxy"}).encode(), "not supported"),
        (json.dumps({"Name": "web", "Weights": 3}).encode(), "Weights: expected an object"),
        ("\udcff".encode("utf-8", "surrogatepass"), "Request decode failed"),
    ],
)
def test_bad_registrations_get_400_with_one_line(tmp_path: Path, body: bytes, reason: str) -> None:
    @trio_test()
    async def run() -> None:
        async with (
            running_agent(agent_config(tmp_path)) as (agent, addrs),
            client(addrs.api_url) as http,
        ):
            r = await http.put("/v1/agent/service/register", content=body)
            assert r.status_code == 400
            assert reason in r.text
            assert r.text.count("\n") == 1
            assert agent.state.registrations == {}

    run()


@trio_test()
async def test_status_codes_for_unknown_ids_and_methods(tmp_path: Path) -> None:
    async with (
        running_agent(agent_config(tmp_path)) as (_agent, addrs),
        client(addrs.api_url) as http,
    ):
        r = await http.put("/v1/agent/service/deregister/nope")
        assert (r.status_code, r.text.strip()) == (404, 'Unknown service ID "nope"')
        r = await http.put("/v1/agent/check/pass/nope")
        assert (r.status_code, r.text.strip()) == (404, 'Unknown check ID "nope"')
        r = await http.get("/v1/agent/service/register")
        assert r.status_code == 405 and r.headers["allow"] == "PUT"
        assert (await http.get("/v1/nothing")).status_code == 404
        await http.put(
            "/v1/agent/service/register",
            json={"Name": "db", "Port": 5432, "Check": {"TCP": "127.0.0.1:1", "Interval": "1h"}},
        )
        r = await http.put("/v1/agent/check/pass/service:db")
        assert r.status_code == 400 and "not a TTL check" in r.text
        r = await http.put("/v1/agent/check/update/service:db", json={"Status": "fine"})
        assert r.status_code == 400 and "Invalid check status" in r.text
        r = await http.get("/v1/health/service/db?index=x")
        assert r.status_code == 400 and "Invalid index" in r.text
        assert (await http.get("/ready")).status_code == 200


@trio_test()
async def test_blocking_query_returns_on_change_or_after_wait(tmp_path: Path) -> None:
    async with (
        running_agent(agent_config(tmp_path)) as (_agent, addrs),
        client(addrs.api_url) as http,
    ):
        await http.put("/v1/agent/service/register", json=WEB)
        first = await http.get("/v1/health/service/web")
        index = int(first.headers["X-Consul-Index"])
        assert index > 0

        # No change: the query returns after ?wait= (plus at most wait/16 jitter).
        start = trio.current_time()
        r = await http.get(f"/v1/health/service/web?index={index}&wait=300ms")
        elapsed = trio.current_time() - start
        assert 0.3 <= elapsed < 1.0
        assert int(r.headers["X-Consul-Index"]) == index

        # A change wakes the query at once with a larger index and the new state.
        results: list[httpx.Response] = []

        async def blocked() -> None:
            results.append(await http.get(f"/v1/health/service/web?index={index}&wait=30s"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked)
            await trio.sleep(0.2)
            assert results == []
            start = trio.current_time()
            await http.put("/v1/agent/check/pass/service:web-1")
        assert trio.current_time() - start < 1.0
        assert int(results[0].headers["X-Consul-Index"]) > index
        assert [c["Status"] for c in results[0].json()[0]["Checks"]] == ["passing", "passing"]


@trio_test()
async def test_curl_registers_and_reads(tmp_path: Path) -> None:
    async with running_agent(agent_config(tmp_path)) as (_agent, addrs):
        url = addrs.api_url
        put = await trio.run_process(
            ["curl", "-sS", "-f", "-X", "PUT", "--data", json.dumps(WEB),
             f"{url}/v1/agent/service/register"],
            capture_stdout=True,
        )  # fmt: skip
        assert put.returncode == 0
        got = await trio.run_process(
            ["curl", "-sS", "-i", f"{url}/v1/catalog/service/web"], capture_stdout=True
        )
        head, _, body = got.stdout.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200 OK")
        assert "X-Consul-Index:" in head
        assert json.loads(body)[0]["ServiceID"] == "web-1"
        metrics = await trio.run_process(["curl", "-sS", f"{url}/metrics"], capture_stdout=True)
        text = metrics.stdout.decode()
        assert (
            'hostmesh_api_requests_total{route="/v1/agent/service/register",code="200"} 1' in text
        )
        assert "hostmesh_local_services 1" in text


async def _raw(host: str, port: int, payload: bytes, *, wait: float = 5) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(payload)
        out = b""
        with trio.move_on_after(wait):
            try:
                while chunk := await stream.receive_some(65536):
                    out += chunk
            except trio.BrokenResourceError:
                pass
        return out


@trio_test(timeout=30)
async def test_hostile_http_is_refused_cleanly(tmp_path: Path) -> None:
    cfg = agent_config(tmp_path)
    cfg = cfg.__class__(**{**cfg.__dict__, "api": cfg.api.__class__(bind="127.0.0.1:0",
                           max_body=1024, header_timeout=0.5)})  # fmt: skip
    async with running_agent(cfg) as (agent, addrs), client(addrs.api_url) as http:
        host, port = addrs.api
        assert (await _raw(host, port, b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.1 400")
        big = b"GET / HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 100_000 + b"\r\n\r\n"
        assert (await _raw(host, port, big)).startswith(b"HTTP/1.1 431")
        smuggle = b"PUT /v1/agent/service/register HTTP/1.1\r\nhost: x\r\n" \
                  b"content-length: 5\r\ncontent-length: 6\r\n\r\nhello!"  # fmt: skip
        assert (await _raw(host, port, smuggle)).startswith(b"HTTP/1.1 400")
        r = await http.put("/v1/agent/service/register", content=b"x" * 2000)
        assert r.status_code == 413
        # A slow client that never finishes its headers is cut off.
        slow = await _raw(host, port, b"GET /v1/agent/services HTTP/1.1\r\nhost:", wait=3)
        assert slow.startswith(b"HTTP/1.1 408")
        # The agent still serves.
        assert (await http.get("/v1/agent/services")).status_code == 200
        assert agent.state.registrations == {}


@trio_test()
async def test_registrations_survive_restart_and_generation_grows(tmp_path: Path) -> None:
    cfg = agent_config(tmp_path)
    async with running_agent(cfg) as (agent, addrs), client(addrs.api_url) as http:
        await http.put("/v1/agent/service/register", json=WEB)
        await http.put("/v1/agent/service/register", json={"Name": "gone", "Port": 1})
        await http.put("/v1/agent/service/deregister/gone")
        first_generation = agent.state.record.generation
    async with running_agent(cfg) as (agent, addrs), client(addrs.api_url) as http:
        services = (await http.get("/v1/agent/services")).json()
        assert sorted(services) == ["web-1"]
        assert services["web-1"]["Weights"] == {"Passing": 3, "Warning": 1}
        checks = (await http.get("/v1/agent/checks")).json()
        assert list(checks) == ["service:web-1"]
        assert agent.state.record.generation == first_generation + 1


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@trio_test()
async def test_services_dir_loads_at_start_and_reloads_on_sighup(tmp_path: Path) -> None:
    sdir = tmp_path / "services.d"
    _write(sdir / "web.toml", 'name = "web"\nport = 8080\ntags = ["v1"]\n')
    _write(
        sdir / "pair.toml",
        '[[services]]\nname = "a"\nport = 1\n[[services]]\nname = "b"\nport = 2\n',
    )
    agent = Agent(agent_config(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        assert sorted(agent.state.registrations) == ["a", "b", "web"]

        _write(sdir / "web.toml", 'name = "web"\nport = 8080\ntags = ["v2"]\n')
        (sdir / "pair.toml").unlink()
        _write(sdir / "db.toml", 'name = "db"\nport = 5432\n')
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(5):
            while sorted(agent.state.registrations) != ["db", "web"]:
                await trio.sleep(0.01)
        assert agent.state.registrations["web"].definition.tags == ("v2",)

        # A broken file on reload keeps what runs.
        _write(sdir / "bad.toml", 'name = "x"\nport = "eighty"\n')
        (sdir / "db.toml").unlink()
        agent.reload()
        assert sorted(agent.state.registrations) == ["db", "web"]
        nursery.cancel_scope.cancel()


def test_bad_services_file_fails_start_with_file_and_key(tmp_path: Path) -> None:
    _write(
        tmp_path / "services.d" / "web.toml", 'name = "web"\nport = 8080\n[[checks]]\nhttp = "x"\n'
    )

    async def main() -> None:
        await Agent(agent_config(tmp_path)).run()  # raises before any listener binds

    with pytest.raises(ConfigError) as info:
        trio.run(main)
    assert info.value.file.endswith("web.toml")
    assert info.value.key == "checks[0].http"


@trio_test(timeout=600, mock_clock=True)
async def test_deregister_critical_service_after(tmp_path: Path) -> None:
    cfg = agent_config(tmp_path, check_reap_interval=5.0)
    async with running_agent(cfg) as (agent, _addrs):
        agent.register(
            agent_service(
                {"Name": "flaky", "Check": {"TTL": "10s", "Status": "passing",
                                            "DeregisterCriticalServiceAfter": "1m"}}
            )
        )  # fmt: skip
        agent.register(agent_service({"Name": "steady", "Check": {"TTL": "10s"}}))
        await trio.sleep(30)  # the TTL expired at 10 s: critical since then
        assert agent.state.check("service:flaky").status.value == "critical"
        assert "flaky" in agent.state.registrations
        await trio.sleep(50)  # 80 s: critical for 70 s > 1 m
        assert "flaky" not in agent.state.registrations
        assert "steady" in agent.state.registrations  # no deregister setting: stays


def agent_service(body: dict[str, object]):  # type: ignore[no-untyped-def]
    from hostmesh.agent import service_from_consul

    return service_from_consul(body)


@trio_test()
async def test_http_check_through_the_api_goes_passing(tmp_path: Path) -> None:
    async def backend(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            )

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, backend, 0)
        port = listeners[0].socket.getsockname()[1]
        async with (
            running_agent(agent_config(tmp_path)) as (_agent, addrs),
            client(addrs.api_url) as http,
        ):
            await http.put(
                "/v1/agent/service/register",
                json={"Name": "app", "Port": port,
                      "Check": {"HTTP": f"http://127.0.0.1:{port}/health", "Interval": "100ms"}},
            )  # fmt: skip
            with trio.fail_after(5):
                while not (await http.get("/v1/health/service/app?passing")).json():
                    await trio.sleep(0.05)
            checks = (await http.get("/v1/agent/checks")).json()
            assert "200 OK" in checks["service:app"]["Output"]
        nursery.cancel_scope.cancel()


@trio_test()
async def test_every_check_status_change_bumps_the_record_version(tmp_path: Path) -> None:
    async with (
        running_agent(agent_config(tmp_path)) as (agent, addrs),
        client(addrs.api_url) as http,
    ):
        await http.put("/v1/agent/service/register", json=WEB)
        versions = [agent.state.record.version]
        for verb in ("pass", "warn", "fail", "pass"):
            await http.put(f"/v1/agent/check/{verb}/service:web-1")
            versions.append(agent.state.record.version)
        assert versions == sorted(set(versions))  # strictly growing: one bump per change
        # The same status and output again is not a change.
        await http.put("/v1/agent/check/pass/service:web-1")
        assert agent.state.record.version == versions[-1]
        assert agent.catalog.record("node-a") is agent.state.record

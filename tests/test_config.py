"""Configuration: durations, addresses, and strict loading of real TOML files."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hostmesh import (
    AgentConfig,
    ApiConfig,
    CheckDefinition,
    ConfigError,
    ServiceDefinition,
    load_agent_config,
    load_server_config,
    load_service_file,
    parse_duration,
)
from hostmesh._config import MAX_CONFIG_FILE, parse_hostport

HOUR = 3600.0

# --- parse_duration / parse_hostport ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("72h", 72 * HOUR),
        ("1h30m", 1.5 * HOUR),
        ("1.5s", 1.5),
        ("250us", 250e-6),
        ("0s", 0.0),
        ("10", 10.0),  # a bare number in a string is seconds
        (" 5m ", 300.0),
        (3, 3.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "abc",
        "-1s",
        "-1",
        -1,
        "1x",
        "10s5",
        "1m 30s",
        "s",
        "inf",
        "nan",
        True,
        False,
        math.nan,
        math.inf,
        10**400,
        [1],
        None,
    ],
)
def test_parse_duration_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:4191", ("127.0.0.1", 4191)),
        ("10.0.0.7:0", ("10.0.0.7", 0)),
        ("[::1]:53", ("::1", 53)),
        ("[fe80::1]:65535", ("fe80::1", 65535)),
        ("consul.example.com:8300", ("consul.example.com", 8300)),
        (":8080", ("127.0.0.1", 8080)),
        (" 10.0.0.1:80 ", ("10.0.0.1", 80)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_parse_hostport_default_host() -> None:
    assert parse_hostport(":4150", default_host="0.0.0.0") == ("0.0.0.0", 4150)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "[::1]53",
        "[::1]",
        "host:²",  # str.isdigit() is true for these, but they are not port numbers
        "host:٣",
    ],
)
def test_parse_hostport_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_hostport(bad)


# --- helpers ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str | bytes, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_error(loader: Callable[[Path], Any], path: Path) -> ConfigError:
    """The ConfigError ``loader`` raises; its message must start with the file."""
    with pytest.raises(ConfigError) as info:
        loader(path)
    err = info.value
    assert err.file == str(path)
    assert str(err).startswith(f"{path}: ")
    if err.key:
        assert f": {err.key}: " in str(err)
    assert err.reason in str(err)
    return err


# --- agent.toml -----------------------------------------------------------------------------


def test_agent_defaults() -> None:
    cfg = load_agent_config(None)
    assert cfg == AgentConfig()
    assert cfg.address == "127.0.0.1"
    assert cfg.datacenter == "dc1"
    assert cfg.servers == ()
    assert cfg.api == ApiConfig()
    assert cfg.api.bind == "127.0.0.1:4191"
    assert cfg.api.max_blocking_wait == 600.0
    assert cfg.tombstone_ttl == 24 * HOUR
    assert cfg.check_reap_interval == 30.0
    assert cfg.data_dir == "/var/lib/hostmesh"
    assert cfg.services_dir == "/etc/hostmesh/services.d"
    assert cfg.node_name  # the short hostname, never empty


def test_empty_agent_file_gives_defaults(tmp_path: Path) -> None:
    assert load_agent_config(write(tmp_path, "")) == AgentConfig()


def test_full_agent_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
node_name = "web-07"
address = "10.0.3.17"
az = "eu-west-1a"
region = "eu-west-1"
datacenter = "eu1"
data_dir = "/srv/hostmesh"
services_dir = "/srv/hostmesh/services.d"
servers = ["10.0.0.10:4150", "[fd00::10]:4150"]
tombstone_ttl = "72h"
check_reap_interval = 45

[meta]
rack = "r12"
instance_type = "m7g.large"

[api]
bind = "127.0.0.1:8500"
max_body = 65536
max_connections = 64
header_timeout = "2s"
max_blocking_wait = "5m"
""",
    )
    assert load_agent_config(path) == AgentConfig(
        node_name="web-07",
        address="10.0.3.17",
        az="eu-west-1a",
        region="eu-west-1",
        datacenter="eu1",
        meta={"rack": "r12", "instance_type": "m7g.large"},
        data_dir="/srv/hostmesh",
        services_dir="/srv/hostmesh/services.d",
        servers=("10.0.0.10:4150", "[fd00::10]:4150"),
        api=ApiConfig(
            bind="127.0.0.1:8500",
            max_body=65536,
            max_connections=64,
            header_timeout=2.0,
            max_blocking_wait=300.0,
        ),
        tombstone_ttl=72 * HOUR,
        check_reap_interval=45.0,
    )


def test_load_agent_config_accepts_a_string_path(tmp_path: Path) -> None:
    path = write(tmp_path, 'node_name = "db-1"\n')
    assert load_agent_config(str(path)).node_name == "db-1"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        # unknown keys
        ("bogus = 1", "bogus", "unknown key"),
        ("[api]\nbindd = '127.0.0.1:1'", "api.bindd", "unknown key"),
        # wrong types
        ("az = 3", "az", "expected a string"),
        ("servers = '10.0.0.1:4150'", "servers", "expected a list"),
        ("servers = [4150]", "servers[0]", "expected a string"),
        ("meta = { rack = 12 }", "meta.rack", "expected a string"),
        ("meta = 'rack'", "meta", "expected a table"),
        ("api = '127.0.0.1:1'", "api", "expected a table"),
        ("[api]\nmax_body = '1MB'", "api.max_body", "expected an integer"),
        ("[api]\nmax_body = 1.5", "api.max_body", "expected an integer"),
        ("[api]\nmax_connections = true", "api.max_connections", "expected an integer"),
        ("tombstone_ttl = [1]", "tombstone_ttl", "duration"),
        ("tombstone_ttl = 1979-05-27", "tombstone_ttl", "duration"),
        # bad durations
        ("tombstone_ttl = '3 days'", "tombstone_ttl", "invalid duration"),
        ("check_reap_interval = '-1s'", "check_reap_interval", "invalid duration"),
        ("[api]\nheader_timeout = 'nan'", "api.header_timeout", "finite"),
        ("tombstone_ttl = 0", "tombstone_ttl", "> 0"),
        # bad ports and addresses
        ("servers = ['10.0.0.1:99999']", "servers", "host:port"),
        ("servers = ['10.0.0.1']", "servers", "host:port"),
        ("[api]\nbind = '127.0.0.1:99999'", "api.bind", "host:port"),
        ("[api]\nbind = 'localhost'", "api.bind", "host:port"),
        ("address = 'web-07.internal'", "address", "not an IP address"),
        # bad node names
        ("node_name = 'web 07'", "node_name", "invalid node_name"),
        ("node_name = ''", "node_name", "invalid node_name"),
        ("node_name = '-web'", "node_name", "invalid node_name"),
        (f"node_name = '{'n' * 129}'", "node_name", "invalid node_name"),
    ],
)
def test_agent_file_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    err = load_error(load_agent_config, write(tmp_path, text))
    assert err.key == key
    assert reason in err.reason


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    err = load_error(load_agent_config, write(tmp_path, "[api]\nbindd = '127.0.0.1:1'"))
    assert "bind" in err.reason.split("known:")[1]


def test_invalid_toml(tmp_path: Path) -> None:
    err = load_error(load_agent_config, write(tmp_path, 'node_name = "web\n'))
    assert err.key == ""
    assert "invalid TOML" in err.reason


def test_non_utf8_file(tmp_path: Path) -> None:
    err = load_error(load_agent_config, write(tmp_path, b'node_name = "w\xffb"\n'))
    assert err.key == ""
    assert "not UTF-8" in err.reason


def test_missing_file(tmp_path: Path) -> None:
    err = load_error(load_agent_config, tmp_path / "nope.toml")
    assert err.key == ""
    assert "No such file" in err.reason


def test_oversized_file(tmp_path: Path) -> None:
    path = write(tmp_path, "#" * (MAX_CONFIG_FILE + 1), name="web.toml")
    err = load_error(load_service_file, path)
    assert err.key == ""
    assert "larger than" in err.reason


def test_server_config(tmp_path: Path) -> None:
    assert load_server_config(None).bind == "0.0.0.0:4150"
    cfg = load_server_config(write(tmp_path, 'bind = "10.0.0.10:4150"\n', "server.toml"))
    assert cfg.bind == "10.0.0.10:4150"
    err = load_error(load_server_config, write(tmp_path, 'bind = "10.0.0.10"\n', "bad.toml"))
    assert err.key == "bind"


# --- services.d ------------------------------------------------------------------------------


def test_service_file_with_one_service(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name = "web"
port = 8080
address = "10.0.3.17"
tags = ["v2", "canary"]
meta = { version = "2" }
weight = 10
weight_warning = 2
user = "www-data"

[[checks]]
http = "http://127.0.0.1:8080/health"
interval = "5s"
header = { Authorization = "Bearer x" }
""",
        "web.toml",
    )
    (svc,) = load_service_file(path)
    assert svc == ServiceDefinition(
        name="web",
        id="web",
        address="10.0.3.17",
        port=8080,
        tags=("v2", "canary"),
        meta={"version": "2"},
        weight=10,
        weight_warning=2,
        user="www-data",
        checks=(
            CheckDefinition(
                http="http://127.0.0.1:8080/health",
                interval=5.0,
                header={"Authorization": "Bearer x"},
            ),
        ),
    )
    assert svc.checks[0].kind == "http"
    assert svc.check_id(0) == "service:web"
    assert svc.check_name(0) == "Service 'web' check"


def test_service_file_with_services_array(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[services]]
name = "web"
id = "web-1"
port = 8080

[[services]]
name = "web"
id = "web-2"
port = 8081

[[services.checks]]
tcp = "127.0.0.1:8081"
""",
        "web.toml",
    )
    services = load_service_file(path)
    assert [(s.id, s.name, s.port) for s in services] == [
        ("web-1", "web", 8080),
        ("web-2", "web", 8081),
    ]
    assert services[0].checks == ()
    assert [c.kind for c in services[1].checks] == ["tcp"]
    assert services[1].check_id(0) == "service:web-2"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('port = 80\ntags = ["a"]', "name", "required key is missing"),
        ('[[services]]\nname = "a"\n[[services]]\nport = 1', "services[1].name", "required"),
        ('name = "web"\nport = 70000', "port", "not a TCP port"),
        ('name = "web"\nport = -1', "port", "not a TCP port"),
        ('name = "web"\nport = "8080"', "port", "expected an integer"),
        (
            '[[services]]\nname = "a"\n[[services]]\nname = "b"\nport = 65536',
            "services[1].port",
            "",
        ),
        ('name = "web"\nportt = 80', "portt", "unknown key"),
        ('name = "web service"', "name", "invalid name"),
        ('name = "web"\nid = "web/1"', "id", "invalid id"),
        ('name = "web"\ntags = ["has space"]', "tags", "invalid tag"),
        ('name = "web"\nweight = 70000', "weight", "0..65535"),
        ('name = "web"\naddress = "not an address!"', "address", "invalid address"),
        (
            'name = "web"\n[[checks]]\nhttp = "http://127.0.0.1/"\ntcp = "127.0.0.1:80"',
            "checks[0].tcp",
            "exactly one of",
        ),
        (
            'name = "web"\n[[checks]]\nttl = "30s"\n[[checks]]\nargs = ["true"]\nttl = "1m"',
            "checks[1].ttl",
            "exactly one of",
        ),
        (
            '[[services]]\nname = "web"\n[[services.checks]]\nhttp = "http://x/"\nargs = ["x"]',
            "services[0].checks[0].args",
            "exactly one of",
        ),
        (
            'name = "web"\n[[checks]]\ntcp = "127.0.0.1:80"\ninterval = "soon"',
            "checks[0].interval",
            "invalid duration",
        ),
        ('name = "web"\n[[checks]]\ntcp = "127.0.0.1:99999"', "checks[0].tcp", "host:port"),
        ('name = "web"\n[[checks]]\nhttp = "ftp://x/"', "checks[0].http", "invalid URL"),
        ('name = "web"\n[[checks]]\nhttp = "http://x/"\nmethod = "get"', "checks[0].method", ""),
        ('name = "web"\n[[checks]]\nttl = "30s"\nstatus = "ok"', "checks[0].status", "one of"),
        (
            'name = "web"\n[[checks]]\nttl = "1m"\nderegister_critical_service_after = "30s"',
            "checks[0].deregister_critical_service_after",
            "at least 1m",
        ),
        ('name = "web"\n[[services]]\nname = "db"', "services", "either"),
        ('services = ["web"]', "services[0]", "expected a table"),
        ("services = 'web'", "services", "either"),
    ],
)
def test_service_file_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    err = load_error(load_service_file, write(tmp_path, text, "web.toml"))
    assert err.key == key
    assert reason in err.reason


def test_check_without_a_kind_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "web"\n[[checks]]\ninterval = "5s"', "web.toml")
    err = load_error(load_service_file, path)
    assert err.key.startswith("checks[0].")
    assert "exactly one of" in err.reason


def test_service_file_errors_name_the_file(tmp_path: Path) -> None:
    for text in ('name = "web"\nport = [', b"name = '\xfe'"):
        path = write(tmp_path, text, "broken.toml")
        err = load_error(load_service_file, path)
        assert err.key == ""
    err = load_error(load_service_file, tmp_path / "missing.toml")
    assert err.key == ""


# --- check ids and timeouts -------------------------------------------------------------------


def service_with_checks(*checks: CheckDefinition, id: str = "web-1") -> ServiceDefinition:
    return ServiceDefinition(name="web", id=id, port=8080, checks=checks)


TTL = CheckDefinition(ttl=30.0)


def test_one_check_gets_the_plain_default_id() -> None:
    assert service_with_checks(TTL).check_id(0) == "service:web-1"
    assert ServiceDefinition(name="web", checks=(TTL,)).check_id(0) == "service:web"


def test_several_checks_are_numbered_from_one() -> None:
    svc = service_with_checks(TTL, CheckDefinition(tcp="127.0.0.1:8080"), TTL)
    assert [svc.check_id(i) for i in range(3)] == [
        "service:web-1:1",
        "service:web-1:2",
        "service:web-1:3",
    ]


def test_explicit_check_id_is_kept() -> None:
    svc = service_with_checks(CheckDefinition(ttl=30.0, id="alive"), TTL)
    assert [svc.check_id(0), svc.check_id(1)] == ["alive", "service:web-1:2"]


def test_check_ids_from_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'name = "api"\n[[checks]]\ntcp = "127.0.0.1:80"\n[[checks]]\nttl = "10s"\nid = "beat"\n'
        '[[checks]]\nargs = ["/bin/true"]\n',
        "api.toml",
    )
    (svc,) = load_service_file(path)
    assert [svc.check_id(i) for i in range(3)] == ["service:api:1", "beat", "service:api:3"]


@pytest.mark.parametrize(
    "checks",
    [
        (CheckDefinition(ttl=30.0, id="alive"), CheckDefinition(ttl=10.0, id="alive")),
        # An explicit id that collides with another check's default id.
        (CheckDefinition(ttl=30.0, id="service:web-1:2"), TTL),
    ],
)
def test_duplicate_check_ids_are_rejected(checks: tuple[CheckDefinition, ...]) -> None:
    with pytest.raises(ValueError, match="duplicate check id") as info:
        service_with_checks(*checks)
    assert getattr(info.value, "key", None) == "checks[1].id"


def test_duplicate_check_ids_in_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'name = "web"\n[[checks]]\nttl = "30s"\nid = "x"\n[[checks]]\nttl = "9s"\nid = "x"\n',
        "web.toml",
    )
    err = load_error(load_service_file, path)
    assert err.key == "checks[1].id"
    assert "duplicate" in err.reason


@pytest.mark.parametrize(
    ("check", "timeout"),
    [
        (CheckDefinition(http="http://127.0.0.1:8080/health"), 10.0),
        (CheckDefinition(tcp="127.0.0.1:8080"), 10.0),
        (CheckDefinition(args=("/usr/local/bin/check",)), 30.0),
        (CheckDefinition(args=("/usr/local/bin/check",), timeout=3.0), 3.0),
        (CheckDefinition(http="http://127.0.0.1/", timeout=0.5), 0.5),
    ],
)
def test_effective_timeout(check: CheckDefinition, timeout: float) -> None:
    assert check.effective_timeout == timeout


def test_check_kinds() -> None:
    assert CheckDefinition(http="https://10.0.0.1/health").kind == "http"
    assert CheckDefinition(tcp="10.0.0.1:5432").kind == "tcp"
    assert CheckDefinition(args=("true",)).kind == "script"
    assert CheckDefinition(ttl=15.0).kind == "ttl"

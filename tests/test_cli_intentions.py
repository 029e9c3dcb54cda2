"""`hostmesh intention allow|deny|delete|list|check` against a real `hostmesh server`
process over HTTPS, with `[intentions] default = "deny"` in its server.toml."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from test_cli_server import Running, cli, one_line_error, server_process

pytestmark = pytest.mark.sockets


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    extra = '\n[intentions]\ndefault = "deny"\n'
    with server_process(tmp_path_factory.mktemp("server"), extra) as running:
        yield running


def check(env: dict[str, str], *args: str) -> dict[str, object]:
    done = cli("intention", "check", *args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_bad_input_is_one_line(server: Running) -> None:
    env = server.env
    one_line_error(cli("intention", "allow", "we b", "db", env=env), "invalid source 'we b'")
    one_line_error(cli("intention", "allow", "web", "*", env=env), "invalid destination '*'")
    one_line_error(
        cli("intention", "allow", "web", "db", "--path-prefix", "api", env=env),
        "must start with '/'",
    )
    one_line_error(
        cli("intention", "allow", "web", "db", "--method", "G3T", env=env), "invalid HTTP method"
    )
    one_line_error(cli("intention", "check", "*", "db", env=env), "concrete source")
    one_line_error(cli("intention", "check", "web", "db", "--path", "x", env=env), "--path")


def test_rules_written_listed_checked_and_deleted_after_bad_input(server: Running) -> None:
    env = server.env
    # The bad input of the test above wrote nothing.
    assert json.loads(cli("intention", "list", "--json", env=env).stdout) == {
        "default": "deny", "intentions": []}  # fmt: skip
    # Nothing written yet: the server's default policy (deny, from server.toml) decides.
    empty = check(env, "web", "db")
    assert empty["allowed"] is False and empty["rule"] is None
    assert "default policy (deny)" in str(empty["reason"])

    assert cli("intention", "deny", "*", "db", env=env).returncode == 0
    done = cli("intention", "allow", "web", "db", "--path-prefix", "/api", "--method", "get",
               "--method", "HEAD", "--description", "reads", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "web -> db allow (path /api, methods GET|HEAD)" in done.stdout
    assert cli("intention", "allow", "api", "db", env=env).returncode == 0

    listed = json.loads(cli("intention", "list", "--json", env=env).stdout)
    assert listed["default"] == "deny"
    assert [(r["source"], r["action"]) for r in listed["intentions"]] == [
        ("web", "allow"), ("api", "allow"), ("*", "deny")]  # fmt: skip
    table = cli("intention", "list", env=env).stdout
    assert "3 intention(s), default policy: deny" in table
    assert "path /api, methods GET|HEAD" in table and "reads" in table

    # The most specific rule that matches decides, and is named.
    ok = check(env, "web", "db", "--method", "GET", "--path", "/api/users")
    assert ok["allowed"] is True
    assert ok["rule"] == {"source": "web", "destination": "db", "action": "allow",
                          "http": {"path_prefix": "/api", "methods": ["GET", "HEAD"]},
                          "description": "reads"}  # fmt: skip
    post = check(env, "web", "db", "--method", "POST", "--path", "/api/users")
    assert post["allowed"] is False and "intention * -> db deny" in str(post["reason"])
    assert check(env, "api", "db")["allowed"] is True
    shown = cli("intention", "check", "web", "db", "--method", "GET", "--path", "/api", env=env)
    assert shown.returncode == 0
    assert "ALLOWED web -> db" in shown.stdout
    assert "allowed by intention web -> db allow [path /api, methods GET|HEAD]" in shown.stdout

    # Rewriting a rule replaces it; deleting one lets the less specific rule decide.
    assert cli("intention", "deny", "api", "db", env=env).returncode == 0
    assert check(env, "api", "db")["allowed"] is False
    assert cli("intention", "delete", "web", "db", env=env).returncode == 0
    gone = check(env, "web", "db", "--method", "GET", "--path", "/api")
    assert gone["allowed"] is False and "* -> db deny" in str(gone["reason"])
    one_line_error(cli("intention", "delete", "web", "db", env=env), "no intention web -> db")

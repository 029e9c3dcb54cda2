#!/usr/bin/env bash
# The project's test command: `bash scripts/test.sh [pytest args...]`.
#
# Works on a fresh Debian 12 machine (as root, or with sudo) that has only its
# system python3 (3.11), and on a developer machine with any Python >= 3.11 as
# `python3` (or $PYTHON). It
#   1. installs the Debian packages the tests need, when missing;
#   2. creates .venv (if missing or broken) and installs the project into it,
#      non-editable, from a freshly built wheel, with the `test` extras;
#   3. runs, stopping at the first failure: ruff check, ruff format --check,
#      mypy --strict on the installed package and on bench/ (nothing else runs
#      the benchmarks), and pytest with "$@".
# CI runs exactly this through .ci/run.
set -euo pipefail

# Debian packages the tests use as real peers or tools. Append here
# (e.g. bind9-dnsutils iproute2 nftables etcd-server).
DEB_PACKAGES="python3 curl ca-certificates bind9-dnsutils dnsmasq-base dnsperf iproute2 systemd etcd-server etcd-client wrk tcpdump"
SCRIPT=scripts/test.sh
# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"

phase "install hostmesh[test] (non-editable)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# setuptools reuses build/lib between builds, so a module deleted from the
# source would still ship; start from an empty one.
rm -rf "$ROOT/build/lib" "$ROOT"/build/bdist.*
"${PIP[@]}" wheel -q --no-deps -w "$WORK/wheel" "$ROOT"
WHEEL=("$WORK"/wheel/hostmesh-*.whl)
[ "${#WHEEL[@]}" -eq 1 ] && [ -f "${WHEEL[0]}" ] || die "expected one wheel, got: ${WHEEL[*]}"
"${PIP[@]}" install -q --upgrade "${WHEEL[0]}[test]"
# Same version number as the copy already installed: force this build in.
"${PIP[@]}" install -q --force-reinstall --no-deps "${WHEEL[0]}"
echo "installed $(basename "${WHEEL[0]}")"

# --- 3. checks, stopping at the first failure ------------------------------------

phase "ruff check"
"$VENV/bin/ruff" check .

phase "ruff format --check"
"$VENV/bin/ruff" format --check .

phase "mypy --strict (installed package)"
# From an empty directory, so that `hostmesh` is the installed copy, not ./hostmesh.
mkdir "$WORK/mypy"
(cd "$WORK/mypy" && "$VENV/bin/mypy" --config-file "$ROOT/pyproject.toml" \
    --cache-dir "$ROOT/.mypy_cache" -p hostmesh)

phase "mypy --strict bench/"
# The benchmarks import each other (mesh.py uses proxy.py's helpers) and tests/'
# simulated network (gossip.py).
(cd "$WORK/mypy" && MYPYPATH="$ROOT/bench:$ROOT/tests" "$VENV/bin/mypy" \
    --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" "$ROOT"/bench/*.py)

phase "pytest $*"
"$VENV/bin/pytest" "$@"

phase "all checks passed"

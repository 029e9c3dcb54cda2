#!/usr/bin/env bash
# Run the mesh on its embedded defaults: `bash scripts/dev.sh [hostmesh dev options]`.
#
# On a fresh Debian 12 machine with Python 3.11 (as root): installs what is
# missing, creates .venv, installs hostmesh into it and runs `hostmesh dev`
# (a server and an agent in one process; Ctrl-C stops it). Afterwards
# `.venv/bin/hostmesh` is the CLI.
set -euo pipefail

# The mesh itself needs no Debian package; curl is for the commands it suggests.
DEB_PACKAGES="curl ca-certificates"
SCRIPT=scripts/dev.sh
# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"

phase "install hostmesh"
"${PIP[@]}" install -q "$ROOT"
"${PIP[@]}" install -q --force-reinstall --no-deps "$ROOT"

phase "hostmesh dev (the CLI is $VENV/bin/hostmesh)"
exec "$VENV/bin/hostmesh" dev "$@"

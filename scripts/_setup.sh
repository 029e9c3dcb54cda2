# Shared set-up for scripts/test.sh and scripts/dev.sh; sourced, not run.
#
# Expects DEB_PACKAGES (space-separated Debian packages) and SCRIPT (for error
# messages). Installs the missing packages, checks Python >= 3.11 and creates
# .venv with current pip/setuptools/wheel. Leaves ROOT, VENV, PIP, phase and
# die defined, and the working directory at the repository root.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
START=$SECONDS

phase() { printf '\n==> [%3ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '%s: error: %s\n' "${SCRIPT:-scripts}" "$*" >&2; exit 1; }

# --- 1. Debian packages ---------------------------------------------------------

deb_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

phase "system packages"
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in $DEB_PACKAGES; do
        deb_installed "$pkg" || missing+=("$pkg")
    done
    # The venv module (or ensurepip, which Debian ships apart) may be missing
    # from a system python3; python3-venv brings both.
    if ! "$PYTHON" -m venv --help >/dev/null 2>&1 \
        || ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
        missing+=(python3-venv)
    fi
else
    echo "not a Debian system (no dpkg-query): skipping, install by hand: $DEB_PACKAGES"
fi
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 \
            || die "missing packages ${missing[*]}: run as root or install sudo"
        SUDO=(sudo)
    fi
    echo "installing: ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "all present: $DEB_PACKAGES"
fi

# --- 2. virtualenv and the project ------------------------------------------------

phase "virtualenv $VENV"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: hostmesh needs Python >= 3.11"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$("$PYTHON" -V 2>&1) is too old: hostmesh needs Python >= 3.11"
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
    || [ ! -x "$VENV/bin/pip" ]; then
    echo "creating it with $("$PYTHON" -V 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
# setuptools and wheel: tests/test_wheel.py then builds without an isolated,
# downloaded backend.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

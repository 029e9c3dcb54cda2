"""The built wheel holds every module of the source tree, py.typed and the CLI entry point.

The folders agent/, catalog/, dns/ and server/ are mapped to subpackages by
setuptools' package-dir; a package left out of pyproject.toml's list works in
the repository and is silently missing from the wheel. This test builds the
wheel, installs it in a fresh virtualenv and imports every module from there.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Not copied into the build tree: VCS data, virtualenvs, caches, old build output
# (setuptools reuses build/lib, which would ship modules deleted from the source).
_COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
)

# Bounds for each subprocess, in seconds (a cold isolated build downloads setuptools).
BUILD_TIMEOUT = 300
STEP_TIMEOUT = 120


def source_modules() -> set[str]:
    """Dotted names of every module in the source tree, by pyproject's package-dir."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    names: set[str] = set()
    for package, folder in package_dir.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join((package, *parts)))
    return names


def _can_build_without_isolation() -> bool:
    """Whether this interpreter has the build backend pyproject.toml asks for."""
    try:
        version = tuple(int(p) for p in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    if version < (68, 0):
        return False
    if version >= (70, 1):  # bdist_wheel moved into setuptools
        return True
    try:
        metadata.version("wheel")
    except metadata.PackageNotFoundError:
        return False
    return True


def _run(args: list[str | Path], *, timeout: float, **kwargs: object) -> str:
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return str(proc.stdout)


def build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_COPY_IGNORE)
    out = tmp_path / "dist"
    # Without isolation when this interpreter has the backend (fast, offline);
    # else pip fetches it into an isolated build environment.
    flags = ["--no-build-isolation"] if _can_build_without_isolation() else []
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "-q", "--no-deps", *flags, "-w", out, src], timeout=BUILD_TIMEOUT)
    [wheel] = out.glob("hostmesh-*.whl")
    return wheel


# What the fresh interpreter runs: import every module of the installed package.
_IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, traceback

    import hostmesh

    found, errors = {"hostmesh"}, {}

    def onerror(name):
        errors[name] = traceback.format_exc()

    for info in pkgutil.walk_packages(hostmesh.__path__, "hostmesh.", onerror=onerror):
        found.add(info.name)
        try:
            importlib.import_module(info.name)
        except BaseException:
            errors[info.name] = traceback.format_exc()

    module, _, attr = sys.argv[1].partition(":")
    try:
        entry = getattr(importlib.import_module(module), attr)
        entry_ok = callable(entry)
    except BaseException:
        errors[sys.argv[1]] = traceback.format_exc()
        entry_ok = False

    json.dump(
        {
            "file": hostmesh.__file__,
            "found": sorted(found),
            "errors": errors,
            "entry_ok": entry_ok,
            "path": sys.path,
        },
        sys.stdout,
    )
    """
)


@pytest.mark.slow
def test_wheel_installs_and_imports_every_module(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()

    # (c) py.typed ships, so users' mypy reads our annotations.
    assert "hostmesh/py.typed" in names

    # (d) the console script.
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    assert parser.has_section("console_scripts"), "no console_scripts in the wheel"
    assert parser["console_scripts"].get("hostmesh") == "hostmesh._entry:main"

    # A fresh virtualenv with only the wheel installed ...
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=STEP_TIMEOUT)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    _run([*pip, "install", "-q", "--no-deps", wheel], timeout=STEP_TIMEOUT)
    assert (venv / "bin" / "hostmesh").exists(), "pip made no hostmesh console script"

    # ... and the dependencies from this interpreter's site-packages, which a
    # .pth file appends after the venv's own site-packages, so they cannot
    # shadow the wheel's hostmesh.
    site_packages = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            timeout=STEP_TIMEOUT,
        ).strip()
    )
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "_hostmesh_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")

    # -I: no PYTHONPATH, no user site, no cwd on sys.path; cwd is not the repo.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = _run(
        [python, "-I", "-c", _IMPORT_ALL, "hostmesh._entry:main"],
        timeout=STEP_TIMEOUT,
        cwd=tmp_path,
        env=env,
    )
    result = json.loads(out)

    # (a) the wheel's copy was imported, not the repository's.
    assert Path(result["file"]).resolve().is_relative_to(venv.resolve()), result["path"]

    # Every module imports; (d) the entry point resolves to a callable.
    assert not result["errors"], "\n".join(
        f"--- {name}\n{tb}" for name, tb in result["errors"].items()
    )
    assert result["entry_ok"]

    # (b) nothing missing from the wheel, nothing extra in it.
    expected = source_modules()
    found = set(result["found"])
    assert found == expected, (
        f"missing from the wheel: {sorted(expected - found)}; "
        f"not in the source tree: {sorted(found - expected)}"
    )


def test_source_modules_follow_the_package_dir_mapping() -> None:
    """The expected set above is derived correctly (a test that can fail)."""
    names = source_modules()
    assert "hostmesh" in names
    assert "hostmesh._errors" in names
    assert "hostmesh.catalog" in names
    assert "hostmesh.catalog._model" in names
    assert not any(".__init__" in n or n.startswith(("catalog", "agent")) for n in names)

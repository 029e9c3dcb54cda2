"""Rules of the code's layout: sans-IO cores stay free of I/O libraries; module conventions.

STYLE.md: "DNS answering, SWIM, the catalog merge, route selection, load
balancing, the CA's decisions: plain classes and functions ... No `import trio`
there; a test keeps it so." This is that test.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The sans-IO modules. Append the DNS core, SWIM, route selection, the balancer
# and the CA's decisions as they land.
SANS_IO_MODULES = (
    "hostmesh.catalog._model",
    "hostmesh.catalog._catalog",
    "hostmesh.catalog._query",
    "hostmesh.catalog._messages",
    "hostmesh.catalog._codec",
    "hostmesh.catalog._keyring",
    "hostmesh.catalog._broadcast",
    "hostmesh.catalog._suspicion",
    "hostmesh.catalog._awareness",
    "hostmesh.catalog._swim",
    "hostmesh.dns._wire",
    "hostmesh.dns._resolver",
    "hostmesh.dns._recursors",
    "hostmesh._routes",
    "hostmesh.agent._http1",
    "hostmesh.agent._zone",
    "hostmesh.agent._balancer",
    "hostmesh.agent._resilience",
    "hostmesh._pki",
    "hostmesh.server._ca",
    "hostmesh.catalog._syncproto",
    "hostmesh.server._leadership",
    "hostmesh.server._deaths",
    "hostmesh.agent._intentions",
)

# Top-level modules a sans-IO module may not import, directly or through a sibling.
FORBIDDEN_IMPORTS = frozenset({"trio", "trio_websocket", "socket", "httpx"})

# Third-party modules loaded before the blocker because they import socket without
# doing I/O: cryptography.x509 imports email.utils (RFC 822 names), which imports socket.
PRELOADED = ("cryptography.x509", "cryptography.x509.verification")


def _package_dirs() -> dict[str, Path]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    return {package: REPO / folder for package, folder in mapping.items()}


def source_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out: dict[str, Path] = {}
    for package, root in _package_dirs().items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def source_of(module: str) -> Path:
    try:
        return source_files()[module]
    except KeyError:
        raise AssertionError(f"{module} has no source file under the package-dir mapping") from None


def forbidden_imports(tree: ast.AST) -> list[str]:
    """``line: statement`` for every import of a forbidden module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name.partition(".")[0] in FORBIDDEN_IMPORTS for name in names):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


# --- sans-IO ----------------------------------------------------------------------


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_sans_io_source_imports_no_io_library(module: str) -> None:
    path = source_of(module)
    bad = forbidden_imports(ast.parse(path.read_text(), str(path)))
    assert not bad, f"{path.relative_to(REPO)} is sans-IO but imports: {bad}"


def test_the_ast_check_sees_every_import_form() -> None:
    tree = ast.parse(
        textwrap.dedent(
            """
            import os, trio
            import trio.lowlevel as ll
            from socket import socket
            from httpx._client import Client
            from . import trio_adapter
            from .trio import x
            def f():
                import trio_websocket
            if True:
                from typing import TYPE_CHECKING
            """
        )
    )
    assert [line.partition(":")[0] for line in forbidden_imports(tree)] == ["2", "3", "4", "5", "9"]


# Runs in a fresh interpreter: import the packages around the sans-IO modules
# normally (a package __init__ may re-export Trio adapters), then forget every
# leaf hostmesh module and every forbidden one, block the forbidden ones and
# import the sans-IO modules again, so that their own imports and their
# siblings' imports all run under the blocker.
_IMPORT_BLOCKED = textwrap.dedent(
    """
    import importlib, json, sys, traceback

    targets, blocked = json.loads(sys.argv[1]), frozenset(json.loads(sys.argv[2]))

    for name in json.loads(sys.argv[3]):
        importlib.import_module(name)
    for name in targets:
        if "." in name:
            importlib.import_module(name.rpartition(".")[0])
    for name, mod in list(sys.modules.items()):
        top = name.partition(".")[0]
        if top in blocked or (top == "hostmesh" and not hasattr(mod, "__path__")):
            del sys.modules[name]

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ImportError(f"import of {name} blocked: sans-IO module")
            return None

    sys.meta_path.insert(0, Blocker())
    errors = {}
    for name in targets:
        try:
            importlib.import_module(name)
        except BaseException:
            errors[name] = traceback.format_exc()
    json.dump(errors, sys.stdout)
    """
)


def _import_with_io_blocked(modules: tuple[str, ...]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [
            sys.executable,
            "-I",  # no cwd on sys.path: hostmesh is the installed package
            "-c",
            _IMPORT_BLOCKED,
            json.dumps(list(modules)),
            json.dumps(sorted(FORBIDDEN_IMPORTS)),
            json.dumps(PRELOADED),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO.parent,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    errors: dict[str, str] = json.loads(proc.stdout)
    return errors


def test_sans_io_modules_import_with_io_libraries_blocked() -> None:
    errors = _import_with_io_blocked(SANS_IO_MODULES)
    assert not errors, "\n".join(f"--- {name}\n{tb}" for name, tb in errors.items())


def test_the_blocker_catches_an_io_import() -> None:
    """The subprocess check can fail: a module that imports socket is refused."""
    errors = _import_with_io_blocked(("hostmesh.catalog._model", "json.tool", "socketserver"))
    assert set(errors) == {"socketserver"}
    assert "import of socket blocked" in errors["socketserver"]


# --- module conventions -------------------------------------------------------------

_FILES = source_files()


def _is_empty(tree: ast.Module) -> bool:
    """Only a docstring, or nothing at all."""
    body = tree.body
    return not body or (
        len(body) == 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    )


@pytest.mark.parametrize("module", sorted(_FILES))
def test_future_annotations(module: str) -> None:
    path = _FILES[module]
    tree = ast.parse(path.read_text(), str(path))
    if _is_empty(tree):
        return
    has_future = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )
    assert has_future, f"{path.relative_to(REPO)}: add `from __future__ import annotations`"


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).partition(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def dunder_all(tree: ast.Module) -> list[str] | None:
    """The literal ``__all__`` of a module, None when it has none."""
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            value = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets, value = [node.target.id], node.value
        else:
            continue
        if "__all__" in targets:
            assert isinstance(value, ast.List | ast.Tuple), "__all__ must be a literal list"
            items = [e.value for e in value.elts if isinstance(e, ast.Constant)]
            assert len(items) == len(value.elts) and all(isinstance(i, str) for i in items)
            return [str(i) for i in items]
    return None


_PRIVATE = sorted(m for m in _FILES if m.rpartition(".")[2].startswith("_"))


@pytest.mark.parametrize("module", _PRIVATE)
def test_private_modules_define_all(module: str) -> None:
    path = _FILES[module]
    tree = ast.parse(path.read_text(), str(path))
    exported = dunder_all(tree)
    assert exported is not None, f"{path.relative_to(REPO)}: private module without __all__"
    undefined = set(exported) - _top_level_names(tree)
    assert not undefined, f"{path.relative_to(REPO)}: __all__ names undefined {sorted(undefined)}"
    assert len(set(exported)) == len(exported), f"{path.relative_to(REPO)}: duplicate in __all__"


def test_layout_covers_every_mapped_folder() -> None:
    """The checks above see the mapped subpackages, not only hostmesh/."""
    assert {"hostmesh._errors", "hostmesh.catalog._model"} <= set(_PRIVATE)
    assert "hostmesh.catalog" in _FILES

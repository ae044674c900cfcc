"""The package's layers, checked on its source: only the engine layer (pyinterp/engine/: the pass engine and what it
runs on, the native library, the backend, its multi-sequence form, the readouts and the RPC server) touches the
native library, and no module outside it reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyinterp"
ENGINE = {"engine"}
NATIVE = {"_ffi", "_backends", "backend"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "csrc" not in p.parts)


def outside_engine(path: Path) -> bool:
    return path.relative_to(PACKAGE).parts[0] not in ENGINE


def imported(node: ast.AST) -> list[tuple[str, str]]:
    """(module, name) pairs an import statement brings in; module relative to the package ("backend")."""
    if isinstance(node, ast.ImportFrom):
        module = (node.module or "").split(".")[-1] if node.level else node.module or ""
        return [(module, a.name) for a in node.names]
    if isinstance(node, ast.Import):
        return [(a.name.split(".")[-1], "") for a in node.names]
    return []


def violations(source: str, outside: bool) -> list[str]:
    """What a module's ``source`` does that its layer may not: outside the engine, import the native layer or reach
    a private name of another object or module (its own ``self``/``cls`` excepted)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not outside:
            break
        for module, name in imported(node):
            if module in NATIVE or name in NATIVE:
                found.append(f"line {node.lineno}: imports {module or name} (the native layer)")
            if name.startswith("_") and not name.startswith("__"):
                found.append(f"line {node.lineno}: imports the private name {name}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"line {node.lineno}: reaches the private name .{node.attr}")
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_reach_and_no_native_outside_the_engine(path):
    assert violations(path.read_text(), outside_engine(path)) == []


def test_the_check_finds_each_kind():
    """The checker itself, on the reaches this layout removed."""
    source = ("from .backend import Backend\nfrom . import _ffi\nfrom .model import _check_gguf\n\n"
              "def f(model):\n    return model._forward([1]), model._backend\n")
    found = "\n".join(violations(source, outside=True))
    for reach in ("imports backend", "imports _ffi", "private name _check_gguf", "._forward", "._backend"):
        assert reach in found
    assert violations(source, outside=False) == []
    assert outside_engine(PACKAGE / "analysis" / "lens.py") and not outside_engine(PACKAGE / "engine" / "readouts" / "lens.py")

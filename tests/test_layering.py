"""The package's modules import each other in layers: no import cycle, deferred (function-level)
imports included, so that a module never reaches back up to the module that uses it."""

from __future__ import annotations

import ast
from pathlib import Path

import vqt

ROOT = Path(vqt.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The vqt modules a file imports, at module level or inside functions: ``from vqt.ops import layer``
    is the module vqt.ops.layer, ``from vqt.ops import Backend`` the package vqt.ops."""
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # imports for annotations only never run
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vqt") and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("vqt"))
    return out


def test_no_import_cycles():
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: {i for i in top_level_imports(p, set(modules)) if i in modules and i != m}
             for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for nxt in sorted(graph[m]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [m, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])

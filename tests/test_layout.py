"""The import layout of dera_gguf (docs/architecture.md): no circles, arrows pointing down.

Every import of every module counts, at module level or inside a function, read from the
source with ``ast`` (nothing is imported here).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "dera_gguf"
FRONTS = ("dera_gguf.cli", "dera_gguf.serve", "dera_gguf.eval")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the dera_gguf modules it imports (``from . import x`` counts as module x)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets.update(f"{target}.{a.name}" if f"{target}.{a.name}" in paths else target for a in node.names)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def front_of(module: str) -> str:
    return next((f for f in FRONTS if module == f or module.startswith(f + ".")), "")


def test_the_imports_form_no_circle():
    assert cycles(import_graph()) == []


def test_the_core_imports_no_front():
    graph = import_graph()
    core = [m for m in graph if m.count(".") == 1 and not front_of(m)]
    assert core and [(m, t) for m in core for t in sorted(graph[m]) if front_of(t)] == []


def test_serve_and_eval_import_no_other_front():
    """cli/ is the command front over eval/ and serve/; they import neither cli/ nor each other."""
    graph = import_graph()
    crossing = [
        (m, t)
        for m in sorted(graph)
        for t in sorted(graph[m])
        if front_of(m) in ("dera_gguf.serve", "dera_gguf.eval") and front_of(t) not in ("", front_of(m))
    ]
    assert crossing == []

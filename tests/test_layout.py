"""The layout of dera_gguf (docs/architecture.md): no circles, arrows pointing down, no reaching
into another module's private names, one decode loop.

Every import of every module counts, at module level or inside a function, read from the
source with ``ast`` (nothing is imported here).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "dera_gguf"
FRONTS = ("dera_gguf.cli", "dera_gguf.serve", "dera_gguf.eval", "dera_gguf.convert", "dera_gguf.llm_plugin")
# The layers, highest first: a module imports only from its own layer or lower ones.
LAYERS = [
    FRONTS,
    ("dera_gguf.llama", "dera_gguf.batch"),
    ("dera_gguf.runtime", "dera_gguf.speculation", "dera_gguf.pairs"),
    ("dera_gguf.blend", "dera_gguf.sampling", "dera_gguf.checks", "dera_gguf.errors"),
]
# Where running sequences are decoded and sampled: the batch generator (every multi-sequence path),
# and DeRaLlama's seams, where llama-cpp-python's own generate() loop samples (docs/architecture.md).
DECODE_LOOPS = {"dera_gguf.batch.generator", "dera_gguf.llama"}


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
    core = [m for m in graph if m != "dera_gguf" and not front_of(m)]
    assert core and [(m, t) for m in core for t in sorted(graph[m]) if front_of(t)] == []


def layer_of(module: str) -> int:
    """The module's layer (0: the fronts); every module of the package has one (the package's own
    ``__init__``, its public API, is DeRaLlama's layer)."""
    if module == "dera_gguf":
        return 1
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py's LAYERS (docs/architecture.md)")


def test_no_module_imports_from_a_higher_layer():
    graph = import_graph()
    upward = [(m, t) for m in sorted(graph) if m != "dera_gguf" for t in sorted(graph[m]) if layer_of(t) < layer_of(m)]
    assert upward == []


def test_no_module_reaches_into_another_modules_private_names():
    """``from x import _name``, or ``obj._name`` where ``_name`` is not one of the module's own private
    names: only a module's own code uses its private names. llama-cpp-python's internals are read only
    by DeRaLlama's seams and runtime.prompts; a named tuple's ``_replace`` and kin are public."""
    seams = {"dera_gguf.llama", "dera_gguf.runtime.prompts"}
    public = {"_replace", "_asdict", "_fields", "_make"}
    reaches = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        own |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
        own |= public
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dera_gguf")):
                reaches += [(name, a.name) for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr in own or name in seams:
                    continue
                reaches.append((name, ast.unparse(node)))
    assert reaches == []


def test_one_decode_loop():
    """Only the batch generator (and DeRaLlama's seams) both decode and sample: any other function that
    does is a second decode loop (issue 30)."""
    loops = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            called = {
                c.func.attr for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
            }
            if called & {"decode", "decode_each", "advance", "prefill"} and "sample" in called:
                loops.append((name, node.name))
    assert [(m, f) for m, f in loops if m not in DECODE_LOOPS] == []


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


def test_the_architecture_page_names_every_part_and_layer():
    """docs/architecture.md's map stays true: every folder and top-level module of the package is on it,
    and each layer of LAYERS is named there."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    parts = [p.name + "/" if p.is_dir() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("__")]
    parts = [p for p in parts if p.endswith((".py", "/")) and p != "data/"]
    assert [p for p in parts if f"{p}" not in page] == []
    named = [m.rpartition(".")[2] for layer in LAYERS for m in layer]
    assert [n for n in named if n not in page] == []

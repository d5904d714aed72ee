"""The package's import graph, read from the source: no cycle (function-local imports counted, so none can be
hiding one), no function-local import of a package module at all, and every import goes down the layers
docs/design.md draws."""

from __future__ import annotations

import ast
from pathlib import Path

import antibackdoor

ROOT = Path(antibackdoor.__file__).parent
PKG = "antibackdoor"

#: the layers, lowest first; a module may import its own layer and the ones below, never one above
#: (the name is the top-level module or package under antibackdoor)
LAYERS = [
    {"errors", "config", "seeding", "caching", "jsonutil", "locking", "registry", "progress", "precision"},
    {"data"},
    {"models", "adversarial", "parts", "surplus"},
    {"training", "metrics", "plots", "selfsup"},
    {"attacks", "stages"},
    {"detectors"},
    {"defenses"},
    {"runpath", "experiment", "doctor"},
    {"defend", "bench"},
    {"report"},
    {"cli", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    if node.level:
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = []
    for alias in node.names:
        full = f"{target}.{alias.name}"
        name = full if full in MODULES else target
        if name in MODULES:
            out.append(name)
    return out


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """module -> the package modules it imports (a registry package that imports all its submodules depends on
    each), and the function-local imports as (module, imported)."""
    edges: dict[str, set[str]] = {}
    local: list[tuple[str, str]] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        in_function = {id(s) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                       for s in ast.walk(f) if isinstance(s, ast.Import | ast.ImportFrom)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for name in imported(module, node):
                    deps.add(name)
                    if id(node) in in_function:
                        local.append((module, name))
        if path.name == "__init__.py" and "import_submodules(" in path.read_text():
            deps |= {m for m in MODULES if m.rpartition(".")[0] == module and not m.rpartition(".")[2].startswith("_")}
        deps.discard(module)
        edges[module] = deps
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return RANK[top]


def test_the_reader_sees_the_imports_it_must():
    edges, _ = graph()
    assert "antibackdoor.stages.context" in edges["antibackdoor.defenses.base"]
    assert "antibackdoor.stages" in edges["antibackdoor.detectors.base"]
    assert "antibackdoor.defenses.a_abl" in edges["antibackdoor.defenses"]  # the registry imports every module


def test_no_import_cycle_even_counting_function_local_imports():
    edges, _ = graph()
    assert cycles(edges) == []


def test_no_function_local_import_of_a_package_module():
    _, local = graph()
    assert local == []


def test_every_module_has_a_layer_and_imports_only_down():
    edges, _ = graph()
    up = [(m, d) for m, deps in edges.items() for d in deps if layer(d) > layer(m)]
    assert up == []


def test_detectors_and_stages_never_reach_a_defense():
    edges, _ = graph()
    below = [m for m in edges if m.startswith(("antibackdoor.detectors", "antibackdoor.stages"))]
    assert not [(m, d) for m in below for d in edges[m] if d.startswith("antibackdoor.defenses")]
    assert not [(m, d) for m in edges if m.startswith("antibackdoor.stages") for d in edges[m]
                if d.startswith("antibackdoor.detectors")]


def test_a_planted_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

"""The layers of docs/ARCHITECTURE.md, checked on the source: imports point downward only, no circle.

The import graph is read from the code (every ``import`` / ``from ... import``, module level or inside
a function) of gram_plugin/ and adapters/ (installed as gram_plugin.adapters); nothing is imported.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"gram_plugin": REPO / "gram_plugin", "gram_plugin.adapters": REPO / "adapters"}

# docs/ARCHITECTURE.md's layers, bottom first; a module may import its own layer and the ones below
LAYERS = {
    "base": ["errors", "marking", "tasks", "transforms", "scale", "pixel_prompt", "extras", "paths", "config", "stats",
             "safeio", "lazy", "interrupts"],
    "core": ["prompts", "regulator", "hooks", "metastep", "metabatch", "meta"],
    "applications": ["data", "cache", "models", "finetune", "backbones", "chc"],
    "ring": ["adapters", "cli"],
}
# within the ring: the adapters are a library, the CLI is the application on top of it
NEVER = {"adapters": ["cli"], "errors": ["*"], "marking": ["*"], "lazy": ["*"]}


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "gram_plugin" and parts and parts[0] == "adapters":
                continue
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _part(module: str) -> str:
    """The top part of a module's name below gram_plugin: gram_plugin.chc.tasks -> chc."""
    rest = module.split(".")[1:]
    return rest[0] if rest else ""


def _layer(module: str) -> int | None:
    for i, parts in enumerate(LAYERS.values()):
        if _part(module) in parts:
            return i
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if m != "gram_plugin" and _layer(m) is None] == []


def test_imports_point_downward_only(graph):
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
              if t != "gram_plugin" and _layer(m) is not None and _layer(t) > _layer(m)]
    assert upward == []


def test_the_never_imports(graph):
    broken = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
              for banned in NEVER.get(_part(m), []) if banned == "*" or _part(t) == banned]
    assert broken == []


def test_no_import_circle(graph):
    """Between modules (a package's own __init__ re-exporting its modules is not a circle)."""
    edges = {m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".")} for m, ts in graph.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def test_packages_import_their_names_on_first_use():
    """``gram_plugin`` and ``gram_plugin.chc`` import no torch until a name is asked for (gram_plugin.lazy); then
    every name of their ``__all__`` resolves and ``dir()`` lists it (a fresh interpreter: pytest's has torch)."""
    report = """
import json, sys
import gram_plugin, gram_plugin.chc, gram_plugin.config, gram_plugin.errors
torch_at_import = "torch" in sys.modules
from gram_plugin import MetaConfig
from gram_plugin.chc import CHCConfig
missing = [f"{p.__name__}.{n}" for p in (gram_plugin, gram_plugin.chc) for n in p.__all__ if getattr(p, n, None) is None]
print(json.dumps({"torch at import": torch_at_import, "missing": missing, "MetaConfig": MetaConfig.__module__,
                  "unlisted": [n for p in (gram_plugin, gram_plugin.chc) for n in p.__all__ if n not in dir(p)],
                  "no such name": not hasattr(gram_plugin, "no_such_name")}))
"""
    done = subprocess.run([sys.executable, "-c", report], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "torch at import": False, "missing": [], "MetaConfig": "gram_plugin.config", "unlisted": [], "no such name": True}

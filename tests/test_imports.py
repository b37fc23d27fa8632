"""The lit_gpt modules import each other without circles (issue 11, point 1).

The graph is read from the source, every ``import`` counted: at module level, inside functions (the lazy imports
that hid the circles analysis <-> hf and evaluate <-> trainer) and under ``TYPE_CHECKING``. A module that needs
one above it in the graph has the wrong home; move the shared piece down (lit_gpt.probe, lit_gpt.data) instead of
importing lazily.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

PKG = Path(__file__).resolve().parents[1] / "lit_gpt"


def module_names() -> Dict[str, Path]:
    """``lit_gpt.x`` -> file, for every module of the package (``lit_gpt`` for its __init__)."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> Dict[str, Set[str]]:
    """module -> the lit_gpt modules it imports anywhere in its file (``from lit_gpt import GPT`` is the package,
    ``from lit_gpt import evaluate`` the module)."""
    mods = module_names()
    graph: Dict[str, Set[str]] = {}
    for name, f in mods.items():
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(mods)
                deps |= subs
                if len(subs) < len(node.names):
                    deps.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{f}: relative import; write `from lit_gpt... import`")
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as a path [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: Dict[str, int] = {}          # 1: on the current path, 2: done
    path: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_graph_sees_lazy_and_package_imports():
    g = import_graph()
    assert len(g) >= 25 and "lit_gpt.kernels.sim_attention" in g
    assert "lit_gpt.evaluate" in g["lit_gpt.trainer"]          # module level
    assert "lit_gpt.hf" in g["lit_gpt.evaluate"]               # inside model_forward
    assert "lit_gpt.kernels.sim_attention" in g["lit_gpt.model"]   # `from lit_gpt.kernels import sim_attention`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module imports in a fresh interpreter, each after the modules it needs (a topological order)."""
    g = import_graph()
    order: List[str] = []
    done: Set[str] = set()

    def add(m: str) -> None:
        if m in done:
            return
        done.add(m)
        for d in sorted(g[m]):
            add(d)
        order.append(m)

    for m in sorted(g):
        add(m)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *order], cwd=PKG.parent, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

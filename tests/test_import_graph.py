"""The code is composed, not a hub: no import circle anywhere, and no feature imports the app.

The graph is read with ``ast`` (every import counts: module level, inside functions, and under
``TYPE_CHECKING``), so a circle cannot hide behind a lazy import.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "controller", "protocol", "firmware_bridge")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module a dotted name lives in (the longest known prefix), or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imported(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``mod`` imports: ``from pkg import sub`` counts as ``pkg.sub`` when that
    is a module, else as ``pkg``."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [resolve(a.name, known) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [resolve(f"{prefix}.{a.name}", known) for a in node.names]
        else:
            continue
        out.update(t for t in targets if t and t != mod)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imported(m, p, known) for m, p in known.items()}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_anywhere():
    assert cycles(graph()) == []


def test_no_feature_imports_the_agent_app_and_sides_stay_apart():
    g = graph()
    assert {m for m, deps in g.items() if "agent.app" in deps} <= {"agent.cli"}
    assert not {m for m, deps in g.items() if m.startswith("agent") and any(d.startswith("controller") for d in deps)}
    assert not {m for m, deps in g.items() if m.startswith("controller") and any(d.startswith("agent") for d in deps)}
    assert not {m for m, deps in g.items() if m.startswith("protocol")
                and any(d.startswith(("agent", "controller")) for d in deps)}

"""The package's shape: imports point flows -> tasks -> core, no import cycle anywhere (type-only
imports included), and the core library imports neither Prefect nor MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"trace_core": "trace_realign.core", "tasks": "trace_realign.tasks", "flows": "trace_realign.flows"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([name, *parts])] = f
    return out


def imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (inside functions and ``if TYPE_CHECKING``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {n for n in imported_names(f) if n in mods and n != m} for m, f in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_constructed_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_imports_point_one_way():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            if module.startswith("trace_realign.core") and not target.startswith("trace_realign.core"):
                wrong.append((module, target))
            if module.startswith("trace_realign.tasks") and target.startswith("trace_realign.flows"):
                wrong.append((module, target))
    assert wrong == []


SHARED_TASK_MODULES = {f"trace_realign.tasks.{m}" for m in ("common", "artifacts", "tracking", "mlflow_model", "plots")}


def test_stage_tasks_do_not_import_each_other():
    """A stage task reads its inputs, calls the library and writes its artifacts: what two stages
    share lives in the shared task modules or in the library, never in a sibling stage."""
    graph = import_graph()
    stages = {m for m in graph if m.startswith("trace_realign.tasks.") and m not in SHARED_TASK_MODULES}
    assert len(stages) >= 6
    assert {m: sorted(graph[m] & stages) for m in stages if graph[m] & stages} == {}


def test_the_core_library_imports_neither_prefect_nor_mlflow():
    mods = modules()
    offending = {
        m: sorted(n for n in imported_names(f) if n.split(".")[0] in ("prefect", "mlflow"))
        for m, f in mods.items()
        if m.startswith("trace_realign.core")
    }
    assert {m: n for m, n in offending.items() if n} == {}

"""The layout's rules, checked on the source: who imports what, no import circle, Keras Tuner's internals in one
module."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "tracking", "sweeps", "benchmarks")


def _modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_pipeline_never_imports_mlflow_or_keras_tuner_and_tracking_never_keras_tuner():
    for name, path in _modules().items():
        imported = {m.split(".")[0] for m in _imports(path)}
        if name.startswith("pipeline."):
            assert not imported & {"mlflow", "keras_tuner", "sweeps", "tracking"}, name
        if name.startswith("tracking."):
            assert not imported & {"keras_tuner", "sweeps"}, name


def test_no_import_circle():
    """Not even through an import inside a function (the warm spare's backbone pool made one, round 2)."""
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import circle: {' -> '.join([*trail[trail.index(nxt):], nxt])}"
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_the_patch_module_touches_keras_tuners_internals():
    private = re.compile(r"keras_tuner\.src|\boracle\._[a-z]\w*|\bkt_config\b")
    for name, path in _modules().items():
        if name != "sweeps.ktpatches":
            found = private.findall(path.read_text())
            assert not found, f"{name} touches Keras Tuner's internals: {found}"

"""The layers of the code (README, Development): every import, lazy ones included, runs down or within a room,
there are no import cycles, and only the rank's entry point reaches into train/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "model", "launch")

# Lower numbers are lower floors; a room may import its own floor's rooms only where listed in SIDEWAYS.
FLOORS = {
    "model": 0,
    "launch": 0,
    "orchestrator.errors": 0,
    "orchestrator.files": 0,
    "orchestrator.layout": 0,
    "orchestrator.specs": 1,
    "orchestrator.data": 2,
    "orchestrator.tracking": 2,
    "orchestrator.components": 3,
    "orchestrator.evaluation": 3,
    "orchestrator.jobs": 4,
    "orchestrator.sweeps": 5,
    "orchestrator.train": 5,
    "orchestrator.trained": 5,
    "orchestrator.prepare": 6,
    "orchestrator.worker": 6,
    "orchestrator.cli": 7,
}
# An evaluation draws samples as the components make them (sampler settings, VAE, model input).
SIDEWAYS: set[tuple[str, str]] = {
    ("orchestrator.evaluation", "orchestrator.components"),
    # the end of a finished job logs its checkpoint as the run's MLflow model, packaged the way `orch export` does
    ("orchestrator.train", "orchestrator.trained"),
}


def room_of(module: str) -> str:
    best = max((room for room in FLOORS if module == room or module.startswith(room + ".")), key=len, default=None)
    assert best is not None, f"{module} belongs to no room of the layer table; add it to FLOORS"
    return best


def module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from orchestrator.jobs import plan` names the module orchestrator.jobs.plan
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def project_modules() -> dict[str, Path]:
    return {module_of(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name is, or lives in (a name imported from a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = {resolve(name, modules) for name in imports_of(path)}
        graph[module] = {t for t in targets if t and t != module and not modules[t].name == "__init__.py"}
    return graph


def test_every_import_runs_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            here, there = room_of(module), room_of(target)
            if here != there and FLOORS[there] >= FLOORS[here] and (here, there) not in SIDEWAYS:
                wrong.append(f"{module} (floor {FLOORS[here]}) imports {target} (floor {FLOORS[there]})")
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(sorted(wrong))


def test_only_the_rank_entry_point_imports_the_training_runtime():
    outside = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target.startswith("orchestrator.train.")
        and not module.startswith("orchestrator.train")
        and module != "orchestrator.worker"
    )
    assert not outside, "\n".join(outside)


def test_there_are_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(
                    " -> ".join(path[path.index(target) :] + [module, target])
                    if target in path
                    else f"{module} -> {target}"
                )
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_table_knows_every_module():
    for module in project_modules():
        if module != "orchestrator":  # the package's empty __init__
            room_of(module)  # fails naming the module that belongs nowhere

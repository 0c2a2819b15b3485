"""Dependencies point one way: spec ← trainer; spec ← operator ← cli (and the service). Read from the
source's import statements (module level and inside functions alike), so a late import cannot hide one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {"spec": "spec", "trainer": "trainer", "operator": "operator", "cli": "cli", "service": "service"}
# What each component may import of dlmctl (besides itself).
ALLOWED = {
    "spec": set(),
    "trainer": {"spec"},
    "operator": {"spec"},
    "cli": {"spec", "operator", "trainer"},  # the trainer only for `sample`/`export`, imported when they run
    "service": {"spec", "operator"},
}


def dlmctl_imports(path: Path) -> set[str]:
    """The dlmctl components a module imports, absolute or relative."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.parent.relative_to(ROOT).parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                names = [".".join(["dlmctl", *base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "dlmctl" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("component", [c for c in COMPONENTS if (ROOT / COMPONENTS[c]).is_dir()])
def test_a_component_imports_only_the_layers_below_it(component):
    offenders = {}
    for path in sorted((ROOT / COMPONENTS[component]).rglob("*.py")):
        wrong = dlmctl_imports(path) - ALLOWED[component] - {component}
        if wrong:
            offenders[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not offenders, f"{component} must not import {offenders}"


def test_the_operator_folder_never_shadows_the_standard_library():
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_the_checker_sees_relative_and_late_imports(tmp_path):
    module = ROOT / "operator" / "_layers_probe.py"
    module.write_text("def f():\n    from ..cli import app\n    import dlmctl.trainer.loop\n")
    try:
        assert dlmctl_imports(module) == {"cli", "trainer"}
    finally:
        module.unlink()


# --- inside the trainer ------------------------------------------------------------------------------
# The trainer's modules from the bottom up; a module imports only modules of lower layers (or its own).
# Three strands share the lower layers: storage and checkpoints; data; model, generation and evaluation.
TRAINER_LAYERS = [
    {"storage", "store_errors", "phases", "engine", "models", "hf_modeling_dlm"},
    {"retries", "corpus", "objectives"},
    {"manifest", "tokenizer", "sample"},
    {"transfer", "data_plan", "scoring"},
    {"checkpoint_store", "metrics", "export", "evaluate", "sampler", "eval_data"},
    {"training_state", "token_cache", "lm_eval_adapter"},
    {"data"},
    {"runs"},  # run-level entry points: build_model, export_final, sample_run, export_run
    {"loop"},  # train
    {"__main__"},
]
TRAINER = ROOT / "trainer"


def trainer_module(path: Path) -> str:
    """`checkpoints`, `models` (for the models package and everything in it), `__main__`."""
    return path.relative_to(TRAINER).with_suffix("").parts[0]


def trainer_imports(path: Path) -> set[str]:
    """The trainer modules `path` imports (relative or absolute, module level and inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    package = list(path.relative_to(TRAINER).parts[:-1])  # [] for trainer/x.py, ["models"] for trainer/models/x.py
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level > len(package) + 1:
                continue  # above the trainer: the component test checks those
            base = package[: len(package) - node.level + 1]
            targets = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            targets = [m.split(".")[2:] for m in modules if m.startswith("dlmctl.trainer.")]
        else:
            continue
        found.update(target[0] for target in targets if target)
    return found - {trainer_module(path)}


def trainer_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(TRAINER.rglob("*.py")):
        if path.name != "__init__.py" or path.parent != TRAINER:
            graph.setdefault(trainer_module(path), set()).update(trainer_imports(path))
    return graph


def test_every_trainer_module_has_a_layer():
    placed = set().union(*TRAINER_LAYERS)
    assert sum(map(len, TRAINER_LAYERS)) == len(placed), "a module is in two layers"
    assert set(trainer_graph()) == placed


def test_a_trainer_module_imports_only_lower_layers():
    layer = {module: i for i, modules in enumerate(TRAINER_LAYERS) for module in modules}
    upward = {f"{m} -> {d}": f"layer {layer[m]} -> {layer[d]}" for m, deps in trainer_graph().items()
              for d in deps if layer[d] >= layer[m]}
    assert not upward, f"imports that do not point down: {upward}"


def test_the_trainer_import_graph_has_no_cycle():
    graph = trainer_graph()
    done, visiting = set(), []

    def visit(module):
        if module in visiting:
            raise AssertionError(f"import cycle: {' -> '.join(visiting[visiting.index(module):] + [module])}")
        if module not in done:
            visiting.append(module)
            for dependency in sorted(graph[module]):
                visit(dependency)
            visiting.pop()
            done.add(module)

    for module in graph:
        visit(module)


def test_the_trainer_checker_sees_relative_absolute_and_late_imports():
    probe = TRAINER / "models" / "_layers_probe.py"
    probe.write_text("from . import dense\nfrom .. import runs\nfrom ..store_errors import describe\n"
                     "def f():\n    import dlmctl.trainer.loop\n    from dlmctl.trainer.data import prepare_data\n")
    try:
        assert trainer_imports(probe) == {"runs", "store_errors", "loop", "data"}
    finally:
        probe.unlink()


def test_no_trainer_module_is_imported_inside_a_function():
    """A late import of a trainer module is how a cycle hides; heavy optional libraries may still load late."""
    late = []
    for path in sorted(TRAINER.rglob("*.py")):
        for function in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    relative = isinstance(node, ast.ImportFrom) and node.level
                    absolute = isinstance(node, (ast.Import, ast.ImportFrom)) and "dlmctl.trainer" in ast.unparse(node)
                    if relative or absolute:
                        late.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not late, late

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

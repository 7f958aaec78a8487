"""dvc.yaml's code dependencies cannot drift: each stage lists every tasks/ module its code imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """tasks/ files reachable from `module` through imports, lazy ones inside functions included."""
    seen = set() if seen is None else seen
    path = ROOT / (module.replace(".", "/") + ".py")
    if module in seen or not path.exists():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            if name.split(".")[0] == "tasks":
                imported_modules(name, seen)
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_lists_every_module_it_imports(stage: str) -> None:
    needed = {module.replace(".", "/") + ".py" for module in imported_modules(f"tasks.{stage}")}
    listed = {dep for dep in STAGES[stage]["deps"] if dep.startswith("tasks/")}
    assert needed - listed == set(), f"dvc.yaml stage {stage} misses code it imports"
    assert listed - needed == set(), f"dvc.yaml stage {stage} lists code it does not import"

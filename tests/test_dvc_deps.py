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


def test_dvc_yaml_declares_the_stages_in_the_order_the_code_runs_them() -> None:
    from flows.pipeline import PIPELINE
    from tasks.stages import STAGES as CODE_STAGES

    assert tuple(STAGES) == CODE_STAGES == PIPELINE


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_lists_every_module_it_imports(stage: str) -> None:
    needed = {module.replace(".", "/") + ".py" for module in imported_modules(f"tasks.{stage}")}
    listed = {dep for dep in STAGES[stage]["deps"] if dep.startswith("tasks/")}
    assert needed - listed == set(), f"dvc.yaml stage {stage} misses code it imports"
    assert listed - needed == set(), f"dvc.yaml stage {stage} lists code it does not import"


@pytest.mark.slow
def test_editing_a_module_marks_exactly_the_stages_that_import_it(built_project: Path, services_env: dict) -> None:
    """What the import-derived deps buy: `dvc status` reports the stages whose code changed, and only those."""
    import json

    from tests.conftest import BIN, run

    module = "tasks/derived.py"
    importers = {stage for stage, spec in STAGES.items() if module in spec["deps"]}
    assert importers and importers != set(STAGES)
    path = built_project / module
    original = path.read_bytes()
    before = run([str(BIN / "dvc"), "status", "--json"], built_project, services_env).stdout
    try:
        path.write_bytes(original + b"\n# an edit\n")
        status = json.loads(run([str(BIN / "dvc"), "status", "--json"], built_project, services_env).stdout)
        changed = {stage for stage, entries in status.items()
                   if any(module in entry.get("changed deps", {}) for entry in entries if isinstance(entry, dict))}
        assert changed == importers, status
    finally:
        path.write_bytes(original)
    assert json.loads(run([str(BIN / "dvc"), "status", "--json"], built_project, services_env).stdout) == json.loads(before)

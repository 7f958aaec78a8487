"""dvc.yaml's code dependencies cannot drift: each stage lists every module of tasks/ and cwtops/ its code imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
CODE_ROOTS = ("tasks", "cwtops")


def source_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _runs_code(path: Path) -> bool:
    """False for a package __init__.py that holds only its docstring (editing it changes no result)."""
    body = ast.parse(path.read_text()).body
    return not all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def code_deps(stage: str) -> set[str]:
    """What dvc.yaml must list for a stage: every source file its module reaches that runs code."""
    files = (source_file(module) for module in imported_modules(f"tasks.{stage}"))
    return {str(path.relative_to(ROOT)) for path in files if path is not None and _runs_code(path)}


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """Files of tasks/ and cwtops/ reachable from `module` through imports, lazy ones inside functions
    included (a package's __init__.py counts: importing a submodule runs it)."""
    seen = set() if seen is None else seen
    path = source_file(module)
    if module in seen or path is None:
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:  # `from package import module` reaches the module
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name.split(".")[0] in CODE_ROOTS:
                for parent in _parents(name):
                    imported_modules(parent, seen)
                imported_modules(name, seen)
    return seen


def test_dvc_yaml_declares_the_stages_in_the_order_the_code_runs_them() -> None:
    from flows.pipeline import PIPELINE
    from tasks.stages import STAGES as CODE_STAGES

    assert tuple(STAGES) == CODE_STAGES == PIPELINE


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_lists_every_module_it_imports(stage: str) -> None:
    needed = code_deps(stage)
    listed = {dep for dep in STAGES[stage]["deps"] if dep.split("/")[0] in CODE_ROOTS}
    assert needed - listed == set(), f"dvc.yaml stage {stage} misses code it imports"
    assert listed - needed == set(), f"dvc.yaml stage {stage} lists code it does not import"


@pytest.mark.slow
def test_editing_a_module_marks_exactly_the_stages_that_import_it(built_project: Path, services_env: dict) -> None:
    """What the import-derived deps buy: `dvc status` reports the stages whose code changed, and only those."""
    import json

    from tests.conftest import BIN, run

    module = "cwtops/model/network.py"  # imported by every stage but balance
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


def base_fields_named(stage: str) -> set[str]:
    """`base.<field>` read in the stage's module (artifact_paths(base) reads artifacts_dir)."""
    from cwtops.core.config import BaseConfig

    named = set()
    for node in ast.walk(ast.parse((ROOT / "tasks" / f"{stage}.py").read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "base":
            named.add(node.attr)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "artifact_paths":
            named.add("artifacts_dir")
    return named & set(BaseConfig.model_fields)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_its_own_section_and_base_only(stage: str) -> None:
    """run(cfg, base) reads one section and base (the tune stage also the section it tunes, by name);
    dvc.yaml declares those sections and the base keys it names."""
    import inspect

    from tasks.stages import READS, SECTIONS, stage_function

    section, others = SECTIONS[stage], READS.get(stage, ())
    assert list(inspect.signature(stage_function(stage)).parameters) == ["cfg", "base", *others]
    declared = [entry if isinstance(entry, str) else next(iter(entry)) for entry in STAGES[stage]["params"]]
    assert all(other in declared for other in others), f"dvc.yaml stage {stage} misses a section it reads"
    foreign = [key for key in declared if key.split(".")[0] not in (section, "base", *others)]
    assert foreign == [], f"dvc.yaml stage {stage} declares params of other sections"
    assert section in declared or any(key.startswith(f"{section}.") for key in declared)
    if "base" not in declared:
        assert base_fields_named(stage) <= {key.removeprefix("base.") for key in declared}, f"{stage} reads undeclared base keys"

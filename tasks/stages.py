"""The pipeline's stages by name: one module in tasks/, one stage in dvc.yaml, one params section.

Each stage's `run(cfg, base)` takes its own params section and `base`, nothing else, so its
signature says what it reads and dvc.yaml declares exactly those (tests/test_dvc_deps.py). The
track stage's section is `mlflow`: the tracking server and experiment it writes to. The tune stage
also reads the section it tunes: `run(cfg, base, train)` (READS below).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cwtops.core.config import BaseConfig, Params, Section
from cwtops.core.errors import CwtopsError

# Order is the pipeline's order; dvc.yaml declares the same stages.
STAGES: tuple[str, ...] = ("parse", "balance", "tune", "train", "evaluate", "export", "parity", "track")
SECTIONS: dict[str, str] = {stage: stage for stage in STAGES} | {"track": "mlflow"}
# Sections a stage reads besides its own, passed by name after `base`.
READS: dict[str, tuple[str, ...]] = {"tune": ("train",)}


def stage_function(name: str) -> Callable[[Section, BaseConfig], Any]:
    if name not in STAGES:
        raise CwtopsError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
    return importlib.import_module(f"tasks.{name}").run


def run_stage(name: str, params: Params) -> Any:
    """Run one stage's function in this process (what `cwtops stage NAME` and dvc.yaml call)."""
    others = {section: getattr(params, section) for section in READS.get(name, ())}
    return stage_function(name)(getattr(params, SECTIONS[name]), params.base, **others)

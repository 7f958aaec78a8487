"""The pipeline's stages by name: one module in tasks/, one stage in dvc.yaml, one params section."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cwtops.core.config import Params
from cwtops.core.errors import CwtopsError

# Order is the pipeline's order; dvc.yaml declares the same stages.
STAGES: tuple[str, ...] = ("parse", "balance", "train", "evaluate", "export", "parity", "track")


def stage_function(name: str) -> Callable[[Params], Any]:
    if name not in STAGES:
        raise CwtopsError(f"unknown stage '{name}'; stages are: {', '.join(STAGES)}")
    return importlib.import_module(f"tasks.{name}").run


def run_stage(name: str, params: Params) -> Any:
    """Run one stage's function in this process (what `cwtops stage NAME` and dvc.yaml call)."""
    return stage_function(name)(params)

"""Run a DVC stage from Python, so orchestrators keep `dvc.lock` true.

Two ways, one result in `dvc.lock` and the DVC cache:
- `subprocess`: `dvc repro --single-item NAME`, which runs the stage's `cmd` (`cwtops stage NAME`)
  in a fresh process, exactly as a user's `dvc repro` does.
- `in_process` (what the Prefect flow uses): DVC decides whether the stage changed, restores it
  from its run cache when these inputs were seen before, and otherwise the stage function runs in
  this (already warm) process; DVC then saves and commits the outputs and writes the lock entry,
  the steps `dvc repro` takes after the command. It saves the 3-10 s of imports a fresh Python
  process pays per stage. Unlike `dvc repro`, it does not delete the stage's outputs first: each
  stage writes its files atomically at the end, so a run that fails or is killed (a worker lost
  mid-run) leaves the last good outputs in place, still matching `dvc.lock`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cwtops.core.errors import CwtopsError

Mode = Literal["subprocess", "in_process"]


@dataclass(frozen=True)
class StageRun:
    name: str
    ran: bool  # False: up to date, nothing done
    seconds: float  # the stage's own work (the stage function or the restore), not DVC's bookkeeping
    wall_seconds: float  # everything, DVC's status check and commit included
    how: str  # "skipped" | "ran" | "restored" | "subprocess"


def _with_bin_on_path() -> None:
    """Stage commands call `cwtops`: this interpreter's bin folder must be on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def repro_stage(name: str, root: Path | str = ".", mode: Mode = "subprocess") -> StageRun:
    """Bring one DVC stage up to date (`dvc repro --single-item NAME` semantics)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    _with_bin_on_path()
    started = time.perf_counter()
    if mode == "in_process" and Path(root).resolve() != Path.cwd().resolve():
        mode = "subprocess"  # stage code reads paths relative to the project root: run it there
    try:
        with Repo(str(root)) as repo:
            if mode == "in_process":
                how, seconds = _reproduce_in_process(repo, name, Path(root))
            else:
                how = "subprocess" if repo.reproduce(name, single_item=True) else "skipped"
                seconds = time.perf_counter() - started if how != "skipped" else 0.0
    except DvcException as error:
        raise CwtopsError(f"DVC stage '{name}' failed: {error}") from None
    return StageRun(name, how != "skipped", seconds, time.perf_counter() - started, how)


def _reproduce_in_process(repo: object, name: str, root: Path) -> tuple[str, float]:
    """DVC's `Stage.reproduce` with the command replaced by a call to the stage function."""
    from dvc.repo import lock_repo
    from dvc.stage.cache import RunCacheNotFoundError

    from cwtops.core.config import load_params
    from tasks.stages import run_stage

    with lock_repo(repo):
        stage = _pipeline_stage(repo, name)
        if not stage.changed():
            return "skipped", 0.0
        tick = time.perf_counter()
        try:
            stage = _restore(repo, stage, name)  # these exact inputs ran before: check the outputs out
            how = "restored"
        except RunCacheNotFoundError:
            # The old outputs stay until the stage replaces them (atomic renames). Unprotected first:
            # a file linked from the DVC cache must never be written through.
            stage.unprotect_outs()
            stage.save_deps()
            print(f"Running stage '{name}' in process", flush=True)
            run_stage(name, load_params(root / "params.yaml"))
            how = "ran"
        seconds = time.perf_counter() - tick
        stage.save()  # hashes of deps and outs, and the run cache entry
        stage.commit()  # outs into the DVC cache
        stage.dump(update_pipeline=False)  # the dvc.lock entry
    return how, seconds


def _restore(repo: object, stage: object, name: str) -> object:
    """DVC's run-cache restore; raises RunCacheNotFoundError, touching nothing, when these inputs never ran.

    The checkout replaces outputs the DVC cache holds; one it does not hold (written outside DVC)
    makes it ask for confirmation, so the outputs are removed and the restore repeated (the cache
    has what it checks out) on a freshly loaded stage: the first attempt already recorded the new
    dependency hashes on its stage object, which would make DVC take the lock file's outputs for
    the run cache's. Returns the stage to save and commit.
    """
    from dvc.exceptions import ConfirmRemoveError

    try:
        repo.stage_cache.restore(stage)
        return stage
    except ConfirmRemoveError:
        stage.remove_outs(ignore_remove=False, force=False)
        fresh = _pipeline_stage(repo, name)
        repo.stage_cache.restore(fresh)
        return fresh


def _pipeline_stage(repo: object, name: str) -> object:
    stages = repo.stage.collect(name)
    if len(stages) != 1 or not getattr(stages[0], "cmd", None):
        raise CwtopsError(f"dvc.yaml has no pipeline stage '{name}'; stages are declared in dvc.yaml")
    return stages[0]

"""The training flow: parse -> balance -> tune -> train -> evaluate -> export -> parity -> track,
then register (MLflow), promote (policy) and roll out (Triton).

Each stage task runs its DVC stage, so `dvc.lock` stays true: after this flow `dvc status` is
clean, and a stage that `dvc repro` already built is skipped here. By default the stage function
runs inside the task's process (DVC still decides, restores from its run cache, and commits; see
flows/dvc_stage.py); `stage_mode="subprocess"` runs `dvc repro --single-item` instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from cwtops.core.config import DEFAULT_PARAMS, Params, load_params
from cwtops.core.paths import artifact_paths
from cwtops.registry.promotion import apply_policy
from cwtops.serving.rollout import RolloutOutcome, reconcile
from flows.dvc_stage import Mode, StageRun, repro_stage
from tasks.stages import STAGES


@task(name="stage", task_run_name="{name}", retries=1, retry_delay_seconds=5, timeout_seconds=3600)
def stage_task(name: str, params_file: str, mode: Mode = "in_process") -> StageRun:
    """Bring one DVC stage up to date; says whether it ran and how long its own work took."""
    return repro_stage(name, Path(params_file).parent, mode)


@task(retries=3, retry_delay_seconds=[5, 15, 30], timeout_seconds=600)
def register_task(params: Params) -> int:
    from cwtops.registry.versions import register

    return register(params, attempts=1).version  # one try a task run: the task's retries are the policy


@task(retries=2, retry_delay_seconds=10, timeout_seconds=120)
def promote_task(params: Params, version: int) -> str:
    return apply_policy(params, version)


@task(timeout_seconds=600)
def publish_task(params: Params) -> RolloutOutcome:
    return reconcile(params)


@flow(name="cwtops-train", log_prints=True)
def train_flow(params_file: str = str(DEFAULT_PARAMS), publish: bool = True, stage_mode: Mode = "in_process") -> dict:
    """Run the pipeline through DVC, register the model, apply the promotion policy, serve."""
    params = load_params(params_file)
    ran = {name: stage_task(name, params_file, stage_mode) for name in PIPELINE}
    version = register_task(params)
    decision = promote_task(params, version)
    outcome = publish_task(params) if publish else None
    summary = _summary(params, ran, version, decision, outcome)
    create_markdown_artifact(key="cwtops-train", markdown=_markdown(summary), description="training run")
    get_run_logger().info("registered version %s; promotion: %s", version, decision)
    return summary


PIPELINE = STAGES  # written once, in tasks/stages.py; tests/test_dvc_deps.py checks dvc.yaml declares the same


def _summary(params: Params, ran: dict, version: int, decision: str, outcome: RolloutOutcome | None) -> dict:
    paths = artifact_paths(params.base)
    track = json.loads(paths.track_run.read_text())
    return {
        "stages_run": [name for name, done in ran.items() if done.ran],
        "stage_seconds": {name: done.seconds for name, done in ran.items()},
        "metrics": json.loads(paths.metrics.read_text()),
        "parity": {k: v for k, v in json.loads(paths.parity_report.read_text()).items() if k != "cases"},
        "version": version,
        "promotion": decision,
        "rollout": outcome.__dict__ if outcome else None,
        "run_id": track.get("run_id"),
        "run_url": track.get("run_url"),
    }


def _markdown(summary: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in summary["metrics"].items() if isinstance(v, float))
    rollout = summary["rollout"] or {}
    return (
        f"# cwtops training run\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"- MLflow run: [{summary['run_id']}]({summary['run_url']})\n"
        f"- registered version: **{summary['version']}** (promotion: {summary['promotion']})\n"
        f"- Triton: {rollout.get('action', 'not published')}, serving version {rollout.get('served')}\n"
        f"- stages run: {', '.join(summary['stages_run']) or 'none (all up to date)'}\n"
    )

"""Pipeline commands: `cwtops stage NAME`, `cwtops init`, `cwtops rollout` (the orchestration
commands `run`, `serve` and `bench` are added by flows/cli.py)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import typer

from tasks.config import DEFAULT_PARAMS, load_params
from tasks.stages import STAGES, run_stage

ParamsOption = typer.Option(DEFAULT_PARAMS, "--params", help="params file")


def _print_result(result: object) -> None:
    if dataclasses.is_dataclass(result):
        for key, value in dataclasses.asdict(result).items():
            typer.echo(f"  {key}: {value}")


def stage(
    name: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}"),
    params_path: Path = ParamsOption,
) -> None:
    """Run one pipeline stage (dvc.yaml calls this)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(params_path)
    typer.echo(f"stage {name}")
    result = run_stage(name, params)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
        _print_result(result)


def init(params_path: Path = ParamsOption) -> None:
    """Create the sample data and the default weight file when absent, and track them with DVC."""
    from tasks.project import init_project

    for line in init_project(load_params(params_path)):
        typer.echo(line)


def rollout(
    params_path: Path = ParamsOption,
    retry: bool = typer.Option(False, "--retry", help="retry a version whose last rollout failed"),
) -> None:
    """One reconcile pass now: make Triton serve the version MLflow says is in production."""
    from tasks.rollout import reconcile

    outcome = reconcile(load_params(params_path), retry_failed=retry)
    _print_result(outcome)
    if outcome.action == "failed":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("stage")(stage)
    app.command("init")(init)
    app.command("rollout")(rollout)

"""Pipeline commands: `cwtops stage NAME`, `cwtops init`."""

from __future__ import annotations

import dataclasses
import logging
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
    _print_result(run_stage(name, params))


def init(params_path: Path = ParamsOption) -> None:
    """Create the sample data and the default weight file when absent, and track them with DVC."""
    from tasks.project import init_project

    for line in init_project(load_params(params_path)):
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("stage")(stage)
    app.command("init")(init)

"""`cwtops`, the installed command: the package's commands (cwtops/cli/app.py) plus the ones that run
stages (`stage`, which dvc.yaml calls; `init`; `rollout`), flows (`run`, `serve`) and the benchmarks
(`bench`). They live here because the package never imports stages or orchestration (the import
contracts in pyproject.toml)."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import typer

from cwtops.cli.app import app
from cwtops.cli.app import main as _main
from cwtops.cli.options import ParamsOption
from cwtops.core.config import load_params
from tasks.stages import STAGES, run_stage

CHECKOUT = Path(__file__).resolve().parent.parent  # bench/ lives beside flows/ in a checkout


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
    from cwtops.data.project import init_project

    for line in init_project(load_params(params_path)):
        typer.echo(line)


def rollout(
    params_path: Path = ParamsOption,
    retry: bool = typer.Option(False, "--retry", help="retry a version whose last rollout failed"),
) -> None:
    """One reconcile pass now: make Triton serve the version MLflow says is in production."""
    from cwtops.serving.rollout import reconcile

    outcome = reconcile(load_params(params_path), retry_failed=retry)
    _print_result(outcome)
    if outcome.action == "failed":
        raise typer.Exit(1)


def run(params_path: Path = ParamsOption) -> None:
    """The main job: sample data and weights, MLflow, Triton, the training flow, a served prediction."""
    from flows.main import main_job

    main_job(str(params_path))


def serve(
    params_path: Path = ParamsOption,
    webhook: bool = typer.Option(True, help="register the MLflow webhook and run its receiver"),
) -> None:
    """Long-running: Prefect deployments (nightly retraining, also on drift; rollout reconciler; monitoring) and the webhook receiver."""
    from flows.main import prepare_environment
    from flows.serve import serve as serve_all

    prepare_environment()
    serve_all(str(params_path), webhook=webhook)


def bench(
    quick: bool = typer.Option(False, "--quick", help="fewer repeats and smaller inputs"),
    only: list[str] = typer.Option(None, "--only", help="frontend, parser, onnx, train, serving, monitoring, mlflow, flow, variants, ucr (repeat it)"),
) -> None:
    """Run the benchmarks: one table each, ratios against their targets, JSON under bench/results/."""
    if not (CHECKOUT / "bench" / "suite.py").exists():
        raise typer.BadParameter(f"the benchmarks live in a checkout of the repository (no {CHECKOUT / 'bench'})")
    command = [sys.executable, "-m", "bench.suite", *(["--quick"] if quick else []), *[f"--only={name}" for name in only or []]]
    raise typer.Exit(subprocess.run(command, cwd=CHECKOUT).returncode)


app.command("stage")(stage)
app.command("init")(init)
app.command("rollout")(rollout)
app.command("run")(run)
app.command("serve")(serve)
app.command("bench")(bench)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

"""`cwtops`, the installed command: the package's commands (tasks/cli.py) plus the ones that start
flows (`run`, `serve`) and the benchmarks (`bench`). They live here because the package never
imports orchestration (the import contracts in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from tasks.cli import app
from tasks.cli import main as _main
from tasks.cli_pipeline import ParamsOption

CHECKOUT = Path(__file__).resolve().parent.parent  # bench/ lives beside flows/ in a checkout


def run(params_path: Path = ParamsOption) -> None:
    """The main job: sample data and weights, MLflow, Triton, the training flow, a served prediction."""
    from flows.main import main_job

    main_job(str(params_path))


def serve(
    params_path: Path = ParamsOption,
    webhook: bool = typer.Option(True, help="register the MLflow webhook and run its receiver"),
) -> None:
    """Long-running: Prefect deployments (nightly retraining, rollout reconciler) and the webhook receiver."""
    from flows.main import prepare_environment
    from flows.serve import serve as serve_all

    prepare_environment()
    serve_all(str(params_path), webhook=webhook)


def bench(
    quick: bool = typer.Option(False, "--quick", help="fewer repeats and smaller inputs"),
    only: list[str] = typer.Option(None, "--only", help="frontend, parser, onnx, train, serving, mlflow, flow, variants, ucr (repeat it)"),
) -> None:
    """Run the benchmarks: one table each, ratios against their targets, JSON under bench/results/."""
    if not (CHECKOUT / "bench" / "suite.py").exists():
        raise typer.BadParameter(f"the benchmarks live in a checkout of the repository (no {CHECKOUT / 'bench'})")
    command = [sys.executable, "-m", "bench.suite", *(["--quick"] if quick else []), *[f"--only={name}" for name in only or []]]
    raise typer.Exit(subprocess.run(command, cwd=CHECKOUT).returncode)


app.command("run")(run)
app.command("serve")(serve)
app.command("bench")(bench)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

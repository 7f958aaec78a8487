"""`cwtops mlflow start|stop|status`, `cwtops register`, `cwtops promote`, `cwtops models`."""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.config import DEFAULT_PARAMS, load_params

ParamsOption = typer.Option(DEFAULT_PARAMS, "--params", help="params file")
mlflow_app = typer.Typer(help="The local MLflow tracking server (127.0.0.1, SQLite under mlflow/).", no_args_is_help=True)


@mlflow_app.command("start")
def start_command(params_path: Path = ParamsOption, port: int | None = typer.Option(None, help="override mlflow.port")) -> None:
    """Start the server (no-op when one already answers)."""
    from tasks.tracking import start

    info = start(load_params(params_path), port=port)
    typer.echo(f"MLflow {'started' if info['started'] else 'already running'} at {info['uri']} (pid {info['pid']})")


@mlflow_app.command("stop")
def stop_command(params_path: Path = ParamsOption) -> None:
    """Stop the server this project started."""
    from tasks.tracking import stop

    typer.echo("stopped" if stop(load_params(params_path)) else "not running")


@mlflow_app.command("status")
def status_command(params_path: Path = ParamsOption) -> None:
    """Tracking URI, health, PID and log file."""
    from tasks.tracking import status

    for key, value in status(load_params(params_path)).items():
        typer.echo(f"{key}: {value}")


def register_command(params_path: Path = ParamsOption) -> None:
    """Register the parity-checked ONNX export as a new MLflow model version."""
    from tasks.registry import register

    result = register(load_params(params_path))
    typer.echo(f"{'registered' if result.created else 'already registered as'} version {result.version} (run {result.run_id})")


def promote_command(version: int = typer.Argument(..., help="model version to serve"), params_path: Path = ParamsOption) -> None:
    """Set the `production` alias on VERSION (what the MLflow UI does); the rollout follows."""
    from tasks.registry import promote

    params = load_params(params_path)
    promote(params, version)
    typer.echo(f"version {version} of {params.base.model_name} is now 'production'")


def models_command(params_path: Path = ParamsOption) -> None:
    """Registered versions with their key metric, aliases and deployment status."""
    from tasks.registry import list_versions

    params = load_params(params_path)
    typer.echo(f"{'version':>7}  {params.rollout.metric:>12}  {'aliases':<12}  {'deployment':<12}  created")
    for row in list_versions(params):
        metric = f"{row['metric']:.4f}" if row["metric"] is not None else "-"
        typer.echo(f"{row['version']:>7}  {metric:>12}  {','.join(row['aliases']) or '-':<12}  {row['deployment_status'] or '-':<12}  {row['created']}")


def register(app: typer.Typer) -> None:
    app.add_typer(mlflow_app, name="mlflow")
    app.command("register")(register_command)
    app.command("promote")(promote_command)
    app.command("models")(models_command)

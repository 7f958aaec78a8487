"""`cwtops mlflow start|stop|status`, `cwtops register`, `cwtops promote VERSION`, `cwtops models`."""

from __future__ import annotations

from pathlib import Path

import typer

from cwtops.cli.options import ParamsOption
from cwtops.core.config import load_params

mlflow_app = typer.Typer(help="The local MLflow tracking server (127.0.0.1, SQLite under mlflow/).", no_args_is_help=True)


@mlflow_app.command("start")
def start_command(
    params_path: Path = ParamsOption,
    port: int | None = typer.Option(None, help="override mlflow.port"),
    wait: float = typer.Option(60.0, help="seconds to wait for /health"),
) -> None:
    """Start the server (a no-op when one already answers) and wait until it is healthy."""
    from cwtops.registry.server import start

    info = start(load_params(params_path).mlflow, port=port, wait=wait)
    state = f"started in {info['seconds']:.1f} s" if info["started"] else "already running"
    typer.echo(f"MLflow {state} at {info['uri']} (pid {info['pid']}, log {info['log']})")


@mlflow_app.command("stop")
def stop_command(params_path: Path = ParamsOption) -> None:
    """Stop the server this project started."""
    from cwtops.registry.server import stop

    typer.echo("stopped" if stop(load_params(params_path).mlflow) else "not running")


@mlflow_app.command("status")
def status_command(params_path: Path = ParamsOption) -> None:
    """Tracking URI, health, PID, store, artifacts and log file."""
    from cwtops.registry.server import status

    info = status(load_params(params_path).mlflow)
    for key, value in info.items():
        typer.echo(f"{key + ':':<23}{value}")
    if info["healthy"] is False:
        raise typer.Exit(1)


def register_command(params_path: Path = ParamsOption) -> None:
    """Register the parity-checked ONNX export as a new MLflow model version (reads disk only)."""
    from cwtops.registry.versions import register

    result = register(load_params(params_path))
    state = "registered" if result.created else "already registered as"
    typer.echo(f"{state} version {result.version} (run {result.run_id}, onnx sha256 {result.onnx_sha256[:12]})")


def promote_command(version: int = typer.Argument(..., help="model version to serve"), params_path: Path = ParamsOption) -> None:
    """Set the alias `production` on VERSION (what the MLflow UI does); the rollout follows."""
    from cwtops.registry.versions import promote

    params = load_params(params_path)
    promote(params, version)
    typer.echo(f"version {version} of {params.base.model_name} is now 'production'")


def models_command(params_path: Path = ParamsOption) -> None:
    """Registered versions: key metric, aliases (production, challenger), their serving status, creation time."""
    from cwtops.registry.versions import list_versions

    params = load_params(params_path)
    rows = list_versions(params)
    if not rows:
        typer.echo(f"no registered versions of {params.base.model_name}")
        return
    metric = f"test_{params.rollout.metric}"
    typer.echo(f"{'version':>7}  {metric:>16}  {'aliases':<21}  {'deployment':<12}  {'challenger':<10}  {'created':<20}  run")
    for row in rows:
        value = f"{row['metric']:.4f}" if row["metric"] is not None else "-"
        aliases = ",".join(row["aliases"]) or "-"
        status = row["deployment_status"] or "-"
        challenger = row["challenger_status"] or "-"
        typer.echo(f"{row['version']:>7}  {value:>16}  {aliases:<21}  {status:<12}  {challenger:<10}  {row['created']:<20}  {row['run_id']}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `cwtops` app."""
    app.add_typer(mlflow_app, name="mlflow")
    app.command("register")(register_command)
    app.command("promote")(promote_command)
    app.command("models")(models_command)

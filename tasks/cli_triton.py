"""`cwtops triton start|stop|status`, `cwtops publish [VERSION]`, `cwtops predict FILE.npy`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import typer

from tasks.config import DEFAULT_PARAMS, load_params
from tasks.errors import CwtopsError

ParamsOption = typer.Option(DEFAULT_PARAMS, "--params", help="params file")
triton_app = typer.Typer(help="The local Triton Inference Server (127.0.0.1, explicit model control).", no_args_is_help=True)


@triton_app.command("start")
def start_command(
    params_path: Path = ParamsOption,
    http_port: int | None = typer.Option(None, help="override triton.http_port"),
    grpc_port: int | None = typer.Option(None, help="override triton.grpc_port"),
    metrics_port: int | None = typer.Option(None, help="override triton.metrics_port"),
) -> None:
    """Start tritonserver (no-op when it already answers); loads what the repository holds."""
    from tasks.triton_server import start

    typer.echo(f"Triton {start(load_params(params_path), http_port, grpc_port, metrics_port)}")


@triton_app.command("stop")
def stop_command(params_path: Path = ParamsOption) -> None:
    """Stop the server this project started."""
    from tasks.triton_server import stop

    typer.echo("stopped" if stop(load_params(params_path)) else "not running")


@triton_app.command("status")
def status_command(params_path: Path = ParamsOption) -> None:
    """URL, readiness, PID, log file and the versions served."""
    from tasks.triton_publish import served_versions
    from tasks.triton_server import status

    params = load_params(params_path)
    info = status(params)
    for key, value in info.items():
        typer.echo(f"{key}: {value}")
    if info["ready"]:
        typer.echo(f"{params.base.model_name} versions READY: {served_versions(info['url'], params.base.model_name)}")


def publish_command(
    version: int | None = typer.Argument(None, help="registry version (default: `production`, else the newest)"),
    onnx_path: Path | None = typer.Option(None, "--onnx", help="publish this local ONNX file instead of a registry version"),
    params_path: Path = ParamsOption,
) -> None:
    """Publish a model version to Triton: write it atomically, load it, check it, retire the old one."""
    from tasks.paths import artifact_paths
    from tasks.triton_publish import publish_version

    params = load_params(params_path)
    if onnx_path is not None:
        if version is None:
            raise CwtopsError("--onnx needs an explicit VERSION number for the model repository")
        reference = artifact_paths(params).reference
        result = publish_version(onnx_path, version, params, reference=reference if reference.exists() else None)
    else:
        from tasks.registry import download_version, resolve_version

        version = resolve_version(params, version)
        with tempfile.TemporaryDirectory(prefix="cwtops-publish-") as scratch:
            files = download_version(params, version, Path(scratch))
            result = publish_version(files.onnx, version, params, reference=files.reference)
    typer.echo(f"Triton serves {result.model} version {result.version} (retired {result.retired or 'none'}, served parity max abs error {result.served_max_abs_error})")


def predict_command(
    file: Path = typer.Argument(..., help=".npy file: one signal [L] or many [N, L]"),
    url: str | None = typer.Option(None, help="Triton HTTP address (default from params)"),
    model: str | None = typer.Option(None, help="model name (default base.model_name)"),
    version: int | None = typer.Option(None, help="model version (default: what Triton serves)"),
    top_k: int = typer.Option(3, "--top-k", min=1, help="classes to show per signal"),
    params_path: Path = ParamsOption,
) -> None:
    """Classify signals through Triton and print class names with probabilities."""
    from tasks.triton_client import classify
    from tasks.triton_server import http_url

    params = load_params(params_path)
    try:
        signals = np.load(file, allow_pickle=False)
    except Exception as error:
        raise CwtopsError(f"{file}: not a readable .npy file ({error})") from None
    results = classify(url or http_url(params), model or params.base.model_name, signals, top_k=top_k, version=version)
    for index, ranked in enumerate(results):
        typer.echo(f"signal {index}: " + ", ".join(f"{name} {probability:.4f}" for name, probability in ranked))


def register(app: typer.Typer) -> None:
    app.add_typer(triton_app, name="triton")
    app.command("publish")(publish_command)
    app.command("predict")(predict_command)

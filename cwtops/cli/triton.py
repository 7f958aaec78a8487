"""`cwtops triton start|stop|status`, `cwtops publish [VERSION]`, `cwtops predict FILE.npy`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import typer

from cwtops.cli.options import ParamsOption
from cwtops.core.config import Params, load_params
from cwtops.core.errors import CwtopsError

triton_app = typer.Typer(help="The local Triton Inference Server (127.0.0.1, explicit model control).", no_args_is_help=True)


@triton_app.command("start")
def start_command(
    params_path: Path = ParamsOption,
    http_port: int | None = typer.Option(None, help="override triton.http_port"),
    grpc_port: int | None = typer.Option(None, help="override triton.grpc_port"),
    metrics_port: int | None = typer.Option(None, help="override triton.metrics_port"),
    wait: float = typer.Option(60.0, help="seconds to wait for readiness"),
) -> None:
    """Start tritonserver (reports the running one instead); loads what the repository holds."""
    from cwtops.serving.server import start

    info = start(load_params(params_path), wait, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    typer.echo(f"Triton {info}")


@triton_app.command("stop")
def stop_command(params_path: Path = ParamsOption) -> None:
    """Stop the server this checkout started."""
    from cwtops.serving.server import stop

    typer.echo("stopped" if stop(load_params(params_path)) else "not running")


@triton_app.command("status")
def status_command(params_path: Path = ParamsOption) -> None:
    """URL, readiness, PID, log file and the versions each model serves."""
    from cwtops.serving.server import status

    info = status(load_params(params_path))
    for key in ("url", "ready", "pid", "log"):
        typer.echo(f"{key}: {info[key]}")
    for model, state in info["models"].items():
        typer.echo(f"model {model}: {state}")


def next_version_on_disk(params: Params) -> int:
    """1 + the highest version of the model in the repository, a folder or S3 (1 for a new model)."""
    from cwtops.serving.publish import open_repository

    return max(open_repository(params).versions(params.base.model_name), default=0) + 1


def publish_command(
    version: int | None = typer.Argument(None, help="registry version (default: the `production` alias, else the newest)"),
    onnx_path: Path | None = typer.Option(None, "--onnx", help="publish this local ONNX file instead of a registry version"),
    reference: Path | None = typer.Option(None, help="with --onnx: parity reference .npz (default artifacts/parity/reference.npz when present)"),
    params_path: Path = ParamsOption,
) -> None:
    """Publish a model version to Triton: write it atomically, load it, check it, retire the others."""
    from cwtops.core.paths import artifact_paths
    from cwtops.serving.publish import publish_version

    params = load_params(params_path)
    if onnx_path is not None:
        version = version if version is not None else next_version_on_disk(params)
        default_reference = artifact_paths(params.base).reference
        reference = reference or (default_reference if default_reference.exists() else None)
        result = publish_version(onnx_path, version, params, reference=reference)
    else:
        if reference is not None:
            raise CwtopsError("--reference goes with --onnx; a registry version brings its own reference")
        from cwtops.registry.versions import download_version, resolve_version

        version = resolve_version(params, version)
        with tempfile.TemporaryDirectory(prefix="cwtops-publish-") as scratch:
            files = download_version(params, version, Path(scratch))
            result = publish_version(files.onnx, files.version, params, reference=files.reference)
    checked = "not checked (no reference)" if result.served_max_abs_error is None else f"served max abs error {result.served_max_abs_error:.3g}"
    typer.echo(f"Triton serves {result.model} version {result.version} ({checked}; retired {result.retired or 'none'})")


def read_signals(file: Path) -> np.ndarray:
    """A .npy of one signal [L] or many [N, L] / [N, 1, L], as float32 (other float types converted)."""
    try:
        signals = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CwtopsError(f"{file}: not a readable .npy file ({error})") from None
    if not np.issubdtype(signals.dtype, np.floating):
        raise CwtopsError(f"{file}: dtype {signals.dtype}; expected floating-point signals")
    return signals.astype(np.float32, copy=False)


def model_serving(params: Params, url: str, version: int | None) -> str:
    """The Triton model that serves `version`: production's model, or the challenger's when it serves it."""
    from cwtops.serving.publish import challenger_model_name, served_versions

    name = params.base.model_name
    if version is None or version in served_versions(url, name):
        return name
    challenger = challenger_model_name(params)
    if version in served_versions(url, challenger):
        return challenger
    raise CwtopsError(f"Triton at {url} serves version {version} neither as '{name}' (production) nor as '{challenger}' "
                      "(challenger); see `cwtops models` and `cwtops triton status`")


def predict_command(
    file: Path = typer.Argument(..., help=".npy file: one signal [L] or many [N, L]"),
    url: str | None = typer.Option(None, help="Triton HTTP host:port (default: the running server, else params)"),
    model: str | None = typer.Option(None, help="model name (default base.model_name)"),
    version: int | None = typer.Option(None, help="model version, production's or the challenger's (default: production)"),
    top_k: int = typer.Option(3, "--top-k", min=1, help="classes to show per signal"),
    request_id: str | None = typer.Option(None, "--request-id", help="id of the request, for `cwtops feedback` (default: a new one)"),
    params_path: Path = ParamsOption,
) -> None:
    """Classify signals through Triton; print class names with probabilities, and each signal's
    request id and row (what `cwtops feedback` takes labels for)."""
    import uuid

    from cwtops.serving.client import as_batch, classify, request_ids, served_config
    from cwtops.serving.server import http_url

    params = load_params(params_path)
    signals = read_signals(file)
    try:
        as_batch(signals)
    except CwtopsError as error:  # refused before anything is sent, naming the file
        raise CwtopsError(f"{file}: {error}") from None
    url = url or http_url(params)
    if model is None:
        model = model_serving(params, url, version)
    request_id = request_id or uuid.uuid4().hex
    results = classify(url, model, signals, top_k=top_k, version=version, request_id=request_id)
    max_batch = max(1, int(served_config(url, model, version).get("max_batch_size", 0)))
    for index, (ranked, (sent_as, row)) in enumerate(zip(results, request_ids(request_id, len(results), max_batch))):
        typer.echo(f"signal {index}: " + ", ".join(f"{name} {probability:.4f}" for name, probability in ranked)
                   + f"  (request {sent_as} row {row})")


def register(app: typer.Typer) -> None:
    app.add_typer(triton_app, name="triton")
    app.command("publish")(publish_command)
    app.command("predict")(predict_command)

"""`cwtops run`, the main job: sample data through to a prediction served by Triton."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cwtops.core.config import DEFAULT_PARAMS, load_params
from cwtops.core.paths import artifact_paths
from cwtops.data.project import init_project
from cwtops.services.processes import state_dir


def prepare_environment() -> None:
    """Project-local Prefect state, unless the user points elsewhere."""
    os.environ.setdefault("PREFECT_HOME", str((state_dir() / "prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main_job(params_file: str = str(DEFAULT_PARAMS)) -> dict:
    """init -> MLflow + Triton + Prefect up -> training flow -> served prediction; returns a summary."""
    from cwtops.registry.server import ensure_server
    from cwtops.serving.client import classify
    from cwtops.serving.server import start as start_triton
    from flows.serve import ensure_prefect_server

    prepare_environment()
    params = load_params(params_file)
    for line in init_project(params):
        print(line)
    print(f"MLflow tracking: {ensure_server(params.mlflow)}")
    print(f"Triton: {start_triton(params)}")
    print(f"Prefect API: {ensure_prefect_server()}")  # before Prefect is imported: it reads the URL once
    from flows.pipeline import train_flow

    summary = train_flow(params_file=params_file)
    reference = np.load(artifact_paths(params.base).reference)
    signals = reference["inputs"][:3]
    predictions = classify(_triton_url(params), params.base.model_name, signals, top_k=2)
    summary["served_prediction"] = predictions
    _print_summary(summary)
    return summary


def _triton_url(params) -> str:  # noqa: ANN001
    return f"{params.triton.host}:{params.triton.http_port}"


def _print_summary(summary: dict) -> None:
    metrics = summary["metrics"]
    print("\n== cwtops: main job finished ==")
    print("test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"registered model version: {summary['version']} ({summary['promotion']})")
    print(f"MLflow run: {summary['run_url']}")
    rollout = summary.get("rollout") or {}
    print(f"Triton serves version {rollout.get('served')}")
    print("prediction served by Triton (three test signals, top 2 classes):")
    for index, ranked in enumerate(summary["served_prediction"]):
        print(f"  signal {index}: " + ", ".join(f"{name} {probability:.4f}" for name, probability in ranked))


if __name__ == "__main__":
    main_job(str(Path(DEFAULT_PARAMS)))

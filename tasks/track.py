"""Stage `track`: mirror one pipeline run into MLflow (the files on disk stay the source of truth).

Params (flattened params.yaml), per-epoch metrics in one batch, test metrics, parity figures,
the percent confusion matrix and learning curves as figures, the classification report, a
per-class gallery of scalograms, the parity report and the ONNX file; lineage tags (DVC hashes
of the raw data and the weight file, split-manifest and filter-bank hashes, git commit); the
training split as an MLflow dataset input. Writes artifacts/track/run.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from tasks.config import Params, flatten  # noqa: E402
from tasks.data import load_signals  # noqa: E402
from tasks.errors import CwtopsError  # noqa: E402
from tasks.evaluate import plot_confusion  # noqa: E402
from tasks.io import sha256_file, write_json  # noqa: E402
from tasks.paths import ArtifactPaths, artifact_paths  # noqa: E402
from tasks.tracking import ensure_server, require_reachable  # noqa: E402

RUN_ENV = "CWTOPS_MLFLOW_RUN_ID"


@dataclass(frozen=True)
class TrackResult:
    run_id: str
    experiment_id: str
    run_url: str
    calls: int
    seconds: float


def _dvc_hash(dvc_file: Path) -> str:
    try:
        return str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError):
        return "untracked"


def git_commit(root: Path = Path(".")) -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = done.stdout.strip()
    if done.returncode or not commit:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def lineage(params: Params) -> dict[str, str]:
    """Where a model came from: data, weights, split, filter bank, code."""
    paths = artifact_paths(params)
    raw, weights = Path(params.base.raw_dir), Path(params.base.weights)
    bank = json.loads(paths.filter_bank_summary.read_text())
    return {
        "data_dvc_md5": _dvc_hash(raw.with_name(raw.name + ".dvc")),
        "weights_dvc_md5": _dvc_hash(weights.with_name(weights.name + ".dvc")),
        "split_manifest_sha256": sha256_file(paths.split_manifest),
        "filter_bank_sha256": bank["sha256"],
        "git_commit": git_commit(),
    }


def learning_curves(history: pd.DataFrame) -> plt.Figure:
    figure, (loss_axes, score_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for column in ("train_loss", "val_loss"):
        loss_axes.plot(history.epoch, history[column], label=column)
    for column in ("val_accuracy", "val_macro_f1"):
        score_axes.plot(history.epoch, history[column], label=column)
    for axes, title in ((loss_axes, "loss"), (score_axes, "validation")):
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.legend()
    figure.tight_layout()
    return figure


def scalogram_gallery(params: Params, per_class: int = 4) -> plt.Figure:
    """A row per class of example scalograms (log scale), tiled with torchvision's make_grid."""
    from torchvision.utils import make_grid

    from tasks.model import load_checkpoint

    paths = artifact_paths(params)
    model, checkpoint = load_checkpoint(paths.model)
    manifest = pd.read_csv(paths.split_manifest)
    test = manifest[manifest.split == "test"]
    classes = checkpoint["class_names"]
    figure, axes = plt.subplots(len(classes), 1, figsize=(12, 1.6 * len(classes)), squeeze=False)
    for row, label in enumerate(classes):
        examples = test[test.label == label].head(per_class)
        signals = torch.from_numpy(load_signals(examples, Path(params.base.raw_dir))).unsqueeze(1)
        with torch.no_grad():
            images = torch.log1p(model.scalogram(signals)).unsqueeze(1)  # (n, 1, S, T)
        grid = make_grid(images, nrow=per_class, padding=4, normalize=True, scale_each=True, pad_value=1.0)
        axes[row, 0].imshow(grid[0].numpy(), aspect="auto", cmap="magma", origin="upper")
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center")
        axes[row, 0].set_xticks([])
        axes[row, 0].set_yticks([])
    figure.suptitle("test-split scalograms per class (scale rows: high frequency at top)")
    figure.tight_layout()
    return figure


def _log_metrics(client, run_id: str, paths: ArtifactPaths) -> int:  # noqa: ANN001
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    history = pd.read_csv(paths.history)
    metrics = [
        Metric(column, float(value), now, int(epoch))
        for column in history.columns.drop(["epoch", "seconds"])
        for epoch, value in zip(history.epoch, history[column])
    ]
    final = json.loads(paths.metrics.read_text())
    parity = json.loads(paths.parity_report.read_text())
    metrics += [Metric(f"test_{k}", float(v), now, 0) for k, v in final.items()]
    metrics += [Metric(f"parity_{k}", float(parity[k]), now, 0) for k in ("max_abs_error", "max_rel_error", "argmax_agreement")]
    calls = 0
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
        calls += 1
    return calls


def _log_files(client, run_id: str, paths: ArtifactPaths, params: Params) -> int:  # noqa: ANN001
    history = pd.read_csv(paths.history)
    confusion = json.loads(paths.confusion_json.read_text())
    figures = {
        "confusion_matrix.png": plot_confusion(np.array(confusion["percent"]), confusion["labels"], "confusion (% of true class)"),
        "learning_curves.png": learning_curves(history),
        "scalogram_gallery.png": scalogram_gallery(params),
    }
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"figures/{name}")
        plt.close(figure)
    files = [(paths.report_txt, "evaluation"), (paths.report_json, "evaluation"), (paths.confusion_json, "evaluation"),
             (paths.predictions, "evaluation"), (paths.history, "training"), (paths.train_summary, "training"),
             (paths.parity_report, "parity"), (paths.onnx, "onnx")]
    for path, folder in files:
        client.log_artifact(run_id, str(path), folder)
    return len(figures) + len(files)


def _log_dataset(run_id: str, paths: ArtifactPaths, params: Params, data_hash: str) -> None:
    import mlflow

    manifest = pd.read_csv(paths.split_manifest)
    dataset = mlflow.data.from_pandas(
        manifest[manifest.split == "train"], source=str(Path(params.base.raw_dir).resolve()), name="train", digest=data_hash[:36]
    )
    with mlflow.start_run(run_id=run_id):
        mlflow.log_input(dataset, context="training")


def run(params: Params) -> TrackResult:
    """Log this pipeline run into MLflow and record the run id next to the other artifacts."""
    import mlflow
    from mlflow import MlflowClient

    started = time.perf_counter()
    paths = artifact_paths(params)
    uri = ensure_server(params)
    require_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(params.mlflow.experiment)
    tags = lineage(params)
    run_id = os.environ.get(RUN_ENV) or client.create_run(experiment_id, tags={"mlflow.runName": f"pipeline-{tags['split_manifest_sha256'][:8]}"}).info.run_id
    from mlflow.entities import Param, RunTag

    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in flatten(params).items()], tags=[RunTag(k, v) for k, v in tags.items()])
    calls = 2 + _log_metrics(client, run_id, paths) + _log_files(client, run_id, paths, params)
    _log_dataset(run_id, paths, params, tags["data_dvc_md5"])
    client.set_terminated(run_id)
    run_url = f"{uri}/#/experiments/{experiment_id}/runs/{run_id}"
    write_json(paths.track_run, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri, "run_url": run_url})
    return TrackResult(run_id, experiment_id, run_url, calls + 2, time.perf_counter() - started)


def load_run(params: Params) -> dict:
    path = artifact_paths(params).track_run
    if not path.exists():
        raise CwtopsError(f"{path}: no tracked run; run the track stage (`dvc repro track`) first")
    return json.loads(path.read_text())

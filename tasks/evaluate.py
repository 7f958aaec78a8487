"""Stage `evaluate`: test-split metrics, classification report, percent confusion matrix, predictions.

Everything is written under artifacts/evaluate/ (declared in dvc.yaml) and copied to
results/<UTC timestamp>/ so earlier evaluations stay side by side.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from cwtops.core.artifacts import atomic_path, write_json, write_text  # noqa: E402
from cwtops.core.config import BaseConfig, EvaluateConfig  # noqa: E402
from cwtops.core.paths import ArtifactPaths, artifact_paths  # noqa: E402
from cwtops.data.signals import SignalReader, load_signals, read_manifest  # noqa: E402
from cwtops.model.network import HybridCWTNet, load_checkpoint  # noqa: E402

READ_CHUNK = 4096  # test signals read and scored at once (32 MB at 2,048 samples)


@dataclass(frozen=True)
class EvaluateResult:
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    n_test: int
    results_dir: Path


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "n_test": int(len(y_true)),
    }


def percent_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, percent of each true class): rows are true classes and sum to 100 (or 0 if empty)."""
    counts = confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))
    totals = counts.sum(axis=1, keepdims=True)
    percent = np.divide(100.0 * counts, totals, out=np.zeros_like(counts, dtype=float), where=totals > 0)
    return counts, percent


def plot_confusion(percent: np.ndarray, labels: list[str], title: str) -> plt.Figure:
    size = max(4.0, 0.7 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for (row, col), value in np.ndenumerate(percent):
        color = "white" if value > 60 else "black"
        axes.text(col, row, f"{value:.1f}", ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=axes, label="% of true class")
    figure.tight_layout()
    return figure


@torch.no_grad()
def predict_logits(model: HybridCWTNet, signals: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    outputs = [
        model(torch.from_numpy(signals[i : i + batch_size]).unsqueeze(1)).float().numpy()
        for i in range(0, len(signals), batch_size)
    ]
    return np.concatenate(outputs)


def test_logits(model: HybridCWTNet, rows: pd.DataFrame, raw_dir: Path, chunk: int = READ_CHUNK) -> np.ndarray:
    """Logits of `rows`' signals, read `chunk` at a time: memory holds one chunk, not the split."""
    if rows.empty:
        return np.zeros((0, model.args.n_classes), dtype=np.float32)
    reader = SignalReader(rows, raw_dir, int(load_signals(rows.head(1), raw_dir).shape[1]))
    reader.check()
    parts = [predict_logits(model, reader.read(np.arange(start, min(start + chunk, len(rows)))))
             for start in range(0, len(rows), chunk)]
    return np.concatenate(parts)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def run(cfg: EvaluateConfig, base: BaseConfig) -> EvaluateResult:
    """Score the best checkpoint on exactly the test split and write every report."""
    paths = artifact_paths(base)
    model, checkpoint = load_checkpoint(paths.model)
    classes: list[str] = checkpoint["class_names"]
    manifest = read_manifest(paths.split_manifest)
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    logits = test_logits(model, test, Path(base.raw_dir))
    index = {name: i for i, name in enumerate(classes)}
    y_true = test.label.map(index).to_numpy()
    y_pred = logits.argmax(axis=1)
    metrics = compute_metrics(y_true, y_pred)
    counts, percent = percent_confusion(y_true, y_pred, len(classes))
    _write_reports(paths, cfg.report_digits, classes, test, logits, y_true, y_pred, metrics, counts, percent)
    results_dir = _copy_to_results(paths, Path(base.results_dir))
    return EvaluateResult(
        metrics["accuracy"], metrics["balanced_accuracy"], metrics["macro_f1"], metrics["n_test"], results_dir
    )


def _write_reports(
    paths: ArtifactPaths,
    digits: int,
    classes: list[str],
    test: pd.DataFrame,
    logits: np.ndarray,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    metrics: dict,
    counts: np.ndarray,
    percent: np.ndarray,
) -> None:
    labels = list(range(len(classes)))
    report_kwargs = {"labels": labels, "target_names": classes, "digits": digits, "zero_division": 0}
    write_json(paths.metrics, metrics)
    write_text(paths.report_txt, classification_report(y_true, y_pred, **report_kwargs))
    write_json(paths.report_json, classification_report(y_true, y_pred, output_dict=True, **report_kwargs))
    write_json(
        paths.confusion_json,
        {"labels": classes, "percent": np.round(percent, 4).tolist(), "counts": counts.tolist()},
    )
    figure = plot_confusion(percent, classes, f"confusion (% of true class), macro-F1 {metrics['macro_f1']:.3f}")
    with atomic_path(paths.confusion_png) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)
    names = np.array(classes)
    with atomic_path(paths.predictions_csv) as tmp:
        pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]}).to_csv(tmp, index=False)
    with atomic_path(paths.predictions) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                sample_id=test.sample_id.to_numpy().astype(str),
                y_true=y_true,
                y_pred=y_pred,
                probabilities=softmax(logits).astype(np.float32),
                class_names=names,
            )


def _copy_to_results(paths: ArtifactPaths, results_root: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = results_root / stamp
    staging = results_root / f".{stamp}.partial"
    shutil.copytree(paths.evaluate_dir, staging)
    staging.rename(target)
    return target

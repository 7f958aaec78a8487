"""Where every artifact lives. Stages, flows, dvc.yaml and tests agree through this module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cwtops.core.config import BaseConfig


@dataclass(frozen=True)
class ArtifactPaths:
    root: Path

    # parse
    @property
    def filter_bank(self) -> Path:  # torch tensors, loads with weights_only=True
        return self.root / "parse" / "filter_bank.pt"

    @property
    def filter_bank_summary(self) -> Path:
        return self.root / "parse" / "filter_bank.json"

    @property
    def manifest(self) -> Path:  # every sample: sample_id,file,row,label,source_split
        return self.root / "parse" / "manifest.csv"

    # balance
    @property
    def split_manifest(self) -> Path:  # sample_id,file,row,label,split
        return self.root / "balance" / "split_manifest.csv"

    @property
    def balance_summary(self) -> Path:
        return self.root / "balance" / "summary.json"

    # tune (optional search; train reads what it chose)
    @property
    def tune_chosen(self) -> Path:  # {"params": {train key: value}, ...}; empty params when the search is off
        return self.root / "tune" / "chosen.json"

    @property
    def tune_trials(self) -> Path:  # one row per trial: settings, cross-validated scores, seconds
        return self.root / "tune" / "trials.csv"

    @property
    def tune_journal(self) -> Path:  # the study's Optuna journal, a resume point (outside the stage outs)
        return self.root / "checkpoints" / "tune.journal"

    # train
    @property
    def model(self) -> Path:  # best checkpoint, self-describing
        return self.root / "train" / "model.pt"

    @property
    def last_checkpoint(self) -> Path:  # resume point (persisted outside the stage outs)
        return self.root / "checkpoints" / "last.pt"

    @property
    def history(self) -> Path:  # per-epoch metrics, a dvc plot
        return self.root / "train" / "history.csv"

    @property
    def train_summary(self) -> Path:
        return self.root / "train" / "summary.json"

    @property
    def drift_reference(self) -> Path:  # the training signals' input statistics (cwtops/monitoring/features.py)
        return self.root / "train" / "drift_reference.json"

    # evaluate
    @property
    def evaluate_dir(self) -> Path:
        return self.root / "evaluate"

    @property
    def metrics(self) -> Path:
        return self.evaluate_dir / "metrics.json"

    @property
    def confusion_json(self) -> Path:  # {"labels": [...], "percent": [[...]], "counts": [[...]]}
        return self.evaluate_dir / "confusion.json"

    @property
    def predictions_csv(self) -> Path:  # actual,predicted per test sample: dvc's confusion plot
        return self.evaluate_dir / "predictions.csv"

    @property
    def confusion_png(self) -> Path:
        return self.evaluate_dir / "confusion.png"

    @property
    def report_json(self) -> Path:
        return self.evaluate_dir / "report.json"

    @property
    def report_txt(self) -> Path:
        return self.evaluate_dir / "report.txt"

    @property
    def predictions(self) -> Path:  # sample_id, y_true, y_pred, probabilities
        return self.evaluate_dir / "predictions.npz"

    # export
    @property
    def onnx(self) -> Path:
        return self.root / "export" / "model.onnx"

    # parity
    @property
    def parity_report(self) -> Path:
        return self.root / "parity" / "report.json"

    @property
    def reference(self) -> Path:  # inputs [N,1,L] float32, outputs [N,C] float32
        return self.root / "parity" / "reference.npz"

    # track (MLflow mirror of one pipeline run)
    @property
    def track_run(self) -> Path:
        return self.root / "track" / "run.json"


def artifact_paths(base: BaseConfig) -> ArtifactPaths:
    return ArtifactPaths(Path(base.artifacts_dir))

"""A fabricated pipeline output tree (per the artifact contract), for the MLflow tests and benchmark.

The tree holds a tiny but real model: a checkpoint that `cwtops.model.network.load_checkpoint` rebuilds,
its ONNX export (input "signal", output "logits", dynamic batch), parity reference and report,
evaluation files, a split manifest over real .npy signals, fake `.dvc` files and a git commit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

CHECKOUT = Path(__file__).resolve().parent.parent  # dvc.yaml beside bench/

CLASSES = ("alpha", "beta", "gamma")
SIGNAL_LENGTH = 256
PER_CLASS = 12  # rows 0-5 train, 6-8 val, 9-11 test
EPOCHS = 4
DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"
WEIGHTS_MD5 = "fedcba9876543210fedcba9876543210"


@dataclass(frozen=True)
class TreeShape:
    """Size of the fabricated model and data (the defaults keep tests fast; bench uses the real sizes)."""

    signal_length: int = SIGNAL_LENGTH
    n_filters: int = 16
    kernel_size: int = 9
    channels: tuple[int, int, int, int] = (2, 2, 2, 2)
    hidden: int = 4
    reference_signals: int = 5
    epochs: int = EPOCHS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def params_dict(mlflow_port: int, store: Path, epochs: int = EPOCHS, backend: str | None = None) -> dict:
    """params.yaml for the fabricated project: defaults, small model, an isolated MLflow store
    (SQLite in `store`, or the database URI `backend`)."""
    return {
        "base": {"model_name": "cwtops-test", "raw_dir": "data/raw", "weights": "my.txt", "artifacts_dir": "artifacts"},
        "train": {"epochs": epochs, "channels": [2, 2, 2, 2], "hidden": 4},
        "mlflow": {"port": mlflow_port, "experiment": "cwtops-test",
                   "backend_store": backend or f"sqlite:///{store / 'mlflow.db'}", "artifacts_destination": str(store / "artifacts")},
    }


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _signals(root: Path, length: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for index, label in enumerate(CLASSES):
        t = np.linspace(0, 1, length, dtype=np.float32)
        signals = np.sin(2 * np.pi * (4 + 8 * index) * t) + 0.3 * rng.standard_normal((PER_CLASS, length))
        folder = root / "data" / "raw" / label
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "signals.npy", signals.astype(np.float32))
        for row in range(PER_CLASS):
            split = "train" if row < 6 else "val" if row < 9 else "test"
            rows.append({"sample_id": f"{label}-{row}", "file": f"{label}/signals.npy", "row": row, "label": label, "split": split})
    return pd.DataFrame(rows)


def _model(params: dict, shape: TreeShape) -> tuple[torch.nn.Module, dict, str]:
    from cwtops.model.network import ModelArgs, build_model, checkpoint_dict

    torch.manual_seed(0)
    bank = torch.randn(shape.n_filters, shape.kernel_size) * 0.1  # the head needs at least 16 filters
    args = ModelArgs(n_filters=shape.n_filters, kernel_size=shape.kernel_size, n_classes=len(CLASSES),
                     signal_length=shape.signal_length, channels=shape.channels, hidden=shape.hidden)
    model = build_model(args, bank).eval()
    bank_sha = "b" * 64
    checkpoint = checkpoint_dict(model, list(CLASSES), bank_sha, params, epoch=shape.epochs, best_val_macro_f1=0.5)
    return model, checkpoint, bank_sha


def _export_onnx(model: torch.nn.Module, path: Path, length: int) -> None:
    import onnx

    model.frontend.method = "conv"  # the exported path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.zeros(2, 1, length),), str(path), input_names=["signal"], output_names=["logits"],
        dynamic_axes={"signal": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False,
    )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"class_names": json.dumps(list(CLASSES)), "model_name": "cwtops-test",
                                        "filter_bank_sha256": "b" * 64, "signal_length": str(length)})
    onnx.save(proto, str(path))


def _evaluation(artifacts: Path) -> None:
    counts = [[3, 0, 0], [1, 2, 0], [0, 0, 3]]
    percent = [[100.0 * c / sum(row) for c in row] for row in counts]
    _write_json(artifacts / "evaluate" / "metrics.json", {"accuracy": 0.888889, "balanced_accuracy": 0.888889, "macro_f1": 0.885714, "n_test": 9})
    _write_json(artifacts / "evaluate" / "confusion.json", {"labels": list(CLASSES), "percent": percent, "counts": counts})
    report = {label: {"precision": 0.9, "recall": 0.9, "f1-score": 0.9, "support": 3} for label in CLASSES}
    _write_json(artifacts / "evaluate" / "report.json", report)
    (artifacts / "evaluate" / "report.txt").write_text("              precision    recall  f1-score   support\n\n       alpha       0.75      1.00      0.86         3\n")
    np.savez(artifacts / "evaluate" / "predictions.npz", sample_id=np.array(["a"]), y_true=np.array([0]), y_pred=np.array([0]), probabilities=np.ones((1, 3)))


def _training(artifacts: Path, count: int) -> None:
    epochs = np.arange(1, count + 1)
    history = pd.DataFrame({"epoch": epochs, "train_loss": 1.2 / epochs, "val_loss": 1.3 / epochs, "val_accuracy": 0.5 + 0.1 * epochs / count,
                            "val_macro_f1": 0.4 + 0.1 * epochs / count, "lr": 0.003, "seconds": 0.5})
    (artifacts / "train").mkdir(parents=True, exist_ok=True)
    history.to_csv(artifacts / "train" / "history.csv", index=False)
    _write_json(artifacts / "train" / "summary.json", {"epochs_run": count, "best_epoch": count, "best_val_macro_f1": 0.5, "seconds": 2.0, "device": "cpu"})


def _parity(model: torch.nn.Module, artifacts: Path, onnx_sha256: str, shape: TreeShape) -> None:
    inputs = torch.randn(shape.reference_signals, 1, shape.signal_length, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model(inputs)
    (artifacts / "parity").mkdir(parents=True, exist_ok=True)
    np.savez(artifacts / "parity" / "reference.npz", inputs=inputs.numpy(), outputs=outputs.numpy())
    case = {"name": "batch-5", "batch_size": 5, "max_abs_error": 1e-6, "max_rel_error": 1e-5, "argmax_agreement": 1.0, "passed": True}
    _write_json(artifacts / "parity" / "report.json", {"passed": True, "atol": 1e-4, "rtol": 1e-3, "max_abs_error": 1e-6,
                                                        "max_rel_error": 1e-5, "argmax_agreement": 1.0, "cases": [case], "onnx_sha256": onnx_sha256})


def _git_commit(root: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    (root / ".gitignore").write_text("artifacts/\ndata/raw/\n.cwtops/\n")
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "fabricated"]):
        subprocess.run(command, cwd=root, env=env, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def _dvc_lock(root: Path, params: dict) -> None:
    """dvc.lock's params entries for the stages up to parity, as `dvc repro` records what each ran
    with (the track stage mirrors them into MLflow)."""
    from cwtops.core.config import params_from_dict

    stages = yaml.safe_load((CHECKOUT / "dvc.yaml").read_text())["stages"]
    full = params_from_dict(params).model_dump(mode="json")
    lock: dict = {"schema": "2.0", "stages": {}}
    for name, spec in stages.items():
        if name == "track":
            continue
        values = {}
        for key in spec.get("params", []):
            section, _, field = key.partition(".")
            values[key] = full[section][field] if field else full[section]
        lock["stages"][name] = {"cmd": spec["cmd"], "params": {"params.yaml": values}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def fabricate_project(root: Path, mlflow_port: int, store: Path, shape: TreeShape = TreeShape(), backend: str | None = None) -> str:
    """Write params.yaml, data, .dvc files and every artifact up to parity under `root`; returns the commit."""
    from cwtops.core.artifacts import sha256_file

    params = params_dict(mlflow_port, store, shape.epochs, backend)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    artifacts = root / "artifacts"
    manifest = _signals(root, shape.signal_length)
    (artifacts / "balance").mkdir(parents=True, exist_ok=True)
    manifest.to_csv(artifacts / "balance" / "split_manifest.csv", index=False)
    model, checkpoint, bank_sha = _model(params, shape)
    names = [f"conv{i}" for i in range(5, 5 + shape.n_filters)]
    _write_json(artifacts / "parse" / "filter_bank.json", {"sha256": bank_sha, "names": names, "lengths": [shape.kernel_size] * shape.n_filters, "source": "my.txt"})
    (artifacts / "train").mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, artifacts / "train" / "model.pt")
    _training(artifacts, shape.epochs)
    _evaluation(artifacts)
    _export_onnx(model, artifacts / "export" / "model.onnx", shape.signal_length)
    _parity(model, artifacts, sha256_file(artifacts / "export" / "model.onnx"), shape)
    (root / "data" / "raw.dvc").write_text(yaml.safe_dump({"outs": [{"md5": DATA_MD5, "path": "raw", "hash": "md5"}]}))
    (root / "my.txt.dvc").write_text(yaml.safe_dump({"outs": [{"md5": WEIGHTS_MD5, "path": "my.txt", "hash": "md5"}]}))
    _dvc_lock(root, params)
    return _git_commit(root)

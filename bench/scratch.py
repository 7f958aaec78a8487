"""A throw-away copy of this project (its code and pipeline, its own git + DVC repo) with its own
ports: what the flow benchmark and the test suite run the real pipeline and services in."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SMALL_COUNTS = {"noise": 300, "burst": 150, "chirp": 100, "am": 80, "fm": 60}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git(target: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=target, check=True,
                   capture_output=True)


def make_project(target: Path) -> Path:
    """A copy of this repository's code and pipeline definition, as its own git + DVC repo."""
    for name in ("cwtops", "tasks", "flows", "bench"):
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("dvc.yaml", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    (target / ".gitignore").write_text(".cwtops/\n/mlflow/\n/model_repository/\n/results/\n/.dvc-storage/\n")
    _git(target, "init", "-q")
    _git(target, "add", "-A")
    _git(target, "commit", "-qm", "init")
    return target


def small_params(small: bool = True) -> dict:
    """params.yaml with free ports for every service; `small` also shrinks the data and the training."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if small:
        params["train"].update({"epochs": 25, "patience": 25, "batch_size": 32})
        params["balance"]["samples_per_class"] = 60
    params["mlflow"]["port"] = free_port()
    params["triton"].update({"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()})
    params["rollout"]["webhook_port"] = free_port()
    return params


def staged_params(tmp_path: Path, signals: int, length: int, seed: int, val_fraction: float, **train: object):
    """A tiny in-process project in `tmp_path` (sample signals, the default bank, this repository's
    params.yaml with `train` overridden), parsed and balanced. Returns `make(**overrides)`: its
    params with more train settings overridden."""
    from cwtops.core.config import params_from_dict
    from cwtops.data.signals import equal_counts, write_sample_dataset
    from cwtops.data.weights import generate_filter_bank, write_weight_file
    from tasks import balance, parse

    write_sample_dataset(tmp_path / "raw", seed=seed, counts=equal_counts(signals), chunk=16, length=length)
    write_weight_file(tmp_path / "my.txt", *generate_filter_bank())
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["base"].update({"raw_dir": str(tmp_path / "raw"), "weights": str(tmp_path / "my.txt"),
                        "artifacts_dir": str(tmp_path / "artifacts"), "results_dir": str(tmp_path / "results")})
    raw["balance"]["val_fraction"] = val_fraction
    raw["train"].update(train)

    def make(**train_overrides):
        return params_from_dict({**raw, "train": {**raw["train"], **train_overrides}})

    params = make()
    parse.run(params.parse, params.base)
    balance.run(params.balance, params.base)
    return make

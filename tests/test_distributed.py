"""Distributed training: `torchrun --nproc_per_node 2` on the CPU (gloo) reaches the single-process
accuracy, and writes its outputs once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import BIN, run

pytestmark = pytest.mark.slow


def _train_and_evaluate(project: Path, env: dict, command: list[str]) -> tuple[dict, dict, str]:
    done = run(command, project, env, timeout=900)
    summary = json.loads((project / "artifacts/train/summary.json").read_text())
    run([str(BIN / "cwtops"), "stage", "evaluate"], project, env)
    return json.loads((project / "artifacts/evaluate/metrics.json").read_text()), summary, done.stdout


@pytest.mark.parametrize("input_mode", ["memory", "stream"])
def test_torchrun_two_processes_on_cpu_match_one_process(built_project: Path, services_env: dict, tmp_path: Path,
                                                        input_mode: str) -> None:
    """Held in memory every rank keeps the scalograms; streamed each reads its share of every batch
    and of the validation split, and the ranks add up their validation figures."""
    project = tmp_path / "ddp"
    shutil.copytree(built_project, project, ignore=shutil.ignore_patterns(".cwtops", "mlflow", "model_repository", "results"))
    # Every signal of the small dataset and enough epochs to converge: a test split large enough
    # (114 signals) and models good enough that "within noise" means a few signals.
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["balance"].update({"samples_per_class": None, "val_fraction": 0.15})  # a validation split the ranks share
    # The comparison, not the head, is under test: the 25-epoch schedule and the 0.85 floor below were
    # set with the 47-step receptive field, which this small set reaches sooner than the derived one.
    raw["train"].update({"epochs": 25, "patience": 25, "input": input_mode, "dilations": [1, 2, 4, 8]})
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**services_env, "GLOO_SOCKET_IFNAME": "lo"}
    run([str(BIN / "cwtops"), "stage", "balance"], project, env)

    single, one, _ = _train_and_evaluate(project, env, [str(BIN / "cwtops"), "stage", "train"])
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "flows.cli", "stage", "train"]
    distributed, two, stdout = _train_and_evaluate(project, env, torchrun)

    print(f"single process: {single}\ntorchrun x2: {distributed}")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["settings"]["input"] == two["settings"]["input"] == input_mode
    assert stdout.count("best_val_macro_f1") == 1  # one process reports and writes
    assert torch.load(project / "artifacts/train/model.pt", weights_only=True)["model_args"]["n_classes"] == 5
    # Same global batch, same schedule: the runs differ only by per-rank BatchNorm statistics and dropout draws.
    assert abs(distributed["accuracy"] - single["accuracy"]) <= 0.05, (single, distributed)
    assert min(single["macro_f1"], distributed["macro_f1"]) >= 0.85, (single, distributed)

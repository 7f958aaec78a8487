"""Real data: UCR datasets shipped inside `aeon`, through this pipeline, against published accuracies.

Each dataset is imported with the fixed TRAIN/TEST split (`cwtops data import-ucr`), then the
stages parse -> balance -> train -> evaluate run in a scratch project with the default weight file
and params suited to short series (below). The published figures are the accuracies on the same
split (resample 0) that aeon ships in `testing/example_results_files` for InceptionTime, HC2,
WEASEL-2.0 and FreshPRINCE. "Competitive" here means at least the weakest of them.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import yaml

from bench.common import cli_main, print_table

QUICK = ("GunPoint", "ArrowHead")
FULL = ("GunPoint", "ArrowHead", "OSULeaf", "ACSF1")
PUBLISHED = ("InceptionTime", "HC2", "WEASEL-2.0", "FreshPRINCE")


def _aeon() -> Path:
    import aeon

    return Path(aeon.__file__).parent


def published(dataset: str) -> dict[str, float]:
    """Resample-0 accuracy (the official split) of each published classifier."""
    folder = _aeon() / "testing" / "example_results_files" / "classification" / "accuracy"
    figures = {}
    for name in PUBLISHED:
        with open(folder / f"{name}_accuracy.csv", newline="") as handle:
            for row in csv.reader(handle):
                if row and row[0] == dataset:
                    figures[name] = float(row[1])
    return figures


def ucr_params(length: int) -> dict:
    """Defaults, adapted to a short series: keep ~256 time steps for the head, train longer."""
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    raw["parse"]["hop"] = max(1, min(8, length // 256))
    raw["balance"]["val_fraction"] = 0.2
    raw["train"].update({"epochs": 80, "patience": 30, "batch_size": 16, "dropout": 0.3})
    return raw


def run_dataset(dataset: str, scratch: Path) -> dict:
    from tasks.config import params_from_dict
    from tasks.data import import_ucr, load_signals, scan_raw
    from tasks.weights import generate_filter_bank, write_weight_file
    from tasks.stages import run_stage

    source = _aeon() / "datasets" / "data" / dataset
    root = scratch / dataset
    root.mkdir()
    import_ucr(source / f"{dataset}_TRAIN.ts", source / f"{dataset}_TEST.ts", root / "data" / "raw")
    length = int(load_signals(scan_raw(root / "data" / "raw").head(1), root / "data" / "raw").shape[-1])
    raw = ucr_params(length)
    previous = os.getcwd()
    os.chdir(root)
    try:
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        params = params_from_dict(raw)
        write_weight_file(params.base.weights, *generate_filter_bank())
        for stage in ("parse", "balance", "train", "evaluate"):
            run_stage(stage, params)
        metrics = yaml.safe_load((root / "artifacts" / "evaluate" / "metrics.json").read_text())
    finally:
        os.chdir(previous)
    figures = published(dataset)
    weakest = min(figures.values()) if figures else float("nan")
    return {"dataset": dataset, "length": length, "hop": raw["parse"]["hop"], "cwtops": metrics["accuracy"],
            **figures, "competitive": metrics["accuracy"] >= weakest}


def run(quick: bool = False) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="cwtops-ucr-") as scratch:
        for dataset in QUICK if quick else FULL:
            rows.append(run_dataset(dataset, Path(scratch)))
    competitive = sum(row["competitive"] for row in rows)
    print_table(f"UCR test accuracy (fixed split) vs published classifiers: competitive on {competitive}/{len(rows)} "
                "(at least the weakest published)", rows, ["dataset", "length", "hop", "cwtops", *PUBLISHED, "competitive"])
    return {"rows": rows, "holds": competitive == len(rows)}


def main() -> None:
    cli_main(run, "ucr.json", __doc__)


if __name__ == "__main__":
    main()

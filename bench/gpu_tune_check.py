"""GPU check of the tune stage: the same seeded search twice on CUDA (bf16 autocast) and once on the
CPU, each followed by the train stage with the chosen settings (BENCHMARKS.md, GPU).

    python -m bench.gpu_tune_check    # on a machine with a CUDA device
"""
import json
import tempfile
import time
from pathlib import Path
import torch
from cwtops.core.config import TuneConfig
from tasks import tune, train
import yaml

from bench.scratch import ROOT
from cwtops.core.config import params_from_dict
from cwtops.data.signals import equal_counts, write_sample_dataset
from cwtops.data.weights import generate_filter_bank, write_weight_file
from tasks import balance, parse


def staged_params(tmp_path: Path, signals: int, length: int, seed: int, val_fraction: float, **train_settings):
    """A small in-process project: sample signals, the default bank, this repository's params.yaml
    with `train` overridden, parsed and balanced."""
    write_sample_dataset(tmp_path / "raw", seed=seed, counts=equal_counts(signals), chunk=16, length=length)
    write_weight_file(tmp_path / "my.txt", *generate_filter_bank())
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["base"].update({"raw_dir": str(tmp_path / "raw"), "weights": str(tmp_path / "my.txt"),
                        "artifacts_dir": str(tmp_path / "artifacts"), "results_dir": str(tmp_path / "results")})
    raw["balance"]["val_fraction"] = val_fraction
    raw["train"].update(train_settings)
    params = params_from_dict(raw)
    parse.run(params.parse, params.base)
    balance.run(params.balance, params.base)
    return lambda: params

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
search = TuneConfig(trials=4, folds=3, budget=0.05, space=("dilations", "dropout", "warp", "raw_channel"))
out = {}
for device in ("cuda", "cuda", "cpu"):
    tmp = Path(tempfile.mkdtemp())
    make = staged_params(tmp, 120, 256, seed=3, val_fraction=0.0, epochs=20, members=1, device=device, threads=4)
    params = make()
    tick = time.perf_counter()
    result = tune.run(search, params.base, params.train)
    seconds = time.perf_counter() - tick
    trials = (tmp / "artifacts/tune/trials.csv").read_text()
    print(device, f"{seconds:.1f} s", result.chosen, result.score, result.baseline)
    print(trials)
    tick = time.perf_counter()
    train.run(params.train, params.base)
    summary = json.loads((tmp / "artifacts/train/summary.json").read_text())
    print(device, "train", f"{time.perf_counter() - tick:.1f} s", summary["device"], summary["tuned"], summary["settings"]["dilations"])
    out.setdefault(device, []).append({"seconds": seconds, "chosen": result.chosen, "score": result.score, "trials": trials})
scores = [[line.split(",")[6] for line in run["trials"].splitlines()[1:]] for run in out["cuda"]]
print("cuda runs agree:", scores[0] == scores[1])
print("cuda chose as cpu:", out["cuda"][0]["chosen"] == out["cpu"][0]["chosen"])

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
from bench.scratch import staged_params

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

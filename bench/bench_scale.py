"""Scale: memory and time per signal of each stage as the data grows, through the stage commands.

For each size (10,000, 100,000 and 1,000,000 signals of 2,048 samples by default) a scratch folder
gets a balanced sample set from `cwtops data sample --signals N --shard S` (1,000 shard files at
100,000 and at 1,000,000), the default weight file, and this repository's params.yaml with only its
paths changed and `train.epochs: 1` (at 1,000,000 also `train.max_steps`, a fixed number of steps:
a full epoch there is hours on 2 cores). Then `cwtops stage parse|balance|train|evaluate`, each its
own process, each one's peak resident memory read from the kernel (`wait4`'s ru_maxrss).
`train.input` stays `auto`: in memory while the scalograms fit 1 GiB (10,000), streamed above.
At the smallest size the train stage runs again with `train.input: stream`, and streamed with one
DataLoader worker reading ahead (`train.num_workers: 1`), side by side.

Reported: per stage, seconds, peak MB and microseconds per signal; for train, milliseconds per
training signal (its training pass, plus the front-end pass that the in-memory input makes first);
the growth of each from one size to the next. And, on the 100,000-signal set (1,000 shards): `dvc
add`, `dvc status` (twice), `dvc push` to an S3 remote on a moto server, and `dvc pull` into an
empty cache and workspace.

    python -m bench.bench_scale [--sizes 10000,100000,1000000] [--root DIR] [--keep] [--no-dvc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import RESULTS_DIR, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SIZES = (10_000, 100_000, 1_000_000)
STEPS_AT_A_MILLION = 400  # train.max_steps where a full epoch would be hours
MAX_TRAIN_MB = 3 * 1024  # the target: train's peak at every size
MAX_RATIO = 1.25  # time per training signal at 100,000 vs the in-memory path at 10,000
MAX_SCAN_BALANCE_S = 60.0  # parse + balance of a 1,000,000-row manifest
MAX_DVC_STATUS_S = 5.0  # with 1,000 shard files
STAGES = ("parse", "balance", "train", "evaluate")
# the train stage again at the smallest size, side by side: streamed, and streamed with a DataLoader
# process reading batches ahead
VARIANTS = {"train_stream": {"input": "stream"}, "train_stream_workers": {"input": "stream", "num_workers": 1}}


def measured(command: list[str], cwd: Path, env: dict | None = None, log: Path | None = None) -> dict:
    """Run a command; its wall seconds and the peak resident memory of its process (MB)."""
    started = time.perf_counter()
    with open(log or os.devnull, "ab") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}) in {cwd}:\n{tail}")
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024}


def shard_size(signals: int) -> int:
    return max(100, signals // 1000)


def prepare(folder: Path, signals: int, overrides: dict) -> Path:
    """Sample data, the default weight file and params for one size; returns the params file."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    measured([str(BIN / "cwtops"), "data", "sample", "--signals", str(signals), "--shard", str(shard_size(signals)),
              "--out", str(folder / "data/raw")], folder)
    code = "from cwtops.data.weights import generate_filter_bank, write_weight_file; write_weight_file('my.txt', *generate_filter_bank())"
    subprocess.run([sys.executable, "-c", code], cwd=folder, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update({"raw_dir": str(folder / "data/raw"), "weights": str(folder / "my.txt"),
                           "artifacts_dir": str(folder / "artifacts"), "results_dir": str(folder / "results")})
    params["train"].update({"epochs": 1, "patience": 1, **overrides})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def per_training_signal_ms(artifacts: Path) -> dict:
    """Training pass time per trained signal, the in-memory input's front-end pass included."""
    import pandas as pd

    summary = json.loads((artifacts / "train/summary.json").read_text())
    history = pd.read_csv(artifacts / "train/history.csv")
    fit, steps = float(history.fit_seconds.sum()), int(history.steps.sum())
    batch = summary["settings"]["batch_size"]
    load = summary["load_seconds"]["train"] if summary["settings"]["input"] == "memory" else 0.0
    trained = min(steps * batch, summary["settings"]["n_train"])
    return {"input": summary["settings"]["input"], "trained_signals": trained, "fit_seconds": fit,
            "front_end_seconds": load, "ms_per_training_signal": 1e3 * (fit + load) / trained,
            "val_macro_f1": float(history.val_macro_f1.iloc[-1])}


def run_size(signals: int, root: Path, env: dict, keep: bool, variants: bool) -> dict:
    folder = root / f"n{signals}"
    overrides = {"max_steps": STEPS_AT_A_MILLION} if signals >= 1_000_000 else {}
    tick = time.perf_counter()
    params = prepare(folder, signals, overrides)
    result: dict = {"signals": signals, "shard_files": -(-signals // shard_size(signals)),
                    "write_seconds": time.perf_counter() - tick, "stages": {}}
    log = folder / "stages.log"
    for stage in STAGES:
        print(f"[{signals}] {stage} ...", flush=True)
        result["stages"][stage] = measured([str(BIN / "cwtops"), "stage", stage, "--params", str(params)], folder, env, log)
        if stage == "train":
            result["train"] = per_training_signal_ms(folder / "artifacts")
    for name, changes in (VARIANTS if variants else {}).items():
        raw = yaml.safe_load(params.read_text())
        raw["train"].update(changes)
        changed = folder / f"params-{name}.yaml"
        changed.write_text(yaml.safe_dump(raw, sort_keys=False))
        print(f"[{signals}] {name} ...", flush=True)
        result["stages"][name] = measured([str(BIN / "cwtops"), "stage", "train", "--params", str(changed)], folder, env, log)
        result[name] = per_training_signal_ms(folder / "artifacts")
    manifest_rows = sum(1 for _ in open(folder / "artifacts/parse/manifest.csv")) - 1
    result["manifest_rows"] = manifest_rows
    if not keep:
        shutil.rmtree(folder / "data", ignore_errors=True)
    return result


def dvc_timings(signals: int, root: Path) -> dict:
    """dvc add / status / push / pull of a raw folder of 1,000 shards, the remote on moto S3."""
    import boto3
    from moto.server import ThreadedMotoServer

    from bench.scratch import free_port

    folder = root / "dvc"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    measured([str(BIN / "cwtops"), "data", "sample", "--signals", str(signals), "--shard", str(shard_size(signals)),
              "--out", str(folder / "data/raw")], folder)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                     region_name="us-east-1").create_bucket(Bucket="scale")
        dvc = [str(BIN / "dvc")]
        for command in (["git", "init", "-q"], [*dvc, "init", "-q"],
                        [*dvc, "remote", "add", "-d", "storage", "s3://scale/dvc"],
                        [*dvc, "remote", "modify", "storage", "endpointurl", endpoint]):
            subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
        timings = {"shard_files": len(list((folder / "data/raw").rglob("*.npy")))}
        timings["add"] = measured([*dvc, "add", "-q", "data/raw"], folder, env)["seconds"]
        timings["status_first"] = measured([*dvc, "status"], folder, env)["seconds"]
        timings["status"] = measured([*dvc, "status"], folder, env)["seconds"]
        timings["push"] = measured([*dvc, "push", "-q"], folder, env)["seconds"]
        shutil.rmtree(folder / ".dvc/cache")
        shutil.rmtree(folder / "data/raw")
        timings["pull"] = measured([*dvc, "pull", "-q"], folder, env)["seconds"]
        timings["pulled_files"] = len(list((folder / "data/raw").rglob("*.npy")))
        timings["status_after_pull"] = measured([*dvc, "status"], folder, env)["seconds"]
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return timings


def growth(results: list[dict]) -> list[dict]:
    rows = []
    for small, large in zip(results, results[1:]):
        factor = large["signals"] / small["signals"]
        row = {"from": small["signals"], "to": large["signals"], "signals x": factor}
        for stage in STAGES:
            row[f"{stage} peak x"] = large["stages"][stage]["peak_mb"] / small["stages"][stage]["peak_mb"]
        row["train ms/signal x"] = large["train"]["ms_per_training_signal"] / small["train"]["ms_per_training_signal"]
        rows.append(row)
    return rows


def checks(results: list[dict], dvc: dict | None) -> dict:
    by_size = {r["signals"]: r for r in results}
    found: dict = {"train_peak_mb_max": max(r["stages"]["train"]["peak_mb"] for r in results)}
    found["train_peak_ok"] = found["train_peak_mb_max"] <= MAX_TRAIN_MB
    if 10_000 in by_size and 100_000 in by_size:
        reference = by_size[10_000]
        memory = reference["train"] if reference["train"]["input"] == "memory" else None
        if memory:
            found["time_ratio_100k_vs_10k_memory"] = by_size[100_000]["train"]["ms_per_training_signal"] / memory["ms_per_training_signal"]
            found["time_ratio_ok"] = found["time_ratio_100k_vs_10k_memory"] <= MAX_RATIO
    largest = results[-1]
    found["scan_balance_seconds_at_largest"] = largest["stages"]["parse"]["seconds"] + largest["stages"]["balance"]["seconds"]
    if largest["signals"] >= 1_000_000:
        found["scan_balance_ok"] = found["scan_balance_seconds_at_largest"] <= MAX_SCAN_BALANCE_S
    if dvc:
        found["dvc_status_seconds"] = dvc["status"]
        found["dvc_status_ok"] = dvc["status"] <= MAX_DVC_STATUS_S and dvc["shard_files"] >= 1000
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--root", type=Path, default=Path("/tmp/cwtops-scale"), help="scratch folder (8 GB at a million)")
    parser.add_argument("--keep", action="store_true", help="keep each size's raw data")
    parser.add_argument("--no-dvc", action="store_true", help="skip the DVC timings")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "scale.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = []
    for signals in sizes:
        results.append(run_size(signals, args.root, env, args.keep, variants=signals == min(sizes)))
        payload = {"sizes": results}
        write_json(args.json, payload)  # rewritten after every size: a long run keeps what it measured
    dvc = None if args.no_dvc else dvc_timings(100_000, args.root)
    rows = []
    for r in results:
        for stage, figures in r["stages"].items():
            per = 1e6 * figures["seconds"] / r["signals"]
            rows.append({"signals": r["signals"], "stage": stage, "seconds": figures["seconds"], "peak MB": figures["peak_mb"],
                         "us/signal": per})
    print_table("Peak memory and time per stage", rows, ["signals", "stage", "seconds", "peak MB", "us/signal"])
    train_rows = [{"signals": r["signals"], "run": name, **r[name]} for r in results for name in ("train", *VARIANTS) if name in r]
    print_table("Train: time per training signal", train_rows,
                ["signals", "run", "input", "trained_signals", "fit_seconds", "front_end_seconds", "ms_per_training_signal", "val_macro_f1"])
    print_table("Growth from each size to the next", growth(results), list(growth(results)[0]) if len(results) > 1 else ["from"])
    if dvc:
        print_table("DVC with 1,000 shard files (S3 remote on moto)", [dvc], list(dvc))
    found = checks(results, dvc)
    print_table("Checks", [found], list(found))
    print(f"wrote {write_json(args.json, {'sizes': results, 'growth': growth(results), 'dvc': dvc, 'checks': found})}")


if __name__ == "__main__":
    main()

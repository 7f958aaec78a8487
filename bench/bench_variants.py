"""INT8 / FP16 / graph-optimised ONNX variants against the float32 export, on CPU, side by side.

Runs in a built project (params.yaml + artifacts/export/model.onnx + the split manifest), so the
accuracy figures are on the real test split; run anywhere else (`cwtops bench` on a fresh clone),
it first builds the small sample project up to parity in a scratch folder and measures that. Variants are built into a temporary folder (the
project's artifacts/variants/ is left alone); every model is timed in interleaved rounds in one
process. Target: INT8 at least 1.5x float32 throughput at batch 64, within the accuracy gate.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import cli_main, print_table
from cwtops.core.config import load_params
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import artifact_paths
from cwtops.model.signature import INPUT_NAME, OUTPUT_NAME
from cwtops.variants import (
    VARIANTS,
    VariantsConfig,
    build_variant,
    class_names,
    score,
    speed,
    test_set,
    timing_batch,
)

TARGET = 1.5  # INT8 vs float32 throughput at batch 64, CPU


def op_profile(path: Path, batch: np.ndarray, runs: int = 10, top: int = 5) -> list[dict]:
    """Where the time goes: ONNX Runtime's per-node kernel time, the `top` nodes and their share."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as work:
        options.profile_file_prefix = str(Path(work) / "profile")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run([OUTPUT_NAME], {INPUT_NAME: batch[:, None, :]})
        events = json.loads(Path(sess.end_profiling()).read_text())
    kernel = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernel[f"{event['args']['op_name']} {event['name'][: -len('_kernel_time')]}"] += event["dur"]
    total = sum(kernel.values()) or 1
    return [{"node": name, "share": dur / total, "ms": dur / runs / 1e3} for name, dur in kernel.most_common(top)]


def measure(threads: int, repeats: int) -> tuple[list[dict], dict]:
    params = load_params()
    source = artifact_paths(params.base).onnx
    if not source.exists():
        raise CwtopsError(f"{source}: no float32 export here; run this in a built project (`dvc repro parity` or `cwtops run`)")
    cfg = VariantsConfig(repeats=repeats, threads=threads)
    signals, labels = test_set(params, class_names(source))
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as work:
        models, builds = {"float32": source}, {}
        for name in VARIANTS:
            builds[name] = build_variant(name, source, Path(work) / f"{name}.onnx", params, cfg)
            models[name] = Path(work) / f"{name}.onnx"
        scored, timed = score(models, signals, labels, cfg), speed(models, signals, cfg)
        sizes = {name: path.stat().st_size for name, path in models.items()}
        profiles = {name: op_profile(models[name], timing_batch(signals, cfg.batch_size)) for name in ("float32", "int8")}
    rows = [
        {"model": name, "threads": threads or "all", "accuracy": scored[name]["accuracy"], "macro_f1": scored[name]["macro_f1"],
         "drop_pts": scored[name]["accuracy_drop"], "agreement": scored[name]["argmax_agreement"],
         "sig_s_b64": timed[name]["throughput_signals_per_s"], "x_b64": timed[name]["throughput_speedup"],
         "ms_b1": timed[name]["latency_ms"], "x_b1": timed[name]["latency_speedup"], "load_ms": timed[name]["load_ms"],
         "kib": sizes[name] / 1024, "gate": scored[name].get("gate", {}).get("passed", True)}
        for name in models
    ]
    return rows, {"builds": builds, "profiles": profiles, "n_test": len(labels)}


def run(quick: bool = False) -> dict:
    """In a built project (the current folder), else in the small sample project built first."""
    if artifact_paths(load_params().base).onnx.exists():
        return _run(quick)
    with tempfile.TemporaryDirectory(prefix="cwtops-bench-variants-") as scratch:
        root = _built_sample_project(Path(scratch))
        previous = os.getcwd()
        os.chdir(root)
        try:
            return _run(quick)
        finally:
            os.chdir(previous)


def _built_sample_project(scratch: Path) -> Path:
    """This repository's pipeline on the small sample data, built up to parity (a few minutes)."""
    import subprocess
    import sys

    import yaml

    from bench.scratch import SMALL_COUNTS, make_project, small_params

    print("variants: no float32 export in this folder; building the small sample project up to parity first", flush=True)
    root = make_project(scratch / "project")
    (root / "params.yaml").write_text(yaml.safe_dump(small_params(), sort_keys=False))
    env = {**os.environ, "CWTOPS_STATE_DIR": str(root / ".cwtops"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    code = f"from cwtops.data.signals import write_sample_dataset; write_sample_dataset('data/raw', seed=42, counts={SMALL_COUNTS!r})"
    for command in ([sys.executable, "-c", code], ["cwtops", "init"], ["dvc", "repro", "parity"]):
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise CwtopsError(f"building the sample project failed at `{' '.join(command[:3])}`:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return root


def _run(quick: bool) -> dict:
    repeats = 10 if quick else 40
    thread_counts = (0, 1)  # all cores in one session, and one thread (what each Triton instance runs)
    rows, details = [], {}
    for threads in thread_counts:
        measured, details[f"threads={threads or 'all'}"] = measure(threads, repeats)
        rows += measured
    int8 = [row for row in rows if row["model"] == "int8"]
    holds = all(row["x_b64"] >= TARGET and row["gate"] for row in int8)
    columns = ["model", "threads", "accuracy", "macro_f1", "drop_pts", "agreement", "sig_s_b64", "x_b64", "ms_b1", "x_b1", "load_ms", "kib", "gate"]
    print_table(f"ONNX variants vs float32, CPU, batch 64 (target INT8 >= {TARGET}x within the gate: {'holds' if holds else 'MISSED'})", rows, columns)
    for name, profile in details[next(iter(details))]["profiles"].items():
        print_table(f"{name}: top nodes by kernel time (batch 64)", profile, ["node", "share", "ms"])
    return {"rows": rows, "target": TARGET, "holds": holds, "repeats": repeats, "details": details}


def main() -> None:
    cli_main(run, "variants.json", __doc__)


if __name__ == "__main__":
    main()

"""`cwtops bench [--quick]`: every benchmark, one table each, one JSON with the machine described."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from bench.common import RESULTS_DIR, write_json

BENCHMARKS = ("bench_frontend", "bench_parser", "bench_onnx", "bench_train", "bench_serving", "bench_mlflow", "bench_flow", "bench_variants")


def run_all(quick: bool = False, only: list[str] | None = None, out: Path = RESULTS_DIR / "suite.json") -> dict:
    results, started = {}, time.perf_counter()
    for name in BENCHMARKS:
        if only and name.removeprefix("bench_") not in only:
            continue
        tick = time.perf_counter()
        try:
            results[name] = importlib.import_module(f"bench.{name}").run(quick)
        except Exception as error:  # one failing benchmark must not hide the others
            results[name] = {"error": f"{type(error).__name__}: {error}", "holds": False}
            print(f"\n{name}: FAILED: {error}")
        results[name]["seconds"] = time.perf_counter() - tick
    summary = {name: result.get("holds") for name, result in results.items()}
    verdict = {True: "holds", False: "MISSED", None: "not measured"}
    print("\ntargets: " + ", ".join(f"{name.removeprefix('bench_')} {verdict[ok]}" for name, ok in summary.items()))
    write_json(out, {"quick": quick, "seconds": time.perf_counter() - started, "results": results, "targets": summary})
    print(f"wrote {out}")
    return results

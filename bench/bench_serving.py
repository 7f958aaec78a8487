"""Served (Triton, dynamic batching) against in-process ONNX Runtime, same model, same run:
throughput and p50/p99 latency of single-signal requests at concurrency 1, 8 and 32.

Both sides get the same closed-loop load: `concurrency` workers, each sending one signal [1, 1, L]
and sending the next when the answer is back. In-process, threads share one ONNX Runtime session
(default options). Served, against a real tritonserver on 127.0.0.1 configured from params.yaml's
`triton` section (override keys with --set key=value), the load comes from Triton's C++
`perf_analyzer` (`make perf-analyzer`; the figure the target is judged on) and from Python threads
with one tritonclient.http client each (what a Python application sees). Rounds of the three are
interleaved; CPU seconds per request are read from /proc for the load generator, tritonserver and
its backend stubs, which gives the ratio the two shared cores allow (`cpu_ceiling`).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import RESULTS_DIR, print_table, write_json
from cwtops.core.config import Params, load_params, params_from_dict

TARGET = 0.70  # served throughput / in-process throughput at concurrency >= 8
CONCURRENCY = (1, 8, 32)
MODEL_NAME = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_default_model(path: Path) -> int:
    """The default architecture (default Morlet bank, L 2048, 5 classes) as ONNX; returns L."""
    from bench.bench_onnx import default_model
    from tasks.export import onnx_bytes, with_metadata

    model = default_model()
    length = model.args.signal_length
    names = '["c0", "c1", "c2", "c3", "c4"]'
    path.write_bytes(with_metadata(onnx_bytes(model, length, 18, False), {"class_names": names}).SerializeToString())
    return length


def measure(call: Callable[[], object], concurrency: int, requests: int) -> tuple[float, list[float]]:
    """`requests` calls from `concurrency` threads (after one warm-up call each): (requests/s, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        with lock:
            latencies.append(elapsed)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: call(), range(concurrency)))  # warm-up: connections, sessions, arenas
        started = time.perf_counter()
        list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    return requests / wall, latencies


def summarize(rounds: list[tuple[float, list[float]]]) -> dict:
    """Median throughput over rounds; latency percentiles over every request of every round."""
    latencies = np.concatenate([np.asarray(lat) for _, lat in rounds]) * 1e3
    return {"rps": float(np.median([rps for rps, _ in rounds])), "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99))}


def bench_params(root: Path, overrides: dict[str, str]) -> Params:
    raw = load_params().model_dump(mode="json")
    raw["base"]["model_name"] = MODEL_NAME
    raw["triton"].update({"model_repository": str(root / "repository"), "http_port": _free_port(), "grpc_port": _free_port(), "metrics_port": _free_port()})
    for key, value in overrides.items():
        raw["triton"][key] = [int(v) for v in value.split(",") if v] if key == "preferred_batch_sizes" else value
    return params_from_dict(raw, "bench overrides")


def _served_call(url: str, signal: np.ndarray, model: str = MODEL_NAME) -> Callable[[], object]:
    """One request of `signal` to `model`, one tritonclient per thread (they are not thread-safe)."""
    from cwtops.serving.client import connect, infer

    local = threading.local()

    def call() -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = connect(url)
        return infer(url, model, signal, client=local.client)

    return call


def server_stats(url: str) -> dict[str, float]:
    """Triton's cumulative statistics for the model: requests, executions, queue and compute time."""
    import requests

    stats = requests.get(f"http://{url}/v2/models/{MODEL_NAME}/stats", timeout=10).json()["model_stats"][0]
    timing = stats["inference_stats"]
    return {"requests": stats["inference_count"], "executions": stats["execution_count"],
            "queue_ns": timing["queue"]["ns"], "compute_ns": timing["compute_infer"]["ns"]}


def _server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean batch size, queue wait per request and model time per execution between two snapshots."""
    requests = max(1, after["requests"] - before["requests"])
    executions = max(1, after["executions"] - before["executions"])
    return {"served_mean_batch": requests / executions, "served_queue_ms": (after["queue_ns"] - before["queue_ns"]) / requests / 1e6,
            # Triton adds a batch's compute time to each of its requests
            "served_compute_ms_per_batch": (after["compute_ns"] - before["compute_ns"]) / requests / 1e6}


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


class CpuMeter:
    """CPU seconds spent by this process, tritonserver and its backend stubs."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def sample(self) -> dict[str, float]:
        stubs = sum(_process_cpu(pid) for pid in _children(self.server_pid))
        return {"client": time.process_time(), "server": _process_cpu(self.server_pid), "backend": stubs}


class ServedRun:
    """Accumulates one served load generator's rounds: throughput, latencies, CPU per request."""

    def __init__(self, url: str, meter: CpuMeter) -> None:
        self.url, self.meter = url, meter
        self.rounds: list[tuple[float, list[float]]] = []
        self.cpu = {"client": 0.0, "server": 0.0, "backend": 0.0}
        self.stats = {"requests": 0.0, "executions": 0.0, "queue_ns": 0.0, "compute_ns": 0.0}

    def add(self, call: Callable[[], tuple[float, list[float], float | None]]) -> None:
        """`call` returns (requests/s, latencies in s, the client's CPU seconds or None for this process's)."""
        stats, cpu = server_stats(self.url), self.meter.sample()
        rps, latencies, client_cpu = call()
        after_stats, after_cpu = server_stats(self.url), self.meter.sample()
        self.rounds.append((rps, latencies))
        for key in self.stats:
            self.stats[key] += after_stats[key] - stats[key]
        for key in self.cpu:
            self.cpu[key] += after_cpu[key] - cpu[key]
        if client_cpu is not None:
            self.cpu["client"] += client_cpu - (after_cpu["client"] - cpu["client"])

    def cpu_ms(self) -> dict[str, float]:
        return {key: 1e3 * value / max(1, self.stats["requests"]) for key, value in self.cpu.items()}

    def server_side(self) -> dict[str, float]:
        return _server_side(dict.fromkeys(self.stats, 0.0), self.stats)


def _perf_analyzer_call(url: str, concurrency: int, inputs: Path, interval_ms: int) -> Callable[[], tuple[float, list[float], float]]:
    from bench import perf_analyzer

    def call() -> tuple[float, list[float], float]:
        result = perf_analyzer.measure(url, MODEL_NAME, concurrency, inputs, interval_ms)
        return result.rps, [result.p50_ms / 1e3, result.p99_ms / 1e3], result.client_cpu_s

    return call


def _python_client_call(call: Callable[[], object], concurrency: int, requests: int) -> Callable[[], tuple[float, list[float], None]]:
    return lambda: (*measure(call, concurrency, requests), None)


def _ceiling(in_process_cpu_ms: float, served: dict[str, float], with_client: bool = True) -> float:
    """The ratio the CPU allows when both sides are CPU-bound on the same cores: in-process CPU per
    request over served CPU per request (client + tritonserver + backend stubs, or without the client)."""
    keys = ("client", "server", "backend") if with_client else ("server", "backend")
    return in_process_cpu_ms / sum(served[key] for key in keys)


def _rows(url: str, session: ort.InferenceSession, signal: np.ndarray, quick: bool, meter: CpuMeter, inputs: Path | None) -> list[dict]:
    """Per concurrency: in-process, perf_analyzer and Python-client rounds interleaved, so a busy
    neighbour hits them alike. Without perf_analyzer (`inputs` None) the Python client is the served side."""
    served_call = _served_call(url, signal)
    local_call = lambda: session.run(["logits"], {"signal": signal})  # noqa: E731
    # every side runs about a second per round: in-process at ~4,000 requests/s, perf_analyzer its windows
    rounds, requests, interval_ms = (3, 3000, 1000) if quick else (5, 6000, 2000)
    measure(local_call, 8, 300)  # ONNX Runtime's arena and thread pool settle before the first round
    rows = []
    for concurrency in CONCURRENCY:
        local, local_cpu = [], 0.0
        python = ServedRun(url, meter)
        native = ServedRun(url, meter) if inputs is not None else None
        for _ in range(rounds):
            started = time.process_time()
            local.append(measure(local_call, concurrency, requests))
            local_cpu += time.process_time() - started
            if native is not None:
                native.add(_perf_analyzer_call(url, concurrency, inputs, interval_ms))
            python.add(_python_client_call(served_call, concurrency, requests))
        in_process_cpu_ms = 1e3 * local_cpu / (rounds * (requests + concurrency))  # the warm-up calls count too
        local_summary, python_summary = summarize(local), summarize(python.rounds)
        row = {"concurrency": concurrency, "in_process_rps": local_summary["rps"]}
        served = native or python
        served_summary = python_summary if native is None else {
            "rps": float(np.median([rps for rps, _ in native.rounds])),
            "p50_ms": 1e3 * float(np.median([lat[0] for _, lat in native.rounds])),
            "p99_ms": 1e3 * float(np.median([lat[1] for _, lat in native.rounds]))}
        row.update({"served_rps": served_summary["rps"], "ratio": served_summary["rps"] / local_summary["rps"]})
        if native is not None:
            row.update({"python_client_rps": python_summary["rps"], "python_client_ratio": python_summary["rps"] / local_summary["rps"]})
        row.update({"in_process_p50_ms": local_summary["p50_ms"], "in_process_p99_ms": local_summary["p99_ms"],
                    "served_p50_ms": served_summary["p50_ms"], "served_p99_ms": served_summary["p99_ms"], **served.server_side(),
                    "in_process_cpu_ms": in_process_cpu_ms})
        cpu = served.cpu_ms()
        row.update({f"served_cpu_ms_{key}": value for key, value in cpu.items()})
        row.update({"cpu_ceiling": _ceiling(in_process_cpu_ms, cpu), "cpu_ceiling_remote_client": _ceiling(in_process_cpu_ms, cpu, False)})
        rows.append(row)
    return rows


def run(quick: bool = False, overrides: dict[str, str] | None = None) -> dict:
    """Start a private tritonserver, publish the default model, load both sides; a table and a dict."""
    from bench import perf_analyzer
    from cwtops.serving.publish import publish_version
    from cwtops.serving.server import start, stop

    problems = perf_analyzer.missing()
    generator = "tritonclient.http (Python threads)" if problems else f"perf_analyzer {perf_analyzer.version()} (C++)"
    if problems:
        print("serving: perf_analyzer unavailable, the served side is measured with the Python client: " + "; ".join(problems))
    with tempfile.TemporaryDirectory(prefix="cwtops-bench-serving-") as scratch:
        root = Path(scratch)
        onnx_path = root / "model.onnx"
        length = export_default_model(onnx_path)
        params = bench_params(root, overrides or {})
        previous_state = os.environ.get("CWTOPS_STATE_DIR")
        os.environ["CWTOPS_STATE_DIR"] = str(root / "state")
        try:
            info = start(params, wait=120)
            try:
                publish_version(onnx_path, 1, params, url=info.url)
                session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                signal = np.random.default_rng(0).standard_normal((1, 1, length)).astype(np.float32)
                inputs = perf_analyzer.input_file(root, "signal", signal) if generator.startswith("perf_analyzer") else None
                rows = _rows(info.url, session, signal, quick, CpuMeter(info.pid), inputs)
            finally:
                stop(params)
        finally:
            if previous_state is None:
                os.environ.pop("CWTOPS_STATE_DIR", None)
            else:
                os.environ["CWTOPS_STATE_DIR"] = previous_state
    holds = all(row["ratio"] >= TARGET for row in rows if row["concurrency"] >= 8)
    title = (f"serving: Triton vs in-process ONNX Runtime, single-signal requests, L {length}, load generator {generator} "
             f"(target: served >= {TARGET:.0%} of in-process at concurrency >= 8: {'holds' if holds else 'MISSED'})")
    print_table(title, rows, list(rows[0]))
    return {"rows": rows, "target": TARGET, "holds": holds, "load_generator": generator, "triton": params.triton.model_dump(mode="json"), "signal_length": length}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--json", default=str(RESULTS_DIR / "serving.json"), help="where to write the results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a triton.* param (e.g. max_queue_delay_us=500)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    write_json(args.json, run(args.quick, overrides))


if __name__ == "__main__":
    main()

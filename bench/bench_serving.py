"""Served (Triton, dynamic batching) against in-process ONNX Runtime, same model, same run:
throughput and p50/p99 latency of single-signal requests at concurrency 1, 8 and 32.

Both sides get the same load: `concurrency` threads, each sending one signal [1, 1, L] at a time
and waiting for the answer. In-process, the threads share one ONNX Runtime session (default
options). Served, each thread has its own tritonclient.http client against a real tritonserver on
127.0.0.1 configured from params.yaml's `triton` section (override keys with --set key=value).
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
from tasks.config import Params, load_params, params_from_dict

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


def _served_call(url: str, signal: np.ndarray) -> Callable[[], object]:
    from tasks.triton_client import connect, infer

    local = threading.local()

    def call() -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = connect(url)
        return infer(url, MODEL_NAME, signal, client=local.client)

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
    """CPU seconds spent by this process (the load generator), tritonserver and its backend stubs."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def sample(self) -> dict[str, float]:
        stubs = sum(_process_cpu(pid) for pid in _children(self.server_pid))
        return {"client": time.process_time(), "server": _process_cpu(self.server_pid), "backend": stubs}


def _timed(call: Callable[[], tuple[float, list[float]]], meter: CpuMeter | None, spent: dict[str, float]) -> tuple[float, list[float]]:
    before = meter.sample() if meter else {"client": time.process_time()}
    result = call()
    after = meter.sample() if meter else {"client": time.process_time()}
    for key in after:
        spent[key] = spent.get(key, 0.0) + after[key] - before[key]
    return result


def _ceilings(side: dict[str, float]) -> dict[str, float]:
    """The ratio the CPU allows when both sides are CPU-bound on the same cores: in-process CPU per
    request over served CPU per request, with the load generator (this process) and without it."""
    served = [side[f"served_cpu_ms_{key}"] for key in ("client", "server", "backend")]
    return {"cpu_ceiling": side["in_process_cpu_ms"] / sum(served),
            "cpu_ceiling_remote_client": side["in_process_cpu_ms"] / sum(served[1:])}


def _rows(url: str, session: ort.InferenceSession, signal: np.ndarray, quick: bool, meter: CpuMeter) -> list[dict]:
    """Per concurrency: in-process and served rounds interleaved, so a busy neighbour hits both alike."""
    served_call = _served_call(url, signal)
    local_call = lambda: session.run(["logits"], {"signal": signal})  # noqa: E731
    rounds, requests = (2, 150) if quick else (5, 300)
    rows = []
    for concurrency in CONCURRENCY:
        local, served, local_cpu, served_cpu = [], [], {}, {}
        before = server_stats(url)
        for _ in range(rounds):
            local.append(_timed(lambda: measure(local_call, concurrency, requests), None, local_cpu))
            served.append(_timed(lambda: measure(served_call, concurrency, requests), meter, served_cpu))
        side = _server_side(before, server_stats(url))
        total = rounds * (requests + concurrency)  # the warm-up calls count too
        side.update({"in_process_cpu_ms": 1e3 * local_cpu["client"] / total,
                     **{f"served_cpu_ms_{key}": 1e3 * value / total for key, value in served_cpu.items()}})
        side.update(_ceilings(side))
        local_summary, served_summary = summarize(local), summarize(served)
        rows.append({
            "concurrency": concurrency, "in_process_rps": local_summary["rps"], "served_rps": served_summary["rps"],
            "ratio": served_summary["rps"] / local_summary["rps"],
            "in_process_p50_ms": local_summary["p50_ms"], "in_process_p99_ms": local_summary["p99_ms"],
            "served_p50_ms": served_summary["p50_ms"], "served_p99_ms": served_summary["p99_ms"], **side,
        })
    return rows


def run(quick: bool = False, overrides: dict[str, str] | None = None) -> dict:
    """Start a private tritonserver, publish the default model, load both sides; a table and a dict."""
    from tasks.triton_publish import publish_version
    from tasks.triton_server import start, stop

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
                rows = _rows(info.url, session, signal, quick, CpuMeter(info.pid))
            finally:
                stop(params)
        finally:
            if previous_state is None:
                os.environ.pop("CWTOPS_STATE_DIR", None)
            else:
                os.environ["CWTOPS_STATE_DIR"] = previous_state
    holds = all(row["ratio"] >= TARGET for row in rows if row["concurrency"] >= 8)
    title = (f"serving: Triton vs in-process ONNX Runtime, single-signal requests, L {length} "
             f"(target: served >= {TARGET:.0%} of in-process at concurrency >= 8: {'holds' if holds else 'MISSED'})")
    print_table(title, rows, list(rows[0]))
    return {"rows": rows, "target": TARGET, "holds": holds, "triton": params.triton.model_dump(mode="json"), "signal_length": length}


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

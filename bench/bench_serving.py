"""Served (Triton, dynamic batching) against in-process ONNX Runtime, same model, same run:
throughput and p50/p99 latency of single-signal requests at concurrency 1, 8 and 32."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.bench_onnx import default_model
from bench.common import RESULTS_DIR, print_table, write_json
from tasks.config import load_params
from tasks.export import INPUT_NAME, OUTPUT_NAME, onnx_bytes, with_metadata

TARGET = 0.70  # served throughput / in-process throughput at concurrency >= 8


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(call, concurrency: int, requests: int) -> dict:
    latencies: list[float] = []

    def one(_: int) -> None:
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)

    for _ in range(concurrency):  # warm-up
        call()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {"throughput": requests / wall, "p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p99_ms": 1e3 * float(np.percentile(latencies, 99))}


def run(quick: bool = False) -> dict:
    from tasks.triton_client import connect, infer
    from tasks.triton_publish import publish_version
    from tasks.triton_server import start, stop

    model = default_model()
    length = model.args.signal_length
    signal = np.random.default_rng(0).standard_normal((1, 1, length)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        onnx_path = root / "model.onnx"
        onnx_path.write_bytes(with_metadata(onnx_bytes(model, length, 18, False), {"class_names": '["a","b","c","d","e"]'}).SerializeToString())
        params = load_params()
        ports = {"http_port": _free_port(), "grpc_port": _free_port(), "metrics_port": _free_port()}
        params = params.model_copy(update={"triton": params.triton.model_copy(update={**ports, "model_repository": str(root / "repo")})})
        os.environ["CWTOPS_STATE_DIR"] = str(root / "state")
        start(params)
        try:
            url = f"127.0.0.1:{ports['http_port']}"
            publish_version(onnx_path, 1, params, url=url)
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            for concurrency in (1, 8, 32):
                requests = (60 if quick else 200) * max(1, concurrency // 4)
                clients = {}

                def served() -> None:
                    import threading

                    client = clients.setdefault(threading.get_ident(), connect(url))
                    infer(url, params.base.model_name, signal, client=client)

                local = _load(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: signal}), concurrency, requests)
                remote = _load(served, concurrency, requests)
                rows.append({"concurrency": concurrency, "in_process_rps": local["throughput"], "served_rps": remote["throughput"],
                             "ratio": remote["throughput"] / local["throughput"], "served_p50_ms": remote["p50_ms"], "served_p99_ms": remote["p99_ms"],
                             "in_process_p50_ms": local["p50_ms"], "in_process_p99_ms": local["p99_ms"]})
        finally:
            stop(params)
    holds = all(r["ratio"] >= TARGET for r in rows if r["concurrency"] >= 8)
    print_table(f"serving: Triton vs in-process ONNX Runtime (target: served >= {TARGET:.0%} of in-process at concurrency >= 8: {'holds' if holds else 'MISSED'})",
                rows, list(rows[0]))
    return {"rows": rows, "target": TARGET, "holds": holds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(RESULTS_DIR / "serving.json"))
    args = parser.parse_args()
    write_json(args.json, run(args.quick))


if __name__ == "__main__":
    main()

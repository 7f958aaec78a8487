"""ONNX Runtime against PyTorch eager on CPU: latency at batch 1, throughput at batch 64.

Also the price of the default decimation: the same model exported with `parse.decimate: mean` (the
default: every sample's response, averaged over each hop) and `sample` (every hop-th response),
timed side by side in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from bench.common import cli_main, median_seconds, print_table
from cwtops.core.config import ParseConfig, TrainConfig
from cwtops.core.derived import WIDE_CHANNELS, WIDE_HIDDEN, auto_dilations, auto_hop  # the sample data trains the wide head
from cwtops.data.weights import fitted_filter_bank
from cwtops.model.network import HybridCWTNet, ModelArgs
from cwtops.model.signature import INPUT_NAME, OUTPUT_NAME
from tasks.export import onnx_bytes

TARGET = 2.0  # ONNX Runtime vs PyTorch eager, batch 1 latency


def default_model(signal_length: int = 2048, n_classes: int = 5, decimate: str | None = None) -> HybridCWTNet:
    """What the shipped defaults build for the sample data: the default bank fitted to the length,
    `parse.hop: auto`, the default decimation and head, one member (speed does not depend on the weights)."""
    bank, _ = fitted_filter_bank(signal_length)
    matrix, _ = bank.padded()
    cfg = TrainConfig()
    hop = auto_hop(signal_length)
    args = ModelArgs(n_filters=matrix.shape[0], kernel_size=matrix.shape[1], n_classes=n_classes, signal_length=signal_length,
                     hop=hop, stem=cfg.stem, head=cfg.head, channels=WIDE_CHANNELS, hidden=WIDE_HIDDEN,
                     dropout=cfg.dropout, decimate=decimate or ParseConfig().decimate,
                     dilations=auto_dilations(-(-signal_length // hop)))
    torch.manual_seed(0)
    return HybridCWTNet(args, torch.from_numpy(matrix)).eval()


def run(quick: bool = False) -> dict:
    model = default_model()
    length = model.args.signal_length
    session = ort.InferenceSession(onnx_bytes(model, length, 18, dynamic_length=False), providers=["CPUExecutionProvider"])
    repeats = 20 if quick else 100
    rows = []
    with torch.inference_mode():
        for batch in (1, 64):
            signal = np.random.default_rng(0).standard_normal((batch, 1, length)).astype(np.float32)
            tensor = torch.from_numpy(signal)
            n = repeats if batch == 1 else max(3, repeats // 10)
            torch_s = median_seconds(lambda: model(tensor), repeats=n, warmup=3)
            ort_s = median_seconds(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: signal}), repeats=n, warmup=3)
            rows.append({
                "batch": batch,
                "torch_ms": torch_s * 1e3,
                "onnxruntime_ms": ort_s * 1e3,
                "torch_sig_s": batch / torch_s,
                "onnxruntime_sig_s": batch / ort_s,
                "ratio": torch_s / ort_s,
            })
    holds = rows[0]["ratio"] >= TARGET
    print_table(f"ONNX Runtime vs PyTorch eager, CPU, L {length} (target >= {TARGET}x at batch 1: {'holds' if holds else 'MISSED'})",
                rows, ["batch", "torch_ms", "onnxruntime_ms", "torch_sig_s", "onnxruntime_sig_s", "ratio"])
    decimation = decimation_cost(length, repeats)
    print_table(f"ONNX Runtime, decimate: mean (default) against sample, L {length}, hop {model.args.hop}", decimation,
                ["batch", "sample_ms", "mean_ms", "mean_over_sample"])
    return {"rows": rows, "target": TARGET, "holds": holds, "decimation": decimation}


def decimation_cost(length: int, repeats: int) -> list[dict]:
    """Milliseconds per call of the same model with each decimation, interleaved batch by batch."""
    sessions = {}
    for decimate in ("sample", "mean"):
        model = default_model(length, decimate=decimate)
        sessions[decimate] = ort.InferenceSession(onnx_bytes(model, length, 18, dynamic_length=False),
                                                  providers=["CPUExecutionProvider"])
    rows = []
    for batch in (1, 64):
        signal = np.random.default_rng(1).standard_normal((batch, 1, length)).astype(np.float32)
        n = repeats if batch == 1 else max(3, repeats // 10)
        seconds = {name: median_seconds(lambda s=session: s.run([OUTPUT_NAME], {INPUT_NAME: signal}), repeats=n, warmup=3)
                   for name, session in sessions.items()}
        rows.append({"batch": batch, "sample_ms": seconds["sample"] * 1e3, "mean_ms": seconds["mean"] * 1e3,
                     "mean_over_sample": seconds["mean"] / seconds["sample"]})
    return rows


def main() -> None:
    cli_main(run, "onnx.json", __doc__)


if __name__ == "__main__":
    main()

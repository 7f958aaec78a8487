"""Front-end: the fused filter bank against the per-layer original (one Conv1d per scale).

Both decimate by the same hop, so each computes exactly what the head consumes. Also prints the
floor: FLOPs and bytes of scalogram per signal against this machine's measured rates.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import cli_main, median_seconds, print_table
from cwtops.data.weights import generate_filter_bank
from cwtops.model.network import CWTFrontEnd
from cwtops.model.reference import PerLayerFrontEnd

TARGET = 10.0  # fused vs per-layer at batch 64, L 1024


def _machine_rates() -> dict[str, float]:
    """Measured matmul FLOP/s and memory copy bandwidth (bytes/s) of this CPU."""
    a = torch.randn(1024, 1024)
    flops = 2 * 1024**3 / median_seconds(lambda: a @ a, repeats=5)
    big = torch.empty(64 * 1024 * 1024 // 4)
    bandwidth = 2 * big.numel() * 4 / median_seconds(lambda: big.clone(), repeats=5)
    return {"flops_per_s": flops, "bytes_per_s": bandwidth}


def run(quick: bool = False) -> dict:
    bank, _ = generate_filter_bank(scales=112, wavelet="morlet")
    matrix, _ = bank.padded()
    hop = 8
    rates = _machine_rates()
    rows = []
    with torch.no_grad():
        for length in (1024, 4096):
            for batch in (1, 64):
                signal = torch.randn(batch, 1, length)
                reference = PerLayerFrontEnd(list(bank.filters), hop=hop)
                rows.append(_measure(reference, matrix, signal, hop, rates, repeats=3 if quick else 7))
    holds = next(r for r in rows if r["batch"] == 64 and r["length"] == 1024)["speedup"] >= TARGET
    columns = ["length", "batch", "method", "reference_sig_s", "fused_sig_s", "speedup", "max_rel_error", "floor_ms", "fused_ms", "x_floor"]
    print_table(f"front-end, 112 Morlet filters, hop {hop} (target >= {TARGET}x at batch 64, L 1024: {'holds' if holds else 'MISSED'})", rows, columns)
    return {"rows": rows, "target": TARGET, "holds": holds, "rates": rates, "hop": hop}


def _measure(reference: PerLayerFrontEnd, matrix: np.ndarray, signal: torch.Tensor, hop: int, rates: dict, repeats: int) -> dict:
    batch, _, length = signal.shape
    fused = CWTFrontEnd(torch.from_numpy(matrix), hop=hop)
    expected, actual = reference(signal), fused(signal)
    error = float((actual - expected).abs().max() / expected.abs().max())
    ref_s = median_seconds(lambda: reference(signal), repeats=repeats)
    fused_s = median_seconds(lambda: fused(signal), repeats=repeats)
    steps = -(-length // hop)
    flops = 2 * matrix.shape[0] * matrix.shape[1] * steps * batch
    written = 4 * matrix.shape[0] * steps * batch
    floor = max(flops / rates["flops_per_s"], written / rates["bytes_per_s"])
    return {
        "length": length,
        "batch": batch,
        "method": "fft" if fused._use_fft(length) else "conv",
        "reference_sig_s": batch / ref_s,
        "fused_sig_s": batch / fused_s,
        "speedup": ref_s / fused_s,
        "max_rel_error": error,
        "floor_ms": floor * 1e3,
        "fused_ms": fused_s * 1e3,
        "x_floor": fused_s / floor,
    }


def main() -> None:
    cli_main(run, "frontend.json", __doc__)


if __name__ == "__main__":
    main()

"""The CUDA path, measured where a GPU is present: the default pipeline's train stage with AMP
(bf16 where supported), TF32, channels_last and pinned memory, against the same stage on the CPU
path of that machine; and the front-end (fused vs per-layer) on the GPU."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.common import cli_main, median_seconds, print_table
from cwtops.core.config import params_from_dict
from cwtops.data.weights import generate_filter_bank, write_weight_file
from cwtops.model.network import CWTFrontEnd
from cwtops.model.reference import PerLayerFrontEnd


def _pipeline_params(root: Path, device: str) -> dict:
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    raw["base"].update({"raw_dir": str(root / "raw"), "weights": str(root / "my.txt"), "artifacts_dir": str(root / f"artifacts-{device}"), "results_dir": str(root / "results")})
    raw["train"]["device"] = device
    return raw


def _train(root: Path, device: str) -> dict:
    from tasks import balance, evaluate, parse, train

    params = params_from_dict(_pipeline_params(root, device))
    parse.run(params.parse, params.base)
    balance.run(params.balance, params.base)
    started = time.perf_counter()
    result = train.run(params.train, params.base)
    seconds = time.perf_counter() - started
    metrics = evaluate.run(params.evaluate, params.base)
    return {"device": device, "train_seconds": seconds, "epochs": result.epochs_run, "seconds_per_epoch": seconds / result.epochs_run, "test_macro_f1": metrics.macro_f1}


def _frontend() -> list[dict]:
    bank, _ = generate_filter_bank()
    matrix, _ = bank.padded()
    rows = []
    with torch.no_grad():
        for length in (1024, 4096):
            signal = torch.randn(64, 1, length, device="cuda")
            reference = PerLayerFrontEnd(list(bank.filters), hop=8).cuda()
            fused = CWTFrontEnd(torch.from_numpy(matrix), hop=8).cuda()

            def timed(fn):
                def call():
                    fn(signal)
                    torch.cuda.synchronize()
                return median_seconds(call, repeats=20, warmup=3)

            ref_s, fused_s = timed(reference), timed(fused)
            rows.append({"length": length, "batch": 64, "per_layer_ms": 1e3 * ref_s, "fused_ms": 1e3 * fused_s, "speedup": ref_s / fused_s})
    return rows


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return {"skipped": "no CUDA device", "holds": None}
    from cwtops.data.signals import write_sample_dataset

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_sample_dataset(root / "raw", seed=42)
        bank, header = generate_filter_bank()
        write_weight_file(root / "my.txt", bank, header)
        rows = [_train(root, "cuda"), _train(root, "cpu")]
    print_table(f"train stage on {torch.cuda.get_device_name(0)} vs this machine's CPU path", rows, list(rows[0]))
    frontend = _frontend()
    print_table("front-end on the GPU, hop 8", frontend, list(frontend[0]))
    import onnxruntime as ort

    return {"device": torch.cuda.get_device_name(0), "train": rows, "frontend": frontend, "onnxruntime_providers": ort.get_available_providers(), "holds": True}


def main() -> None:
    cli_main(run, "gpu.json", __doc__)


if __name__ == "__main__":
    main()

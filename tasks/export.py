"""Stage `export`: the best checkpoint as one ONNX file with a dynamic batch axis.

Input `signal` (batch, 1, L) float32, output `logits` (batch, C) float32. The front-end is
exported as a single strided Conv (ONNX Runtime's Conv is much faster than its DFT), and the
graph carries the class names and lineage in `metadata_props`.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from cwtops.core.artifacts import sha256_file, write_bytes
from cwtops.core.config import BaseConfig, ExportConfig
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import artifact_paths
from cwtops.model.network import HybridCWTNet, load_checkpoint
from cwtops.model.signature import INPUT_NAME, OUTPUT_NAME


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    opset: int
    signal_length: int
    n_classes: int


class _ConvFrontEnd(torch.nn.Module):
    """Wraps the model so tracing always takes the convolution path of the front-end."""

    def __init__(self, model: HybridCWTNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        method = self.model.frontend.method
        self.model.frontend.method = "conv"
        try:
            return self.model(signal)
        finally:
            self.model.frontend.method = method


def onnx_bytes(model: HybridCWTNet, signal_length: int, opset: int, dynamic_length: bool) -> bytes:
    """Trace the model to ONNX in memory (TorchScript exporter: deterministic, no extra deps)."""
    model.eval()
    example = torch.zeros(2, 1, signal_length)
    axes = {0: "batch", 2: "length"} if dynamic_length else {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ConvFrontEnd(model).eval(),
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def with_metadata(model_bytes: bytes, metadata: dict[str, str]) -> onnx.ModelProto:
    proto = onnx.load_from_string(model_bytes)
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "cwtops"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run(cfg: ExportConfig, base: BaseConfig) -> ExportResult:
    """Export the best checkpoint; the file appears only after the full checker passed."""
    paths = artifact_paths(base)
    model, checkpoint = load_checkpoint(paths.model)
    args = model.args
    metadata = {
        "class_names": json.dumps(checkpoint["class_names"]),
        "model_name": base.model_name,
        "filter_bank_sha256": checkpoint["filter_bank_sha256"],
        "signal_length": str(args.signal_length),
        "hop": str(args.hop),
        "magnitude": args.magnitude,
        "decimate": args.decimate,
        "best_epoch": str(checkpoint.get("epoch", "")),
    }
    try:
        proto = with_metadata(
            onnx_bytes(model, args.signal_length, cfg.opset, cfg.dynamic_length), metadata
        )
    except onnx.checker.ValidationError as error:
        raise CwtopsError(f"{paths.onnx}: exported graph fails onnx.checker: {error}") from None
    write_bytes(paths.onnx, proto.SerializeToString())
    return ExportResult(paths.onnx, sha256_file(paths.onnx), cfg.opset, args.signal_length, args.n_classes)

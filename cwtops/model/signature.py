"""The served model's contract: tensor names and the metadata the exported ONNX graph carries."""

from __future__ import annotations

from pathlib import Path

import onnx

INPUT_NAME = "signal"  # (batch, 1, L) float32
OUTPUT_NAME = "logits"  # (batch, C) float32


def read_metadata(path: Path | str) -> dict[str, str]:
    """The graph's `metadata_props` (class names, lineage), without loading external weights."""
    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}

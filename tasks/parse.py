"""Stage `parse`: the weight file becomes a filter-bank tensor; the raw folder becomes a manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cwtops.core.artifacts import atomic_path, save_torch, write_json
from cwtops.core.config import BaseConfig, ParseConfig
from cwtops.core.derived import AUTO, auto_hop
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import artifact_paths
from cwtops.data.signals import load_signals, scan_raw
from cwtops.data.weights import default_bank_w0, fit_warnings, fitted_filter_bank, parse_weight_file
from cwtops.model.network import filter_bank_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParseResult:
    n_filters: int
    kernel_size: int
    filter_bank_sha256: str
    n_samples: int
    classes: tuple[str, ...]


def save_filter_bank(path: Path, matrix: np.ndarray, lengths: np.ndarray, names: list[str]) -> None:
    """Tensors and strings only, so it loads with `weights_only=True`."""
    payload = {
        "matrix": torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32)),
        "lengths": torch.from_numpy(np.asarray(lengths, dtype=np.int64)),
        "names": list(names),
    }
    save_torch(path, payload)


def load_filter_bank(path: Path | str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """-> (matrix [S, K] float32, lengths [S] int64, layer names)."""
    path = Path(path)
    if not path.exists():
        raise CwtopsError(f"{path}: filter bank not found; run `cwtops stage parse` (or `dvc repro parse`)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload["matrix"], payload["lengths"], list(payload["names"])


def resolve_hop(cfg: ParseConfig, signal_length: int) -> int:
    """parse.hop, or for `auto` the decimation that leaves the head 256-511 time steps."""
    return auto_hop(signal_length) if cfg.hop == AUTO else int(cfg.hop)


def run(cfg: ParseConfig, base: BaseConfig) -> ParseResult:
    """Parse the weight file and scan the raw signals; write both artifacts atomically."""
    paths = artifact_paths(base)
    bank = parse_weight_file(base.weights)
    manifest = scan_raw(Path(base.raw_dir))
    signal_length = int(load_signals(manifest.head(1), Path(base.raw_dir)).shape[1])
    default_w0 = default_bank_w0(bank) if cfg.bank == "auto" else None
    fitted = default_w0 is not None
    if fitted:  # a generated default, not a user's own bank: its range follows the data, its w0 stays
        bank, _ = fitted_filter_bank(signal_length, len(bank.names), w0=default_w0)
        warnings = []
    else:  # a user's bank is used exactly as written; what does not fit the data is reported
        warnings = fit_warnings(bank, signal_length)
        for warning in warnings:
            log.warning("%s: %s", base.weights, warning)
            print(f"warning: {base.weights}: {warning}", flush=True)
    matrix, lengths = bank.padded()
    sha = filter_bank_sha256(matrix, lengths)

    save_filter_bank(paths.filter_bank, matrix, lengths, list(bank.names))
    write_json(
        paths.filter_bank_summary,
        {
            "sha256": sha,
            "source": str(base.weights),
            "names": list(bank.names),
            "lengths": [int(n) for n in lengths],
            "kernel_size": int(matrix.shape[1]),
            "signal_length": signal_length,
            # true: the file is the generated default bank, refitted to the signal length
            # (parse.bank: auto); false: the file's own filters, as written
            "fitted_to_signals": fitted,
            # the default bank's w0 (each scale's in turn) when it was recognised as one; null otherwise
            "default_w0": list(default_w0) if fitted else None,
            "fit_warnings": warnings,
            # the scalogram the head sees: |conv| (or its square), decimated by hop (`auto`: from the length)
            "magnitude": cfg.magnitude,
            "hop": resolve_hop(cfg, signal_length),
            "hop_derived": cfg.hop == AUTO,
            "decimate": cfg.decimate,  # mean: magnitudes averaged over each hop; sample: every hop-th one
        },
    )
    with atomic_path(paths.manifest) as tmp:
        manifest.to_csv(tmp, index=False)
    classes = tuple(sorted(manifest.loc[manifest.source_split == "train", "label"].unique()))
    return ParseResult(int(matrix.shape[0]), int(matrix.shape[1]), sha, len(manifest), classes)

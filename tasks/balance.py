"""Stage `balance`: capped partial balancing, then a seeded stratified split manifest.

limit = max(min_class_count * cap_factor, min_limit); each class keeps min(count, limit) samples drawn with the
seed; `samples_per_class`, when set, overrides the limit. Balancing applies to the training pool
(source_split == 'train'). A fixed test split in the raw data (data/raw/test/) is kept whole and
never balanced; the balanced pool is then split into train/val only. Without one, the balanced
pool is split into train/val/test.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cwtops.core.artifacts import write_json
from cwtops.core.config import BalanceConfig, BaseConfig
from cwtops.core.derived import AUTO, auto_val_fraction
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import artifact_paths
from cwtops.data.signals import MANIFEST_COLUMNS, read_manifest, save_manifest

SPLIT_COLUMNS = ["sample_id", "file", "row", "label", "split"]
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class BalanceResult:
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    split_manifest: Path


def cap_limit(counts: dict[str, int], cap_factor: float, samples_per_class: int | None = None, min_limit: int = 1) -> int:
    """The most samples any class keeps: `samples_per_class` when set, else min count * cap_factor
    (rounded down), never below `min_limit`."""
    if not counts:
        raise CwtopsError("balance: no training samples to balance; check the raw data folder")
    if cap_factor <= 0 or (samples_per_class is not None and samples_per_class < 1):
        raise CwtopsError(f"balance: cap_factor must be > 0 and samples_per_class >= 1 (got {cap_factor}, {samples_per_class})")
    if samples_per_class is not None:
        return samples_per_class
    return max(1, min_limit, math.floor(min(counts.values()) * cap_factor + 1e-9))  # 20 * 3 is 60, not 59


def capped_counts(
    counts: dict[str, int], cap_factor: float, samples_per_class: int | None = None, min_limit: int = 1
) -> dict[str, int]:
    """How many samples each class keeps: min(count, limit), sorted by class (pure)."""
    limit = cap_limit(counts, cap_factor, samples_per_class, min_limit)
    return {label: min(int(count), limit) for label, count in sorted(counts.items())}


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for one class of n samples; test_fraction 0 means no test part.

    Each part gets at least one sample when the class has enough for all parts, and train
    always keeps at least one.
    """
    parts = 1 + (test_fraction > 0) + (val_fraction > 0)
    minimum = 1 if n >= parts else 0
    val = max(minimum, math.floor(n * val_fraction + 0.5)) if val_fraction > 0 else 0
    test = max(minimum, math.floor(n * test_fraction + 0.5)) if test_fraction > 0 else 0
    while n > 0 and val + test > n - 1:
        if test >= val and test > minimum:
            test -= 1
        else:
            val -= 1
    return n - val - test, val, test


def _class_rng(seed: int, label: str) -> np.random.Generator:
    # Seeded by the seed and the class name, so a class's draw never depends on other classes.
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, zlib.crc32(label.encode("utf-8"))])


def _draw_class(rows: pd.DataFrame, keep: int, rng: np.random.Generator, val_fraction: float, test_fraction: float) -> pd.DataFrame:
    """`keep` rows drawn without replacement, in random order, then cut into train/val/test."""
    picked = rows.iloc[rng.choice(len(rows), size=keep, replace=False)]
    train, val, test = split_sizes(keep, val_fraction, test_fraction)
    return picked.assign(split=["val"] * val + ["test"] * test + ["train"] * train)


def _check_manifest(manifest: pd.DataFrame) -> None:
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise CwtopsError(f"balance: manifest lacks columns {missing}; rebuild it with the parse stage")
    splits = set(manifest.source_split) - {"train", "test"}
    if splits:
        raise CwtopsError(f"balance: unknown source_split values {sorted(splits)}; allowed: train, test")


def resolved_val_fraction(cfg: BalanceConfig, keep: dict[str, int], test_fraction: float) -> float:
    """`val_fraction`, or for `auto` the carve-out that the smallest class can spare (cwtops/core/derived.py)."""
    if cfg.val_fraction != AUTO:
        return float(cfg.val_fraction)
    return auto_val_fraction({label: math.floor(n * (1 - test_fraction)) for label, n in keep.items()})


def balance_manifest(manifest: pd.DataFrame, cfg: BalanceConfig, seed: int) -> pd.DataFrame:
    """The balanced selection of `manifest` with a `split` column (train/val/test).

    Classes are drawn in sorted order, each with its own generator from (seed, class name), from
    rows sorted by file and row, so the result depends only on the data, the config and the seed.
    """
    _check_manifest(manifest)
    pool = manifest[manifest.source_split == "train"].sort_values(["label", "file", "row"], kind="stable")
    fixed_test = manifest[manifest.source_split == "test"]
    keep = capped_counts(pool.label.value_counts().to_dict(), cfg.cap_factor, cfg.samples_per_class, cfg.min_limit)
    test_fraction = 0.0 if len(fixed_test) else cfg.test_fraction
    val_fraction = resolved_val_fraction(cfg, keep, test_fraction)
    parts = [
        _draw_class(rows, keep[label], _class_rng(seed, label), val_fraction, test_fraction)
        for label, rows in pool.groupby("label", sort=True)
    ]
    if len(fixed_test):
        parts.append(fixed_test.assign(split="test"))
    result = pd.concat(parts)[SPLIT_COLUMNS]
    result = result.assign(_order=result.split.map(SPLIT_ORDER)).sort_values(["_order", "label", "file", "row"], kind="stable")
    return result[SPLIT_COLUMNS].reset_index(drop=True)


def split_counts(split_manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {class: count}} in train/val/test order."""
    counts = split_manifest.groupby(["split", "label"]).size()
    return {
        split: {label: int(n) for label, n in counts[split].sort_index().items()}
        for split in sorted(set(split_manifest.split), key=SPLIT_ORDER.__getitem__)
    }


def run(cfg: BalanceConfig, base: BaseConfig) -> BalanceResult:
    """Read the parse stage's manifest; write the split manifest (CSV) and a summary (JSON)."""
    paths = artifact_paths(base)
    if not paths.manifest.is_file():
        raise CwtopsError(f"{paths.manifest}: manifest not found; run the parse stage first (`cwtops stage parse` or `dvc repro parse`)")
    manifest = read_manifest(paths.manifest, MANIFEST_COLUMNS)
    split = balance_manifest(manifest, cfg, base.seed)
    before = {label: int(n) for label, n in manifest[manifest.source_split == "train"].label.value_counts().sort_index().items()}
    after = capped_counts(before, cfg.cap_factor, cfg.samples_per_class, cfg.min_limit)
    test_fraction = 0.0 if (manifest.source_split == "test").any() else cfg.test_fraction
    per_split = split_counts(split)
    save_manifest(split, paths.split_manifest)
    write_json(
        paths.balance_summary,
        {
            "counts_before": before,
            "counts_after": after,
            "split_counts": per_split,
            "limit": cap_limit(before, cfg.cap_factor, cfg.samples_per_class, cfg.min_limit),
            "limit_rule": "max(min_count * cap_factor, min_limit)" if cfg.samples_per_class is None else "samples_per_class",
            "val_fraction": resolved_val_fraction(cfg, after, test_fraction),
            "val_fraction_derived": cfg.val_fraction == AUTO,
            "fixed_test_split": bool((manifest.source_split == "test").any()),
            "seed": base.seed,
        },
    )
    return BalanceResult(before, after, per_split, paths.split_manifest)

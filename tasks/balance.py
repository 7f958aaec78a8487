"""Stage `balance`: capped partial balancing, then a seeded stratified split manifest.

limit = min_class_count * cap_factor; each class keeps min(count, limit) samples drawn with the
seed; `samples_per_class`, when set, overrides the limit. A fixed test split in the raw data
(data/raw/test/) is kept whole and never balanced; the balanced pool is split into train/val.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import BalanceConfig, Params
from tasks.data import save_manifest
from tasks.errors import CwtopsError
from tasks.io import write_json
from tasks.paths import artifact_paths

SPLIT_COLUMNS = ["sample_id", "file", "row", "label", "split"]


@dataclass(frozen=True)
class BalanceResult:
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    split_manifest: Path


def capped_counts(counts: dict[str, int], cap_factor: float, samples_per_class: int | None = None) -> dict[str, int]:
    """How many samples each class keeps (pure)."""
    if not counts:
        raise CwtopsError("no classes to balance")
    limit = samples_per_class if samples_per_class is not None else int(min(counts.values()) * cap_factor)
    return {label: min(count, limit) for label, count in counts.items()}


def _split_sizes(n: int, cfg: BalanceConfig, with_test: bool) -> tuple[int, int]:
    """(val, test) sizes for one class: at least one each when the class has >= 3 samples."""
    minimum = 1 if n >= (3 if with_test else 2) else 0
    val = max(minimum, int(round(n * cfg.val_fraction)))
    test = max(minimum, int(round(n * cfg.test_fraction))) if with_test else 0
    return val, test


def balance_manifest(manifest: pd.DataFrame, cfg: BalanceConfig, seed: int) -> pd.DataFrame:
    """Add a `split` column (train/val/test) to a balanced selection of the manifest's rows."""
    pool = manifest[manifest.source_split == "train"]
    fixed_test = manifest[manifest.source_split == "test"]
    keep = capped_counts(pool.label.value_counts().to_dict(), cfg.cap_factor, cfg.samples_per_class)
    parts = []
    for index, label in enumerate(sorted(keep)):
        rows = pool[pool.label == label]
        rng = np.random.default_rng([seed, index])
        chosen = rows.iloc[np.sort(rng.choice(len(rows), size=keep[label], replace=False))]
        shuffled = chosen.iloc[rng.permutation(len(chosen))]
        val, test = _split_sizes(len(shuffled), cfg, with_test=fixed_test.empty)
        split = ["test"] * test + ["val"] * val + ["train"] * (len(shuffled) - val - test)
        parts.append(shuffled.assign(split=split))
    if not fixed_test.empty:
        parts.append(fixed_test.assign(split="test"))
    result = pd.concat(parts)[SPLIT_COLUMNS]
    order = {"train": 0, "val": 1, "test": 2}
    return result.sort_values(["split", "label", "file", "row"], key=lambda c: c.map(order) if c.name == "split" else c, kind="stable").reset_index(drop=True)


def run(params: Params) -> BalanceResult:
    """Read the parse stage's manifest, write the split manifest and a summary."""
    paths = artifact_paths(params)
    if not paths.manifest.exists():
        raise CwtopsError(f"{paths.manifest}: not found; run the parse stage first")
    manifest = pd.read_csv(paths.manifest)
    split = balance_manifest(manifest, params.balance, params.base.seed)
    before = manifest[manifest.source_split == "train"].label.value_counts().sort_index().to_dict()
    after = split[split.split != "test"].label.value_counts().sort_index().to_dict() if (manifest.source_split == "test").any() else split.label.value_counts().sort_index().to_dict()
    split_counts = {name: group.label.value_counts().sort_index().to_dict() for name, group in split.groupby("split")}
    save_manifest(split, paths.split_manifest)
    write_json(paths.balance_summary, {"counts_before": before, "counts_after": after, "split_counts": split_counts, "limit_rule": "min_count * cap_factor" if params.balance.samples_per_class is None else "samples_per_class"})
    return BalanceResult(before, after, split_counts, paths.split_manifest)

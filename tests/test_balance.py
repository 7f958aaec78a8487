"""Capped partial balancing and the split manifest (pure code)."""

from __future__ import annotations

import pandas as pd

from tasks.balance import balance_manifest, capped_counts
from tasks.config import BalanceConfig

COUNTS = {"a": 1000, "b": 400, "c": 120, "d": 60, "e": 20}


def manifest(counts: dict[str, int], test: dict[str, int] | None = None) -> pd.DataFrame:
    rows = [{"sample_id": f"{k}/x.npy:{i}", "file": f"{k}/x.npy", "row": i, "label": k, "source_split": "train"} for k, n in counts.items() for i in range(n)]
    rows += [{"sample_id": f"test/{k}/x.npy:{i}", "file": f"test/{k}/x.npy", "row": i, "label": k, "source_split": "test"} for k, n in (test or {}).items() for i in range(n)]
    return pd.DataFrame(rows)


def test_cap_factor_three_keeps_sixty_per_class() -> None:
    assert capped_counts(COUNTS, 3) == {"a": 60, "b": 60, "c": 60, "d": 60, "e": 20}


def test_samples_per_class_overrides_the_limit() -> None:
    assert capped_counts(COUNTS, 3, samples_per_class=50) == {"a": 50, "b": 50, "c": 50, "d": 50, "e": 20}


def test_balanced_manifest_counts_and_determinism() -> None:
    cfg = BalanceConfig(cap_factor=3)
    first = balance_manifest(manifest(COUNTS), cfg, seed=7)
    assert first.label.value_counts().to_dict() == {"a": 60, "b": 60, "c": 60, "d": 60, "e": 20}
    assert first.to_csv(index=False) == balance_manifest(manifest(COUNTS), cfg, seed=7).to_csv(index=False)
    assert first.to_csv(index=False) != balance_manifest(manifest(COUNTS), cfg, seed=8).to_csv(index=False)
    for label, group in first.groupby("label"):
        assert set(group.split) == {"train", "val", "test"}, label


def test_fixed_test_split_is_used_as_is() -> None:
    split = balance_manifest(manifest(COUNTS, test={"a": 30, "e": 5}), BalanceConfig(), seed=1)
    test = split[split.split == "test"]
    assert len(test) == 35 and all(test.sample_id.str.startswith("test/"))
    assert set(split[split.split != "test"].sample_id.str.startswith("test/")) == {False}

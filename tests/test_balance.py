"""Capped partial balancing and the split manifest: pure helpers and the stage function."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cwtops.core.config import BalanceConfig, params_from_dict
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import artifact_paths
from cwtops.data.signals import read_manifest, save_manifest
from tasks.balance import balance_manifest, cap_limit, capped_counts, run, split_counts, split_sizes

COUNTS = {"a": 1000, "b": 400, "c": 120, "d": 60, "e": 20}
# The original workflow's capped balancing, without the floor that keeps small datasets whole.
CAPPED = {"min_limit": 1, "val_fraction": 0.15}


def manifest(counts: dict[str, int], test: dict[str, int] | None = None, per_file: int = 100) -> pd.DataFrame:
    """A parse-stage manifest: `per_file` rows per file, train then fixed-test rows."""
    rows = []
    for split, table, prefix in (("train", counts, ""), ("test", test or {}, "test/")):
        for label, n in table.items():
            for i in range(n):
                file = f"{prefix}{label}/part{i // per_file:03d}.npy"
                rows.append({"sample_id": f"{file}:{i % per_file}", "file": file, "row": i % per_file, "label": label, "source_split": split})
    return pd.DataFrame(rows)


def test_cap_factor_three_keeps_min_count_times_three() -> None:
    assert capped_counts(COUNTS, 3) == {"a": 60, "b": 60, "c": 60, "d": 60, "e": 20}
    assert cap_limit(COUNTS, 3) == 60


def test_samples_per_class_overrides_the_limit() -> None:
    assert capped_counts(COUNTS, 3, samples_per_class=50) == {"a": 50, "b": 50, "c": 50, "d": 50, "e": 20}
    assert capped_counts(COUNTS, 3, samples_per_class=5000) == COUNTS


def test_fractional_cap_factor_rounds_down_and_keeps_one() -> None:
    assert cap_limit(COUNTS, 2.5) == 50
    assert cap_limit({"a": 100, "b": 7}, 0.1) == 1
    with pytest.raises(CwtopsError, match="no training samples"):
        capped_counts({}, 3)


@pytest.mark.parametrize("n", range(0, 40))
def test_split_sizes_cover_every_part(n: int) -> None:
    train, val, test = split_sizes(n, 0.15, 0.2)
    assert train + val + test == n and min(train, val, test) >= 0
    if n >= 3:
        assert min(train, val, test) >= 1
    if n >= 1:
        assert train >= 1
    assert split_sizes(n, 0.45, 0.45)[0] >= min(n, 1)
    train, val, test = split_sizes(n, 0.15, 0.0)
    assert test == 0 and train + val == n and (n < 2 or val >= 1)


def test_min_limit_keeps_small_datasets_whole() -> None:
    # UCR's ECG5000: a class of 2 next to one of 292 would cap every class at 6 signals
    counts = {"1": 292, "2": 177, "3": 10, "4": 19, "5": 2}
    assert capped_counts(counts, 3, min_limit=300) == counts
    assert capped_counts({"a": 1000, "b": 20}, 3, min_limit=300) == {"a": 300, "b": 20}
    assert cap_limit({"a": 1000, "b": 200}, 3, min_limit=300) == 600  # the floor never lowers the limit


def test_split_sizes_without_a_validation_part() -> None:
    for n in range(0, 30):
        assert split_sizes(n, 0.0, 0.0) == (n, 0, 0)
        train, val, test = split_sizes(n, 0.0, 0.2)
        assert val == 0 and train + test == n and (n < 2 or (train >= 1 and test >= 1))


def test_auto_validation_carves_out_only_where_every_class_can_spare_signals() -> None:
    small = balance_manifest(manifest({"a": 120, "b": 30}, test={"a": 5, "b": 5}), BalanceConfig(), seed=1)
    assert set(small.split) == {"train", "test"}  # 30 signals in a class: train on all of them
    large = balance_manifest(manifest({"a": 1000, "b": 600}, test={"a": 5, "b": 5}), BalanceConfig(), seed=1)
    assert split_counts(large)["val"] == {"a": 100, "b": 60}
    explicit = balance_manifest(manifest({"a": 120, "b": 30}, test={"a": 5}), BalanceConfig(val_fraction=0.2), seed=1)
    assert split_counts(explicit)["val"] == {"a": 24, "b": 6}


def test_balanced_manifest_counts_and_stratified_splits() -> None:
    source = manifest(COUNTS)
    split = balance_manifest(source, BalanceConfig(cap_factor=3, **CAPPED), seed=7)
    assert list(split.columns) == ["sample_id", "file", "row", "label", "split"]
    assert split.label.value_counts().sort_index().to_dict() == {"a": 60, "b": 60, "c": 60, "d": 60, "e": 20}
    assert split.sample_id.is_unique and set(split.sample_id) <= set(source.sample_id)
    counts = split_counts(split)
    assert list(counts) == ["train", "val", "test"]
    assert counts["val"] == {"a": 9, "b": 9, "c": 9, "d": 9, "e": 3}
    assert counts["test"] == {"a": 12, "b": 12, "c": 12, "d": 12, "e": 4}
    picked_a = split[split.label == "a"]
    assert picked_a.file.nunique() > 3  # drawn across the whole class, not its first rows


def test_samples_per_class_in_the_manifest() -> None:
    split = balance_manifest(manifest(COUNTS), BalanceConfig(samples_per_class=50, **CAPPED), seed=1)
    assert split.label.value_counts().sort_index().to_dict() == {"a": 50, "b": 50, "c": 50, "d": 50, "e": 20}


def test_same_seed_same_manifest_other_seed_other_draw() -> None:
    cfg = BalanceConfig(**CAPPED)
    first = balance_manifest(manifest(COUNTS), cfg, seed=7)
    again = balance_manifest(manifest(COUNTS).sample(frac=1.0, random_state=0), cfg, seed=7)  # input order is irrelevant
    assert first.to_csv(index=False) == again.to_csv(index=False)
    other = balance_manifest(manifest(COUNTS), cfg, seed=8)
    assert set(first.sample_id[first.label == "a"]) != set(other.sample_id[other.label == "a"])
    # the smallest class is kept whole under both seeds, but its split assignment is redrawn
    assert set(first.sample_id[first.label == "e"]) == set(other.sample_id[other.label == "e"])
    assert first.to_csv(index=False) != other.to_csv(index=False)


def test_a_class_draw_does_not_depend_on_other_classes() -> None:
    cfg = BalanceConfig(samples_per_class=40)
    base = balance_manifest(manifest({"a": 300, "b": 200}), cfg, seed=3)
    more = balance_manifest(manifest({"a": 300, "b": 200, "aa": 90}), cfg, seed=3)
    pd.testing.assert_frame_equal(base[base.label == "b"].reset_index(drop=True), more[more.label == "b"].reset_index(drop=True))


def test_fixed_test_split_is_used_as_is() -> None:
    source = manifest(COUNTS, test={"a": 30, "c": 12, "e": 5})
    split = balance_manifest(source, BalanceConfig(**CAPPED), seed=1)
    test = split[split.split == "test"]
    fixed = source[source.source_split == "test"]
    assert sorted(test.sample_id) == sorted(fixed.sample_id)  # all kept, nothing added or capped
    assert not split[split.split != "test"].sample_id.str.startswith("test/").any()
    pool = split[split.split != "test"]
    assert pool.label.value_counts().sort_index().to_dict() == {"a": 60, "b": 60, "c": 60, "d": 60, "e": 20}
    assert set(pool.split) == {"train", "val"}
    assert split_counts(split)["val"] == {"a": 9, "b": 9, "c": 9, "d": 9, "e": 3}


def test_manifest_without_required_columns_is_refused() -> None:
    with pytest.raises(CwtopsError, match="lacks columns \\['source_split'\\]"):
        balance_manifest(manifest(COUNTS).drop(columns="source_split"), BalanceConfig(), seed=1)


def _params(tmp_path: Path, seed: int, **balance: object):  # noqa: ANN202
    return params_from_dict({"base": {"seed": seed, "artifacts_dir": str(tmp_path / "artifacts")}, "balance": dict(balance)})


def test_run_writes_split_manifest_and_summary(tmp_path: Path) -> None:
    params = _params(tmp_path, seed=5, **CAPPED)
    paths = artifact_paths(params.base)
    save_manifest(manifest({"1": 500, "NA": 90, "walk": 40}), paths.manifest)  # labels that look like numbers / NaN
    result = run(params.balance, params.base)
    assert result.split_manifest == paths.split_manifest
    assert result.counts_before == {"1": 500, "NA": 90, "walk": 40}
    assert result.counts_after == {"1": 120, "NA": 90, "walk": 40}
    split = read_manifest(paths.split_manifest)
    assert list(split.columns) == ["sample_id", "file", "row", "label", "split"]
    assert sorted(split.label.unique()) == ["1", "NA", "walk"]
    summary = json.loads(paths.balance_summary.read_text())
    assert summary["limit"] == 120 and summary["fixed_test_split"] is False and summary["seed"] == 5
    assert summary["split_counts"] == result.split_counts
    assert sum(sum(c.values()) for c in result.split_counts.values()) == 250


def test_run_is_byte_identical_for_one_seed(tmp_path: Path) -> None:
    csv_bytes = []
    for seed, folder in ((11, "one"), (11, "two"), (12, "three")):
        params = _params(tmp_path / folder, seed=seed, **CAPPED)
        save_manifest(manifest(COUNTS, test={"a": 10}), artifact_paths(params.base).manifest)
        run(params.balance, params.base)
        csv_bytes.append(artifact_paths(params.base).split_manifest.read_bytes())
    assert csv_bytes[0] == csv_bytes[1]
    assert csv_bytes[0] != csv_bytes[2]


def test_run_without_manifest_says_what_to_do(tmp_path: Path) -> None:
    params = _params(tmp_path, seed=1)
    with pytest.raises(CwtopsError, match="manifest.csv: manifest not found; run the parse stage first"):
        run(params.balance, params.base)

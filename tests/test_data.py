"""Raw data: the sample dataset, UCR import round trips, the scan's refusals, memory-mapped reads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.data import DataError, SignalDataset, import_ucr, load_signals, read_ucr, scan_raw, write_sample_dataset

CWTOPS = str(Path(sys.executable).parent / "cwtops")
SMALL = {"noise": 40, "burst": 20, "chirp": 10, "am": 6, "fm": 4}


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.npy")):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_sample_dataset_is_deterministic_imbalanced_and_realistic(tmp_path: Path) -> None:
    counts = write_sample_dataset(tmp_path / "a", seed=1)
    write_sample_dataset(tmp_path / "b", seed=1)
    write_sample_dataset(tmp_path / "c", seed=2, counts=SMALL)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert len(counts) == 5 and max(counts.values()) >= 10 * min(counts.values())
    manifest = scan_raw(tmp_path / "a")
    assert manifest.label.value_counts().to_dict() == counts
    signal = np.load(next((tmp_path / "a" / "chirp").glob("*.npy")))
    assert 1000 <= signal.shape[1] <= 4096 and signal.dtype == np.float32


def test_power_alone_does_not_separate_the_classes(tmp_path: Path) -> None:
    """Random gains and offsets: a classifier on power and mean stays far from the CNN's score."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import cross_val_predict

    write_sample_dataset(tmp_path, seed=3, counts={k: 60 for k in SMALL})
    manifest = scan_raw(tmp_path)
    signals = load_signals(manifest, tmp_path)
    features = np.stack([np.log(signals.var(axis=1)), signals.mean(axis=1)], axis=1)
    predicted = cross_val_predict(LogisticRegression(max_iter=1000), features, manifest.label, cv=5)
    assert f1_score(manifest.label, predicted, average="macro") < 0.5


@pytest.mark.parametrize("name", ["GunPoint", "ArrowHead", "ItalyPowerDemand"])
def test_import_ucr_round_trips_aeon_datasets(name: str, tmp_path: Path) -> None:
    import aeon
    from aeon.datasets import load_from_ts_file

    folder = Path(aeon.__file__).parent / "datasets" / "data" / name
    counts = import_ucr(folder / f"{name}_TRAIN.ts", folder / f"{name}_TEST.ts", tmp_path / "raw")
    for split, file in (("train", f"{name}_TRAIN.ts"), ("test", f"{name}_TEST.ts")):
        series, labels = load_from_ts_file(str(folder / file))
        series = series[:, 0, :]
        base = tmp_path / "raw" if split == "train" else tmp_path / "raw" / "test"
        assert sum(counts[split].values()) == len(labels)
        for label in set(labels):
            stored = np.load(next((base / _folder(label)).glob("*.npy")))
            assert np.allclose(stored, series[labels == label].astype(np.float32))
    manifest = scan_raw(tmp_path / "raw")
    assert set(manifest.source_split) == {"train", "test"}


def _folder(label: str) -> str:
    return label if label[0].isalnum() else f"class_{label.lstrip('-')}"


def test_import_tsv_and_arff(tmp_path: Path) -> None:
    (tmp_path / "x.tsv").write_text("1\t0.5\t1.5\t2.5\n2\t3.0\t4.0\t5.0\n1\t6\t7\t8\n")
    signals, labels = read_ucr(tmp_path / "x.tsv")
    assert signals.shape == (3, 3) and labels == ["1", "2", "1"]
    (tmp_path / "x.arff").write_text("@relation x\n@attribute a numeric\n@attribute b numeric\n@attribute class {up,down}\n@data\n1,2,up\n3,4,down\n")
    signals, labels = read_ucr(tmp_path / "x.arff")
    assert signals.tolist() == [[1, 2], [3, 4]] and labels == ["up", "down"]
    (tmp_path / "gap.tsv").write_text("1\t0.5\t?\n")
    with pytest.raises(DataError, match="gap.tsv"):
        read_ucr(tmp_path / "gap.tsv")


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    for label in ("a", "b"):
        (raw / label).mkdir(parents=True)
        np.save(raw / label / "s.npy", np.ones((3, 16), np.float32))
    return raw


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: (raw / "c").mkdir(), "empty class folder"),
        (lambda raw: [os.remove(p) for p in (raw / "b").glob("*")] and (raw / "b").rmdir() or None, "at least two class"),
        (lambda raw: np.save(raw / "a" / "long.npy", np.ones((2, 20), np.float32)), "different lengths"),
        (lambda raw: np.save(raw / "a" / "nan.npy", np.full((2, 16), np.nan, np.float32)), "row 0 contains NaN"),
        (lambda raw: np.save(raw / "a" / "int.npy", np.ones((2, 16), np.int64)), "dtype int64"),
        (lambda raw: np.save(raw / "a" / "cplx.npy", np.ones((2, 16), np.complex64)), "dtype complex64"),
        (lambda raw: np.save(raw / "a" / "cube.npy", np.ones((2, 2, 16), np.float32)), "3 dimensions"),
        (lambda raw: (raw / "a" / "broken.npy").write_bytes(b"\x93NUMPY garbage"), "not a readable .npy"),
        (lambda raw: (raw / "a" / "notes.txt").write_text("x"), "not a .npy file"),
        (lambda raw: (raw / "bad name").mkdir() or np.save(raw / "bad name" / "s.npy", np.ones(16, np.float32)), "not a safe identifier"),
    ],
)
def test_scan_refuses_bad_raw_data_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    raw = _raw(tmp_path)
    damage(raw)
    with pytest.raises(DataError, match=message):
        scan_raw(raw)


def test_dataset_reads_through_memory_maps(tmp_path: Path) -> None:
    write_sample_dataset(tmp_path, seed=5, counts=SMALL)
    manifest = scan_raw(tmp_path)
    classes = sorted(SMALL)
    dataset = SignalDataset(manifest, tmp_path, classes)
    signal, label = dataset[7]
    row = manifest.iloc[7]
    assert signal.shape == (1, 2048) and classes[label] == row.label
    assert np.array_equal(signal[0].numpy(), np.load(tmp_path / row.file)[row.row])
    assert isinstance(dataset._cache._arrays[row.file], np.memmap)


def test_cli_sample_writes_class_folders(tmp_path: Path) -> None:
    done = subprocess.run([CWTOPS, "data", "sample", "--out", str(tmp_path / "raw")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["am", "burst", "chirp", "fm", "noise"]

"""Raw signals: the sample dataset, the raw scan and its refusals, the memory-mapped dataset, UCR import."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cwtops.data import signals as data_module
from cwtops.data.signals import (
    SAMPLE_COUNTS,
    DataError,
    SignalDataset,
    class_folder_name,
    classes_from_manifest,
    import_ucr,
    load_signals,
    read_manifest,
    save_manifest,
    scan_raw,
    write_sample_dataset,
)

BIN = Path(sys.executable).parent
AEON_DATA = Path(__import__("aeon").__file__).parent / "datasets" / "data"


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.npy"))}


@pytest.fixture(scope="module")
def sample_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "raw"
    write_sample_dataset(out, seed=42)
    return out


def small_raw(root: Path, length: int = 64) -> Path:
    """Two classes: `a` with a [5, L] file and a 1-D file, `b` with a [4, L] file."""
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    np.save(root / "a" / "many.npy", rng.standard_normal((5, length)).astype(np.float32))
    np.save(root / "a" / "one.npy", rng.standard_normal(length).astype(np.float32))
    np.save(root / "b" / "many.npy", rng.standard_normal((4, length)).astype(np.float64))
    return root


# ---------------------------------------------------------------- sample dataset


def test_sample_dataset_is_deterministic_per_seed(tmp_path: Path) -> None:
    counts = {"noise": 120, "burst": 30, "chirp": 20, "am": 15, "fm": 12}
    write_sample_dataset(tmp_path / "one", seed=7, counts=counts)
    write_sample_dataset(tmp_path / "two", seed=7, counts=counts)
    write_sample_dataset(tmp_path / "other", seed=8, counts=counts)
    first = tree_digest(tmp_path / "one")
    assert first == tree_digest(tmp_path / "two")
    other = tree_digest(tmp_path / "other")
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first)


def test_sample_dataset_shape_classes_and_imbalance(sample_raw: Path) -> None:
    classes = sorted(p.name for p in sample_raw.iterdir() if p.is_dir())
    assert classes == sorted(SAMPLE_COUNTS) and len(classes) == 5
    on_disk = {}
    for name in classes:
        files = sorted((sample_raw / name).glob("*.npy"))
        assert len(files) >= 1 and (len(files) > 1 or SAMPLE_COUNTS[name] <= 100)
        arrays = [np.load(f) for f in files]
        assert all(a.ndim == 2 and a.dtype == np.float32 and 1 <= a.shape[1] <= 4096 for a in arrays)
        assert all(np.isfinite(a).all() for a in arrays)
        on_disk[name] = sum(len(a) for a in arrays)
    assert on_disk == SAMPLE_COUNTS
    assert max(on_disk.values()) >= 10 * min(on_disk.values())
    assert len({np.load(f, mmap_mode="r").shape[1] for f in sample_raw.rglob("*.npy")}) == 1


def test_sample_dataset_is_fast(tmp_path: Path) -> None:
    started = time.perf_counter()
    counts = write_sample_dataset(tmp_path / "raw", seed=1)
    assert counts == dict(sorted(SAMPLE_COUNTS.items()))
    assert time.perf_counter() - started < 5.0


def test_sample_classes_not_separable_by_power_or_mean(sample_raw: Path) -> None:
    """Overall power and mean carry no class information: a linear model on them stays near chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    manifest = scan_raw(sample_raw)
    signals = load_signals(manifest, sample_raw).astype(np.float64)
    features = np.c_[np.log(signals.var(axis=1)), signals.mean(axis=1)]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    predicted = cross_val_predict(model, features, manifest.label, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    assert f1_score(manifest.label, predicted, average="macro") < 0.4


def test_sample_refuses_unknown_class(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown sample class 'wobble'"):
        write_sample_dataset(tmp_path / "raw", counts={"noise": 10, "wobble": 10})
    assert not (tmp_path / "raw").exists()


def test_cli_data_sample_writes_folders(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    done = subprocess.run([str(BIN / "cwtops"), "data", "sample", "--out", str(out), "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(SAMPLE_COUNTS)
    assert len(scan_raw(out)) == sum(SAMPLE_COUNTS.values())


def test_cli_data_sample_writes_a_balanced_set_in_shards(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    command = [str(BIN / "cwtops"), "data", "sample", "--out", str(out), "--signals", "2503", "--shard", "120", "--seed", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = scan_raw(out)
    assert manifest.label.value_counts().to_dict() == {"am": 501, "burst": 501, "chirp": 501, "fm": 500, "noise": 500}
    shards = sorted((out / "am").iterdir())
    assert [p.name for p in shards] == [f"part{i:03d}.npy" for i in range(5)]  # 4 x 120 + 21, in order
    assert [len(np.load(p)) for p in shards] == [120, 120, 120, 120, 21]


# ---------------------------------------------------------------- scan


def test_scan_raw_on_sample_data(sample_raw: Path) -> None:
    manifest = scan_raw(sample_raw)
    assert list(manifest.columns) == ["sample_id", "file", "row", "label", "source_split"]
    assert len(manifest) == sum(SAMPLE_COUNTS.values())
    assert manifest.sample_id.is_unique
    assert (manifest.sample_id == manifest.file + ":" + manifest.row.astype(str)).all()
    assert set(manifest.source_split) == {"train"}
    assert manifest.groupby("label").size().to_dict() == SAMPLE_COUNTS
    assert (manifest.label == manifest.file.str.split("/").str[0]).all()
    assert classes_from_manifest(manifest) == sorted(SAMPLE_COUNTS)
    pd.testing.assert_frame_equal(manifest, scan_raw(sample_raw))


def test_scan_raw_with_fixed_test_split_and_hidden_files(tmp_path: Path) -> None:
    raw = small_raw(tmp_path / "raw")
    (raw / "a" / ".gitkeep").write_text("")
    (raw / ".ucr_labels.json").write_text("{}")
    (raw / "test" / "b").mkdir(parents=True)
    np.save(raw / "test" / "b" / "t.npy", np.zeros((3, 64), dtype=np.float16))
    manifest = scan_raw(raw)
    assert manifest.source_split.tolist() == ["train"] * 10 + ["test"] * 3
    assert manifest.loc[manifest.file == "a/one.npy", "row"].tolist() == [0]
    test_rows = manifest[manifest.source_split == "test"]
    assert test_rows.file.unique().tolist() == ["test/b/t.npy"] and set(test_rows.label) == {"b"}
    assert classes_from_manifest(manifest) == ["a", "b"]


def _break(raw: Path, how: str) -> str:
    """Damage a valid raw folder in one way; returns the text the error must name."""
    rng = np.random.default_rng(1)
    target = raw / "a" / "bad.npy"
    if how == "empty class":
        (raw / "c").mkdir()
        return str(raw / "c")
    if how == "one class":
        for f in (raw / "b").iterdir():
            f.unlink()
        (raw / "b").rmdir()
        return "1 class folder"
    if how == "mixed lengths":
        np.save(raw / "b" / "long.npy", rng.standard_normal((2, 80)).astype(np.float32))
        return "length 80 in " + str(raw / "b" / "long.npy")
    if how in ("nan", "inf"):
        signals = rng.standard_normal((6, 64)).astype(np.float32)
        signals[3, 10] = np.nan if how == "nan" else np.inf
        np.save(target, signals)
        return f"{target}: row 3"
    arrays = {
        "int": np.arange(64, dtype=np.int16),
        "bool": np.ones(64, dtype=bool),
        "complex": np.ones(64, dtype=np.complex64),
        "3-D": np.zeros((2, 2, 64), dtype=np.float32),
        "0-D": np.float32(1.0),
        "empty array": np.zeros((0, 64), dtype=np.float32),
    }
    if how in arrays:
        np.save(target, arrays[how])
        return str(target)
    if how == "object":
        np.save(target, np.array([1, "x"], dtype=object), allow_pickle=True)
        return str(target)
    if how == "corrupt":
        target.write_bytes(b"this is not numpy" * 8)
        return str(target)
    if how == "truncated":
        np.save(target, rng.standard_normal((50, 64)))
        target.write_bytes(target.read_bytes()[:300])
        return str(target)
    if how == "not npy":
        (raw / "a" / "notes.txt").write_text("hello")
        return str(raw / "a" / "notes.txt")
    if how == "unsafe name":
        (raw / "a").rename(raw / "bad name")
        return str(raw / "bad name")
    if how == "stray file":
        np.save(raw / "loose.npy", np.zeros(64, dtype=np.float32))
        return str(raw / "loose.npy")
    if how == "unknown test class":
        (raw / "test" / "zzz").mkdir(parents=True)
        np.save(raw / "test" / "zzz" / "t.npy", np.zeros((1, 64), dtype=np.float32))
        return "['zzz']"
    raise AssertionError(how)


REFUSALS = {
    "empty class": "empty class folder",
    "one class": "at least two",
    "mixed lengths": "length 64 in",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "int": "int16 is not supported; convert to float32",
    "bool": "bool is not supported",
    "complex": "complex64 is not supported",
    "object": "object is not supported",
    "3-D": "3 dimensions",
    "0-D": "0 dimensions",
    "empty array": "empty",
    "corrupt": "not a .npy file",
    "truncated": "truncated",
    "not npy": "not a .npy file",
    "unsafe name": "not a safe identifier",
    "stray file": "must live in a class folder",
    "unknown test class": "have no training folder",
}


@pytest.mark.parametrize("how", sorted(REFUSALS))
def test_scan_raw_refuses(tmp_path: Path, how: str) -> None:
    raw = small_raw(tmp_path / "raw")
    where = _break(raw, how)
    with pytest.raises(DataError) as error:
        scan_raw(raw)
    message = str(error.value)
    assert REFUSALS[how] in message
    assert where in message


def test_scan_raw_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cwtops data sample"):
        scan_raw(tmp_path / "nowhere")


def test_scan_raw_accepts_float16_and_float64(tmp_path: Path) -> None:
    raw = small_raw(tmp_path / "raw")
    np.save(raw / "b" / "half.npy", np.ones((2, 64), dtype=np.float16))
    manifest = scan_raw(raw)
    assert (manifest.file == "b/half.npy").sum() == 2
    assert load_signals(manifest[manifest.file == "b/half.npy"], raw).dtype == np.float32


def test_manifest_csv_keeps_labels_as_text(tmp_path: Path) -> None:
    frame = pd.DataFrame({"sample_id": ["1/x.npy:0", "NA/x.npy:0"], "file": ["1/x.npy", "NA/x.npy"], "row": [0, 0], "label": ["1", "NA"], "source_split": ["train", "train"]})
    save_manifest(frame, tmp_path / "m.csv")
    back = read_manifest(tmp_path / "m.csv", ["label"])
    assert back.label.tolist() == ["1", "NA"] and back.row.dtype == np.int64
    with pytest.raises(DataError, match="columns \\['split'\\] missing"):
        read_manifest(tmp_path / "m.csv", ["label", "split"])


# ---------------------------------------------------------------- reading signals


def test_signal_dataset_memory_maps_and_matches_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = small_raw(tmp_path / "raw")
    manifest = scan_raw(raw)
    real_load, opened = np.load, []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        array = real_load(*args, **kwargs)
        opened.append((kwargs.get("mmap_mode"), type(array)))
        return array

    monkeypatch.setattr(data_module.np, "load", spy)
    dataset = SignalDataset(manifest, raw, ["a", "b"])
    assert len(dataset) == len(manifest) == 10
    for i, record in manifest.iterrows():
        signal, label = dataset[i]
        source = np.load(raw / record.file)
        expected = source if source.ndim == 1 else source[record.row]
        assert signal.shape == (1, 64) and signal.dtype == torch.float32
        np.testing.assert_array_equal(signal[0].numpy(), expected.astype(np.float32))
        assert label == ["a", "b"].index(record.label)
    maps = [kind for mode, kind in opened if mode == "r"]
    assert len(maps) == 3 and all(issubclass(kind, np.memmap) for kind in maps)  # each file mapped once


def test_signal_dataset_pickles_without_data_and_works_in_workers(tmp_path: Path) -> None:
    raw = small_raw(tmp_path / "raw", length=4096)
    manifest = scan_raw(raw)
    dataset = SignalDataset(manifest, raw, ["a", "b"])
    dataset[0]  # opens a map in this process
    assert len(pickle.dumps(dataset)) < 4096  # the mapped data does not travel to spawned workers
    # spawned: the worker gets only the pickle (a fork would copy the data, and whatever else the
    # test process runs by now: servers and threads of earlier tests)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="spawn")
    signals = torch.cat([batch for batch, _ in loader])
    np.testing.assert_array_equal(signals[:, 0].numpy(), load_signals(manifest, raw))


def test_signal_dataset_refuses_unknown_labels(tmp_path: Path) -> None:
    raw = small_raw(tmp_path / "raw")
    with pytest.raises(DataError, match="\\['b'\\] are not among the classes"):
        SignalDataset(scan_raw(raw), raw, ["a"])


def test_reading_a_vanished_file_names_it(tmp_path: Path) -> None:
    raw = small_raw(tmp_path / "raw")
    manifest = scan_raw(raw)
    (raw / "b" / "many.npy").unlink()
    with pytest.raises(DataError, match="b/many.npy: cannot read a file the manifest lists"):
        load_signals(manifest, raw)
    with pytest.raises(DataError, match="rerun the parse stage"):
        SignalDataset(manifest, raw, ["a", "b"])[len(manifest) - 1]


def test_load_signals_keeps_manifest_order(tmp_path: Path) -> None:
    raw = small_raw(tmp_path / "raw")
    manifest = scan_raw(raw)
    shuffled = manifest.sample(frac=1.0, random_state=3).reset_index(drop=True)
    shuffled = pd.concat([shuffled, shuffled.iloc[[2]]], ignore_index=True)  # a repeated row too
    signals = load_signals(shuffled, raw)
    assert signals.shape == (11, 64) and signals.dtype == np.float32
    for i, record in shuffled.iterrows():
        source = np.load(raw / record.file)
        np.testing.assert_array_equal(signals[i], (source if source.ndim == 1 else source[record.row]).astype(np.float32))
    assert load_signals(manifest.iloc[:0], raw).shape == (0, 0)


# ---------------------------------------------------------------- UCR import


def _aeon_classes(path: Path) -> dict[str, np.ndarray]:
    from aeon.datasets import load_from_ts_file

    X, y = load_from_ts_file(str(path))
    X = np.asarray(X)[:, 0, :]
    return {class_folder_name(str(label)): X[y == label] for label in np.unique(y)}


def _imported(root: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p / "signals.npy") for p in sorted(root.iterdir()) if p.is_dir() and p.name != "test"}


@pytest.mark.parametrize("name", ["GunPoint", "ArrowHead", "ItalyPowerDemand"])
def test_import_ucr_round_trips_aeon_datasets(tmp_path: Path, name: str) -> None:
    train, test = AEON_DATA / name / f"{name}_TRAIN.ts", AEON_DATA / name / f"{name}_TEST.ts"
    counts = import_ucr(train, test, tmp_path / "raw")
    for split, source, root in (("train", train, tmp_path / "raw"), ("test", test, tmp_path / "raw" / "test")):
        expected, got = _aeon_classes(source), _imported(root)
        assert got.keys() == expected.keys() and all(k.startswith("class_") for k in got)
        assert counts[split] == {k: len(v) for k, v in expected.items()}
        for label in expected:
            assert got[label].dtype == np.float32
            np.testing.assert_array_equal(got[label], expected[label].astype(np.float32))
    manifest = scan_raw(tmp_path / "raw")
    assert set(manifest.source_split) == {"train", "test"}
    assert (manifest.source_split == "test").sum() == sum(counts["test"].values())


@pytest.mark.parametrize("suffix", ["tsv", "arff"])
def test_import_ucr_tsv_and_arff_match_ts(tmp_path: Path, suffix: str) -> None:
    for name in ("GunPoint", "ArrowHead"):
        import_ucr(AEON_DATA / name / f"{name}_TRAIN.ts", None, tmp_path / name / "ts")
        import_ucr(AEON_DATA / name / f"{name}_TRAIN.{suffix}", None, tmp_path / name / suffix)
        ts, other = _imported(tmp_path / name / "ts"), _imported(tmp_path / name / suffix)
        assert ts.keys() == other.keys()
        for label in ts:
            np.testing.assert_array_equal(ts[label], other[label])


def test_import_ucr_small_handwritten_files(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("Gun Draw\t1.0\t2.0\t3.0\nPoint\t4\t5\t6e-1\n\nPoint\t7\t8\t9\n")
    (tmp_path / "test.arff").write_text(
        "% comment\n@relation toy\n@attribute t0 numeric\n@attribute t1 numeric\n@attribute t2 numeric\n"
        "@attribute class {'Gun Draw',Point}\n@data\n0.5,0.25,0.125,'Gun Draw'\n1,2,3,Point\n"
    )
    counts = import_ucr(tmp_path / "train.tsv", tmp_path / "test.arff", tmp_path / "raw")
    assert counts == {"train": {"Point": 2, "class_Gun_Draw": 1}, "test": {"Point": 1, "class_Gun_Draw": 1}}
    np.testing.assert_array_equal(np.load(tmp_path / "raw" / "Point" / "signals.npy"), np.array([[4, 5, 0.6], [7, 8, 9]], dtype=np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "raw" / "test" / "class_Gun_Draw" / "signals.npy"), [[0.5, 0.25, 0.125]])
    assert '"Gun Draw": "class_Gun_Draw"' in (tmp_path / "raw" / ".ucr_labels.json").read_text()


def test_class_folder_name_mapping() -> None:
    assert [class_folder_name(x) for x in ("1", "-1", "0.5", "walk", "test", "Gun Draw", "'a'")] == [
        "class_1", "class_-1", "class_0.5", "walk", "class_test", "class_Gun_Draw", "a",
    ]


UCR_REFUSALS = {
    "ragged.ts": ("@data\n1,2,3:a\n1,2:b\n", "line 3: series has 2 values"),
    "missing.ts": ("@missing true\n@data\n1,2,3:a\n1,?,3:b\n", "line 4: value '?' is not a number"),
    "nan.tsv": ("a\t1\t2\nb\t1\tNaN\n", "line 2: missing (NaN)"),
    "multi.ts": ("@data\n1,2:3,4:a\n", "line 2: more than one channel"),
    "nolabel.ts": ("@data\n1,2,3\n", "line 2: no ':label'"),
    "stamps.ts": ("@timeStamps true\n@data\n(0,1),(1,2):a\n", "time-stamped series"),
    "clash.tsv": ("a b\t1\t2\na?b\t3\t4\n", "both map to folder 'class_a_b'"),
    "data.csv": ("a,1,2\n", "unknown UCR format '.csv'"),
    "regress.ts": ("@targetlabel true\n@data\n1,2:0.5\n", "regression targets are not supported"),
    "sparse.arff": ("@attribute x numeric\n@attribute c {a}\n@data\n{0 1, 1 a}\n", "line 4: sparse ARFF"),
}


@pytest.mark.parametrize("name", sorted(UCR_REFUSALS))
def test_import_ucr_refusals_name_file_and_line(tmp_path: Path, name: str) -> None:
    text, expected = UCR_REFUSALS[name]
    (tmp_path / name).write_text(text)
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    with pytest.raises(DataError) as error:
        import_ucr(tmp_path / name, None, out)
    assert str(tmp_path / name) in str(error.value) and expected in str(error.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old folder survives a failed import


def test_import_ucr_refuses_test_labels_unseen_in_train(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("a\t1\t2\nb\t3\t4\n")
    (tmp_path / "test.tsv").write_text("c\t1\t2\n")
    with pytest.raises(DataError, match="test labels \\['c'\\] do not occur"):
        import_ucr(tmp_path / "train.tsv", tmp_path / "test.tsv", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_cli_import_ucr_error_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "bad.tsv").write_text("a\t1\t2\nb\t1\n")
    done = subprocess.run(
        [str(BIN / "cwtops"), "data", "import-ucr", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "raw")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
    )
    assert done.returncode == 2
    assert "bad.tsv, line 2" in done.stderr


def test_save_torch_writes_the_same_bytes_for_the_same_contents(tmp_path: Path) -> None:
    from cwtops.core.artifacts import save_torch

    payload = {"matrix": torch.arange(6, dtype=torch.float32).reshape(2, 3), "names": ["conv5", "conv6"]}
    first, second = save_torch(tmp_path / "a.pt", payload), save_torch(tmp_path / "b" / "a.pt", payload)
    assert first.read_bytes() == second.read_bytes()  # torch.save to a path would name the zip's folder after it
    loaded = torch.load(second, weights_only=True)
    assert torch.equal(loaded["matrix"], payload["matrix"]) and loaded["names"] == payload["names"]
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == ["a.pt", "a.pt"]  # no temp files

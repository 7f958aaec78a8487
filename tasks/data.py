"""Signals: the embedded sample dataset, UCR import, the raw-folder scan, a memory-mapped dataset.

Raw layout: `data/raw/<class>/*.npy`, each file one signal `[L]` or many `[N, L]`; a fixed test
split (UCR's TEST files) in `data/raw/test/<class>/*.npy`. The folder name `test` is reserved.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks.errors import CwtopsError
from tasks.io import atomic_dir, atomic_path

TEST_DIR = "test"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MANIFEST_COLUMNS = ["sample_id", "file", "row", "label", "source_split"]
SAMPLE_COUNTS = {"noise": 1200, "burst": 500, "chirp": 260, "am": 160, "fm": 100}
SAMPLE_LENGTH = 2048


class DataError(CwtopsError):
    """Raw data that cannot be used; the message names the file and what to do."""


# ---------------------------------------------------------------- the embedded sample dataset


def _background(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """Coloured noise (random one-pole low-pass) plus white noise, unit variance."""
    white = rng.standard_normal((n, length))
    pole = rng.uniform(0.0, 0.9, (n, 1))
    coloured = np.empty_like(white)
    coloured[:, 0] = white[:, 0]
    for t in range(1, length):  # a first-order recursion; n signals at once
        coloured[:, t] = pole[:, 0] * coloured[:, t - 1] + white[:, t]
    coloured /= coloured.std(axis=1, keepdims=True)
    mix = rng.uniform(0.3, 0.8, (n, 1))
    noise = mix * coloured + (1 - mix) * rng.standard_normal((n, length))
    return noise / noise.std(axis=1, keepdims=True)


def _bursts(rng: np.random.Generator, n: int, t: np.ndarray) -> np.ndarray:
    out = np.zeros((n, t.shape[-1]))
    for _ in range(3):
        centre = rng.uniform(0.05, 0.95, (n, 1)) * t.shape[-1]
        width = rng.uniform(15, 50, (n, 1))
        freq = rng.uniform(0.04, 0.3, (n, 1))
        present = rng.random((n, 1)) < 0.8
        out += present * np.exp(-0.5 * ((t - centre) / width) ** 2) * np.cos(2 * np.pi * freq * t + rng.uniform(0, 6.3, (n, 1)))
    return out * rng.uniform(1.5, 3.0, (n, 1))


def _chirp(rng: np.random.Generator, n: int, t: np.ndarray) -> np.ndarray:
    length = rng.uniform(0.3, 0.6, (n, 1)) * t.shape[-1]
    start = rng.uniform(0, 1, (n, 1)) * (t.shape[-1] - length)
    f0, f1 = rng.uniform(0.02, 0.12, (n, 1)), rng.uniform(0.15, 0.35, (n, 1))
    rising = rng.random((n, 1)) < 0.5
    f0, f1 = np.where(rising, f0, f1), np.where(rising, f1, f0)
    local = np.clip(t - start, 0, length)
    phase = 2 * np.pi * (f0 * local + 0.5 * (f1 - f0) / length * local**2)
    window = ((t >= start) & (t <= start + length)) * np.clip(np.sin(np.pi * local / length), 0, None) ** 0.5
    return window * np.cos(phase) * rng.uniform(0.8, 1.6, (n, 1))


def _am(rng: np.random.Generator, n: int, t: np.ndarray) -> np.ndarray:
    carrier = rng.uniform(0.04, 0.3, (n, 1))
    rate, depth = rng.uniform(0.003, 0.012, (n, 1)), rng.uniform(0.7, 1.0, (n, 1))
    envelope = 1 + depth * np.cos(2 * np.pi * rate * t + rng.uniform(0, 6.3, (n, 1)))
    return envelope * np.cos(2 * np.pi * carrier * t) * rng.uniform(0.5, 1.0, (n, 1))


def _fm(rng: np.random.Generator, n: int, t: np.ndarray) -> np.ndarray:
    carrier, spread = rng.uniform(0.08, 0.25, (n, 1)), rng.uniform(0.03, 0.06, (n, 1))
    rate = rng.uniform(0.002, 0.006, (n, 1))
    phase = 2 * np.pi * carrier * t + spread / rate * np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3, (n, 1)))
    return np.cos(phase) * rng.uniform(0.5, 1.0, (n, 1))


_STRUCTURE = {"noise": None, "burst": _bursts, "chirp": _chirp, "am": _am, "fm": _fm}


def sample_signals(label: str, n: int, rng: np.random.Generator, length: int = SAMPLE_LENGTH) -> np.ndarray:
    """n signals of one class: structure under coloured noise, random gain and DC offset."""
    t = np.arange(length, dtype=np.float64)[None, :]
    signal = _background(rng, n, length)
    make = _STRUCTURE[label]
    if make is not None:
        signal = signal + make(rng, n, t)
    gain = np.exp(rng.uniform(np.log(0.2), np.log(5.0), (n, 1)))  # power says nothing about the class
    offset = rng.normal(0, 1.0, (n, 1))
    return (gain * signal + offset).astype(np.float32)


def write_sample_dataset(out: Path | str, seed: int = 42, counts: dict[str, int] | None = None, chunk: int = 100) -> dict[str, int]:
    """The embedded default dataset: 5 imbalanced classes of length-2048 signals, deterministic."""
    out = Path(out)
    counts = counts or SAMPLE_COUNTS
    with atomic_dir(out) as staging:
        for index, (label, count) in enumerate(sorted(counts.items())):
            rng = np.random.default_rng([seed, index])
            (staging / label).mkdir()
            for part, start in enumerate(range(0, count, chunk)):
                signals = sample_signals(label, min(chunk, count - start), rng)
                np.save(staging / label / f"part{part:03d}.npy", signals)
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------- UCR import


def _ucr_label(raw: str, source: Path, line: int) -> str:
    label = raw.strip().strip("'\"")
    if SAFE_NAME.match(label) and label != TEST_DIR:
        return label
    mapped = re.sub(r"[^A-Za-z0-9_.-]", "_", label).strip("_.-")
    if not mapped:
        raise DataError(f"{source}, line {line}: class label {raw!r} has no usable characters; rename it")
    return f"class_{mapped}" if not mapped[0].isalnum() or mapped == TEST_DIR else mapped


def _read_ts(path: Path) -> tuple[list[list[float]], list[str], list[int]]:
    rows, labels, lines, in_data = [], [], [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not in_data:
            in_data = text.lower() == "@data"
            continue
        values, _, label = text.rpartition(":")
        if ":" in values:
            raise DataError(f"{path}, line {number}: multivariate series are not supported (one channel only)")
        rows.append(values.split(","))
        labels.append(label)
        lines.append(number)
    return rows, labels, lines


def _read_tsv(path: Path) -> tuple[list[list[float]], list[str], list[int]]:
    rows, labels, lines = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            fields = re.split(r"[\t,]", line.strip())
            labels.append(fields[0])
            rows.append(fields[1:])
            lines.append(number)
    return rows, labels, lines


def _read_arff(path: Path) -> tuple[list[list[float]], list[str], list[int]]:
    rows, labels, lines, in_data = [], [], [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("%"):
            continue
        if not in_data:
            in_data = text.lower() == "@data"
            continue
        fields = text.split(",")
        labels.append(fields[-1])
        rows.append(fields[:-1])
        lines.append(number)
    return rows, labels, lines


def read_ucr(path: Path | str) -> tuple[np.ndarray, list[str]]:
    """One UCR file -> (signals [N, L] float32, class labels)."""
    path = Path(path)
    readers = {".ts": _read_ts, ".tsv": _read_tsv, ".txt": _read_tsv, ".arff": _read_arff}
    if path.suffix.lower() not in readers:
        raise DataError(f"{path}: unknown UCR format '{path.suffix}'; use .ts, .tsv or .arff")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows, labels, lines = readers[path.suffix.lower()](path)
    if not rows:
        raise DataError(f"{path}: no series found (is the @data section missing?)")
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        first = next(i for i, row in enumerate(rows) if len(row) != len(rows[0]))
        raise DataError(f"{path}, line {lines[first]}: series lengths differ ({sorted(lengths)}); equal-length series only")
    try:
        signals = np.array(rows, dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: a value is not a number (missing values '?' are not supported)") from None
    if not np.isfinite(signals).all():
        row = int(np.where(~np.isfinite(signals).all(axis=1))[0][0])
        raise DataError(f"{path}, line {lines[row]}: missing or non-finite values; impute or drop that series")
    return signals.astype(np.float32), [_ucr_label(label, path, line) for label, line in zip(labels, lines)]


def import_ucr(train: Path | str, test: Path | str | None, out: Path | str) -> dict[str, dict[str, int]]:
    """UCR TRAIN (and TEST) files -> `out/<class>/signals.npy` and `out/test/<class>/signals.npy`."""
    out = Path(out)
    splits = {"train": read_ucr(train)} | ({"test": read_ucr(test)} if test else {})
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out) as staging:
        for split, (signals, labels) in splits.items():
            base = staging if split == "train" else staging / TEST_DIR
            names = np.array(labels)
            counts[split] = {}
            for label in sorted(set(labels)):
                (base / label).mkdir(parents=True)
                np.save(base / label / "signals.npy", signals[names == label])
                counts[split][label] = int((names == label).sum())
    return counts


# ---------------------------------------------------------------- scan and validation


def _open(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # numpy raises ValueError/OSError/EOFError for corrupt files
        raise DataError(f"{path}: not a readable .npy file ({error}); re-export it with numpy.save") from None
    if array.dtype.kind not in "f":
        raise DataError(
            f"{path}: dtype {array.dtype} is not supported; convert to float32 "
            "(e.g. np.save(path, array.astype(np.float32)))"
        )
    if array.ndim not in (1, 2):
        raise DataError(f"{path}: array has {array.ndim} dimensions; expected one signal [L] or many [N, L]")
    if array.shape[-1] == 0 or (array.ndim == 2 and array.shape[0] == 0):
        raise DataError(f"{path}: the array is empty")
    return array


def _check_finite(path: Path, array: np.ndarray, chunk: int = 4096) -> None:
    rows = array.reshape(-1, array.shape[-1])
    for start in range(0, len(rows), chunk):
        finite = np.isfinite(rows[start : start + chunk]).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise DataError(f"{path}: row {row} contains NaN or Inf; clean or drop that signal")


def _class_files(class_dir: Path) -> list[Path]:
    if not SAFE_NAME.match(class_dir.name):
        raise DataError(f"{class_dir}: class folder name is not a safe identifier; use letters, digits, '_', '.', '-'")
    files = []
    for entry in sorted(class_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.suffix != ".npy" or not entry.is_file():
            raise DataError(f"{entry}: not a .npy file; class folders may only hold .npy signals")
        files.append(entry)
    if not files:
        raise DataError(f"{class_dir}: empty class folder; add .npy signals or remove the folder")
    return files


def _scan_split(root: Path, raw_dir: Path, split: str) -> list[dict]:
    records = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not (split == "train" and p.name == TEST_DIR))
    for stray in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        raise DataError(f"{stray}: files must live in a class folder ({root}/<class>/*.npy)")
    for class_dir in class_dirs:
        for path in _class_files(class_dir):
            array = _open(path)
            _check_finite(path, array)
            relative = path.relative_to(raw_dir).as_posix()
            n = 1 if array.ndim == 1 else array.shape[0]
            for row in range(n):
                records.append({"sample_id": f"{relative}:{row}", "file": relative, "row": row, "label": class_dir.name, "source_split": split, "length": array.shape[-1]})
    return records


def scan_raw(raw_dir: Path | str) -> pd.DataFrame:
    """Manifest of every sample (sample_id, file, row, label, source_split), validated."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: raw data folder not found; run `cwtops data sample` or `cwtops data import-ucr`")
    records = _scan_split(raw_dir, raw_dir, "train")
    if (raw_dir / TEST_DIR).is_dir():
        records += _scan_split(raw_dir / TEST_DIR, raw_dir, "test")
    frame = pd.DataFrame(records, columns=MANIFEST_COLUMNS + ["length"])
    train_classes = set(frame.loc[frame.source_split == "train", "label"])
    if len(train_classes) < 2:
        raise DataError(f"{raw_dir}: found {len(train_classes)} class(es); a classifier needs at least two class folders")
    lengths = frame.groupby("length").file.first()
    if len(lengths) > 1:
        described = ", ".join(f"{length} samples in {file}" for length, file in lengths.items())
        raise DataError(f"{raw_dir}: signals have different lengths ({described}); resample or crop them to one length")
    unknown = set(frame.loc[frame.source_split == "test", "label"]) - train_classes
    if unknown:
        raise DataError(f"{raw_dir / TEST_DIR}: test classes {sorted(unknown)} have no training folder")
    return frame.drop(columns="length").sort_values(["source_split", "label", "file", "row"], kind="stable").reset_index(drop=True)


def classes_from_manifest(manifest: pd.DataFrame) -> list[str]:
    return sorted(manifest.loc[manifest.source_split == "train", "label"].unique())


# ---------------------------------------------------------------- reading signals


class _FileCache:
    """Memory-mapped arrays opened lazily, once per file (and per worker process)."""

    def __init__(self, raw_dir: Path) -> None:
        self.raw_dir = raw_dir
        self._arrays: dict[str, np.ndarray] = {}

    def row(self, file: str, row: int) -> np.ndarray:
        array = self._arrays.get(file)
        if array is None:
            array = self._arrays[file] = np.load(self.raw_dir / file, mmap_mode="r", allow_pickle=False)
        return array if array.ndim == 1 else array[row]


class SignalDataset(torch.utils.data.Dataset):
    """(signal [1, L] float32, class index) for each manifest row, read through memory maps."""

    def __init__(self, manifest: pd.DataFrame, raw_dir: Path | str, classes: list[str]) -> None:
        self.files = manifest.file.to_numpy()
        self.rows = manifest.row.to_numpy()
        index = {name: i for i, name in enumerate(classes)}
        self.labels = manifest.label.map(index).to_numpy()
        self._cache = _FileCache(Path(raw_dir))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        signal = np.asarray(self._cache.row(self.files[i], int(self.rows[i])), dtype=np.float32)
        return torch.from_numpy(signal.copy()).unsqueeze(0), int(self.labels[i])


def load_signals(manifest: pd.DataFrame, raw_dir: Path | str) -> np.ndarray:
    """All signals of `manifest` rows, in order, as one [N, L] float32 array."""
    cache = _FileCache(Path(raw_dir))
    rows = [np.asarray(cache.row(f, int(r)), dtype=np.float32) for f, r in zip(manifest.file, manifest.row)]
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(rows)


def save_manifest(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)

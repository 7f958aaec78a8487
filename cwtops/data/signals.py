"""Signals: the embedded sample dataset, UCR import, the raw-folder scan, a memory-mapped dataset.

Raw layout: `data/raw/<class>/*.npy`, each file one signal `[L]` or many `[N, L]`; a fixed test
split (UCR's TEST files) in `data/raw/test/<class>/*.npy`. The folder name `test` directly under
the raw folder is reserved for that split and is never a class.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cwtops.core.artifacts import atomic_dir, atomic_path
from cwtops.core.errors import CwtopsError

TEST_DIR = "test"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MANIFEST_COLUMNS = ["sample_id", "file", "row", "label", "source_split"]
SAMPLE_COUNTS = {"noise": 1200, "burst": 500, "chirp": 260, "am": 160, "fm": 100}
SAMPLE_LENGTH = 2048
SAMPLE_SNR_DB = (-3.0, 6.0)  # structure power over its own support vs the background, per signal
SAMPLE_HUM = (0.4, -9.0, -3.0)  # chance of a steady interfering tone in any signal, its power range (dB)
GENERATE_ROWS = 1000  # rows generated at once: bounds the generator's memory for any shard size
UCR_LABELS_FILE = ".ucr_labels.json"  # hidden, so the raw scan ignores it
NPY_MAGIC = b"\x93NUMPY"
_CONVERT = "convert to float32 (or float64) explicitly: np.save(path, array.astype(np.float32))"


class DataError(CwtopsError):
    """Raw data that cannot be used; the message names the file and what to do."""


# ---------------------------------------------------------------- the embedded sample dataset
# Every class shares the same coloured background; the classes differ only in what lies on top
# of it in the time-frequency plane. Each signal is rescaled to unit variance before a random
# gain and DC offset, so neither power nor mean says anything about the class.


def _background(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """Coloured noise with a random 1/f^slope spectrum (slope 0: white, 1: pink), unit variance."""
    half = length // 2 + 1
    spectrum = rng.standard_normal((n, half)) + 1j * rng.standard_normal((n, half))
    freqs = np.fft.rfftfreq(length)
    freqs[0] = freqs[1]  # keeps the DC bin finite; the mean is set separately
    slope = rng.uniform(0.0, 1.2, (n, 1))
    noise = np.fft.irfft(spectrum * freqs ** (-slope / 2), n=length, axis=1)
    return noise / noise.std(axis=1, keepdims=True)


def _phase(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0, 2 * np.pi, (n, 1))


def _bursts(rng: np.random.Generator, n: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One to three gaussian-windowed tone bursts at random times and frequencies."""
    count = rng.integers(1, 4, (n, 1))
    wave, envelope = np.zeros((n, t.shape[-1])), np.zeros((n, t.shape[-1]))
    for k in range(3):
        centre = rng.uniform(0.05, 0.95, (n, 1)) * t.shape[-1]
        width, freq = rng.uniform(12, 40, (n, 1)), rng.uniform(0.04, 0.3, (n, 1))
        window = (k < count) * np.exp(-0.5 * ((t - centre) / width) ** 2)
        wave += window * np.cos(2 * np.pi * freq * t + _phase(rng, n))
        envelope = np.maximum(envelope, window)
    return wave, envelope


def _chirp(rng: np.random.Generator, n: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A linear chirp segment (30-60 % of the signal), rising or falling."""
    span = rng.uniform(0.3, 0.6, (n, 1)) * t.shape[-1]
    start = rng.uniform(0, 1, (n, 1)) * (t.shape[-1] - span)
    low, high = rng.uniform(0.03, 0.1, (n, 1)), rng.uniform(0.15, 0.35, (n, 1))
    rising = rng.random((n, 1)) < 0.5
    f0, f1 = np.where(rising, low, high), np.where(rising, high, low)
    local = np.clip(t - start, 0, span)
    phase = 2 * np.pi * (f0 * local + 0.5 * (f1 - f0) / span * local**2) + _phase(rng, n)
    envelope = np.sqrt(np.clip(np.sin(np.pi * local / span), 0, None))
    return envelope * np.cos(phase), envelope


def _am(rng: np.random.Generator, n: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A tone whose amplitude is modulated slowly and deeply."""
    carrier = rng.uniform(0.04, 0.3, (n, 1))
    rate, depth = rng.uniform(0.003, 0.012, (n, 1)), rng.uniform(0.6, 1.0, (n, 1))
    modulation = 1 + depth * np.cos(2 * np.pi * rate * t + _phase(rng, n))
    return modulation * np.cos(2 * np.pi * carrier * t + _phase(rng, n)), np.ones_like(modulation)


def _fm(rng: np.random.Generator, n: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A constant-amplitude tone whose frequency wanders sinusoidally around its carrier."""
    carrier, spread = rng.uniform(0.08, 0.25, (n, 1)), rng.uniform(0.02, 0.06, (n, 1))
    rate = rng.uniform(0.002, 0.006, (n, 1))
    phase = 2 * np.pi * carrier * t + spread / rate * np.sin(2 * np.pi * rate * t + _phase(rng, n))
    return np.cos(phase + _phase(rng, n)), np.ones((n, t.shape[-1]))


_STRUCTURE = {"noise": None, "burst": _bursts, "chirp": _chirp, "am": _am, "fm": _fm}


def sample_signals(label: str, n: int, rng: np.random.Generator, length: int = SAMPLE_LENGTH) -> np.ndarray:
    """n signals of one sample class: structure at a random SNR, then random gain and DC offset."""
    if label not in _STRUCTURE:
        raise DataError(f"unknown sample class '{label}'; sample classes are: {', '.join(_STRUCTURE)}")
    t = np.arange(length, dtype=np.float64)[None, :]
    signal = _background(rng, n, length)  # (n, L), unit variance
    # A steady interfering tone in any class, so "a tone is present" alone does not mean am or fm.
    chance, low_db, high_db = SAMPLE_HUM
    hum = (rng.random((n, 1)) < chance) * np.sqrt(2 * 10 ** (rng.uniform(low_db, high_db, (n, 1)) / 10))
    signal = signal + hum * np.cos(2 * np.pi * rng.uniform(0.04, 0.3, (n, 1)) * t + _phase(rng, n))
    make = _STRUCTURE[label]
    if make is not None:
        wave, envelope = make(rng, n, t)
        support = envelope > 0.1 * envelope.max(axis=1, keepdims=True)
        power = (wave**2 * support).sum(axis=1, keepdims=True) / support.sum(axis=1, keepdims=True)
        snr = 10 ** (rng.uniform(*SAMPLE_SNR_DB, (n, 1)) / 10)
        signal = signal + wave * np.sqrt(snr / power)
    signal /= signal.std(axis=1, keepdims=True)  # every class has the same power before the gain
    gain = np.exp(rng.uniform(np.log(0.2), np.log(5.0), (n, 1)))
    offset = rng.normal(0.0, 1.0, (n, 1))
    return (gain * signal + offset).astype(np.float32)


def equal_counts(signals: int) -> dict[str, int]:
    """`signals` split as evenly as possible between the sample classes (a scale test set)."""
    if signals < len(SAMPLE_COUNTS):
        raise DataError(f"sample dataset: --signals must be at least {len(SAMPLE_COUNTS)} (one per class), got {signals}")
    share, rest = divmod(signals, len(SAMPLE_COUNTS))
    return {label: share + (i < rest) for i, label in enumerate(sorted(SAMPLE_COUNTS))}


def write_sample_dataset(
    out: Path | str,
    seed: int = 42,
    counts: dict[str, int] | None = None,
    chunk: int = 100,
    length: int = SAMPLE_LENGTH,
) -> dict[str, int]:
    """Write the embedded default dataset to `out/<class>/partNNNNN.npy` ([chunk, L] float32 shards).

    Deterministic: the same seed writes the same bytes. Each class draws from its own generator
    (seeded with the seed and the class's position in sorted order). `out` is replaced as a whole,
    only once every file is written. Returns the per-class counts.
    """
    out, counts = Path(out), dict(sorted((counts or SAMPLE_COUNTS).items()))
    if any(count < 1 for count in counts.values()) or chunk < 1 or length < 16:
        raise DataError(f"sample dataset: counts and chunk must be >= 1 and length >= 16 (got {counts}, {chunk}, {length})")
    with atomic_dir(out) as staging:
        for index, (label, count) in enumerate(counts.items()):
            rng = np.random.default_rng([seed, index])
            (staging / label).mkdir()
            width = max(3, len(str(-(-count // chunk) - 1)))  # names sort in shard order
            for part, start in enumerate(range(0, count, chunk)):
                # generated in slices: a shard of 10,000 signals needs ~20 float64 temporaries of its size
                end = min(start + chunk, count)
                shard = np.concatenate([sample_signals(label, min(GENERATE_ROWS, end - at), rng, length)
                                        for at in range(start, end, GENERATE_ROWS)])
                np.save(staging / label / f"part{part:0{width}d}.npy", shard)
    return counts


# ---------------------------------------------------------------- UCR import

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class _Table:
    """Rows of one UCR file as text fields, with the 1-based line each came from."""

    path: Path
    rows: list[list[str]]
    labels: list[str]
    lines: list[int]


def class_folder_name(label: str) -> str:
    """The folder name for a UCR class label; deterministic, documented mapping.

    Numeric labels get a prefix so folders and class names are never bare numbers:
    `1` -> `class_1`, `-1` -> `class_-1`, `0.5` -> `class_0.5`. A label that already is a safe
    name (`^[A-Za-z0-9][A-Za-z0-9_.-]*$`) and is not the reserved `test` is kept as it is.
    Anything else becomes `class_` + the label with every other character replaced by `_`
    (`Gun Draw` -> `class_Gun_Draw`, `test` -> `class_test`).
    """
    label = label.strip().strip("'\"").strip()
    if not label:
        raise DataError("empty class label")
    if _NUMBER.match(label):
        return f"class_{label}"
    if SAFE_NAME.match(label) and label != TEST_DIR:
        return label
    return "class_" + re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def _label_map(labels_by_file: dict[Path, list[str]]) -> dict[str, str]:
    """label -> folder for every label in the files; refuses two labels that share a folder."""
    mapping = {label: class_folder_name(label) for labels in labels_by_file.values() for label in labels}
    folders: dict[str, str] = {}
    for label, folder in sorted(mapping.items()):
        if folder in folders:
            files = ", ".join(str(path) for path in labels_by_file)
            raise DataError(f"{files}: class labels {folders[folder]!r} and {label!r} both map to folder '{folder}'; rename one of them")
        folders[folder] = label
    return mapping


def _data_lines(path: Path, comment: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(header lines, data lines) of a file with an `@data` marker, as (line number, text)."""
    header: list[tuple[int, str]] = []
    data: list[tuple[int, str]] = []
    target = header
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith(comment):
            continue
        if target is header and text.lower() == "@data":
            target = data
            continue
        target.append((number, text))
    return header, data


def _read_ts(path: Path) -> _Table:
    """sktime/aeon `.ts`: `@` headers, then `v1,v2,...:label` per line."""
    header, data = _data_lines(path, "#")
    keys = {text.split()[0].lower(): text.split()[1:] for _, text in header}
    refused = (
        ("@timestamps", "true", "time-stamped series"),
        ("@univariate", "false", "multivariate series"),
        ("@classlabel", "false", "series without class labels"),
        ("@targetlabel", "true", "regression targets"),
    )
    for key, bad, why in refused:
        if [v.lower() for v in keys.get(key, [])][:1] == [bad]:
            raise DataError(f"{path}: {why} are not supported ({key} {bad}); convert to one equal-length channel with labels")
    if not data:
        raise DataError(f"{path}: no series after '@data'; is this a .ts file?")
    table = _Table(path, [], [], [])
    for number, text in data:
        values, colon, label = text.rpartition(":")
        if not colon or ":" in values:
            problem = "no ':label' at the end" if not colon else "more than one channel"
            raise DataError(f"{path}, line {number}: {problem}; expected 'v1,v2,...,vL:label'")
        table.rows.append(values.split(","))
        table.labels.append(label)
        table.lines.append(number)
    return table


def _read_delimited(path: Path, separator: str) -> _Table:
    """Label first, then the values, one series per line."""
    table = _Table(path, [], [], [])
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        fields = re.split(separator, line.strip())
        if len(fields) < 2:
            raise DataError(f"{path}, line {number}: expected a label followed by values")
        table.labels.append(fields[0])
        table.rows.append(fields[1:])
        table.lines.append(number)
    return table


def _read_tsv(path: Path) -> _Table:
    """UCR 2018 `.tsv`: tab separated, so labels may hold spaces."""
    return _read_delimited(path, r"\t")


def _read_txt(path: Path) -> _Table:
    """Older UCR `.txt`: separated by whitespace or commas."""
    return _read_delimited(path, r"[,\s]+")


def _read_arff(path: Path) -> _Table:
    """Weka `.arff`: @relation/@attribute/@data; the class is the last attribute."""
    header, data = _data_lines(path, "%")
    attributes = [text for _, text in header if text.lower().startswith("@attribute")]
    if any(re.search(r"\srelational\b", text, re.IGNORECASE) for text in attributes):
        raise DataError(f"{path}: relational (multivariate) ARFF is not supported; one channel only")
    if not data:
        raise DataError(f"{path}: no rows after '@data'; is this an .arff file?")
    table = _Table(path, [], [], [])
    for number, text in data:
        if text.startswith("{"):
            raise DataError(f"{path}, line {number}: sparse ARFF rows are not supported; write the dense form")
        fields = [field.strip() for field in text.split(",")]
        if attributes and len(fields) != len(attributes):
            raise DataError(f"{path}, line {number}: {len(fields)} values but {len(attributes)} attributes")
        table.labels.append(fields[-1])
        table.rows.append(fields[:-1])
        table.lines.append(number)
    return table


_UCR_READERS = {".ts": _read_ts, ".tsv": _read_tsv, ".txt": _read_txt, ".arff": _read_arff}


def _to_matrix(table: _Table) -> np.ndarray:
    """Text fields -> [N, L] float64; refuses ragged rows, non-numbers and missing values."""
    length = len(table.rows[0])
    signals = np.empty((len(table.rows), length), dtype=np.float64)
    for index, (row, line) in enumerate(zip(table.rows, table.lines)):
        if len(row) != length:
            raise DataError(
                f"{table.path}, line {line}: series has {len(row)} values, the first has {length}; "
                "variable-length series are not supported (resample or pad them to one length)"
            )
        try:
            signals[index] = np.array(row, dtype=np.float64)
        except ValueError:
            bad = next((value for value in row if not _NUMBER.match(value.strip()) and value.strip().lower() not in ("nan", "inf", "-inf")), "?")
            raise DataError(f"{table.path}, line {line}: value {bad!r} is not a number; impute missing values ('?') or drop the series") from None
        if not np.isfinite(signals[index]).all():
            raise DataError(f"{table.path}, line {line}: missing (NaN) or infinite values; impute them or drop the series")
    return signals


def _clean_labels(table: _Table) -> list[str]:
    labels = [label.strip().strip("'\"").strip() for label in table.labels]
    for label, line in zip(labels, table.lines):
        if not label:
            raise DataError(f"{table.path}, line {line}: empty class label; give every series a label")
    return labels


def read_ucr(path: Path | str) -> tuple[np.ndarray, list[str]]:
    """One UCR file (.ts, .tsv, .txt or .arff) -> (signals [N, L] float32, class labels as written)."""
    path = Path(path)
    reader = _UCR_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown UCR format '{path.suffix}'; use one of {', '.join(_UCR_READERS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    table = reader(path)
    if not table.rows:
        raise DataError(f"{path}: no series found")
    return _to_matrix(table).astype(np.float32), _clean_labels(table)


def _write_split(base: Path, signals: np.ndarray, folders: list[str]) -> dict[str, int]:
    names = np.array(folders)
    counts = {}
    for folder in sorted(set(folders)):
        (base / folder).mkdir(parents=True)
        np.save(base / folder / "signals.npy", np.ascontiguousarray(signals[names == folder]))
        counts[folder] = int((names == folder).sum())
    return counts


def import_ucr(train: Path | str, test: Path | str | None, out: Path | str) -> dict[str, dict[str, int]]:
    """UCR TRAIN (and TEST) files -> `out/<class>/signals.npy` and `out/test/<class>/signals.npy`.

    Class folders follow `class_folder_name`; the label -> folder mapping is also written to
    `out/.ucr_labels.json`. `out` is replaced as a whole, only when both files were read.
    Returns {"train": {folder: count}, "test": {...}}.
    """
    out = Path(out)
    splits = {"train": read_ucr(train)} | ({"test": read_ucr(test)} if test is not None else {})
    mapping = _label_map({Path(path): labels for path, (_, labels) in zip([train, test], splits.values())})
    lengths = {split: signals.shape[1] for split, (signals, _) in splits.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{test}: series length {lengths['test']} differs from {train} ({lengths['train']}); both files must hold one length")
    unknown = sorted(set(splits.get("test", (None, []))[1]) - set(splits["train"][1]))
    if unknown:
        raise DataError(f"{test}: test labels {unknown} do not occur in {train}; every test class needs training series")
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out) as staging:
        for split, (signals, labels) in splits.items():
            counts[split] = _write_split(staging if split == "train" else staging / TEST_DIR, signals, [mapping[label] for label in labels])
        sources = {"labels": mapping, "train": Path(train).name, "test": None if test is None else Path(test).name}
        (staging / UCR_LABELS_FILE).write_text(json.dumps(sources, indent=2, sort_keys=True) + "\n")
    return counts


# ---------------------------------------------------------------- scan and validation


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map one raw file and check it: float dtype, 1-D or 2-D, not empty."""
    with open(path, "rb") as handle:
        if handle.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise DataError(f"{path}: not a .npy file (no NumPy header); write signals with numpy.save")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        if "Python objects" in str(error):  # object arrays cannot be memory-mapped
            raise DataError(f"{path}: dtype object is not supported; {_CONVERT}") from None
        raise DataError(f"{path}: damaged or truncated .npy file ({error}); write it again with numpy.save") from None
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: unreadable .npy file ({error}); it may be truncated, write it again") from None
    if array.dtype.kind != "f":
        raise DataError(f"{path}: dtype {array.dtype} is not supported; {_CONVERT}")
    if array.ndim not in (1, 2):
        raise DataError(f"{path}: array has {array.ndim} dimensions {array.shape}; expected one signal [L] or many [N, L]")
    if array.size == 0:
        raise DataError(f"{path}: the array is empty {array.shape}; remove the file or write signals into it")
    return array


def _check_finite(path: Path, array: np.ndarray, chunk_values: int = 1 << 24) -> None:
    """Refuse NaN/Inf, naming the first bad row; reads the memory map in bounded chunks."""
    rows = array.reshape(-1, array.shape[-1])
    step = max(1, chunk_values // rows.shape[1])
    for start in range(0, len(rows), step):
        finite = np.isfinite(rows[start : start + step]).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise DataError(f"{path}: row {row} contains NaN or Inf; clean or drop that signal")


def _class_dirs(root: Path, skip_test: bool) -> list[Path]:
    """Class folders under `root`; refuses stray files and unsafe folder names."""
    class_dirs = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or (skip_test and entry.name == TEST_DIR):
            continue
        if not entry.is_dir():
            raise DataError(f"{entry}: files must live in a class folder ({root}/<class>/*.npy); move or remove it")
        if not SAFE_NAME.match(entry.name):
            raise DataError(f"{entry}: class folder name is not a safe identifier; rename it to letters, digits, '_', '.', '-' (starting with a letter or digit)")
        class_dirs.append(entry)
    return class_dirs


def _class_files(class_dir: Path) -> list[Path]:
    """The .npy files of one class folder (hidden files ignored); refuses anything else."""
    files = []
    for entry in sorted(class_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or entry.suffix != ".npy":
            kind = "a folder" if entry.is_dir() else "not a .npy file"
            raise DataError(f"{entry}: {kind}; class folders may only hold .npy signals (move or remove it)")
        files.append(entry)
    if not files:
        raise DataError(f"{class_dir}: empty class folder; add .npy signals or remove the folder")
    return files


def _scan_file(path: Path, raw_dir: Path, label: str, split: str) -> pd.DataFrame:
    array = _open_npy(path)
    _check_finite(path, array)
    relative = path.relative_to(raw_dir).as_posix()
    rows = np.arange(1 if array.ndim == 1 else array.shape[0])
    return pd.DataFrame(
        {
            "sample_id": [f"{relative}:{row}" for row in rows],
            "file": relative,
            "row": rows,
            "label": label,
            "source_split": split,
            "length": array.shape[-1],
        }
    )


def _scan_split(root: Path, raw_dir: Path, split: str) -> list[pd.DataFrame]:
    class_dirs = _class_dirs(root, skip_test=split == "train")
    if split == "test" and not class_dirs:
        raise DataError(f"{root}: the fixed test folder has no class folders; add {root}/<class>/*.npy or remove it")
    return [_scan_file(path, raw_dir, class_dir.name, split) for class_dir in class_dirs for path in _class_files(class_dir)]


def _check_lengths(raw_dir: Path, frame: pd.DataFrame) -> None:
    lengths = frame.groupby("length", sort=True).file.first()
    if len(lengths) > 1:
        described = "; ".join(f"length {length} in {raw_dir / file}" for length, file in lengths.items())
        raise DataError(f"{raw_dir}: signals have different lengths ({described}); resample or crop them to one length")


def scan_raw(raw_dir: Path | str) -> pd.DataFrame:
    """Validated manifest of every raw sample: sample_id, file, row, label, source_split.

    `file` is relative to `raw_dir` (posix), `row` is 0 for 1-D files, `sample_id` is
    `f"{file}:{row}"`. Rows are sorted: train before test, then label, file, row.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: raw data folder not found; run `cwtops data sample` or `cwtops data import-ucr`")
    parts = _scan_split(raw_dir, raw_dir, "train")
    if (raw_dir / TEST_DIR).is_dir():
        parts += _scan_split(raw_dir / TEST_DIR, raw_dir, "test")
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=MANIFEST_COLUMNS + ["length"])
    train_classes = set(frame.loc[frame.source_split == "train", "label"])
    if len(train_classes) < 2:
        raise DataError(f"{raw_dir}: found {len(train_classes)} class folder(s) {sorted(train_classes)}; a classifier needs at least two")
    _check_lengths(raw_dir, frame)
    unknown = set(frame.loc[frame.source_split == "test", "label"]) - train_classes
    if unknown:
        raise DataError(f"{raw_dir / TEST_DIR}: test classes {sorted(unknown)} have no training folder in {raw_dir}; add training signals or remove them")
    order = frame.source_split.map({"train": 0, "test": 1})
    frame = frame.assign(_order=order).sort_values(["_order", "label", "file", "row"], kind="stable")
    return frame[MANIFEST_COLUMNS].reset_index(drop=True)


def classes_from_manifest(manifest: pd.DataFrame) -> list[str]:
    """Sorted class names of the training samples (the model's output order)."""
    return sorted(manifest.loc[manifest.source_split == "train", "label"].unique())


def read_manifest(path: Path | str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a manifest CSV with text columns kept as text (a class named `1` or `NA` stays a string)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; run the stage that writes it first")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in (columns or []) if column not in frame.columns]
    if missing:
        raise DataError(f"{path}: columns {missing} missing (found {list(frame.columns)}); rebuild it with its stage")
    if "row" in frame.columns:
        frame["row"] = frame["row"].astype(np.int64)
    return frame


def save_manifest(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write a manifest CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


# ---------------------------------------------------------------- reading signals


class _FileCache:
    """Memory-mapped raw files, opened lazily once per file and per process.

    A forked worker notices the new pid and opens its own maps; pickling (spawned workers)
    carries only the folder, never the mapped data.
    """

    def __init__(self, raw_dir: Path) -> None:
        self.raw_dir = raw_dir
        self._arrays: dict[str, np.ndarray] = {}
        self._pid = os.getpid()

    def array(self, file: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        array = self._arrays.get(file)
        if array is None:
            try:
                array = self._arrays[file] = np.load(self.raw_dir / file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise DataError(f"{self.raw_dir / file}: cannot read a file the manifest lists ({error}); rerun the parse stage") from None
        return array

    def row(self, file: str, row: int) -> np.ndarray:
        array = self.array(file)
        return array if array.ndim == 1 else array[row]

    def __getstate__(self) -> dict:
        return {"raw_dir": self.raw_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["raw_dir"])


class SignalDataset(torch.utils.data.Dataset):
    """(signal [1, L] float32, class index) per manifest row, read through memory maps."""

    def __init__(self, manifest: pd.DataFrame, raw_dir: Path | str, classes: list[str]) -> None:
        unknown = sorted(set(manifest.label) - set(classes))
        if unknown:
            raise DataError(f"manifest labels {unknown} are not among the classes {list(classes)}; rebuild the manifest")
        index = {name: i for i, name in enumerate(classes)}
        self.files = manifest.file.astype(str).to_numpy()
        self.rows = manifest.row.to_numpy(dtype=np.int64)
        self.labels = manifest.label.map(index).to_numpy(dtype=np.int64)
        self._cache = _FileCache(Path(raw_dir))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        signal = np.array(self._cache.row(self.files[i], int(self.rows[i])), dtype=np.float32)  # a copy
        return torch.from_numpy(signal).unsqueeze(0), int(self.labels[i])


@dataclass(frozen=True)
class _Shard:
    """Where one .npy file's signals lie: after its header, rows of `row_bytes` in C order."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def rows(self) -> int:
        return 1 if len(self.shape) == 1 else self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.shape[-1] * self.dtype.itemsize


def _read_shard_header(path: Path) -> _Shard:
    """The header of a .npy file, checked against the file's size (a truncated file is refused)."""
    try:
        with open(path, "rb") as handle:
            major, _ = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read a file the manifest lists ({error}); restore it or rerun the pipeline") from None
    if fortran or dtype.kind != "f" or len(shape) not in (1, 2) or dtype.hasobject:
        raise DataError(f"{path}: holds {dtype} {shape}{' in Fortran order' if fortran else ''}, not float signals [N, L] "
                        "in C order; rewrite it with numpy.save and rerun the parse stage")
    size, needed = path.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
    if size < needed:
        raise DataError(f"{path}: truncated ({size} bytes, its header promises {needed}); restore it or rerun the pipeline")
    return _Shard(offset, tuple(shape), dtype)


class SignalReader:
    """Reads any rows of a manifest as one [B, L] float32 batch, each row with one positioned read.

    What a streaming epoch and the evaluate stage read from: only the batch's signals are ever in
    the process's memory. Rows are read with `os.pread`, not through memory maps, so the file
    pages a long epoch touches stay in the kernel's page cache and never count as the process's
    resident memory. `check()` reads every listed file's header once, so a truncated or damaged
    shard is refused (naming it) before any work starts; `read()` refuses NaN/Inf naming the file
    and row. Safe in DataLoader worker processes (files are opened per read).
    """

    def __init__(self, manifest: pd.DataFrame, raw_dir: Path | str, length: int) -> None:
        self.raw_dir, self.length = Path(raw_dir), length
        self.files = manifest.file.astype(str).to_numpy()
        self.rows = manifest.row.to_numpy(dtype=np.int64)
        self._shards: dict[str, _Shard] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _shard(self, file: str) -> _Shard:
        shard = self._shards.get(file)
        if shard is None:
            shard = self._shards[file] = _read_shard_header(self.raw_dir / file)
        return shard

    def check(self) -> None:
        """Every listed file is whole, holds float signals of the right length and the rows listed."""
        last_row = pd.Series(self.rows).groupby(self.files, sort=False).max()
        for file, row in last_row.items():
            shard, path = self._shard(file), self.raw_dir / file
            if shard.shape[-1] != self.length:
                raise DataError(f"{path}: signal length {shard.shape[-1]}, the manifest's signals have {self.length}; rerun the parse stage")
            if row >= shard.rows:
                raise DataError(f"{path}: holds {shard.rows} signals but the manifest lists row {row}; it changed since the "
                                "parse stage (truncated or rewritten?): restore it or rerun the pipeline")

    def _read_rows(self, file: str, rows: np.ndarray, out: np.ndarray) -> None:
        shard, path = self._shard(file), self.raw_dir / file
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise DataError(f"{path}: cannot read a file the manifest lists ({error}); restore it or rerun the pipeline") from None
        try:
            for target, row in zip(out, rows):
                data = os.pread(descriptor, shard.row_bytes, shard.offset + int(row) * shard.row_bytes)
                if len(data) != shard.row_bytes:
                    raise DataError(f"{path}: truncated at row {row} since the stage started; restore it or rerun the pipeline")
                target[:] = np.frombuffer(data, dtype=shard.dtype)
        finally:
            os.close(descriptor)

    def read(self, index: np.ndarray) -> np.ndarray:
        """Signals at manifest positions `index`, in that order: [len(index), L] float32."""
        out = np.empty((len(index), self.length), dtype=np.float32)
        files, rows = self.files[index], self.rows[index]
        for file, positions in pd.Series(files).groupby(files, sort=False).indices.items():
            order = positions[np.argsort(rows[positions], kind="stable")]  # ascending offsets within a file
            block = np.empty((len(order), self.length), dtype=np.float32)
            self._read_rows(file, rows[order], block)
            out[order] = block
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise DataError(f"{self.raw_dir / files[bad]}: row {rows[bad]} contains NaN or Inf (changed since the parse "
                            "stage checked it); clean or drop that signal and rerun the pipeline")
        return out


def load_signals(manifest: pd.DataFrame, raw_dir: Path | str) -> np.ndarray:
    """The signals of `manifest`'s rows, in its order, as one [N, L] float32 array.

    Reads one file at a time (only the rows it needs), so each file is mapped once.
    """
    if len(manifest) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    cache = _FileCache(Path(raw_dir))
    files, rows = manifest.file.astype(str).to_numpy(), manifest.row.to_numpy(dtype=np.int64)
    out: np.ndarray | None = None
    for file, positions in pd.Series(files).groupby(files, sort=False).indices.items():
        array = cache.array(file)
        if out is None:
            out = np.empty((len(manifest), array.shape[-1]), dtype=np.float32)
        if array.shape[-1] != out.shape[1]:
            raise DataError(f"{Path(raw_dir) / file}: signal length {array.shape[-1]} differs from {out.shape[1]}; rescan the raw data")
        # one fancy-indexed read per file; 1-D files hold a single signal (row 0)
        out[positions] = array if array.ndim == 1 else array[rows[positions]]
    return out

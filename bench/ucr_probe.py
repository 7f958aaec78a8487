"""How much of a UCR dataset's classes the frozen front-end separates before any training.

For each dataset: 1-nearest-neighbour test accuracy (official split, Euclidean) on the raw
signals, and on the scale spectrum, each filter's mean over time of the scalogram the head is fed
(the default bank as `cwtops init` writes it, `parse.hop: auto`, `decimate: mean`, `magnitude:
abs`, signed log1p), and on the value distribution (the standardised signal's 32 quantiles, what
the zero-mean filters' magnitudes cannot see), each feature standardised on the training split. For signals shorter than
the bank's longest filters the pipeline refits the bank (`parse.bank: auto`) and this probe does not. Where the spectrum alone beats the trained head, the
head is not using what the front-end gives it (BENCHMARKS.md, what was tried: ACSF1).

    python -m bench.ucr_probe --datasets ACSF1,Computers --out probe.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench.ucr_data import dataset_paths
from cwtops.core.derived import auto_hop
from cwtops.data.signals import read_ucr
from cwtops.data.weights import generate_filter_bank
from cwtops.model.network import CWTFrontEnd, signed_log1p


def _load(path) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - a path
    signals, labels = read_ucr(path)
    names = sorted(set(labels))
    return np.asarray(signals, np.float32), np.array([names.index(label) for label in labels])


def scale_spectrum(signals: np.ndarray, hop: int) -> np.ndarray:
    """(N, S): each filter's mean over time of the log scalogram, as the model computes it."""
    bank = torch.from_numpy(generate_filter_bank()[0].padded()[0])
    frontend = CWTFrontEnd(bank, hop=hop, decimate="mean")
    x = torch.from_numpy(signals)[:, None]
    x = x - x.mean(-1, keepdim=True)
    x = x / x.square().mean(-1, keepdim=True).add(1e-8).sqrt()
    with torch.no_grad():
        return signed_log1p(frontend(x)).mean(-1).numpy()


def value_quantiles(signals: np.ndarray, count: int = 32) -> np.ndarray:
    """(N, count): each standardised signal's values at `count` evenly spaced quantiles, min to max."""
    centred = signals - signals.mean(1, keepdims=True)
    standardised = centred / np.sqrt(np.square(centred).mean(1, keepdims=True) + 1e-8)
    return np.quantile(standardised, np.linspace(0, 1, count), axis=1).T


def nearest_neighbour(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray,
                      standardise: bool = False) -> float:
    if standardise:
        mean, std = train.mean(0), train.std(0) + 1e-6
        train, test = (train - mean) / std, (test - mean) / std
    distances = (test * test).sum(1)[:, None] - 2 * test @ train.T + (train * train).sum(1)[None]
    return float((y_train[distances.argmin(1)] == y_test).mean())


def probe(name: str) -> dict:
    (x_train, y_train), (x_test, y_test) = (_load(path) for path in dataset_paths(name))
    hop = auto_hop(x_train.shape[1])
    spectrum_train, spectrum_test = scale_spectrum(x_train, hop), scale_spectrum(x_test, hop)
    return {
        "dataset": name,
        "hop": hop,
        "raw_1nn": nearest_neighbour(x_train, y_train, x_test, y_test),
        "spectrum_1nn": nearest_neighbour(spectrum_train, y_train, spectrum_test, y_test, standardise=True),
        "quantiles_1nn": nearest_neighbour(value_quantiles(x_train), y_train, value_quantiles(x_test), y_test,
                                           standardise=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", required=True, help="comma-separated UCR dataset names")
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args()
    rows = [probe(name) for name in args.datasets.split(",")]
    print(f"{'dataset':22s} {'hop':>4s} {'raw 1-NN':>9s} {'spectrum 1-NN':>14s} {'quantiles 1-NN':>15s}")
    for row in rows:
        print(f"{row['dataset']:22s} {row['hop']:4d} {row['raw_1nn']:9.3f} {row['spectrum_1nn']:14.3f} "
              f"{row['quantiles_1nn']:15.3f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

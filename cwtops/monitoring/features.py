"""Input features for drift: what the served signals look like, next to what the model was trained on.

Per signal, NumPy only (the drift pass runs without torch or the filter bank):
- level and spread of the raw signal (`mean`, `std`): the model standardises every signal and
  ignores both, but a sensor whose offset or gain changed usually changed in other ways too;
- the shape of the standardised signal (`skewness`, `kurtosis`, `min`, `max`, `zero_crossings`);
- its spectrum in BANDS log-spaced bands (`band_0` lowest .. `band_7` highest), each band's share
  of the energy: what the wavelet front-end turns into the scalogram the head reads.

The reference (train stage, `drift_reference.json`, registered with each model version) keeps,
per feature, decile edges over the training signals and the share of them in each bin; the
population stability index (PSI) of logged signals against it is the drift score per feature.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

BANDS = 8
BINS = 10
# Deciles of a small training set are noisy themselves: PSI between two samples of one source grows
# like (bins - 1) * (1/n_train + 1/n_logged). With at least this many training signals per bin, a
# same-source PSI stays well under the default threshold (0.25); small sets get fewer, wider bins.
SIGNALS_PER_BIN = 25
REFERENCE_FORMAT = "cwtops-drift-reference/1"
FEATURES = ("mean", "std", "skewness", "kurtosis", "min", "max", "zero_crossings", *(f"band_{i}" for i in range(BANDS)))
_FLOOR = 1e-4  # a bin no signal fell in counts as this share (PSI is infinite otherwise)


def signal_features(signals: np.ndarray) -> np.ndarray:
    """[N, L] signals -> [N, len(FEATURES)] float64 features."""
    x = np.asarray(signals, dtype=np.float64).reshape(len(signals), -1)
    mean = x.mean(axis=1)
    std = x.std(axis=1)
    z = (x - mean[:, None]) / (std[:, None] + 1e-12)
    skewness = (z**3).mean(axis=1)
    kurtosis = (z**4).mean(axis=1)
    crossings = (np.diff(np.signbit(z), axis=1) != 0).mean(axis=1) if x.shape[1] > 1 else np.zeros(len(x))
    return np.column_stack([mean, std, skewness, kurtosis, z.min(axis=1), z.max(axis=1), crossings, band_shares(z)])


def band_shares(z: np.ndarray) -> np.ndarray:
    """Share of spectral energy (DC apart) in BANDS log-spaced bands: [N, BANDS]."""
    power = np.abs(np.fft.rfft(z, axis=1)[:, 1:]) ** 2  # frequencies 1 .. L/2
    count = power.shape[1]
    if count == 0:
        return np.zeros((len(z), BANDS))
    position = np.log(np.arange(1, count + 1)) / math.log(count + 1)  # 0 (lowest) .. <1 (highest)
    band = np.minimum((position * BANDS).astype(int), BANDS - 1)
    shares = np.zeros((len(z), BANDS))
    for index in range(BANDS):
        mask = band == index
        if mask.any():
            shares[:, index] = power[:, mask].sum(axis=1)
    return shares / (shares.sum(axis=1, keepdims=True) + 1e-12)


def _assign(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(inner_edges, values, side="right")


def build_reference(features: np.ndarray, bins: int | None = None) -> dict:
    """Quantile edges (deciles, fewer for small sets) and bin shares per feature, from the training signals' features."""
    features = np.asarray(features, dtype=np.float64)
    bins = bins or max(2, min(BINS, len(features) // SIGNALS_PER_BIN))
    reference = {"format": REFERENCE_FORMAT, "signals": int(len(features)), "features": {}}
    for column, name in enumerate(FEATURES):
        values = features[:, column]
        inner = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])) if len(values) else np.array([])
        counts = np.bincount(_assign(values, inner), minlength=len(inner) + 1)
        reference["features"][name] = {"edges": inner.tolist(), "expected": (counts / max(1, counts.sum())).tolist()}
    return reference


def psi(reference: dict, features: np.ndarray) -> dict[str, float]:
    """Population stability index per feature: sum over bins of (actual - expected) * ln(actual / expected)."""
    if reference.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"not a drift reference (format {reference.get('format')!r}, expected {REFERENCE_FORMAT!r})")
    features = np.asarray(features, dtype=np.float64)
    scores = {}
    for column, name in enumerate(FEATURES):
        entry = reference["features"][name]
        inner = np.asarray(entry["edges"], dtype=np.float64)
        expected = np.maximum(np.asarray(entry["expected"], dtype=np.float64), _FLOOR)
        counts = np.bincount(_assign(features[:, column], inner), minlength=len(inner) + 1)
        actual = np.maximum(counts / max(1, counts.sum()), _FLOOR)
        scores[name] = float(((actual - expected) * np.log(actual / expected)).sum())
    return scores


def features_in_chunks(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """Features of signals read chunk by chunk (memory flat in the number of signals)."""
    parts = [signal_features(chunk) for chunk in chunks]
    return np.concatenate(parts) if parts else np.zeros((0, len(FEATURES)))

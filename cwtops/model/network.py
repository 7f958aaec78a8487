"""The hybrid CWT-CNN: a frozen wavelet filter bank in front of a small trainable CNN.

Shapes (S = 112 filters; T = L // hop time steps, 256-511 with `parse.hop: auto`):

    signal      (B, 1, L)
    scalogram   (B, S, T)      frozen front-end, |x * psi_s| averaged over every `hop` samples
                               (`decimate: mean`) or read at every hop-th one (`sample`);
                               `magnitude: analytic` takes the modulus with each filter's Hilbert
                               pair instead (2S filters in the one convolution)
    head "1d"   log1p(g * m)   (the default) each scale's magnitude m compressed with a gain g learnt
                               per scale and member (`train.gain`; false: log1p(m) for all)
                conv1..conv4   1-D over time, the S scales as input channels:
                               kernels 7, 5, 5, 3, BatchNorm + ReLU; each conv's outputs split between
                               branches of different dilations (`train.dilations`; auto: a wide one,
                               d x (1, 4, 8, 16), whose field is the signal, and a near one, (1, 2, 4, 8))
                               -> (B, c4, T) -> mean and max over time -> (B, 2 c4)
                fc1, fc2       -> logits (B, C); an ensemble of N such heads outputs the log of
                               their mean probability
                quantile       (`train.quantiles`) Q quantiles of the standardised signal's steps
                member         |x[t + k] - x[t]| (log1p) at each lag k (`train.quantile_lags`) and Q
                               of its values, standardised (F = Q (1 + lags) features), each also read
                               through B soft thresholds at its training quantiles (`train.quantile_bins`:
                               F B sigmoids, standardised), one linear layer -> logits (B, C): a logistic
                               regression fitted by L-BFGS once the members are trained; the output is
                               the log of (1 - w) x the heads' mean probability + w x its probability
                               (w = `train.quantile_weight`)
    head "2d"   conv1..conv4   2-D over (S, T), each conv3x3 + BatchNorm + ReLU + 2x2 max-pool
                               (conv1 with `stem: strided`: a stride-2 conv3x3 instead)
                               -> (B, c4, S/16, T/16) -> mean over time -> (B, c4 * S/16)
                fc1, fc2       -> logits (B, C)

Cost per signal with the defaults on the sample data (L 2048, hop 8, K = 257 taps; channels 64,
64, 128, 128; hidden 128): front-end 2 * S * K * L = 118 MFLOP averaged (`decimate: mean`, every
sample's response) or 2 * S * K * T = 14.7 MFLOP sampled (one strided convolution); head conv1
25.7 + conv2 10.5 + conv3 21.0 + conv4 25.2 = 82.4 MFLOP forward per member, about 3x that to train.
The front-end is frozen, so training computes scalograms once and feeds the head from
memory: an epoch costs only the head (`head_flops` counts it for any configuration).

The front-end holds the filter bank as buffers, never as parameters, so no optimizer can see it.
It runs one of two exact-equivalent paths: a single strided convolution (the path exported to
ONNX, where ONNX Runtime's Conv is much faster than its DFT) or an FFT product (PyTorch only,
where it is faster for long signals). Both equal the original one-Conv1d-per-scale
implementation (padding='same') decimated by `hop` (cwtops/model/reference.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cwtops.core.derived import Branches, as_branches
from cwtops.core.errors import CwtopsError

CHECKPOINT_FORMAT = "cwtops-checkpoint/1"
Magnitude = Literal["analytic", "abs", "square", "none"]
Stem = Literal["pool", "strided"]
HeadKind = Literal["1d", "2d"]
Method = Literal["auto", "conv", "fft"]
Decimate = Literal["mean", "sample"]


def filter_bank_sha256(matrix: np.ndarray, lengths: np.ndarray) -> str:
    """Hash of a padded filter bank: the identity the checkpoint, ONNX and registry carry."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    return digest.hexdigest()


def hilbert_pair(bank: np.ndarray) -> np.ndarray:
    """Each filter's Hilbert transform, centred and as long as the filter: (S, K) -> (S, K).

    A filter h and its pair form the analytic filter h + i H{h} (for a real Morlet, the complex
    Morlet), whose response's modulus is the response's envelope: smooth, where |h * x| oscillates
    at twice the filter's frequency. Computed with the filters zero-padded to 8 K (the pair of a
    band-pass filter decays within its support) and cut back to the filter's K taps.
    """
    taps = np.asarray(bank, dtype=np.float64)
    length = taps.shape[-1]
    centre, n_fft = (length - 1) // 2, 1 << (8 * length - 1).bit_length()
    padded = np.zeros((taps.shape[0], n_fft))
    padded[:, : length - centre] = taps[:, centre:]  # the centre tap at index 0
    padded[:, n_fft - centre :] = taps[:, :centre]
    weights = np.zeros(n_fft)  # the analytic signal: positive frequencies doubled, negative ones dropped
    weights[0] = weights[n_fft // 2] = 1.0
    weights[1 : n_fft // 2] = 2.0
    analytic = np.fft.ifft(np.fft.fft(padded, axis=-1) * weights, axis=-1)
    pair = np.concatenate([analytic.imag[:, n_fft - centre :], analytic.imag[:, : length - centre]], axis=-1)
    return pair.astype(np.float32)


def _apply_magnitude(response: torch.Tensor, magnitude: Magnitude) -> torch.Tensor:
    if magnitude == "analytic":  # (B, 2S, T): the filters' responses, then their Hilbert pairs'
        real, imaginary = response.chunk(2, dim=1)
        return (real.square() + imaginary.square()).sqrt()
    if magnitude == "abs":
        return response.abs()
    if magnitude == "square":
        return response.square()
    return response


class CWTFrontEnd(nn.Module):
    """Frozen filter bank: (B, 1, L) -> (B, S, ceil(L / hop)), every scale in one operation."""

    def __init__(
        self,
        bank: torch.Tensor,
        hop: int = 8,
        magnitude: Magnitude = "abs",
        method: Method = "auto",
        decimate: Decimate = "sample",
    ) -> None:
        super().__init__()
        if bank.ndim != 2 or bank.shape[1] % 2 != 1:
            raise CwtopsError(f"filter bank must be [S, K] with odd K, got {tuple(bank.shape)}")
        # Buffers, not parameters: saved with the model, invisible to optimizers.
        self.register_buffer("filter_bank", bank.detach().float().unsqueeze(1).contiguous())  # (S, 1, K)
        if magnitude == "analytic":  # the filters' Hilbert pairs, derived here once and saved beside them
            pair = torch.from_numpy(hilbert_pair(bank.detach().cpu().double().numpy()))
            self.register_buffer("hilbert_bank", pair.unsqueeze(1).contiguous())  # (S, 1, K)
        self.hop = hop
        self.magnitude: Magnitude = magnitude
        self.method: Method = method
        self.decimate: Decimate = decimate
        self._spectra: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def n_filters(self) -> int:
        return self.filter_bank.shape[0]

    @property
    def kernel_size(self) -> int:
        return self.filter_bank.shape[-1]

    def output_length(self, signal_length: int) -> int:
        return -(-signal_length // self.hop)

    def _use_fft(self, signal_length: int, hop: int | None = None) -> bool:
        if self.method != "auto":
            return self.method == "fft"
        # Tracing for ONNX always takes the convolution (ORT's DFT is slow).
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return False
        # The strided convolution computes only the T = L / hop outputs the head reads; the FFT
        # computes all L of them. Measured on CPU (bench/bench_frontend.py, 112 Morlet filters):
        # at hop 1 the FFT is 2-3x faster than the convolution, at hop 8 the convolution is ~10x
        # faster than the FFT.
        return (hop or self.hop) == 1

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        if self.decimate == "mean" and self.hop > 1:
            # The magnitude of a real wavelet's response oscillates at twice the filter's frequency:
            # read every hop-th sample, the high scales alias into noise; averaged over each hop it is
            # their energy envelope. Costs hop x the front-end's arithmetic (every sample's response).
            full = self._fft_response(signal, 1) if self._use_fft(signal.shape[-1], 1) else self._conv_response(signal, 1)
            return F.avg_pool1d(_apply_magnitude(full, self.magnitude), self.hop, self.hop, ceil_mode=True)
        if self._use_fft(signal.shape[-1]):
            response = self._fft_response(signal)
        else:
            response = self._conv_response(signal)
        return _apply_magnitude(response, self.magnitude)

    def _filters(self) -> torch.Tensor:
        """What the front-end convolves with: (S, 1, K), or (2S, 1, K) with the Hilbert pairs."""
        if self.magnitude == "analytic":
            return torch.cat([self.filter_bank, self.hilbert_bank])
        return self.filter_bank

    def _conv_response(self, signal: torch.Tensor, hop: int | None = None) -> torch.Tensor:
        weight = self._filters().to(signal.dtype)
        return F.conv1d(signal, weight, stride=hop or self.hop, padding=(self.kernel_size - 1) // 2)

    def _fft_response(self, signal: torch.Tensor, hop: int | None = None) -> torch.Tensor:
        length = signal.shape[-1]
        pad = (self.kernel_size - 1) // 2
        n_fft = _fast_size(length + self.kernel_size - 1)
        spectrum = self._filter_spectrum(n_fft, signal.device, signal.dtype)  # (S, F)
        signal_spectrum = torch.fft.rfft(signal.float(), n=n_fft)  # (B, 1, F)
        full = torch.fft.irfft(signal_spectrum * spectrum, n=n_fft)  # (B, S, n_fft)
        # Cross-correlation (what conv1d computes) of the zero-padded signal, 'same' alignment.
        return full[..., pad : pad + length : hop or self.hop].to(signal.dtype)

    def _filter_spectrum(self, n_fft: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (n_fft, device, dtype)
        if key not in self._spectra:
            # conv1d is a correlation: correlate = convolve with the time-reversed filter,
            # shifted so output index 0 lines up with padding (K-1)//2.
            reversed_bank = self._filters()[:, 0, :].flip(-1).float()
            self._spectra = {key: torch.fft.rfft(reversed_bank, n=n_fft)}
        return self._spectra[key]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        self._spectra = {}  # cached spectra follow the buffers to the new device / dtype
        return super()._apply(fn, recurse)


def _fast_size(n: int) -> int:
    """Smallest 2^a * 3^b >= n: sizes pocketfft handles fastest."""
    best = 1 << (n - 1).bit_length()
    power3 = 1
    while power3 < best:
        size = power3
        while size < n:
            size *= 2
        best = min(best, size)
        power3 *= 3
    return best


# 1-D head: kernel sizes of conv1..conv4, and the dilations checkpoints from before `train.dilations`
# was a setting were built with (receptive field 1 + 6 + 8 + 16 + 16 = 47 time steps). The default
# now is derived (`train.dilations: auto`, cwtops/core/derived.py): two branches per conv, one whose
# field is about the T steps the head sees and one with this near field; mean and max pooling over
# time then summarise the signal.
KERNELS_1D = (7, 5, 5, 3)
DILATIONS_1D = (1, 2, 4, 8)


def receptive_field(dilations: tuple[int, ...]) -> int:
    """Time steps one output of conv4 sees along one branch of dilations."""
    return 1 + sum((kernel - 1) * dilation for kernel, dilation in zip(KERNELS_1D, dilations))


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild the network: travels inside every checkpoint."""

    n_filters: int
    kernel_size: int
    n_classes: int
    signal_length: int
    hop: int = 8
    magnitude: Magnitude = "abs"
    channels: tuple[int, int, int, int] = (8, 16, 32, 32)
    hidden: int = 64
    dropout: float = 0.2
    stem: Stem = "pool"  # 2-D head: conv1 3x3 conv then 2x2 max-pool, or one stride-2 3x3 conv (4x cheaper)
    extra: dict = field(default_factory=dict)
    # "2d": convolutions over (scale, time); "1d": over time, the scales as input channels.
    # Checkpoints written before the 1-D head existed carry no `head` key and rebuild as "2d".
    head: HeadKind = "2d"
    members: int = 1  # ensemble size (1-D head): heads on the one front-end, probabilities averaged
    # 1-D head: the standardised signal itself, averaged over each hop, as one more input channel
    # beside the S scales (the magnitudes drop the waveform's sign and phase). Older checkpoints: off.
    raw_channel: bool = False
    # How the front-end decimates by `hop` (parse.decimate): "mean" averages each filter's magnitude
    # over the hop, "sample" reads every hop-th sample. Checkpoints written before: "sample".
    decimate: Decimate = "sample"
    # 1-D head: conv1..conv4's dilations, one tuple per branch (train.dilations); one branch is one
    # Conv1d per layer, as checkpoints from before branches were written. Four ints are one branch.
    dilations: Branches = (DILATIONS_1D,)
    # 1-D head: each member compresses the scales as log1p(g * m) with a learnt gain g per input channel
    # (train.gain), where log1p(m) has none: log(m + 1 / g) up to a constant the input BatchNorm removes,
    # so each scale's floor of the log is learnt. Checkpoints written before: off.
    gain: bool = False
    # 1-D head: a logistic regression on Q quantiles of the standardised signal's absolute sample-to-sample
    # steps (log1p) and Q of its values, fitted by L-BFGS after the members are trained; the output mixes
    # its probabilities with the members' mean at `quantile_weight`. 0: off (checkpoints written before).
    quantiles: int = 0
    quantile_weight: float = 0.0
    # The quantile member's step lags (each k: the quantiles of |x[t + k] - x[t]|, k capped at L - 1) and
    # soft thresholds per feature (0: the features alone). Checkpoints written before: lag 1, none.
    quantile_lags: tuple[int, ...] = (1,)
    quantile_bins: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", as_branches(self.dilations))
        object.__setattr__(self, "quantile_lags", tuple(int(k) for k in self.quantile_lags))
        if self.quantiles and not (self.quantiles >= 2 and 0 < self.quantile_weight < 1 and self.signal_length >= 2):
            raise CwtopsError(f"the quantile member needs at least 2 quantiles, a weight between 0 and 1 and signals of "
                              f"2+ samples, got {self.quantiles}, {self.quantile_weight} and {self.signal_length}")
        if self.quantiles and (not self.quantile_lags or min(self.quantile_lags) < 1 or self.quantile_bins < 0
                               or len(set(self.quantile_lags)) != len(self.quantile_lags)):
            raise CwtopsError(f"the quantile member needs distinct step lags of 1 or more and 0 or more bins, got "
                              f"lags {list(self.quantile_lags)} and {self.quantile_bins} bins")
        if self.head == "1d" and min(self.channels) < len(self.dilations):
            raise CwtopsError(f"each of conv1..conv4 splits its channels {self.channels} between "
                              f"{len(self.dilations)} branches of dilations: widen train.channels or use fewer branches")

    @property
    def input_channels(self) -> int:
        return self.n_filters + int(self.raw_channel)

    @property
    def quantile_features(self) -> int:
        """The quantile member's inputs: Q step quantiles per lag and Q value quantiles (0 when off)."""
        return self.quantiles * (len(self.quantile_lags) + 1) if self.quantiles else 0


def _conv_block(in_channels: int, out_channels: int, strided: bool = False) -> nn.Sequential:
    if strided:  # the same /2 in both axes as conv + pool, at a quarter of the convolution's cost
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def _conv1d_block(in_channels: int, out_channels: int, kernel: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=False),
        nn.BatchNorm1d(out_channels),
        nn.ReLU(inplace=True),
    )


class _BranchedConv1d(nn.Module):
    """One conv layer as parallel dilated convolutions whose outputs are concatenated (the layer's
    channels split between them, the first taking any remainder), then BatchNorm + ReLU: near and
    far context at every depth, for the arithmetic of one convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        share = out_channels // len(dilations)
        widths = [out_channels - share * (len(dilations) - 1)] + [share] * (len(dilations) - 1)
        self.branches = nn.ModuleList(
            nn.Conv1d(in_channels, width, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=False)
            for width, dilation in zip(widths, dilations)
        )
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(torch.cat([branch(x) for branch in self.branches], dim=1)))


def _time_conv(in_channels: int, out_channels: int, kernel: int, dilations: tuple[int, ...]) -> nn.Module:
    if len(dilations) == 1:  # the single-branch layout (and state-dict keys) of earlier checkpoints
        return _conv1d_block(in_channels, out_channels, kernel, dilations[0])
    return _BranchedConv1d(in_channels, out_channels, kernel, dilations)


# The learnt gain is exp(GAIN_RATE * theta), theta starting at 0 (log1p itself). AdamW moves a parameter
# by about the learning rate a step whatever its gradient's size, so theta alone would move the log's
# floor by a factor e in a thousand steps at lr 0.001; the rate lets a run of a few thousand steps
# reach the decades the scales' magnitudes span (median 0.03 to 0.3 of the signal's RMS on the
# development list, BENCHMARKS.md). Weight decay pulls theta back towards log1p.
GAIN_RATE = 4.0


class TimeHead(nn.Module):
    """[learnt gain, log1p,] input BatchNorm, conv1..conv4 over time (scales as channels), mean and max
    over time, fc1, fc2 -> logits."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        widths = (args.input_channels, *args.channels)
        # log1p(g * m) per input channel (train.gain); without it the log1p is applied before the members
        self.log_gain = nn.Parameter(torch.zeros(args.input_channels, 1)) if args.gain else None
        self.input_norm = nn.BatchNorm1d(args.input_channels)  # per scale: scales differ in energy by decades
        for index, kernel in enumerate(KERNELS_1D, start=1):
            layer_dilations = tuple(branch[index - 1] for branch in args.dilations)
            setattr(self, f"conv{index}", _time_conv(widths[index - 1], widths[index], kernel, layer_dilations))
        self.fc1 = nn.Linear(2 * args.channels[-1], args.hidden)
        self.dropout = nn.Dropout(args.dropout)
        self.fc2 = nn.Linear(args.hidden, args.n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.log_gain is not None:  # `features` are the magnitudes, not yet compressed
            features = signed_log1p(features * torch.exp(GAIN_RATE * self.log_gain))
        x = self.input_norm(features)  # (B, S, T)
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))  # (B, c4, T)
        x = torch.cat([x.mean(dim=-1), x.amax(dim=-1)], dim=1)  # (B, 2 c4)
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


def signed_log1p(x: torch.Tensor) -> torch.Tensor:
    """sign(x) log(1 + |x|): compresses decades of energy like log1p, and keeps signed responses
    (`magnitude: none`, the raw channel) finite, where log1p of a value below -1 is NaN."""
    return torch.sign(x) * torch.log1p(x.abs())


def _quantiles(values: torch.Tensor, count: int) -> torch.Tensor:
    """(B, n) -> (B, count): `count` quantiles of each row, smallest to largest (the sorted row read at
    `count` evenly spaced ranks, both ends included; a TopK and a Gather in ONNX)."""
    ordered = torch.sort(values, dim=-1).values
    # rank k (n - 1) / (count - 1) rounded half to even, in integer tensor arithmetic on the traced length
    # (a Shape in ONNX), so a graph exported with `export.dynamic_length` reads the right ranks at any length
    n = torch._shape_as_tensor(ordered)[-1].to(ordered.device)
    scaled = torch.arange(count, device=ordered.device) * (n - 1)
    whole = torch.div(scaled, count - 1, rounding_mode="floor")
    twice_rest = 2 * (scaled - whole * (count - 1))
    up = (twice_rest > count - 1) | ((twice_rest == count - 1) & (whole % 2 == 1))
    return ordered.index_select(-1, whole + up.long())


def signal_quantiles(standardised: torch.Tensor, count: int, lags: tuple[int, ...] = (1,)) -> torch.Tensor:
    """(B, 1, L) -> (B, count (1 + len(lags))): log1p of `count` quantiles of the standardised signal's
    absolute steps |x[t + k] - x[t]| at the first lag, then `count` quantiles of its values, then the
    steps' at each further lag (k capped at L - 1): the distributions of its steps at a few scales and
    of its levels, which no zero-mean filter's magnitude describes."""
    length = standardised.shape[-1]

    def steps(lag: int) -> torch.Tensor:
        lag = min(lag, length - 1)
        return torch.log1p(_quantiles((standardised[..., lag:] - standardised[..., :-lag]).abs().flatten(1), count))

    return torch.cat([steps(lags[0]), _quantiles(standardised.flatten(1), count), *(steps(k) for k in lags[1:])], dim=1)


# The quantile member is a logistic regression fitted as scikit-learn's LogisticRegression fits one (its
# default C = 1): the mean cross-entropy over the n training signals plus ||W||^2 / (2 C n), minimised by
# L-BFGS on the standardised inputs. Fitted by the optimiser of the members instead (AdamW, a one-cycle
# schedule of a few thousand steps at lr 1e-3), its weights stayed far from that optimum (BENCHMARKS.md).
QUANTILE_C = 1.0
# Soft thresholds (`train.quantile_bins`): sigmoid((z - t) / BIN_WIDTH) for each standardised feature z
# and each threshold t, the thresholds at evenly spaced quantiles of z over the training split. A linear
# layer over them fits a step-like function of each feature, as a decision tree's splits do, where the
# features alone give it one slope each; smooth, so ONNX Runtime and PyTorch agree to rounding.
BIN_WIDTH = 0.25


class QuantileMember(nn.Module):
    """BatchNorm + (soft thresholds) + linear over the signal's step and value quantiles -> logits: a
    classifier of the signal's distributions, fitted once by `fit` after the convolutional members are
    trained. `features`: its inputs' count; `bins`: soft thresholds per input (0: none)."""

    def __init__(self, features: int, n_classes: int, bins: int = 0) -> None:
        super().__init__()
        self.bins = bins
        self.norm = nn.BatchNorm1d(features)  # its statistics are the training split's, set by `fit`
        width = features
        if bins:
            self.register_buffer("thresholds", torch.zeros(features, bins))
            self.bin_norm = nn.BatchNorm1d(features * bins)
            width += features * bins
        self.fc = nn.Linear(width, n_classes)
        self.requires_grad_(False)  # no optimizer step touches it: `fit` writes its weights

    def _thresholded(self, z: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((z.unsqueeze(-1) - thresholds) / BIN_WIDTH).flatten(1)

    def forward(self, quantiles: torch.Tensor) -> torch.Tensor:
        z = self.norm(quantiles)
        if self.bins:
            z = torch.cat([z, self.bin_norm(self._thresholded(z, self.thresholds))], dim=1)
        return self.fc(z)

    def fit(self, quantiles: torch.Tensor, labels: torch.Tensor, max_iter: int = 1000) -> dict:
        """Standardise by the training split's statistics (thresholds at its quantiles, their outputs
        standardised too), then minimise the penalised cross-entropy by L-BFGS in float64 on the CPU
        (deterministic): (N, F) features, (N,) class indices."""
        x = quantiles.detach().double().cpu()
        y = labels.detach().long().cpu()
        mean, var = x.mean(0), x.var(0, unbiased=False)
        z = (x - mean) / torch.sqrt(var + self.norm.eps)
        if self.bins:
            levels = torch.linspace(0, 1, self.bins + 2, dtype=torch.float64)[1:-1]
            thresholds = torch.quantile(z, levels, dim=0).T.contiguous()  # (F, bins)
            soft = self._thresholded(z, thresholds)
            soft_mean, soft_var = soft.mean(0), soft.var(0, unbiased=False)
            z = torch.cat([z, (soft - soft_mean) / torch.sqrt(soft_var + self.bin_norm.eps)], dim=1)
        weight = torch.zeros(self.fc.out_features, z.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(self.fc.out_features, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def penalised() -> torch.Tensor:
            return F.cross_entropy(z @ weight.T + bias, y) + weight.square().sum() / (2 * QUANTILE_C * len(y))

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            loss = penalised()
            loss.backward()
            return loss

        with torch.enable_grad():  # callers may hold no_grad (evaluation code around training)
            optimizer.step(objective)
        with torch.no_grad():
            loss = float(penalised())
            accuracy = float(((z @ weight.T + bias).argmax(1) == y).double().mean())
            device = self.fc.weight.device
            self.norm.running_mean.copy_(mean.float().to(device))
            self.norm.running_var.copy_(var.float().to(device))
            self.norm.weight.fill_(1.0)
            self.norm.bias.zero_()
            if self.bins:
                self.thresholds.copy_(thresholds.float().to(device))
                self.bin_norm.running_mean.copy_(soft_mean.float().to(device))
                self.bin_norm.running_var.copy_(soft_var.float().to(device))
                self.bin_norm.weight.fill_(1.0)
                self.bin_norm.bias.zero_()
            self.fc.weight.copy_(weight.float().to(device))
            self.fc.bias.copy_(bias.float().to(device))
        return {"signals": len(y), "iterations": int(optimizer.state[weight]["n_iter"]),
                "objective": loss, "train_accuracy": accuracy}


def with_member_inputs(features: torch.Tensor, quantiles: torch.Tensor | None) -> torch.Tensor:
    """The heads' input (B, S, T) with the quantile member's (B, F) appended as F channels constant in
    time (B, S + F, T); training's augmentations and the heads leave those channels out."""
    if quantiles is None:
        return features
    return torch.cat([features, quantiles.unsqueeze(-1).expand(-1, -1, features.shape[-1])], dim=1)


def average_probabilities(logits: list[torch.Tensor]) -> torch.Tensor:
    """log of the members' mean softmax: what the ensemble outputs (its softmax is that mean)."""
    if len(logits) == 1:
        return logits[0]
    stacked = torch.stack([F.log_softmax(member.float(), dim=-1) for member in logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


class HybridCWTNet(nn.Module):
    """Frozen CWT front-end + trainable head (conv1..conv4, fc1, fc2)."""

    def __init__(self, args: ModelArgs, bank: torch.Tensor | None = None) -> None:
        super().__init__()
        if bank is None:  # rebuilt from a checkpoint: the state dict brings the real filters
            bank = torch.zeros(args.n_filters, args.kernel_size)
        self.args = args
        self.frontend = CWTFrontEnd(bank, hop=args.hop, magnitude=args.magnitude, decimate=args.decimate)
        if args.head == "1d":
            if args.members < 1:
                raise CwtopsError(f"an ensemble needs at least one member, got members={args.members}")
            self.members = nn.ModuleList([TimeHead(args) for _ in range(args.members)])
            if args.quantiles:  # built after the members: their initial weights are those without it
                self.quantile_member = QuantileMember(args.quantile_features, args.n_classes, args.quantile_bins)
            return
        if args.members != 1 or args.raw_channel or args.quantiles:
            raise CwtopsError("ensembles, the raw channel and the quantile member are built from the 1-D head: set "
                              "train.head: 1d, or train.members: 1, train.raw_channel: false and train.quantiles: 0")
        c1, c2, c3, c4 = args.channels
        self.input_norm = nn.BatchNorm2d(1)
        self.conv1 = _conv_block(1, c1, strided=args.stem == "strided")
        self.conv2 = _conv_block(c1, c2)
        self.conv3 = _conv_block(c2, c3)
        self.conv4 = _conv_block(c3, c4)
        freq_bins = args.n_filters // 16
        if freq_bins < 1 or self.frontend.output_length(args.signal_length) < 16:
            raise CwtopsError(
                f"the head pools 16x in scales and time: need at least 16 filters and "
                f"{16 * args.hop} samples per signal, got {args.n_filters} filters, "
                f"{args.signal_length} samples (use train.head: 1d, lower parse.hop or use longer signals)"
            )
        self.fc1 = nn.Linear(c4 * freq_bins, args.hidden)
        self.dropout = nn.Dropout(args.dropout)
        self.fc2 = nn.Linear(args.hidden, args.n_classes)

    def scalogram(self, signal: torch.Tensor) -> torch.Tensor:
        """(B, 1, L) -> (B, S, T): standardised signal through the frozen filter bank (the quantile
        member's inputs, constant in time, ride after the heads' channels: `with_member_inputs`)."""
        features, quantiles = self.scalogram_parts(signal)
        return with_member_inputs(features, quantiles)

    def scalogram_parts(self, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, L) -> the heads' input (B, S, T) and the quantile member's (B, F), None when off:
        what a cache holds (the member's inputs once per signal, not once per time step)."""
        centred = signal - signal.mean(dim=-1, keepdim=True)
        scale = centred.square().mean(dim=-1, keepdim=True).add(1e-8).sqrt()
        standardised = centred / scale
        features = self.frontend(standardised)
        if self.args.raw_channel:
            # the same T = ceil(L / hop) steps as the front-end's strided output
            raw = F.avg_pool1d(standardised, self.args.hop, self.args.hop, ceil_mode=True) if self.args.hop > 1 else standardised
            features = torch.cat([features, raw], dim=1)  # (B, S + 1, T)
        if not self.args.quantiles:
            return features, None
        # The member's inputs are computed in float64 and rounded to float32. In float32, PyTorch and ONNX Runtime
        # sum the mean and the energy in different orders, a quantile then differs by an ulp, and the member's
        # standardisation and thresholds magnify that past the parity gate's tolerance (7e-3 on a logit of UCR
        # FreezerSmallTrain); in float64 both round the same values to the same float32.
        precise = signal.double()
        precise = precise - precise.mean(dim=-1, keepdim=True)
        precise = precise / precise.square().mean(dim=-1, keepdim=True).add(1e-8).sqrt()
        quantiles = signal_quantiles(precise, self.args.quantiles, self.args.quantile_lags)
        return features, quantiles.to(features.dtype)

    def head(self, scalogram: torch.Tensor) -> torch.Tensor:
        """(B, S, T) -> logits (B, C); an ensemble's are the log of its mean probabilities."""
        if self.args.head == "1d":
            members = self.members_head(scalogram)
            if not self.args.quantiles:
                return members
            weight = self.args.quantile_weight
            quantiles = self.quantile_member(scalogram[:, self.args.input_channels:, 0])
            return torch.logsumexp(torch.stack([members.float().log_softmax(-1) + math.log(1 - weight),
                                                F.log_softmax(quantiles.float(), dim=-1) + math.log(weight)]), dim=0)
        x = signed_log1p(scalogram).unsqueeze(1)  # (B, 1, S, T)
        x = self.input_norm(x)
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))  # (B, c4, S/16, T/16)
        x = x.mean(dim=-1).flatten(1)  # (B, c4 * S/16)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)

    def member_logits(self, scalogram: torch.Tensor) -> list[torch.Tensor]:
        """Each ensemble member's logits (1-D head): what training fits, one loss per member (the
        quantile member, fitted after them, is not one of them)."""
        scalogram = scalogram[:, : self.args.input_channels]  # without the quantiles' channels
        if self.args.gain:  # each member compresses with its own learnt gain
            return [member(scalogram) for member in self.members]
        features = signed_log1p(scalogram)  # the raw channel, and every response under `magnitude: none`, is signed
        return [member(features) for member in self.members]

    def members_head(self, scalogram: torch.Tensor) -> torch.Tensor:
        """The trained members' output without the quantile member: what training selects epochs by."""
        return average_probabilities(self.member_logits(scalogram)) if self.args.head == "1d" else self.head(scalogram)

    def training_head(self, scalogram: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """What training fits: each member's logits (1-D head, a list) or the 2-D head's logits."""
        return self.member_logits(scalogram) if self.args.head == "1d" else self.head(scalogram)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.head(self.scalogram(signal))


def head_flops(args: ModelArgs) -> dict[str, int]:
    """Multiply-accumulates x2 per signal for each layer (forward pass; an ensemble's summed)."""
    height, width = args.n_filters, -(-args.signal_length // args.hop)
    # the averaged front-end computes every sample's response, the sampled one every hop-th
    computed = args.signal_length if args.decimate == "mean" and args.hop > 1 else width
    flops = {"frontend": 2 * args.n_filters * args.kernel_size * computed}
    if args.head == "1d":
        widths = (args.input_channels, *args.channels)
        for index, kernel in enumerate(KERNELS_1D, start=1):
            flops[f"conv{index}"] = args.members * 2 * width * widths[index - 1] * widths[index] * kernel
        flops["fc1"] = args.members * 2 * 2 * args.channels[-1] * args.hidden
        flops["fc2"] = args.members * 2 * args.hidden * args.n_classes
        if args.quantiles:  # the sorts are n log n comparisons, not multiply-adds: only the linear layer counted
            flops["quantile_member"] = 2 * args.quantile_features * (1 + args.quantile_bins) * args.n_classes
        return flops
    in_channels = 1
    for index, out_channels in enumerate(args.channels, start=1):
        outputs = (height // 2) * (width // 2) if index == 1 and args.stem == "strided" else height * width
        flops[f"conv{index}"] = 2 * outputs * in_channels * out_channels * 9
        height, width, in_channels = height // 2, width // 2, out_channels
    flops["fc1"] = 2 * in_channels * (args.n_filters // 16) * args.hidden
    flops["fc2"] = 2 * args.hidden * args.n_classes
    return flops


def build_model(args: ModelArgs, bank: torch.Tensor) -> HybridCWTNet:
    return HybridCWTNet(args, bank)


def trainable_parameters(model: HybridCWTNet) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def checkpoint_dict(
    model: HybridCWTNet,
    class_names: list[str],
    bank_sha256: str,
    params: dict,
    **extra: object,
) -> dict:
    """A checkpoint that describes itself: rebuildable with no code-side configuration."""
    args = asdict(model.args)
    args["channels"] = list(args["channels"])
    args["dilations"] = [list(branch) for branch in args["dilations"]]
    args["quantile_lags"] = list(args["quantile_lags"])
    return {
        "format": CHECKPOINT_FORMAT,
        "model_args": args,
        "class_names": list(class_names),
        "filter_bank_sha256": bank_sha256,
        "params": params,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def model_from_checkpoint(checkpoint: dict, source: str = "<checkpoint>") -> HybridCWTNet:
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CwtopsError(
            f"{source}: not a cwtops checkpoint (format {checkpoint.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r}); re-run the train stage"
        )
    raw_args = dict(checkpoint["model_args"])
    raw_args["channels"] = tuple(raw_args["channels"])
    model = HybridCWTNet(ModelArgs(**raw_args))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model


def load_checkpoint(path: Path | str, map_location: str = "cpu") -> tuple[HybridCWTNet, dict]:
    """Rebuild the model from a checkpoint file alone (weights_only: no pickled code runs)."""
    path = Path(path)
    if not path.exists():
        raise CwtopsError(f"{path}: checkpoint not found; run `cwtops stage train` (or `dvc repro train`)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise CwtopsError(f"{path}: cannot read checkpoint ({error}); delete it and re-run training") from None
    return model_from_checkpoint(checkpoint, str(path)), checkpoint

"""The original front-end, kept as the yardstick: one Conv1d per scale (112 small convolutions).

Tests check the fused front-end against it; benchmarks measure the speed-up over it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cwtops.model.network import hilbert_pair


def _centred(taps: np.ndarray, width: int) -> np.ndarray:
    """`taps` zero-padded to an odd `width`, centre on centre, as the fused bank's matrix holds them."""
    padded = np.zeros(width, np.float32)
    offset = (width - 1) // 2 - (len(taps) - 1) // 2
    padded[offset : offset + len(taps)] = taps
    return padded


def _frozen_conv(taps: np.ndarray) -> nn.Conv1d:
    conv = nn.Conv1d(1, 1, len(taps), padding="same", bias=False)
    conv.weight.data = torch.as_tensor(np.asarray(taps, dtype=np.float32)).view(1, 1, -1)
    conv.weight.requires_grad_(False)
    return conv


class PerLayerFrontEnd(nn.Module):
    """`conv5`..`conv116` as separate Conv1d(1, 1, k, padding='same') layers, then |.| and decimation
    (every hop-th sample, or the mean of every hop samples). `magnitude: analytic` gives each layer a
    second Conv1d, the filter's Hilbert pair, and takes the modulus of the complex response."""

    def __init__(self, filters: list[np.ndarray], hop: int = 1, magnitude: str = "abs", decimate: str = "sample") -> None:
        super().__init__()
        self.convs = nn.ModuleList(_frozen_conv(taps) for taps in filters)
        # the fused front-end derives each pair from the filter centred in the bank's K taps (the
        # pair's tails reach beyond a short filter's support): the same here, one filter at a time
        width = max(len(taps) for taps in filters) | 1
        pairs = [hilbert_pair(_centred(taps, width)[None])[0] for taps in filters] if magnitude == "analytic" else []
        self.pairs = nn.ModuleList(_frozen_conv(taps) for taps in pairs)
        self.hop = hop
        self.magnitude = magnitude
        self.decimate = decimate

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        response = torch.cat([conv(signal) for conv in self.convs], dim=1)  # (B, S, L)
        if self.magnitude == "analytic":
            imaginary = torch.cat([conv(signal) for conv in self.pairs], dim=1)
            response = torch.complex(response, imaginary).abs()
        elif self.magnitude == "abs":
            response = response.abs()
        elif self.magnitude == "square":
            response = response.square()
        if self.decimate == "mean":  # every hop samples' magnitudes averaged (the last group may be shorter)
            length = response.shape[-1]
            return torch.stack([response[..., i : i + self.hop].mean(dim=-1) for i in range(0, length, self.hop)], dim=-1)
        return response[..., :: self.hop]

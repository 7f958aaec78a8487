"""The original front-end, kept as the yardstick: one Conv1d per scale (112 small convolutions).

Tests check the fused front-end against it; benchmarks measure the speed-up over it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class PerLayerFrontEnd(nn.Module):
    """`conv5`..`conv116` as separate Conv1d(1, 1, k, padding='same') layers, then |.| and decimation
    (every hop-th sample, or the mean of every hop samples)."""

    def __init__(self, filters: list[np.ndarray], hop: int = 1, magnitude: str = "abs", decimate: str = "sample") -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        for taps in filters:
            conv = nn.Conv1d(1, 1, len(taps), padding="same", bias=False)
            conv.weight.data = torch.as_tensor(np.asarray(taps, dtype=np.float32)).view(1, 1, -1)
            conv.weight.requires_grad_(False)
            self.convs.append(conv)
        self.hop = hop
        self.magnitude = magnitude
        self.decimate = decimate

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        response = torch.cat([conv(signal) for conv in self.convs], dim=1)  # (B, S, L)
        if self.magnitude == "abs":
            response = response.abs()
        elif self.magnitude == "square":
            response = response.square()
        if self.decimate == "mean":  # every hop samples' magnitudes averaged (the last group may be shorter)
            length = response.shape[-1]
            return torch.stack([response[..., i : i + self.hop].mean(dim=-1) for i in range(0, length, self.hop)], dim=-1)
        return response[..., :: self.hop]

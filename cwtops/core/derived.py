"""Settings derived from the data: what `auto` in params.yaml resolves to.

Signal length, number of classes and training signals per class vary by orders of magnitude
between datasets (24 to 2,000+ samples, 2 to 60 classes, 1 to 1,000+ signals a class); one
fixed hop, schedule or validation carve-out cannot fit them all. Every `auto` value resolves
here, deterministically from the data's shape, and explicit values in params.yaml win. The
resolved values go to the train summary and MLflow, so a run explains itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cwtops.core.errors import CwtopsError

AUTO = "auto"

# The head sees T = L // hop time steps; hop is chosen so T lies in [TARGET_STEPS, 2 * TARGET_STEPS)
# for every signal of at least TARGET_STEPS samples (shorter signals keep every sample).
TARGET_STEPS = 256
# Training length as a compute budget: epochs x training signals x FLOPs per signal (forward and
# backward through the head) is about the same for every dataset, capped at MAX_EPOCHS for small
# sets and floored at MIN_EPOCHS for large ones. The head trained at about 65 GFLOP/s on 2 CPU
# cores (the sample data: 52 epochs, 6e12 FLOPs, in under 92 s with parse and evaluate), so 1e13
# is about 2.5 minutes, and a dataset of up to 1,000 training signals runs import to parity in 5.
FLOP_BUDGET = 1e13
MIN_EPOCHS, MAX_EPOCHS = 30, 300
TRAIN_FLOPS_PER_FORWARD = 3  # backward costs about twice the forward pass
# A training step also costs a fixed amount per head (Python, autograd, the optimizer), estimated
# at about 5 ms on 2 cores (GunPoint's 24 ms steps less their arithmetic at the measured rate) and
# charged as the FLOPs the cores do in that time. It dominates tiny signals (a step of
# 8 signals of 24 samples is 1e8 FLOPs of arithmetic).
STEP_OVERHEAD_FLOPS = 3e8
# Small datasets reach MAX_EPOCHS well inside the budget: what is left trains more ensemble members
# (heads on the one front-end, probabilities averaged), up to MAX_MEMBERS.
MAX_MEMBERS = 5
# A validation carve-out is taken only where every class can spare signals for it: a small one
# picks noisy epochs (UCR Computers, 12 validation signals a class: it kept epoch 16 of 192).
# Otherwise the head trains on every signal and the checkpoint is chosen by training loss.
VAL_MIN_PER_CLASS = 500
VAL_FRACTION = 0.1


# Training input. The front-end is frozen, so a small set's scalograms are computed once and kept in
# memory (float32, S x T per signal: 115 KB at 112 filters x 256 steps, 14x the raw signal). Above
# this many bytes of scalograms per process the epoch streams instead: batches read from the
# raw shards and the front-end applied per batch (about 6% of a training step's
# arithmetic at the defaults), so memory stays flat in the number of signals (BENCHMARKS.md, scale).
MEMORY_INPUT_BYTES = 1 << 30
# Head width. Small training sets generalise better with a narrower head, and the budget it frees
# trains more ensemble members: on the development list the narrow head gained 4 to 8 points on
# Lightning7, Herring and ACSF1 (70, 64 and 100 training signals) and lost 3 on OSULeaf (200),
# so it is the default up to SMALL_SET signals (BENCHMARKS.md, what was tried).
SMALL_SET = 150  # training signals, at most
# `train.raw_channel: auto` puts the raw channel (the standardised signal beside the scales'
# magnitudes, which lose its sign and phase) where the narrow head is. Measured on the 11
# development sets up to SMALL_SET signals it moved the mean by +0.4 points, from gains on small test
# sets (ArrowHead +5.7, Lightning7 +5.5, ACSF1 +4.0) and losses on large ones (FreezerSmallTrain
# -3.3 on 2,850 test signals, Mallat -1.0); it is an option, not the default (BENCHMARKS.md).
WIDE_CHANNELS, WIDE_HIDDEN = (64, 64, 128, 128), 128
NARROW_CHANNELS, NARROW_HIDDEN = (32, 32, 64, 64), 64
# The 1-D head's dilations: conv1..conv4 (kernels 7, 5, 5, 3) at DILATION_PATTERN times a unit d see
# 1 + 86 d time steps; `auto` picks d so that this receptive field is about the T steps the head sees.
# On the development list the field mattered most where the sets were furthest behind (one seed):
# Lightning7 (T 319) 0.616 at 47 steps, 0.726 at 87, 0.753 at 173, 0.795 at 345; CricketX (T 300)
# 0.774, 0.808, 0.831, 0.810. Others preferred the near field: Computers 0.764 at 47, 0.672 at 345;
# FreezerSmallTrain 0.870 and 0.789. So `auto` gives every conv two branches, half its channels each:
# the wide one and NEAR_DILATIONS (47 steps), and the layers mix them (BENCHMARKS.md, what was tried).
DILATION_PATTERN = (1, 4, 8, 16)
PATTERN_FIELD = 86  # (7 - 1) * 1 + (5 - 1) * 4 + (5 - 1) * 8 + (3 - 1) * 16
NEAR_DILATIONS = (1, 2, 4, 8)


def auto_hop(signal_length: int) -> int:
    """Time decimation: about TARGET_STEPS..2*TARGET_STEPS steps for the head, never below 1."""
    return max(1, signal_length // TARGET_STEPS)


def auto_batch_size(n_train: int) -> int:
    """About ten batches an epoch for small sets, 64 at most: a power of two from 8 to 64."""
    target = max(8, min(64, n_train // 10))
    return 1 << (target.bit_length() - 1)


def epoch_cost(n_train: int, forward_flops: float, batch_size: int = 64, members: int = 1) -> float:
    """FLOPs of one epoch: arithmetic (`forward_flops` covers every member) plus per-step overhead."""
    steps = math.ceil(max(1, n_train) / batch_size)
    return max(1, n_train) * TRAIN_FLOPS_PER_FORWARD * max(forward_flops, 1.0) + steps * members * STEP_OVERHEAD_FLOPS


def auto_epochs(n_train: int, forward_flops: float, batch_size: int = 64, members: int = 1) -> int:
    """Epochs that spend FLOP_BUDGET on `n_train` signals of `forward_flops` each (head only)."""
    per_epoch = epoch_cost(n_train, forward_flops, batch_size, members)
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.floor(FLOP_BUDGET / per_epoch)))


def auto_members(n_train: int, forward_flops: float, batch_size: int = 64) -> int:
    """Ensemble members that fit the budget at MAX_EPOCHS each, 1 to MAX_MEMBERS."""
    one = epoch_cost(n_train, forward_flops, batch_size) * MAX_EPOCHS
    return max(1, min(MAX_MEMBERS, math.floor(FLOP_BUDGET / one)))


def auto_width(n_train: int) -> tuple[tuple[int, int, int, int], int]:
    """conv1..conv4 widths and fc1's: narrow up to SMALL_SET training signals, wide above."""
    return (NARROW_CHANNELS, NARROW_HIDDEN) if n_train <= SMALL_SET else (WIDE_CHANNELS, WIDE_HIDDEN)


Branches = tuple[tuple[int, int, int, int], ...]


def wide_dilations(steps: int) -> tuple[int, int, int, int]:
    """conv1..conv4's dilations whose receptive field (1 + 86 d steps) is about `steps`, d >= 1."""
    unit = max(1, round((steps - 1) / PATTERN_FIELD))
    return tuple(unit * d for d in DILATION_PATTERN)


def auto_dilations(steps: int) -> Branches:
    """Two branches: the wide one (a field about `steps`) and the near one (47 steps)."""
    return (wide_dilations(steps), NEAR_DILATIONS)


def as_branches(dilations) -> Branches:  # noqa: ANN001 - four ints, or a sequence of such
    """Four ints are one branch; a list of such lists is one branch each."""
    values = list(dilations)
    if values and all(isinstance(value, int) for value in values):
        values = [values]
    branches = tuple(tuple(int(d) for d in branch) for branch in values)
    if not branches or any(len(branch) != len(DILATION_PATTERN) or min(branch) < 1 for branch in branches):
        raise CwtopsError(f"train.dilations: four positive ints (conv1..conv4), or a list of such lists "
                          f"(branches that split each conv's channels), got {dilations!r}")
    return branches


def auto_raw_channel(n_train: int) -> bool:
    """`auto`: the raw channel on for small training sets (with the narrow head), off above SMALL_SET."""
    return n_train <= SMALL_SET


def resolve_raw_channel(value: bool | str, n_train: int) -> bool:
    return auto_raw_channel(n_train) if value == AUTO else bool(value)


def auto_val_fraction(class_counts: dict[str, int]) -> float:
    """0 (no carve-out) unless the smallest class has VAL_MIN_PER_CLASS signals to split."""
    return VAL_FRACTION if class_counts and min(class_counts.values()) >= VAL_MIN_PER_CLASS else 0.0


@dataclass(frozen=True)
class TrainSettings:
    """The train stage's resolved settings, and which of them were derived."""

    signal_length: int
    n_train: int
    forward_flops: int  # the head's (every member's), per signal
    hop: int
    members: int
    epochs: int
    batch_size: int
    patience: int
    derived: tuple[str, ...]
    input: str = "memory"  # memory: scalograms computed once; stream: read and transformed per batch
    max_steps: int | None = None  # optimizer steps in all, when capped (train.max_steps)
    channels: tuple[int, int, int, int] = WIDE_CHANNELS  # conv1..conv4 widths
    hidden: int = WIDE_HIDDEN  # fc1 width
    raw_channel: bool = False  # the standardised signal as one more input channel (1-D head)
    dilations: Branches = (DILATION_PATTERN,)  # 1-D head: conv1..conv4's, one tuple per branch

    def summary(self) -> dict:
        values = asdict(self)
        values["derived"] = list(self.derived)
        return values


def resolve(value: int | str, derive, name: str, derived: list[str]) -> int:  # noqa: ANN001 - a zero-arg callable
    if value == AUTO:
        derived.append(name)
        return int(derive())
    return int(value)


def auto_patience(epochs: int, has_val: bool) -> int:
    """Without a validation split nothing can stop a run early: the schedule is the budget."""
    return max(10, epochs // 3) if has_val else epochs


def train_settings(hop: int | str, epochs: int | str, batch_size: int | str, patience: int | str,
                   signal_length: int, n_train: int, has_val: bool = False,
                   forward_flops: Callable[..., float] = lambda hop, channels, hidden: 1e7, members: int | str = 1,
                   input_mode: str = "memory", input_bytes: Callable[[int], int] = lambda hop: 0,
                   max_steps: int | None = None, channels: tuple[int, int, int, int] | str = WIDE_CHANNELS,
                   hidden: int | str = WIDE_HIDDEN, raw_channel: bool | str = False,
                   dilations: tuple | list | str = DILATION_PATTERN) -> TrainSettings:
    """Resolve every `auto` among the train stage's settings from the data's shape.

    `forward_flops(hop, channels, hidden)` is one head's forward cost per signal (`head_flops`);
    `input_bytes(hop)` is what this process would hold to keep every scalogram in memory.
    """
    derived: list[str] = []
    resolved_hop = resolve(hop, lambda: auto_hop(signal_length), "parse.hop", derived)
    width_channels, width_hidden = auto_width(n_train)
    if channels == AUTO:
        derived.append("train.channels")
    resolved_channels = width_channels if channels == AUTO else tuple(channels)
    resolved_hidden = resolve(hidden, lambda: width_hidden, "train.hidden", derived)
    if raw_channel == AUTO:
        derived.append("train.raw_channel")
    resolved_raw = resolve_raw_channel(raw_channel, n_train)
    if dilations == AUTO:
        derived.append("train.dilations")
    steps = -(-signal_length // resolved_hop)
    resolved_dilations = auto_dilations(steps) if dilations == AUTO else as_branches(dilations)
    flops = forward_flops(resolved_hop, resolved_channels, resolved_hidden)
    resolved_batch = resolve(batch_size, lambda: auto_batch_size(n_train), "train.batch_size", derived)
    resolved_members = resolve(members, lambda: auto_members(n_train, flops, resolved_batch), "train.members", derived)
    flops *= resolved_members
    resolved_epochs = resolve(epochs, lambda: auto_epochs(n_train, flops, resolved_batch, resolved_members),
                              "train.epochs", derived)
    resolved_patience = resolve(patience, lambda: auto_patience(resolved_epochs, has_val), "train.patience", derived)
    resolved_input = input_mode
    if input_mode == AUTO:
        derived.append("train.input")
        resolved_input = "memory" if input_bytes(resolved_hop) <= MEMORY_INPUT_BYTES else "stream"
    return TrainSettings(signal_length, n_train, int(flops), resolved_hop, resolved_members, resolved_epochs,
                         resolved_batch, resolved_patience, tuple(derived), resolved_input, max_steps,
                         resolved_channels, resolved_hidden, resolved_raw, resolved_dilations)

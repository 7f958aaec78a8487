"""Stage `train`: fit the head on frozen scalograms, keep the best epoch.

AdamW + a one-cycle cosine schedule, shift and time-stretch (and optional mixup) augmentation on the scalogram,
seeded, resumable from the last epoch. The schedule, hop and validation policy follow the data
(`auto` in params.yaml, cwtops/core/derived.py). With a validation split the best epoch is chosen by
validation macro-F1 (early stopping after `patience` epochs without a gain); without one, every
training signal is used and the epoch with the lowest training loss is kept.
The front-end is frozen, so for a set whose scalograms fit in memory they are computed once and
the head trains from memory; a larger set streams (`train.input`): each batch is read from the
raw shards (positioned reads) and sent through the front-end, so memory stays flat in the number of
signals, and under torchrun each rank reads only its share of every batch.
On CUDA: bf16/fp16 autocast, TF32, cudnn.benchmark, pinned host memory. On every device the head
trains in channels_last layout (oneDNN's fast path on CPU: about 2x per step, same float32 maths).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError
from torch import nn
from tqdm import tqdm

from cwtops.core.artifacts import atomic_path, save_torch, sha256_file, write_json
from cwtops.core.config import BaseConfig, TrainConfig
from cwtops.core.derived import WIDE_CHANNELS, WIDE_HIDDEN, TrainSettings, resolve_raw_channel, train_settings
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import ArtifactPaths, artifact_paths
from cwtops.data.signals import SignalReader, load_signals, read_manifest
from cwtops.model.distributed import SINGLE_PROCESS, World, close_world, init_world, shard, sync_buffers, threads_per_rank, wrap_head
from cwtops.model.network import (
    DILATIONS_1D, HybridCWTNet, ModelArgs, checkpoint_dict, head_flops, trainable_parameters, with_member_inputs,
)
from cwtops.monitoring.features import build_reference, features_in_chunks
from tasks.parse import load_filter_bank

log = logging.getLogger(__name__)
SAVE_SECONDS = 0.0  # every epoch: a killed run resumes from its last finished epoch
# seconds: the epoch; fit_seconds: its training pass alone (no validation); steps: optimizer steps in it
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds", "fit_seconds", "steps"]


@dataclass(frozen=True)
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_macro_f1: float
    seconds: float
    device: str
    resumed_from: int
    checkpoint: Path


@dataclass
class Split:
    """A split held in memory: every scalogram computed once."""

    scalograms: torch.Tensor  # (N, S, T) on the training device: the heads' input
    labels: torch.Tensor  # (N,)
    quantiles: torch.Tensor | None = None  # (N, F): the quantile member's input, once per signal (None: off)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for picked in index_batches:
            picked = picked.to(self.labels.device)
            quantiles = None if self.quantiles is None else self.quantiles[picked]
            yield with_member_inputs(self.scalograms[picked], quantiles), self.labels[picked]


class _BatchReads(torch.utils.data.Dataset):
    """Item i is the i-th batch's raw signals (a DataLoader with workers reads batches ahead)."""

    def __init__(self, reader: SignalReader, index_batches: list[torch.Tensor]) -> None:
        self.reader, self.index_batches = reader, index_batches

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.reader.read(self.index_batches[i].numpy()))


class StreamSplit:
    """A split read per batch: raw signals from the shards (`SignalReader`), then the frozen
    front-end. Memory holds one batch (a few batches with DataLoader workers), at any split size;
    under torchrun each rank reads only its share of every batch."""

    def __init__(self, model: HybridCWTNet, reader: SignalReader, labels: torch.Tensor, device: torch.device,
                 num_workers: int = 0) -> None:
        self.model, self.reader, self.labels, self.device, self.num_workers = model, reader, labels, device, num_workers

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, index_batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # batch_size=None: each item already is a batch. Its own generator: iterating must not draw
        # from the global RNG, which seeds dropout (a streamed epoch equals an in-memory one).
        loader = torch.utils.data.DataLoader(
            _BatchReads(self.reader, index_batches), batch_size=None, shuffle=False, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", generator=torch.Generator(),
            prefetch_factor=2 if self.num_workers else None, persistent_workers=False,
        )
        for picked, signals in zip(index_batches, loader):
            with torch.no_grad():
                scalograms = self.model.scalogram(signals.unsqueeze(1).to(self.device, non_blocking=True))
            yield scalograms, self.labels[picked.to(self.labels.device)]


Data = Split | StreamSplit


def select_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise CwtopsError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def configure_backend(cfg: TrainConfig, device: torch.device, world: World = SINGLE_PROCESS) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:  # torchrun's processes share the cores
        torch.set_num_threads(cfg.threads or threads_per_rank(os.cpu_count() or 1, world))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def compute_scalograms(
    model: HybridCWTNet, signals: np.ndarray | SignalReader, device: torch.device, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen front-end, run once per signal: (N, L) -> the heads' input (N, S, T) and the quantile
    member's (N, F) (None when off) on `device`, each written into one preallocated tensor (no second
    copy while they are gathered; the member's inputs once per signal, not once per time step)."""
    model.eval()
    out: torch.Tensor | None = None
    member: torch.Tensor | None = None
    for start in range(0, len(signals), batch_size):
        stop = min(start + batch_size, len(signals))
        rows = signals.read(np.arange(start, stop)) if isinstance(signals, SignalReader) else signals[start:stop]
        batch = torch.from_numpy(rows).unsqueeze(1)
        if device.type == "cuda":
            batch = batch.pin_memory()
        scalograms, quantiles = model.scalogram_parts(batch.to(device, non_blocking=True))
        if out is None:
            out = torch.empty((len(signals), *scalograms.shape[1:]), dtype=scalograms.dtype, device=device)
            if quantiles is not None:
                member = torch.empty((len(signals), quantiles.shape[1]), dtype=quantiles.dtype, device=device)
        out[start:stop] = scalograms
        if member is not None:
            member[start:stop] = quantiles
    return out, member


def load_split(
    model: HybridCWTNet, manifest: pd.DataFrame, split: str, raw_dir: Path, classes: list[str], device: torch.device,
    input_mode: str = "memory", signal_length: int | None = None, num_workers: int = 0,
) -> Data:
    """One split of the manifest, held in memory or streamed (`train.input`). Every file it lists
    is opened and checked first, so a damaged shard stops the stage before any training."""
    rows = manifest[manifest.split == split]
    if rows.empty:
        raise CwtopsError(f"split manifest has no '{split}' rows; check the balance stage's fractions")
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor(rows.label.map(index).to_numpy(dtype=np.int64), device=device)
    length = signal_length or int(load_signals(rows.head(1), raw_dir).shape[1])
    reader = SignalReader(rows, raw_dir, length)
    reader.check()
    if input_mode == "stream":
        return StreamSplit(model, reader, labels, device, num_workers)
    scalograms, quantiles = compute_scalograms(model, reader, device)
    return Split(scalograms, labels, quantiles)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, world: World = SINGLE_PROCESS,
                  limit: int | None = None) -> list[torch.Tensor]:
    """This rank's indices for each step of an epoch: one seeded order of all `n` signals, cut
    into global batches of `batch_size`, each rank taking its interleaved share (disjoint across
    ranks, together the whole batch). At most `limit` steps."""
    order = torch.randperm(n, generator=generator)
    batches = []
    for start in range(0, n, batch_size):
        picked = order[start : start + batch_size]
        if len(picked) < 2 * world.size:  # BatchNorm cannot train on a single sample per rank
            continue
        batches.append(shard(picked, world))
    return batches[:limit] if limit is not None else batches


def augment_in_time(batch: torch.Tensor, max_share: float, generator: torch.Generator, max_warp: float = 0.0) -> torch.Tensor:
    """Each scalogram moved by its own random number of steps (edges repeated), and with `max_warp`
    also stretched or squeezed about its centre by its own factor in [1 - max_warp, 1 + max_warp]
    (linear interpolation between neighbouring steps): (B, S, T)."""
    length = batch.shape[-1]
    steps = int(max_share * length)
    if steps < 1 and max_warp <= 0:
        return batch
    offsets = torch.randint(-steps, steps + 1, (batch.shape[0], 1), generator=generator).to(batch.device)
    if max_warp <= 0:
        index = (torch.arange(length, device=batch.device) - offsets).clamp_(0, length - 1)
        return batch.gather(-1, index.unsqueeze(1).expand(-1, batch.shape[1], -1))
    factors = 1 + (2 * torch.rand((batch.shape[0], 1), generator=generator) - 1) * max_warp
    centre = (length - 1) / 2
    times = torch.arange(length, dtype=torch.float32, device=batch.device)
    position = (centre + (times - centre) * factors.to(batch.device) - offsets).clamp_(0, length - 1)
    low = position.floor().long()
    high = (low + 1).clamp_(max=length - 1)
    weight = (position - low).unsqueeze(1).to(batch.dtype)
    channels = batch.shape[1]
    below = batch.gather(-1, low.unsqueeze(1).expand(-1, channels, -1))
    above = batch.gather(-1, high.unsqueeze(1).expand(-1, channels, -1))
    return torch.lerp(below, above, weight)


def batch_loss(
    head: Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]],
    scalograms: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Augmented batch through the head; an ensemble's loss is the sum of its members' losses."""
    scalograms = augment_in_time(scalograms, cfg.shift, generator, cfg.warp)
    partner, weight = labels, 1.0
    if cfg.mixup > 0:
        weight = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())  # seeded per epoch
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        scalograms, partner = weight * scalograms + (1 - weight) * scalograms[order], labels[order]
    outputs = head(scalograms)
    members = outputs if isinstance(outputs, list) else [outputs]
    return sum(weight * loss_fn(out, labels) + (1 - weight) * loss_fn(out, partner) for out in members)


def train_one_epoch(
    model: HybridCWTNet,
    data: Data,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    batch_size: int,
    world: World = SINGLE_PROCESS,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_steps: int | None = None,
) -> tuple[float, int]:
    """One pass over the training split (at most `max_steps` steps): (mean training loss, per
    member for ensembles; optimizer steps taken)."""
    model.train()
    head = head or wrap_head(model, world)  # DDP under torchrun: gradients averaged over the ranks
    index_batches = epoch_batches(len(data), batch_size, generator, world, max_steps)
    total, seen = 0.0, 0
    channels = model.args.input_channels  # the heads' channels: the quantile member's ride in the cache, not here
    for scalograms, labels in data.batches(index_batches):
        with torch.autocast(labels.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = batch_loss(head, scalograms[:, :channels], labels, loss_fn, cfg, generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(labels) / model.args.members
        seen += len(labels)
    return total / max(seen, 1), len(index_batches)


def accumulate_average(state: TrainState, weights: dict[str, torch.Tensor]) -> None:
    """Fold this epoch's weights into the running mean (`state.averaged` counts this epoch)."""
    if state.average_state is None:
        state.average_state = {k: v.detach().clone() for k, v in weights.items()}
        return
    for key, value in weights.items():
        if value.is_floating_point():
            target = state.average_state[key]
            target.lerp_(value.detach().to(target.device), 1 / state.averaged)


@torch.no_grad()
def recompute_batchnorm(model: HybridCWTNet, data: Data, batch_size: int, amp_dtype: torch.dtype | None = None) -> None:
    """BatchNorm statistics for averaged weights: the running means of the epochs' weights are not
    the statistics of the mean weights' activations. One pass over the training split (no
    augmentation, seeded order) with every norm's statistics reset and accumulated as a plain mean."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
    model.train()
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    try:
        for scalograms, _ in data.batches(epoch_batches(len(data), batch_size, generator)):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                model.training_head(scalograms)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()


def macro_f1(confusion: np.ndarray) -> float:
    """Macro-F1 from a confusion matrix (rows: truth), averaged over the classes that occur in the
    truth or the predictions, a class without true or predicted positives scoring 0 (as sklearn's
    f1_score(average='macro', zero_division=0))."""
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (support + predicted) > 0
    denominator = support + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1[present].mean()) if present.any() else 0.0


@torch.no_grad()
def evaluate_split(model: HybridCWTNet, data: Data, loss_fn: nn.Module, batch_size: int,
                   world: World = SINGLE_PROCESS) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of the head on a split. Under torchrun each rank scores its
    share and the ranks sum their confusion matrices and losses: every rank gets the whole split's
    figures, and no rank reads all of it."""
    model.eval()
    n_classes = model.args.n_classes
    confusion = torch.zeros(n_classes * n_classes, dtype=torch.float64, device=data.labels.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=data.labels.device)
    positions = shard(torch.arange(len(data)), world)
    chunks = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    smoothing = getattr(loss_fn, "label_smoothing", 0.0)
    for scalograms, labels in data.batches(chunks):
        logits = model.members_head(scalograms).float()  # the quantile member is fitted after training
        # summed here, divided by the whole split's size below
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum", label_smoothing=smoothing).double()
        confusion += torch.bincount(labels * n_classes + logits.argmax(1), minlength=n_classes**2).double()
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
    matrix = confusion.cpu().numpy().reshape(n_classes, n_classes)
    return {
        "val_loss": float(loss_sum.item() / max(len(data), 1)),
        "val_accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
        "val_macro_f1": macro_f1(matrix),
    }


def _fingerprint(cfg: TrainConfig, paths: ArtifactPaths, settings: TrainSettings) -> str:
    """What a resumable checkpoint must match: the data split, the filter bank and its front-end
    settings, the train params."""
    return "|".join(
        [sha256_file(paths.split_manifest), sha256_file(paths.filter_bank), sha256_file(paths.filter_bank_summary),
         cfg.model_dump_json(), json.dumps(settings.summary(), sort_keys=True)]
    )


@dataclass(frozen=True)
class FrontEnd:
    """The scalogram the head sees, as the parse stage resolved it (params section `parse`)."""

    hop: int
    hop_derived: bool
    magnitude: str
    decimate: str = "sample"  # parse.decimate; summaries from before it was a setting sampled


def read_front_end(paths: ArtifactPaths) -> FrontEnd:
    summary = json.loads(paths.filter_bank_summary.read_text())
    try:
        return FrontEnd(int(summary["hop"]), bool(summary["hop_derived"]), str(summary["magnitude"]),
                        str(summary.get("decimate", "sample")))
    except KeyError:
        raise CwtopsError(f"{paths.filter_bank_summary}: written by an older parse stage (no hop or magnitude); "
                          "run `dvc repro parse` (or `cwtops stage parse`) again") from None


@dataclass
class TrainState:
    model: HybridCWTNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    history: list[dict]
    best_state: dict
    best_f1: float = -1.0
    best_loss: float = float("inf")  # breaks ties: a small validation set saturates macro-F1 early
    best_epoch: int = 0
    stale_epochs: int = 0
    next_epoch: int = 1
    average_state: dict | None = None  # running mean of the weights over the averaged epochs
    averaged: int = 0  # epochs in it
    quantile_fit: dict | None = None  # the quantile member's L-BFGS fit (train.quantiles), after selection


def _save_resume_point(state: TrainState, path: Path, fingerprint: str) -> None:
    payload = {
        "fingerprint": fingerprint,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "history": state.history,
        "best_state": state.best_state,
        "best_f1": state.best_f1,
        "best_loss": state.best_loss,
        "best_epoch": state.best_epoch,
        "stale_epochs": state.stale_epochs,
        "next_epoch": state.next_epoch,
        "average_state": state.average_state,
        "averaged": state.averaged,
    }
    save_torch(path, payload)


def _try_resume(state: TrainState, path: Path, fingerprint: str) -> int:
    """Continue an interrupted run when its checkpoint matches this configuration."""
    if not path.exists():
        return 0
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a resume point is a convenience: a corrupt one is set aside
        log.warning("ignoring unreadable resume checkpoint %s (%s)", path, error)
        return 0
    if saved.get("fingerprint") != fingerprint:
        log.info("resume checkpoint %s belongs to other data or params; starting afresh", path)
        return 0
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.history, state.best_state = list(saved["history"]), saved["best_state"]
    state.best_f1, state.best_epoch = float(saved["best_f1"]), int(saved["best_epoch"])
    state.best_loss = float(saved.get("best_loss", float("inf")))
    state.stale_epochs, state.next_epoch = int(saved["stale_epochs"]), int(saved["next_epoch"])
    state.average_state, state.averaged = saved.get("average_state"), int(saved.get("averaged", 0))
    return state.next_epoch - 1


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history, columns=HISTORY_COLUMNS).to_csv(tmp, index=False)


def apply_tuned(cfg: TrainConfig, chosen: Path) -> tuple[TrainConfig, dict]:
    """params.yaml's train section with the tune stage's choices in place of the keys it searched
    (its `params`; none when the search is off or the file is absent, as for `cwtops stage train` alone)."""
    if not chosen.exists():
        return cfg, {}
    try:
        tuned = dict(json.loads(chosen.read_text()).get("params") or {})
    except (json.JSONDecodeError, AttributeError) as error:
        raise CwtopsError(f"{chosen}: not the tune stage's output ({error}); run `dvc repro tune` again") from None
    if not tuned:
        return cfg, {}
    try:
        return TrainConfig.model_validate(cfg.model_dump() | tuned), tuned
    except ValidationError as error:
        problems = "; ".join(f"train.{'.'.join(map(str, item['loc']))}: {item['msg']} (got {item.get('input')!r})"
                             for item in error.errors())
        raise CwtopsError(f"{chosen}: not valid train settings ({problems}); run `dvc repro tune` again") from None


def model_args(cfg: TrainConfig, magnitude: str, n_filters: int, kernel_size: int, n_classes: int, signal_length: int,
               hop: int, members: int = 1, channels: tuple[int, int, int, int] = WIDE_CHANNELS,
               hidden: int = WIDE_HIDDEN, raw_channel: bool = False, decimate: str = "sample",
               dilations: tuple = (DILATIONS_1D,)) -> ModelArgs:
    """The head's shape: params.yaml's settings with the resolved (`auto`) values passed in."""
    return ModelArgs(
        n_filters=n_filters,
        kernel_size=kernel_size,
        n_classes=n_classes,
        signal_length=signal_length,
        hop=hop,
        magnitude=magnitude,
        channels=channels,
        hidden=hidden,
        dropout=cfg.dropout,
        stem=cfg.stem,
        head=cfg.head,
        members=members,
        raw_channel=raw_channel and cfg.head == "1d",
        decimate=decimate,
        dilations=dilations,
        gain=cfg.gain and cfg.head == "1d",
        quantiles=cfg.quantiles if cfg.head == "1d" else 0,
        quantile_weight=cfg.quantile_weight,
        quantile_lags=tuple(cfg.quantile_lags),
        quantile_bins=cfg.quantile_bins,
    )


def new_model(cfg: TrainConfig, seed: int, front: FrontEnd, matrix: torch.Tensor, n_classes: int, signal_length: int,
           settings: TrainSettings, device: torch.device) -> HybridCWTNet:
    args = model_args(cfg, front.magnitude, matrix.shape[0], matrix.shape[1], n_classes, signal_length, settings.hop,
                      settings.members, settings.channels, settings.hidden, settings.raw_channel, front.decimate,
                      settings.dilations)
    torch.manual_seed(seed)
    return training_layout(HybridCWTNet(args, matrix).to(device))


def training_layout(model: HybridCWTNet) -> HybridCWTNet:
    """channels_last weights: the 2-D head's convolutions take the NHWC fast path on CPU and GPU
    (the 1-D head's 3-D weights are left as they are)."""
    return model.to(memory_format=torch.channels_last)


def resolve_settings(cfg: TrainConfig, front: FrontEnd, manifest: pd.DataFrame, signal_length: int,
                     bank_shape: tuple[int, int], n_classes: int) -> TrainSettings:
    """Epochs, batch size, patience, width and input: params.yaml's values, `auto` ones from the data
    (hop as the parse stage resolved it)."""
    n_train = int((manifest.split == "train").sum())
    has_val = bool((manifest.split == "val").any())

    raw_channel = resolve_raw_channel(cfg.raw_channel, n_train)

    def forward_flops(hop: int, channels: tuple[int, int, int, int], hidden: int) -> float:
        flops = head_flops(model_args(cfg, front.magnitude, *bank_shape, n_classes, signal_length, hop, channels=channels,
                                      hidden=hidden, raw_channel=raw_channel))
        return float(sum(value for layer, value in flops.items() if layer != "frontend"))

    def input_bytes(hop: int) -> int:  # every train and val scalogram as float32, in this process
        n_signals = int(manifest.split.isin(["train", "val"]).sum())
        return n_signals * bank_shape[0] * -(-signal_length // hop) * 4

    members = cfg.members if cfg.head == "1d" else 1  # the 2-D head trains alone
    settings = train_settings(front.hop, cfg.epochs, cfg.batch_size, cfg.patience, signal_length, n_train, has_val,
                              forward_flops, members, cfg.input, input_bytes, cfg.max_steps, cfg.channels, cfg.hidden,
                              cfg.raw_channel if cfg.head == "1d" else False, cfg.dilations)
    return replace(settings, derived=("parse.hop", *settings.derived)) if front.hop_derived else settings


def run(cfg: TrainConfig, base: BaseConfig) -> TrainResult:
    """Train the head; write the best checkpoint, the per-epoch history and a summary."""
    started = time.perf_counter()
    paths = artifact_paths(base)
    cfg, tuned = apply_tuned(cfg, paths.tune_chosen)
    device = select_device(cfg)
    world = init_world(device.type == "cuda")
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    configure_backend(cfg, device, world)
    manifest = read_manifest(paths.split_manifest)
    classes = sorted(manifest.loc[manifest.split == "train", "label"].unique())
    raw_dir = Path(base.raw_dir)
    signal_length = int(load_signals(manifest.head(1), raw_dir).shape[1])
    matrix, _, _ = load_filter_bank(paths.filter_bank)
    front = read_front_end(paths)
    settings = resolve_settings(cfg, front, manifest, signal_length, tuple(matrix.shape), len(classes))
    model = new_model(cfg, base.seed, front, matrix, len(classes), signal_length, settings, device)
    log.info("training input: %s (train.input: %s)", settings.input, cfg.input)
    reading = {"model": model, "manifest": manifest, "raw_dir": raw_dir, "classes": classes, "device": device,
               "input_mode": settings.input, "signal_length": signal_length, "num_workers": cfg.num_workers}
    tick = time.perf_counter()
    train = load_split(split="train", **reading)
    load_seconds = {"train": time.perf_counter() - tick}  # the in-memory input's front-end pass, or the file checks
    val = load_split(split="val", **reading) if (manifest.split == "val").any() else None
    load_seconds["val"] = time.perf_counter() - tick - load_seconds["train"]

    amp_dtype = autocast_dtype(cfg, device)
    state = new_state(cfg, model, settings, len(train), device, amp_dtype)
    fingerprint = _fingerprint(cfg, paths, settings)
    resumed_from = _try_resume(state, paths.last_checkpoint, fingerprint)
    if resumed_from:
        log.info("resuming from epoch %d (%s)", resumed_from, paths.last_checkpoint)
        print(f"resuming from epoch {resumed_from} ({paths.last_checkpoint})", flush=True)

    train_epochs(state, train, val, cfg, base.seed, settings, paths, amp_dtype, fingerprint, world)
    keep_selected(state, train, settings, amp_dtype)
    if world.is_main:
        write_drift_reference(manifest, raw_dir, signal_length, paths.drift_reference)
        ran_with = {"base": {"seed": base.seed}, "train": cfg.model_dump(mode="json"), "parse": asdict(front)}
        _write_outputs(state, ran_with, settings, paths, classes, device, started, resumed_from, world, val is not None,
                       load_seconds, tuned)
        paths.last_checkpoint.unlink(missing_ok=True)  # finished: the next run starts afresh
    close_world(world)
    return TrainResult(
        epochs_run=len(state.history),
        best_epoch=state.best_epoch,
        best_val_macro_f1=state.best_f1,
        seconds=time.perf_counter() - started,
        device=str(device),
        resumed_from=resumed_from,
        checkpoint=paths.model,
    )


def new_state(cfg: TrainConfig, model: HybridCWTNet, settings: TrainSettings, n_train: int, device: torch.device,
              amp_dtype: torch.dtype | None) -> TrainState:
    """AdamW and the one-cycle schedule over the resolved epochs (or `max_steps`), before epoch 1."""
    # fused: one kernel for every parameter's update (the head has ~30 tensors; per-tensor updates
    # dominate a step on small batches)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps = settings.epochs * max(1, n_train // settings.batch_size + 1)
    steps = min(steps, settings.max_steps or steps)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return TrainState(model, optimizer, scheduler, scaler, [], model.state_dict())


def fit_quantile_member(model: HybridCWTNet, data: Data, batch_size: int = 256) -> dict | None:
    """Fit the quantile member (`train.quantiles`) on the training split's quantiles, after the members
    are trained and selected: a logistic regression by L-BFGS (cwtops/model/network.py). None when off."""
    if model.args.head != "1d" or not model.args.quantiles:
        return None
    if isinstance(data, Split) and data.quantiles is not None:  # the cache holds them once per signal
        return model.quantile_member.fit(data.quantiles.float().cpu(), data.labels.cpu())
    model.eval()
    positions = torch.arange(len(data))
    chunks = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    features, labels = [], []
    with torch.no_grad():
        for scalograms, batch_labels in data.batches(chunks):  # the quantiles ride along as constant channels
            features.append(scalograms[:, model.args.input_channels :, 0].float().cpu())
            labels.append(batch_labels.cpu())
    return model.quantile_member.fit(torch.cat(features), torch.cat(labels))


def keep_selected(state: TrainState, train: Data, settings: TrainSettings, amp_dtype: torch.dtype | None) -> None:
    """Load the checkpoint the run selected into the model: the best epoch, or with `train.average`
    the mean weights with their own BatchNorm statistics."""
    model = state.model
    if state.average_state is not None:
        model.load_state_dict(state.average_state)
        recompute_batchnorm(model, train, settings.batch_size, amp_dtype)
        state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state.best_epoch = len(state.history)
    model.load_state_dict(state.best_state)
    state.quantile_fit = fit_quantile_member(model, train, settings.batch_size)


def train_epochs(
    state: TrainState,
    train: Data,
    val: Data | None,
    cfg: TrainConfig,
    seed: int,
    settings: TrainSettings,
    paths: ArtifactPaths | None,
    amp_dtype: torch.dtype | None,
    fingerprint: str,
    world: World = SINGLE_PROCESS,
    progress: bool = True,
) -> None:
    """The epochs left. With `paths`, a resume point and the history after every epoch (the tune
    stage's fits pass none: they are not resumed, a whole trial is)."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    head = wrap_head(state.model, world)  # built once: DDP broadcasts the parameters when it is made
    last_save = -float("inf")
    epochs = tqdm(range(state.next_epoch, settings.epochs + 1), desc="train", unit="epoch", initial=state.next_epoch - 1,
                  total=settings.epochs, disable=not (world.is_main and progress))
    for epoch in epochs:
        steps_left = None if settings.max_steps is None else settings.max_steps - state.scheduler.last_epoch
        if state.stale_epochs >= settings.patience or (steps_left is not None and steps_left <= 0):
            break
        tick = time.perf_counter()
        # Seeded per epoch, so a resumed run draws the same batches, augmentations and dropout masks.
        torch.manual_seed(seed + epoch)
        generator = torch.Generator().manual_seed(seed + epoch)
        train_loss, steps = train_one_epoch(
            state.model, train, state.optimizer, state.scheduler, loss_fn, cfg, generator, amp_dtype, state.scaler,
            settings.batch_size, world, head, steps_left,
        )
        fit_seconds = time.perf_counter() - tick
        sync_buffers(state.model, world)  # every rank now evaluates rank 0's model: same decisions everywhere
        nothing = {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_macro_f1": float("nan")}
        scores = evaluate_split(state.model, val, loss_fn, 256, world) if val else nothing
        row = {"epoch": epoch, "train_loss": train_loss, **scores}
        row["lr"] = state.optimizer.param_groups[0]["lr"]
        row |= {"seconds": time.perf_counter() - tick, "fit_seconds": fit_seconds, "steps": steps}
        state.history.append(row)
        # With a validation split: best macro-F1, ties to the lower loss. Without: the lowest training loss.
        better = ((row["val_macro_f1"], -row["val_loss"]) > (state.best_f1, -state.best_loss) if val
                  else train_loss < state.best_loss)
        if better:
            state.best_f1 = row["val_macro_f1"] if val else float("nan")
            state.best_loss, state.best_epoch, state.stale_epochs = row["val_loss"] if val else train_loss, epoch, 0
            state.best_state = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        else:
            state.stale_epochs += 1
        if val is None and cfg.average > 0 and epoch > settings.epochs * (1 - cfg.average):
            state.averaged += 1
            accumulate_average(state, state.model.state_dict())
        state.next_epoch = epoch + 1
        # A resume point, then the history it covers (so history on disk implies a resume point).
        if paths is not None and world.is_main and time.perf_counter() - last_save >= SAVE_SECONDS:
            _save_resume_point(state, paths.last_checkpoint, fingerprint)
            _write_history(paths.history, state.history)
            last_save = time.perf_counter()
        epochs.set_postfix(loss=f"{train_loss:.3f}", **({"val_f1": f"{row['val_macro_f1']:.3f}"} if val else {}))


def _write_outputs(
    state: TrainState,
    ran_with: dict,
    settings: TrainSettings,
    paths: ArtifactPaths,
    classes: list[str],
    device: torch.device,
    started: float,
    resumed_from: int,
    world: World = SINGLE_PROCESS,
    validated: bool = True,
    load_seconds: dict[str, float] | None = None,
    tuned: dict | None = None,
) -> None:
    bank_sha = load_json_sha(paths)
    model = state.model.to("cpu").to(memory_format=torch.contiguous_format)
    best_f1 = state.best_f1 if validated else None
    checkpoint = checkpoint_dict(
        model,
        classes,
        bank_sha,
        ran_with,
        epoch=state.best_epoch,
        best_val_macro_f1=best_f1,
        settings=settings.summary(),
    )
    save_torch(paths.model, checkpoint)
    _write_history(paths.history, state.history)
    write_json(
        paths.train_summary,
        {
            "epochs_run": len(state.history),
            "best_epoch": state.best_epoch,
            "best_val_macro_f1": best_f1,
            # how the checkpoint was chosen: validation macro-F1, or without a carve-out the training loss
            # or (train.average) the mean of the last epochs' weights
            "selected_by": "val_macro_f1" if validated else "average" if state.averaged else "train_loss",
            "averaged_epochs": state.averaged,
            "tuned": tuned or {},  # train settings the tune stage chose (they replaced params.yaml's)
            "best_loss": state.best_loss,
            "settings": settings.summary(),
            # the members' (AdamW) and the quantile member's linear layer (L-BFGS)
            "parameters": sum(p.numel() for p in trainable_parameters(model))
            + (sum(p.numel() for p in model.quantile_member.fc.parameters()) if model.args.quantiles else 0),
            "quantile_member": state.quantile_fit,
            "seconds": time.perf_counter() - started,
            "load_seconds": load_seconds or {},
            "device": str(device),
            "resumed_from": resumed_from,
            "world_size": world.size,
            "classes": classes,
        },
    )


def write_drift_reference(manifest: pd.DataFrame, raw_dir: Path, signal_length: int, path: Path, chunk: int = 1024) -> None:
    """The training signals' input statistics, which the drift pass compares served signals with
    (read in chunks: memory stays flat at any number of signals)."""
    rows = manifest[manifest.split == "train"]
    reader = SignalReader(rows, raw_dir, signal_length)
    chunks = (reader.read(np.arange(start, min(start + chunk, len(rows)))) for start in range(0, len(rows), chunk))
    write_json(path, build_reference(features_in_chunks(chunks)))


def load_json_sha(paths: ArtifactPaths) -> str:
    return json.loads(paths.filter_bank_summary.read_text())["sha256"]

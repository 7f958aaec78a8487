"""Streaming training input (`train.input: stream`): the same epoch as the in-memory path, each
rank reading only its share, damaged shards refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cwtops.core import derived
from cwtops.data.signals import DataError, SignalReader, read_manifest
from cwtops.model.distributed import World
from tasks import parse, train
from tests.conftest import staged_params

LENGTH = 256


@pytest.fixture()
def small_stage_params(tmp_path: Path):
    """A tiny project in `tmp_path`: 200 signals of 256 samples in shards of 16, 1-epoch training."""
    return staged_params(tmp_path, 200, LENGTH, seed=3, val_fraction=0.2, epochs=1, patience=1, batch_size=16, members=1,
                         channels=[8, 8, 8, 8], hidden=8)


def _first_epoch(params, input_mode: str, world: World = train.SINGLE_PROCESS) -> float:
    """Mean training loss of one epoch from the same seeded start, through the chosen input."""
    paths = train.artifact_paths(params.base)
    manifest = read_manifest(paths.split_manifest)
    classes = sorted(manifest.loc[manifest.split == "train", "label"].unique())
    matrix, _, _ = parse.load_filter_bank(paths.filter_bank)
    front = train.read_front_end(paths)
    settings = train.resolve_settings(params.train, front, manifest, LENGTH, tuple(matrix.shape), len(classes))
    device = torch.device("cpu")
    model = train.new_model(params.train, params.base.seed, front, matrix, len(classes), LENGTH, settings, device)
    data = train.load_split(model, manifest, "train", Path(params.base.raw_dir), classes, device, input_mode, LENGTH)
    optimizer = torch.optim.AdamW(train.trainable_parameters(model), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=100)
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(7)
    loss, steps = train.train_one_epoch(model, data, optimizer, scheduler, torch.nn.CrossEntropyLoss(), params.train,
                                        generator, None, torch.amp.GradScaler("cpu", enabled=False), 16, world)
    assert steps == -(-len(data) // 16)
    return loss


def test_streamed_epoch_equals_the_in_memory_epoch(small_stage_params) -> None:
    # Same order, same augmentation draws, same dropout masks: only the front-end runs per batch of
    # 16 instead of 256, where oneDNN may sum in another order (float32 rounding, ~1e-7 relative).
    params = small_stage_params()
    in_memory, streamed = _first_epoch(params, "memory"), _first_epoch(params, "stream")
    assert np.isfinite(in_memory)
    assert streamed == pytest.approx(in_memory, rel=1e-5, abs=1e-6)


def test_stream_stage_writes_what_the_memory_stage_writes(small_stage_params) -> None:
    memory_params = small_stage_params(input="memory")
    train.run(memory_params.train, memory_params.base)
    paths = train.artifact_paths(memory_params.base)
    remembered = pd.read_csv(paths.history)
    summary = json.loads(paths.train_summary.read_text())
    assert summary["settings"]["input"] == "memory"
    stream_params = small_stage_params(input="stream")
    train.run(stream_params.train, stream_params.base)
    streamed = pd.read_csv(paths.history)
    assert json.loads(paths.train_summary.read_text())["settings"]["input"] == "stream"
    for column in ("train_loss", "val_loss", "val_macro_f1", "val_accuracy"):
        assert streamed[column].to_numpy() == pytest.approx(remembered[column].to_numpy(), rel=1e-4, abs=1e-5), column


def test_auto_input_streams_only_what_does_not_fit(small_stage_params, monkeypatch: pytest.MonkeyPatch) -> None:
    params = small_stage_params(input="auto")
    paths = train.artifact_paths(params.base)
    manifest = read_manifest(paths.split_manifest)
    n = int(manifest.split.isin(["train", "val"]).sum())
    bytes_needed = n * 112 * LENGTH * 4  # 112 filters, hop 1 (auto at 256 samples)
    monkeypatch.setattr(derived, "MEMORY_INPUT_BYTES", bytes_needed)
    front = train.read_front_end(paths)
    settings = train.resolve_settings(params.train, front, manifest, LENGTH, (112, 129), 5)
    assert (settings.input, "train.input" in settings.derived) == ("memory", True)
    monkeypatch.setattr(derived, "MEMORY_INPUT_BYTES", bytes_needed - 1)
    assert train.resolve_settings(params.train, front, manifest, LENGTH, (112, 129), 5).input == "stream"
    explicit = small_stage_params(input="memory")
    assert train.resolve_settings(explicit.train, front, manifest, LENGTH, (112, 129), 5).input == "memory"


def test_max_steps_caps_the_run(small_stage_params) -> None:
    params = small_stage_params(epochs=5, patience=5, max_steps=3, input="stream")
    result = train.run(params.train, params.base)
    summary = json.loads(train.artifact_paths(params.base).train_summary.read_text())
    assert result.epochs_run == 1 and summary["settings"]["max_steps"] == 3


def test_two_ranks_read_disjoint_shares_that_cover_each_batch(small_stage_params, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[int, list[np.ndarray]] = {0: [], 1: []}
    for rank in (0, 1):
        batches = train.epoch_batches(203, 16, torch.Generator().manual_seed(5), World(rank, 2, rank))
        seen[rank] = [b.numpy() for b in batches]
    everything = torch.randperm(203, generator=torch.Generator().manual_seed(5)).numpy()
    assert len(seen[0]) == len(seen[1]) == 13  # the last global batch of 11 is still split
    for step, (mine, theirs) in enumerate(zip(seen[0], seen[1])):
        assert not set(mine) & set(theirs)
        assert sorted([*mine, *theirs]) == sorted(everything[16 * step : 16 * step + 16])
    # and a streamed split reads only its rank's rows from disk
    params = small_stage_params()
    paths = train.artifact_paths(params.base)
    manifest = read_manifest(paths.split_manifest)
    classes = sorted(manifest.label.unique())
    reads: list[np.ndarray] = []
    original = SignalReader.read
    monkeypatch.setattr(SignalReader, "read", lambda self, index: reads.append(np.array(index)) or original(self, index))
    matrix = parse.load_filter_bank(paths.filter_bank)[0]
    front = train.read_front_end(paths)
    settings = train.resolve_settings(params.train, front, manifest, LENGTH, tuple(matrix.shape), 5)
    model = train.new_model(params.train, params.base.seed, front, matrix, 5, LENGTH, settings, torch.device("cpu"))
    data = train.load_split(model, manifest, "train", Path(params.base.raw_dir), classes, torch.device("cpu"), "stream", LENGTH)
    share = train.epoch_batches(len(data), 16, torch.Generator().manual_seed(1), World(1, 2, 1))
    list(data.batches(share))
    assert [list(r) for r in reads] == [list(b.numpy()) for b in share]


def test_sharded_validation_sums_to_the_whole_split(small_stage_params) -> None:
    from sklearn.metrics import f1_score

    truth = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    predicted = np.array([0, 1, 1, 1, 0, 2, 2, 0])
    confusion = np.zeros((3, 3))
    np.add.at(confusion, (truth, predicted), 1)
    assert train.macro_f1(confusion) == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    only_some = np.zeros((4, 4))
    np.add.at(only_some, (truth, predicted), 1)  # class 3 never occurs: left out, as sklearn does
    assert train.macro_f1(only_some) == pytest.approx(train.macro_f1(confusion))


@pytest.mark.parametrize("damage", ["truncated", "fewer_rows", "nan"])
def test_a_damaged_shard_is_refused_by_name_and_nothing_is_written(small_stage_params, damage: str) -> None:
    params = small_stage_params(input="stream")
    paths = train.artifact_paths(params.base)
    manifest = read_manifest(paths.split_manifest)
    victim = Path(params.base.raw_dir) / manifest.loc[manifest.split == "train", "file"].iloc[-1]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-1000])
    elif damage == "fewer_rows":
        np.save(victim, np.load(victim)[:3])
    else:
        array = np.load(victim)
        array[:] = np.nan
        np.save(victim, array)
    with pytest.raises(DataError, match=str(victim)):
        train.run(params.train, params.base)
    assert not paths.model.exists() and not paths.train_summary.exists() and not paths.history.exists()


def test_signal_reader_reads_the_rows_the_manifest_names(tmp_path: Path) -> None:
    from cwtops.data.signals import load_signals, scan_raw

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "a/many.npy", rng.standard_normal((7, 32)).astype(np.float32))
    np.save(tmp_path / "a/one.npy", rng.standard_normal(32).astype(np.float32))  # a single signal [L]
    np.save(tmp_path / "b/wide.npy", rng.standard_normal((5, 32)))  # float64, converted
    np.save(tmp_path / "b/half.npy", rng.standard_normal((3, 32)).astype(">f2"))  # big-endian float16
    manifest = scan_raw(tmp_path)
    reader = SignalReader(manifest, tmp_path, 32)
    reader.check()
    index = rng.permutation(len(manifest))[:11]
    assert np.array_equal(reader.read(index), load_signals(manifest.iloc[index], tmp_path))
    assert reader.read(np.arange(0)).shape == (0, 32)

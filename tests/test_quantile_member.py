"""The quantile member (`train.quantiles`) in the train stage: the convolutional members train exactly
as without it, and the member written to the checkpoint is the logistic regression of the training
split's quantiles, recorded in the train summary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from cwtops.data.signals import load_signals
from cwtops.model.network import QuantileMember, load_checkpoint, signal_quantiles
from tasks import train
from tests.conftest import staged_params


def test_the_members_train_as_without_it_and_the_member_is_the_training_splits_fit(tmp_path: Path, monkeypatch) -> None:
    make = staged_params(tmp_path, 60, 128, seed=9, val_fraction=0.0, epochs=3, batch_size=16, members=2,
                         channels=[8, 8, 8, 8], hidden=8, threads=1)
    params = make(quantiles=8, quantile_weight=0.4)
    augmented = []  # channels of each augmented batch: the heads' only, the cached quantiles left out
    augment = train.augment_in_time
    monkeypatch.setattr(train, "augment_in_time", lambda batch, *a, **k: augmented.append(batch.shape[1]) or augment(batch, *a, **k))
    cached = []  # the in-memory splits: the member's inputs held once per signal, not once per time step
    compute = train.compute_scalograms
    monkeypatch.setattr(train, "compute_scalograms", lambda *a, **k: cached.append(compute(*a, **k)) or cached[-1])
    train.run(params.train, params.base)
    monkeypatch.setattr(train, "augment_in_time", augment)
    monkeypatch.setattr(train, "compute_scalograms", compute)
    paths = train.artifact_paths(params.base)
    model, checkpoint = load_checkpoint(paths.model)
    assert augmented and set(augmented) == {model.args.input_channels}
    assert cached and all(scalograms.shape[1] == model.args.input_channels and quantiles.shape[1:] == (40,)
                          for scalograms, quantiles in cached)
    # the quantiles ride after the heads' channels: Q = 8 per step lag (1, 2, 4, 8) and 8 of the values
    assert model.args.quantile_lags == (1, 2, 4, 8) and model.args.quantile_bins == 8
    assert model.scalogram(torch.randn(2, 1, 128)).shape[1] == model.args.input_channels + 40
    summary = json.loads(paths.train_summary.read_text())
    rows = pd.read_csv(paths.split_manifest)
    rows = rows[rows.split == "train"]
    assert model.args.quantiles == 8 and model.args.quantile_weight == 0.4
    assert summary["quantile_member"]["signals"] == len(rows) and summary["quantile_member"]["iterations"] > 0

    # the member in the checkpoint is the fit of the training split's quantiles, computed from the raw files
    signals = torch.from_numpy(load_signals(rows, Path(params.base.raw_dir))).float().unsqueeze(1)
    centred = signals - signals.mean(-1, keepdim=True)
    standardised = centred / centred.square().mean(-1, keepdim=True).add(1e-8).sqrt()
    classes = checkpoint["class_names"]
    labels = torch.tensor([classes.index(label) for label in rows.label])
    reference = QuantileMember(40, len(classes), bins=8)
    reference.fit(signal_quantiles(standardised, 8, (1, 2, 4, 8)), labels)
    for name, tensor in reference.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.allclose(model.quantile_member.state_dict()[name], tensor, atol=1e-4), name

    # the convolutional members: the same weights as a run without the quantile member
    plain = make(quantiles=0)
    train.run(plain.train, plain.base)
    without, _ = load_checkpoint(paths.model)
    members = {k: v for k, v in model.state_dict().items() if not k.startswith("quantile_member")}
    assert members.keys() == without.state_dict().keys()
    for name, tensor in without.state_dict().items():
        assert torch.equal(members[name], tensor), name
    assert json.loads(paths.train_summary.read_text())["quantile_member"] is None  # off: nothing fitted

"""Weight averaging (`train.average`): the checkpoint is the mean of the last epochs' weights, with
BatchNorm statistics of its own, and an interrupted run resumes to the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cwtops.model.network import HybridCWTNet, ModelArgs, signed_log1p
from tasks import train
from tests.conftest import staged_params


@pytest.fixture()
def averaging(tmp_path: Path):
    """60 signals of 128 samples, no validation split (the case averaging applies to), 4 epochs."""
    return staged_params(tmp_path, 60, 128, seed=5, val_fraction=0.0, epochs=4, batch_size=16, members=1,
                         channels=[8, 8, 8, 8], hidden=8, average=0.5, threads=1)


def _checkpoint(params) -> dict:
    return torch.load(train.artifact_paths(params.base).model, map_location="cpu", weights_only=True)["state_dict"]


def test_the_checkpoint_is_the_mean_of_the_last_epochs_weights(averaging, monkeypatch) -> None:
    params = averaging()
    seen: list[dict] = []
    accumulate = train.accumulate_average

    def recording(state, weights):
        seen.append({k: v.detach().clone() for k, v in weights.items()})
        accumulate(state, weights)

    monkeypatch.setattr(train, "accumulate_average", recording)
    train.run(params.train, params.base)
    summary = json.loads(train.artifact_paths(params.base).train_summary.read_text())
    assert summary["selected_by"] == "average" and summary["averaged_epochs"] == 2 == len(seen)  # epochs 3 and 4
    saved = _checkpoint(params)
    # every weight the epochs train (the frozen front-end, and the quantile member fitted after them, excluded)
    weights = [key for key in saved if key.endswith(".weight") and not key.startswith(("frontend", "quantile_member"))]
    assert weights
    for key in weights:
        assert torch.allclose(saved[key], (seen[0][key] + seen[1][key]) / 2, atol=1e-6), key
        assert not torch.allclose(seen[0][key], seen[1][key])  # the two epochs differ: a real mean
    # BatchNorm statistics were recomputed for the mean weights, not averaged from the epochs'
    norm = next(key for key in saved if key.endswith("running_var") and "conv2" in key)
    assert not torch.allclose(saved[norm], (seen[0][norm] + seen[1][norm]) / 2)

    unaveraged = averaging(average=0.0)
    train.run(unaveraged.train, unaveraged.base)
    summary = json.loads(train.artifact_paths(unaveraged.base).train_summary.read_text())
    assert summary["selected_by"] == "train_loss" and summary["averaged_epochs"] == 0


def test_an_interrupted_averaging_run_resumes_to_the_same_checkpoint(averaging, monkeypatch) -> None:
    params = averaging()
    train.run(params.train, params.base)
    uninterrupted = _checkpoint(params)

    epochs = train.train_one_epoch
    calls = {"n": 0}

    def dies_in_epoch_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after epoch 3, the first one averaged, was saved as a resume point
            raise KeyboardInterrupt
        return epochs(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", dies_in_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        train.run(params.train, params.base)
    monkeypatch.setattr(train, "train_one_epoch", epochs)
    result = train.run(params.train, params.base)
    assert result.resumed_from == 3
    resumed = _checkpoint(params)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.allclose(resumed[key].float(), value.float(), atol=1e-6), key


def test_batchnorm_statistics_are_recomputed_over_the_training_split() -> None:
    args = ModelArgs(n_filters=6, kernel_size=9, n_classes=2, signal_length=40, hop=1, head="1d",
                     channels=(4, 4, 4, 4), hidden=4, dilations=(1, 1, 1, 1))
    model = HybridCWTNet(args, torch.randn(6, 9))
    batches = [torch.rand(8, 6, 40) * (i + 1) for i in range(3)]

    class Split:
        def __len__(self) -> int:
            return 24

        def batches(self, index_batches):
            assert [len(b) for b in index_batches] == [8, 8, 8]
            return ((scalograms, torch.zeros(8, dtype=torch.long)) for scalograms in batches)

    norm = model.members[0].input_norm
    norm.running_mean.fill_(5.0)
    train.recompute_batchnorm(model, Split(), batch_size=8)
    expected = torch.cat([signed_log1p(b) for b in batches]).mean(dim=(0, 2))
    assert torch.allclose(norm.running_mean, expected, atol=1e-6)
    assert norm.momentum == 0.1 and not model.training  # left as it was, in eval mode

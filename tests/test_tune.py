"""The tune stage: off by default, reproducible with a seed, resumable, and read by train."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cwtops.core.config import TrainConfig, TuneConfig
from cwtops.core.errors import CwtopsError
from tasks import train, tune
from tests.conftest import staged_params

SEARCH = TuneConfig(trials=3, folds=2, budget=0.01, space=("dilations", "dropout", "warp"))


def _project(tmp_path: Path):
    """48 signals of 128 samples, no validation split, a small head, 8 epochs a fold."""
    return staged_params(tmp_path, 48, 128, seed=3, val_fraction=0.0, epochs=8, batch_size=8, members=1,
                         channels=[8, 8, 8, 8], hidden=8, threads=1)


def _outputs(params) -> tuple[dict, pd.DataFrame]:
    paths = train.artifact_paths(params.base)
    return json.loads(paths.tune_chosen.read_text()), pd.read_csv(paths.tune_trials)


def test_off_by_default_writes_an_empty_choice_that_leaves_train_as_written(tmp_path: Path) -> None:
    params = _project(tmp_path)()
    assert params.tune.trials == 0  # the shipped params.yaml
    result = tune.run(params.tune, params.base, params.train)
    chosen, trials = _outputs(params)
    assert result.stopped_by == "off" and chosen["params"] == {} and trials.empty
    assert train.apply_tuned(params.train, train.artifact_paths(params.base).tune_chosen) == (params.train, {})


def test_the_search_is_reproducible_and_starts_from_params_own_settings(tmp_path: Path) -> None:
    make = _project(tmp_path)
    params = make(dropout=0.15)  # not one of SPACE's dropouts: it becomes a choice of its own
    first = tune.run(SEARCH, params.base, params.train)
    chosen, trials = _outputs(params)
    assert first.trials == 3 == len(trials) and (trials.state == "COMPLETE").all()
    assert trials.loc[0, "dropout"] == 0.15 and trials.loc[0, "dilations"] == "auto" and trials.loc[0, "warp"] == 0.1
    assert chosen["baseline"] == pytest.approx(trials.loc[0, "cv_macro_f1"])
    best = trials.loc[trials.number == chosen["best_trial"]].iloc[0]
    assert chosen["score"] == pytest.approx(best.cv_macro_f1) and best.cv_macro_f1 == trials.cv_macro_f1.max()
    assert trials.cv_macro_f1.nunique() > 1  # the settings tried make a difference the search can see
    assert 0.0 <= trials.cv_accuracy.min() and trials.cv_accuracy.max() <= 1.0 and (trials.cv_loss > 0).all()
    # a second run of the same params and seed: the same trials, scores and choice
    again = tune.run(SEARCH, params.base, params.train)
    chosen_again, trials_again = _outputs(params)
    assert again.chosen == first.chosen and chosen_again["params"] == chosen["params"]
    columns = ["number", "dilations", "dropout", "warp", "cv_macro_f1", "cv_accuracy", "cv_loss"]
    pd.testing.assert_frame_equal(trials[columns], trials_again[columns])
    # another seed draws other trials after the first
    other = make(dropout=0.15).model_copy(update={"base": params.base.model_copy(update={"seed": 4})})
    tune.run(SEARCH, other.base, other.train)
    _, trials_other = _outputs(other)
    assert not trials_other[columns].equals(trials[columns])


def test_an_interrupted_search_resumes_to_the_same_trials_and_choice(tmp_path: Path, monkeypatch) -> None:
    params = _project(tmp_path)()
    uninterrupted = tune.run(SEARCH, params.base, params.train)
    _, expected = _outputs(params)

    calls = {"n": 0}
    real = tune.cross_validate

    def cut_off_in_the_second_trial(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune, "cross_validate", cut_off_in_the_second_trial)
    with pytest.raises(KeyboardInterrupt):
        tune.run(SEARCH, params.base, params.train)
    assert train.artifact_paths(params.base).tune_journal.exists()  # the finished trial is kept
    monkeypatch.setattr(tune, "cross_validate", real)
    resumed = tune.run(SEARCH, params.base, params.train)
    _, trials = _outputs(params)
    assert resumed.resumed_trials == 1 and resumed.chosen == uninterrupted.chosen
    assert list(trials.state) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # the cut-off trial, run again
    done = trials[trials.state == "COMPLETE"].reset_index(drop=True)
    columns = ["dilations", "dropout", "warp", "cv_macro_f1", "cv_accuracy", "cv_loss"]
    pd.testing.assert_frame_equal(done[columns], expected[columns])
    assert not train.artifact_paths(params.base).tune_journal.exists()  # finished: the next run starts afresh


def test_train_uses_the_chosen_settings_and_reports_them(tmp_path: Path) -> None:
    params = _project(tmp_path)()
    paths = train.artifact_paths(params.base)
    paths.tune_chosen.parent.mkdir(parents=True, exist_ok=True)
    paths.tune_chosen.write_text(json.dumps({"params": {"dropout": 0.3, "dilations": [[1, 2, 4, 8]]}}))
    train.run(params.train, params.base)
    summary = json.loads(paths.train_summary.read_text())
    assert summary["tuned"] == {"dropout": 0.3, "dilations": [[1, 2, 4, 8]]}
    assert summary["settings"]["dilations"] == [[1, 2, 4, 8]]
    args = torch.load(paths.model, map_location="cpu", weights_only=True)["model_args"]
    assert args["dropout"] == 0.3


def test_a_damaged_choice_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"params": {"dropout": 7}}))
    with pytest.raises(CwtopsError, match=r"chosen\.json.*dvc repro tune"):
        train.apply_tuned(TrainConfig(), chosen)
    chosen.write_text("{not json")
    with pytest.raises(CwtopsError, match=r"chosen\.json.*dvc repro tune"):
        train.apply_tuned(TrainConfig(), chosen)


def test_choices_and_folds() -> None:
    assert tune.choices("dropout", TrainConfig(dropout=0.1)) == [0.1, 0.3, 0.5]
    assert tune.choices("dropout", TrainConfig(dropout=0.2)) == [0.2, 0.1, 0.3, 0.5]
    assert tune.choices("raw_channel", TrainConfig(raw_channel="auto")) == ["auto", False, True]
    assert tune.choices("dilations", TrainConfig(dilations=(1, 1, 1, 1)))[0] == "[[1, 1, 1, 1]]"
    assert tune.train_value("dilations", "[[1, 1, 1, 1]]", 300) == [[1, 1, 1, 1]]
    assert tune.train_value("dilations", "wide", 300) == [[3, 12, 24, 48]]  # a field of 259 steps, about 300
    labels = torch.tensor([0] * 7 + [1] * 5).numpy()
    folds = tune.stratified_folds(labels, 3, seed=0)
    assert sorted(int(i) for fold in folds for i in fold) == list(range(12))  # each signal held out once
    assert [len(fold) for fold in folds] == [4, 4, 4]
    assert all(0 < (labels[fold] == 1).sum() for fold in folds)  # every fold holds both classes


def test_track_logs_each_trial_as_a_child_run_once(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tasks.track import _log_trials

    paths = train.artifact_paths(train.BaseConfig(artifacts_dir=tmp_path / "artifacts"))
    paths.tune_trials.parent.mkdir(parents=True)
    pd.DataFrame({"number": [0, 1, 2], "state": ["COMPLETE", "FAIL", "COMPLETE"], "dropout": [0.1, 0.5, 0.3],
                  "cv_macro_f1": [0.5, None, 0.75], "cv_accuracy": [0.5, None, 0.75], "cv_loss": [0.9, None, 0.6],
                  "seconds": [3.0, None, 2.0], "same_as": [None, None, None]}).to_csv(paths.tune_trials, index=False)
    paths.tune_chosen.write_text(json.dumps({"params": {"dropout": 0.3}, "best_trial": 2}))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("tune")
    parent = client.create_run(experiment).info.run_id
    assert _log_trials(client, parent, paths) == 3
    assert _log_trials(client, parent, paths) == 0  # a second track of the same run adds none
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    by_trial = {child.data.tags["cwtops.tune.trial"]: child for child in children}
    assert sorted(by_trial) == ["0", "1", "2"]
    assert by_trial["2"].data.params["train.dropout"] == "0.3" and by_trial["2"].data.metrics["cv_macro_f1"] == 0.75
    assert by_trial["2"].data.tags["cwtops.tune.chosen"] == "true" and by_trial["0"].data.tags["cwtops.tune.chosen"] == "false"
    assert by_trial["1"].info.status == "FAILED" and "cv_macro_f1" not in by_trial["1"].data.metrics


def test_a_large_split_is_searched_on_a_subsample_the_budget_affords() -> None:
    from cwtops.core.derived import epoch_cost
    from tasks.train import FrontEnd

    front, bank, train_cfg = FrontEnd(hop=2, hop_derived=True, magnitude="abs", decimate="mean"), (112, 257), TrainConfig()
    cfg = TuneConfig(trials=8, folds=3, budget=0.5)
    n = tune.searched_signals(cfg, train_cfg, front, bank, 2, 500, 3601)  # FordA's shape
    assert 2 * cfg.folds <= n < 3601
    settings = tune._settings(train_cfg, front, bank, 2, 500, n - -(-n // 3))
    one = settings.forward_flops / settings.members
    assert tune.MIN_FIT_EPOCHS * epoch_cost(n - -(-n // 3), one, settings.batch_size) <= tune.fit_share(cfg)
    bigger = tune._settings(train_cfg, front, bank, 2, 500, (n + 1) - -(-(n + 1) // 3))
    one = bigger.forward_flops / bigger.members
    assert tune.MIN_FIT_EPOCHS * epoch_cost((n + 1) - -(-(n + 1) // 3), one, bigger.batch_size) > tune.fit_share(cfg)
    # the folds' head is as wide as the one train builds for the whole split, not a small split's
    assert tune.searched_head(train_cfg, front, bank, 2, 500, 3601).channels == (64, 64, 128, 128)
    train_cfg = tune.searched_head(train_cfg, front, bank, 2, 500, 3601)
    n = tune.searched_signals(cfg, train_cfg, front, bank, 2, 500, 3601)
    assert 2 * cfg.folds <= n < 3601
    assert tune.searched_signals(cfg, train_cfg, front, bank, 7, 319, 70) == 70  # a small split: all of it
    rows = pd.DataFrame({"label": ["a"] * 90 + ["b"] * 10})
    picked = tune.subsample(rows, 20, seed=0)
    assert len(picked) == 20 and picked.label.value_counts().to_dict() == {"a": 18, "b": 2}
    # a rare class keeps two signals (ECG5000: 2 of its 500 training signals), a singleton its one
    rows = pd.DataFrame({"label": ["a"] * 480 + ["b"] * 17 + ["c"] * 2 + ["d"]})
    assert tune.subsample(rows, 100, seed=0).label.value_counts().to_dict() == {"a": 96, "b": 3, "c": 2, "d": 1}

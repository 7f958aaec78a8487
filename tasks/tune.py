"""Stage `tune`: an optional search over a few train settings, cross-validated on the training split.

Off by default (`tune.trials: 0`): the stage writes an empty choice and train runs params.yaml as
written. With N trials, Optuna proposes values for the train keys in `tune.space` (SPACE below:
the receptive field, the raw channel, the time stretch, dropout, weight averaging, mixup, the peak
learning rate); each trial trains one head per stratified fold of the training split and is scored
by the macro-F1 of the pooled out-of-fold predictions, the heads' alone (the quantile member is
fitted after them and does not depend on what is searched). The test split is never read. The first trial
is params.yaml's own settings, so the search keeps them unless another trial scores higher (ties go
to the earlier trial). Train then reads the chosen values from `chosen.json`.

- Budget: all trials together train for `tune.budget` times train's compute budget
  (cwtops/core/derived.py); that sets each fold's epochs (one member, at most train's own epochs).
  Every other setting is resolved for the fold's size as train resolves it for the whole split.
- Time box: no trial starts after `tune.timeout` seconds. A search stopped by it says so
  (`stopped_by: timeout`), and its choice then depends on the machine's speed.
- Reproducible: folds, initial weights, batches and augmentation are seeded from `base.seed`, and
  the sampler is seeded again before each trial from the seed and the number of finished trials.
- Resumable: the study lives in an Optuna journal file (artifacts/checkpoints/tune.journal) under
  a name that fingerprints the data and params. A run that is cut off keeps its finished trials,
  and the next run starts the unfinished one again. So an interrupted search ends where an
  uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cwtops.core.artifacts import atomic_path, sha256_file, write_json
from cwtops.core.config import BaseConfig, TrainConfig, TuneConfig
from cwtops.core.derived import AUTO, FLOP_BUDGET, NEAR_DILATIONS, epoch_cost, wide_dilations
from cwtops.core.paths import ArtifactPaths, artifact_paths
from cwtops.data.signals import SignalReader, load_signals, read_manifest
from cwtops.model.network import HybridCWTNet
from tasks.parse import load_filter_bank
from tasks.train import (
    FrontEnd,
    Split,
    autocast_dtype,
    compute_scalograms,
    configure_backend,
    keep_selected,
    macro_f1,
    model_args,
    new_model,
    new_state,
    read_front_end,
    resolve_settings,
    select_device,
    train_epochs,
)

log = logging.getLogger(__name__)

# What each searchable train key may take. params.yaml's own value is always a choice too (the first
# trial). Dilations are named: `near` is the near branch alone (a field of 47 steps), `wide` the wide
# one alone (a field about the head's T steps), `auto` both (the default).
SPACE: dict[str, tuple[Any, ...]] = {
    "dilations": (AUTO, "near", "wide"),
    "raw_channel": (False, True),
    "warp": (0.0, 0.1, 0.2),
    "dropout": (0.1, 0.3, 0.5),
    "average": (0.0, 0.25),
    "mixup": (0.0, 0.2),
    "lr": (0.0005, 0.001, 0.002),
}
MIN_FIT_EPOCHS = 10
SCORES = ("cv_macro_f1", "cv_accuracy", "cv_loss")


@dataclass(frozen=True)
class TuneResult:
    trials: int  # finished trials in the study
    chosen: dict  # train key -> value
    score: float | None  # the chosen trial's cross-validated macro-F1
    baseline: float | None  # the first trial's (params.yaml's own settings)
    seconds: float
    stopped_by: str  # off | trials | timeout | too_few_signals
    resumed_trials: int  # trials finished before this run started


def label_of(key: str, value: Any) -> Any:
    """A train value as an Optuna choice (None, bool, int, float or str): lists become JSON."""
    if key == "dilations" and value != AUTO:
        branches = [value] if value and isinstance(value[0], int) else value
        return json.dumps([list(branch) for branch in branches])
    return value


def train_value(key: str, label: Any, steps: int) -> Any:
    """The train setting a choice stands for (`steps`: the head's T, which sets the wide field)."""
    if key != "dilations":
        return label
    if label == "near":
        return [list(NEAR_DILATIONS)]
    if label == "wide":
        return [list(wide_dilations(steps))]
    return label if label == AUTO else json.loads(label)


def choices(key: str, train: TrainConfig) -> list[Any]:
    """SPACE's values for `key`, params.yaml's own first when it is not among them."""
    values = list(SPACE[key])
    current = label_of(key, getattr(train, key))
    if not any(current == value and type(current) is type(value) for value in values):
        values.insert(0, current)
    return values


def subsample(rows: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """About `limit` rows, each class keeping its share and at least two rows (one where it has one):
    a class cut to one signal could not be both trained on and held out."""
    if len(rows) <= limit:
        return rows
    share = limit / len(rows)
    picked = [group.sample(n=max(min(len(group), 2), round(len(group) * share)), random_state=seed)
              for _, group in rows.groupby("label", sort=True)]
    return pd.concat(picked).sort_index()


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of each fold: every class dealt round-robin over the folds in a seeded order."""
    rng = np.random.default_rng(seed)
    held: list[list[int]] = [[] for _ in range(folds)]
    start = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        for i, index in enumerate(members):
            held[(start + i) % folds].append(int(index))
        start += len(members)  # the next class starts where this one stopped: fold sizes stay even
    return [np.sort(np.array(fold, dtype=np.int64)) for fold in held]


@dataclass
class SearchData:
    """The training split's scalograms (raw channel last), computed once for every trial."""

    scalograms: torch.Tensor  # (N, S + 1, T)
    labels: torch.Tensor  # (N,)
    folds: list[np.ndarray]
    front: FrontEnd
    matrix: torch.Tensor
    n_classes: int
    signal_length: int
    train: TrainConfig  # params.yaml's, with the head's width resolved for the whole split

    def inputs(self, raw_channel: bool) -> torch.Tensor:
        """The cached heads' input, without the raw channel (the last one: a view, no copy) unless asked for."""
        return self.scalograms if raw_channel else self.scalograms[:, :-1]


def _fingerprint(cfg: TuneConfig, base: BaseConfig, train: TrainConfig, paths: ArtifactPaths) -> str:
    parts = [sha256_file(paths.split_manifest), sha256_file(paths.filter_bank), sha256_file(paths.filter_bank_summary),
             cfg.model_dump_json(), train.model_dump_json(), str(base.seed)]
    return "tune-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def fit_share(cfg: TuneConfig) -> float:
    """FLOPs each fold's head may spend: the search budget over every trial and fold."""
    return cfg.budget * FLOP_BUDGET / (cfg.trials * cfg.folds)


def fit_epochs(cfg: TuneConfig, train: TrainConfig, data: SearchData, n_fit: int) -> int:
    """Each fold's epochs: its share of the search budget, at least MIN_FIT_EPOCHS (the searched
    subsample is sized for that, `searched_signals`) and at most what train would run."""
    settings = _settings(train, data.front, tuple(data.matrix.shape), data.n_classes, data.signal_length, n_fit)
    one_member = settings.forward_flops / max(1, settings.members)
    epochs = math.floor(fit_share(cfg) / epoch_cost(n_fit, one_member, settings.batch_size))
    return max(1, min(settings.epochs, max(MIN_FIT_EPOCHS, epochs)))


def searched_signals(cfg: TuneConfig, train: TrainConfig, front: FrontEnd, bank_shape: tuple[int, int], n_classes: int,
                     signal_length: int, n_train: int) -> int:
    """How many training signals the search can afford: every fold's head trains MIN_FIT_EPOCHS on
    the other folds within its share of the budget (a large split is searched on a stratified
    subsample), and at most `tune.max_signals`."""

    def affordable(n: int) -> bool:
        n_fit = n - -(-n // cfg.folds)
        settings = _settings(train, front, bank_shape, n_classes, signal_length, n_fit)
        one_member = settings.forward_flops / max(1, settings.members)
        return MIN_FIT_EPOCHS * epoch_cost(n_fit, one_member, settings.batch_size) <= fit_share(cfg)

    low, high = 2 * cfg.folds, min(n_train, cfg.max_signals)
    if high <= low or affordable(high):
        return high
    while high - low > 1:  # the largest affordable n in [low, high)
        middle = (low + high) // 2
        low, high = (middle, high) if affordable(middle) else (low, middle)
    return low


def searched_head(train: TrainConfig, front: FrontEnd, bank_shape: tuple[int, int], n_classes: int, signal_length: int,
                  n_train: int) -> TrainConfig:
    """train's settings with the head's width resolved for the whole training split: the folds (and
    a subsample) are smaller, and `auto` would give them a narrower head than train builds."""
    full = _settings(train, front, bank_shape, n_classes, signal_length, n_train)
    return TrainConfig.model_validate(train.model_dump() | {"channels": full.channels, "hidden": full.hidden})


def _settings(train: TrainConfig, front: FrontEnd, bank_shape: tuple[int, int], n_classes: int, signal_length: int,
              n_fit: int):  # noqa: ANN202 - TrainSettings
    """What train would resolve for a training split of `n_fit` signals."""
    fit_manifest = pd.DataFrame({"split": ["train"] * n_fit})
    return resolve_settings(train, front, fit_manifest, signal_length, bank_shape, n_classes)


def cross_validate(train: TrainConfig, data: SearchData, epochs: int, seed: int, device: torch.device) -> dict[str, float]:
    """One head per fold, trained on the other folds for `epochs`; scores of the pooled held-out predictions."""
    n_classes = data.n_classes
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    loss_sum, count = 0.0, 0
    amp_dtype = autocast_dtype(train, device)
    for k, held in enumerate(data.folds):
        fit = np.setdiff1d(np.arange(len(data.labels)), held)
        settings = _settings(train, data.front, tuple(data.matrix.shape), n_classes, data.signal_length, len(fit))
        one_member = int(settings.forward_flops / max(1, settings.members))
        settings = replace(settings, members=1, epochs=epochs, patience=epochs, max_steps=None, forward_flops=one_member)
        fold_seed = seed + 7919 * k
        model = new_model(train, fold_seed, data.front, data.matrix, n_classes, data.signal_length, settings, device)
        inputs = data.inputs(settings.raw_channel)
        fit_split = Split(inputs[torch.from_numpy(fit)], data.labels[torch.from_numpy(fit)])
        state = new_state(train, model, settings, len(fit), device, amp_dtype)
        train_epochs(state, fit_split, None, train, fold_seed, settings, None, amp_dtype, "", progress=False)
        keep_selected(state, fit_split, settings, amp_dtype)
        model.eval()
        with torch.no_grad():
            for start in range(0, len(held), 256):
                picked = torch.from_numpy(held[start : start + 256])
                logits = model.head(inputs[picked]).float()
                truth = data.labels[picked]
                loss_sum += float(nn.functional.cross_entropy(logits, truth, reduction="sum"))
                np.add.at(confusion, (truth.cpu().numpy(), logits.argmax(1).cpu().numpy()), 1)
                count += len(picked)
    return {"cv_macro_f1": macro_f1(confusion), "cv_accuracy": float(np.trace(confusion) / max(count, 1)),
            "cv_loss": loss_sum / max(count, 1)}


def _load_data(cfg: TuneConfig, base: BaseConfig, train: TrainConfig, paths: ArtifactPaths,
               device: torch.device) -> SearchData | None:
    manifest = read_manifest(paths.split_manifest)
    classes = sorted(manifest.loc[manifest.split == "train", "label"].unique())
    rows = manifest[manifest.split == "train"]
    raw_dir = Path(base.raw_dir)
    signal_length = int(load_signals(rows.head(1), raw_dir).shape[1])
    matrix, _, _ = load_filter_bank(paths.filter_bank)
    front = read_front_end(paths)
    train = searched_head(train, front, tuple(matrix.shape), len(classes), signal_length, len(rows))
    # the heads alone are scored: the quantile member does not depend on the settings searched, and mixed in
    # it can outvote the differences between trials (short folds leave the heads' probabilities flat)
    train = train.model_copy(update={"quantiles": 0})
    limit = searched_signals(cfg, train, front, tuple(matrix.shape), len(classes), signal_length, len(rows))
    rows = subsample(rows, limit, base.seed)
    if len(rows) < 2 * cfg.folds:
        return None
    reader = SignalReader(rows, raw_dir, signal_length)
    reader.check()
    args = model_args(train, front.magnitude, matrix.shape[0], matrix.shape[1], len(classes), signal_length, front.hop,
                      raw_channel=True, decimate=front.decimate)
    scalograms, _ = compute_scalograms(HybridCWTNet(args, matrix).to(device), reader, device)  # no member inputs
    index = {name: i for i, name in enumerate(classes)}
    labels = rows.label.map(index).to_numpy(dtype=np.int64)
    folds = stratified_folds(labels, cfg.folds, base.seed)
    return SearchData(scalograms, torch.tensor(labels, device=device), folds, front, matrix, len(classes), signal_length,
                      train)


def _open_study(path: Path, name: str):  # noqa: ANN202 - optuna.Study
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = JournalStorage(JournalFileBackend(str(path)))
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    except Exception as error:  # a resume point is a convenience: a damaged journal is set aside
        log.warning("ignoring unreadable tune journal %s (%s)", path, error)
        path.unlink(missing_ok=True)
        storage = JournalStorage(JournalFileBackend(str(path)))
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)  # cut off by an interrupted run: run again
    return study


def search(cfg: TuneConfig, base: BaseConfig, train: TrainConfig, data: SearchData, device: torch.device,
           journal: Path, name: str) -> tuple[Any, int, str, int]:
    """Run the trials left; returns (study, trials finished before, stopped_by, epochs per fold)."""
    import optuna
    from optuna.trial import TrialState

    study = _open_study(journal, name)
    space = {key: choices(key, train) for key in cfg.space}
    first = {key: label_of(key, getattr(train, key)) for key in cfg.space}  # params.yaml's own settings
    steps = -(-data.signal_length // data.front.hop)
    n_fit = len(data.labels) - max(len(fold) for fold in data.folds)
    epochs = fit_epochs(cfg, data.train, data, n_fit)

    def objective(trial: optuna.Trial) -> float:
        labels = {key: trial.suggest_categorical(key, values) for key, values in space.items()}
        for done in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if done.params == labels:  # proposed again: the same folds and seeds give the same score
                trial.set_user_attr("same_as", done.number)
                for score in SCORES[1:]:
                    trial.set_user_attr(score, done.user_attrs.get(score))
                return float(done.value)
        tick = time.perf_counter()
        settings = TrainConfig.model_validate(data.train.model_dump() | {k: train_value(k, v, steps) for k, v in labels.items()})
        scores = cross_validate(settings, data, epochs, base.seed, device)
        for score in SCORES[1:]:
            trial.set_user_attr(score, scores[score])
        trial.set_user_attr("seconds", time.perf_counter() - tick)
        print(f"tune: trial {trial.number} {labels} -> cross-validated macro-F1 {scores['cv_macro_f1']:.4f} "
              f"({time.perf_counter() - tick:.0f} s)", flush=True)
        return scores["cv_macro_f1"]

    def finished() -> list:
        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    resumed = len(finished())
    started = time.perf_counter()
    stopped_by = "trials"
    while len(finished()) < cfg.trials:
        if finished() and time.perf_counter() - started >= cfg.timeout:
            stopped_by = "timeout"
            break
        n_done = len(finished())
        # seeded by what is finished, not by trial numbers: a resumed search proposes what an uninterrupted one would
        study.sampler = optuna.samplers.TPESampler(seed=base.seed + n_done)
        if n_done == 0 and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.enqueue_trial(first)
        study.optimize(objective, n_trials=1)
    return study, resumed, stopped_by, epochs


def trial_rows(study: Any, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = {"number": trial.number, "state": trial.state.name}
        row |= {key: trial.params.get(key) for key in keys}
        row |= {"cv_macro_f1": trial.value, "cv_accuracy": trial.user_attrs.get("cv_accuracy"),
                "cv_loss": trial.user_attrs.get("cv_loss"), "seconds": trial.user_attrs.get("seconds"),
                "same_as": trial.user_attrs.get("same_as")}
        rows.append(row)
    return rows


def best_trial(study: Any) -> Any:
    """The highest cross-validated macro-F1; ties to the earliest trial (params.yaml's own first)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda trial: (trial.value, -trial.number))


def _write(paths: ArtifactPaths, chosen: dict, rows: list[dict], keys: tuple[str, ...]) -> None:
    paths.tune_trials.parent.mkdir(parents=True, exist_ok=True)
    columns = ["number", "state", *keys, *SCORES, "seconds", "same_as"]
    with atomic_path(paths.tune_trials) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    write_json(paths.tune_chosen, chosen)


def run(cfg: TuneConfig, base: BaseConfig, train: TrainConfig) -> TuneResult:
    """Search (when `tune.trials` > 0) and write the chosen train settings and every trial."""
    started = time.perf_counter()
    paths = artifact_paths(base)
    summary = {"trials": 0, "params": {}, "labels": {}, "space": list(cfg.space), "folds": cfg.folds}
    if cfg.trials == 0:
        _write(paths, summary | {"stopped_by": "off", "seconds": 0.0}, [], cfg.space)
        paths.tune_journal.unlink(missing_ok=True)
        return TuneResult(0, {}, None, None, time.perf_counter() - started, "off", 0)
    device = select_device(train)
    configure_backend(train, device)
    data = _load_data(cfg, base, train, paths, device)
    if data is None:
        print(f"tune: too few training signals to cross-validate in {cfg.folds} folds (at least {2 * cfg.folds}); "
              "train uses params.yaml as written", flush=True)
        _write(paths, summary | {"stopped_by": "too_few_signals", "seconds": time.perf_counter() - started}, [], cfg.space)
        return TuneResult(0, {}, None, None, time.perf_counter() - started, "too_few_signals", 0)
    from optuna.trial import TrialState

    name = _fingerprint(cfg, base, train, paths)
    study, resumed, stopped_by, epochs = search(cfg, base, train, data, device, paths.tune_journal, name)
    best = best_trial(study)
    first = min(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda trial: trial.number)
    steps = -(-data.signal_length // data.front.hop)
    chosen = {key: train_value(key, best.params[key], steps) for key in cfg.space}
    complete = [row for row in trial_rows(study, cfg.space) if row["state"] == "COMPLETE"]
    seconds = time.perf_counter() - started
    summary |= {"trials": len(complete), "params": chosen, "labels": dict(best.params), "best_trial": best.number,
                "score": best.value, "baseline": first.value, "signals": len(data.labels),
                "epochs_per_fold": epochs, "stopped_by": stopped_by, "resumed_trials": resumed, "seconds": seconds}
    _write(paths, summary, trial_rows(study, cfg.space), cfg.space)
    paths.tune_journal.unlink(missing_ok=True)  # finished: the next run starts afresh
    print(f"tune: {len(complete)} trials in {seconds:.0f} s; chose trial {best.number} {dict(best.params)} "
          f"(cross-validated macro-F1 {best.value:.4f}, params.yaml's own {first.value:.4f})", flush=True)
    return TuneResult(len(complete), chosen, best.value, first.value, seconds, stopped_by, resumed)

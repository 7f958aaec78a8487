"""Stage `track`: mirror one pipeline run into MLflow (the files on disk stay the source of truth).

One MLflow run per pipeline run (or the run named by `CWTOPS_MLFLOW_RUN_ID`, when an
orchestrator opened it): params (each stage's, as dvc.lock records what it ran with), per-epoch metrics in batches, test
metrics, parity figures, the percent confusion matrix and learning curves as figures, the
classification report, a per-class gallery of scalograms, the parity report and the ONNX file;
lineage tags (DVC hashes of the raw data and the weight file, split-manifest and filter-bank
hashes, git commit); the training split as an MLflow dataset input. Writes
artifacts/track/run.json last, so an unreachable server leaves the artifacts as they were.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from cwtops.core.artifacts import write_json
from cwtops.core.config import BaseConfig, MlflowConfig, flatten_section
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import ArtifactPaths, artifact_paths
from cwtops.registry.lineage import lineage
from cwtops.registry.server import bounded_client_retries, ensure_server, is_connection_error, masked, require_reachable, unreachable

if TYPE_CHECKING:  # torch and matplotlib load only when figures are drawn: `register` imports lineage from here
    import torch
    from matplotlib.figure import Figure
    from mlflow.entities import Metric

    from mlflow import MlflowClient

RUN_ENV = "CWTOPS_MLFLOW_RUN_ID"
MAX_ENTITIES_PER_BATCH = 1000  # MLflow's log_batch limits (metrics: 1000 as well)
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
GALLERY_PER_CLASS = 4
ScalogramFn = Callable[["torch.Tensor"], "torch.Tensor"]  # (n, 1, L) -> (n, S, T)


@dataclass(frozen=True)
class TrackResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    run_url: str
    created: bool  # False when the run came from CWTOPS_MLFLOW_RUN_ID
    seconds: float


# ---------------------------------------------------------------- metrics (pure)


def epoch_metrics(history: pd.DataFrame, timestamp_ms: int) -> list[Metric]:
    """One metric per history column and epoch, step = epoch (`seconds` becomes epoch_seconds)."""
    from mlflow.entities import Metric

    names = {column: "epoch_seconds" if column == "seconds" else column for column in history.columns if column != "epoch"}
    return [
        Metric(name, float(value), timestamp_ms, int(epoch))
        for column, name in names.items()
        for epoch, value in zip(history["epoch"], history[column], strict=True)
        if pd.notna(value)
    ]


def final_metrics(test: dict, summary: dict, parity: dict, timestamp_ms: int) -> list[Metric]:
    """Test metrics (`test_` prefix), training summary and parity figures, at step 0."""
    from mlflow.entities import Metric

    values = {f"test_{k}": v for k, v in test.items()}
    summary_keys = ("epochs_run", "best_epoch", "best_val_macro_f1", "seconds")
    values |= {k if k != "seconds" else "train_seconds": summary.get(k) for k in summary_keys}
    values |= {f"parity_{k}": parity.get(k) for k in ("max_abs_error", "max_rel_error", "argmax_agreement")}
    values["parity_passed"] = 1.0 if parity.get("passed") is True else 0.0
    return [Metric(k, float(v), timestamp_ms, 0) for k, v in values.items() if _is_number(v)]


def resolved_settings(summary: dict, bank: dict | None = None) -> dict[str, object]:
    """The values the pipeline actually used (`auto` ones derived from the data), by params key."""
    settings = summary.get("settings") or {}
    keys = {"hop": "parse.hop", "members": "train.members", "epochs": "train.epochs", "batch_size": "train.batch_size",
            "patience": "train.patience", "signal_length": "data.signal_length", "n_train": "data.n_train",
            "channels": "train.channels", "hidden": "train.hidden"}
    resolved = {dotted: settings[name] for name, dotted in keys.items() if name in settings}
    if "selected_by" in summary:  # validation macro-F1, or training loss when no validation split was carved out
        resolved["train.selected_by"] = summary["selected_by"]
    if bank and "fitted_to_signals" in bank:
        resolved["parse.bank"] = "default bank fitted to the signals" if bank["fitted_to_signals"] else "as written in the file"
    if bank and bank.get("default_w0"):  # which default: w0 of each scale in turn
        resolved["parse.bank_w0"] = ", ".join(f"{w0:g}" for w0 in bank["default_w0"])
    if "derived" in settings:
        resolved["derived"] = ",".join(settings["derived"]) or "none"
    return resolved


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


def batch_plan(metrics: Sequence[Any], params: Sequence[Any], tags: Sequence[Any]) -> list[tuple[list, list, list]]:
    """(metrics, params, tags) per `log_batch` call: as few calls as MLflow's limits allow
    (1000 entities, 1000 metrics, 100 params, 100 tags per request)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    plan = []
    while metrics or params or tags:
        chunk_params, params = params[:MAX_PARAMS_PER_BATCH], params[MAX_PARAMS_PER_BATCH:]
        chunk_tags, tags = tags[:MAX_TAGS_PER_BATCH], tags[MAX_TAGS_PER_BATCH:]
        room = MAX_ENTITIES_PER_BATCH - len(chunk_params) - len(chunk_tags)
        chunk_metrics, metrics = metrics[:room], metrics[room:]
        plan.append((chunk_metrics, chunk_params, chunk_tags))
    return plan


# ---------------------------------------------------------------- figures (pure)


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: pd.DataFrame) -> Figure:
    """Losses and validation scores per epoch, side by side."""
    figure, (loss_axes, score_axes) = pyplot().subplots(1, 2, figsize=(10, 4))
    for axes, columns, title in ((loss_axes, ("train_loss", "val_loss"), "loss"),
                                 (score_axes, ("val_accuracy", "val_macro_f1"), "validation")):
        for column in columns:
            if column in history:
                axes.plot(history["epoch"], history[column], marker=".", label=column)
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure


def confusion_figure(confusion: dict) -> Figure:
    """The percent confusion matrix (rows: true class), drawn as the evaluate stage draws it."""
    from tasks.evaluate import plot_confusion

    percent = np.asarray(confusion["percent"], dtype=float)
    return plot_confusion(percent, list(confusion["labels"]), "confusion matrix (% of true class)")


def scalogram_gallery(
    examples: dict[str, np.ndarray], scalogram_fn: ScalogramFn, per_class: int = GALLERY_PER_CLASS
) -> Figure:
    """A row per class of example scalograms (log scale), tiled with torchvision's make_grid.

    `examples` maps class name -> signals [n, L]; `scalogram_fn` maps (n, 1, L) -> (n, S, T).
    """
    import torch
    from torchvision.utils import make_grid

    figure, axes = pyplot().subplots(len(examples), 1, figsize=(12, 1.8 * len(examples) + 0.6), squeeze=False)
    for row, (label, signals) in enumerate(examples.items()):
        panel = axes[row, 0]
        panel.set_xticks([])
        panel.set_yticks([])
        panel.set_ylabel(label, rotation=0, ha="right", va="center")
        if len(signals) == 0:
            panel.text(0.5, 0.5, "no test signals", ha="center", va="center", transform=panel.transAxes)
            continue
        with torch.no_grad():
            images = torch.log1p(scalogram_fn(torch.from_numpy(signals[:per_class]).float().unsqueeze(1)))  # (n, S, T)
        blanks = images.new_zeros((per_class - len(images), *images.shape[1:]))  # equal tile widths in every row
        grid = make_grid(torch.cat([images, blanks]).unsqueeze(1), nrow=per_class, padding=4,
                         normalize=True, scale_each=True, pad_value=1.0)
        panel.imshow(grid[0].numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    figure.suptitle("test-split scalograms per class, log scale (rows: filters in bank order; columns: time)")
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------- inputs from disk


REQUIRED = ("model", "history", "metrics", "confusion_json", "report_txt", "report_json", "onnx", "parity_report",
            "split_manifest", "filter_bank_summary")


def _check_inputs(paths: ArtifactPaths) -> None:
    missing = [str(getattr(paths, name)) for name in REQUIRED if not getattr(paths, name).exists()]
    if missing:
        raise CwtopsError(f"track: missing {', '.join(missing)}; run the pipeline up to parity first (`dvc repro parity`)")


def gallery_examples(
    base: BaseConfig, classes: list[str], per_class: int = GALLERY_PER_CLASS
) -> dict[str, np.ndarray]:
    """The first `per_class` test signals of each class, read through the split manifest."""
    from cwtops.data.signals import load_signals

    manifest = pd.read_csv(artifact_paths(base).split_manifest)
    test = manifest[manifest["split"] == "test"]
    examples = {}
    for label in classes:
        rows = test[test["label"].astype(str) == label].head(per_class)
        examples[label] = load_signals(rows, Path(base.raw_dir)) if len(rows) else np.zeros((0, 0), np.float32)
    return examples


def _checkpoint_gallery(base: BaseConfig) -> Figure:
    from cwtops.model.network import load_checkpoint

    model, checkpoint = load_checkpoint(artifact_paths(base).model)
    # `scalogram` is the front-end applied to the standardised signal: what the head sees.
    return scalogram_gallery(gallery_examples(base, list(checkpoint["class_names"])), model.scalogram)


# ---------------------------------------------------------------- logging


def _experiment_id(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:  # the UI opens a classic-ML experiment in its "Model training" view
        return client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:  # created by a concurrent run in between
        return client.get_experiment_by_name(name).experiment_id


def _open_run(client: MlflowClient, cfg: MlflowConfig, base: BaseConfig) -> tuple[str, str, bool]:
    """(run_id, experiment_id, created): the orchestrator's run when named, else a new one."""
    from mlflow.exceptions import MlflowException

    given = os.environ.get(RUN_ENV)
    if given:
        try:
            run = client.get_run(given)
        except MlflowException as error:
            if is_connection_error(error):
                raise
            raise CwtopsError(f"{RUN_ENV}={given}: no such MLflow run ({error.message}); unset it to create a run") from None
        return given, run.info.experiment_id, False
    experiment_id = _experiment_id(client, cfg.experiment)
    name = f"{base.model_name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    run = client.create_run(experiment_id, run_name=name)  # tags follow in the first log_batch
    return run.info.run_id, experiment_id, True


def run_note(model_name: str, test: dict, parity: dict, lineage_tags: dict[str, str]) -> str:
    """The run's description (markdown): headline metrics, parity, lineage."""
    scores = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float))
    checked = "passed" if parity.get("passed") is True else "FAILED"
    return (
        f"Pipeline run of **{model_name}**. Test: {scores} ({test.get('n_test', '?')} signals). "
        f"ONNX parity {checked} (max abs error {parity.get('max_abs_error', float('nan')):.2e}).\n\n"
        f"Data `{lineage_tags['data_dvc_md5']}`, weights `{lineage_tags['weights_dvc_md5']}`, "
        f"commit `{lineage_tags['git_commit']}`."
    )


def _run_tags(base: BaseConfig, paths: ArtifactPaths, lineage_tags: dict[str, str]) -> dict[str, str]:
    test, parity = json.loads(paths.metrics.read_text()), json.loads(paths.parity_report.read_text())
    note = run_note(base.model_name, test, parity, lineage_tags)
    return {**lineage_tags, "model_name": base.model_name, "mlflow.source.git.commit": lineage_tags["git_commit"],
            "mlflow.source.type": "JOB", "mlflow.source.name": "cwtops stage track", "mlflow.note.content": note}


def _log_values(client: MlflowClient, run_id: str, ran: dict[str, str], paths: ArtifactPaths, tags: dict[str, str]) -> int:
    """Params, tags, per-epoch and final metrics in as few `log_batch` calls as the limits allow."""
    from mlflow.entities import Param, RunTag

    now = int(time.time() * 1000)
    summary = json.loads(paths.train_summary.read_text()) if paths.train_summary.exists() else {}
    metrics = epoch_metrics(pd.read_csv(paths.history), now) + final_metrics(
        json.loads(paths.metrics.read_text()), summary, json.loads(paths.parity_report.read_text()), now
    )
    flat = [Param(key, value[:6000]) for key, value in ran.items()]  # 6000: MLflow's value limit
    bank = json.loads(paths.filter_bank_summary.read_text()) if paths.filter_bank_summary.exists() else {}
    flat += [Param(f"resolved.{key}", str(value)) for key, value in resolved_settings(summary, bank).items()]
    flat += [Param(f"tuned.train.{key}", json.dumps(value)) for key, value in (summary.get("tuned") or {}).items()]
    plan = batch_plan(metrics, flat, [RunTag(key, value) for key, value in tags.items()])
    for chunk_metrics, chunk_params, chunk_tags in plan:
        client.log_batch(run_id, metrics=chunk_metrics, params=chunk_params, tags=chunk_tags)
    return len(plan)


def _log_figures(client: MlflowClient, run_id: str, base: BaseConfig, paths: ArtifactPaths) -> None:
    drawers = {
        "confusion_matrix.png": lambda: confusion_figure(json.loads(paths.confusion_json.read_text())),
        "learning_curves.png": lambda: learning_curves(pd.read_csv(paths.history)),
        "scalogram_gallery.png": lambda: _checkpoint_gallery(base),
    }
    for name, draw in drawers.items():
        figure = draw()
        try:
            client.log_figure(run_id, figure, f"figures/{name}")
        finally:
            pyplot().close(figure)


def _log_files(client: MlflowClient, run_id: str, paths: ArtifactPaths) -> None:
    files = [(paths.report_txt, "evaluation"), (paths.report_json, "evaluation"), (paths.confusion_json, "evaluation"),
             (paths.metrics, "evaluation"), (paths.predictions, "evaluation"), (paths.history, "training"),
             (paths.train_summary, "training"), (paths.tune_chosen, "tuning"), (paths.tune_trials, "tuning"),
             (paths.parity_report, "parity"), (paths.onnx, "onnx")]
    for path, folder in files:
        if path.exists():  # predictions and summary are optional mirrors
            client.log_artifact(run_id, str(path), folder)


def _log_training_data(client: MlflowClient, run_id: str, base: BaseConfig, paths: ArtifactPaths, data_hash: str) -> None:
    """The split manifest's train rows as an MLflow dataset: source = raw dir, digest = DVC hash."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    import mlflow

    manifest = pd.read_csv(paths.split_manifest)
    raw_dir = Path(base.raw_dir)
    with warnings.catch_warnings():  # a local path matches two equivalent source types; int columns
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            manifest[manifest["split"] == "train"].reset_index(drop=True),
            source=str(raw_dir.resolve()), targets="label", name=f"{raw_dir.name}-train",
            digest=data_hash if data_hash != "untracked" else None,  # a DVC dir hash is 36 chars: MLflow's limit
        )
        entity = dataset._to_mlflow_entity()  # what mlflow.log_input sends, without an active run
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training"), InputTag("dvc_md5", data_hash)]
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags)])


def _log_trials(client: MlflowClient, run_id: str, paths: ArtifactPaths) -> int:
    """Each tune trial as a child run of this one (its settings as params, its cross-validated scores
    as metrics); trials already logged under this run, by an earlier track of it, are not logged twice."""
    from mlflow.entities import Metric, Param, RunTag

    trials = pd.read_csv(paths.tune_trials) if paths.tune_trials.exists() else pd.DataFrame()
    if trials.empty:
        return 0
    chosen = json.loads(paths.tune_chosen.read_text()) if paths.tune_chosen.exists() else {}
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = {child.data.tags.get("cwtops.tune.trial") for child in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)}
    scores = ("cv_macro_f1", "cv_accuracy", "cv_loss", "seconds")
    keys = [column for column in trials.columns if column not in ("number", "state", "same_as", *scores)]
    now, added = int(time.time() * 1000), 0
    for trial in trials.itertuples(index=False):
        number = str(int(trial.number))
        if number in logged:
            continue
        tags = {"mlflow.parentRunId": run_id, "cwtops.tune.trial": number, "cwtops.tune.state": str(trial.state),
                "cwtops.tune.chosen": str(chosen.get("best_trial") == int(trial.number)).lower()}
        child = client.create_run(experiment_id, run_name=f"tune trial {number}", tags=tags).info.run_id
        values = trial._asdict()
        metrics = [Metric(name, float(values[name]), now, 0) for name in scores if _is_number(values.get(name))]
        params = [Param(f"train.{key}", str(values[key])) for key in keys]
        client.log_batch(child, metrics=metrics, params=params, tags=[RunTag("mlflow.runName", f"tune trial {number}")])
        client.set_terminated(child, "FINISHED" if trial.state == "COMPLETE" else "FAILED")
        added += 1
    return added


def _mirror(client: MlflowClient, run_id: str, cfg: MlflowConfig, base: BaseConfig, paths: ArtifactPaths,
            tags: dict[str, str]) -> None:
    _log_values(client, run_id, ran_with(cfg, base), paths, tags)
    _log_trials(client, run_id, paths)
    _log_training_data(client, run_id, base, paths, tags["data_dvc_md5"])
    _log_figures(client, run_id, base, paths)
    _log_files(client, run_id, paths)


def ran_with(cfg: MlflowConfig, base: BaseConfig, lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """`section.key -> value` of the params this run was made with: each stage's, as dvc.lock
    records what it ran with (DVC writes a stage's entry when the stage has run), and this stage's
    own sections. Passwords in a database URI are masked."""
    flat = flatten_section("base", base.model_dump(mode="json")) | flatten_section("mlflow", cfg.model_dump(mode="json"))
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except FileNotFoundError:
        stages = {}
    for entry in stages.values():
        for values in (entry.get("params") or {}).values():  # one mapping per params file
            for key, value in values.items():
                flat |= flatten_section(key, value) if isinstance(value, dict) else {key: str(value)}
    if "mlflow.backend_store" in flat:
        flat["mlflow.backend_store"] = masked(flat["mlflow.backend_store"])
    return dict(sorted(flat.items()))


def run(cfg: MlflowConfig, base: BaseConfig) -> TrackResult:
    """Log this pipeline run into MLflow and record the run next to the other artifacts."""
    from mlflow import MlflowClient

    started = time.perf_counter()
    paths = artifact_paths(base)
    _check_inputs(paths)
    tags = _run_tags(base, paths, lineage(base))
    uri = ensure_server(cfg)
    with bounded_client_retries():
        require_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        try:
            run_id, experiment_id, created = _open_run(client, cfg, base)
            _log_and_close(client, run_id, created, cfg, base, paths, tags)
        except Exception as error:
            if is_connection_error(error):
                raise unreachable(uri, f"lost during tracking: {type(error).__name__}") from error
            raise
    run_url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    write_json(paths.track_run, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri, "run_url": run_url})
    return TrackResult(run_id, experiment_id, uri, run_url, created, time.perf_counter() - started)


def _log_and_close(
    client: MlflowClient, run_id: str, created: bool, cfg: MlflowConfig, base: BaseConfig, paths: ArtifactPaths,
    tags: dict[str, str],
) -> None:
    """Mirror everything; a run we opened ends FINISHED, or FAILED when logging broke off."""
    try:
        _mirror(client, run_id, cfg, base, paths, tags)
    except Exception as error:
        if created and not is_connection_error(error):
            client.set_terminated(run_id, "FAILED")
        raise
    if created:  # an orchestrator's run is ended by the orchestrator
        client.set_terminated(run_id, "FINISHED")

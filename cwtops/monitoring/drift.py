"""Drift: do the signals production receives still look like the ones its model was trained on?

A pass (scheduled: prefect.yaml, deployment `monitor`; or `cwtops drift run`) reads the signals
logged since the previous pass, computes their input features (cwtops/monitoring/features.py) and
the population stability index of each against the production version's training reference
(`drift_reference.json`, registered with the version). The scores and a plot go to MLflow (a run
per pass in the experiment `<mlflow.experiment>-monitoring`, and the worst score as tags on the
version). When a feature's PSI is above `monitoring.drift_threshold`, the pass emits the Prefect
event `cwtops.drift.detected`; the retraining deployment (`nightly`) has a trigger on it.

A pass with fewer than `monitoring.min_signals` new signals judges nothing and leaves its
watermark where it was, so the signals add up until there are enough.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cwtops.core.config import Params
from cwtops.core.errors import CwtopsError
from cwtops.monitoring.features import psi as population_stability
from cwtops.monitoring.features import signal_features
from cwtops.monitoring.logs import Watermark, read_log
from cwtops.monitoring.shadow import settle_cutoff
from cwtops.services.processes import state_dir

EVENT = "cwtops.drift.detected"


def resource_id(model: str) -> str:
    """The Prefect resource the drift event is about (what a trigger matches on)."""
    return f"cwtops.model.{model}"


@dataclass(frozen=True)
class DriftResult:
    action: str  # judged | waiting | no_version
    version: int | None = None
    signals: int = 0
    psi: dict[str, float] = field(default_factory=dict)
    worst_feature: str = ""
    worst_psi: float = 0.0
    threshold: float = 0.0
    drifted: bool = False
    event_id: str = ""
    run_id: str = ""
    reason: str = ""


def reference_for(params: Params, version: int) -> dict:
    """The version's training reference, downloaded once per version into the state directory."""
    from cwtops.core.artifacts import write_json
    from cwtops.registry.versions import DRIFT_REFERENCE_ARTIFACT, download_version_file

    cached = state_dir() / "monitoring" / f"reference-{params.base.model_name}-v{version}.json"
    if not cached.exists():
        with tempfile.TemporaryDirectory(prefix="cwtops-drift-") as scratch:
            path = download_version_file(params, version, DRIFT_REFERENCE_ARTIFACT, Path(scratch))
            write_json(cached, json.loads(path.read_text()))
    return json.loads(cached.read_text())


def drift_pass(params: Params, emit: bool = True) -> DriftResult:
    """Judge the newly logged signals against production's training reference; emit the event on drift."""
    from cwtops.registry.versions import ALIAS, alias_version, list_versions

    cfg, name = params.monitoring, params.base.model_name
    version = alias_version(params, ALIAS)
    if version is None:  # nothing promoted yet: the newest version is what serves
        versions = list_versions(params)
        version = int(versions[0]["version"]) if versions else None
    if version is None:
        return DriftResult("no_version", reason=f"no registered version of '{name}'")
    watermark = Watermark(state_dir() / "monitoring" / f"drift-{name}.json")
    until = settle_cutoff(params)
    logged = read_log(cfg.inference_log, name, since=watermark.read(), until=until, limit=cfg.max_signals)
    if len(logged) < cfg.min_signals:
        return DriftResult("waiting", version, len(logged), threshold=cfg.drift_threshold,
                           reason=f"{len(logged)} new signals logged, a pass judges {cfg.min_signals} or more")
    scores = population_stability(reference_for(params, version), signal_features(logged.signals))
    worst = max(scores, key=scores.get)
    drifted = scores[worst] > cfg.drift_threshold
    run_id = _log(params, version, len(logged), scores, drifted)
    event_id = _emit(name, version, len(logged), scores, worst, cfg.drift_threshold, run_id) if drifted and emit else ""
    watermark.write(until)
    return DriftResult("judged", version, len(logged), scores, worst, scores[worst], cfg.drift_threshold, drifted, event_id, run_id)


def _log(params: Params, version: int, signals: int, scores: dict[str, float], drifted: bool) -> str:
    """A run per pass (scores, signals, the plot) and the worst score as tags on the version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, Param

    from cwtops.registry.versions import registry_client, set_version_tags

    name, threshold = params.base.model_name, params.monitoring.drift_threshold
    worst = max(scores, key=scores.get)
    with registry_client(params) as client:
        experiment = f"{params.mlflow.experiment}-monitoring"
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=f"drift {name} v{version}",
                                tags={"cwtops.pass": "drift", "model": name, "model_version": str(version)})
        run_id = run.info.run_id
        stamp = int(time.time() * 1000)
        values = {**{f"psi_{feature}": value for feature, value in scores.items()}, "psi_max": scores[worst],
                  "signals": float(signals), "drifted": float(drifted)}
        client.log_batch(run_id, metrics=[Metric(key, value, stamp, 0) for key, value in values.items()],
                         params=[Param("threshold", str(threshold))])
        figure, axes = plt.subplots(figsize=(8, 3.5))
        axes.bar(list(scores), list(scores.values()), color=["tab:red" if v > threshold else "tab:blue" for v in scores.values()])
        axes.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
        axes.set_ylabel("PSI")
        axes.set_title(f"{name} v{version}: {signals} logged signals vs training")
        axes.tick_params(axis="x", rotation=60)
        axes.legend()
        figure.tight_layout()
        client.log_figure(run_id, figure, "drift.png")
        plt.close(figure)
        client.set_terminated(run_id)
        set_version_tags(params, version, {"drift_psi_max": f"{scores[worst]:.4f}", "drift_feature": worst,
                                           "drift_detected": str(drifted).lower(), "drift_time": datetime.now(UTC).isoformat(timespec="seconds")})
    return run_id


def _emit(name: str, version: int, signals: int, scores: dict[str, float], worst: str, threshold: float, run_id: str) -> str:
    """The Prefect event a deployment trigger starts retraining on; sent before this returns."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(
        EVENT,
        resource={"prefect.resource.id": resource_id(name), "prefect.resource.name": name},
        related=[{"prefect.resource.id": f"cwtops.model-version.{name}.{version}", "prefect.resource.role": "model-version"}],
        payload={"version": version, "signals": signals, "worst_feature": worst, "worst_psi": scores[worst],
                 "threshold": threshold, "psi": scores, "mlflow_run_id": run_id},
    )
    if event is None:
        raise CwtopsError("Prefect did not take the drift event (no Prefect API configured?); set PREFECT_API_URL or run "
                          "the pass from `cwtops serve`")
    EventsWorker.drain_all(timeout=30)
    return str(event.id)


"""Shadow scoring: the challenger answers the requests production answered, and nobody sees its answers.

A pass reads the production requests logged since the last pass (the inference log), sends the same
signals to the challenger through Triton (`<model>-challenger`, its version explicitly), and
compares: agreement (the share of signals where both predict the same class) and the confidence
difference (the challenger's top probability minus production's, on average). Both go to MLflow as
metrics on the run that produced the challenger version (step = signals scored so far), and the
running totals as tags on the version, which `cwtops shadow report` and `cwtops models` read.

Live traffic never waits for this: it runs on the schedule (prefect.yaml, deployment `monitor`) or
from `cwtops shadow run`, over what the log already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from cwtops.core.config import Params
from cwtops.monitoring.logs import Watermark, read_log
from cwtops.services.processes import state_dir

# A logged row reaches its Parquet file up to flush_seconds after its request: a pass judges only
# rows older than this, so the next pass, reading from its watermark, cannot skip a late one.
SETTLE_EXTRA_SECONDS = 2.0
TAGS = ("shadow_production_version", "shadow_signals", "shadow_agreement", "shadow_confidence_delta", "shadow_time")


@dataclass(frozen=True)
class ShadowResult:
    action: str  # scored | no_challenger | not_served | no_traffic
    challenger: int | None = None
    production: int | None = None
    signals: int = 0  # this pass
    agreement: float | None = None
    confidence_delta: float | None = None
    total_signals: int = 0  # since the challenger was first scored against this production version
    total_agreement: float | None = None
    total_confidence_delta: float | None = None
    reason: str = ""


def settle_cutoff(params: Params) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=params.monitoring.flush_seconds + SETTLE_EXTRA_SECONDS)


def compare(production_logits: np.ndarray, challenger_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per signal: whether the two predict the same class, and the challenger's top probability minus production's."""
    from cwtops.serving.client import softmax

    agree = production_logits.argmax(axis=1) == challenger_logits.argmax(axis=1)
    delta = softmax(challenger_logits).max(axis=1) - softmax(production_logits).max(axis=1)
    return agree, delta


def shadow_pass(params: Params, url: str | None = None) -> ShadowResult:
    """Score the newly logged production traffic with the challenger; record the comparison in MLflow."""
    from cwtops.registry.versions import ALIAS, CHALLENGER_ALIAS, alias_version
    from cwtops.serving.client import infer
    from cwtops.serving.publish import challenger_model_name, served_version
    from cwtops.serving.server import http_url

    url = url or http_url(params)
    challenger, production = alias_version(params, CHALLENGER_ALIAS), alias_version(params, ALIAS)
    if challenger is None or challenger == production:
        return ShadowResult("no_challenger", challenger, production, reason="no version carries the `challenger` alias")
    name = challenger_model_name(params)
    if served_version(params, url, name) != challenger:
        return ShadowResult("not_served", challenger, production,
                            reason=f"Triton does not serve version {challenger} as '{name}' yet; the rollout reconciler does that")
    production = production or served_version(params, url)
    watermark = Watermark(state_dir() / "monitoring" / f"shadow-{params.base.model_name}-v{challenger}-p{production}.json")
    until = settle_cutoff(params)
    logged = read_log(params.monitoring.inference_log, params.base.model_name, production, since=watermark.read(), until=until,
                      limit=params.monitoring.max_signals)
    if len(logged) == 0:
        return ShadowResult("no_traffic", challenger, production, reason="no production traffic logged since the last pass")
    scored = infer(url, name, logged.signals, version=challenger, max_batch=params.triton.max_batch_size)
    agree, delta = compare(logged.logits, scored)
    result = _record(params, challenger, production, agree, delta)
    watermark.write(until)
    return result


def _record(params: Params, challenger: int, production: int | None, agree: np.ndarray, delta: np.ndarray) -> ShadowResult:
    """This pass's figures as metrics, and the running totals (per production version) as tags."""
    from cwtops.registry.versions import log_version_metrics, version_tags_of

    tags = version_tags_of(params, challenger)
    same = tags.get("shadow_production_version") == str(production)
    before = int(tags.get("shadow_signals", 0)) if same else 0
    agreed_before = float(tags.get("shadow_agreement", 0.0)) * before if same else 0.0
    delta_before = float(tags.get("shadow_confidence_delta", 0.0)) * before if same else 0.0
    total = before + len(agree)
    totals = {"agreement": (agreed_before + float(agree.sum())) / total, "confidence_delta": (delta_before + float(delta.sum())) / total}
    log_version_metrics(
        params, challenger,
        {"shadow_agreement": float(agree.mean()), "shadow_confidence_delta": float(delta.mean()), "shadow_signals": len(agree)},
        step=total,
        tags={"shadow_production_version": str(production), "shadow_signals": str(total),
              "shadow_agreement": f"{totals['agreement']:.6f}", "shadow_confidence_delta": f"{totals['confidence_delta']:.6f}",
              "shadow_time": datetime.now(UTC).isoformat(timespec="seconds")},
    )
    return ShadowResult("scored", challenger, production, len(agree), float(agree.mean()), float(delta.mean()), total,
                        totals["agreement"], totals["confidence_delta"])


def report(params: Params) -> list[dict]:
    """Every version that was scored in shadow, newest first: its totals and the production version they compare with."""
    from cwtops.registry.versions import list_versions, registry_client, search_versions

    with registry_client(params) as client:  # every version's tags in one search
        all_tags = {int(v.version): v.tags for v in search_versions(client, params.base.model_name)}
    rows = []
    for entry in list_versions(params):
        tags = all_tags.get(entry["version"], {})
        if "shadow_signals" in tags:
            rows.append({"version": entry["version"], "aliases": entry["aliases"], **{key: tags.get(key, "") for key in TAGS}})
    return rows


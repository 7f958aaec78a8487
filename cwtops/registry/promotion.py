"""Promotion policy: `manual` leaves it to a person in the MLflow UI; `auto` promotes a version
when nothing is in production yet, or when it beats production on `rollout.metric` by `margin`."""

from __future__ import annotations

from cwtops.core.config import Params, RolloutConfig


def should_promote(cfg: RolloutConfig, candidate: float | None, production: float | None) -> bool:
    """Pure decision: no disk, no MLflow."""
    if cfg.promotion == "manual" or candidate is None:
        return False
    if production is None:
        return True
    return candidate > production + cfg.margin


def apply_policy(params: Params, version: int) -> str:
    """Decide for a freshly registered `version`; promote it when the policy says so."""
    from cwtops.registry.versions import list_versions, production_version, promote

    cfg = params.rollout
    if cfg.promotion == "manual":
        return "manual: promote in the MLflow UI or with `cwtops promote`"
    metrics = {int(v["version"]): v.get("metric") for v in list_versions(params)}
    current = production_version(params)
    if current == version:
        return f"version {version} is already in production"
    if should_promote(cfg, metrics.get(version), metrics.get(current) if current else None):
        promote(params, version)
        return f"auto: promoted version {version} ({cfg.metric} {metrics.get(version)})"
    return f"auto: kept version {current} ({cfg.metric} {metrics.get(current)} vs {metrics.get(version)})"

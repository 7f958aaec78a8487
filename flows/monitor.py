"""The monitoring flow: one shadow pass and one drift pass over the newly logged production traffic.

Scheduled by prefect.yaml (deployment `monitor`). On drift, the drift pass emits the Prefect event
`cwtops.drift.detected`; the `nightly` deployment's trigger on that event starts retraining.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger, task

from cwtops.core.config import DEFAULT_PARAMS, Params, load_params
from cwtops.monitoring.drift import drift_pass
from cwtops.monitoring.shadow import shadow_pass


@task(retries=1, retry_delay_seconds=10, timeout_seconds=300)
def shadow_task(params: Params) -> dict:
    return asdict(shadow_pass(params))


@task(retries=1, retry_delay_seconds=10, timeout_seconds=300)
def drift_task(params: Params) -> dict:
    return asdict(drift_pass(params))


@flow(name="cwtops-monitor", log_prints=True, timeout_seconds=900)
def monitor_flow(params_file: str = str(DEFAULT_PARAMS)) -> dict:
    """Shadow-score the challenger and judge drift; each pass reads only what was logged since its last one."""
    params = load_params(params_file)
    logger = get_run_logger()
    shadow = shadow_task(params)
    logger.info("shadow: %s %s", shadow["action"], shadow.get("reason") or f"agreement {shadow['agreement']}")
    drift = drift_task(params)
    if drift["drifted"]:
        logger.warning("drift on version %s: %s PSI %.3f > %s; event %s sent (retraining follows)", drift["version"],
                       drift["worst_feature"], drift["worst_psi"], drift["threshold"], drift["event_id"])
    else:
        logger.info("drift: %s %s", drift["action"], drift.get("reason") or f"worst PSI {drift['worst_psi']:.3f}")
    return {"shadow": shadow, "drift": drift}

"""The rollout flow: one reconcile pass (desired = `production` alias, actual = what Triton serves).

Scheduled every minute (webhooks can be lost) and started at once by the webhook receiver.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from cwtops.core.config import DEFAULT_PARAMS, load_params
from cwtops.serving.rollout import reconcile


@flow(name="cwtops-rollout", log_prints=True, retries=0, timeout_seconds=900)
def rollout_flow(params_file: str = str(DEFAULT_PARAMS), retry_failed: bool = False) -> dict:
    """Bring Triton in line with the registry; returns the outcome."""
    outcome = reconcile(load_params(params_file), retry_failed=retry_failed)
    logger = get_run_logger()
    if outcome.action == "failed":
        logger.error("rollout of version %s failed, version %s keeps serving: %s", outcome.desired, outcome.served, outcome.reason)
    else:
        logger.info("rollout %s: desired %s, serving %s", outcome.action, outcome.desired, outcome.served)
    return outcome.__dict__

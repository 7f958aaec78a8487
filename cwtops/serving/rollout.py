"""The rollout reconciler: make Triton serve what the MLflow registry says should be served.

desired = the version carrying the `production` alias (or, before anyone promoted anything, the
newest version); actual = the version Triton serves. When they differ: fetch the version's ONNX
(sha256 checked against the registry tag), publish it next to the old one, wait for READY, check
the served outputs against the reference recorded at parity, then retire the old version. Any
failure leaves the old version serving and is recorded as tags on the MLflow version.

One reconcile at a time on a machine: a file lock serialises the webhook, the schedule and
manual calls (a second caller waits for the first).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cwtops.core.config import Params
from cwtops.core.errors import CwtopsError
from cwtops.services.processes import state_dir

log = logging.getLogger(__name__)
STATUS_TAG = "deployment_status"  # serving | rolling_out | failed | interrupted | retired
REASON_TAG = "deployment_reason"
TIME_TAG = "deployment_time"


@dataclass(frozen=True)
class RolloutOutcome:
    action: str  # noop | rolled_out | failed | interrupted | skipped
    desired: int | None
    previous: int | None
    served: int | None
    reason: str = ""
    seconds: float = 0.0


@contextlib.contextmanager
def rollout_lock(timeout: float = 600.0) -> Iterator[None]:
    """Exclusive lock across processes; waits up to `timeout` seconds for a running rollout."""
    from filelock import FileLock, Timeout

    path = state_dir() / "rollout.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(path, timeout=timeout):
            yield
    except Timeout:
        raise CwtopsError(f"another rollout holds {path} for over {timeout:.0f} s") from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def desired_version(params: Params) -> int | None:
    from cwtops.registry.server import TrackingUnreachable
    from cwtops.registry.versions import resolve_version

    try:
        return resolve_version(params, None)
    except TrackingUnreachable:
        raise  # not "nothing registered": the pass fails, and the next one tries again
    except CwtopsError:
        return None  # nothing registered yet


def _already_failed(params: Params, version: int) -> bool:
    """A version whose rollout failed is not retried every minute; re-promote it to retry."""
    from cwtops.registry.versions import list_versions

    for entry in list_versions(params):
        if int(entry["version"]) == version:
            return entry.get("deployment_status") == "failed"
    return False


def reconcile(params: Params, url: str | None = None, retry_failed: bool = False) -> RolloutOutcome:
    """One pass of the reconciler, under the lock."""
    from cwtops.serving.publish import served_version

    started = time.monotonic()
    with rollout_lock():
        desired = desired_version(params)
        actual = served_version(params, url)
        if desired is None or desired == actual:
            return RolloutOutcome("noop", desired, actual, actual, seconds=time.monotonic() - started)
        if not retry_failed and _already_failed(params, desired):
            reason = f"version {desired} failed its last rollout; promote it again or run `cwtops rollout --retry`"
            return RolloutOutcome("skipped", desired, actual, actual, reason, time.monotonic() - started)
        outcome = _roll_out_version(params, desired, actual, url)
    return RolloutOutcome(**{**outcome.__dict__, "seconds": time.monotonic() - started})


def _triton_up(params: Params, url: str | None) -> bool:
    from cwtops.serving.server import http_url, is_ready

    return is_ready(url or http_url(params))


def _mark_retired(params: Params, version: int) -> None:
    """Best effort: the old version may have been published by hand, outside the registry."""
    from mlflow.exceptions import MlflowException

    from cwtops.registry.versions import set_version_tags

    try:
        set_version_tags(params, version, {STATUS_TAG: "retired", TIME_TAG: _now()})
    except MlflowException as error:
        log.warning("could not tag retired version %s: %s", version, error)


def _roll_out_version(params: Params, desired: int, actual: int | None, url: str | None) -> RolloutOutcome:
    from cwtops.registry.versions import download_version, set_version_tags
    from cwtops.serving.publish import publish_version, served_version

    set_version_tags(params, desired, {STATUS_TAG: "rolling_out", TIME_TAG: _now(), REASON_TAG: ""})
    try:
        with tempfile.TemporaryDirectory(prefix="cwtops-rollout-") as scratch:
            files = download_version(params, desired, Path(scratch))
            publish_version(files.onnx, desired, params, reference=files.reference, url=url, retire_others=True)
    except Exception as error:  # any failure: the old version keeps serving, the reason is recorded
        reason = f"{type(error).__name__}: {error}"[:4000]
        if not _triton_up(params, url):
            # Not the version's fault: the next pass (schedule or webhook) tries again once Triton is back.
            reason = f"Triton went away during the rollout; retried on the next pass. {reason}"[:4000]
            set_version_tags(params, desired, {STATUS_TAG: "interrupted", TIME_TAG: _now(), REASON_TAG: reason})
            return RolloutOutcome("interrupted", desired, actual, None, reason)
        set_version_tags(params, desired, {STATUS_TAG: "failed", TIME_TAG: _now(), REASON_TAG: reason})
        return RolloutOutcome("failed", desired, actual, served_version(params, url), reason)
    set_version_tags(params, desired, {STATUS_TAG: "serving", TIME_TAG: _now()})
    if actual is not None and actual != desired:
        _mark_retired(params, actual)
    return RolloutOutcome("rolled_out", desired, actual, desired)

"""The rollout reconciler: make Triton serve what the MLflow registry says should be served.

desired = the version carrying the `production` alias (or, before anyone promoted anything, the
newest version); actual = the version Triton serves. When they differ: fetch the version's ONNX
(sha256 checked against the registry tag), publish it next to the old one, wait for READY, check
the served outputs against the reference recorded at parity, then retire the old version. Any
failure leaves the old version serving and is recorded as tags on the MLflow version.

The same pass keeps the `challenger` alias in step: its version is served as the Triton model
`<model>-challenger` (publish.challenger_model_name says why it is not a second version of the
production model), published the same checked way, and retired from Triton when the alias is
removed or moves onto the production version. Its state is the version's `challenger_status` tag.

One reconcile at a time on a machine: a file lock serialises the webhook, the schedule and
manual calls (a second caller waits for the first).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cwtops.core.config import Params
from cwtops.core.errors import CwtopsError
from cwtops.services.processes import state_dir

log = logging.getLogger(__name__)
STATUS_TAG = "deployment_status"  # serving | rolling_out | failed | interrupted | retired
REASON_TAG = "deployment_reason"
TIME_TAG = "deployment_time"
CHALLENGER_STATUS_TAG = "challenger_status"  # serving | failed | retired
CHALLENGER_REASON_TAG = "challenger_reason"


@dataclass(frozen=True)
class RolloutOutcome:
    action: str  # noop | rolled_out | failed | interrupted | skipped
    desired: int | None
    previous: int | None
    served: int | None
    reason: str = ""
    seconds: float = 0.0
    challenger: dict = field(default_factory=dict)  # the challenger pass: action, desired, served, reason


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
            outcome = RolloutOutcome("noop", desired, actual, actual)
        elif not retry_failed and _already_failed(params, desired):
            reason = f"version {desired} failed its last rollout; promote it again or run `cwtops rollout --retry`"
            outcome = RolloutOutcome("skipped", desired, actual, actual, reason)
        else:
            outcome = _roll_out_version(params, desired, actual, url)
        challenger = _challenger_pass(params, outcome, url, retry_failed)
    return RolloutOutcome(**{**outcome.__dict__, "seconds": time.monotonic() - started, "challenger": asdict(challenger)})


def _challenger_pass(params: Params, production: RolloutOutcome, url: str | None, retry_failed: bool) -> RolloutOutcome:
    """The challenger's pass never masks production's outcome: its failure is reported beside it."""
    if production.action == "interrupted":
        return RolloutOutcome("skipped", None, None, None, "Triton went away during production's rollout")
    try:
        return reconcile_challenger(params, production.served, url, retry_failed)
    except Exception as error:  # noqa: BLE001 - MLflow or Triton unreachable: the next pass tries again
        return RolloutOutcome("error", None, None, None, f"{type(error).__name__}: {error}"[:4000])


def reconcile_challenger(params: Params, production: int | None, url: str | None = None, retry_failed: bool = False) -> RolloutOutcome:
    """Serve the `challenger` version as `<model>-challenger`, or nothing there when the alias is gone
    (or sits on the production version). Call under the rollout lock."""
    from cwtops.registry.versions import CHALLENGER_ALIAS, alias_version, download_version, set_version_tags
    from cwtops.serving.publish import challenger_model_name, publish_version, retire_model, served_version

    name = challenger_model_name(params)
    desired = alias_version(params, CHALLENGER_ALIAS)
    if desired is not None and desired == production:
        desired = None  # production serves it already, under the name every client uses
    actual = served_version(params, url, name)
    if desired == actual:
        return RolloutOutcome("noop", desired, actual, actual)
    if desired is None:
        retire_model(params, name, url)
        _tag_best_effort(params, actual, {CHALLENGER_STATUS_TAG: "retired", TIME_TAG: _now()})
        return RolloutOutcome("retired", None, actual, None)
    if not retry_failed and _tag_of(params, desired, CHALLENGER_STATUS_TAG) == "failed":
        reason = f"challenger version {desired} failed its last rollout; set the alias again or run `cwtops rollout --retry`"
        return RolloutOutcome("skipped", desired, actual, actual, reason)
    try:
        with tempfile.TemporaryDirectory(prefix="cwtops-challenger-") as scratch:
            files = download_version(params, desired, Path(scratch))
            publish_version(files.onnx, desired, params, reference=files.reference, url=url, retire_others=True, model=name)
    except Exception as error:  # the previous challenger (if any) keeps serving
        reason = f"{type(error).__name__}: {error}"[:4000]
        if _triton_up(params, url):
            set_version_tags(params, desired, {CHALLENGER_STATUS_TAG: "failed", CHALLENGER_REASON_TAG: reason, TIME_TAG: _now()})
            return RolloutOutcome("failed", desired, actual, served_version(params, url, name), reason)
        return RolloutOutcome("interrupted", desired, actual, None, f"Triton went away during the rollout. {reason}"[:4000])
    set_version_tags(params, desired, {CHALLENGER_STATUS_TAG: "serving", CHALLENGER_REASON_TAG: "", TIME_TAG: _now()})
    if actual is not None:
        _tag_best_effort(params, actual, {CHALLENGER_STATUS_TAG: "retired", TIME_TAG: _now()})
    return RolloutOutcome("rolled_out", desired, actual, desired)


def _tag_of(params: Params, version: int, tag: str) -> str | None:
    from cwtops.registry.versions import version_tags_of

    return version_tags_of(params, version).get(tag)


def _tag_best_effort(params: Params, version: int | None, tags: dict[str, str]) -> None:
    """Tag a version that left Triton; it may have been published by hand, outside the registry."""
    from mlflow.exceptions import MlflowException

    from cwtops.registry.versions import set_version_tags

    if version is None:
        return
    try:
        set_version_tags(params, version, tags)
    except (MlflowException, CwtopsError) as error:
        log.warning("could not tag version %s: %s", version, error)


def _triton_up(params: Params, url: str | None) -> bool:
    from cwtops.serving.server import http_url, is_ready

    return is_ready(url or http_url(params))


def _mark_retired(params: Params, version: int) -> None:
    """Best effort: the old version may have been published by hand, outside the registry."""
    _tag_best_effort(params, version, {STATUS_TAG: "retired", TIME_TAG: _now()})


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

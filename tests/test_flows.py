"""Flows and services: the Prefect training flow keeps DVC true; promotion rolls out through the
webhook and the reconciler with real MLflow and Triton servers; bad versions never serve."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from tests.conftest import BIN, new_version, run, wait_served, webhook_receiver

pytestmark = pytest.mark.slow


def _set_epochs(project: Path, epochs: int) -> None:
    import yaml

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"]["epochs"] = epochs
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_train_flow_serves_a_version_and_leaves_dvc_clean(harness, in_project: Path, params, triton_server: str, services_env: dict) -> None:
    from flows.pipeline import train_flow

    epochs = params.train.epochs
    _set_epochs(in_project, epochs - 1)  # a changed train param: train and what follows it re-run, not parse or balance
    try:
        summary = train_flow(params_file=str(in_project / "params.yaml"))
    finally:
        _set_epochs(in_project, epochs)
    assert summary["stages_run"] == ["tune", "train", "evaluate", "export", "parity", "track"]  # tune reads train's section
    assert summary["stage_seconds"]["train"] > 0 and summary["stage_seconds"]["parse"] == 0
    assert summary["version"] >= 1
    assert summary["rollout"]["served"] is not None
    # Back to the original epochs: DVC's run cache has those outputs, so train is restored, not re-run.
    again = train_flow(params_file=str(in_project / "params.yaml"), publish=False)
    assert "train" in again["stages_run"]
    assert "up to date" in run([str(BIN / "dvc"), "status"], in_project, services_env).stdout
    repro = run([str(BIN / "dvc"), "repro"], in_project, services_env)
    assert "Running stage" not in repro.stdout


def test_flow_stage_in_process_matches_dvc_repro(in_project: Path, services_env: dict) -> None:
    """The in-process path writes the same dvc.lock entry as `dvc repro` running the stage's command."""
    from flows.dvc_stage import repro_stage

    lock = (in_project / "dvc.lock").read_text()
    run([str(BIN / "dvc"), "repro", "--force", "--single-item", "evaluate"], in_project, services_env)
    assert (in_project / "dvc.lock").read_text() == lock
    done = repro_stage("evaluate", in_project, "in_process")
    assert (done.ran, done.how) == (False, "skipped")
    (in_project / "artifacts/evaluate/metrics.json").unlink()  # an output lost: DVC sees the stage changed
    done = repro_stage("evaluate", in_project, "in_process")
    assert done.ran and done.how in ("ran", "restored")
    assert (in_project / "dvc.lock").read_text() == lock
    assert "up to date" in run([str(BIN / "dvc"), "status"], in_project, services_env).stdout


def test_webhook_promotion_rolls_out_within_15_seconds(harness, in_project: Path, params, triton_server: str, mlflow_server: str) -> None:
    from cwtops.serving.rollout import reconcile

    reconcile(params)  # start from a converged state
    newer = new_version(params)
    with webhook_receiver(params, in_project / "params.yaml", "test-secret-" + str(time.time())):
        answer = requests.post(
            f"{mlflow_server}/api/2.0/mlflow/registered-models/alias",
            json={"name": params.base.model_name, "alias": "production", "version": str(newer)},
            timeout=10,
        )
        assert answer.ok, answer.text
        assert wait_served(params, newer, timeout=15, url=triton_server) <= 15


def test_reconciler_converges_without_webhook_under_steady_load(in_project: Path, params, triton_server: str) -> None:
    """At least 20 requests/s through the whole rollout; not one fails."""
    import threading

    import numpy as np

    from cwtops.registry.versions import promote
    from cwtops.serving.client import connect, infer
    from cwtops.serving.rollout import reconcile

    signal = np.load(in_project / "artifacts/parity/reference.npz")["inputs"][:1]
    newer = new_version(params)
    promote(params, newer)
    failures: list[str] = []
    sent = [0]
    stop = threading.Event()

    def steady_load() -> None:
        client = connect(triton_server)
        while not stop.is_set():
            try:
                infer(triton_server, params.base.model_name, signal, client=client)
            except Exception as error:  # noqa: BLE001 - every failure counts
                failures.append(str(error))
            sent[0] += 1
            time.sleep(0.05)

    workers = [threading.Thread(target=steady_load) for _ in range(8)]  # paced clients: 20+ requests/s even on a busy machine
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        outcome = reconcile(params)
    finally:
        time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join()
    rate = sent[0] / (time.monotonic() - started)
    assert outcome.action == "rolled_out" and outcome.served == newer
    assert not failures, failures[:3]
    assert rate >= 20, f"only {rate:.1f} requests/s"
    assert reconcile(params).action == "noop"


def test_version_with_corrupted_onnx_is_not_rolled_out(in_project: Path, params, triton_server: str) -> None:
    from cwtops.registry.server import tracking_uri
    from cwtops.registry.versions import promote, resolve_version
    from cwtops.serving.publish import served_version
    from cwtops.serving.rollout import reconcile
    from mlflow import MlflowClient

    serving = served_version(params, triton_server) or resolve_version(params, None)
    bad = new_version(params)
    client = MlflowClient(tracking_uri=tracking_uri(params.mlflow))
    client.set_model_version_tag(params.base.model_name, str(bad), "onnx_sha256", "0" * 64)  # what tampering looks like
    promote(params, bad)
    outcome = reconcile(params)
    assert outcome.action == "failed"
    assert served_version(params, triton_server) == serving
    tags = client.get_model_version(params.base.model_name, str(bad)).tags
    assert tags["deployment_status"] == "failed" and "sha256" in tags["deployment_reason"]
    assert reconcile(params).action == "skipped"  # a failed version is not retried every minute
    promote(params, serving)
    assert reconcile(params).action in ("noop", "rolled_out")


def test_serve_runs_exactly_the_deployments_prefect_yaml_lists() -> None:
    """Deployments are written once: what `cwtops serve` serves is read from prefect.yaml."""
    import yaml

    from flows.deployments import PREFECT_FILE, flow_of, runner_deployments

    written = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    served = runner_deployments("/project/params.yaml")
    assert [(d.name, d.flow_name) for d in served] == [
        (entry["name"], flow_of(entry["entrypoint"], "prefect.yaml").name) for entry in written]
    for deployment, entry in zip(served, written, strict=True):
        assert deployment.parameters == {**entry["parameters"], "params_file": "/project/params.yaml"}
        assert deployment.description == entry["description"]
        assert deployment.concurrency_limit == entry.get("concurrency_limit")
        schedules = [s.schedule for s in deployment.schedules]
        assert [getattr(s, "cron", None) for s in schedules] == [e.get("cron") for e in entry["schedules"]]
        assert [s.interval.total_seconds() if hasattr(s, "interval") else None for s in schedules] == [
            e.get("interval") for e in entry["schedules"]]
        assert [(sorted(t.expect), t.match.root) for t in deployment.triggers] == [
            (sorted(e["expect"]), e["match"]) for e in entry.get("triggers", [])]
    retraining = next(d for d in served if d.name == "nightly")
    assert [t.expect for t in retraining.triggers] == [{"cwtops.drift.detected"}]  # drift starts retraining


def test_moved_schedule_keys_name_where_they_went() -> None:
    from cwtops.core.config import params_from_dict
    from cwtops.core.errors import CwtopsError

    with pytest.raises(CwtopsError, match=r"rollout.retrain_cron' is no longer a param: .*prefect.yaml"):
        params_from_dict({"rollout": {"retrain_cron": "0 3 * * *"}}, "params.yaml")

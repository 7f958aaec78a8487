"""MLflow against a real `mlflow server` on 127.0.0.1: run logging, registry, promotion, outages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tasks.io import sha256_file

pytestmark = pytest.mark.slow


@pytest.fixture()
def params(in_project: Path):
    from tasks.config import load_params

    return load_params()


def test_run_has_params_epoch_metrics_figures_and_lineage(params, mlflow_server: str, in_project: Path) -> None:
    from mlflow import MlflowClient

    run_id = json.loads((in_project / "artifacts/track/run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    epochs = len((in_project / "artifacts/train/history.csv").read_text().splitlines()) - 1
    assert len(client.get_metric_history(run_id, "val_macro_f1")) == epochs
    assert "test_macro_f1" in run.data.metrics and "train.epochs" in run.data.params
    for tag in ("data_dvc_md5", "weights_dvc_md5", "split_manifest_sha256", "git_commit"):
        assert run.data.tags[tag] not in ("", "untracked")
    listed = {a.path for folder in ("figures", "evaluation") for a in client.list_artifacts(run_id, folder)}
    assert {"figures/confusion_matrix.png", "figures/scalogram_gallery.png", "evaluation/report.txt"} <= listed
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "train"
    page = requests.get(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run_id}", timeout=10)
    assert page.ok and "<html" in page.text.lower()


def test_register_download_promote(params, mlflow_server: str, in_project: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tasks.registry import download_version, promote, register

    first = register(params)
    again = register(params)
    assert again.version == first.version and not again.created  # idempotent per run and file
    client = MlflowClient(tracking_uri=mlflow_server)
    tags = client.get_model_version(params.base.model_name, str(first.version)).tags
    assert tags["run_id"] == first.run_id
    for key in ("data_dvc_md5", "weights_dvc_md5", "git_commit", "onnx_sha256", "test_macro_f1"):
        assert tags[key]
    files = download_version(params, first.version, tmp_path)
    assert sha256_file(files.onnx) == json.loads((in_project / "artifacts/parity/report.json").read_text())["onnx_sha256"]
    assert files.reference.exists()
    promote(params, first.version)
    assert client.get_model_version_by_alias(params.base.model_name, "production").version == str(first.version)


def test_cli_promote_sets_alias(params, mlflow_server: str, in_project: Path, services_env: dict) -> None:
    from mlflow import MlflowClient

    from tasks.registry import register
    from tests.conftest import BIN, run

    version = register(params).version
    done = run([str(BIN / "cwtops"), "promote", str(version)], in_project, services_env)
    assert "production" in done.stdout
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_model_version_by_alias(params.base.model_name, "production").version == str(version)
    listing = run([str(BIN / "cwtops"), "models"], in_project, services_env).stdout
    assert "production" in listing


def test_failed_parity_is_never_registered(params, in_project: Path) -> None:
    from tasks.errors import CwtopsError
    from tasks.registry import register

    report_path = in_project / "artifacts/parity/report.json"
    original = report_path.read_text()
    report_path.write_text(json.dumps({**json.loads(original), "passed": False, "failure": "injected"}))
    try:
        with pytest.raises(CwtopsError, match="parity did not pass"):
            register(params)
    finally:
        report_path.write_text(original)


def test_unreachable_mlflow_fails_cleanly_and_touches_nothing(params, in_project: Path, monkeypatch) -> None:
    from tasks.errors import CwtopsError
    from tasks.registry import register
    from tests.conftest import free_port

    artifacts = sorted(p for p in (in_project / "artifacts").rglob("*") if p.is_file())
    before = {p: sha256_file(p) for p in artifacts}
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    with pytest.raises(CwtopsError, match=dead.replace(".", r"\.")):
        register(params)
    assert {p: sha256_file(p) for p in artifacts} == before

"""MLflow: the `track` stage, the registry and the tracking server.

Server tests (marked slow) run against a real `mlflow server` on a free 127.0.0.1 port with a
fabricated artifact tree (tests/mlflow_fixtures.py); no client is mocked. The pure helpers are
tested without a server.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml

from cwtops.core.artifacts import sha256_file
from cwtops.core.errors import CwtopsError
from tests.mlflow_fixtures import (  # noqa: F401 - fixtures
    DATA_MD5,
    EPOCHS,
    WEIGHTS_MD5,
    FabricatedProject,
    MlflowTestServer,
    fabricated_tree,
    free_port,
    in_fabricated,
    mlflow_test_server,
    postgres_cluster,
)

# ---------------------------------------------------------------- pure helpers (no server)


def _history() -> pd.DataFrame:
    epochs = np.arange(1, 6)
    return pd.DataFrame({"epoch": epochs, "train_loss": 1.0 / epochs, "val_macro_f1": 0.1 * epochs, "seconds": 0.2})


def test_epoch_metrics_one_entry_per_column_and_epoch() -> None:
    from tasks.track import epoch_metrics

    metrics = epoch_metrics(_history(), timestamp_ms=1)
    by_name: dict[str, list[int]] = {}
    for metric in metrics:
        by_name.setdefault(metric.key, []).append(metric.step)
    assert set(by_name) == {"train_loss", "val_macro_f1", "epoch_seconds"}
    assert all(steps == [1, 2, 3, 4, 5] for steps in by_name.values())


def test_final_metrics_prefix_test_and_skip_non_numbers() -> None:
    from tasks.track import final_metrics

    metrics = final_metrics({"macro_f1": 0.8, "n_test": 9}, {"best_epoch": 3, "device": "cpu", "seconds": 4.0},
                            {"max_abs_error": 1e-6, "passed": True, "argmax_agreement": 1.0}, 1)
    values = {m.key: m.value for m in metrics}
    assert values == {"test_macro_f1": 0.8, "test_n_test": 9.0, "best_epoch": 3.0, "train_seconds": 4.0,
                      "parity_max_abs_error": 1e-6, "parity_argmax_agreement": 1.0, "parity_passed": 1.0}


def test_batch_plan_respects_mlflow_limits_with_few_calls() -> None:
    from tasks.track import batch_plan

    assert len(batch_plan(range(200), range(55), range(12))) == 1  # a typical run: one request
    plan = batch_plan(range(2500), range(130), range(5))
    assert all(len(m) + len(p) + len(t) <= 1000 and len(p) <= 100 and len(t) <= 100 for m, p, t in plan)
    assert sorted(x for m, _, _ in plan for x in m) == list(range(2500))
    assert sorted(x for _, p, _ in plan for x in p) == list(range(130)) and len(plan) == 3


def test_gallery_has_a_row_per_class_and_uses_the_given_front_end() -> None:
    from tasks.track import scalogram_gallery

    seen: list[tuple[int, ...]] = []

    def stand_in(signal: torch.Tensor) -> torch.Tensor:  # (n, 1, L) -> (n, S, T)
        seen.append(tuple(signal.shape))
        return signal.abs().reshape(signal.shape[0], 8, -1)

    examples = {"a": np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32),
                "b": np.ones((2, 64), np.float32), "empty": np.zeros((0, 0), np.float32)}
    figure = scalogram_gallery(examples, stand_in, per_class=4)
    axes = figure.axes
    assert [a.get_ylabel() for a in axes] == ["a", "b", "empty"]
    assert seen == [(4, 1, 64), (2, 1, 64)]  # at most per_class signals, shaped as the model expects
    assert len(axes[0].images) == 1 and len(axes[2].images) == 0


def test_lineage_reads_dvc_hashes_and_file_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from cwtops.core.config import params_from_dict
    from cwtops.registry.lineage import lineage

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.dvc").write_text(yaml.safe_dump({"outs": [{"md5": DATA_MD5, "path": "raw"}]}))
    (tmp_path / "artifacts" / "parse").mkdir(parents=True)
    (tmp_path / "artifacts" / "parse" / "filter_bank.json").write_text(json.dumps({"sha256": "f" * 64}))
    (tmp_path / "artifacts" / "balance").mkdir()
    (tmp_path / "artifacts" / "balance" / "split_manifest.csv").write_text("sample_id,file,row,label,split\n")
    monkeypatch.chdir(tmp_path)
    tags = lineage(params_from_dict({}).base)
    assert tags["data_dvc_md5"] == DATA_MD5
    assert tags["weights_dvc_md5"] == "untracked"  # no my.txt.dvc
    assert tags["split_manifest_sha256"] == sha256_file(tmp_path / "artifacts/balance/split_manifest.csv")
    assert tags["filter_bank_sha256"] == "f" * 64
    assert tags["git_commit"] == "unknown"


def _parity_tree(root: Path, passed: bool, sha: str | None = None) -> Path:
    from cwtops.core.paths import ArtifactPaths

    paths = ArtifactPaths(root)
    paths.onnx.parent.mkdir(parents=True)
    paths.onnx.write_bytes(b"onnx bytes")
    paths.parity_report.parent.mkdir(parents=True)
    case = {"name": "batch-7", "passed": passed}
    paths.parity_report.write_text(json.dumps({"passed": passed, "cases": [case], "onnx_sha256": sha or sha256_file(paths.onnx)}))
    return root


def test_checked_parity_refuses_failed_or_changed_exports(tmp_path: Path) -> None:
    from cwtops.core.paths import ArtifactPaths
    from cwtops.registry.versions import checked_parity

    with pytest.raises(CwtopsError, match="parity did not pass.*batch-7"):
        checked_parity(ArtifactPaths(_parity_tree(tmp_path / "failed", passed=False)))
    with pytest.raises(CwtopsError, match="not the file parity checked"):
        checked_parity(ArtifactPaths(_parity_tree(tmp_path / "changed", passed=True, sha="0" * 64)))
    with pytest.raises(CwtopsError, match="no parity report"):
        checked_parity(ArtifactPaths(tmp_path / "empty"))
    report, sha = checked_parity(ArtifactPaths(_parity_tree(tmp_path / "ok", passed=True)))
    assert report["passed"] and sha == sha256_file(tmp_path / "ok/export/model.onnx")


def test_version_tags_and_description_carry_metrics_and_lineage() -> None:
    from cwtops.registry.versions import version_description, version_tags

    lineage = {"data_dvc_md5": DATA_MD5, "weights_dvc_md5": WEIGHTS_MD5, "git_commit": "abc123"}
    metrics = {"accuracy": 0.9, "macro_f1": 0.875, "n_test": 40}
    parity = {"max_abs_error": 2e-6, "max_rel_error": 1e-5, "argmax_agreement": 1.0}
    tags = version_tags(lineage, "run1", "s" * 64, "r" * 64, metrics, parity)
    assert tags["test_macro_f1"] == "0.875000" and "test_n_test" not in tags
    assert tags["run_id"] == "run1" and tags["onnx_sha256"] == "s" * 64 and tags["reference_sha256"] == "r" * 64
    text = version_description(metrics, parity, tags)
    assert "| macro_f1 | 0.8750 |" in text and "(40 test signals)" in text and "`abc123`" in text


def test_unreachable_uri_fails_after_backoff_with_the_uri() -> None:
    from cwtops.registry.server import require_reachable

    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(CwtopsError, match=dead.replace(".", r"\.") + ".*cwtops mlflow start"):
        require_reachable(dead, attempts=3, backoff=0.2)
    assert time.monotonic() - started >= 0.6  # waited 0.2 + 0.4 between the three probes


def test_with_retries_repeats_connection_errors_only() -> None:
    from cwtops.registry.server import with_retries

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise requests.ConnectionError("Connection refused")
        return "ok"

    assert with_retries(flaky, "http://x", attempts=3, backoff=0.01) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(ValueError):
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(ValueError("bad request")), "http://x", backoff=0.01)
    assert len(calls) == 1


def test_a_database_store_is_checked_before_the_server_starts_and_its_password_never_shown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cwtops.core.config import params_from_dict
    from cwtops.registry.server import check_database, masked, server_command, server_env

    uri = f"postgresql://mlflow:hunter2@127.0.0.1:{free_port()}/mlflow"  # nothing listens there
    with pytest.raises(CwtopsError, match="cannot reach the MLflow database") as refused:
        check_database(uri, timeout=5)
    assert "hunter2" not in str(refused.value) and "***" in str(refused.value) and "PGPASSWORD" in str(refused.value)
    with pytest.raises(CwtopsError, match="not a database URI"):
        check_database("nosuchdialect://host/db")
    assert masked(uri) == uri.replace("hunter2", "***") and masked("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.chdir(tmp_path)  # the webhook-secret key of a database store is kept in ./mlflow/
    params = params_from_dict({"mlflow": {"backend_store": uri}})
    assert not any("hunter2" in part for part in server_command(params.mlflow, 5000))  # `ps` shows argv
    assert server_env(params.mlflow)["MLFLOW_BACKEND_STORE_URI"] == uri


# ---------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def registered(fabricated_tree: FabricatedProject, mlflow_test_server: MlflowTestServer) -> dict:
    """track + register once for the module (the pipeline's last two steps)."""
    from cwtops.core.config import load_params
    from cwtops.registry import versions as registry
    from tasks import track

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(fabricated_tree.root)
        patch.setenv("CWTOPS_STATE_DIR", str(mlflow_test_server.state))
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_test_server.uri)
        patch.delenv("CWTOPS_MLFLOW_RUN_ID", raising=False)
        params = load_params()
        tracked = track.run(params.mlflow, params.base)
        result = registry.register(params)
    return {"params": params, "track": tracked, "register": result}


def _client(uri: str):  # noqa: ANN202
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_run_mirrors_params_epochs_figures_reports_and_lineage(registered: dict, in_fabricated: FabricatedProject) -> None:
    from cwtops.core.config import flatten
    from cwtops.registry.server import masked

    run_id = registered["track"].run_id
    assert json.loads(Path("artifacts/track/run.json").read_text())["run_id"] == run_id
    client = _client(in_fabricated.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    mirrored = {k: v for k, v in run.data.params.items() if not k.startswith("resolved.")}  # + what `auto` became
    # what made the model: every stage's params as dvc.lock records them, and track's own (base, mlflow)
    made_by = ("base", "parse", "balance", "tune", "train", "evaluate", "export", "parity", "mlflow")
    expected = {k: v for k, v in flatten(registered["params"]).items() if k.split(".")[0] in made_by}
    expected["mlflow.backend_store"] = masked(expected["mlflow.backend_store"])
    assert mirrored == expected and run.data.params["train.epochs"] == str(EPOCHS)
    assert not any(key.startswith(("triton.", "rollout.", "variants.")) for key in mirrored)
    for name in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == list(range(1, EPOCHS + 1)), name
    assert run.data.metrics["test_macro_f1"] == pytest.approx(0.885714)
    assert run.data.metrics["parity_passed"] == 1.0
    tags = run.data.tags
    assert (tags["data_dvc_md5"], tags["weights_dvc_md5"], tags["git_commit"]) == (DATA_MD5, WEIGHTS_MD5, in_fabricated.commit)
    assert tags["split_manifest_sha256"] == sha256_file("artifacts/balance/split_manifest.csv")
    assert "macro_f1 0.8857" in tags["mlflow.note.content"] and tags["mlflow.source.git.commit"] == in_fabricated.commit
    listed = {a.path for folder in ("figures", "evaluation", "parity", "onnx") for a in client.list_artifacts(run_id, folder)}
    assert {"figures/confusion_matrix.png", "figures/learning_curves.png", "figures/scalogram_gallery.png",
            "evaluation/report.txt", "evaluation/report.json", "parity/report.json", "onnx/model.onnx"} <= listed
    dataset_input = run.inputs.dataset_inputs[0]
    assert dataset_input.dataset.digest == DATA_MD5 and json.loads(dataset_input.dataset.profile)["num_rows"] == 18
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"


@pytest.mark.slow
def test_mirrored_figure_is_a_png_drawn_from_the_files(registered: dict, in_fabricated: FabricatedProject, tmp_path: Path) -> None:
    client = _client(in_fabricated.uri)
    local = Path(client.download_artifacts(registered["track"].run_id, "figures/scalogram_gallery.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and local.stat().st_size > 10_000


@pytest.mark.slow
def test_version_carries_lineage_and_the_parity_checked_onnx(registered: dict, in_fabricated: FabricatedProject, tmp_path: Path) -> None:
    import onnxruntime as ort

    from cwtops.registry.versions import download_version, register

    params, first = registered["params"], registered["register"]
    assert first.created
    again = register(params)
    assert (again.version, again.created) == (first.version, False)  # idempotent per run and file
    client = _client(in_fabricated.uri)
    entry = client.get_model_version(params.base.model_name, str(first.version))
    assert entry.run_id == registered["track"].run_id == entry.tags["run_id"]
    assert (entry.tags["data_dvc_md5"], entry.tags["weights_dvc_md5"], entry.tags["git_commit"]) == (DATA_MD5, WEIGHTS_MD5, in_fabricated.commit)
    assert "| macro_f1 | 0.8857 |" in entry.description
    files = download_version(params, first.version, tmp_path)
    parity_sha = json.loads(Path("artifacts/parity/report.json").read_text())["onnx_sha256"]
    assert sha256_file(files.onnx) == parity_sha == entry.tags["onnx_sha256"]
    assert files.reference.read_bytes() == Path("artifacts/parity/reference.npz").read_bytes()
    reference = np.load(files.reference)
    session = ort.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"])
    served = session.run(["logits"], {"signal": reference["inputs"]})[0]
    np.testing.assert_allclose(served, reference["outputs"], atol=1e-4, rtol=1e-3)
    logged = client.get_logged_model(entry.source.removeprefix("models:/"))
    assert logged.experiment_id == registered["track"].experiment_id  # beside its run, not in experiment 0


@pytest.mark.slow
def test_promote_sets_the_alias_the_ui_sets(registered: dict, in_fabricated: FabricatedProject) -> None:
    from typer.testing import CliRunner

    from cwtops.cli.app import app
    from cwtops.registry.versions import list_versions, production_version, promote, resolve_version, set_version_tags

    params, version = registered["params"], registered["register"].version
    assert production_version(params) in (None, version)
    promote(params, version)
    client = _client(in_fabricated.uri)
    assert client.get_model_version_by_alias(params.base.model_name, "production").version == str(version)
    assert production_version(params) == resolve_version(params, None) == version
    set_version_tags(params, version, {"deployment_status": "serving"})
    row = next(r for r in list_versions(params) if r["version"] == version)
    assert row["aliases"] == ["production"] and row["deployment_status"] == "serving"
    assert row["metric"] == pytest.approx(0.885714)
    runner = CliRunner()
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0 and "production" in listing.output and "serving" in listing.output
    missing = runner.invoke(app, ["promote", "999"])
    assert isinstance(missing.exception, CwtopsError) and "no version 999" in str(missing.exception)
    with pytest.raises(CwtopsError, match="no version 999"):
        resolve_version(params, 999)


def _versions(uri: str, name: str) -> list[str]:
    return sorted(v.version for v in _client(uri).search_model_versions(f"name = '{name}'"))


@pytest.mark.slow
def test_failed_parity_is_never_registered(registered: dict, in_fabricated: FabricatedProject) -> None:
    from cwtops.registry.versions import register

    params = registered["params"]
    report_path = Path("artifacts/parity/report.json")
    original = report_path.read_text()
    before = _versions(in_fabricated.uri, params.base.model_name)
    try:
        report_path.write_text(json.dumps({**json.loads(original), "passed": False}))
        with pytest.raises(CwtopsError, match="parity did not pass"):
            register(params)
        report_path.write_text(json.dumps({**json.loads(original), "onnx_sha256": "0" * 64}))
        with pytest.raises(CwtopsError, match="not the file parity checked"):
            register(params)
    finally:
        report_path.write_text(original)
    assert _versions(in_fabricated.uri, params.base.model_name) == before


@pytest.mark.slow
def test_unreachable_mlflow_fails_cleanly_and_touches_nothing(registered: dict, in_fabricated: FabricatedProject, monkeypatch: pytest.MonkeyPatch) -> None:
    from cwtops.registry.versions import register
    from tasks import track

    files = sorted(p for p in Path("artifacts").rglob("*") if p.is_file())
    before = {p: sha256_file(p) for p in files}
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    started = time.monotonic()
    with pytest.raises(CwtopsError, match=dead.replace(".", r"\.") + ".*cwtops mlflow start.*MLFLOW_TRACKING_URI"):
        register(registered["params"])
    assert time.monotonic() - started >= 3.0  # three probes, 1 s and 2 s apart
    with pytest.raises(CwtopsError, match=dead.replace(".", r"\.")):
        track.run(registered["params"].mlflow, registered["params"].base)
    assert {p: sha256_file(p) for p in sorted(p for p in Path("artifacts").rglob("*") if p.is_file())} == before


@pytest.mark.slow
def test_track_logs_into_the_orchestrators_run(registered: dict, in_fabricated: FabricatedProject, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import track

    client = _client(in_fabricated.uri)
    opened = client.create_run(registered["track"].experiment_id, run_name="prefect-flow-run").info.run_id
    run_json = Path("artifacts/track/run.json")
    original = run_json.read_text()
    monkeypatch.setenv("CWTOPS_MLFLOW_RUN_ID", opened)
    try:
        result = track.run(registered["params"].mlflow, registered["params"].base)
        assert result.run_id == opened and not result.created
        assert json.loads(run_json.read_text())["run_id"] == opened
        run = client.get_run(opened)
        assert run.info.status == "RUNNING"  # the orchestrator ends its own run
        assert len(client.get_metric_history(opened, "val_macro_f1")) == EPOCHS
    finally:
        run_json.write_text(original)
    monkeypatch.setenv("CWTOPS_MLFLOW_RUN_ID", "0" * 32)
    with pytest.raises(CwtopsError, match="CWTOPS_MLFLOW_RUN_ID"):
        track.run(registered["params"].mlflow, registered["params"].base)


@pytest.mark.slow
def test_server_delivers_alias_webhooks_to_a_receiver_on_127_0_0_1(registered: dict, in_fabricated: FabricatedProject) -> None:
    """The server's environment allows http webhooks to private addresses (the local receiver)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[dict, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = _client(in_fabricated.uri)
    name, version = registered["params"].base.model_name, str(registered["register"].version)
    hook = client.create_webhook("test-receiver", f"http://127.0.0.1:{server.server_port}/mlflow/webhook",
                                 ["model_version_alias.created"], secret="s3cret")
    try:
        time.sleep(2.5)  # MLFLOW_WEBHOOK_CACHE_TTL=2: the server sees the new webhook after this
        client.set_registered_model_alias(name, "candidate", version)
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        client.delete_webhook(hook.webhook_id)
        client.delete_registered_model_alias(name, "candidate")
        server.shutdown()
    assert received, "no webhook delivery reached 127.0.0.1"
    headers, body = received[0]
    assert json.loads(body)["data"]["alias"] == "candidate"
    assert any(key.lower() == "x-mlflow-signature" for key in headers)


@pytest.mark.slow
def test_rollout_serves_the_production_alias_and_follows_it(registered: dict, in_fabricated: FabricatedProject,
                                                           mlflow_test_server: MlflowTestServer, tmp_path: Path) -> None:
    """The reconciler against a real Triton, with the registry on this backend (SQLite or PostgreSQL)."""
    from cwtops.core.config import params_from_dict
    from cwtops.registry import versions as registry
    from cwtops.serving import server as triton_server
    from cwtops.serving.publish import served_version
    from cwtops.serving.rollout import reconcile
    from tasks import track

    settings = yaml.safe_load((in_fabricated.root / "params.yaml").read_text())
    settings["triton"] = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port(),
                          "model_repository": str(tmp_path / "model_repository")}
    params = params_from_dict(settings)
    first = registered["register"].version
    track.run(params.mlflow, params.base)
    second = registry.register(params).version
    triton_server.start(params, wait=120)
    try:
        registry.promote(params, first)
        assert reconcile(params).action == "rolled_out" and served_version(params) == first
        registry.promote(params, second)
        outcome = reconcile(params)
        assert (outcome.action, outcome.served, served_version(params)) == ("rolled_out", second, second)
        assert reconcile(params).action == "noop"
    finally:
        triton_server.stop(params)
    client = _client(in_fabricated.uri)
    tags = {v: client.get_model_version(params.base.model_name, str(v)).tags.get("deployment_status") for v in (first, second)}
    assert tags == {first: "retired", second: "serving"}
    if mlflow_test_server.cluster is not None:  # the registry really lives in PostgreSQL
        import psycopg2

        with psycopg2.connect(mlflow_test_server.backend,
                              password=mlflow_test_server.cluster.password) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT version FROM model_version_tags WHERE name = %s AND key = 'deployment_status' AND value = 'serving'",
                           (params.base.model_name,))
            assert [int(row[0]) for row in cursor.fetchall()] == [second]


@pytest.mark.slow
@pytest.mark.parametrize("mlflow_test_server", ["postgresql"], indirect=True)
def test_register_through_a_postgresql_restart_is_retried_or_refused_never_half_done(
        registered: dict, in_fabricated: FabricatedProject, mlflow_test_server: MlflowTestServer) -> None:
    """The database restarts while `register` talks to MLflow: the version is registered whole (tags,
    description, ONNX), or the command fails naming the server; a rerun then leaves exactly one."""
    import threading

    from cwtops.registry import versions as registry
    from tasks import track

    params, cluster = registered["params"], mlflow_test_server.cluster
    assert cluster is not None
    tracked = track.run(params.mlflow, params.base)  # a new run: register has a new version to create
    outcome: list = []

    def register() -> None:
        try:
            outcome.append(registry.register(params))
        except CwtopsError as error:
            outcome.append(error)

    worker = threading.Thread(target=register)
    cluster.stop()  # down when register starts talking to MLflow, back two seconds later
    worker.start()
    time.sleep(2)
    cluster.start()
    worker.join(300)
    assert outcome, "register did not return"
    print(f"register during the restart: {outcome[0]!r}")
    if isinstance(outcome[0], CwtopsError):
        assert in_fabricated.uri in str(outcome[0]) or "MLflow" in str(outcome[0]), outcome[0]
    again = registry.register(params)  # the rerun a flow's retry or a person does
    client = _client(in_fabricated.uri)
    mine = [v for v in client.search_model_versions(f"name = '{params.base.model_name}'") if v.run_id == tracked.run_id]
    assert [int(v.version) for v in mine] == [again.version]  # one version for the run, never two
    if not isinstance(outcome[0], CwtopsError):
        assert outcome[0].version == again.version
    version = client.get_model_version(params.base.model_name, str(again.version))
    assert version.tags["parity_passed"] == "true" and version.tags["onnx_sha256"] == again.onnx_sha256
    assert version.description.startswith("ONNX export, parity-checked")


# ---------------------------------------------------------------- the server itself


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_server_lifecycle_with_s3_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idempotent start, artifacts proxied to S3 (moto), stop, stale PID file."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cwtops.core.config import params_from_dict
    from cwtops.registry import server as tracking

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    moto.start()
    endpoint = f"http://127.0.0.1:{moto._server.server_port}"
    for key, value in {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "CWTOPS_STATE_DIR": str(tmp_path / "state")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="mlflow")
    params = params_from_dict({"mlflow": {"port": free_port(), "backend_store": f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}",
                                          "artifacts_destination": "s3://mlflow/artifacts"}})
    try:
        first = tracking.start(params.mlflow, wait=180)
        assert first["started"] and tracking.start(params.mlflow)["started"] is False  # idempotent
        assert tracking.status(params.mlflow)["healthy"] and tracking.status(params.mlflow)["pid"] == first["pid"]
        client = _client(first["uri"])
        run_id = client.create_run(client.create_experiment("s3")).info.run_id
        client.log_text(run_id, "hello", "notes/hello.txt")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(key.endswith("notes/hello.txt") for key in keys), keys
    finally:
        stopped = tracking.stop(params.mlflow)
        moto.stop()
    assert stopped and not tracking.status(params.mlflow)["healthy"] and tracking.status(params.mlflow)["pid"] is None
    assert tracking.stop(params.mlflow) is False
    tracking.MLFLOW.pid_file.write_text(str(_dead_pid()))  # a stale PID file from a crashed server
    assert tracking.status(params.mlflow)["pid"] is None and not tracking.MLFLOW.pid_file.exists()


def test_resolved_settings_name_what_auto_became() -> None:
    from tasks.track import resolved_settings

    summary = {"selected_by": "train_loss", "settings": {"hop": 2, "members": 3, "epochs": 300, "batch_size": 8,
                                                         "patience": 300, "signal_length": 577, "n_train": 60,
                                                         "derived": ["parse.hop", "train.members"]}}
    resolved = resolved_settings(summary, {"fitted_to_signals": False})
    assert resolved["parse.hop"] == 2 and resolved["train.members"] == 3 and resolved["data.n_train"] == 60
    assert resolved["derived"] == "parse.hop,train.members" and resolved["train.selected_by"] == "train_loss"
    assert resolved["parse.bank"] == "as written in the file" and "parse.bank_w0" not in resolved
    fitted = resolved_settings(summary, {"fitted_to_signals": True, "default_w0": [6.0, 3.0]})
    assert fitted["parse.bank"] == "default bank fitted to the signals" and fitted["parse.bank_w0"] == "6, 3"
    assert resolved_settings({}) == {}


def test_track_logs_what_each_stage_ran_with_from_dvc_lock(tmp_path: Path) -> None:
    """The params a run is logged with are those dvc.lock records per stage, plus track's own
    sections; a database password never reaches MLflow."""
    from cwtops.core.config import params_from_dict
    from tasks.track import ran_with

    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "parse": {"params": {"params.yaml": {"base.raw_dir": "data/raw", "parse": {"hop": "auto", "bank": "auto"}}}},
        "train": {"params": {"params.yaml": {"base.seed": 7, "train": {"epochs": 12, "channels": [8, 8, 16, 16]}}}},
    }}))
    params = params_from_dict({"base": {"seed": 7}, "mlflow": {"backend_store": "postgresql://cwtops:hunter2@127.0.0.1:5432/mlflow"}})
    logged = ran_with(params.mlflow, params.base, lock)
    assert logged["parse.hop"] == "auto" and logged["train.epochs"] == "12" and logged["train.channels"] == "[8, 8, 16, 16]"
    assert logged["base.seed"] == "7" and logged["mlflow.experiment"] == params.mlflow.experiment
    assert "hunter2" not in logged["mlflow.backend_store"] and "127.0.0.1:5432" in logged["mlflow.backend_store"]
    assert not any(key.startswith("triton.") for key in logged)
    assert ran_with(params.mlflow, params.base, tmp_path / "absent.lock").keys() == {
        key for key in logged if key.startswith(("base.", "mlflow."))}

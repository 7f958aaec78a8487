"""S3 against moto's ThreadedMotoServer on 127.0.0.1 (the stand-in DVC and MLflow test with): the DVC
remote (push, empty cache, pull), MLflow's artifact store behind a real `mlflow server`, and Triton's
model repository on S3 (a real `tritonserver` reading it: publish, load, infer, roll back, restart).

Credentials are fake and live only in this module's environment; the secret is distinctive so the
tests can check it never reaches a file we write or a server log.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import onnxruntime as ort
import pytest
from moto.server import ThreadedMotoServer

from bench.scratch import free_port
from cwtops.core.config import Params, params_from_dict
from cwtops.core.errors import CwtopsError
from tests.conftest import run
from tests.test_triton import export_tiny_model, make_params, parse_config, write_reference

BUCKET = "cwtops-test"
FAKE_SECRET = "moto-fake-secret-7f3c9a1e"  # moto takes any credentials; distinctive, so a leak is visible
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
slow = pytest.mark.slow


@dataclass(frozen=True)
class Moto:
    endpoint: str
    s3: Any  # a boto3 S3 client on the moto server

    def keys(self, prefix: str) -> list[str]:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    """A moto S3 server on a free port of 127.0.0.1 with one bucket; fake credentials for this module only."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    with pytest.MonkeyPatch.context() as patch:
        for key in (*ENDPOINT_VARIABLES, "AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI"):
            patch.delenv(key, raising=False)  # the endpoint is set per test: each proves its own route to it
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        try:
            yield Moto(endpoint, s3)
        finally:
            server.stop()


def _digests(root: Path, paths: list[str]) -> dict[str, str]:
    files = sorted(p for name in paths for p in ([root / name] if (root / name).is_file() else (root / name).rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _assert_no_secret(*folders: Path) -> None:
    for folder in folders:
        for path in (p for p in folder.rglob("*") if p.is_file()):
            assert FAKE_SECRET.encode() not in path.read_bytes(), f"the AWS secret leaked into {path}"


# ---- pure helpers (no server) ---------------------------------------------------------------------


def test_s3_locations_parse_and_bad_ones_are_refused_with_the_fix() -> None:
    from cwtops.core.s3 import S3Location, parse_s3_url, triton_url

    assert parse_s3_url("s3://models/prod/repo/") == S3Location("models", "prod/repo")
    assert parse_s3_url("s3://models").key("cwtops", "1", "model.onnx") == "cwtops/1/model.onnx"
    assert triton_url(S3Location("models", "repo"), "http://127.0.0.1:9000") == "s3://http://127.0.0.1:9000/models/repo"
    assert triton_url(S3Location("models", "repo"), "https://minio.example.com") == "s3://https://minio.example.com:443/models/repo"
    with pytest.MonkeyPatch.context() as patch:
        for key in ENDPOINT_VARIABLES:
            patch.delenv(key, raising=False)
        assert triton_url(S3Location("models", "repo")) == "s3://models/repo"  # AWS itself: Triton's plain form
    with pytest.raises(CwtopsError, match="AWS_ENDPOINT_URL_S3"):
        parse_s3_url("s3://127.0.0.1:9000/models/repo")  # Triton's host:port form belongs in the environment
    with pytest.raises(CwtopsError, match="no path"):
        triton_url(S3Location("models"), "http://minio:9000/some/path")
    for bad, key in (("s3://Models_Bucket/x", "mlflow.artifacts_destination"), ("s3://models/a b", "triton.model_repository")):
        section, field = key.split(".")
        with pytest.raises(CwtopsError, match=key.replace(".", r"\.")):
            params_from_dict({section: {field: bad}})
    assert params_from_dict({"triton": {"model_repository": "s3://models/repo"}}).triton.model_repository == "s3://models/repo"


def test_a_missing_bucket_is_named_before_any_server_starts(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cwtops.registry import server as tracking

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint)
    monkeypatch.setenv("CWTOPS_STATE_DIR", str(tmp_path / "state"))
    params = params_from_dict({"mlflow": {"port": free_port(), "backend_store": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                          "artifacts_destination": "s3://no-such-bucket/mlflow"}})
    with pytest.raises(CwtopsError, match=r"s3://no-such-bucket/mlflow.*create the bucket"):
        tracking.start(params.mlflow, wait=30)
    assert tracking.status(params.mlflow)["pid"] is None


def test_an_upload_that_reads_back_other_bytes_is_removed(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cwtops.core import s3 as s3_helpers

    path = tmp_path / "model.onnx"
    path.write_bytes(np.random.default_rng(1).bytes(10_000))
    assert s3_helpers.upload_verified(moto.s3, path, BUCKET, "check/ok.onnx") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert moto.read("check/ok.onnx") == path.read_bytes()
    monkeypatch.setattr(s3_helpers, "_object_sha256", lambda *_: "0" * 64)  # the read-back disagrees (a corrupted upload)
    with pytest.raises(CwtopsError, match="differ"):
        s3_helpers.upload_verified(moto.s3, path, BUCKET, "check/bad.onnx")
    assert moto.keys("check/") == ["check/ok.onnx"]


# ---- DVC remote -----------------------------------------------------------------------------------


@slow
def test_dvc_push_then_pull_into_an_empty_cache_gives_the_same_bytes(moto: Moto, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    rng = np.random.default_rng(3)
    for label in ("alpha", "beta"):
        (root / "data" / "raw" / label).mkdir(parents=True)
        np.save(root / "data" / "raw" / label / "signals.npy", rng.standard_normal((20, 256)).astype(np.float32))
    (root / "my.txt").write_text("conv5.weight: tensor([[[ 1.0e-03, -2.5e-04,  3.0e-03]]])\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}  # endpoint only in DVC's config: that is what is tested
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], root, env)
    run([*dvc, "init", "-q"], root, env)
    run([*dvc, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc"], root, env)
    run([*dvc, "remote", "modify", "storage", "endpointurl", moto.endpoint], root, env)
    run([*dvc, "add", "-q", "data/raw", "my.txt"], root, env)
    before = _digests(root, ["data/raw", "my.txt"])
    run([*dvc, "push"], root, env)
    stored = moto.keys("dvc/files/md5/")
    assert len(stored) >= len(before) + 1, stored  # every file and the directory listing (.dir)

    for gone in (root / ".dvc" / "cache", root / "data" / "raw"):
        shutil.rmtree(gone)
    (root / "my.txt").unlink()
    run([*dvc, "pull"], root, env)
    assert _digests(root, ["data/raw", "my.txt"]) == before
    assert "endpointurl" in (root / ".dvc" / "config").read_text()
    _assert_no_secret(root / ".dvc")


# ---- MLflow artifact store ------------------------------------------------------------------------


@slow
def test_mlflow_artifacts_are_proxied_to_s3_and_come_back_identical(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from cwtops.registry import server as tracking
    from mlflow import MlflowClient

    monkeypatch.setenv("CWTOPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint)  # the standard variable; the server gets MLflow's own
    params = params_from_dict({"mlflow": {"port": free_port(), "backend_store": f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}",
                                          "artifacts_destination": f"s3://{BUCKET}/mlflow"}})
    assert tracking.server_env(params.mlflow)["MLFLOW_S3_ENDPOINT_URL"] == moto.endpoint
    info = tracking.start(params.mlflow, wait=180)
    try:
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)  # from here the client reaches S3 only through the tracking server
        payload = np.random.default_rng(5).bytes(300_000)
        (tmp_path / "blob").mkdir()
        (tmp_path / "blob" / "model.bin").write_bytes(payload)
        client = MlflowClient(info["uri"])
        run_id = client.create_run(client.create_experiment("s3")).info.run_id
        client.log_artifact(run_id, str(tmp_path / "blob" / "model.bin"), "blobs")
        assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        back = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="blobs/model.bin",
                                                   dst_path=str(tmp_path / "back"), tracking_uri=info["uri"])
        assert Path(back).read_bytes() == payload
        stored = [key for key in moto.keys("mlflow/") if key.endswith(f"{run_id}/artifacts/blobs/model.bin")]
        assert len(stored) == 1 and moto.read(stored[0]) == payload
    finally:
        assert tracking.stop(params.mlflow)
    _assert_no_secret(tmp_path / "state")


# ---- Triton model repository on S3 ----------------------------------------------------------------


@dataclass(frozen=True)
class TritonOnS3:
    url: str
    params: Params
    prefix: str  # the repository's key prefix in the bucket
    root: Path  # local files: models, references, state
    a: Path
    b: Path
    reference_a: Path
    reference_b: Path
    reference_bad: Path


@pytest.fixture(scope="module")
def s3_triton(moto: Moto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonOnS3]:
    """A real tritonserver whose model repository is `s3://cwtops-test/triton/repo` on moto."""
    from cwtops.serving.server import start, stop

    root = tmp_path_factory.mktemp("triton-s3")
    a, b = export_tiny_model(root / "a.onnx", 0), export_tiny_model(root / "b.onnx", 1)
    params = make_params(f"s3://{BUCKET}/triton/repo", (free_port(), free_port(), free_port()))  # type: ignore[arg-type]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CWTOPS_STATE_DIR", str(root / "state"))
        patch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint)
        patch.delenv("CWTOPS_TRITON_API_KEY", raising=False)
        info = start(params, wait=120)
        try:
            yield TritonOnS3(info.url, params, "triton/repo", root, a, b, write_reference(a, root / "ref_a.npz"),
                             write_reference(b, root / "ref_b.npz"), write_reference(a, root / "ref_bad.npz", shift=1.0))
        finally:
            stop(params)


def _served_logits(server: TritonOnS3, onnx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from cwtops.serving.client import infer

    signals = np.load(server.reference_a)["inputs"]
    expected = ort.InferenceSession(str(onnx_path)).run(None, {"signal": signals})[0]
    return infer(server.url, "tiny", signals), expected


@slow
def test_triton_loads_a_version_published_to_s3_and_serves_it(s3_triton: TritonOnS3, moto: Moto) -> None:
    from cwtops.serving.publish import publish_version, served_versions
    from cwtops.serving.server import _record_file

    result = publish_version(s3_triton.a, 1, s3_triton.params, reference=s3_triton.reference_a, url=s3_triton.url)
    assert result.created and result.served_max_abs_error is not None and result.served_max_abs_error < 1e-5
    assert served_versions(s3_triton.url, "tiny") == [1]
    served, expected = _served_logits(s3_triton, s3_triton.a)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)

    keys = moto.keys(s3_triton.prefix + "/")
    expected_keys = ["README.txt", "tiny/1/model.onnx", "tiny/config.pbtxt", "tiny/labels.txt"]  # no staging copy left
    assert sorted(keys) == [f"{s3_triton.prefix}/{key}" for key in expected_keys]
    assert moto.read(f"{s3_triton.prefix}/tiny/1/model.onnx") == s3_triton.a.read_bytes()
    config = parse_config(moto.read(f"{s3_triton.prefix}/tiny/config.pbtxt").decode())
    assert config.platform == "onnxruntime_onnx" and list(config.version_policy.specific.versions) == [1]
    assert moto.read(f"{s3_triton.prefix}/tiny/labels.txt") == b"alpha\nbeta\ngamma\n"
    assert f"s3://{moto.endpoint}/{BUCKET}/{s3_triton.prefix}" in _record_file().read_text()  # Triton read S3 itself


@slow
def test_s3_rollout_retires_the_old_version_and_a_failed_one_is_rolled_back(s3_triton: TritonOnS3, moto: Moto) -> None:
    from cwtops.cli.triton import next_version_on_disk
    from cwtops.serving.publish import publish_version, served_versions

    config_key = f"{s3_triton.prefix}/tiny/config.pbtxt"
    publish_version(s3_triton.b, 2, s3_triton.params, reference=s3_triton.reference_b, url=s3_triton.url)
    assert served_versions(s3_triton.url, "tiny") == [2]
    assert list(parse_config(moto.read(config_key).decode()).version_policy.specific.versions) == [2]
    before = moto.read(config_key)

    with pytest.raises(CwtopsError, match="rolled back"):  # served outputs differ from the reference
        publish_version(s3_triton.a, 3, s3_triton.params, reference=s3_triton.reference_bad, url=s3_triton.url)
    assert moto.read(config_key) == before
    assert not moto.keys(f"{s3_triton.prefix}/tiny/3/") and not moto.keys(f"{s3_triton.prefix}/tiny.candidate/")
    with pytest.raises(CwtopsError, match="immutable"):  # other bytes under a taken number, refused before any write
        publish_version(s3_triton.a, 2, s3_triton.params, url=s3_triton.url)
    assert served_versions(s3_triton.url, "tiny") == [2]
    assert next_version_on_disk(s3_triton.params) == 3  # `cwtops publish --onnx` numbers from the bucket
    served, expected = _served_logits(s3_triton, s3_triton.b)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


@slow
def test_a_restarted_triton_serves_what_the_s3_repository_holds(s3_triton: TritonOnS3, moto: Moto) -> None:
    from cwtops.serving.publish import served_versions
    from cwtops.serving.server import repository_location, start, stop

    location, models = repository_location(s3_triton.params)
    assert location == f"s3://{moto.endpoint}/{BUCKET}/{s3_triton.prefix}" and models == ["tiny"]
    assert stop(s3_triton.params)
    info = start(s3_triton.params, wait=120)
    assert info.started and served_versions(s3_triton.url, "tiny") == [2]
    served, expected = _served_logits(s3_triton, s3_triton.b)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)
    _assert_no_secret(s3_triton.root / "state")


def test_inference_log_on_s3_written_where_ssl_cannot_load_and_read_back(moto: Moto, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving backend's log (in a stub that cannot import `ssl`, as the local Triton's) lands
    on S3 whole, and the monitoring passes read it from there."""
    from cwtops.monitoring.logs import read_log
    from tests.test_monitoring import run_without_ssl

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint)
    run_without_ssl(f"""
log = module.InferenceLog("s3://{BUCKET}/inference", "m", 2, ["a", "b"], 1.0, flush_seconds=0.05)
for i in range(3):
    log.offer(f"r{{i}}", np.full((1, 1, 16), i, np.float32), np.array([[0.0, 1.0]], np.float32))
log.close(timeout=60)
assert log.stats.written == 3 and log.stats.failed == 0, log.stats
""", timeout=180)
    assert all(key.endswith(".parquet") for key in moto.keys("inference/model=m/version=2/"))
    logged = read_log(f"s3://{BUCKET}/inference", "m")
    assert list(logged.frame.request_id) == ["r0", "r1", "r2"] and list(logged.frame.predicted) == ["b"] * 3
    np.testing.assert_array_equal(logged.signals[:, 0], [0.0, 1.0, 2.0])

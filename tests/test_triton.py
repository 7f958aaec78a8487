"""Triton against a real `tritonserver` on 127.0.0.1: publish, infer, batch, refuse, roll out."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests

pytestmark = pytest.mark.slow


@pytest.fixture()
def params(in_project: Path):
    from tasks.config import load_params

    return load_params()


@pytest.fixture()
def published(params, triton_server: str, in_project: Path) -> tuple[str, int]:
    from tasks.triton_publish import publish_version

    art = in_project / "artifacts"
    result = publish_version(art / "export/model.onnx", 1, params, reference=art / "parity/reference.npz", url=triton_server)
    return triton_server, result.version


def test_served_logits_match_onnxruntime(published, in_project: Path, params) -> None:
    from tasks.triton_client import infer

    url, version = published
    signals = np.load(in_project / "artifacts/parity/reference.npz")["inputs"]
    session = ort.InferenceSession(str(in_project / "artifacts/export/model.onnx"))
    expected = session.run(None, {"signal": signals})[0]
    served = infer(url, params.base.model_name, signals, version=version)
    assert np.abs(served - expected).max() <= 1e-5


def test_metadata_and_config_follow_the_model(published, params, in_project: Path) -> None:
    url, _ = published
    name = params.base.model_name
    reference = np.load(in_project / "artifacts/parity/reference.npz")
    length, classes = reference["inputs"].shape[2], reference["outputs"].shape[1]
    metadata = requests.get(f"http://{url}/v2/models/{name}", timeout=10).json()
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"][0]["shape"] == [-1, 1, length]
    assert metadata["outputs"][0]["shape"] == [-1, classes]
    config = requests.get(f"http://{url}/v2/models/{name}/config", timeout=10).json()
    assert "dynamic_batching" in config and config["max_batch_size"] == params.triton.max_batch_size


def test_concurrent_single_requests_are_batched(published, params, in_project: Path) -> None:
    from tasks.triton_client import connect, infer

    url, _ = published
    name = params.base.model_name
    data = np.load(in_project / "artifacts/parity/reference.npz")
    signals, expected = data["inputs"], data["outputs"]
    client = connect(url, concurrency=64)
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: infer(url, name, signals[i % len(signals)][None], client=connect(url)), range(64)))
    for i, logits in enumerate(results):
        assert np.argmax(logits) == np.argmax(expected[i % len(signals)])
    stats = requests.get(f"http://{url}/v2/models/{name}/stats", timeout=10).json()["model_stats"]
    sizes = [entry["batch_size"] for model in stats for entry in model.get("batch_stats", [])]
    assert max(sizes) > 1, f"no batched execution: {sizes}"
    client.close()


@pytest.mark.parametrize("bad", ["length", "dtype"])
def test_bad_request_gets_clear_error_and_server_keeps_serving(published, params, in_project: Path, bad: str) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from tasks.triton_client import connect, infer

    url, _ = published
    name = params.base.model_name
    length = np.load(in_project / "artifacts/parity/reference.npz")["inputs"].shape[2]
    array = np.zeros((1, 1, length + 7), np.float32) if bad == "length" else np.zeros((1, 1, length), np.float64)
    tensor = httpclient.InferInput("signal", list(array.shape), "FP32" if bad == "length" else "FP64")
    tensor.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as error:
        connect(url).infer(name, [tensor])
    assert ("shape" in str(error.value) or "dims" in str(error.value)) if bad == "length" else ("FP64" in str(error.value) or "dtype" in str(error.value) or "data-type" in str(error.value))
    assert infer(url, name, np.zeros((1, length), np.float32)).shape[0] == 1


def test_config_that_disagrees_is_refused_before_writing(params, triton_server: str, in_project: Path, tmp_path: Path) -> None:
    import onnx

    from tasks.errors import CwtopsError
    from tasks.triton_publish import publish_version

    model = onnx.load(str(in_project / "artifacts/export/model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # a fixed batch axis
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    repository = in_project / params.triton.model_repository
    before = sorted(str(p) for p in repository.rglob("*")) if repository.exists() else []
    with pytest.raises(CwtopsError, match="fixed batch axis"):
        publish_version(fixed, 99, params, url=triton_server)
    after = sorted(str(p) for p in repository.rglob("*")) if repository.exists() else []
    assert before == after


def test_rollout_under_load_never_fails_and_bad_reference_rolls_back(published, params, in_project: Path, tmp_path: Path) -> None:
    from tasks.errors import CwtopsError
    from tasks.triton_client import infer
    from tasks.triton_publish import publish_version, served_versions

    url, _ = published
    name = params.base.model_name
    art = in_project / "artifacts"
    signals = np.load(art / "parity/reference.npz")["inputs"][:1]
    failures, done, stop = [], [0], threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                infer(url, name, signals)
                done[0] += 1
            except Exception as error:  # noqa: BLE001 - every failure counts
                failures.append(str(error))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        publish_version(art / "export/model.onnx", 2, params, reference=art / "parity/reference.npz", url=url)
        data = np.load(art / "parity/reference.npz")
        bad = tmp_path / "bad_reference.npz"
        np.savez(bad, inputs=data["inputs"], outputs=data["outputs"] + 1.0)
        with pytest.raises(CwtopsError, match="differ from its reference"):
            publish_version(art / "export/model.onnx", 3, params, reference=bad, url=url)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert not failures, failures[:3]
    assert done[0] > 20
    assert served_versions(url, name) == [2]
    assert not (in_project / params.triton.model_repository / name / "3").exists()

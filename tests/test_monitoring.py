"""The production loop without servers: input features and PSI, the inference log's writer and
reader, the backend's logging (a failing store never fails a request), feedback, shadow comparison."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cwtops.core.errors import CwtopsError
from cwtops.monitoring.features import FEATURES, build_reference, psi, signal_features
from cwtops.monitoring.logs import read_log

ROOT = Path(__file__).resolve().parent.parent


def inference_log_module():  # noqa: ANN201 - the backend's module, loaded as the backend loads it
    spec = importlib.util.spec_from_file_location("cwtops_backend_inference_log", ROOT / "cwtops/serving/backend/inference_log.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def chirps(n: int, length: int = 256, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length)
    freq = rng.uniform(3, 8, size=(n, 1)) * (1 + shift)
    return (np.sin(2 * np.pi * freq * t) + 0.2 * rng.standard_normal((n, length))).astype(np.float32)


# ---------------------------------------------------------------- features and PSI


def test_features_have_one_column_per_name_and_bands_sum_to_one() -> None:
    features = signal_features(chirps(20))
    assert features.shape == (20, len(FEATURES))
    bands = features[:, [FEATURES.index(f"band_{i}") for i in range(8)]]
    np.testing.assert_allclose(bands.sum(axis=1), 1.0, atol=1e-9)
    assert signal_features(np.ones((3, 24), np.float32)).shape == (3, len(FEATURES))  # flat and short signals too


def test_psi_is_small_for_the_same_source_and_large_for_a_shift() -> None:
    reference = build_reference(signal_features(chirps(600, seed=1)))
    same = psi(reference, signal_features(chirps(300, seed=2)))
    shifted = psi(reference, signal_features(chirps(300, shift=2.0, seed=3)))
    noisy = psi(reference, signal_features(chirps(300, seed=4) + np.random.default_rng(5).normal(0, 1.5, (300, 256)).astype(np.float32)))
    assert max(same.values()) < 0.25, same
    assert max(shifted.values()) > 1.0, shifted
    assert max(noisy.values()) > 1.0, noisy


def test_small_training_sets_get_fewer_bins_so_the_same_source_is_not_drift() -> None:
    small = build_reference(signal_features(chirps(30, seed=1)))
    assert all(len(entry["expected"]) <= 2 for entry in small["features"].values())
    scores = [max(psi(small, signal_features(chirps(200, seed=seed))).values()) for seed in range(2, 12)]
    assert max(scores) < 0.25, scores
    assert max(psi(small, signal_features(chirps(200, shift=2.0, seed=20))).values()) > 0.25


def test_a_file_that_is_not_a_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="not a drift reference"):
        psi({"features": {}}, np.zeros((1, len(FEATURES))))


# ---------------------------------------------------------------- the inference log


def test_log_writes_sampled_requests_that_read_back_exactly(tmp_path: Path) -> None:
    module = inference_log_module()
    log = module.InferenceLog(str(tmp_path), "m", 3, ["a", "b"], sample_rate=1.0, flush_seconds=0.2)
    signals = np.random.default_rng(0).standard_normal((4, 2, 1, 32)).astype(np.float32)
    logits = np.random.default_rng(1).standard_normal((4, 2, 2)).astype(np.float32)
    for i in range(4):
        assert log.offer(f"req-{i}", signals[i], logits[i])
    log.close()
    assert (log.stats.written, log.stats.failed, log.stats.dropped) == (8, 0, 0)
    logged = read_log(str(tmp_path), "m")
    assert list(logged.frame.request_id) == [f"req-{i}" for i in range(4) for _ in range(2)]
    assert list(logged.frame.row) == [0, 1] * 4 and set(logged.frame.version) == {3}
    np.testing.assert_array_equal(logged.signals, signals.reshape(8, 32))
    np.testing.assert_array_equal(logged.logits, logits.reshape(8, 2))
    assert list(logged.frame.predicted) == [["a", "b"][i] for i in logits.reshape(8, 2).argmax(1)]
    assert len(read_log(str(tmp_path), "m", version=4)) == 0 and len(read_log(str(tmp_path), "other")) == 0
    table_only = read_log(str(tmp_path), "m", arrays=False)
    assert list(table_only.frame.request_id) == list(logged.frame.request_id) and table_only.signals.size == 0
    assert not list(tmp_path.rglob(".*.tmp"))  # no half-written file left behind


def test_cwtops_own_checks_are_not_logged(tmp_path: Path) -> None:
    from cwtops.serving.client import request_ids
    from cwtops.serving.publish import CHECK_REQUEST_ID

    module = inference_log_module()
    assert module.CHECK_PREFIX == CHECK_REQUEST_ID
    log = module.InferenceLog(str(tmp_path), "m", 1, ["a"], sample_rate=1.0)
    for request_id, _ in request_ids(CHECK_REQUEST_ID, 130, 64):  # the publish-time check, in chunks
        assert not log.offer(request_id, np.zeros((1, 1, 8), np.float32), np.zeros((1, 1), np.float32))
    assert log.offer("traffic", np.zeros((1, 1, 8), np.float32), np.zeros((1, 1), np.float32))
    log.close()
    assert log.stats.written == 1


def test_sample_rate_logs_about_that_share(tmp_path: Path) -> None:
    module = inference_log_module()
    log = module.InferenceLog(str(tmp_path), "m", 1, ["a"], sample_rate=0.1, seed=7)
    taken = sum(log.offer("r", np.zeros((1, 1, 8), np.float32), np.zeros((1, 1), np.float32)) for _ in range(2000))
    log.close()
    assert 140 <= taken <= 260


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_store_that_fails_costs_only_its_rows_and_never_blocks(tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = inference_log_module()
    if where == "file":  # a folder that cannot be created: a file is in the way (as a full disk, a write that fails)
        (tmp_path / "blocked").write_text("")
        location = str(tmp_path / "blocked" / "log")
    else:  # an S3 endpoint nothing listens on
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
        location = "s3://bucket/log"
    log = module.InferenceLog(location, "m", 1, ["a"], sample_rate=1.0, queue_size=4, flush_seconds=0.05)
    started = time.perf_counter()
    for _ in range(200):
        log.offer("r", np.zeros((1, 1, 64), np.float32), np.zeros((1, 1), np.float32))
    per_offer = (time.perf_counter() - started) / 200
    assert per_offer < 0.005  # the request path copies and queues; it never waits for the store
    deadline = time.monotonic() + 30
    while log.stats.failed == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    log.close(timeout=30)
    assert log.stats.failed > 0 and log.stats.written == 0 and log.stats.last_error
    assert log.stats.dropped + log.stats.failed + log.stats.written >= 200 - 4  # a full queue drops, never blocks


# ---------------------------------------------------------------- the backend logs, and answers whatever the log does


@pytest.fixture()
def backend_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - makes (model, module)
    """The serving backend in-process, with a stand-in for Triton's pb_utils and a tiny ONNX model
    (signal [B, 1, 64] -> logits [B, 3])."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from tests.test_triton import load_backend

    module = load_backend(monkeypatch)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [64, 3], np.random.default_rng(0).standard_normal(64 * 3).tolist())
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["signal"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("signal", TensorProto.FLOAT, ["batch", 1, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [weights])
    (tmp_path / "m" / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m" / "1" / "model.onnx"))

    def make(parameters: dict[str, str]) -> tuple[object, object]:
        config = {"name": "m", "max_batch_size": 64, "input": [{"name": "signal", "data_type": "TYPE_FP32", "dims": ["1", "64"]}],
                  "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["3"]}],
                  "parameters": {key: {"string_value": value} for key, value in parameters.items()}}
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path / "m"), "model_version": "1",
                          "model_instance_kind": "CPU"})
        return model, module

    return make


class _Request(dict):
    def __init__(self, signal: np.ndarray, request_id: str) -> None:
        super().__init__(signal=signal)
        self._id = request_id

    def request_id(self) -> str:
        return self._id


@pytest.mark.parametrize("store", ["folder", "unwritable"])
def test_backend_logs_answered_requests_and_a_failing_log_fails_none(backend_factory, tmp_path: Path, store: str) -> None:
    if store == "unwritable":
        (tmp_path / "file").write_text("")
        location = tmp_path / "file" / "log"
    else:
        location = tmp_path / "log"
    model, module = backend_factory({"inference_log": str(location), "inference_log_sample_rate": "1.0",
                                     "inference_log_flush_seconds": "0.1", "class_names": '["a", "b", "c"]'})
    rng = np.random.default_rng(0)
    from tests.test_triton import _FakeTensor

    requests = [_Request(_FakeTensor("signal", rng.standard_normal((2, 1, 64)).astype(np.float32)), f"id-{i}") for i in range(3)]
    responses = model.execute(requests)
    assert all(response.error is None and response.outputs for response in responses)
    model.finalize()
    if store == "folder":
        logged = read_log(str(location), "m")
        assert sorted(set(logged.frame.request_id)) == ["id-0", "id-1", "id-2"] and len(logged) == 6
    else:
        assert model.log.stats.failed == 6


def test_backend_without_log_parameters_logs_nothing(backend_factory) -> None:
    model, _ = backend_factory({})
    assert model.log is None


# ---------------------------------------------------------------- feedback and shadow comparison


def test_labels_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    from cwtops.monitoring.feedback import read_labels

    bad = tmp_path / "labels.csv"
    bad.write_text("request_id,label\nabc,cat\n,dog\n")
    with pytest.raises(CwtopsError, match=r"labels.csv: line 3: request_id and label"):
        read_labels(bad)
    bad.write_text("id,label\n")
    with pytest.raises(CwtopsError, match=r"line 1: .*request_id"):
        read_labels(bad)
    bad.write_text("request_id,row,label\nabc,x,cat\n")
    with pytest.raises(CwtopsError, match=r"line 2: row 'x'"):
        read_labels(bad)


def test_feedback_counts_right_predictions_per_version(tmp_path: Path) -> None:
    import pandas as pd

    from cwtops.monitoring.feedback import read_labels, score

    logged = pd.DataFrame({"request_id": ["a", "a", "b", "c"], "row": [0, 1, 0, 0], "version": [1, 1, 2, 2],
                           "predicted": ["x", "y", "x", "y"]})
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,row,label\na,0,x\na,1,x\nb,0,x\nc,0,x\nzzz,0,x\n")
    result = score(read_labels(labels), logged)
    assert [(v.version, v.labelled, v.correct) for v in result.versions] == [(1, 2, 1), (2, 2, 1)]
    assert result.unmatched == 1 and result.labels == 5


def test_shadow_comparison_is_agreement_and_confidence_difference() -> None:
    from cwtops.monitoring.shadow import compare

    production = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    challenger = np.array([[4.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    agree, delta = compare(production, challenger)
    assert agree.tolist() == [True, False, True]
    top = lambda x: np.exp(x.max(1)) / np.exp(x).sum(1)  # noqa: E731
    np.testing.assert_allclose(delta, top(challenger) - top(production))


def test_request_ids_name_each_chunk_and_row() -> None:
    from cwtops.serving.client import request_ids

    assert request_ids("r", 3, 64) == [("r", 0), ("r", 1), ("r", 2)]
    assert request_ids("r", 5, 2) == [("r.0", 0), ("r.0", 1), ("r.1", 0), ("r.1", 1), ("r.2", 0)]


def test_the_log_is_written_off_the_request_path(tmp_path: Path) -> None:
    """A store that takes seconds per file holds no offer: the writer thread waits, not the caller."""
    module = inference_log_module()
    log = module.InferenceLog(str(tmp_path), "m", 1, ["a"], sample_rate=1.0, flush_seconds=0.01)
    gate = threading.Event()
    original = log._write

    def slow_write(table, first_ns):  # noqa: ANN001, ANN202
        gate.wait(5)
        return original(table, first_ns)

    log._write = slow_write
    started = time.perf_counter()
    for _ in range(50):
        log.offer("r", np.zeros((1, 1, 64), np.float32), np.zeros((1, 1), np.float32))
    assert time.perf_counter() - started < 0.5
    gate.set()
    log.close()
    assert log.stats.written == 50


def run_without_ssl(body: str, timeout: float = 120) -> None:
    """`body` in a fresh interpreter where `ssl` cannot be imported (as in the local Triton's backend
    stub, built against another patch release of Python), with the log module loaded as `module`."""
    import subprocess

    code = f"""
import sys, importlib.util
import numpy as np
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in ("ssl", "_ssl"):
            raise ImportError("undefined symbol: _PyModule_Add")
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("log", {str(ROOT / "cwtops/serving/backend/inference_log.py")!r})
module = importlib.util.module_from_spec(spec); sys.modules["log"] = module; spec.loader.exec_module(module)
{body}
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_log_writes_where_ssl_cannot_be_imported(tmp_path: Path) -> None:
    """pyarrow.parquet imports `ssl` only for its cloud clients; the log writes without it."""
    run_without_ssl(f"""
log = module.InferenceLog({str(tmp_path)!r}, "m", 1, ["a"], 1.0, flush_seconds=0.05)
log.offer("r", np.zeros((1, 1, 8), np.float32), np.zeros((1, 1), np.float32))
log.close()
assert log.stats.written == 1, log.stats
assert "ssl" not in sys.modules  # the stand-in is gone: a later `import ssl` fails as before
""")
    assert len(read_log(str(tmp_path), "m")) == 1


def test_the_log_imports_parquet_before_its_writer_thread_starts(tmp_path: Path) -> None:
    """The stand-in `ssl` exists only during the import, and the import happens in the constructor:
    a request importing asyncio on another thread while the writer thread first writes must never
    find the stand-in (it has no SSLWantReadError, and asyncio's import would fail)."""
    run_without_ssl(f"""
import threading
seen = []
start = threading.Thread.start
def watched(thread):
    seen.append(("pyarrow.parquet" in sys.modules, "ssl" in sys.modules))
    start(thread)
threading.Thread.start = watched
log = module.InferenceLog({str(tmp_path)!r}, "m", 1, ["a"], 1.0, flush_seconds=0.05)
threading.Thread.start = start
assert seen == [(True, False)], seen
log.offer("r", np.zeros((1, 1, 8), np.float32), np.zeros((1, 1), np.float32))
log.close()
assert log.stats.written == 1, log.stats
assert "ssl" not in sys.modules
import asyncio  # what a request may import: with no stand-in about, it loads without ssl
""")

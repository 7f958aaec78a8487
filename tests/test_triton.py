"""Triton: config generation and the backend in-process; then a real `tritonserver` on 127.0.0.1
(free ports, a repository in tmp_path): publish, infer, batch, refuse, roll out, roll back, restart."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import sys
import tempfile
import threading
import types
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cwtops.core.config import Params, load_params, params_from_dict
from cwtops.core.errors import CwtopsError

ROOT = Path(__file__).resolve().parent.parent
LENGTH, CLASSES = 128, 3
CLASS_NAMES = ["alpha", "beta", "gamma"]
MODEL = "tiny"
slow = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_tiny_model(path: Path, seed: int, batch_dynamic: bool = True) -> Path:
    """A small conv + linear classifier with the served contract: signal [B, 1, L] -> logits [B, C]."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 4, 9, padding=4)
            self.linear = torch.nn.Linear(4 * LENGTH, CLASSES)

        def forward(self, signal: torch.Tensor) -> torch.Tensor:
            return self.linear(torch.relu(self.conv(signal)).flatten(1))  # (B, C)

    torch.manual_seed(seed)
    axes = {"signal": {0: "batch"}, "logits": {0: "batch"}} if batch_dynamic else None
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(Tiny().eval(), (torch.randn(2, 1, LENGTH),), str(path), input_names=["signal"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=18, dynamo=False)
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "class_names", json.dumps(CLASS_NAMES)
    onnx.save(model, str(path))
    return path


def write_reference(onnx_path: Path, path: Path, n: int = 20, shift: float = 0.0) -> Path:
    inputs = np.random.default_rng(7).standard_normal((n, 1, LENGTH)).astype(np.float32)
    outputs = ort.InferenceSession(str(onnx_path)).run(None, {"signal": inputs})[0]
    np.savez(path, inputs=inputs, outputs=outputs + np.float32(shift))
    return path


@dataclass(frozen=True)
class Models:
    a: Path  # version 1 and the one promoted back
    b: Path  # same signature, other weights
    fixed: Path  # batch axis fixed to 2
    reference_a: Path
    reference_b: Path
    reference_bad: Path  # model a's outputs + 1


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("onnx")
    a, b = export_tiny_model(root / "a.onnx", 0), export_tiny_model(root / "b.onnx", 1)
    fixed = export_tiny_model(root / "fixed.onnx", 0, batch_dynamic=False)
    return Models(a, b, fixed, write_reference(a, root / "ref_a.npz"), write_reference(b, root / "ref_b.npz"),
                  write_reference(a, root / "ref_bad.npz", shift=1.0))


def make_params(repository: Path, ports: tuple[int, int, int] = (8000, 8001, 8002)) -> Params:
    raw = load_params(ROOT / "params.yaml").model_dump(mode="json")
    raw["base"]["model_name"] = MODEL
    raw["triton"].update({"model_repository": str(repository), "http_port": ports[0], "grpc_port": ports[1], "metrics_port": ports[2]})
    # the inference log: off (a test turns it on), beside a local repository, else in a temporary folder
    beside = Path(tempfile.mkdtemp()) if str(repository).startswith("s3://") else Path(repository).parent
    raw["monitoring"].update({"inference_log": str(beside / "inference_log"), "sample_rate": 0.0})
    return params_from_dict(raw)


# ---- config generation (no server) -------------------------------------------------------------


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """config.pbtxt read back the way Triton reads it: its own schema, unknown fields refused."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_config_is_derived_from_the_onnx_model(models: Models, tmp_path: Path) -> None:
    from cwtops.serving.publish import model_config_from_onnx

    params = make_params(tmp_path)
    config = parse_config(model_config_from_onnx(models.a, params, MODEL, versions=[2, 1, 2]))
    assert (config.name, config.platform, config.max_batch_size) == (MODEL, "onnxruntime_onnx", params.triton.max_batch_size)
    [signal], [logits] = config.input, config.output
    assert (signal.name, signal.data_type, list(signal.dims)) == ("signal", model_config_pb2.TYPE_FP32, [1, LENGTH])
    assert (logits.name, logits.data_type, list(logits.dims)) == ("logits", model_config_pb2.TYPE_FP32, [CLASSES])
    assert logits.label_filename == "labels.txt"
    assert list(config.version_policy.specific.versions) == [1, 2]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == params.triton.max_queue_delay_us
    assert list(config.dynamic_batching.preferred_batch_size) == [b for b in params.triton.preferred_batch_sizes
                                                                  if b <= params.triton.max_batch_size]
    [group] = config.instance_group
    assert (group.count, model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)) == (params.triton.instance_count, params.triton.instance_kind)
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {"intra_op_thread_count": str(params.triton.intra_op_threads), "inter_op_thread_count": "1",
                          "class_names": json.dumps(CLASS_NAMES)}
    assert not config.HasField("optimization")
    assert parse_config(model_config_from_onnx(models.a, params, MODEL)).version_policy.latest.num_versions == 1
    # the inference log: production's model logs a share of its requests; the challenger's never does
    logging = params.model_copy(update={"monitoring": params.monitoring.model_copy(update={"sample_rate": 0.25})})
    logged = {key: value.string_value for key, value in parse_config(model_config_from_onnx(models.a, logging, MODEL)).parameters.items()}
    assert {key: logged[key] for key in logged if key.startswith("inference_log")} == {
        "inference_log": str(tmp_path.parent / "inference_log"), "inference_log_sample_rate": "0.25",
        "inference_log_queue_size": str(params.monitoring.queue_size), "inference_log_flush_seconds": repr(params.monitoring.flush_seconds)}
    challenger = parse_config(model_config_from_onnx(models.a, logging, MODEL + "-challenger")).parameters
    assert not any(key.startswith("inference_log") for key in challenger)


def test_config_text_round_trips_quotes_and_backslashes(tmp_path: Path) -> None:
    from cwtops.serving.publish import ModelSignature, TensorSpec, render_config

    awkward = ['say "hi"', "back\\slash", 'both \\"\\', "tab\tand ü"]
    signature = ModelSignature((TensorSpec("signal", "TYPE_FP32", -1, (1, LENGTH)),),
                               (TensorSpec("logits", "TYPE_FP32", -1, (len(awkward),)), TensorSpec('out"\\put', "TYPE_FP16", -1, (-1, 2))),
                               tuple(awkward))
    name = 'model "x" \\ y'  # render_config takes any name; the publish path checks it first
    config = parse_config(render_config(name, signature, make_params(tmp_path), [3]))
    assert config.name == name
    assert [o.name for o in config.output] == ["logits", 'out"\\put']
    assert [o.label_filename for o in config.output] == ["labels.txt", ""]
    assert list(config.output[1].dims) == [-1, 2] and config.output[1].data_type == model_config_pb2.TYPE_FP16
    assert config.parameters["class_names"].string_value == json.dumps(awkward)  # exactly, escapes and all
    assert json.loads(config.parameters["class_names"].string_value) == awkward


def test_tensorrt_accelerator_option_for_gpu_instances(models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cwtops.core.config import params_from_dict
    from cwtops.core.errors import CwtopsError
    from cwtops.serving.publish import model_config_from_onnx

    raw = make_params(tmp_path).model_dump(mode="json")
    assert not parse_config(model_config_from_onnx(models.a, params_from_dict(raw), MODEL)).HasField("optimization")
    raw["triton"].update(instance_kind="KIND_GPU", gpu_accelerator="tensorrt", tensorrt_precision="FP16")
    config = parse_config(model_config_from_onnx(models.a, params_from_dict(raw), MODEL))
    [accelerator] = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and not config.optimization.execution_accelerators.cpu_execution_accelerator
    assert dict(accelerator.parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": str(raw["triton"]["tensorrt_workspace_bytes"])}
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    raw["triton"]["instance_kind"] = "KIND_CPU"
    with pytest.raises(CwtopsError, match="gpu_accelerator"):
        params_from_dict(raw)  # TensorRT on a CPU instance is refused, not ignored

    # The local backend reads the same block (as Triton hands it over: JSON, parameters as a map).
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("cwtops_ort_backend_trt", ROOT / "cwtops" / "serving" / "backend" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    config = {"optimization": {"execution_accelerators": {"gpu_execution_accelerator": [
        {"name": "tensorrt", "parameters": {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}}]}}}
    chosen = module.providers({"model_instance_kind": "GPU", "model_instance_device_id": "1"}, config)
    assert [p if isinstance(p, str) else p[0] for p in chosen] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert chosen[0][1] == {"device_id": 1, "trt_fp16_enable": True, "trt_max_workspace_size": 1073741824}
    assert module.providers({"model_instance_kind": "GPU"}, {})[0][0] == "CUDAExecutionProvider"
    assert module.providers({"model_instance_kind": "CPU"}, config) == ["CPUExecutionProvider"]


def test_fixed_batch_axis_and_unsafe_names_are_refused(models: Models, tmp_path: Path) -> None:
    from cwtops.serving.publish import model_config_from_onnx

    params = make_params(tmp_path)
    with pytest.raises(CwtopsError, match="fixed batch axis of size 2"):
        model_config_from_onnx(models.fixed, params, MODEL)
    for name in ("../escape", "a/b", ".hidden", "tiny.candidate", ""):
        with pytest.raises(CwtopsError, match="not allowed"):
            model_config_from_onnx(models.a, params, name)


# ---- the backend, in-process with a stand-in for Triton's pb_utils -----------------------------


class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def __dlpack__(self, stream: object = None, **_: object) -> object:
        return self.array.__dlpack__()

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.array.__dlpack_device__()

    @classmethod
    def from_dlpack(cls, name: str, capsule: object) -> _FakeTensor:
        return cls(name, np.from_dlpack(_Capsule(capsule)))


class _Capsule:
    """Hands a ready DLPack capsule to np.from_dlpack, as the stub receives one."""

    def __init__(self, capsule: object) -> None:
        self.capsule = capsule

    def __dlpack__(self, *args: object, **kwargs: object) -> object:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


class _FakeResponse:
    def __init__(self, output_tensors: list | None = None, error: object = None) -> None:
        self.outputs, self.error = output_tensors or [], error


class _FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


def load_backend(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The serving backend's model.py, imported with a stand-in for Triton's pb_utils."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.TritonError = _FakeTensor, _FakeResponse, _FakeError
    fake.TritonModelException = RuntimeError
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("cwtops_ort_backend", ROOT / "cwtops" / "serving" / "backend" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def backend(models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    module = load_backend(monkeypatch)
    (tmp_path / MODEL / "1").mkdir(parents=True)
    (tmp_path / MODEL / "1" / "model.onnx").write_bytes(models.a.read_bytes())
    config = {"name": MODEL, "max_batch_size": 64, "input": [{"name": "signal", "data_type": "TYPE_FP32", "dims": ["1", str(LENGTH)]}],
              "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [str(CLASSES)]}],
              "parameters": {"intra_op_thread_count": {"string_value": "1"}}}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path / MODEL), "model_version": "1",
                      "model_instance_kind": "CPU"})
    return model


def test_backend_runs_a_batch_once_and_answers_bad_requests_alone(backend, models: Models) -> None:
    calls = []
    session = backend.session
    backend.session = types.SimpleNamespace(run=lambda names, feeds: calls.append(len(feeds["signal"])) or session.run(names, feeds))
    rng = np.random.default_rng(3)
    good = [rng.standard_normal((n, 1, LENGTH)).astype(np.float32) for n in (2, 1)]
    requests_ = [
        {"signal": _FakeTensor("signal", good[0])},
        {"signal": _FakeTensor("signal", np.zeros((1, 1, LENGTH + 5), np.float32))},
        {"signal": _FakeTensor("signal", good[1])},
        {"signal": _FakeTensor("signal", np.zeros((1, 1, LENGTH), np.float64))},
        {},
    ]
    responses = backend.execute(requests_)
    assert calls == [3]  # both good requests in one ONNX Runtime call
    expected = ort.InferenceSession(str(models.a)).run(None, {"signal": np.concatenate(good)})[0]
    np.testing.assert_allclose(np.concatenate([responses[0].outputs[0].array, responses[2].outputs[0].array]), expected, atol=1e-6)
    assert "shape [1, 1, 133]" in responses[1].error.message and responses[1].error.code == "INVALID_ARG"
    assert "data type float64" in responses[3].error.message
    assert "missing input 'signal'" in responses[4].error.message


# ---- a real server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str
    params: Params
    repository: Path
    state: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from cwtops.serving.server import start, stop

    root = tmp_path_factory.mktemp("triton")
    params = make_params(root / "repository", (_free_port(), _free_port(), _free_port()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CWTOPS_STATE_DIR", str(root / "state"))
        patch.delenv("CWTOPS_TRITON_API_KEY", raising=False)
        info = start(params, wait=120)
        try:
            yield Server(info.url, params, root / "repository", root / "state")
        finally:
            stop(params)


@pytest.fixture(scope="module")
def published(server: Server, models: Models) -> Server:
    from cwtops.serving.publish import publish_version

    result = publish_version(models.a, 1, server.params, reference=models.reference_a, url=server.url)
    assert result.created and result.served_max_abs_error is not None and result.served_max_abs_error < 1e-5
    return server


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@slow
def test_served_logits_match_in_process_onnxruntime(published: Server, models: Models) -> None:
    import tritonclient.http as httpclient

    from cwtops.serving.client import classify, connect, infer

    signals = np.load(models.reference_a)["inputs"]
    expected = ort.InferenceSession(str(models.a)).run(None, {"signal": signals})[0]
    assert np.abs(infer(published.url, MODEL, signals, version=1) - expected).max() <= 1e-5
    assert np.abs(infer(published.url, MODEL, signals[:, 0, :], max_batch=7) - expected).max() <= 1e-5  # [N, L], chunked
    tensor = httpclient.InferInput("signal", list(signals.shape), "FP32")
    tensor.set_data_from_numpy(signals)
    assert np.abs(connect(published.url).infer(MODEL, [tensor]).as_numpy("logits") - expected).max() <= 1e-5
    top = classify(published.url, MODEL, signals[:2], top_k=2)
    assert [name for name, _ in top[0]][0] == CLASS_NAMES[int(expected[0].argmax())]
    assert 0 < top[0][1][1] <= top[0][0][1] < 1


@slow
def test_metadata_and_config_describe_the_model(published: Server) -> None:
    metadata = requests.get(f"http://{published.url}/v2/models/{MODEL}", timeout=10).json()
    assert metadata["platform"] == "onnxruntime_onnx" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "signal", "datatype": "FP32", "shape": [-1, 1, LENGTH]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}]
    config = requests.get(f"http://{published.url}/v2/models/{MODEL}/config", timeout=10).json()
    assert config["max_batch_size"] == published.params.triton.max_batch_size
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == published.params.triton.max_queue_delay_us
    assert config["output"][0]["label_filename"] == "labels.txt"


@slow
def test_concurrent_single_requests_are_batched(published: Server, models: Models) -> None:
    from cwtops.serving.client import connect, infer

    data = np.load(models.reference_a)
    signals, expected = data["inputs"], data["outputs"]
    clients = [connect(published.url) for _ in range(64)]
    gate = threading.Barrier(64)

    def one(i: int) -> np.ndarray:
        gate.wait()
        return infer(published.url, MODEL, signals[i % len(signals)][None], client=clients[i])

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for i, logits in enumerate(results):
        np.testing.assert_allclose(logits[0], expected[i % len(signals)], atol=1e-4)
    stats = requests.get(f"http://{published.url}/v2/models/{MODEL}/stats", timeout=10).json()["model_stats"]
    sizes = [int(entry["batch_size"]) for model in stats for entry in model.get("batch_stats", [])]
    assert max(sizes) > 1, f"no batched execution: {sizes}"


@slow
def test_perf_analyzer_drives_the_served_model(published: Server, models: Models, tmp_path: Path) -> None:
    """The serving benchmark's C++ load generator (`make perf-analyzer`) against a real server."""
    from bench import perf_analyzer

    assert perf_analyzer.missing() == [], perf_analyzer.missing()
    signal = np.load(models.reference_a)["inputs"][:1]
    inputs = perf_analyzer.input_file(tmp_path, "signal", signal)
    before = requests.get(f"http://{published.url}/v2/models/{MODEL}/stats", timeout=10).json()["model_stats"][0]["inference_count"]
    result = perf_analyzer.measure(published.url, MODEL, 4, inputs, interval_ms=500)
    after = requests.get(f"http://{published.url}/v2/models/{MODEL}/stats", timeout=10).json()["model_stats"][0]["inference_count"]
    assert result.concurrency == 4 and result.rps > 0 and 0 < result.p50_ms <= result.p99_ms
    # its reported rate is Triton's own count: at least one 0.5 s window of requests reached the model
    assert after - before >= 0.5 * result.rps
    assert result.client_cpu_s > 0


def test_perf_analyzer_output_is_parsed_and_failures_are_named(tmp_path: Path) -> None:
    from bench import perf_analyzer

    header = "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,p50 latency,p90 latency,p95 latency,p99 latency\n"
    figures = perf_analyzer.parse_csv(header + "8,2537.5,12,300,40,2837,4000,5000,9963\n")
    assert figures == {"concurrency": 8, "rps": 2537.5, "p50_ms": 2.837, "p99_ms": 9.963}
    with pytest.raises(CwtopsError, match="no measurement rows"):
        perf_analyzer.parse_csv(header)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CWTOPS_PERF_ANALYZER_HOME", str(tmp_path / "nowhere"))
        assert any("make perf-analyzer" in problem for problem in perf_analyzer.missing())
        with pytest.raises(CwtopsError, match="perf_analyzer cannot run: .*make perf-analyzer"):
            perf_analyzer.version()


BAD_REQUESTS = {  # raw request, what Triton's error must mention, what the client refuses and how
    "length": (np.zeros((1, 1, LENGTH + 7), np.float32), "FP32", (f"[-1,1,{LENGTH}]", f"[1,1,{LENGTH + 7}]"),
               np.zeros((1, LENGTH + 7), np.float32), "signal"),
    "dtype": (np.zeros((1, 1, LENGTH), np.float64), "FP64", ("FP64", "FP32"), np.zeros((1, LENGTH), np.float64), "float32"),
    "empty batch": (np.zeros((0, 1, LENGTH), np.float32), "FP32", ("[400]", "got 0"), np.zeros((0, LENGTH), np.float32), "N, L >= 1"),
    "nan": (np.full((2, 1, LENGTH), np.nan, np.float32), "FP32", ("signal 0 holds NaN or infinite values",),
            np.full((2, LENGTH), np.nan, np.float32), "signal 0 holds NaN or infinite values"),
    "inf in the second signal": (np.stack([np.zeros((1, LENGTH)), np.full((1, LENGTH), np.inf)]).astype(np.float32), "FP32",
                                 ("signal 1 holds NaN or infinite values",), np.stack([np.zeros(LENGTH), np.full(LENGTH, -np.inf)]).astype(np.float32),
                                 "signal 1 holds NaN or infinite values"),
}


@slow
@pytest.mark.parametrize("bad", list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_error_and_serving_goes_on(published: Server, bad: str) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from cwtops.serving.client import classify, connect, infer

    array, datatype, mentions, client_side, refusal = BAD_REQUESTS[bad]
    tensor = httpclient.InferInput("signal", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as error:
        connect(published.url).infer(MODEL, [tensor])
    assert all(text in str(error.value) for text in mentions), str(error.value)
    with pytest.raises(CwtopsError, match=re.escape(refusal)):
        infer(published.url, MODEL, client_side)
    if bad == "length":  # what `cwtops predict` says before sending
        with pytest.raises(CwtopsError, match=f"signals have {LENGTH + 7} samples; model '{MODEL}' .* takes signals of {LENGTH} samples"):
            classify(published.url, MODEL, client_side)
    assert infer(published.url, MODEL, np.zeros((1, LENGTH), np.float32)).shape == (1, CLASSES)


def _malformed(rng: np.random.Generator, max_batch: int) -> tuple[str, np.ndarray, str]:
    """One malformed request of a random kind: (kind, array, Triton datatype)."""
    batch = int(rng.integers(1, 5))
    good = rng.standard_normal((batch, 1, LENGTH)).astype(np.float32)
    kind = str(rng.choice(["nan", "inf", "length", "dtype", "empty", "oversized", "rank"]))
    if kind in ("nan", "inf"):
        good[rng.integers(batch), 0, rng.integers(LENGTH)] = np.nan if kind == "nan" else rng.choice([np.inf, -np.inf])
        return kind, good, "FP32"
    if kind == "length":
        length = int(rng.choice([1, LENGTH - 1, LENGTH + 1, 2 * LENGTH]))
        return kind, rng.standard_normal((batch, 1, length)).astype(np.float32), "FP32"
    if kind == "dtype":
        dtype, name = [(np.float64, "FP64"), (np.float16, "FP16"), (np.int32, "INT32"), (np.uint8, "UINT8")][rng.integers(4)]
        return kind, good.astype(dtype), name
    if kind == "empty":
        return kind, np.zeros((0, 1, LENGTH), np.float32), "FP32"
    if kind == "oversized":
        return kind, np.zeros((max_batch + int(rng.integers(1, 9)), 1, LENGTH), np.float32), "FP32"
    return kind, good.reshape(batch, LENGTH) if rng.random() < 0.5 else good.reshape(batch, 1, 1, LENGTH), "FP32"


@slow
def test_fuzz_malformed_requests_over_http_and_grpc_are_refused_and_serving_goes_on(published: Server) -> None:
    """60 malformed requests of seven kinds, half over HTTP, half over gRPC: each is refused as an
    invalid argument (HTTP 400, gRPC INVALID_ARGUMENT) and a good request after every one is answered."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    rng = np.random.default_rng(2026)
    max_batch = published.params.triton.max_batch_size
    clients = {"http": (httpclient, httpclient.InferenceServerClient(published.url)),
               "grpc": (grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{published.params.triton.grpc_port}"))}
    good = np.random.default_rng(1).standard_normal((1, 1, LENGTH)).astype(np.float32)
    refused: dict[str, int] = {}
    for attempt in range(60):
        protocol = "http" if attempt % 2 == 0 else "grpc"
        module, client = clients[protocol]
        kind, array, datatype = _malformed(rng, max_batch)
        tensor = module.InferInput("signal", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException) as error:
            client.infer(MODEL, [tensor])
        expected = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
        assert error.value.status() == expected, (protocol, kind, error.value.status(), str(error.value))
        refused[kind] = refused.get(kind, 0) + 1
        ok = module.InferInput("signal", list(good.shape), "FP32")
        ok.set_data_from_numpy(good)
        assert client.infer(MODEL, [ok]).as_numpy("logits").shape == (1, CLASSES)
    assert sum(refused.values()) == 60 and len(refused) == 7, refused
    assert clients["http"][1].is_server_live() and clients["http"][1].is_model_ready(MODEL)


@slow
def test_a_config_that_disagrees_is_refused_before_anything_is_written(published: Server, models: Models, tmp_path: Path) -> None:
    from cwtops.serving.publish import publish_version, served_versions

    before = _snapshot(published.repository)
    with pytest.raises(CwtopsError, match="fixed batch axis"):
        publish_version(models.fixed, 5, published.params, url=published.url)
    short = tmp_path / "short.npz"
    np.savez(short, inputs=np.zeros((2, 1, LENGTH - 1), np.float32), outputs=np.zeros((2, CLASSES), np.float32))
    with pytest.raises(CwtopsError, match="do not fit"):
        publish_version(models.a, 5, published.params, reference=short, url=published.url)
    with pytest.raises(CwtopsError, match="not a valid ONNX model"):
        publish_version(short, 5, published.params, url=published.url)
    assert _snapshot(published.repository) == before
    assert served_versions(published.url, MODEL) == [1]


@slow
def test_a_published_version_is_immutable(published: Server, models: Models) -> None:
    from cwtops.serving.publish import publish_version, served_versions

    before = _snapshot(published.repository)
    again = publish_version(models.a, 1, published.params, url=published.url)
    assert not again.created and again.retired == []
    with pytest.raises(CwtopsError, match="immutable"):
        publish_version(models.b, 1, published.params, url=published.url)
    assert _snapshot(published.repository) == before
    assert served_versions(published.url, MODEL) == [1]


@slow
def test_rollout_and_rollback_under_load_never_fail_a_request(published: Server, models: Models) -> None:
    import tritonclient.http as httpclient

    from cwtops.serving.client import connect
    from cwtops.serving.publish import publish_version, served_version, served_versions

    signal = np.load(models.reference_a)["inputs"][:1]
    failures, answered_by, stop = [], [], threading.Event()

    def load() -> None:
        client = connect(published.url)
        while not stop.is_set():
            tensor = httpclient.InferInput("signal", [1, 1, LENGTH], "FP32")
            tensor.set_data_from_numpy(signal)
            try:
                answered_by.append(client.infer(MODEL, [tensor]).get_response()["model_version"])
            except Exception as error:  # noqa: BLE001 - every failure counts
                failures.append(repr(error))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        assert publish_version(models.b, 2, published.params, reference=models.reference_b, url=published.url).retired == [1]
        assert served_versions(published.url, MODEL) == [2]
        promoted_back = publish_version(models.a, 1, published.params, reference=models.reference_a, url=published.url)
        assert not promoted_back.created and promoted_back.retired == [2]
        config_before = (published.repository / MODEL / "config.pbtxt").read_text()
        with pytest.raises(CwtopsError, match=r"version 3 failed .*differ from its reference"):
            publish_version(models.b, 3, published.params, reference=models.reference_bad, url=published.url)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert not failures, failures[:3]
    assert len(answered_by) > 20 and {"1", "2"} <= set(answered_by) and "3" not in answered_by
    assert served_version(published.params, published.url) == 1
    assert (published.repository / MODEL / "config.pbtxt").read_text() == config_before
    assert not (published.repository / MODEL / "3").exists()
    assert not (published.repository / f"{MODEL}.candidate").exists()


@slow
def test_cli_publish_predict_and_status(published: Server, models: Models, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cwtops.cli.app import app
    from cwtops.cli.triton import next_version_on_disk

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(published.params.model_dump(mode="json"), sort_keys=False))
    runner, version = CliRunner(), next_version_on_disk(published.params)
    done = runner.invoke(app, ["publish", "--onnx", str(models.a), "--reference", str(models.reference_a), "--params", str(params_file)])
    assert done.exit_code == 0, done.output
    assert f"version {version}" in done.output
    signals = tmp_path / "signals.npy"
    np.save(signals, np.load(models.reference_a)["inputs"][:3, 0, :].astype(np.float64))
    shown = runner.invoke(app, ["predict", str(signals), "--url", published.url, "--top-k", "2", "--params", str(params_file)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"signal {i}: ") for i, line in enumerate(lines))
    assert sum(name in lines[0] for name in CLASS_NAMES) == 2
    status = runner.invoke(app, ["triton", "status", "--params", str(params_file)])
    assert f"model {MODEL}: READY versions [{version}]" in status.output


@slow
def test_restart_serves_the_repository_and_the_api_key_guards_it_by_default(published: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from cwtops.serving.publish import served_version
    from cwtops.serving.server import TRITON, key_file, start, status, stop

    serving = served_version(published.params, published.url)
    same = start(published.params)
    assert not same.started and same.pid == TRITON.pid()
    # locked on a default start (no key in the environment): a key of this state directory's own
    load = f"http://{published.url}/v2/repository/models/{MODEL}/load"
    assert requests.post(load, timeout=30).status_code == 403
    assert requests.post(f"http://{published.url}/v2/repository/index", timeout=30).status_code == 403
    assert key_file().stat().st_mode & 0o777 == 0o600
    assert requests.post(load, headers={"cwtops-api-key": key_file().read_text().strip()}, timeout=60).ok
    key = "test-key-0123456789abcdef"
    monkeypatch.setenv("CWTOPS_TRITON_API_KEY", key)
    assert stop(published.params)
    restarted = start(published.params, wait=120)
    assert restarted.started and restarted.url == published.url
    assert served_version(published.params, published.url) == serving  # loaded from the repository at start
    assert requests.post(load, timeout=30).status_code == 403
    assert requests.post(load, headers={"cwtops-api-key": key_file().read_text().strip()}, timeout=30).status_code == 403
    assert requests.post(load, headers={"cwtops-api-key": key}, timeout=60).ok
    assert key not in Path(restarted.log).read_text()
    assert status(published.params)["models"][MODEL] == f"READY versions [{serving}]"


def test_a_stale_pid_file_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cwtops.serving.server import TRITON, status

    monkeypatch.setenv("CWTOPS_STATE_DIR", str(tmp_path))
    TRITON.folder.mkdir(parents=True)
    TRITON.pid_file.write_text("999999999")
    info = status(make_params(tmp_path / "repository", (_free_port(), _free_port(), _free_port())))
    assert info["pid"] is None and not info["ready"] and not TRITON.pid_file.exists()


def test_backend_files_are_replaced_even_while_a_stub_still_runs_from_them(tmp_path: Path) -> None:
    """A Triton killed a moment ago can leave a backend stub running from the installed file; the
    next start replaces that file by rename, where writing into it fails with ETXTBSY."""
    import shutil
    import subprocess

    from cwtops.serving.server import _install

    target = tmp_path / "stub"
    shutil.copy2(shutil.which("sleep"), target)
    running = subprocess.Popen([str(target), "30"])
    try:
        with pytest.raises(OSError, match="Text file busy"):
            shutil.copy2(shutil.which("true"), target)  # what a plain copy would do
        _install(Path(shutil.which("true")), target)
        assert target.read_bytes() == Path(shutil.which("true")).read_bytes() and os.access(target, os.X_OK)
        assert running.poll() is None  # the stub keeps its old file
    finally:
        running.kill()
        running.wait()
    assert [p.name for p in tmp_path.iterdir()] == ["stub"]  # no temporary left behind

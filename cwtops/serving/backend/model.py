"""A Python-based Triton backend named `onnxruntime`: serves `platform: "onnxruntime_onnx"` models.

Triton picks it for every model whose config names that platform when no native ONNX Runtime
backend is installed, so one model repository runs both here and in the NGC container (which uses
its native backend). Inputs, outputs, the batch size and the thread counts come from the model
config; all requests of a dynamic batch go through one ONNX Runtime call; a bad request gets a
Triton error of its own and the others in its batch are still answered.

With `inference_log` among the config's parameters (publish sets it for the production model when
`monitoring.sample_rate` > 0), a sampled share of answered requests goes to the inference log
(inference_log.py, installed beside this file): copied into a bounded queue on the request path,
written to Parquet by a thread of its own, so a slow or failing store never holds a request.

Tensors cross the stub boundary through DLPack rather than `as_numpy()` / `Tensor(name, array)`:
the stub's NumPy bindings were compiled against NumPy 1.x and read NumPy 2 arrays with the wrong
item size (empty outputs, zero-stride inputs), while DLPack carries its own layout.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_DTYPES = {
    "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64, "TYPE_BOOL": np.bool_,
    "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
    "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32, "TYPE_UINT64": np.uint64,
}
# The stub renames a capsule it consumed to "used_dlpack"; NumPy's capsule destructor only
# recognises "used_dltensor" and would report an error for every response. The stub's tensor owns
# the data from then on, so the capsule is marked consumed under the name NumPy expects. The
# bytes object lives as long as the module: PyCapsule_SetName keeps the pointer, not a copy.
_CONSUMED = b"used_dltensor"
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_capsule_name.restype = ctypes.c_int


class RequestError(ValueError):
    """A request that does not fit the model; answered with an error, never raised to Triton."""


def to_numpy(tensor: Any) -> np.ndarray:
    """A request tensor as a NumPy array (a view, through DLPack)."""
    return np.from_dlpack(tensor)


def to_triton(name: str, array: np.ndarray) -> Any:
    """A NumPy array as an output tensor (no copy, through DLPack)."""
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    _set_capsule_name(capsule, _CONSUMED)
    return tensor


def session_options(parameters: dict[str, str]) -> ort.SessionOptions:
    """Thread counts from the config's `parameters` (the native backend's keys; 0 = ORT default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", "0"))
    options.inter_op_num_threads = int(parameters.get("inter_op_thread_count", "0"))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def providers(args: dict[str, str], config: dict | None = None) -> list:
    """TensorRT (when the config asks and onnxruntime-gpu has it), then CUDA, for a KIND_GPU
    instance; CPU always last, so a missing GPU provider degrades instead of failing the load."""
    chosen: list = ["CPUExecutionProvider"]
    if args.get("model_instance_kind") != "GPU":
        return chosen
    available = ort.get_available_providers()
    device = int(args.get("model_instance_device_id", "0"))
    if "CUDAExecutionProvider" in available:
        chosen.insert(0, ("CUDAExecutionProvider", {"device_id": device}))
    tensorrt = _tensorrt_options(config or {})
    if tensorrt is not None and "TensorrtExecutionProvider" in available:
        chosen.insert(0, ("TensorrtExecutionProvider", {"device_id": device, **tensorrt}))
    return chosen


def _tensorrt_options(config: dict) -> dict | None:
    """The `gpu_execution_accelerator` entry named tensorrt, as ONNX Runtime provider options."""
    accelerators = config.get("optimization", {}).get("execution_accelerators", {}).get("gpu_execution_accelerator", [])
    for accelerator in accelerators:
        if accelerator.get("name") == "tensorrt":
            parameters = accelerator.get("parameters", {})
            return {
                "trt_fp16_enable": parameters.get("precision_mode", "FP32") == "FP16",
                "trt_max_workspace_size": int(parameters.get("max_workspace_size_bytes", 1 << 30)),
            }
    return None


def triton_error(message: str, invalid: bool) -> Any:
    """A Triton error; INVALID_ARG (HTTP 400) for a malformed request where the stub knows the code."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _sibling(name: str) -> Any:  # noqa: ANN401 - a module
    """A module installed beside this file (the backend directory is not on sys.path)."""
    module_name = f"cwtops_backend_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def inference_log(name: str, version: str, parameters: dict[str, str]) -> Any:  # noqa: ANN401 - an InferenceLog or None
    """The model's inference log when the config asks for one (a sample rate above 0), else None."""
    location = parameters.get("inference_log", "")
    rate = float(parameters.get("inference_log_sample_rate", "0") or 0)
    if not location or rate <= 0:
        return None
    names = json.loads(parameters.get("class_names", "[]") or "[]")
    return _sibling("inference_log").InferenceLog(
        location, name, int(version), names, rate, queue_size=int(parameters.get("inference_log_queue_size", "1024")),
        flush_seconds=float(parameters.get("inference_log_flush_seconds", "2")))


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.inputs = [(i["name"], np.dtype(_DTYPES[i["data_type"]]), [int(d) for d in i["dims"]]) for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], config.get("default_model_filename") or "model.onnx")
        self.session = ort.InferenceSession(path, session_options(parameters), providers=providers(args, config))
        self._check_names(path)
        try:
            self.log = inference_log(self.name, args["model_version"], parameters)
        except Exception as error:  # noqa: BLE001 - the model serves without its log rather than not at all
            print(f"model '{self.name}': inference log off ({type(error).__name__}: {error})", file=sys.stderr, flush=True)
            self.log = None
        self._logged = self.outputs.index("logits") if "logits" in self.outputs else 0

    def _record(self, request: Any, arrays: dict[str, np.ndarray], results: list[np.ndarray]) -> None:
        """Offer an answered request to the inference log (a copy, queued; never blocks or raises)."""
        if self.log is None:
            return
        try:
            request_id = request.request_id() if hasattr(request, "request_id") else ""
        except Exception:  # noqa: BLE001 - an id is a nicety; the row is logged without one
            request_id = ""
        self.log.offer(request_id, arrays[self.inputs[0][0]], results[self._logged])

    def _check_names(self, path: str) -> None:
        """A config that names tensors the ONNX graph lacks fails the load, with both lists."""
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        declared_inputs = {name for name, _, _ in self.inputs}
        if declared_inputs != graph_inputs or not set(self.outputs) <= graph_outputs:
            raise pb_utils.TritonModelException(
                f"{path}: config.pbtxt of model '{self.name}' declares inputs {sorted(declared_inputs)} and outputs "
                f"{sorted(self.outputs)}, the ONNX graph has inputs {sorted(graph_inputs)} and outputs {sorted(graph_outputs)}; "
                "regenerate the config from the model (cwtops publish)"
            )

    def _read(self, request: Any) -> dict[str, np.ndarray]:
        """The request's inputs, checked against the config (Triton checks too; this is the last line)."""
        arrays = {}
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestError(f"model '{self.name}': missing input '{name}'")
            array = to_numpy(tensor)
            if array.dtype != dtype:
                raise RequestError(f"model '{self.name}': input '{name}' has data type {array.dtype}, expected {dtype}")
            shape = list(array.shape[1:] if self.max_batch_size else array.shape)
            if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape)):
                expected = ["batch", *dims] if self.max_batch_size else dims
                raise RequestError(f"model '{self.name}': input '{name}' has shape {list(array.shape)}, expected {expected}")
            if self.max_batch_size and not 1 <= array.shape[0] <= self.max_batch_size:
                raise RequestError(f"model '{self.name}': input '{name}' holds a batch of {array.shape[0]}; "
                                   f"send 1 to {self.max_batch_size} signals per request")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                rows = array.reshape(len(array), -1) if self.max_batch_size else array.reshape(1, -1)
                row = int(np.argmin(np.isfinite(rows).all(axis=1)))
                raise RequestError(f"model '{self.name}': input '{name}' signal {row} holds NaN or infinite values; "
                                   "send finite numbers (clean or drop that signal)")
            arrays[name] = array
        return arrays

    def execute(self, requests: list) -> list:
        """One ONNX Runtime call for every well-formed request of the batch; errors stay per request."""
        responses: list = [None] * len(requests)
        good: list[tuple[int, dict[str, np.ndarray]]] = []
        for index, request in enumerate(requests):
            try:
                good.append((index, self._read(request)))
            except Exception as error:  # answered to that client only; the model keeps serving
                responses[index] = pb_utils.InferenceResponse(error=triton_error(str(error), invalid=True))
        if self.max_batch_size and len(good) > 1:
            try:
                self._run_together(good, responses, requests)
                return responses
            except Exception:  # one request the graph rejects must not fail its neighbours: retry one by one
                pass
        for index, arrays in good:
            self._run_one(index, arrays, responses, requests[index])
        return responses

    def _run_together(self, good: list[tuple[int, dict[str, np.ndarray]]], responses: list, requests: list) -> None:
        feeds = {name: np.concatenate([arrays[name] for _, arrays in good]) for name, _, _ in self.inputs}
        results = self.session.run(self.outputs, feeds)  # each [sum of the request batches, ...]
        start, answered = 0, []
        for index, arrays in good:
            stop = start + len(arrays[self.inputs[0][0]])
            tensors = [to_triton(name, result[start:stop]) for name, result in zip(self.outputs, results)]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            answered.append((requests[index], arrays, [result[start:stop] for result in results]))
            start = stop
        for request, arrays, outputs in answered:  # once every response stands (else they are run one by one)
            self._record(request, arrays, outputs)

    def _run_one(self, index: int, arrays: dict[str, np.ndarray], responses: list, request: Any = None) -> None:
        try:
            results = self.session.run(self.outputs, arrays)
            tensors = [to_triton(name, result) for name, result in zip(self.outputs, results)]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            self._record(request, arrays, results)
        except Exception as error:
            message = f"model '{self.name}': ONNX Runtime rejected the request: {error}"
            responses[index] = pb_utils.InferenceResponse(error=triton_error(message, invalid=False))

    def finalize(self) -> None:
        if self.log is not None:
            self.log.close(timeout=5.0)  # what is queued is written before the version unloads
        self.session = None

"""A Python-based Triton backend named `onnxruntime`: serves `platform: "onnxruntime_onnx"` models.

Triton loads it for every model whose config names that platform when no native ONNX Runtime
backend is installed, so the same model repository runs here and in the NGC container (which
uses its native backend). Inputs, outputs and the batch size come from the model config; a whole
dynamic batch is run in one ONNX Runtime call; a bad request gets a Triton error, never a crash.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [(i["name"], _DTYPES[i["data_type"]], [int(d) for d in i["dims"]]) for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", "1"))
        options.inter_op_num_threads = int(parameters.get("inter_op_thread_count", "1"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        self.session = ort.InferenceSession(path, options, providers=providers)

    def _check(self, name, array, dtype, dims):
        if array.dtype != dtype:
            raise ValueError(f"input '{name}' has dtype {array.dtype}, the model expects {np.dtype(dtype)}")
        shape = list(array.shape[1:] if self.max_batch_size else array.shape)
        if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
            raise ValueError(f"input '{name}' has shape {list(array.shape)}, the model expects [batch, {', '.join(map(str, dims))}]")

    def execute(self, requests):
        responses = [None] * len(requests)
        good, batches = [], {name: [] for name, _, _ in self.inputs}
        for index, request in enumerate(requests):
            try:
                arrays = {}
                for name, dtype, dims in self.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"missing input '{name}'")
                    arrays[name] = tensor.as_numpy()
                    self._check(name, arrays[name], dtype, dims)
                for name in arrays:
                    batches[name].append(arrays[name])
                good.append(index)
            except Exception as error:  # reported to that client only; the model keeps serving
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        if good:
            try:
                self._run(requests, good, batches, responses)
            except Exception as error:
                for index in good:
                    responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {error}"))
        return responses

    def _run(self, requests, good, batches, responses):
        feeds = {name: np.concatenate(parts) for name, parts in batches.items()}
        results = self.session.run(self.outputs, feeds)
        sizes = [len(part) for part in next(iter(batches.values()))]
        start = 0
        for index, size in zip(good, sizes):
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(result[start : start + size]).copy()) for name, result in zip(self.outputs, results)]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += size

    def finalize(self):
        self.session = None

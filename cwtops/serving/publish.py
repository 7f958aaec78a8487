"""Publishing to Triton, correct by construction: config.pbtxt is derived from the ONNX model itself.

`model_repository/<model>/<version>/model.onnx` (version = the MLflow registry version), a
`config.pbtxt` whose tensors and dims come from the ONNX graph (batch axis implicit), `labels.txt`
for Triton's classification extension, dynamic batching, the instance group and the thread counts
from params. Everything is checked before anything is written: a config that would disagree with
the model, a reference that does not fit it, a version number already taken by other bytes.

Roll-out without downtime: the new version must first reproduce its reference outputs through
Triton under a staging name that no client uses; then the config lists the served versions and the
new one, Triton loads it next to the old ones (and the check is repeated there), then the config
lists the new version alone and Triton retires the others. Unversioned requests reach
the highest READY version, so they are answered at every step, also when an older version is
promoted. Any failure restores the previous config and version set; the old version keeps serving.

The repository is a folder or `s3://bucket/prefix` (`open_repository`; cwtops/core/s3.py): the same steps,
with a version's file uploaded and verified before the config that names it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from cwtops.core.artifacts import atomic_dir, sha256_file, write_text
from cwtops.core.config import Params, TritonConfig
from cwtops.core.errors import CwtopsError
from cwtops.core.waiting import wait_until
from cwtops.model.parity import compare_logits
from cwtops.services.processes import state_dir
from cwtops.serving.client import INPUT_NAME, OUTPUT_NAME, admin_headers, connect, infer, triton_errors
from cwtops.serving.server import STAGING_SUFFIX

CHECK_REQUEST_ID = "cwtops-check"  # the backend's inference log skips requests with ids starting so
SAFE_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LABELS_FILE = "labels.txt"
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's TYPE_*
    batch: int  # the leading axis: -1 when dynamic, else its fixed size
    dims: tuple[int, ...]  # the other axes; -1 = dynamic


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class PublishResult:
    model: str
    version: int
    created: bool  # False when the same bytes were already in the repository
    retired: list[int]
    served_max_abs_error: float | None  # None without a reference
    seconds: float


def validate_model_name(name: str) -> str:
    """A model name that is one path component: letters, digits, '_', '.', '-'."""
    if not SAFE_MODEL_NAME.match(name) or name.endswith(STAGING_SUFFIX):
        raise CwtopsError(f"model name {name!r} is not allowed: it must match {SAFE_MODEL_NAME.pattern} (no path separators) and not end in {STAGING_SUFFIX!r}")
    return name


def _tensor_spec(value: onnx.ValueInfoProto, path: Path) -> TensorSpec:
    tensor = value.type.tensor_type
    if tensor.elem_type not in _TRITON_TYPES:
        raise CwtopsError(f"{path}: tensor '{value.name}' has ONNX element type {tensor.elem_type}, which this config generator does not map")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not shape:
        raise CwtopsError(f"{path}: tensor '{value.name}' is a scalar; Triton batching needs a leading batch axis")
    return TensorSpec(value.name, _TRITON_TYPES[tensor.elem_type], shape[0], tuple(shape[1:]))


def read_signature(onnx_path: Path) -> ModelSignature:
    """Inputs, outputs (batch axis apart) and class names of an ONNX file."""
    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
            raise CwtopsError(f"{path}: weights are stored as external data; the repository takes one self-contained file (save_as_external_data=False)")
        onnx.checker.check_model(model)
    except CwtopsError:
        raise
    except Exception as error:  # protobuf DecodeError, ValidationError, OSError
        raise CwtopsError(f"{path}: not a valid ONNX model ({type(error).__name__}: {error})") from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_tensor_spec(v, path) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_tensor_spec(v, path) for v in model.graph.output)
    raw = {p.key: p.value for p in model.metadata_props}.get("class_names", "[]")
    try:
        names = json.loads(raw)
    except ValueError:
        raise CwtopsError(f"{path}: metadata 'class_names' is not a JSON list ({raw[:80]!r}); re-export the model") from None
    if not isinstance(names, list) or any(not isinstance(n, str) or not n or "\n" in n for n in names):
        raise CwtopsError(f"{path}: metadata 'class_names' must be a JSON list of non-empty one-line strings; re-export the model")
    return ModelSignature(inputs, outputs, tuple(names))


def check_signature(signature: ModelSignature, params: Params, path: Path) -> None:
    """Refuse a model the generated config would not describe truthfully."""
    max_batch = params.triton.max_batch_size
    for spec in signature.inputs + signature.outputs:
        if spec.batch != -1:
            raise CwtopsError(
                f"{path}: tensor '{spec.name}' has a fixed batch axis of size {spec.batch}, but triton.max_batch_size is "
                f"{max_batch} (dynamic batching needs a dynamic batch axis); re-export with a dynamic batch axis"
            )
    names_in, names_out = [s.name for s in signature.inputs], [s.name for s in signature.outputs]
    if names_in != [INPUT_NAME] or OUTPUT_NAME not in names_out:
        raise CwtopsError(f"{path}: inputs {names_in} and outputs {names_out}; the served model must take '{INPUT_NAME}' and give '{OUTPUT_NAME}'")
    signal, logits = signature.inputs[0], next(s for s in signature.outputs if s.name == OUTPUT_NAME)
    if signal.data_type != "TYPE_FP32" or len(signal.dims) != 2 or signal.dims[0] != 1 or logits.data_type != "TYPE_FP32":
        raise CwtopsError(f"{path}: '{INPUT_NAME}' is {signal.data_type} [batch, {', '.join(map(str, signal.dims))}] and '{OUTPUT_NAME}' "
                          f"{logits.data_type}; the served contract is float32 [batch, 1, L] -> float32 [batch, C]")
    if len(logits.dims) != 1 or (signature.class_names and logits.dims[0] not in (-1, len(signature.class_names))):
        raise CwtopsError(f"{path}: output '{OUTPUT_NAME}' has dims {list(logits.dims)} for {len(signature.class_names)} class names; expected [batch, C]")


def _tensor(message: mc.ModelInput | mc.ModelOutput, spec: TensorSpec) -> None:
    message.name = spec.name
    message.data_type = mc.DataType.Value(spec.data_type)
    message.dims.extend(spec.dims)


def _version_policy(policy: mc.ModelVersionPolicy, versions: Sequence[int]) -> None:
    if versions:
        policy.specific.versions.extend(sorted(set(versions)))
    else:
        policy.latest.num_versions = 1


def _dynamic_batching(batching: mc.ModelDynamicBatching, cfg: TritonConfig) -> None:
    # Present even when every field is at its default: the block itself turns dynamic batching on.
    batching.SetInParent()
    batching.preferred_batch_size.extend(b for b in cfg.preferred_batch_sizes if b <= cfg.max_batch_size)
    batching.max_queue_delay_microseconds = cfg.max_queue_delay_us


def _accelerator(optimization: mc.ModelOptimizationPolicy, cfg: TritonConfig) -> None:
    """TensorRT for GPU instances (Triton's ONNX Runtime backend option); nothing otherwise."""
    if cfg.gpu_accelerator != "tensorrt":
        return
    accelerator = optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters["precision_mode"] = cfg.tensorrt_precision
    accelerator.parameters["max_workspace_size_bytes"] = str(cfg.tensorrt_workspace_bytes)


def build_config(name: str, signature: ModelSignature, params: Params, versions: Sequence[int] = ()) -> mc.ModelConfig:
    """Triton's ModelConfig message for a checked signature (`versions` empty: the latest one)."""
    cfg = params.triton
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=cfg.max_batch_size)
    _version_policy(config.version_policy, versions)
    for spec in signature.inputs:
        _tensor(config.input.add(), spec)
    for spec in signature.outputs:
        output = config.output.add()
        _tensor(output, spec)
        if signature.class_names and spec.name == OUTPUT_NAME:
            output.label_filename = LABELS_FILE
    _dynamic_batching(config.dynamic_batching, cfg)
    config.instance_group.add(count=cfg.instance_count, kind=mc.ModelInstanceGroup.Kind.Value(cfg.instance_kind))
    _accelerator(config.optimization, cfg)
    parameters = {
        "intra_op_thread_count": str(cfg.intra_op_threads),  # 0: ONNX Runtime's default (all cores)
        "inter_op_thread_count": "1",
        "class_names": json.dumps(list(signature.class_names)),
    }
    parameters |= inference_log_parameters(name, params)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def inference_log_parameters(name: str, params: Params) -> dict[str, str]:
    """What the serving backend reads to log sampled requests: production's model only (the
    challenger and the staging copy are reached on purpose, not by live traffic)."""
    cfg = params.monitoring
    if name != params.base.model_name or cfg.sample_rate <= 0:
        return {}
    location = cfg.inference_log if cfg.inference_log.startswith("s3://") else str(Path(cfg.inference_log).resolve())
    return {
        "inference_log": location,
        "inference_log_sample_rate": repr(cfg.sample_rate),
        "inference_log_queue_size": str(cfg.queue_size),
        "inference_log_flush_seconds": repr(cfg.flush_seconds),
    }


def render_config(name: str, signature: ModelSignature, params: Params, versions: Sequence[int] = ()) -> str:
    """config.pbtxt text, protobuf's text format of Triton's own schema: field names and string
    escaping are the server's (the NGC container's native ONNX Runtime backend reads the same file)."""
    return text_format.MessageToString(build_config(name, signature, params, versions), as_utf8=True)


def model_config_from_onnx(onnx_path: Path, params: Params, model_name: str, versions: Sequence[int] = ()) -> str:
    """Checked config.pbtxt text for an ONNX file (refuses what the config could not describe)."""
    signature = read_signature(Path(onnx_path))
    check_signature(signature, params, Path(onnx_path))
    return render_config(validate_model_name(model_name), signature, params, versions)


def _shape_fits(shape: Sequence[int], declared: Sequence[int]) -> bool:
    return len(shape) == len(declared) and all(d in (-1, s) for d, s in zip(declared, shape))


def load_reference(reference: Path, signature: ModelSignature) -> tuple[np.ndarray, np.ndarray]:
    """The parity reference (inputs, outputs), checked against the model's tensors."""
    try:
        with np.load(reference) as data:
            inputs, outputs = data["inputs"], data["outputs"]
    except (OSError, KeyError, ValueError) as error:
        raise CwtopsError(f"{reference}: not a parity reference with arrays 'inputs' and 'outputs' ({error})") from None
    signal = signature.inputs[0]
    logits = next(s for s in signature.outputs if s.name == OUTPUT_NAME)
    if inputs.dtype != np.float32 or not _shape_fits(inputs.shape[1:], signal.dims) or len(inputs) == 0:
        raise CwtopsError(f"{reference}: inputs {inputs.dtype} {list(inputs.shape)} do not fit the model's '{signal.name}' [batch, {', '.join(map(str, signal.dims))}] float32")
    if outputs.shape != (len(inputs), *outputs.shape[1:]) or not _shape_fits(outputs.shape[1:], logits.dims):
        raise CwtopsError(f"{reference}: outputs {list(outputs.shape)} do not fit the model's '{logits.name}' [batch, {', '.join(map(str, logits.dims))}] for {len(inputs)} inputs")
    return inputs, outputs


def probe_model(onnx_path: Path, signature: ModelSignature, inputs: np.ndarray | None) -> None:
    """Run the model in-process once: its real output shapes must be the ones the config declares."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph types
        raise CwtopsError(f"{onnx_path}: ONNX Runtime cannot load it ({error})") from None
    signal = signature.inputs[0]
    if inputs is None:
        if -1 in signal.dims:
            return  # a dynamic length and no reference: nothing sensible to probe with
        inputs = np.zeros((2, *signal.dims), np.float32)
    batch = inputs[:2]
    for spec, result in zip(signature.outputs, session.run([s.name for s in signature.outputs], {signal.name: batch})):
        if not _shape_fits(result.shape, (len(batch), *spec.dims)):
            raise CwtopsError(f"{onnx_path}: output '{spec.name}' is declared [batch, {', '.join(map(str, spec.dims))}] but ONNX Runtime returns {list(result.shape)} for a batch of {len(batch)}; the config would disagree with the model")


def _versions_from_metadata(client: object, model: str) -> list[int]:
    from tritonclient.utils import InferenceServerException

    try:
        return sorted(int(v) for v in client.get_model_metadata(model).get("versions", []))  # type: ignore[attr-defined]
    except InferenceServerException:  # unknown or not loaded
        return []


def served_versions(url: str, model: str) -> list[int]:
    """Versions of `model` that Triton reports READY (from the repository index, else model metadata)."""
    from tritonclient.utils import InferenceServerException

    client = connect(url)
    with triton_errors(url, model):
        try:
            index = client.get_model_repository_index(headers=admin_headers())
        except InferenceServerException:  # the repository API is restricted and no key is set; metadata is public
            return _versions_from_metadata(client, model)
    return sorted(
        int(entry["version"]) for entry in index
        if entry.get("name") == model and entry.get("state") == "READY" and str(entry.get("version", "")).isdigit()
    )


def served_version(params: Params, url: str | None = None, model: str | None = None) -> int | None:
    """The version unversioned requests reach now (the highest READY one), or None."""
    from cwtops.serving.server import http_url

    versions = served_versions(url or http_url(params), validate_model_name(model or params.base.model_name))
    return versions[-1] if versions else None


def challenger_model_name(params: Params) -> str:
    """The Triton model that serves the `challenger` version beside production.

    Triton sends a request without a version to the highest READY version of a model and has no
    setting for another default, so a challenger newer than production cannot share its model:
    it would take the unversioned traffic. It is served under this name, with its registry
    version as its Triton version; `base.model_name` keeps serving production alone."""
    return validate_model_name(f"{params.base.model_name}-challenger")


@contextlib.contextmanager
def _publish_lock(model: str) -> Iterator[None]:
    """One publication per model at a time (the CLI, the rollout flow and the scheduler may overlap)."""
    from filelock import FileLock

    path = state_dir() / "triton" / f"publish-{model}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


class ModelRepository(Protocol):
    """What publishing needs from a model repository; keys are `/`-separated paths relative to its root."""

    def describe(self, key: str) -> str: ...
    def read_text(self, key: str) -> str | None: ...
    def write_text(self, key: str, text: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def remove_tree(self, key: str) -> None: ...
    def has_model(self, name: str) -> bool: ...
    def versions(self, name: str) -> list[int]: ...
    def sha256(self, key: str) -> str | None: ...
    def write_version(self, name: str, version: int, onnx_path: Path) -> None: ...
    def fetch(self, key: str) -> contextlib.AbstractContextManager[Path | None]: ...


class LocalRepository:
    """Triton's model repository in a folder (on S3: cwtops.core.s3.S3ModelRepository)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self, key: str) -> str:
        return str(self.root / key)

    def read_text(self, key: str) -> str | None:
        path = self.root / key
        return path.read_text() if path.exists() else None

    def write_text(self, key: str, text: str) -> None:
        write_text(self.root / key, text)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def remove_tree(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)

    def has_model(self, name: str) -> bool:
        return (self.root / name).exists()

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []

    def sha256(self, key: str) -> str | None:
        path = self.root / key
        return sha256_file(path) if path.exists() else None

    def write_version(self, name: str, version: int, onnx_path: Path) -> None:
        with atomic_dir(self.root / name / str(version)) as staging:
            shutil.copyfile(onnx_path, staging / "model.onnx")

    @contextlib.contextmanager
    def fetch(self, key: str) -> Iterator[Path | None]:
        path = self.root / key
        yield path if path.exists() else None


def open_repository(params: Params) -> ModelRepository:
    """The model repository of `triton.model_repository`: a folder, or `s3://bucket/prefix` (cwtops.core.s3)."""
    location = params.triton.model_repository
    if location.startswith("s3://"):
        from cwtops.core.s3 import S3ModelRepository

        return S3ModelRepository(location)
    return LocalRepository(Path(location))


def _version_is_new(repository: ModelRepository, name: str, version: int, onnx_path: Path) -> bool:
    """False when the same bytes are published already; refuses other bytes under a taken number."""
    key = f"{name}/{version}/model.onnx"
    existing = repository.sha256(key)
    if existing is None:
        return True
    if existing != sha256_file(onnx_path):
        raise CwtopsError(
            f"{repository.describe(key)} already holds other bytes for version {version}; a published version is immutable "
            "(the existing one keeps serving): publish the new model under a new version number"
        )
    return False


def _side_by_side(repository: ModelRepository, name: str, served: list[int], version: int, signature: ModelSignature) -> list[int]:
    """Served versions that can share the new config (same tensors and classes) during the roll-out."""
    shareable = []
    for other in (v for v in served if v != version):
        with repository.fetch(f"{name}/{other}/model.onnx") as path:
            if path is not None and read_signature(path) == signature:
                shareable.append(other)
    return shareable


@dataclass(frozen=True)
class _Snapshot:
    """What the repository and Triton looked like before: restored on any failure."""

    repository: ModelRepository
    name: str
    existed: bool
    config: str | None
    labels: str | None
    served: list[int]

    @classmethod
    def take(cls, repository: ModelRepository, name: str, served: list[int]) -> _Snapshot:
        read = repository.read_text
        return cls(repository, name, repository.has_model(name), read(f"{name}/config.pbtxt"), read(f"{name}/{LABELS_FILE}"), served)

    def restore(self, url: str, name: str, version: int, created: bool) -> None:
        for file, text in (("config.pbtxt", self.config), (LABELS_FILE, self.labels)):
            if text is None:
                self.repository.delete(f"{name}/{file}")
            else:
                self.repository.write_text(f"{name}/{file}", text)
        client = connect(url)
        with contextlib.suppress(Exception):  # best effort: the old config is back on disk either way
            if self.served:
                client.load_model(name, headers=admin_headers())
            else:
                client.unload_model(name, headers=admin_headers())
        if created:
            self.repository.remove_tree(f"{name}/{version}")
        if not self.existed:
            self.repository.remove_tree(name)


def _write(repository: ModelRepository, name: str, version: int, onnx_path: Path, created: bool, config: str,
           signature: ModelSignature) -> None:
    """The version first, the config last: a config never names a version whose file is not complete."""
    if created:
        repository.write_version(name, version, onnx_path)
    if signature.class_names:
        repository.write_text(f"{name}/{LABELS_FILE}", "\n".join(signature.class_names) + "\n")
    repository.write_text(f"{name}/config.pbtxt", config)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    if not wait_until(condition, timeout):
        raise CwtopsError(f"{what} after {timeout:.0f} s")


def _load(url: str, name: str, ready: list[int], timeout: float) -> None:
    """Ask Triton to (re)load the model from the repository; wait until `ready` versions are READY."""
    client = connect(url, timeout=timeout)
    with triton_errors(url, name):
        client.load_model(name, headers=admin_headers())
    _wait_for(lambda: set(ready) <= set(served_versions(url, name)), timeout, f"{name} versions {ready} not READY")


def _served_parity(url: str, name: str, version: int, reference: tuple[np.ndarray, np.ndarray], params: Params) -> float:
    """Reference inputs through Triton (this version explicitly) against the recorded outputs."""
    inputs, expected = reference
    # the check's own request id keeps it out of the inference log: it is not traffic
    served = infer(url, name, inputs, version=version, max_batch=params.triton.max_batch_size,
                   request_id=CHECK_REQUEST_ID).astype(np.float64)
    cfg = params.parity
    figures = compare_logits(expected, served, cfg.atol, cfg.rtol, cfg.allow_ties)
    if not (figures["within"] and figures["classes_agree"]):
        raise CwtopsError(
            f"served outputs of version {version} differ from its reference: max abs error {figures['max_abs_error']:.3g} "
            f"(atol {cfg.atol}, rtol {cfg.rtol}), argmax agreement {figures['argmax_agreement']:.4f} "
            f"({figures['argmax_ties']} of the differing classes ties within tolerance)"
        )
    return float(figures["max_abs_error"])


def _verify_staged(url: str, repository: ModelRepository, candidate: _Candidate, params: Params, timeout: float) -> None:
    """Served parity under a staging name: unversioned requests reach the highest READY version,
    so a new version is checked where no client sends requests before it joins the real model."""
    staging = candidate.name + STAGING_SUFFIX
    repository.remove_tree(staging)
    try:
        config = render_config(staging, candidate.signature, params, [candidate.version])
        _write(repository, staging, candidate.version, candidate.onnx_path, True, config, candidate.signature)
        _load(url, staging, [candidate.version], timeout)
        _served_parity(url, staging, candidate.version, candidate.reference, params)
    finally:
        with contextlib.suppress(Exception):  # the folder goes either way; Triton forgets an unloaded model
            connect(url).unload_model(staging, headers=admin_headers())
        repository.remove_tree(staging)


@dataclass(frozen=True)
class _Candidate:
    """A checked model about to be published."""

    name: str
    version: int
    onnx_path: Path
    signature: ModelSignature
    reference: tuple[np.ndarray, np.ndarray] | None


def _check(onnx_path: Path, version: int, params: Params, reference: Path | None, model: str | None = None) -> _Candidate:
    """Every check that needs no server and writes nothing."""
    name = validate_model_name(model or params.base.model_name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CwtopsError(f"version {version!r} is not allowed: Triton versions are integers >= 1 (the registry version)")
    signature = read_signature(onnx_path)
    check_signature(signature, params, onnx_path)
    data = load_reference(Path(reference), signature) if reference is not None else None
    probe_model(onnx_path, signature, data[0] if data else None)
    return _Candidate(name, version, onnx_path, signature, data)


def _serve_beside_previous(url: str, repository: ModelRepository, candidate: _Candidate, params: Params, previous: list[int], retire_others: bool,
                           created: bool, timeout: float) -> tuple[list[int], float | None]:
    """Serve next to the shareable old versions, check through Triton, then (optionally) retire the others."""
    name, version = candidate.name, candidate.version
    if candidate.reference is not None:  # before any client can reach it
        _verify_staged(url, repository, candidate, params, timeout)
    alongside = _side_by_side(repository, name, previous, version, candidate.signature)
    config = render_config(name, candidate.signature, params, [*alongside, version])
    _write(repository, name, version, candidate.onnx_path, created, config, candidate.signature)
    _load(url, name, [*alongside, version], timeout)
    error = _served_parity(url, name, version, candidate.reference, params) if candidate.reference else None
    if retire_others and alongside:
        repository.write_text(f"{name}/config.pbtxt", render_config(name, candidate.signature, params, [version]))
        _load(url, name, [version], timeout)
    if retire_others:  # unversioned requests reach the highest READY version: only this one may be left
        _wait_for(lambda: served_versions(url, name) == [version], timeout, f"{name}: versions other than {version} not retired")
    kept = [] if retire_others else alongside
    return [v for v in previous if v != version and v not in kept], error


def publish_version(onnx_path: Path, version: int, params: Params, *, reference: Path | None = None, url: str | None = None,
                    retire_others: bool = True, timeout: float = 60.0, model: str | None = None) -> PublishResult:
    """Publish `onnx_path` as `version` of `model` (default `base.model_name`): write atomically,
    load, check through Triton, retire the others.

    Checks run before anything is written; after that, any failure restores the previous config and
    version set (the old version keeps serving) and raises a CwtopsError naming the version.
    """
    from cwtops.serving.server import http_url

    started = time.monotonic()
    candidate = _check(Path(onnx_path), version, params, reference, model)
    url = url or http_url(params)
    repository = open_repository(params)
    with _publish_lock(candidate.name):
        created = _version_is_new(repository, candidate.name, version, candidate.onnx_path)
        previous = served_versions(url, candidate.name)
        snapshot = _Snapshot.take(repository, candidate.name, previous)
        try:
            retired, error = _serve_beside_previous(url, repository, candidate, params, previous, retire_others, created, timeout)
        except Exception as failure:
            snapshot.restore(url, candidate.name, version, created)
            serving = f"versions {previous} keep serving" if previous else "nothing was serving before"
            raise CwtopsError(f"publishing {candidate.name} version {version} failed and was rolled back ({serving}): {failure}") from failure
    return PublishResult(candidate.name, version, created, retired, error, time.monotonic() - started)


def retire_model(params: Params, model: str, url: str | None = None, timeout: float = 60.0) -> list[int]:
    """Stop serving `model` altogether: unload it from Triton, then remove it from the repository.

    The versions it served are returned. Unloading first means a failure leaves the files in
    place, so a restarted Triton still finds what it was serving and the next pass tries again."""
    from cwtops.serving.server import http_url

    name = validate_model_name(model)
    url = url or http_url(params)
    repository = open_repository(params)
    with _publish_lock(name):
        served = served_versions(url, name)
        if served:
            with triton_errors(url, name):
                connect(url, timeout=timeout).unload_model(name, headers=admin_headers())
            _wait_for(lambda: not served_versions(url, name), timeout, f"{name} versions {served} not unloaded")
        repository.remove_tree(name)
    return served

"""Publishing to Triton, correct by construction: config.pbtxt is derived from the ONNX model.

`model_repository/<model>/<version>/model.onnx` (version = MLflow registry version), a
`config.pbtxt` whose dims come from the ONNX graph (batch implicit), `labels.txt` for the
classification extension, dynamic batching and the instance group from params. A config that
disagrees with the model is refused before anything is written. Roll-out order: serve old and
new side by side, wait for READY, check the new one against its parity reference through
Triton, then retire the old one; any failure restores the previous state.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from tasks.config import Params
from tasks.errors import CwtopsError
from tasks.io import atomic_dir, sha256_file, write_text
from tasks.triton_client import INPUT_NAME, OUTPUT_NAME, admin_headers, connect, infer

SAFE_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ModelSignature:
    input_dims: list[int]  # without the batch axis; -1 = dynamic
    output_dims: list[int]
    batch_dynamic: bool
    class_names: list[str]


@dataclass(frozen=True)
class PublishResult:
    model: str
    version: int
    retired: list[int]
    served_max_abs_error: float | None
    seconds: float


def _dims(value_info: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def read_signature(onnx_path: Path) -> ModelSignature:
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError and others for corrupt files
        raise CwtopsError(f"{onnx_path}: not a readable ONNX model ({error})") from None
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise CwtopsError(f"{onnx_path}: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}', found inputs {list(inputs)} and outputs {list(outputs)}")
    input_dims, output_dims = _dims(inputs[INPUT_NAME]), _dims(outputs[OUTPUT_NAME])
    if len(input_dims) != 3 or input_dims[1] != 1 or len(output_dims) != 2:
        raise CwtopsError(f"{onnx_path}: input {input_dims} / output {output_dims}; expected [batch, 1, L] and [batch, C]")
    metadata = {p.key: p.value for p in model.metadata_props}
    names = json.loads(metadata.get("class_names", "[]"))
    if names and len(names) != output_dims[1]:
        raise CwtopsError(f"{onnx_path}: {len(names)} class names for {output_dims[1]} outputs")
    return ModelSignature(input_dims[1:], output_dims[1:], input_dims[0] == -1 and output_dims[0] == -1, names)


def model_config(name: str, signature: ModelSignature, params: Params, versions: list[int]) -> str:
    """config.pbtxt text; refuses a batch size the model cannot take."""
    cfg = params.triton
    if cfg.max_batch_size > 1 and not signature.batch_dynamic:
        raise CwtopsError(f"model '{name}' has a fixed batch axis, but triton.max_batch_size is {cfg.max_batch_size}; re-export with a dynamic batch axis")
    preferred = [b for b in cfg.preferred_batch_sizes if b <= cfg.max_batch_size]
    dims = lambda d: ", ".join(str(x) for x in d)  # noqa: E731
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {cfg.max_batch_size}
version_policy: {{ specific: {{ versions: [{dims(sorted(versions))}] }} }}
input [ {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {dims(signature.input_dims)} ] }} ]
output [ {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {dims(signature.output_dims)} ] label_filename: "labels.txt" }} ]
dynamic_batching {{ preferred_batch_size: [ {dims(preferred)} ] max_queue_delay_microseconds: {cfg.max_queue_delay_us} }}
instance_group [ {{ count: {cfg.instance_count} kind: {cfg.instance_kind} }} ]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{cfg.intra_op_threads}" }} }}
parameters {{ key: "inter_op_thread_count" value: {{ string_value: "1" }} }}
parameters {{ key: "class_names" value: {{ string_value: "{','.join(signature.class_names)}" }} }}
"""


def validate_model_name(name: str) -> str:
    if not SAFE_MODEL_NAME.match(name):
        raise CwtopsError(f"model name {name!r} is not allowed: letters, digits, '_', '.', '-' only (no path separators)")
    return name


def served_versions(url: str, model: str) -> list[int]:
    """Versions of `model` that Triton reports READY."""
    from tritonclient.utils import InferenceServerException

    try:
        index = connect(url).get_model_repository_index(headers=admin_headers())
    except InferenceServerException:
        return []
    return sorted(int(e["version"]) for e in index if e.get("name") == model and e.get("state") == "READY" and e.get("version"))


def served_version(params: Params, url: str | None = None) -> int | None:
    """The version unversioned requests reach (the highest READY one), or None."""
    from tasks.triton_server import http_url

    versions = served_versions(url or http_url(params), params.base.model_name)
    return versions[-1] if versions else None


def _load(url: str, model: str, version: int, timeout: float) -> None:
    from tritonclient.utils import InferenceServerException

    client = connect(url)
    try:
        client.load_model(model, headers=admin_headers())
    except InferenceServerException as error:
        raise CwtopsError(f"Triton could not load {model} version {version}: {error.message()}") from None
    deadline = time.monotonic() + timeout
    while not client.is_model_ready(model, str(version)):
        if time.monotonic() > deadline:
            raise CwtopsError(f"{model} version {version} not READY after {timeout:.0f} s")
        time.sleep(0.2)


def _served_parity(url: str, model: str, version: int, reference: Path, params: Params) -> float:
    data = np.load(reference)
    served = infer(url, model, data["inputs"], version=version, max_batch=params.triton.max_batch_size)
    error = float(np.abs(served.astype(np.float64) - data["outputs"]).max())
    agree = bool((served.argmax(1) == data["outputs"].argmax(1)).all())
    if error > params.parity.atol or not agree:
        raise CwtopsError(f"served outputs of version {version} differ from its reference (max abs error {error:.3g}, atol {params.parity.atol}, argmax agreement {agree})")
    return error


def _write_version(model_dir: Path, version: int, onnx_path: Path) -> bool:
    """Write `<model>/<version>/model.onnx` atomically; False when identical bytes are there already."""
    target = model_dir / str(version) / "model.onnx"
    if target.exists():
        if sha256_file(target) != sha256_file(onnx_path):
            raise CwtopsError(f"{target} exists with different bytes; a published version is immutable (publish a new version)")
        return False
    with atomic_dir(model_dir / str(version)) as staging:
        (staging / "model.onnx").write_bytes(onnx_path.read_bytes())
    return True


def publish_version(onnx_path: Path, version: int, params: Params, *, reference: Path | None = None, url: str | None = None, retire_others: bool = True, timeout: float = 120.0) -> PublishResult:
    """Publish, load, check and (optionally) retire the others; restores the old state on failure."""
    from tasks.triton_server import http_url

    started = time.monotonic()
    name = validate_model_name(params.base.model_name)
    url = url or http_url(params)
    signature = read_signature(Path(onnx_path))
    previous = served_versions(url, name)
    both = sorted(set(previous) | {version})
    config = model_config(name, signature, params, both)  # refuses before anything is written
    model_dir = Path(params.triton.model_repository) / name
    old_config = (model_dir / "config.pbtxt").read_text() if (model_dir / "config.pbtxt").exists() else None
    created = _write_version(model_dir, version, Path(onnx_path))
    write_text(model_dir / "labels.txt", "\n".join(signature.class_names) + "\n")
    try:
        write_text(model_dir / "config.pbtxt", config)
        _load(url, name, version, timeout)
        error = _served_parity(url, name, version, reference, params) if reference else None
    except Exception:
        _restore(url, name, model_dir, version, old_config, previous, created)
        raise
    retired = [v for v in previous if v != version] if retire_others else []
    if retire_others and retired:
        write_text(model_dir / "config.pbtxt", model_config(name, signature, params, [version]))
        _load(url, name, version, timeout)
    return PublishResult(name, version, retired, error, time.monotonic() - started)


def _restore(url: str, name: str, model_dir: Path, version: int, old_config: str | None, previous: list[int], created: bool) -> None:
    """Put back the config that served `previous`, reload, drop the new version folder."""
    import shutil

    if old_config is not None:
        write_text(model_dir / "config.pbtxt", old_config)
    else:
        (model_dir / "config.pbtxt").unlink(missing_ok=True)
    if previous:
        try:
            connect(url).load_model(name, headers=admin_headers())
        except Exception:  # the old version stays loaded even if this reload fails
            pass
    else:
        try:
            connect(url).unload_model(name, headers=admin_headers())
        except Exception:
            pass
    if created:
        shutil.rmtree(model_dir / str(version), ignore_errors=True)

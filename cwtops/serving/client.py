"""Client code shared by `cwtops predict`, publishing, the rollout, the tests and the benchmark.

Thin wrappers over `tritonclient.http`: signals in (`[L]`, `[N, L]` or `[N, 1, L]`, float32),
logits out, large inputs sent in chunks of the model's max_batch_size, every failure a
CwtopsError that names the server, the model and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from cwtops.core.errors import CwtopsError
from cwtops.model.signature import INPUT_NAME, OUTPUT_NAME
from cwtops.serving.auth import admin_headers

if TYPE_CHECKING:
    import tritonclient.http as httpclient

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "admin_headers", "as_batch", "class_names", "classify", "connect", "infer", "softmax"]


def connect(url: str, concurrency: int = 1, timeout: float = 120.0) -> httpclient.InferenceServerClient:
    """An HTTP client for host:port (one per thread: tritonclient.http clients are not thread-safe)."""
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(
        url=url.removeprefix("http://"), concurrency=concurrency, connection_timeout=timeout, network_timeout=timeout
    )


@contextmanager
def triton_errors(url: str, model: str) -> Iterator[None]:
    """Turn tritonclient and socket errors into CwtopsError naming the server and the model."""
    from tritonclient.utils import InferenceServerException

    try:
        yield
    except InferenceServerException as error:
        raise CwtopsError(f"Triton at {url}, model '{model}': {error.message()}") from None
    except OSError as error:  # refused, reset, timed out
        raise CwtopsError(f"Triton is not reachable at {url} ({error}); start it with `cwtops triton start`") from None


def as_batch(signals: np.ndarray) -> np.ndarray:
    """[L], [N, L] or [N, 1, L] float32 -> a contiguous [N, 1, L] (other dtypes are refused, not cast)."""
    array = np.asarray(signals)
    if array.dtype != np.float32:
        raise CwtopsError(f"signals have dtype {array.dtype}; the served model takes float32 (convert with .astype(np.float32))")
    if array.ndim in (1, 2):
        array = array.reshape(-1, 1, array.shape[-1])
    if array.ndim != 3 or array.shape[1] != 1 or array.shape[0] == 0 or array.shape[2] == 0:
        raise CwtopsError(f"signals have shape {list(np.shape(signals))}; expected [L], [N, L] or [N, 1, L] with N, L >= 1")
    finite = np.isfinite(array).all(axis=(1, 2))
    if not finite.all():
        raise CwtopsError(f"signal {int(np.argmin(finite))} holds NaN or infinite values; the model takes finite numbers "
                          "(clean or drop that signal)")
    return np.ascontiguousarray(array)


def served_length(config: dict) -> int | None:
    """The signal length the served model takes (its input's last dimension; None if variable)."""
    for tensor in config.get("input", []):
        if tensor.get("name") == INPUT_NAME and tensor.get("dims"):
            length = int(tensor["dims"][-1])
            return length if length > 0 else None
    return None


def max_batch_size(url: str, model: str, client: httpclient.InferenceServerClient | None = None) -> int:
    """The model's max_batch_size as Triton serves it (0: the model takes no batch axis)."""
    with triton_errors(url, model):
        return int((client or connect(url)).get_model_config(model).get("max_batch_size", 0))


def request_ids(request_id: str, signals: int, max_batch: int) -> list[tuple[str, int]]:
    """(request id, row within the request) of each signal: one request per chunk of max_batch, the
    id as given for a single request, `<id>.<k>` for the k-th of several (what the inference log records)."""
    chunks = -(-signals // max_batch)
    return [(request_id if chunks == 1 else f"{request_id}.{i // max_batch}", i % max_batch) for i in range(signals)]


def infer(url: str, model: str, signals: np.ndarray, version: int | None = None, *, max_batch: int | None = None,
          client: httpclient.InferenceServerClient | None = None, request_id: str = "") -> np.ndarray:
    """Logits [N, C] for the signals; chunks of at most max_batch (default: the model's max_batch_size),
    each sent as one request with its id from `request_ids` when `request_id` is given."""
    import tritonclient.http as httpclient

    batch = as_batch(signals)
    client = client or connect(url)
    if max_batch is None:
        max_batch = max_batch_size(url, model, client) if len(batch) > 1 else 1
    if max_batch < 1:
        raise CwtopsError(f"model '{model}' at {url} has max_batch_size 0; publish it with triton.max_batch_size >= 1")
    outputs = []
    ids = request_ids(request_id, len(batch), max_batch) if request_id else []
    for start in range(0, len(batch), max_batch):
        chunk = batch[start : start + max_batch]
        tensor = httpclient.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
        tensor.set_data_from_numpy(chunk, binary_data=True)
        requested = [httpclient.InferRequestedOutput(OUTPUT_NAME, binary_data=True)]
        with triton_errors(url, model):
            result = client.infer(model, [tensor], model_version=str(version or ""), outputs=requested,
                                  request_id=ids[start][0] if ids else "")
        outputs.append(result.as_numpy(OUTPUT_NAME))
    return np.concatenate(outputs)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise probabilities, computed in float64 so tiny probabilities do not underflow early."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def served_config(url: str, model: str, version: int | None = None,
                  client: httpclient.InferenceServerClient | None = None) -> dict:
    with triton_errors(url, model):
        return (client or connect(url)).get_model_config(model, model_version=str(version or ""))


def check_length(batch: np.ndarray, config: dict, url: str, model: str) -> None:
    """Refuse signals of another length than the served model's, before sending them."""
    length = served_length(config)
    if length is not None and batch.shape[-1] != length:
        raise CwtopsError(f"signals have {batch.shape[-1]} samples; model '{model}' at {url} takes signals of {length} "
                          "samples (resample, crop or pad them to that length)")


def class_names(url: str, model: str, client: httpclient.InferenceServerClient | None = None,
                config: dict | None = None) -> list[str]:
    """Class names from the served config (`parameters.class_names`, the same list as labels.txt)."""
    config = config or served_config(url, model, client=client)
    raw = config.get("parameters", {}).get("class_names", {}).get("string_value", "")
    try:
        names = json.loads(raw) if raw else []
    except ValueError:
        names = []
    return [str(name) for name in names] if isinstance(names, list) else []


def classify(url: str, model: str, signals: np.ndarray, top_k: int = 3, version: int | None = None,
             request_id: str = "") -> list[list[tuple[str, float]]]:
    """For each signal, the top-k (class name, probability) pairs, most probable first."""
    client = connect(url)
    batch = as_batch(signals)  # refused here, before anything is sent: dtype, shape, NaN or Inf
    config = served_config(url, model, version, client)
    check_length(batch, config, url, model)
    probabilities = softmax(infer(url, model, batch, version, max_batch=max(1, int(config.get("max_batch_size", 0))),
                                  client=client, request_id=request_id))
    names = class_names(url, model, client, config)
    if len(names) != probabilities.shape[1]:
        names = [f"class {i}" for i in range(probabilities.shape[1])]
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return [[(names[i], float(row[i])) for i in order] for row, order in zip(probabilities, ranked)]

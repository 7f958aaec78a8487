"""Client code shared by `cwtops predict`, publishing, the rollout and the tests (tritonclient.http)."""

from __future__ import annotations

import os

import numpy as np

from tasks.errors import CwtopsError

INPUT_NAME, OUTPUT_NAME = "signal", "logits"


def connect(url: str, concurrency: int = 1):  # noqa: ANN201
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=url.removeprefix("http://"), concurrency=concurrency, network_timeout=120.0)


def admin_headers() -> dict[str, str] | None:
    """The secret header for Triton's restricted model-repository API, when one is configured."""
    from tasks.triton_server import API_KEY_ENV, API_KEY_HEADER

    key = os.environ.get(API_KEY_ENV)
    return {API_KEY_HEADER: key} if key else None


def as_batch(signals: np.ndarray) -> np.ndarray:
    """[L], [N, L] or [N, 1, L] -> [N, 1, L] float32 (other dtypes are refused, not cast)."""
    array = np.asarray(signals)
    if array.dtype != np.float32:
        raise CwtopsError(f"signals have dtype {array.dtype}; the served model takes float32 (convert with .astype(np.float32))")
    if array.ndim == 1:
        array = array[None, None, :]
    elif array.ndim == 2:
        array = array[:, None, :]
    if array.ndim != 3 or array.shape[1] != 1 or len(array) == 0:
        raise CwtopsError(f"signals have shape {list(np.shape(signals))}; expected [L], [N, L] or [N, 1, L] with N >= 1")
    return np.ascontiguousarray(array)


def infer(url: str, model: str, signals: np.ndarray, version: int | None = None, max_batch: int = 64, client=None) -> np.ndarray:  # noqa: ANN001
    """Logits [N, C] for signals, sent in chunks of at most `max_batch`."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    batch = as_batch(signals)
    client = client or connect(url)
    outputs = []
    for start in range(0, len(batch), max_batch):
        chunk = batch[start : start + max_batch]
        tensor = httpclient.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
        tensor.set_data_from_numpy(chunk, binary_data=True)
        try:
            result = client.infer(model, [tensor], model_version=str(version or ""), outputs=[httpclient.InferRequestedOutput(OUTPUT_NAME, binary_data=True)])
        except InferenceServerException as error:
            raise CwtopsError(f"Triton at {url} refused the request for model '{model}': {error.message()}") from None
        outputs.append(result.as_numpy(OUTPUT_NAME))
    return np.concatenate(outputs)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def class_names(url: str, model: str) -> list[str]:
    """The labels file Triton serves for the model (its classification extension reads the same)."""
    config = connect(url).get_model_config(model)
    labels = config.get("parameters", {}).get("class_names", {}).get("string_value", "")
    return labels.split(",") if labels else []


def classify(url: str, model: str, signals: np.ndarray, top_k: int = 3, version: int | None = None) -> list[list[tuple[str, float]]]:
    """For each signal, the top-k (class name, probability) pairs."""
    probabilities = softmax(infer(url, model, signals, version).astype(np.float64))
    names = class_names(url, model) or [str(i) for i in range(probabilities.shape[1])]
    ranked = np.argsort(-probabilities, axis=1)[:, :top_k]
    return [[(names[i], float(row[i])) for i in order] for row, order in zip(probabilities, ranked)]

"""Smaller and faster variants of the float32 ONNX export, measured and gated.

Three variants are built from `artifacts/export/model.onnx`:

- `optimized`: ONNX Runtime's offline graph optimisation (`optimized_model_filepath`) at the
  `extended` level (constant folding, Conv+activation fusions into com.microsoft FusedConv /
  FusedGemm): an ONNX Runtime-only file that loads on any machine's CPU provider; `basic` keeps
  standard ONNX ops only; `all` would bake in NCHWc layouts tied to this CPU's vector width.
  ONNX Runtime applies the same fusions when it loads the float32 file, so this variant saves
  session-creation time, not inference time (measured: equal throughput).
- `int8`: `onnxruntime.quantization.quantize_static` (QDQ, u8 activations, s8 weights),
  calibrated on training-split signals of the split manifest. Only Conv / Gemm / MatMul /
  MaxPool / Relu are quantized: the signal standardisation and `log1p(|scalogram|)` stay
  float32, because an 8-bit grid before the log wipes out the scalogram's quiet regions
  (measured: quantizing them cost ~19 accuracy points). conv1 (1 input channel, 8 outputs)
  keeps float activations on its int8 weights (`conv1_float_input`): ONNX Runtime's fast int8
  convolution needs more channels, and its QLinearConv fallback (im2col + an int8 GEMM with
  K = 9, N = 8, one image at a time) took 3.6 ms of a 13 ms batch, the float Conv 1.25 ms.
  Measured on 2 EPYC cores at batch 64: 1.3x float32 with both cores, 1.46x with one thread
  (BENCHMARKS.md has the per-node floor).
- `fp16`: `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`, a GPU
  variant; on CPU ONNX Runtime casts most of it back to float32, so CPU figures are informative only.

Each variant is scored on the test split against the float32 model (accuracy, macro-F1, argmax
agreement), timed side by side with it in the same process (throughput at `batch_size`, latency at
batch 1, interleaved rounds, medians) and gated: accuracy drop at most `max_accuracy_drop`
points and argmax agreement at least `min_agreement`. The report is
`artifacts/variants/report.json`; only variants that pass are registered (`register_variants`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from cwtops.core.artifacts import atomic_path, sha256_file, write_json
from cwtops.core.config import VARIANTS, Params, VariantsConfig
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import artifact_paths
from cwtops.data.signals import load_signals, read_manifest
from cwtops.model.signature import INPUT_NAME, OUTPUT_NAME, read_metadata

if TYPE_CHECKING:
    from mlflow import MlflowClient

FRONTEND_SCOPE = "/frontend/"  # the exported CWT filter-bank Conv is named /model/frontend/Conv
CONV1_SCOPE = "/conv1/"  # the first head Conv, /model/conv1/conv1.0/Conv
CPU = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class BuildResult:
    report: Path
    passed: tuple[str, ...]
    failed: dict[str, str]


# ---------------------------------------------------------------- where


def variants_dir(params: Params) -> Path:
    return Path(params.base.artifacts_dir) / "variants"


def variant_path(params: Params, name: str) -> Path:
    return variants_dir(params) / f"{name}.onnx"


def report_path(params: Params) -> Path:
    return variants_dir(params) / "report.json"


# ---------------------------------------------------------------- build


def build_optimized(source: Path, target: Path, level: str = "extended") -> Path:
    """ONNX Runtime's offline graph optimisation, saved as a standalone ONNX file."""
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise CwtopsError(f"optimization level '{level}' is not one of {', '.join(levels)} (variants.optimization_level)")
    with atomic_path(target) as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(source), options, providers=CPU)
    return target


def build_fp16(source: Path, target: Path) -> Path:
    """Weights and activations in float16, inputs and outputs left float32 (a drop-in for GPU)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))
    return target


class SignalReader:
    """An onnxruntime CalibrationDataReader over [N, L] signals, in batches of `batch_size`."""

    def __init__(self, signals: np.ndarray, batch_size: int = 32) -> None:
        batches = [signals[i : i + batch_size] for i in range(0, len(signals), batch_size)]
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.reshape(len(batch), 1, -1).astype(np.float32)}


def frontend_nodes(model_path: Path) -> list[str]:
    """Names of the CWT filter-bank nodes (to keep them float32 when asked)."""
    return [node.name for node in onnx.load(str(model_path)).graph.node if FRONTEND_SCOPE in node.name]


def keep_float_input(model: onnx.ModelProto, scope: str) -> int:
    """Feed the Convs named under `scope` their float input: drop the QuantizeLinear -> DequantizeLinear pair in
    front of them, keeping their int8 weights (DequantizeLinear of an int8 initializer).

    ONNX Runtime then fuses neither a QLinearConv (its input is not dequantized) nor an NCHWc Conv (its weight is not
    a float initializer): it runs the plain float Conv, whose output QuantizeLinear stays. Returns how many it changed.
    """
    graph, changed = model.graph, 0
    producer = {out: node for node in graph.node for out in node.output}
    bypassed: list[onnx.NodeProto] = []  # DequantizeLinear, then its QuantizeLinear, in that order
    for conv in [n for n in graph.node if n.op_type == "Conv" and scope in n.name]:
        dq = producer.get(conv.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        conv.input[0] = q.input[0]
        bypassed += [node for node in (dq, q) if not any(node is seen for seen in bypassed)]
        changed += 1
    # Once every Conv is rewired: drop the pairs nothing reads any more. Several Convs can share one
    # pair (a layer's branches of dilations all read the same input), and another reader keeps it.
    for node in bypassed:
        if not any(node.output[0] in other.input for other in graph.node if other is not node):
            graph.node.remove(node)
    return changed


def build_int8(source: Path, target: Path, calibration: np.ndarray, cfg: VariantsConfig) -> Path:
    """Static INT8 quantization (u8 activations, s8 weights) calibrated on `calibration` signals."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    excluded = [] if cfg.quantize_frontend else frontend_nodes(source)
    with tempfile.TemporaryDirectory(prefix="cwtops-int8-") as work, atomic_path(target) as tmp:
        prepared, quantized = Path(work) / "prepared.onnx", Path(work) / "quantized.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(quantized), SignalReader(calibration),
            quant_format=QuantFormat.QDQ if cfg.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=cfg.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[cfg.calibrate_method], op_types_to_quantize=list(cfg.op_types_to_quantize),
            nodes_to_exclude=excluded, extra_options={"CalibTensorRangeSymmetric": False},
        )
        model = onnx.load(str(quantized))
        if cfg.conv1_float_input and cfg.quant_format == "qdq":
            keep_float_input(model, CONV1_SCOPE)
        onnx.save(model, str(tmp))
    return target


def quantized_ops(path: Path) -> dict[str, int]:
    """Counts of the INT8 operators in a model (QDQ pairs or QLinear* / ConvInteger kernels)."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type.startswith(("QLinear", "ConvInteger", "MatMulInteger")):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ---------------------------------------------------------------- data


def class_names(model_path: Path) -> list[str]:
    """The output order recorded in the export's metadata."""
    raw = read_metadata(model_path).get("class_names")
    if not raw:
        raise CwtopsError(f"{model_path}: no class_names in the ONNX metadata; re-export it (`dvc repro export`)")
    return list(json.loads(raw))


def split_signals(params: Params, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N, L] signals and their labels (strings) of one split of the split manifest.

    With `limit`, a seeded random subset in manifest order (calibration needs a few hundred).
    """
    manifest = read_manifest(artifact_paths(params.base).split_manifest, ["file", "row", "label", "split"])
    rows = manifest[manifest.split == split]
    if rows.empty:
        raise CwtopsError(f"{artifact_paths(params.base).split_manifest}: no '{split}' rows; re-run the balance stage")
    if limit is not None and limit < len(rows):
        chosen = np.random.default_rng(params.base.seed).choice(len(rows), limit, replace=False)
        rows = rows.iloc[np.sort(chosen)]
    return load_signals(rows, Path(params.base.raw_dir)), rows.label.to_numpy()


def test_set(params: Params, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    signals, labels = split_signals(params, "test")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise CwtopsError(f"test labels {unknown} are not among the model's classes {classes}; re-run the pipeline")
    return signals, np.array([index[label] for label in labels], dtype=np.int64)


# ---------------------------------------------------------------- measure


def session(path: Path, threads: int = 0, providers: list[str] | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # fp16 on CPU logs one warning per inserted Cast
    return ort.InferenceSession(str(path), options, providers=providers or CPU)


def predict(sess: ort.InferenceSession, signals: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """[N, L] signals -> [N, C] float32 logits."""
    parts = [
        sess.run([OUTPUT_NAME], {INPUT_NAME: signals[i : i + batch_size].reshape(-1, 1, signals.shape[-1])})[0]
        for i in range(0, len(signals), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)


def accuracy_figures(labels: np.ndarray, logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of `logits`, their drops (points) and agreement against `reference` logits."""
    from sklearn.metrics import accuracy_score, f1_score

    predicted, expected = logits.argmax(1), reference.argmax(1)
    accuracy, ref_accuracy = accuracy_score(labels, predicted), accuracy_score(labels, expected)
    f1 = f1_score(labels, predicted, average="macro", zero_division=0)
    ref_f1 = f1_score(labels, expected, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy),
        "macro_f1": float(f1),
        "accuracy_drop": float(100 * (ref_accuracy - accuracy)),  # percentage points
        "macro_f1_drop": float(100 * (ref_f1 - f1)),
        "argmax_agreement": float(np.mean(predicted == expected)) if len(labels) else 1.0,
        "max_abs_logit_error": float(np.abs(logits.astype(np.float64) - reference).max(initial=0.0)),
    }


def gate(figures: dict[str, float], cfg: VariantsConfig) -> GateResult:
    """Accept when the accuracy drop is at most `max_accuracy_drop` points and agreement at least `min_agreement`."""
    reasons = []
    if not figures["accuracy_drop"] <= cfg.max_accuracy_drop:  # `not <=` also refuses NaN
        reasons.append(f"accuracy drop {figures['accuracy_drop']:.2f} points > {cfg.max_accuracy_drop} allowed")
    if not figures["argmax_agreement"] >= cfg.min_agreement:
        reasons.append(f"argmax agreement {figures['argmax_agreement']:.4f} < {cfg.min_agreement} required")
    return GateResult(not reasons, tuple(reasons))


def time_side_by_side(
    sessions: dict[str, ort.InferenceSession], batch: np.ndarray, repeats: int, block: int = 5, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Median seconds per run of each session, in interleaved rounds, and its speed-up over the first.

    Interleaving puts every model under the same background load (this machine is shared), and
    the ratio is the median of per-round ratios, so a slow round slows both sides of it. A round
    runs each session `warmup` + `block` times in a row: alternating single runs would time every
    model while the previous session's intra-op threads still spin (ONNX Runtime's default), which
    on 2 cores halved float32's measured throughput and inflated INT8's ratio to 1.5-1.9x.
    """
    feed = {INPUT_NAME: batch.reshape(len(batch), 1, -1).astype(np.float32)}
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    rounds: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(max(1, -(-repeats // block))):
        for name, sess in sessions.items():
            for _ in range(warmup):
                sess.run([OUTPUT_NAME], feed)
            times = []
            for _ in range(block):
                start = time.perf_counter()
                sess.run([OUTPUT_NAME], feed)
                times.append(time.perf_counter() - start)
            samples[name] += times
            rounds[name].append(statistics.median(times))
    baseline = rounds[next(iter(sessions))]
    return {
        name: {"seconds": statistics.median(samples[name]), "speedup": statistics.median(b / t for b, t in zip(baseline, rounds[name]))}
        for name in sessions
    }


def load_seconds(path: Path, threads: int, repeats: int = 3) -> float:
    """Median session-creation time (where offline optimisation pays off)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session(path, threads)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing_batch(signals: np.ndarray, size: int) -> np.ndarray:
    """`size` real signals (repeated when the split holds fewer)."""
    return np.resize(signals, (size, signals.shape[-1])).astype(np.float32)


def speed(models: dict[str, Path], signals: np.ndarray, cfg: VariantsConfig) -> dict[str, dict[str, float]]:
    """Throughput at `batch_size` and latency at batch 1 of every model, side by side with the first."""
    sessions = {name: session(path, cfg.threads) for name, path in models.items()}
    batch = time_side_by_side(sessions, timing_batch(signals, cfg.batch_size), cfg.repeats)
    single = time_side_by_side(sessions, timing_batch(signals, 1), cfg.repeats * 5)
    return {
        name: {
            "batch_size": cfg.batch_size,
            "throughput_signals_per_s": cfg.batch_size / batch[name]["seconds"],
            "throughput_speedup": batch[name]["speedup"],
            "latency_ms": 1e3 * single[name]["seconds"],
            "latency_speedup": single[name]["speedup"],
            "load_ms": 1e3 * load_seconds(path, cfg.threads),
        }
        for name, path in models.items()
    }


def build_variant(name: str, source: Path, target: Path, params: Params, cfg: VariantsConfig) -> dict:
    """Write one variant; returns how it was built."""
    start = time.perf_counter()
    if name == "optimized":
        build_optimized(source, target, cfg.optimization_level)
        info: dict = {"optimization_level": cfg.optimization_level}
    elif name == "int8":
        calibration, _ = split_signals(params, "train", cfg.calibration_signals)
        build_int8(source, target, calibration, cfg)
        info = {"quant_format": cfg.quant_format, "per_channel": cfg.per_channel, "calibrate_method": cfg.calibrate_method,
                "calibration_signals": len(calibration), "calibration_split": "train",
                "op_types_to_quantize": list(cfg.op_types_to_quantize), "quantize_frontend": cfg.quantize_frontend,
                "conv1_float_input": cfg.conv1_float_input,
                "quantized_ops": quantized_ops(target)}
    elif name == "fp16":
        build_fp16(source, target)
        info = {"keep_io_types": True, "target": "GPU (CUDA/TensorRT); CPU figures are informative only"}
    else:
        raise CwtopsError(f"unknown variant '{name}'; variants are: {', '.join(VARIANTS)}")
    return {**info, "build_seconds": round(time.perf_counter() - start, 3)}


def score(models: dict[str, Path], signals: np.ndarray, labels: np.ndarray, cfg: VariantsConfig) -> dict[str, dict]:
    """Accuracy figures of every variant against the first model (float32), plus the gate."""
    (base_name, base_path), *others = models.items()
    reference = predict(session(base_path), signals)
    scored = {base_name: accuracy_figures(labels, reference, reference)}
    for name, path in others:
        figures = accuracy_figures(labels, predict(session(path), signals), reference)
        verdict = gate(figures, cfg)
        scored[name] = {**figures, "gate": {"passed": verdict.passed, "reasons": list(verdict.reasons)}}
    return scored


def build(params: Params, cfg: VariantsConfig | None = None) -> BuildResult:
    """Build, score, time and gate every variant; write artifacts/variants/report.json atomically."""
    cfg = cfg or params.variants
    source = artifact_paths(params.base).onnx
    if not source.exists():
        raise CwtopsError(f"{source}: no float32 export; run the export stage first (`dvc repro export`)")
    signals, labels = test_set(params, class_names(source))
    models, builds = {"float32": source}, {}
    for name in cfg.variants:
        builds[name] = build_variant(name, source, variant_path(params, name), params, cfg)
        models[name] = variant_path(params, name)
    scored, timed = score(models, signals, labels, cfg), speed(models, signals, cfg)
    entries = {
        name: {"path": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
               "build": builds.get(name, {}), **scored[name], **timed[name]}
        for name, path in models.items()
    }
    report = {"source": str(source), "source_sha256": entries["float32"]["sha256"], "n_test": len(labels),
              "gate": {"max_accuracy_drop": cfg.max_accuracy_drop, "min_agreement": cfg.min_agreement},
              "config": cfg.model_dump(mode="json"), "onnxruntime": ort.__version__, "providers": CPU,
              "models": entries}
    write_json(report_path(params), report)
    failed = {name: "; ".join(entries[name]["gate"]["reasons"]) for name in cfg.variants if not entries[name]["gate"]["passed"]}
    return BuildResult(report_path(params), tuple(n for n in cfg.variants if n not in failed), failed)


def load_report(params: Params) -> dict:
    path = report_path(params)
    if not path.exists():
        raise CwtopsError(f"{path}: no variants report; build the variants first (`cwtops variants build`)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- register


@dataclass(frozen=True)
class VariantRegistration:
    variant: str
    model_name: str
    registered: bool
    version: int | None
    reason: str  # why it was not registered, or "" / "already registered"


def registered_name(params: Params, variant: str) -> str:
    return f"{params.base.model_name}-{variant}"


def checked_entry(params: Params, report: dict, variant: str) -> tuple[dict, str]:
    """The report entry of `variant` and its gate failure ("" when it passed), checked against the files."""
    paths = artifact_paths(params.base)
    if report.get("source_sha256") != sha256_file(paths.onnx):
        raise CwtopsError(f"{report_path(params)} was built from another {paths.onnx}; rebuild it (`cwtops variants build`)")
    entry = report.get("models", {}).get(variant)
    if entry is None:
        return {}, f"not in {report_path(params)} (built: {', '.join(report.get('models', {}))})"
    path = variant_path(params, variant)
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        raise CwtopsError(f"{path} is missing or not the file the report measured; rebuild it (`cwtops variants build`)")
    return entry, "; ".join(entry["gate"]["reasons"]) or ("" if entry["gate"]["passed"] else "gate failed")


def variant_tags(lineage: dict[str, str], run_id: str, variant: str, entry: dict, report: dict, float32_version: str) -> dict[str, str]:
    """Lineage of the float32 model plus what the variant is, its figures and its gate result."""
    figures = ("accuracy", "macro_f1", "accuracy_drop", "macro_f1_drop", "argmax_agreement",
               "throughput_speedup", "latency_speedup", "throughput_signals_per_s", "latency_ms")
    tags = {**lineage, "run_id": run_id, "variant": variant, "onnx_sha256": entry["sha256"],
            "source_onnx_sha256": report["source_sha256"], "float32_version": float32_version,
            "gate_passed": str(entry["gate"]["passed"]).lower(), "gate_max_accuracy_drop": str(report["gate"]["max_accuracy_drop"]),
            "gate_min_agreement": str(report["gate"]["min_agreement"]), "reference_artifact": "extra_files/reference.npz"}
    tags |= {f"variant_{key}": f"{entry[key]:.6f}" for key in figures if key in entry}
    tags["variant_report"] = json.dumps({k: v for k, v in entry.items() if k != "path"}, sort_keys=True)[:5000]
    return tags


def _variant_reference(params: Params, path: Path, work: Path) -> Path:
    """The parity reference inputs with this variant's own outputs (what its served copy is checked against)."""
    inputs = np.load(artifact_paths(params.base).reference)["inputs"]
    target = work / "reference.npz"
    np.savez(target, inputs=inputs, outputs=predict(session(path), inputs[:, 0, :]))
    return target


def _log_variant(client: MlflowClient, params: Params, variant: str, run_id: str, experiment_id: str, tags: dict[str, str]) -> int:
    """`mlflow.onnx.log_model` of the variant into the float32 model's run, registering `<model>-<variant>`."""
    from mlflow.models import infer_signature

    import mlflow

    path = variant_path(params, variant)
    model = onnx.load(str(path))
    with tempfile.TemporaryDirectory(prefix="cwtops-variant-") as work:
        reference = _variant_reference(params, path, Path(work))
        report_copy = Path(work) / "variants_report.json"
        report_copy.write_bytes(report_path(params).read_bytes())
        data = np.load(reference)
        mlflow.set_tracking_uri(client.tracking_uri)  # log_model resolves the URIs globally
        mlflow.set_registry_uri(client.tracking_uri)
        mlflow.set_experiment(experiment_id=experiment_id)
        info = mlflow.onnx.log_model(
            model, name=f"model-{variant}", registered_model_name=registered_name(params, variant),
            save_as_external_data=False, signature=infer_signature({INPUT_NAME: data["inputs"]}, {OUTPUT_NAME: data["outputs"]}),
            input_example={INPUT_NAME: data["inputs"][:1]}, extra_files=[str(reference), str(report_copy)],
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            metadata={**{p.key: p.value for p in model.metadata_props}, "variant": variant}, tags=tags, run_id=run_id,
        )
    return int(info.registered_model_version)


def _register_one(client: MlflowClient, params: Params, report: dict, variant: str, run_id: str, context: tuple[dict, str]) -> VariantRegistration:
    """Register one variant when it passed its gate; idempotent per run and file."""
    import hashlib

    from cwtops.registry.versions import search_versions

    lineage, experiment_id = context
    name = registered_name(params, variant)
    entry, failure = checked_entry(params, report, variant)
    if failure:
        return VariantRegistration(variant, name, False, None, failure)
    # the registry checks downloads against the bytes MLflow stores, which are onnx's serialisation
    sha = hashlib.sha256(onnx.load(str(variant_path(params, variant))).SerializeToString()).hexdigest()
    for existing in search_versions(client, name, run_id):
        if existing.tags.get("onnx_sha256") == sha:
            return VariantRegistration(variant, name, True, int(existing.version), "already registered")
    float32 = [v.version for v in search_versions(client, params.base.model_name, run_id) if v.tags.get("onnx_sha256") == report["source_sha256"]]
    tags = variant_tags(lineage, run_id, variant, {**entry, "sha256": sha}, report, str(max(float32, key=int, default="")))
    tags["variant_file_sha256"] = entry["sha256"]
    version = _log_variant(client, params, variant, run_id, experiment_id, tags)
    client.update_model_version(name, str(version), description=(
        f"`{variant}` variant of `{params.base.model_name}` (float32 version {tags['float32_version'] or 'not registered'}, "
        f"run `{run_id}`): test accuracy {entry['accuracy']:.4f} (drop {entry['accuracy_drop']:.2f} points), argmax agreement "
        f"{entry['argmax_agreement']:.4f}, {entry['throughput_speedup']:.2f}x float32 throughput at batch {entry['batch_size']} on CPU."))
    return VariantRegistration(variant, name, True, version, "")


def register_variants(params: Params, variants: tuple[str, ...] | None = None) -> list[VariantRegistration]:
    """Register every built variant that passed its gate as `<model_name>-<variant>`, in the float32 run.

    Variants that failed are not registered; their result says why. Needs the parity-checked
    float32 export, the tracked run (artifacts/track/run.json) and a fresh variants report.
    """
    from cwtops.registry.lineage import lineage, load_run
    from cwtops.registry.server import with_retries
    from cwtops.registry.versions import checked_parity, registry_client, tracked_run

    checked_parity(artifact_paths(params.base))
    report = load_report(params)
    names = variants or tuple(name for name in report.get("models", {}) if name != "float32")
    run_id, current = load_run(params.base)["run_id"], lineage(params.base)
    with registry_client(params) as client:
        context = (current, tracked_run(client, run_id, current))
        return [
            with_retries(lambda v=v: _register_one(client, params, report, v, run_id, context), client.tracking_uri)
            for v in names
        ]

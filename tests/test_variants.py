"""INT8 / FP16 / graph-optimised variants: the gate (pure), the builders (a tiny real model) and,
marked slow, the whole build and MLflow registration on the small built project."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cwtops.core.artifacts import write_json
from cwtops.core.config import load_params
from cwtops.core.errors import CwtopsError
from cwtops.model.network import HybridCWTNet, ModelArgs
from cwtops.variants import (
    VariantsConfig,
    accuracy_figures,
    build,
    build_fp16,
    build_int8,
    build_optimized,
    gate,
    predict,
    quantized_ops,
    register_variants,
    registered_name,
    report_path,
    score,
    session,
    time_side_by_side,
    variant_path,
)
from tasks.export import onnx_bytes

TINY_LENGTH = 256


# ---------------------------------------------------------------- pure: figures and the gate


def _figures(drop: float, agreement: float) -> dict[str, float]:
    return {"accuracy_drop": drop, "argmax_agreement": agreement}


def test_gate_accepts_a_variant_within_both_thresholds() -> None:
    verdict = gate(_figures(0.5, 0.99), VariantsConfig())
    assert verdict.passed and verdict.reasons == ()


@pytest.mark.parametrize(
    ("drop", "agreement", "reason"),
    [(0.51, 1.0, "accuracy drop"), (0.0, 0.985, "argmax agreement"), (float("nan"), 1.0, "accuracy drop")],
)
def test_gate_rejects_and_says_why(drop: float, agreement: float, reason: str) -> None:
    verdict = gate(_figures(drop, agreement), VariantsConfig())
    assert not verdict.passed
    assert any(reason in text for text in verdict.reasons)


def test_gate_thresholds_come_from_the_config() -> None:
    assert gate(_figures(0.8, 0.97), VariantsConfig(max_accuracy_drop=1.0, min_agreement=0.95)).passed
    with pytest.raises(ValueError, match="min_agreement"):
        VariantsConfig(min_agreement=1.5)
    with pytest.raises(ValueError, match="extra"):
        VariantsConfig(max_acuracy_drop=1.0)  # a typo is an error, not a silent default


def test_accuracy_figures_against_the_float32_logits() -> None:
    labels = np.array([0, 1, 1, 0])
    reference = np.array([[2, 0], [0, 2], [0, 2], [0, 2]], dtype=np.float32)  # 3 of 4 right
    candidate = np.array([[2, 0], [0, 2], [2, 0], [0, 2]], dtype=np.float32)  # 2 of 4 right
    figures = accuracy_figures(labels, candidate, reference)
    assert figures["accuracy"] == pytest.approx(0.5)
    assert figures["accuracy_drop"] == pytest.approx(25.0)  # points
    assert figures["argmax_agreement"] == pytest.approx(0.75)
    assert figures["max_abs_logit_error"] == pytest.approx(2.0)


# ---------------------------------------------------------------- builders on a tiny real model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-filter HybridCWTNet with random weights, exported like the real one."""
    torch.manual_seed(0)
    t = torch.arange(-16, 17, dtype=torch.float32)
    bank = torch.stack([torch.cos(0.1 * (k + 1) * t) * torch.exp(-(t**2) / 64) for k in range(16)])
    args = ModelArgs(n_filters=16, kernel_size=33, n_classes=3, signal_length=TINY_LENGTH, channels=(4, 4, 8, 8), hidden=8)
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    path.write_bytes(onnx_bytes(HybridCWTNet(args, bank).eval(), TINY_LENGTH, 18, dynamic_length=False))
    return path


def _signals(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, TINY_LENGTH)).astype(np.float32)


def test_optimized_variant_gives_the_same_logits(tiny_model: Path, tmp_path: Path) -> None:
    target = build_optimized(tiny_model, tmp_path / "optimized.onnx")
    signals = _signals(16)
    expected, actual = predict(session(tiny_model), signals), predict(session(target), signals)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(CwtopsError, match="basic, extended"):
        build_optimized(tiny_model, tmp_path / "x.onnx", level="all")


def test_int8_variant_really_holds_quantized_ops(tiny_model: Path, tmp_path: Path) -> None:
    target = build_int8(tiny_model, tmp_path / "int8.onnx", _signals(64, seed=1), VariantsConfig())
    ops = quantized_ops(target)
    assert ops.get("QuantizeLinear", 0) >= 5 and ops.get("DequantizeLinear", 0) >= 5, ops
    int8_weights = [i for i in onnx.load(str(target)).graph.initializer if numpy_helper.to_array(i).dtype == np.int8]
    assert len(int8_weights) >= 5  # frontend + conv1..conv4 (+ fc1, fc2) weights stored as int8
    assert quantized_ops(tiny_model) == {}
    assert predict(session(target), _signals(8)).shape == (8, 3)


def test_int8_keeps_the_frontend_float_when_asked(tiny_model: Path, tmp_path: Path) -> None:
    target = build_int8(tiny_model, tmp_path / "int8.onnx", _signals(32), VariantsConfig(quantize_frontend=False))
    frontend = [n for n in onnx.load(str(target)).graph.node if "/frontend/Conv" in n.name]
    assert [n.op_type for n in frontend] == ["Conv"]
    weight = next(i for i in onnx.load(str(target)).graph.initializer if i.name == frontend[0].input[1])
    assert numpy_helper.to_array(weight).dtype == np.float32


def _conv1(path: Path) -> tuple[onnx.NodeProto, dict[str, onnx.NodeProto]]:
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    return next(n for n in graph.node if n.op_type == "Conv" and "/conv1/" in n.name), producer


@pytest.mark.parametrize("float_input", [True, False])
def test_int8_conv1_reads_float_activations_with_int8_weights(tiny_model: Path, tmp_path: Path, float_input: bool) -> None:
    cfg = VariantsConfig(conv1_float_input=float_input)
    target = build_int8(tiny_model, tmp_path / "int8.onnx", _signals(64, seed=1), cfg)
    conv1, producer = _conv1(target)
    feeding = producer[conv1.input[0]]
    weight = producer[conv1.input[1]]  # DequantizeLinear of the int8 initializer, in both forms
    assert weight.op_type == "DequantizeLinear"
    int8 = {i.name for i in onnx.load(str(target)).graph.initializer if numpy_helper.to_array(i).dtype == np.int8}
    assert weight.input[0] in int8
    # float input: conv1 reads the float scalogram directly; otherwise a Q -> DQ pair stands in front
    assert (feeding.op_type != "DequantizeLinear") is float_input, feeding.op_type
    signals = _signals(16, seed=2)
    reference = predict(session(tiny_model), signals)
    assert np.mean(predict(session(target), signals).argmax(1) == reference.argmax(1)) >= 0.8


def test_int8_conv1_float_input_with_branches_that_share_one_input(tmp_path: Path) -> None:
    """The default 1-D head's conv1 is two Convs (branches of dilations) reading one quantized input."""
    torch.manual_seed(0)
    t = torch.arange(-16, 17, dtype=torch.float32)
    bank = torch.stack([torch.cos(0.1 * (k + 1) * t) * torch.exp(-(t**2) / 64) for k in range(16)])
    args = ModelArgs(n_filters=16, kernel_size=33, n_classes=3, signal_length=TINY_LENGTH, head="1d", channels=(4, 4, 8, 8),
                     hidden=8, hop=1, dilations=((2, 8, 16, 32), (1, 2, 4, 8)))
    source = tmp_path / "branched.onnx"
    source.write_bytes(onnx_bytes(HybridCWTNet(args, bank).eval(), TINY_LENGTH, 18, dynamic_length=False))
    target = build_int8(source, tmp_path / "int8.onnx", _signals(64, seed=1), VariantsConfig(conv1_float_input=True))
    graph = onnx.load(str(target)).graph
    producer = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv" and "/conv1/" in n.name]
    assert len(convs) == 2 and all(producer[c.input[0]].op_type != "DequantizeLinear" for c in convs)
    readers = {name for node in graph.node for name in node.input}
    assert all(o in readers or o in {v.name for v in graph.output} for n in graph.node for o in n.output[:1])  # no orphans
    signals = _signals(16, seed=2)
    assert np.mean(predict(session(target), signals).argmax(1) == predict(session(source), signals).argmax(1)) >= 0.8


def test_fp16_variant_keeps_float32_inputs_and_outputs(tiny_model: Path, tmp_path: Path) -> None:
    target = build_fp16(tiny_model, tmp_path / "fp16.onnx")
    graph = onnx.load(str(target)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    weight_bytes = [sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(p)).graph.initializer) for p in (tiny_model, target)]
    assert weight_bytes[1] < 0.55 * weight_bytes[0]


def test_side_by_side_timing_reports_every_model(tiny_model: Path) -> None:
    sessions = {"float32": session(tiny_model), "same": session(tiny_model)}
    timed = time_side_by_side(sessions, _signals(4), repeats=5)
    assert set(timed) == {"float32", "same"}
    assert timed["float32"]["speedup"] == 1.0
    assert all(entry["seconds"] > 0 for entry in timed.values())


def _damaged(source: Path, target: Path) -> Path:
    """The model with its last layer's class rows rotated: confident and mostly wrong."""
    model = onnx.load(str(source))
    gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for tensor in model.graph.initializer:
        if tensor.name in gemm.input[1:]:
            tensor.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(tensor), 1, axis=0), tensor.name))
    onnx.save(model, str(target))
    return target


def test_score_gates_a_good_variant_in_and_a_damaged_one_out(tiny_model: Path, tmp_path: Path) -> None:
    signals = _signals(96, seed=2)
    labels = predict(session(tiny_model), signals).argmax(1)  # float32 is right by construction
    models = {"float32": tiny_model, "optimized": build_optimized(tiny_model, tmp_path / "o.onnx"),
              "damaged": _damaged(tiny_model, tmp_path / "d.onnx")}
    scored = score(models, signals, labels, VariantsConfig())
    assert scored["optimized"]["gate"]["passed"]
    assert not scored["damaged"]["gate"]["passed"]
    assert scored["damaged"]["argmax_agreement"] < 0.9
    assert "argmax agreement" in " ".join(scored["damaged"]["gate"]["reasons"])


# ---------------------------------------------------------------- the built project (slow)


@pytest.fixture(scope="module")
def variants_project(built_project: Path, services_env: dict) -> Iterator[Path]:
    """The built project with its variants built once (few timing rounds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(built_project)
        for key in ("CWTOPS_STATE_DIR", "CWTOPS_TRITON_HOME", "PATH"):
            patch.setenv(key, services_env[key])
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        build(load_params(), VariantsConfig(repeats=3))
        yield built_project


@pytest.mark.slow
def test_build_writes_the_variants_and_a_full_report(variants_project: Path) -> None:
    params = load_params()
    report = json.loads(report_path(params).read_text())
    assert set(report["models"]) == {"float32", "optimized", "int8", "fp16"}
    assert report["n_test"] > 50
    for name in ("optimized", "int8", "fp16"):
        entry = report["models"][name]
        assert variant_path(params, name).exists() and entry["size_bytes"] == variant_path(params, name).stat().st_size
        for key in ("accuracy", "macro_f1", "argmax_agreement", "throughput_signals_per_s", "latency_ms", "throughput_speedup"):
            assert entry[key] > 0, (name, key)
    assert report["models"]["optimized"]["gate"]["passed"]
    assert report["models"]["optimized"]["argmax_agreement"] == 1.0
    assert report["models"]["int8"]["size_bytes"] < 0.5 * report["models"]["float32"]["size_bytes"]
    assert quantized_ops(variant_path(params, "int8")).get("DequantizeLinear", 0) >= 10


@pytest.mark.slow
def test_register_passing_variants_in_the_float32_run(variants_project: Path, mlflow_server: str) -> None:
    from cwtops.registry.lineage import load_run
    from cwtops.registry.versions import register
    from mlflow import MlflowClient

    params = load_params()
    float32 = register(params)  # the float32 version the variants point back to
    forced = json.loads(report_path(params).read_text())
    forced["models"]["fp16"]["gate"] = {"passed": False, "reasons": ["argmax agreement 0.9000 < 0.99 required"]}
    write_json(report_path(params), forced)

    results = {item.variant: item for item in register_variants(params)}
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version(registered_name(params, "optimized"), str(results["optimized"].version))
    assert results["optimized"].registered and version.run_id == load_run(params.base)["run_id"] == float32.run_id
    assert version.tags["gate_passed"] == "true" and version.tags["variant"] == "optimized"
    assert version.tags["float32_version"] == str(float32.version)
    assert json.loads(version.tags["variant_report"])["argmax_agreement"] == 1.0
    assert not results["fp16"].registered and "argmax agreement" in results["fp16"].reason
    assert not client.search_model_versions(f"name = '{registered_name(params, 'fp16')}'")
    again = {item.variant: item for item in register_variants(params, ("optimized",))}
    assert again["optimized"].version == results["optimized"].version and again["optimized"].reason == "already registered"


@pytest.mark.slow
def test_register_refuses_a_report_of_another_export(variants_project: Path, mlflow_server: str) -> None:
    params = load_params()
    stale = json.loads(report_path(params).read_text())
    stale["source_sha256"] = "0" * 64
    write_json(report_path(params), stale)
    with pytest.raises(CwtopsError, match="variants build"):
        register_variants(params)

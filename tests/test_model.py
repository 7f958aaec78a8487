"""Model behaviour: the fused front-end equals the per-layer original; only the head trains."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tasks.export import INPUT_NAME, OUTPUT_NAME, onnx_bytes
from tasks.model import (
    CWTFrontEnd,
    HybridCWTNet,
    ModelArgs,
    checkpoint_dict,
    head_flops,
    load_checkpoint,
    trainable_parameters,
)
from tasks.reference import PerLayerFrontEnd


def random_bank(seed: int, n_filters: int = 112) -> tuple[list[np.ndarray], torch.Tensor]:
    """Random filters of different (odd and even) lengths, and their padded [S, K] matrix."""
    rng = np.random.default_rng(seed)
    filters = [rng.standard_normal(int(k)).astype(np.float32) for k in rng.integers(2, 130, n_filters)]
    width = max(len(f) for f in filters) | 1
    matrix = np.zeros((n_filters, width), np.float32)
    for row, taps in enumerate(filters):
        offset = (width - 1) // 2 - (len(taps) - 1) // 2
        matrix[row, offset : offset + len(taps)] = taps
    return filters, torch.from_numpy(matrix)


@pytest.mark.parametrize("method", ["conv", "fft"])
@pytest.mark.parametrize("hop", [1, 8])
@pytest.mark.parametrize("magnitude", ["abs", "square", "none"])
def test_frontend_matches_per_layer_reference(method: str, hop: int, magnitude: str) -> None:
    filters, matrix = random_bank(seed=hop)
    signal = torch.randn(3, 1, 777, generator=torch.Generator().manual_seed(1))
    expected = PerLayerFrontEnd(filters, hop=hop, magnitude=magnitude)(signal)
    actual = CWTFrontEnd(matrix, hop=hop, magnitude=magnitude, method=method)(signal)
    assert actual.shape == expected.shape
    relative = (actual - expected).abs().max() / expected.abs().max()
    assert relative < 1e-5


def test_frontend_is_frozen_and_only_head_trains() -> None:
    _, matrix = random_bank(seed=3, n_filters=32)
    model = HybridCWTNet(ModelArgs(n_filters=32, kernel_size=matrix.shape[1], n_classes=4, signal_length=512), matrix)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not name.startswith("frontend") for name in trainable)
    assert "frontend.filter_bank" in dict(model.named_buffers())
    assert len(trainable_parameters(model)) == len(list(model.parameters()))
    loss = model(torch.randn(4, 1, 512)).sum()
    loss.backward()
    assert all(p.grad is not None for p in trainable_parameters(model))


def test_checkpoint_rebuilds_model(tmp_path) -> None:
    _, matrix = random_bank(seed=4, n_filters=32)
    args = ModelArgs(n_filters=32, kernel_size=matrix.shape[1], n_classes=3, signal_length=256, hop=4)
    model = HybridCWTNet(args, matrix).eval()
    torch.save(checkpoint_dict(model, ["a", "b", "c"], "sha", {"train": {"epochs": 1}}), tmp_path / "m.pt")
    rebuilt, checkpoint = load_checkpoint(tmp_path / "m.pt")
    signal = torch.randn(2, 1, 256)
    assert checkpoint["class_names"] == ["a", "b", "c"]
    assert torch.equal(rebuilt.frontend.filter_bank, model.frontend.filter_bank)
    assert torch.allclose(rebuilt(signal), model(signal))


def test_onnx_export_matches_torch_at_batch_1_and_64() -> None:
    _, matrix = random_bank(seed=5, n_filters=32)
    args = ModelArgs(n_filters=32, kernel_size=matrix.shape[1], n_classes=5, signal_length=512)
    model = HybridCWTNet(args, matrix).eval()
    session = ort.InferenceSession(onnx_bytes(model, 512, 18, dynamic_length=False))
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    for batch in (1, 64):
        signal = torch.randn(batch, 1, 512)
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: signal.numpy()})
        assert logits.shape == (batch, 5)
        assert np.abs(logits - model(signal).detach().numpy()).max() < 1e-4


def test_head_flops_counts_every_layer() -> None:
    flops = head_flops(ModelArgs(n_filters=112, kernel_size=257, n_classes=5, signal_length=2048))
    assert set(flops) == {"frontend", "conv1", "conv2", "conv3", "conv4", "fc1", "fc2"}
    assert flops["conv1"] == 2 * 112 * 256 * 1 * 8 * 9


def test_strided_stem_keeps_shapes_costs_a_quarter_and_survives_checkpoints(tmp_path) -> None:
    _, matrix = random_bank(seed=6, n_filters=32)
    pooled = ModelArgs(n_filters=32, kernel_size=matrix.shape[1], n_classes=3, signal_length=512)
    strided = ModelArgs(**{**pooled.__dict__, "stem": "strided"})
    signal = torch.randn(2, 1, 512)
    a, b = HybridCWTNet(pooled, matrix).eval(), HybridCWTNet(strided, matrix).eval()
    assert a(signal).shape == b(signal).shape == (2, 3)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in b.conv1)
    assert head_flops(strided)["conv1"] * 4 == head_flops(pooled)["conv1"]
    b.load_state_dict(a.state_dict())  # the same parameters: pooling has none
    torch.save(checkpoint_dict(b, ["a", "b", "c"], "sha", {}), tmp_path / "strided.pt")
    rebuilt, _ = load_checkpoint(tmp_path / "strided.pt")
    assert rebuilt.args.stem == "strided" and torch.allclose(rebuilt(signal), b(signal))
    old = checkpoint_dict(a, ["a", "b", "c"], "sha", {})
    del old["model_args"]["stem"]  # a checkpoint written before the option existed
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")[0].args.stem == "pool"

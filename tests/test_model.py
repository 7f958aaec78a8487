"""Model behaviour: the fused front-end equals the per-layer original; only the head trains."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cwtops.core.errors import CwtopsError
from cwtops.data.weights import generate_filter_bank
from cwtops.model.network import (
    DILATIONS_1D,
    GAIN_RATE,
    BIN_WIDTH,
    QUANTILE_C,
    CWTFrontEnd,
    HybridCWTNet,
    ModelArgs,
    QuantileMember,
    checkpoint_dict,
    head_flops,
    hilbert_pair,
    load_checkpoint,
    trainable_parameters,
)
from cwtops.model.reference import PerLayerFrontEnd
from cwtops.model.signature import INPUT_NAME, OUTPUT_NAME
from tasks.export import onnx_bytes


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


@pytest.mark.parametrize("decimate", ["sample", "mean"])
@pytest.mark.parametrize("method", ["conv", "fft"])
@pytest.mark.parametrize("hop", [1, 8])
@pytest.mark.parametrize("magnitude", ["analytic", "abs", "square", "none"])
def test_frontend_matches_per_layer_reference(method: str, hop: int, magnitude: str, decimate: str) -> None:
    filters, matrix = random_bank(seed=hop)
    signal = torch.randn(3, 1, 777, generator=torch.Generator().manual_seed(1))  # 777 = 97 x 8 + 1: a short last hop
    expected = PerLayerFrontEnd(filters, hop=hop, magnitude=magnitude, decimate=decimate)(signal)
    actual = CWTFrontEnd(matrix, hop=hop, magnitude=magnitude, method=method, decimate=decimate)(signal)
    assert actual.shape == expected.shape
    relative = (actual - expected).abs().max() / expected.abs().max()
    assert relative < 1e-5


def test_analytic_magnitude_is_the_envelope_of_a_real_wavelets_response() -> None:
    """A real Morlet's |response| to a tone at its frequency swings between 0 and its peak twice a
    cycle; the modulus with its Hilbert pair (the complex Morlet's) is the flat envelope."""
    bank, header = generate_filter_bank(scales=12)
    matrix, _ = bank.padded()
    frequency = header["centre_frequencies"][4]
    tone = torch.cos(2 * torch.pi * frequency * torch.arange(1500.0) + 0.3).view(1, 1, -1)
    inside = slice(matrix.shape[1], 1500 - matrix.shape[1])  # away from the zero-padded edges
    analytic = CWTFrontEnd(torch.from_numpy(matrix), hop=1, magnitude="analytic")(tone)[0, 4, inside]
    real = CWTFrontEnd(torch.from_numpy(matrix), hop=1, magnitude="abs")(tone)[0, 4, inside]
    assert analytic.std() / analytic.mean() < 1e-3 < 0.3 < real.std() / real.mean()
    assert torch.allclose(analytic.mean(), real.max(), rtol=0.02)  # the envelope is the swing's peak
    pair = hilbert_pair(matrix)[4]  # a cosine Morlet's pair is the sine Morlet: odd about the centre
    assert np.abs(pair + pair[::-1]).max() < 1e-4 * np.abs(pair).max()
    assert abs(np.linalg.norm(pair) - np.linalg.norm(matrix[4])) < 0.01 * np.linalg.norm(matrix[4])


@pytest.mark.parametrize("decimate", ["mean", "sample"])
def test_analytic_frontend_exports_and_its_checkpoint_rebuilds(tmp_path, decimate: str) -> None:
    _, matrix = random_bank(seed=11, n_filters=20)
    args = ModelArgs(n_filters=20, kernel_size=matrix.shape[1], n_classes=3, signal_length=150, hop=4, head="1d",
                     magnitude="analytic", decimate=decimate, members=2, channels=(8, 8, 16, 16), hidden=12)
    model = _trained_like(HybridCWTNet(args, matrix), seed=5)
    _assert_onnx_matches(model, 150)
    torch.save(checkpoint_dict(model, ["a", "b", "c"], "sha", {}), tmp_path / "m.pt")
    rebuilt, _ = load_checkpoint(tmp_path / "m.pt")  # built on a zero bank, then the saved pairs loaded
    assert torch.equal(rebuilt.frontend.hilbert_bank, model.frontend.hilbert_bank)
    signal = torch.randn(4, 1, 150)
    assert torch.equal(rebuilt(signal), model(signal))


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


@pytest.mark.parametrize("decimate", ["sample", "mean"])
def test_onnx_export_matches_torch_at_batch_1_and_64(decimate: str) -> None:
    _, matrix = random_bank(seed=5, n_filters=32)
    args = ModelArgs(n_filters=32, kernel_size=matrix.shape[1], n_classes=5, signal_length=510, hop=8, decimate=decimate)
    model = HybridCWTNet(args, matrix).eval()
    # the head sees ceil(510 / 8) = 64 steps either way; averaging computes every sample's response first
    assert model.scalogram(torch.randn(2, 1, 510)).shape == (2, 32, 64)
    assert head_flops(args)["frontend"] == 2 * 32 * matrix.shape[1] * (510 if decimate == "mean" else 64)
    session = ort.InferenceSession(onnx_bytes(model, 510, 18, dynamic_length=False))
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    for batch in (1, 64):
        signal = torch.randn(batch, 1, 510)
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


def _assert_onnx_matches(model: HybridCWTNet, length: int) -> None:
    """The exported graph's logits equal the model's at batch 1 and 9 (fixed-length export)."""
    session = ort.InferenceSession(onnx_bytes(model, length, 18, dynamic_length=False))
    for batch in (1, 9):
        signal = torch.randn(batch, 1, length)
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: signal.numpy()})
        assert np.abs(logits - model(signal).detach().numpy()).max() < 1e-4


def _trained_like(model: HybridCWTNet, seed: int) -> HybridCWTNet:
    """Non-trivial BatchNorm statistics and weights, as after training (fresh ones are identities)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize("members", [1, 3])
def test_1d_head_and_its_ensemble_export_to_one_onnx_graph_that_matches_torch(members: int) -> None:
    _, matrix = random_bank(seed=6, n_filters=24)
    args = ModelArgs(n_filters=24, kernel_size=matrix.shape[1], n_classes=4, signal_length=96, hop=1, head="1d",
                     members=members, channels=(8, 8, 16, 16), hidden=12)
    model = _trained_like(HybridCWTNet(args, matrix), seed=members)
    session = ort.InferenceSession(onnx_bytes(model, 96, 18, dynamic_length=False))
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    for batch in (1, 33):
        signal = torch.randn(batch, 1, 96)
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: signal.numpy()})
        expected = model(signal).detach().numpy()
        assert logits.shape == (batch, 4) and np.abs(logits - expected).max() < 1e-4
    if members > 1:  # the one output is the log of the members' mean probability
        signal = torch.randn(5, 1, 96)
        with torch.no_grad():
            scalogram = model.scalogram(signal)
            mean = torch.stack([torch.softmax(m, dim=-1) for m in model.member_logits(scalogram)]).mean(0)
            assert torch.allclose(torch.softmax(model(signal), dim=-1), mean, atol=1e-6)
        assert len(model.members) == 3 and model.members[0].conv1[0].weight.shape[1] == 24


@pytest.mark.parametrize("hop", [1, 3])
def test_the_raw_channel_joins_the_scales_and_exports_to_a_matching_graph(hop: int) -> None:
    _, matrix = random_bank(seed=8, n_filters=24)
    args = ModelArgs(n_filters=24, kernel_size=matrix.shape[1], n_classes=4, signal_length=100, hop=hop, head="1d",
                     members=2, channels=(8, 8, 16, 16), hidden=12, raw_channel=True)
    model = _trained_like(HybridCWTNet(args, matrix), seed=hop)
    signal = torch.randn(3, 1, 100) * 4 + 2
    with torch.no_grad():
        features = model.scalogram(signal)
        steps = -(-100 // hop)
        assert features.shape == (3, 25, steps)
        standardised = (signal - signal.mean(-1, keepdim=True)) / signal.std(-1, unbiased=False, keepdim=True)
        padded = torch.nn.functional.pad(standardised, (0, steps * hop - 100), value=float("nan"))
        expected = padded.reshape(3, steps, hop).nanmean(-1)  # the mean of each hop, the last one partial
        assert torch.allclose(features[:, 24], expected, atol=1e-5)
    session = ort.InferenceSession(onnx_bytes(model, 100, 18, dynamic_length=False))
    for batch in (1, 17):
        signal = torch.randn(batch, 1, 100)
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: signal.numpy()})
        assert np.abs(logits - model(signal).detach().numpy()).max() < 1e-4
    assert model.members[0].conv1[0].weight.shape[1] == 25 and head_flops(args)["conv1"] == 2 * 2 * steps * 25 * 8 * 7
    with pytest.raises(Exception, match="raw channel"):
        HybridCWTNet(ModelArgs(n_filters=16, kernel_size=matrix.shape[1], n_classes=3, signal_length=256, raw_channel=True), matrix)


@pytest.mark.parametrize("raw_channel", [False, True])
def test_the_learnt_gain_starts_as_log1p_moves_the_output_exports_and_round_trips(raw_channel: bool, tmp_path) -> None:
    _, matrix = random_bank(seed=11, n_filters=24)
    plain = ModelArgs(n_filters=24, kernel_size=matrix.shape[1], n_classes=4, signal_length=120, hop=2, head="1d",
                      members=2, channels=(8, 8, 16, 16), hidden=12, raw_channel=raw_channel, decimate="mean")
    torch.manual_seed(3)
    without = _trained_like(HybridCWTNet(plain, matrix), seed=4)
    torch.manual_seed(3)
    model = _trained_like(HybridCWTNet(replace(plain, gain=True), matrix), seed=4)
    gains = [member.log_gain for member in model.members]
    assert all(g.shape == (24 + raw_channel, 1) and g.requires_grad for g in gains)
    assert without.members[0].log_gain is None and "members.0.log_gain" not in without.state_dict()
    signal = torch.randn(5, 1, 120) * 3 + 1
    with torch.no_grad():
        assert torch.allclose(model(signal), without(signal), atol=1e-6)  # a gain of 1 is log1p itself
        for index, gain in enumerate(gains):
            gain.copy_(torch.randn(gain.shape, generator=torch.Generator().manual_seed(index)) * 0.5)
        moved = model(signal)
        assert (moved - without(signal)).abs().max() > 1e-3  # each member's gain is in its path (10x the parity atol)
        # per channel, log1p(g m) = log(m + 1 / g) + log g: the input BatchNorm sees the chosen floor
        scalogram = model.scalogram(signal)
        g = torch.exp(GAIN_RATE * gains[0])
        expected = torch.sign(scalogram) * torch.log1p((scalogram * g).abs())
        # the gain-less member has the same weights (equal outputs at g = 1, above): fed log1p(g m), it agrees
        assert torch.allclose(model.members[0](scalogram), without.members[0](expected), atol=1e-5)
    session = ort.InferenceSession(onnx_bytes(model, 120, 18, dynamic_length=False))
    for batch in (1, 9):
        batch_signal = torch.randn(batch, 1, 120)
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch_signal.numpy()})
        assert np.abs(logits - model(batch_signal).detach().numpy()).max() < 1e-4
    torch.save(checkpoint_dict(model, ["a", "b", "c", "d"], "sha", {}), tmp_path / "gain.pt")
    rebuilt, _ = load_checkpoint(tmp_path / "gain.pt")
    assert rebuilt.args.gain and torch.allclose(rebuilt(signal), moved, atol=1e-6)
    written_before = checkpoint_dict(without, ["a", "b", "c", "d"], "sha", {})
    del written_before["model_args"]["gain"]
    torch.save(written_before, tmp_path / "old.pt")  # from before the gain was a setting: log1p, as then
    old, _ = load_checkpoint(tmp_path / "old.pt")
    assert not old.args.gain and torch.allclose(old(signal), without(signal), atol=1e-6)


@pytest.mark.parametrize("raw_channel", [False, True])
def test_the_quantile_member_reads_step_and_value_quantiles_mixes_at_its_weight_exports_and_round_trips(
        raw_channel: bool, tmp_path) -> None:
    _, matrix = random_bank(seed=12, n_filters=24)
    plain = ModelArgs(n_filters=24, kernel_size=matrix.shape[1], n_classes=3, signal_length=130, hop=2, head="1d",
                      members=2, channels=(8, 8, 16, 16), hidden=12, raw_channel=raw_channel, decimate="mean", gain=True)
    torch.manual_seed(5)
    without = _trained_like(HybridCWTNet(plain, matrix), seed=6)
    torch.manual_seed(5)
    model = _trained_like(HybridCWTNet(replace(plain, quantiles=8, quantile_weight=0.3), matrix), seed=6)
    for name, tensor in without.state_dict().items():  # the members are built first: the same initial weights
        assert torch.equal(model.state_dict()[name], tensor), name
    signal = torch.randn(4, 1, 130) * 2 - 1
    with torch.no_grad():
        features = model.scalogram(signal)
        inputs = 24 + raw_channel
        assert features.shape == (4, inputs + 16, 65) and torch.equal(features[:, :inputs], without.scalogram(signal))
        standardised = ((signal - signal.mean(-1, keepdim=True)) / signal.std(-1, unbiased=False, keepdim=True)).numpy()[:, 0]
        steps = np.sort(np.abs(np.diff(standardised, axis=-1)), axis=-1)  # 129 steps: read at ranks 0, 128/7, .., 128
        values = np.sort(standardised, axis=-1)  # 130 values: ranks 0, 129/7, .., 129
        expected = np.concatenate([np.log1p(steps[:, [round(k * 128 / 7) for k in range(8)]]),
                                   values[:, [round(k * 129 / 7) for k in range(8)]]], axis=1)
        assert np.allclose(features[:, inputs:, 0].numpy(), expected, atol=1e-5)
        assert torch.equal(features[:, inputs:, :1].expand(-1, -1, 65), features[:, inputs:])  # constant in time
        outputs = model.member_logits(features)  # the convolutional members only, as without it
        assert len(outputs) == 2 and torch.equal(outputs[0], without.member_logits(without.scalogram(signal))[0])
        members = torch.stack([torch.softmax(o, dim=-1) for o in outputs]).mean(0)
        assert torch.allclose(torch.softmax(model.members_head(features), dim=-1), members, atol=1e-6)
        mixed = 0.7 * members + 0.3 * torch.softmax(model.quantile_member(features[:, inputs:, 0]), dim=-1)
        assert torch.allclose(torch.softmax(model(signal), dim=-1), mixed, atol=1e-6)
        assert torch.allclose(torch.softmax(without(signal), dim=-1), members, atol=1e-6)
    assert head_flops(model.args)["quantile_member"] == 2 * 16 * 3
    assert not any(p.requires_grad for p in model.quantile_member.parameters())  # no optimizer step touches it
    _assert_onnx_matches(model, 130)
    torch.save(checkpoint_dict(model, ["a", "b", "c"], "sha", {}), tmp_path / "quantiles.pt")
    rebuilt, _ = load_checkpoint(tmp_path / "quantiles.pt")
    assert rebuilt.args.quantiles == 8 and torch.allclose(rebuilt(signal), model(signal), atol=1e-6)
    with pytest.raises(CwtopsError, match="quantile member"):
        HybridCWTNet(ModelArgs(n_filters=24, kernel_size=matrix.shape[1], n_classes=3, signal_length=256,
                               quantiles=8, quantile_weight=0.3), matrix)  # the 2-D head
    with pytest.raises(CwtopsError, match="at least 2 quantiles"):
        replace(plain, quantiles=8, quantile_weight=1.0)


def test_the_quantile_member_fit_is_scikit_learns_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    generator = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 20)
    quantiles = generator.normal(size=(60, 8)) * [1, 2, 3, 4, 0.5, 1, 1, 10] + labels[:, None] * 0.8
    member = QuantileMember(8, 3)
    report = member.fit(torch.tensor(quantiles, dtype=torch.float32), torch.tensor(labels))
    scaled = StandardScaler().fit(quantiles.astype(np.float32))
    reference = LogisticRegression(C=QUANTILE_C, tol=1e-10, max_iter=10_000).fit(scaled.transform(quantiles), labels)
    # scikit-learn's multinomial weights are defined up to a shift shared by the classes: compare centred
    coef = reference.coef_ - reference.coef_.mean(0)
    fitted = member.fc.weight.detach().numpy()
    assert np.allclose(fitted - fitted.mean(0), coef, atol=1e-3)
    member.eval()
    with torch.no_grad():
        probabilities = torch.softmax(member(torch.tensor(quantiles, dtype=torch.float32)), dim=-1).numpy()
    assert np.allclose(probabilities, reference.predict_proba(scaled.transform(quantiles)), atol=1e-3)
    assert report["signals"] == 60 and report["train_accuracy"] == reference.score(scaled.transform(quantiles), labels)
    again = QuantileMember(8, 3)
    again.fit(torch.tensor(quantiles, dtype=torch.float32), torch.tensor(labels))
    assert torch.equal(again.fc.weight, member.fc.weight)  # deterministic


def test_the_quantile_members_lags_and_soft_thresholds_export_round_trip_and_old_checkpoints_keep_lag_1(tmp_path) -> None:
    _, matrix = random_bank(seed=13, n_filters=16)
    old = ModelArgs(n_filters=16, kernel_size=matrix.shape[1], n_classes=3, signal_length=24, hop=1, head="1d",
                    members=1, channels=(4, 4, 8, 8), hidden=8, decimate="mean", quantiles=4, quantile_weight=0.3)
    args = replace(old, quantile_lags=(1, 2, 32), quantile_bins=3)  # lag 32 > L - 1: read at lag 23
    assert args.quantile_features == 16 and old.quantile_features == 8
    torch.manual_seed(2)
    model = _trained_like(HybridCWTNet(args, matrix), seed=3)
    signal = torch.randn(6, 1, 24)
    with torch.no_grad():
        features = model.scalogram(signal)[:, 16:, 0]
    standardised = ((signal - signal.mean(-1, keepdim=True)) / signal.std(-1, unbiased=False, keepdim=True)).numpy()[:, 0]

    def steps(lag: int) -> np.ndarray:  # 24 - lag steps, read at 4 evenly spaced ranks
        ordered = np.sort(np.abs(standardised[:, lag:] - standardised[:, :-lag]), axis=-1)
        return np.log1p(ordered[:, [round(k * (23 - lag) / 3) for k in range(4)]])

    values = np.sort(standardised, axis=-1)[:, [round(k * 23 / 3) for k in range(4)]]
    assert np.allclose(features.numpy(), np.concatenate([steps(1), values, steps(2), steps(23)], axis=1), atol=1e-5)

    # the fit: thresholds at the training features' quantiles, each sigmoid standardised, one linear layer
    generator = torch.Generator().manual_seed(4)
    train_features = torch.randn(90, 16, generator=generator)
    labels = torch.randint(0, 3, (90,), generator=generator)
    report = model.quantile_member.fit(train_features, labels)
    member = model.quantile_member.eval()
    z = (train_features - train_features.mean(0)) / train_features.var(0, unbiased=False).add(1e-5).sqrt()
    assert torch.allclose(member.thresholds, torch.quantile(z, torch.tensor([0.25, 0.5, 0.75]), dim=0).T, atol=1e-5)
    soft = torch.sigmoid((z.unsqueeze(-1) - member.thresholds) / BIN_WIDTH).flatten(1)
    inputs = torch.cat([z, (soft - soft.mean(0)) / soft.var(0, unbiased=False).add(1e-5).sqrt()], dim=1)
    with torch.no_grad():
        assert torch.allclose(member(train_features), member.fc(inputs), atol=1e-4)
    assert report["signals"] == 90 and member.fc.in_features == 16 * 4
    assert head_flops(args)["quantile_member"] == 2 * 16 * 4 * 3
    _assert_onnx_matches(model, 24)
    torch.save(checkpoint_dict(model, ["a", "b", "c"], "sha", {}), tmp_path / "binned.pt")
    rebuilt, _ = load_checkpoint(tmp_path / "binned.pt")
    assert rebuilt.args.quantile_lags == (1, 2, 32) and rebuilt.args.quantile_bins == 3
    assert torch.allclose(rebuilt(signal), model(signal), atol=1e-6)

    # a checkpoint written before the lags and bins were settings rebuilds as then: lag 1, no thresholds
    torch.manual_seed(2)
    before = _trained_like(HybridCWTNet(old, matrix), seed=3)
    written_before = checkpoint_dict(before, ["a", "b", "c"], "sha", {})
    del written_before["model_args"]["quantile_lags"], written_before["model_args"]["quantile_bins"]
    torch.save(written_before, tmp_path / "before.pt")
    loaded, _ = load_checkpoint(tmp_path / "before.pt")
    assert loaded.args.quantile_lags == (1,) and loaded.args.quantile_bins == 0
    assert torch.allclose(loaded(signal), before(signal), atol=1e-6)
    with pytest.raises(CwtopsError, match="distinct step lags"):
        replace(old, quantile_lags=(1, 1))


def test_the_soft_thresholds_fit_a_class_a_linear_member_cannot_separate() -> None:
    # class 1: a feature's middle values, class 0: both tails; no single slope separates them
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(400, 3, generator=generator)
    labels = (features[:, 0].abs() < 0.7).long()
    test = torch.randn(400, 3, generator=generator)
    truth = (test[:, 0].abs() < 0.7).long()
    scores = {}
    for bins in (0, 8):
        member = QuantileMember(3, 2, bins)
        member.fit(features, labels)
        with torch.no_grad():
            scores[bins] = float((member.eval()(test).argmax(1) == truth).float().mean())
    assert scores[0] < 0.7 and scores[8] > 0.9, scores


def test_1d_head_checkpoint_round_trip_and_old_checkpoints_stay_2d(tmp_path) -> None:
    _, matrix = random_bank(seed=7, n_filters=16)
    args = ModelArgs(n_filters=16, kernel_size=matrix.shape[1], n_classes=3, signal_length=40, hop=1, head="1d", members=2,
                     channels=(4, 4, 8, 8), hidden=6, dilations=(1, 3, 5, 7))
    model = _trained_like(HybridCWTNet(args, matrix), seed=1)
    torch.save(checkpoint_dict(model, ["a", "b", "c"], "sha", {}), tmp_path / "m.pt")
    rebuilt, _ = load_checkpoint(tmp_path / "m.pt")
    signal = torch.randn(2, 1, 40)
    assert rebuilt.args.head == "1d" and rebuilt.args.members == 2 and rebuilt.args.dilations == ((1, 3, 5, 7),)
    assert [rebuilt.members[0].get_submodule(f"conv{i}")[0].dilation[0] for i in (1, 2, 3, 4)] == [1, 3, 5, 7]
    assert torch.allclose(rebuilt(signal), model(signal))
    one_flat_branch = checkpoint_dict(model, ["a", "b", "c"], "sha", {})
    one_flat_branch["model_args"]["dilations"] = [1, 3, 5, 7]  # as written before dilations had branches
    torch.save(one_flat_branch, tmp_path / "flat.pt")
    flat, _ = load_checkpoint(tmp_path / "flat.pt")
    assert flat.args.dilations == ((1, 3, 5, 7),) and torch.allclose(flat(signal), model(signal))
    written_before = checkpoint_dict(HybridCWTNet(replace(args, dilations=DILATIONS_1D), matrix), ["a", "b", "c"], "sha", {})
    del written_before["model_args"]["dilations"], written_before["model_args"]["decimate"]
    torch.save(written_before, tmp_path / "old.pt")  # from before dilations and decimation were settings
    old, _ = load_checkpoint(tmp_path / "old.pt")
    assert old.args.dilations == ((1, 2, 4, 8),) and old.args.decimate == "sample"
    flops = head_flops(args)
    assert flops["conv1"] == 2 * 2 * 40 * 16 * 4 * 7  # members x 2 x T x in x out x kernel
    with pytest.raises(Exception, match="ensembles, the raw channel and the quantile member are built from the 1-D head"):
        HybridCWTNet(ModelArgs(n_filters=16, kernel_size=matrix.shape[1], n_classes=3, signal_length=256, members=2), matrix)


@pytest.mark.parametrize("members", [1, 2])
def test_branched_dilations_split_each_conv_export_to_a_matching_graph_and_round_trip(members: int, tmp_path) -> None:
    _, matrix = random_bank(seed=9, n_filters=16)
    branches = ((3, 12, 24, 48), (1, 2, 4, 8))
    args = ModelArgs(n_filters=16, kernel_size=matrix.shape[1], n_classes=3, signal_length=120, hop=1, head="1d",
                     members=members, channels=(7, 8, 8, 10), hidden=6, dilations=[list(b) for b in branches])
    assert args.dilations == branches  # lists, as params.yaml and checkpoints carry them, become branches
    model = _trained_like(HybridCWTNet(args, matrix), seed=members)
    conv1, conv4 = model.members[0].conv1, model.members[0].conv4
    # each layer's output channels split between the branches (the first takes the remainder)
    assert [b.out_channels for b in conv1.branches] == [4, 3] and [b.dilation[0] for b in conv1.branches] == [3, 1]
    assert [b.dilation[0] for b in conv4.branches] == [48, 8] and conv4.norm.num_features == 10
    assert sum(p.numel() for p in conv1.branches.parameters()) == 16 * 7 * 7  # one conv's weights, split
    _assert_onnx_matches(model, 120)
    torch.save(checkpoint_dict(model, ["a", "b", "c"], "sha", {}), tmp_path / "m.pt")
    rebuilt, _ = load_checkpoint(tmp_path / "m.pt")
    signal = torch.randn(2, 1, 120)
    assert rebuilt.args.dilations == branches and torch.allclose(rebuilt(signal), model(signal))
    with pytest.raises(CwtopsError, match="splits its channels"):
        replace(args, channels=(1, 8, 8, 8))


def test_parity_judges_each_logit_against_atol_plus_rtol_times_its_size() -> None:
    from cwtops.core.config import ParityConfig
    from tasks.parity import compare

    cfg = ParityConfig(atol=1e-4, rtol=1e-3)
    reference = np.array([[2.5, -1.0], [0.01, 0.0]])
    # 1.07e-4 off a logit of 2.5 is float32 rounding (4e-5 relative): within 1e-4 + 1e-3 * 2.5
    assert compare(reference, reference + np.array([[1.07e-4, 0.0], [0.0, 0.0]]), cfg)["passed"]
    # the same error on a logit near zero is beyond 1e-4 + 1e-3 * 0.01
    assert not compare(reference, reference + np.array([[0.0, 0.0], [1.5e-4, 0.0]]), cfg)["passed"]
    # a large logit 1% off fails on its relative size
    assert not compare(reference, reference * np.array([[1.01, 1.0], [1.0, 1.0]]), cfg)["passed"]
    # within tolerance, the class flips where the reference's two logits are tied within it: counted, and
    # allowed on a real signal unless parity.allow_ties is off (always allowed on random signals)
    tie = np.array([[1.0, 1.00005], [3.0, -1.0]])
    flipped = np.array([[1.00006, 1.00005], [3.0, -1.0]])
    figures = compare(tie, flipped, cfg)
    assert figures["passed"] and figures["argmax_ties"] == 1 and figures["argmax_agreement"] == 0.5
    strict = ParityConfig(atol=1e-4, rtol=1e-3, allow_ties=False)
    assert not compare(tie, flipped, strict)["passed"]
    assert compare(tie, flipped, strict, require_argmax=False)["passed"]
    # a class that differs by more than a tie comes with a logit beyond the tolerance: fails either way
    apart = np.array([[1.0, 1.01]])
    beyond = compare(apart, np.array([[1.02, 1.01]]), cfg, require_argmax=False)
    assert not beyond["passed"] and beyond["argmax_ties"] == 0 and beyond["argmax_agreement"] == 0.0


def test_a_tie_is_judged_by_both_logits_allowances() -> None:
    """The reference's lead of its class over the candidate's is compared with what the tolerance lets
    both logits move: just inside, a tie; just outside, a real disagreement (which cannot come
    without a logit beyond the tolerance, so both flags fail together)."""
    from cwtops.model.parity import compare_logits

    atol, rtol = 1e-4, 1e-3
    allowance = 2 * (atol + rtol * 1.0)  # two logits near 1.0
    for lead, tie in ((0.9 * allowance, True), (1.1 * allowance, False)):
        reference = np.array([[1.0 + lead, 1.0]])
        # the candidate moves both logits by the same share of the lead, so that the second wins
        candidate = np.array([[1.0 + 0.45 * lead, 1.0 + 0.55 * lead]])
        figures = compare_logits(reference, candidate, atol, rtol)
        assert figures["argmax_agreement"] == 0.0 and figures["argmax_ties"] == int(tie)
        assert figures["within"] is tie and figures["classes_agree"] is tie
        assert compare_logits(reference, candidate, atol, rtol, allow_ties=False)["classes_agree"] is False
    assert compare_logits(np.zeros((0, 3)), np.zeros((0, 3)), atol, rtol)["classes_agree"]


@pytest.mark.parametrize("head", ["1d", "2d"])
def test_signed_responses_stay_finite_and_export(head: str) -> None:
    """`magnitude: none` feeds the head signed responses: log1p alone would turn those below -1 into NaN."""
    _, matrix = random_bank(seed=9, n_filters=16)
    args = ModelArgs(n_filters=16, kernel_size=matrix.shape[1], n_classes=3, signal_length=256, hop=1, head=head,
                     magnitude="none", channels=(4, 4, 8, 8), hidden=6)
    model = _trained_like(HybridCWTNet(args, matrix), seed=2)
    signal = torch.randn(4, 1, 256) * 10
    assert (model.scalogram(signal) < -1).any()
    logits = model(signal)
    assert torch.isfinite(logits).all()
    session = ort.InferenceSession(onnx_bytes(model, 256, 18, dynamic_length=False))
    (served,) = session.run([OUTPUT_NAME], {INPUT_NAME: signal.numpy()})
    assert np.abs(served - logits.detach().numpy()).max() < 1e-4


def test_time_augmentation_shifts_stretches_and_is_seeded() -> None:
    from tasks.train import augment_in_time

    ramp = torch.arange(64, dtype=torch.float32).repeat(16, 3, 1)  # (B, S, T): value = time step
    assert augment_in_time(ramp, 0.0, torch.Generator().manual_seed(0)) is ramp  # both off: untouched
    shifted = augment_in_time(ramp, 0.1, torch.Generator().manual_seed(0))
    steps = shifted[:, 0, 32] - ramp[:, 0, 32]  # a shift keeps the ramp's slope of 1 away from the edges
    assert torch.equal(shifted[:, :, 10:54] - ramp[:, :, 10:54], steps.view(-1, 1, 1).expand(-1, 3, 44))
    assert steps.abs().max() <= 6 and steps.abs().max() > 0

    warped = augment_in_time(ramp, 0.0, torch.Generator().manual_seed(1), max_warp=0.2)
    slopes = warped[:, 0, 33] - warped[:, 0, 31]  # twice each signal's stretch factor, about the centre
    assert torch.all((slopes >= 2 * 0.8 - 1e-5) & (slopes <= 2 * 1.2 + 1e-5)), slopes
    assert slopes.std() > 0.05  # every signal its own factor
    assert torch.allclose(warped[:, 1], warped[:, 0]) and torch.allclose(warped[:, 2], warped[:, 0])  # scales alike
    assert warped.min() >= 0 and warped.max() <= 63  # interpolated inside the signal, edges repeated
    again = augment_in_time(ramp, 0.0, torch.Generator().manual_seed(1), max_warp=0.2)
    assert torch.equal(warped, again)


def test_a_dynamic_length_graph_reads_the_quantile_members_ranks_at_every_length() -> None:
    # `export.dynamic_length: true`: the ranks the quantiles are read at follow the served signal's
    # length (a Shape in the graph), not the length the graph was traced at
    _, matrix = random_bank(seed=21, n_filters=16)
    args = ModelArgs(n_filters=16, kernel_size=matrix.shape[1], n_classes=3, signal_length=64, hop=1, head="1d",
                     members=2, channels=(4, 4, 8, 8), hidden=8, decimate="mean", quantiles=5, quantile_weight=0.3,
                     quantile_lags=(1, 2, 4), quantile_bins=3)
    torch.manual_seed(5)
    model = _trained_like(HybridCWTNet(args, matrix), seed=6)
    model.quantile_member.fit(torch.randn(40, args.quantile_features), torch.randint(0, 3, (40,)))
    model.eval()
    session = ort.InferenceSession(onnx_bytes(model, 64, 18, dynamic_length=True))
    for length in (64, 101, 40):
        signal = torch.randn(3, 1, length, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = model(signal).numpy()
            member = model.scalogram(signal)[:, 16:, 0]
        assert member.shape == (3, 20)
        got = session.run([OUTPUT_NAME], {INPUT_NAME: signal.numpy()})[0]
        assert np.allclose(got, expected, atol=1e-4, rtol=1e-3), (length, np.abs(got - expected).max())

"""The weight-file parser and generator: every accepted variation, every refusal, exact round trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.weights import (
    WeightFileError,
    format_weight_file,
    generate_filter_bank,
    parse_weight_file,
    parse_weight_text,
)

CWTOPS = str(Path(sys.executable).parent / "cwtops")


def small(text: str):
    return parse_weight_text(text, "w.txt", first_layer=5, last_layer=7)


@pytest.mark.parametrize("wavelet", ["morlet", "ricker"])
def test_generate_format_parse_round_trip_is_exact(wavelet: str) -> None:
    bank, header = generate_filter_bank(wavelet=wavelet)
    parsed = parse_weight_text(format_weight_file(bank, header))
    assert parsed.names[0] == "conv5" and parsed.names[-1] == "conv116" and len(parsed.names) == 112
    assert all(np.array_equal(a, b) for a, b in zip(bank.filters, parsed.filters))
    assert len(set(bank.lengths)) > 10 and all(n % 2 == 1 for n in bank.lengths)


@pytest.mark.parametrize(
    "text",
    [
        "conv5.weight: tensor([[[1.0, 2.0, 3.0]]])\nconv6.weight: tensor([[[4.0]]])\nconv7.weight: tensor([[[5e-1, -6.5E+2]]])",
        "conv5.weight = tensor([1.0, 2.0, 3.0])\nconv6 = tensor([4.0])\nconv7: tensor([[[5e-1,\n   -6.5E+2]]], requires_grad=True)",
        "conv5.weight\ntensor([[[1.0, 2.0, 3.0]]])\nconv6.weight: Parameter containing:\ntensor([[[4.0]]], requires_grad=True)\nconv7.weight: tensor([[[0.5, -650.]]], dtype=torch.float32)",
        "# header\nconv5.weight: tensor([[[1.0,2.0,3.0]]])\nconv5.bias: tensor([0.1])\nconv6.weight: tensor([[[4.0]]])\n\nconv7.weight: tensor([[[0.5],[-650.0]]])",
    ],
)
def test_accepted_variations(text: str) -> None:
    bank = small(text)
    assert bank.names == ("conv5", "conv6", "conv7")
    assert [list(f) for f in bank.filters] == [[1.0, 2.0, 3.0], [4.0], [0.5, -650.0]]


def test_real_torch_print_parses(tmp_path: Path) -> None:
    torch.set_printoptions(profile="full", precision=10)
    try:
        convs = {i: torch.nn.Conv1d(1, 1, 3 + i % 9) for i in range(5, 117)}
        text = "".join(f"conv{i}.weight: {c.weight}\nconv{i}.bias: {c.bias}\n" for i, c in convs.items())
    finally:
        torch.set_printoptions(profile="default")
    (tmp_path / "my.txt").write_text(text)
    bank = parse_weight_file(tmp_path / "my.txt")
    for (i, conv), taps in zip(convs.items(), bank.filters):
        assert np.allclose(taps, conv.weight.detach().numpy().ravel(), rtol=1e-6, atol=1e-9)


def test_default_print_with_elided_numbers_is_refused() -> None:
    conv = torch.nn.Conv1d(1, 1, 1100)
    text = "conv5.weight: tensor([[[1.0]]])\n" + f"conv6.weight: {conv.weight}\n"
    with pytest.raises(WeightFileError, match=r"line 2, layer conv6: the numbers were elided") as error:
        small(text)
    assert "profile" in str(error.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("# only a comment\n\n", "empty"),
        ("conv5.weight: hello", "line 1, layer conv5: 'conv5.weight: hello' is not a printed tensor"),
        ("conv5.weight: tensor([[1.0, nan]])\nconv6.weight: tensor([1.])\nconv7.weight: tensor([1.])", "layer conv5: contains nan"),
        ("conv5.weight: tensor([1.0])\nconv6.weight: tensor([inf])\nconv7.weight: tensor([1.])", "line 2, layer conv6: contains inf"),
        ("conv5.weight: tensor([1.0])\nconv7.weight: tensor([1.])", "layer conv6 is missing"),
        ("conv5.weight: tensor([1.0])\nconv5.weight: tensor([1.0])", "duplicated"),
        ("conv5.weight: tensor([1.0])\nconv7.weight: tensor([1.])\nconv6.weight: tensor([1.])", "line 3, layer conv6: out of order"),
        ("conv5.weight: tensor([[1.0, 2.0], [3.0, 4.0]])", "not 1-D after dropping singleton"),
        ("conv5.weight: tensor([[1.0, 2.0], [3.0]])", "ragged"),
        ("conv5.weight: tensor([[1.0, 2.0]", "never close"),
        ("conv5.weight: tensor([[1.0, 2.0]] junk", "missing '\\)'"),
        ("conv5.weight: tensor([1.0, abc])", "'abc' is not a number"),
        ("garbage before\nconv5.weight: tensor([1.0])", "line 1"),
    ],
)
def test_refusals_name_line_and_layer(text: str, message: str) -> None:
    with pytest.raises(WeightFileError, match=message.replace("(", r"\(").replace("[", r"\[")):
        small(text)


def test_binary_and_zero_byte_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_bytes(b"conv5.weight: tensor([1.0])\n\xff\xfe\x00junk")
    with pytest.raises(WeightFileError, match="not a text file"):
        parse_weight_file(tmp_path / "junk.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(WeightFileError, match="empty"):
        parse_weight_file(tmp_path / "empty.txt")


def test_padded_matrix_equals_per_filter_same_convolution() -> None:
    rng = np.random.default_rng(0)
    text = "\n".join(f"conv{i}.weight: tensor({[float(x) for x in rng.standard_normal(int(k)).round(6)]})" for i, k in zip(range(5, 117), rng.integers(2, 40, 112)))
    bank = parse_weight_text(text)
    matrix, lengths = bank.padded()
    signal = torch.randn(1, 1, 300)
    fused = torch.nn.functional.conv1d(signal, torch.from_numpy(matrix)[:, None, :], padding=(matrix.shape[1] - 1) // 2)
    for row, taps in enumerate(bank.filters):
        single = torch.nn.functional.conv1d(signal, torch.from_numpy(taps).view(1, 1, -1), padding="same")
        assert torch.allclose(fused[0, row], single[0, 0], atol=1e-5)
    assert list(lengths) == list(bank.lengths)


def test_cli_generate_then_check(tmp_path: Path) -> None:
    out = tmp_path / "W.txt"
    assert subprocess.run([CWTOPS, "weights", "generate", "--out", str(out)], capture_output=True).returncode == 0
    done = subprocess.run([CWTOPS, "weights", "check", str(out)], capture_output=True, text=True)
    assert done.returncode == 0
    assert "112 layers" in done.stdout and "conv5" in done.stdout and "conv116" in done.stdout


def test_cli_check_refuses_elided_file_with_nonzero_exit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(f"conv5.weight: {torch.nn.Conv1d(1, 1, 1100).weight}\n")
    done = subprocess.run([CWTOPS, "weights", "check", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "conv5" in done.stderr and "elided" in done.stderr

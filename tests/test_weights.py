"""The weight-file parser and generator: every accepted variation, every refusal, exact round trips."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cwtops.core.errors import CwtopsError
from cwtops.data.weights import (
    FilterBank,
    WeightFileError,
    format_weight_file,
    generate_filter_bank,
    parse_weight_file,
    parse_weight_text,
    summarize,
    write_weight_file,
)

CWTOPS = str(Path(sys.executable).parent / "cwtops")
THREE = [[1.0, 2.0, 3.0], [4.0], [0.5, -650.0]]  # conv5, conv6, conv7 in the small files below


def small(text: str) -> FilterBank:
    """Parse a three-layer file: conv5 .. conv7."""
    return parse_weight_text(text, "w.txt", first_layer=5, last_layer=7)


def as_lists(bank: FilterBank) -> list[list[float]]:
    return [taps.tolist() for taps in bank.filters]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("wavelet", ["morlet", "ricker"])
def test_generate_format_parse_round_trip_is_exact(wavelet: str, tmp_path: Path) -> None:
    bank, header = generate_filter_bank(wavelet=wavelet)
    path = write_weight_file(tmp_path / "my.txt", bank, header)
    parsed = parse_weight_file(path)
    assert parsed.names == tuple(f"conv{i}" for i in range(5, 117))
    assert all(a.dtype == np.float32 and a.tobytes() == b.tobytes() for a, b in zip(bank.filters, parsed.filters))
    assert parsed.sha256() == bank.sha256()
    assert parse_weight_text(format_weight_file(parsed)).sha256() == bank.sha256()  # no header needed


def test_extreme_float32_values_round_trip_exactly() -> None:
    info = np.finfo(np.float32)
    taps = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 1 / 3, np.pi, 1e-45], dtype=np.float32)
    bank = FilterBank(("conv5", "conv6", "conv7"), (taps, taps[:1], taps[::-1]))
    parsed = small(format_weight_file(bank))
    assert [a.tobytes() for a in parsed.filters] == [a.tobytes() for a in bank.filters]


def test_generated_bank_is_a_real_cwt_filter_bank() -> None:
    bank, header = generate_filter_bank()
    frequencies = np.array(header["centre_frequencies"])
    assert len(bank.names) == 112 and header["scales"] == 112 and header["wavelet"] == "morlet"
    assert frequencies[0] == pytest.approx(0.4) and frequencies[-1] == pytest.approx(0.004)
    assert np.allclose(frequencies[1:] / frequencies[:-1], frequencies[1] / frequencies[0])  # geometric
    assert all(n % 2 == 1 and n <= 257 for n in bank.lengths) and len(set(bank.lengths)) > 30
    assert header["lengths"] == list(bank.lengths) and header["capped"] == bank.lengths.count(257)
    for taps in bank.filters:
        assert abs(float(taps.astype(np.float64).sum())) < 1e-5  # zero mean (admissible)
        assert np.linalg.norm(taps.astype(np.float64)) == pytest.approx(1.0, abs=1e-5)
    ratio = np.array(header["peak_frequencies"]) / frequencies
    one_cycle = np.resize(header["w0"], 112) == 1.5
    # each filter of w0 6 and 3 responds where its header says; the second (w0 3 at 0.38 cycles/sample,
    # 9 taps) is so wide in frequency that its peak sits at Nyquist
    assert ratio[1] == pytest.approx(0.5 / frequencies[1], rel=0.01)
    sharp = ~one_cycle
    sharp[1] = False
    assert np.all(np.abs(ratio[sharp] - 1) < 0.15), ratio
    # the one-cycle filters (w0 1.5): the zero-mean correction removes the Gaussian's low-frequency
    # half, so the measured peak sits above the nominal frequency, as the header records
    assert np.all((ratio[one_cycle] > 1.1) & (ratio[one_cycle] < 1.7)), ratio[one_cycle]
    assert generate_filter_bank()[0].sha256() == bank.sha256()  # deterministic


def test_the_default_bank_takes_three_resolutions_in_turn() -> None:
    bank, header = generate_filter_bank()
    assert header["w0"] == [6.0, 3.0, 1.5]
    lengths = np.array(bank.lengths)
    sharp, time_sharp, one_cycle = lengths[0::3][:37], lengths[1::3][:37], lengths[2::3][:37]
    uncapped = (sharp < 257) & (time_sharp < 257) & (one_cycle < 257)
    assert uncapped.sum() > 20
    # each kind has half the Gaussian's width of the one before it (one step higher in frequency), so
    # about half its support (the supports are whole taps, so up to 0.63 on the shortest)
    for wider, narrower in ((sharp, time_sharp), (time_sharp, one_cycle)):
        halves = (narrower[uncapped] - 1) / (wider[uncapped] - 1)
        assert np.all((halves >= 0.45) & (halves <= 0.63)), halves
    # and a wider spectrum: the half-power width, measured from the taps (w0 3 twice w0 6's; w0 1.5's
    # less than twice w0 3's, as the zero-mean correction cuts its low-frequency side)
    def half_power_width(taps: np.ndarray) -> float:
        spectrum = np.abs(np.fft.rfft(taps.astype(np.float64), 1 << 14)) ** 2
        return float((spectrum >= spectrum.max() / 2).sum())
    index = 39  # an uncapped triple in the middle of the range, w0 6 first
    widths = [half_power_width(bank.filters[index + k]) for k in range(3)]
    assert 1.7 < widths[1] / widths[0] < 2.3 and 1.4 < widths[2] / widths[1] < 2.0, widths
    for earlier_w0, shortest in (((6.0, 3.0), 9), (6.0, 17)):  # the defaults of earlier versions
        earlier, earlier_header = generate_filter_bank(w0=earlier_w0)
        assert min(earlier.lengths) == shortest and earlier.sha256() != bank.sha256()
        assert earlier_header["w0"] == list(np.atleast_1d(earlier_w0))
    assert "w0 = 6, 3, 1.5 in turn" in format_weight_file(bank, header)
    assert "w0 = 6)" in format_weight_file(*generate_filter_bank(w0=6.0))


def test_ricker_bank_and_generator_arguments() -> None:
    bank, header = generate_filter_bank(scales=20, wavelet="ricker", first_layer=1)
    assert bank.names[0] == "conv1" and bank.names[-1] == "conv20" and header["w0"] is None
    ratio = np.array(header["peak_frequencies"]) / np.array(header["centre_frequencies"])
    assert np.all(np.abs(ratio[1:] - 1) < 0.2), ratio  # the first sits at Nyquist, aliased
    for bad in ({"wavelet": "haar"}, {"scales": 0}, {"max_length": 256}, {"f_min": 0.0}, {"f_max": 0.6}, {"w0": ()},
                {"w0": (6.0, -1.0)}):
        with pytest.raises(CwtopsError):
            generate_filter_bank(**bad)  # type: ignore[arg-type]


def test_header_comment_records_wavelet_and_centre_frequencies() -> None:
    bank, header = generate_filter_bank(scales=12)
    text = format_weight_file(bank, header)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("wavelet: morlet" in line for line in comments)
    assert any("0.4 " in line for line in comments) and any(" 0.004" in line for line in comments)
    assert sum(line.startswith("conv") for line in text.splitlines()) == 12


# ----------------------------------------------------------------------------- accepted variations


@pytest.mark.parametrize(
    "text",
    [
        "conv5.weight: tensor([[[1.0, 2.0, 3.0]]])\nconv6.weight: tensor([[[4.0]]])\nconv7.weight: tensor([[[0.5, -650.]]])",
        "conv5.weight = tensor([1.0, 2.0, 3.0])\nconv6 = tensor([4.0])\nconv7: tensor([[[5e-1,\n   -6.5E+2]]])",
        "conv5.weight\ntensor([[[1.0, 2.0, 3.0]]])\nconv6\n\ntensor([4])\nconv7.weight:\n  tensor([[[0.5, -650.0]]])",
        "conv5.weight: Parameter containing:\ntensor([[[1.0, 2.0, 3.0]]], requires_grad=True)\n"
        "conv6.weight = Parameter containing:\ntensor([[[4.0]]], dtype=torch.float32, requires_grad=True)\n"
        "conv7.weight: tensor([[[0.5, -650.0]]], device='cuda:0', grad_fn=<ViewBackward0>)",
        "# header line\nconv5.weight: tensor([[[1.0,2.0,3.0]]])  # trailing comment\nconv5.bias: tensor([0.1])\n"
        "conv6.weight: tensor([[[4.0]]])\nconv6.bias: Parameter containing:\ntensor([-0.2], requires_grad=True)\n\n"
        "conv7.weight: tensor([[[0.5],[-650.0]]])\nconv7.bias: tensor(0.3)\n",
        "\ufeffconv5.weight: tensor([[[ 1.0000000000e+00,  2.0000000000e+00,\n           3.0000000000e+00]]])\r\n"
        "conv6.weight: tensor([[[ 4.]]])\r\nconv7.weight: tensor([[[ 5.0000e-01, -6.5000e+02]]])\r\n",
        "conv5.weight: tensor([[[1.0, 2.0, 3.0]]])\nconv6.weight: tensor([[[4.0]]], dtype=torch.float64)\n"
        "conv7.weight: tensor([[[ 0.5],\n         [-650.0]]], size=(1, 2, 1))",
    ],
    ids=["colon", "equals-no-suffix-sci", "newline", "parameter-keywords", "comments-bias", "bom-crlf-wrapped", "singleton-dims"],
)
def test_accepted_variations(text: str) -> None:
    bank = small(text)
    assert bank.names == ("conv5", "conv6", "conv7")
    assert as_lists(bank) == THREE and bank.lengths == (3, 1, 2)
    assert all(taps.dtype == np.float32 and taps.ndim == 1 for taps in bank.filters)


def test_real_torch_full_print_parses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    convs = {i: torch.nn.Conv1d(1, 1, 1 + i % 9 + (i % 3) * 11) for i in range(5, 117)}
    torch.set_printoptions(profile="full", precision=10)
    try:
        text = "".join(f"conv{i}.weight: {conv.weight}\nconv{i}.bias: {conv.bias}\n" for i, conv in convs.items())
    finally:
        torch.set_printoptions(profile="default")
    (tmp_path / "my.txt").write_text(text)
    bank = parse_weight_file(tmp_path / "my.txt")
    assert bank.lengths == tuple(conv.kernel_size[0] for conv in convs.values())
    for conv, taps in zip(convs.values(), bank.filters):
        assert np.allclose(taps, conv.weight.detach().numpy().ravel(), rtol=1e-6, atol=1e-9)


def test_default_print_with_elided_numbers_is_refused() -> None:
    conv = torch.nn.Conv1d(1, 1, 1100)
    text = "conv5.weight: tensor([[[1.0]]])\n" + f"conv6.weight: {conv.weight}\nconv7.weight: tensor([1.0])\n"
    assert "..." in text  # PyTorch summarised the 1100 taps
    with pytest.raises(WeightFileError, match=r"^w\.txt, line 3, layer conv6: the numbers were elided") as error:
        small(text)
    assert 'profile="full"' in str(error.value)


# ----------------------------------------------------------------------------- refusals

GOOD6, GOOD7 = "conv6.weight: tensor([4.0])\n", "conv7.weight: tensor([0.5, -650.0])\n"


@pytest.mark.parametrize(
    "text, line, layer, fragment",
    [
        ("conv5.weight: hello", 1, "conv5", "'conv5.weight: hello' is not a printed tensor"),
        ("conv5.weight: tensor(hello)", 1, "conv5", "expected '[' or a number"),
        ("conv5.weight: tensor([1.0])\nconv6.weight: tensor([[[1.0,\n   2.0, nan]]])\n" + GOOD7, 3, "conv6", "contains nan (NaN or Inf)"),
        ("conv5.weight: tensor([1.0])\n" + GOOD6 + "conv7.weight: tensor([1.0, -inf])", 3, "conv7", "contains -inf (NaN or Inf)"),
        ("conv5.weight: tensor([1e39])\n" + GOOD6 + GOOD7, 1, "conv5", "beyond the float32 range"),
        ("conv5.weight: tensor([1.0, 2.0])\n" + GOOD7, 2, None, "layer conv6 is missing (conv7 comes right after conv5)"),
        ("conv5.weight: tensor([1.0, 2.0])\n" + GOOD6, 2, None, "layer conv7 is missing (the file ends after conv6)"),
        (GOOD6 + GOOD7, 1, None, "layer conv5 is missing (conv6 comes first)"),
        ("conv5.weight: tensor([1.0])\n" + GOOD6 + "conv5.weight: tensor([2.0])\n" + GOOD7, 3, "conv5", "duplicated layer (first defined at line 1)"),
        ("conv5.weight: tensor([1.0])\n" + GOOD7 + GOOD6, 3, "conv6", "out of order (comes after conv7, line 2)"),
        ("conv5.weight: tensor([1.0])\n" + GOOD6 + GOOD7 + "conv8.weight: tensor([1.0])", 4, "conv8", "unexpected layer"),
        ("conv5.weight: tensor([[[1., 2., 3., 4., 5.]],\n  [[1., 2., 3., 4., 5.]]])", 1, "conv5", "shape [2, 1, 5], not 1-D"),
        ("conv5.weight: tensor([])\n" + GOOD6 + GOOD7, 1, "conv5", "the filter is empty"),
        ("conv5.weight: tensor([[1.0, 2.0],\n  [3.0]])", 2, "conv5", "ragged nested brackets (numbers per row: 2 then 1)"),
        ("conv5.weight: tensor([[[1., 2.]],\n [[3., 4.], [5., 6.]]])", 2, "conv5", "ragged nested brackets (rows per level: 1 then 2)"),
        ("conv5.weight: tensor([[1.0],\n [[2.0]]])", 1, "conv5", "rows at different depths"),
        ("conv5.weight: tensor([[1.0, 2.0],\n 3.0])", 1, "conv5", "numbers and brackets are mixed"),
        ("conv5.weight: tensor([[1.0, 2.0] 3.0])", 1, "conv5", "numbers and brackets are mixed"),
        ("conv5.weight: tensor([[1.0, 2.0]\n", 1, "conv5", "brackets never close"),
        ("conv5.weight: tensor([[1.0, 2.0]] junk", 1, "conv5", "unexpected text after the tensor's closing bracket"),
        ("conv5.weight: tensor([1.0,\n abc])", 2, "conv5", "'abc' is not a number"),
        ("conv5.weight: tensor([1_000])", 1, "conv5", "'1_000' is not a number"),
        ("garbage before\nconv5.weight: tensor([1.0])", 1, None, "'garbage before' is not a printed tensor"),
        ("conv5.weight: tensor([1.0])\nstray words\n" + GOOD6, 2, None, "'stray words' is not a printed tensor (after layer conv5)"),
        ("conv5.weight: tensor([1.0])\ntensor([2.0])", 2, None, "a tensor without a layer name after layer conv5"),
        ("conv5.weight: tensor([1.0])\n" + GOOD6 + "conv7.weight: tensor([0.5, \u2026])", 3, None, "unexpected character '\u2026' (U+2026)"),
        ("conv5.weight: tensor([1.0])\nconv5.bias: tensor([nan])\n" + GOOD6 + GOOD7, 2, "conv5", "contains nan"),
        ("conv5.weight: tensor([1.0])\nconv5.bias: tensor([[1.0], [2.0, 3.0]])\n" + GOOD6 + GOOD7, 2, "conv5", "ragged"),
    ],
)
def test_refusals_name_line_layer_and_problem(text: str, line: int, layer: str | None, fragment: str) -> None:
    where = f"w.txt, line {line}" + (f", layer {layer}" if layer else "")
    with pytest.raises(WeightFileError, match="^" + re.escape(where) + r"\b") as error:
        small(text)
    assert fragment in str(error.value)
    assert ";" in str(error.value)  # followed by what to do


@pytest.mark.parametrize("text, fragment", [("", "is empty (0 bytes)"), ("  \n# only a comment\n\n", "only whitespace and comments")])
def test_empty_files_are_refused(text: str, fragment: str, tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_text(text)
    with pytest.raises(WeightFileError, match=re.escape(fragment)):
        parse_weight_file(tmp_path / "w.txt")


def test_binary_files_are_refused_with_byte_offset(tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_bytes(b"conv5.weight: tensor([1.0])\n\xff\xfe\x00junk")
    with pytest.raises(WeightFileError, match=r"not a text file: byte 0xff is not UTF-8 text at byte offset 28 \(line 2\)"):
        parse_weight_file(tmp_path / "junk.txt")
    (tmp_path / "nul.txt").write_bytes(b"conv5.weight: tensor([1.0])\n\x00\x01")
    with pytest.raises(WeightFileError, match=r"control byte 0x00 at byte offset 28"):
        parse_weight_file(tmp_path / "nul.txt")
    with pytest.raises(WeightFileError, match="not found"):
        parse_weight_file(tmp_path / "absent.txt")


# ----------------------------------------------------------------------------- the bank


def test_padded_matrix_reproduces_per_filter_same_convolution() -> None:
    rng = np.random.default_rng(0)
    lengths = [1, 2, 3, 4, 16, 17, 40, 60, *rng.integers(1, 60, 24)]  # longest even: K = 61
    bank = FilterBank(tuple(f"conv{i}" for i in range(len(lengths))), tuple(rng.standard_normal(int(k)) for k in lengths))
    matrix, widths = bank.padded()
    assert matrix.shape == (len(lengths), 61) and matrix.dtype == np.float32 and widths.tolist() == list(bank.lengths)
    signal = torch.from_numpy(rng.standard_normal((2, 1, 300)))  # float64: compare placement, not rounding
    fused = torch.nn.functional.conv1d(signal, torch.from_numpy(matrix).double()[:, None, :], padding=(matrix.shape[1] - 1) // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # even kernels with padding='same'
        for row, taps in enumerate(bank.filters):
            conv = torch.nn.Conv1d(1, 1, taps.size, padding="same", bias=False).double()
            conv.weight.data = torch.from_numpy(taps).double().view(1, 1, -1)
            single = conv(signal)[:, 0]
            assert (fused[:, row] - single).abs().max().item() < 1e-6, f"filter {row} (length {taps.size})"


def test_filter_bank_is_validated_frozen_and_summarised() -> None:
    with pytest.raises(CwtopsError, match="one filter per name"):
        FilterBank(("conv5", "conv6"), (np.ones(3),))
    with pytest.raises(CwtopsError, match="layer conv5: a filter must be a non-empty 1-D array"):
        FilterBank(("conv5",), (np.ones((2, 2)),))
    bank = FilterBank(("conv5", "conv6"), (np.array([3.0, 4.0]), np.ones(9)))
    with pytest.raises(ValueError):
        bank.filters[0][0] = 1.0  # read-only: the hash cannot go stale
    summary = summarize(bank)
    assert summary["layers"] == 2 and summary["first"] == "conv5" and summary["last"] == "conv6"
    assert summary["lengths"] == [2, 9] and (summary["min_length"], summary["max_length"]) == (2, 9)
    assert summary["norms"] == [5.0, 3.0] and (summary["min_norm"], summary["max_norm"]) == (3.0, 5.0)
    assert summary["sha256"] != summarize(FilterBank(("conv5", "conv6"), (np.array([3.0, 4.0]), np.ones(8))))["sha256"]


# ----------------------------------------------------------------------------- command line


def test_cli_generate_then_check(tmp_path: Path) -> None:
    out = tmp_path / "W.txt"
    made = subprocess.run([CWTOPS, "weights", "generate", "--out", str(out)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert "112" in made.stdout and out.exists()
    done = subprocess.run([CWTOPS, "weights", "check", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "112 layers" in done.stdout and "conv5" in done.stdout and "conv116" in done.stdout
    assert "filter lengths 5 .. 257" in done.stdout and "L2 norms" in done.stdout
    made = subprocess.run([CWTOPS, "weights", "generate", "--out", str(out), "--w0", "6"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert "(w0 = 6)" in out.read_text()[:400] and "lengths 17 .. 257" in made.stdout


def test_cli_check_refuses_unusable_files_with_nonzero_exit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(f"conv5.weight: {torch.nn.Conv1d(1, 1, 1100).weight}\n")
    done = subprocess.run([CWTOPS, "weights", "check", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "layer conv5" in done.stderr and "elided" in done.stderr
    done = subprocess.run([CWTOPS, "weights", "check", str(tmp_path / "absent.txt")], capture_output=True, text=True)
    assert done.returncode == 2 and "not found" in done.stderr

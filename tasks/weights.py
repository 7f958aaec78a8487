"""The CWT weight file: a parser for PyTorch-printed filters and a generator of real filter banks.

The user's file holds one frozen filter per layer, `conv5` .. `conv116`, each printed by PyTorch:

    conv5.weight: tensor([[[ 1.2e-03, -4.5e-04, ... ]]])

Accepted variations: `:` or `=` or a line break between name and tensor, an optional `.weight`
suffix, `.bias` entries (checked, then ignored), `Parameter containing:`, `dtype=` /
`requires_grad=` / `device=` / `grad_fn=` keywords, line-wrapped numbers, scientific notation,
`#` comment lines. The parser never evaluates the text: a regex finds the entries, a bracket scan
gives each tensor's shape, and NumPy converts each run of numbers in one call.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from tasks.errors import CwtopsError
from tasks.io import write_text

FULL_PRINT_HINT = 'print it again after torch.set_printoptions(profile="full", precision=10)'
_ENTRY = re.compile(
    r"^[ \t]*(?P<name>[A-Za-z_]\w*?)(?:\.(?P<kind>weight|bias))?[ \t]*[:=]?[ \t]*\r?\n?"
    r"(?:[ \t]*Parameter containing:[ \t]*\r?\n)?[ \t]*tensor\(",
    re.MULTILINE,
)
_TRAILER = re.compile(r"\s*(?:,\s*[A-Za-z_]\w*\s*=\s*[^,()\n]+\s*)*\)\s*")
_BRACKETS = re.compile(r"[\[\]]")


class WeightFileError(CwtopsError):
    """A weight file that cannot be used; the message names the file, line and layer."""


@dataclass(frozen=True)
class FilterBank:
    names: tuple[str, ...]
    filters: tuple[np.ndarray, ...]
    source: str = "<memory>"
    header: dict = field(default_factory=dict, compare=False)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(f) for f in self.filters)

    def sha256(self) -> str:
        """Stable identity of names, lengths and float32 values."""
        digest = hashlib.sha256()
        for name, taps in zip(self.names, self.filters):
            digest.update(f"{name}:{len(taps)};".encode())
            digest.update(np.ascontiguousarray(taps, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(matrix [S, K], lengths [S]); K odd, each filter placed so one 'same' convolution
        with padding (K-1)//2 equals Conv1d(1, 1, k, padding='same') of that filter."""
        width = max(self.lengths) | 1
        matrix = np.zeros((len(self.filters), width), dtype=np.float32)
        for row, taps in enumerate(self.filters):
            offset = (width - 1) // 2 - (len(taps) - 1) // 2
            matrix[row, offset : offset + len(taps)] = taps
        return matrix, np.asarray(self.lengths, dtype=np.int64)


@dataclass
class _Entry:
    name: str
    kind: str
    line: int
    values: np.ndarray


class _Text:
    """The file's text with a fast offset -> line number lookup."""

    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source
        self._newlines = [m.start() for m in re.finditer("\n", text)]

    def line(self, offset: int) -> int:
        return bisect.bisect_left(self._newlines, offset) + 1

    def fail(self, offset: int, layer: str | None, problem: str, todo: str) -> WeightFileError:
        where = f"{self.source}, line {self.line(offset)}" + (f", layer {layer}" if layer else "")
        return WeightFileError(f"{where}: {problem}; {todo}")


def _strip_comments(text: str) -> str:
    # Blank out comment lines but keep their newlines, so line numbers stay right.
    return re.sub(r"(?m)^[ \t]*#[^\n]*", "", text)


def _parse_numbers(chunk: str, doc: _Text, offset: int, layer: str) -> np.ndarray:
    tokens = chunk.replace(",", " ").split()
    try:
        return np.array(tokens, dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise doc.fail(offset, layer, f"'{bad[:40]}' is not a number", "fix or re-print the tensor") from None


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _parse_tensor(doc: _Text, start: int, end: int, layer: str) -> tuple[np.ndarray, int]:
    """Parse the bracketed body that starts at `start`; returns (values with shape, end offset)."""
    text = doc.text
    body_start = start + len(text[start:end]) - len(text[start:end].lstrip())
    if body_start >= end or text[body_start] != "[":
        if text[body_start:end].lstrip().startswith(("-", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")):
            scalar_end = text.find(")", body_start, end)
            return _parse_numbers(text[body_start:scalar_end], doc, body_start, layer), scalar_end
        raise doc.fail(start, layer, "expected '[' after 'tensor('", "the text is not a printed tensor")
    stack: list[list] = [[]]
    leaf_start = body_start
    for match in _BRACKETS.finditer(text, body_start, end):
        position = match.start()
        if match.group() == "[":
            if text[leaf_start:position].strip(" \t\r\n,"):
                raise doc.fail(position, layer, "numbers and brackets are mixed at one level", "the tensor is malformed")
            stack.append([])
        else:
            chunk = text[leaf_start:position]
            if len(stack) < 2:
                raise doc.fail(position, layer, "unbalanced ']'", "the tensor is malformed")
            node = stack.pop()
            if chunk.strip(" \t\r\n,"):
                if node:
                    raise doc.fail(position, layer, "numbers and brackets are mixed at one level", "the tensor is malformed")
                node = _parse_numbers(chunk, doc, leaf_start, layer)
            stack[-1].append(node)
            if len(stack) == 1:
                return _shape_up(stack[0][0], doc, position, layer), position + 1
        leaf_start = position + 1
    raise doc.fail(start, layer, "the tensor's brackets never close", "the file may be cut off; re-export it")


def _shape_up(node: list | np.ndarray, doc: _Text, offset: int, layer: str) -> np.ndarray:
    if isinstance(node, np.ndarray):
        return node
    children = [_shape_up(child, doc, offset, layer) for child in node]
    if not children:
        return np.zeros((0,))
    shapes = {child.shape for child in children}
    if len(shapes) != 1:
        raise doc.fail(offset, layer, f"ragged nested lists (row shapes {sorted(shapes)})", "the tensor is malformed")
    return np.stack(children)


def _entries(doc: _Text) -> list[_Entry]:
    text = doc.text
    matches = list(_ENTRY.finditer(text))
    _check_gap(doc, 0, matches[0].start() if matches else len(text), None)
    entries = []
    for index, match in enumerate(matches):
        name, kind = match.group("name"), match.group("kind") or "weight"
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        segment = text[match.end() : end]
        if "..." in segment:
            raise doc.fail(
                match.start(), name,
                "the numbers were elided ('...'): PyTorch's default print summarises large tensors",
                FULL_PRINT_HINT,
            )
        values, after = _parse_tensor(doc, match.end(), end, name)
        trailer = _TRAILER.match(text, after, end)
        if not trailer:
            raise doc.fail(after, name, "missing ')' or unexpected text after the tensor", "only keywords like dtype= may follow the numbers")
        _check_gap(doc, trailer.end(), end, name)
        entries.append(_Entry(name, kind, doc.line(match.start()), values))
    return entries


def _check_gap(doc: _Text, start: int, end: int, previous: str | None) -> None:
    """Text between entries must be blank: anything else is not a tensor."""
    junk = doc.text[start:end]
    if junk.strip():
        offset = start + len(junk) - len(junk.lstrip())
        snippet = junk.strip().splitlines()[0][:60]
        layer = re.match(r"\s*([A-Za-z_]\w*?)(?:\.\w+)?\s*[:=]", junk)
        raise doc.fail(
            offset, layer.group(1) if layer else previous,
            f"'{snippet}' is not a printed tensor",
            "each layer must be written as `NAME.weight: tensor([...])`",
        )


def parse_weight_text(text: str, source: str = "<text>", first_layer: int = 5, last_layer: int = 116) -> FilterBank:
    """Parse a weight file's text into a filter bank; raise WeightFileError on anything wrong."""
    doc = _Text(_strip_comments(text), source)
    if not doc.text.strip():
        raise WeightFileError(f"{source}: the file is empty (no layers); generate one with `cwtops weights generate`")
    entries = _entries(doc)
    expected = [f"conv{i}" for i in range(first_layer, last_layer + 1)]
    filters: dict[str, np.ndarray] = {}
    for entry in entries:
        _check_values(entry, doc, expected, filters)
        if entry.kind == "weight":
            filters[entry.name] = entry.values
    missing = [name for name in expected if name not in filters]
    if missing:
        raise WeightFileError(
            f"{source}: layer {missing[0]} is missing ({len(missing)} of {len(expected)} layers missing); "
            f"the file must hold {expected[0]} .. {expected[-1]}"
        )
    return FilterBank(tuple(expected), tuple(filters[name].astype(np.float32) for name in expected), source)


def _check_values(entry: _Entry, doc: _Text, expected: list[str], seen: dict[str, np.ndarray]) -> None:
    where = f"{doc.source}, line {entry.line}, layer {entry.name}"
    finite = np.isfinite(entry.values)
    if not finite.all():
        bad = entry.values.reshape(-1)[~finite.reshape(-1)][0]
        raise WeightFileError(f"{where}: contains {bad} (NaN or Inf); the filter must be finite numbers")
    if entry.kind == "bias":
        return
    if entry.name not in expected:
        raise WeightFileError(f"{where}: unexpected layer; expected {expected[0]} .. {expected[-1]}")
    if entry.name in seen:
        raise WeightFileError(f"{where}: duplicated layer (already defined earlier); keep one definition")
    if seen and expected.index(entry.name) < expected.index(next(reversed(seen))):
        raise WeightFileError(f"{where}: out of order (after {next(reversed(seen))}); layers must be in ascending order")
    squeezed = entry.values.squeeze()
    if squeezed.ndim > 1:
        raise WeightFileError(
            f"{where}: filter has shape {list(entry.values.shape)}, not 1-D after dropping singleton "
            "dimensions; each layer must hold one filter"
        )
    if squeezed.size == 0:
        raise WeightFileError(f"{where}: the filter is empty")
    entry.values = squeezed.reshape(-1)


def parse_weight_file(path: Path | str, first_layer: int = 5, last_layer: int = 116) -> FilterBank:
    """Read and parse a weight file (UTF-8 text)."""
    path = Path(path)
    if not path.exists():
        raise WeightFileError(f"{path}: weight file not found; generate one with `cwtops weights generate --out {path}`")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WeightFileError(
            f"{path}: not a text file (undecodable byte at offset {error.start}); "
            "the weight file must be PyTorch's printed tensors"
        ) from None
    if "\x00" in text:
        raise WeightFileError(f"{path}: not a text file (NUL byte at offset {text.index(chr(0))})")
    return parse_weight_text(text, str(path), first_layer, last_layer)


def _morlet(frequency: float, w0: float, max_half: int) -> np.ndarray:
    sigma = w0 / (2 * math.pi * frequency)
    half = min(max_half, math.ceil(3 * sigma))
    t = np.arange(-half, half + 1, dtype=np.float64)
    envelope = np.exp(-0.5 * (t / sigma) ** 2)
    wave = envelope * np.cos(2 * math.pi * frequency * t)
    wave -= envelope * (wave.sum() / envelope.sum())  # admissibility: zero mean
    return wave / np.linalg.norm(wave)


def _ricker(frequency: float, max_half: int) -> np.ndarray:
    sigma = math.sqrt(2) / (2 * math.pi * frequency)  # peak frequency of the Mexican hat
    half = min(max_half, math.ceil(4 * sigma))
    t = np.arange(-half, half + 1, dtype=np.float64) / sigma
    wave = (1 - t**2) * np.exp(-0.5 * t**2)
    wave -= wave.mean()
    return wave / np.linalg.norm(wave)


def generate_filter_bank(
    scales: int = 112,
    wavelet: Literal["morlet", "ricker"] = "morlet",
    first_layer: int = 5,
    f_max: float = 0.45,
    f_min: float = 0.0225,
    w0: float = 6.0,
    max_length: int = 257,
) -> tuple[FilterBank, dict]:
    """A real CWT filter bank: one L2-normalised wavelet per scale, centre frequencies
    geometrically spaced from `f_max` down to `f_min` cycles/sample; filters have odd lengths."""
    if wavelet not in ("morlet", "ricker"):
        raise CwtopsError(f"unknown wavelet '{wavelet}'; choose morlet or ricker")
    if scales < 1:
        raise CwtopsError("scales must be at least 1")
    frequencies = np.geomspace(f_max, f_min, scales)
    max_half = (max_length - 1) // 2
    build = (lambda f: _morlet(f, w0, max_half)) if wavelet == "morlet" else (lambda f: _ricker(f, max_half))
    filters = tuple(build(float(f)).astype(np.float32) for f in frequencies)
    names = tuple(f"conv{first_layer + i}" for i in range(scales))
    header = {
        "wavelet": wavelet,
        "scales": scales,
        "w0": w0 if wavelet == "morlet" else None,
        "centre_frequencies": [float(f) for f in frequencies],
        "lengths": [len(f) for f in filters],
    }
    return FilterBank(names, filters, "<generated>", header), header


def _format_row(values: np.ndarray, per_line: int = 6) -> str:
    numbers = [f"{float(v): .9e}" for v in values]
    lines = [", ".join(numbers[i : i + per_line]) for i in range(0, len(numbers), per_line)]
    return (",\n" + " " * 17).join(lines)


def format_weight_file(bank: FilterBank, header: dict | None = None) -> str:
    """The user's format: PyTorch's tensor print, at full float32 precision (9 significant digits)."""
    header = header or bank.header
    lines = [
        "# cwtops CWT filter bank (PyTorch tensor print format, full float32 precision)",
        f"# wavelet: {header.get('wavelet')}  scales: {len(bank.names)}  w0: {header.get('w0')}",
        "# centre frequencies (cycles/sample): "
        + " ".join(f"{f:.6g}" for f in header.get("centre_frequencies", [])),
    ]
    for name, taps in zip(bank.names, bank.filters):
        lines.append(f"{name}.weight: tensor([[[{_format_row(np.asarray(taps, dtype=np.float32))}]]])")
    return "\n".join(lines) + "\n"


def write_weight_file(path: Path | str, bank: FilterBank, header: dict | None = None) -> Path:
    """Write atomically; the file parses back to exactly the same float32 values."""
    return write_text(path, format_weight_file(bank, header))


def summarize(bank: FilterBank) -> dict:
    norms = [float(np.linalg.norm(f)) for f in bank.filters]
    return {
        "layers": len(bank.names),
        "first": bank.names[0],
        "last": bank.names[-1],
        "min_length": min(bank.lengths),
        "max_length": max(bank.lengths),
        "min_norm": min(norms),
        "max_norm": max(norms),
        "sha256": bank.sha256(),
    }

"""The CWT weight file: a parser for PyTorch-printed filters and a generator of real filter banks.

The user's file holds one frozen filter per layer, `conv5` .. `conv116`, each printed by PyTorch:

    conv5.weight: tensor([[[ 1.2e-03, -4.5e-04, ... ]]])

Accepted variations: `:` or `=` or a line break between name and tensor, an optional `.weight`
suffix, `.bias` entries (checked, then ignored), `Parameter containing:`, `dtype=` /
`requires_grad=` / `device=` / `grad_fn=` keywords after the numbers, line-wrapped numbers,
scientific notation, and `#` comments (from `#` to the end of the line).

The parser never evaluates the text. A regex finds each `tensor(`; the bracket structure comes
from NumPy over the bracket positions (depth by cumulative sum, row sizes by bincount); the numbers
of one tensor are converted by NumPy in one call. A 10 MB file parses in a few tenths of a second.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cwtops.core.artifacts import write_text
from cwtops.core.errors import CwtopsError

DEFAULT_FIRST_LAYER = 5
DEFAULT_LAST_LAYER = 116
FULL_PRINT_HINT = 'print the weights again after torch.set_printoptions(profile="full", precision=10)'
LAYOUT_HINT = "write each layer as `conv5.weight: tensor([[[...]]])`"
MALFORMED = "the tensor is malformed; re-print it"

_TENSOR = re.compile(r"tensor\(")
# Possessive quantifiers and a word-start lookbehind keep the search linear on any junk.
_NAME_TAIL = re.compile(
    r"(?<![\w.])(?P<name>[A-Za-z_]\w*+)(?:\.(?P<kind>weight|bias))?\s*+(?:[:=]\s*+)?(?:Parameter containing:\s*+)?\Z"
)
_NAME_HEAD = re.compile(r"\s*(?P<name>[A-Za-z_]\w*?)(?:\.(?:weight|bias))?\s*[:=]")
# After the closing bracket: `, dtype=torch.float32`, `, requires_grad=True`, `, size=(1, 1, 0)`,
# `, grad_fn=<ViewBackward0>`, `, device='cuda:0'`, then `)`.
_TRAILER = re.compile(r"\s*(?:,\s*[A-Za-z_]\w*\s*=\s*(?:\([^()]*\)|<[^<>]*>|'[^']*'|[^,()\s]+)\s*)*\)")
_BLANK = re.compile(r"\s*")
_COMMENT = re.compile(r"#[^\n]*")
_TOKEN = re.compile(r"[^\s,\[\]]+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)", re.IGNORECASE)
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
_NOT_CONTROL = bytes(range(0x20, 0x7F)) + b"\t\n\r\x0b\x0c" + bytes(range(0x80, 0x100))

_WHITESPACE = b" \t\n\r\x0b\x0c"  # exactly what bytes.split() splits on
_TO_SPACE = bytes.maketrans(b",[]", b"   ")
_NUMBER_BYTES = b"0123456789.eE+-naifNAIF,[]" + _WHITESPACE
_IS_BRACKET = np.zeros(256, dtype=bool)
_IS_BRACKET[[ord("["), ord("]")]] = True
_IS_TOKEN = np.ones(256, dtype=bool)
_IS_TOKEN[list(_WHITESPACE + b",[]")] = False


class WeightFileError(CwtopsError):
    """A weight file that cannot be used; the message names the file, line and layer, and what to do."""


@dataclass(frozen=True)
class FilterBank:
    """One 1-D float32 filter per layer, in layer order; lengths may differ."""

    names: tuple[str, ...]
    filters: tuple[np.ndarray, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if len(self.names) != len(self.filters) or not self.names:
            raise CwtopsError(
                f"{self.source}: a filter bank needs one filter per name "
                f"(got {len(self.names)} names, {len(self.filters)} filters)"
            )
        filters = []
        for name, taps in zip(self.names, self.filters):
            taps = np.array(taps, dtype=np.float32).reshape(-1) if np.ndim(taps) <= 1 else None
            if taps is None or taps.size == 0:
                raise CwtopsError(f"{self.source}, layer {name}: a filter must be a non-empty 1-D array")
            taps.setflags(write=False)  # the bank is frozen, its numbers too
            filters.append(taps)
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "filters", tuple(filters))

    @property
    def lengths(self) -> tuple[int, ...]:
        """Number of taps of each filter."""
        return tuple(int(taps.size) for taps in self.filters)

    def sha256(self) -> str:
        """Stable identity of names, lengths and little-endian float32 values."""
        digest = hashlib.sha256()
        for name, taps in zip(self.names, self.filters):
            digest.update(f"{name}:{taps.size};".encode())
            digest.update(taps.astype("<f4").tobytes())
        return digest.hexdigest()

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(matrix [S, K] float32, lengths [S] int64), K the smallest odd width that holds every filter.

        A filter of length k sits at column (K-1)//2 - (k-1)//2, so one convolution of the whole
        matrix with padding (K-1)//2 equals Conv1d(1, 1, k, padding='same') of each filter: PyTorch
        pads an even kernel with one more zero on the right, which this offset reproduces.
        """
        width = max(self.lengths) | 1
        matrix = np.zeros((len(self.filters), width), dtype=np.float32)
        for row, taps in enumerate(self.filters):
            offset = (width - 1) // 2 - (taps.size - 1) // 2
            matrix[row, offset : offset + taps.size] = taps
        return matrix, np.asarray(self.lengths, dtype=np.int64)


@dataclass
class _Entry:
    name: str
    kind: str  # "weight" or "bias"
    line: int
    values: np.ndarray  # float32, as printed (shape kept)


class _Doc:
    """The file's text (comments removed, ASCII), its bytes for NumPy, and line numbers."""

    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source
        self.raw = text.encode("ascii")
        self.buf = np.frombuffer(self.raw, dtype=np.uint8)
        self._mark = (0, 1)  # (offset, line): entries are visited in order, so counting is linear

    def line(self, offset: int) -> int:
        """1-based line number of a character offset."""
        mark, line = self._mark if offset >= self._mark[0] else (0, 1)
        line += self.text.count("\n", mark, offset)
        self._mark = (offset, line)
        return line

    def error(self, offset: int, layer: str | None, problem: str, todo: str) -> WeightFileError:
        """A WeightFileError that says file, line, layer, what is wrong and what to do."""
        where = f"{self.source}, line {self.line(offset)}" + (f", layer {layer}" if layer else "")
        return WeightFileError(f"{where}: {problem}; {todo}")


# ----------------------------------------------------------------------------- text checks


def _refuse_binary(data: bytes, source: str) -> None:
    """Non-UTF-8 or control bytes mean this is not a printed tensor; say where they start."""
    try:
        data.decode("utf-8")
        offset = None
    except UnicodeDecodeError as error:
        offset, what = error.start, f"byte 0x{data[error.start]:02x} is not UTF-8 text"
    if data.translate(None, _NOT_CONTROL):  # cheap test first; the regex only runs on a hit
        control = _CONTROL.search(data)
        if control and (offset is None or control.start() < offset):
            offset, what = control.start(), f"control byte 0x{data[control.start()]:02x}"
    if offset is not None:
        line = data.count(b"\n", 0, offset) + 1
        raise WeightFileError(
            f"{source}: not a text file: {what} at byte offset {offset} (line {line}); "
            "the weight file must be PyTorch's printed tensors as plain text"
        )


def _clean_text(text: str, source: str) -> _Doc:
    """Drop a BOM and comments (keeping line breaks), refuse empty and non-ASCII text."""
    text = text.removeprefix("\ufeff")
    if "#" in text:
        text = _COMMENT.sub("", text)
    if not text.strip():
        what = "is empty (0 bytes)" if not text else "holds only whitespace and comments"
        raise WeightFileError(
            f"{source}: the file {what}, no layers; generate one with `cwtops weights generate --out {source}`"
        )
    if not text.isascii():
        offset = re.search(r"[^\x00-\x7f]", text).start()  # type: ignore[union-attr]
        line = text.count("\n", 0, offset) + 1
        raise WeightFileError(
            f"{source}, line {line}: unexpected character {text[offset]!r} (U+{ord(text[offset]):04X}) outside "
            "a comment; printed tensors are plain ASCII: replace it (or start the line with '#')"
        )
    return _Doc(text, source)


def _refuse_junk(doc: _Doc, start: int, end: int, previous: str | None) -> None:
    """Text between entries must be blank: anything else is not a printed tensor."""
    offset = _BLANK.match(doc.text, start, end).end()  # type: ignore[union-attr]
    if offset >= end:
        return
    snippet = doc.text[offset:end].split("\n", 1)[0].strip()[:60]
    named = _NAME_HEAD.match(snippet)
    layer = named.group("name") if named else None
    context = "" if layer or not previous else f" (after layer {previous})"
    raise doc.error(offset, layer, f"'{snippet}' is not a printed tensor{context}", LAYOUT_HINT)


# ----------------------------------------------------------------------------- one tensor


def _entries(doc: _Doc) -> list[_Entry]:
    """Every `NAME.weight: tensor(...)` in order, values parsed and finite."""
    starts = [match.start() for match in _TENSOR.finditer(doc.text)]
    entries: list[_Entry] = []
    cursor = 0
    for index, start in enumerate(starts):
        limit = starts[index + 1] if index + 1 < len(starts) else len(doc.text)
        previous = entries[-1].name if entries else None
        name, kind, name_offset = _layer_name(doc, cursor, start, previous)
        values, end = _read_tensor(doc, start + len("tensor("), limit, name)
        trailer = _TRAILER.match(doc.text, end, limit)
        if trailer is None:
            raise doc.error(
                end, name, "unexpected text after the tensor's closing bracket (expected ')')",
                "only keywords such as dtype= may follow the numbers",
            )
        cursor = trailer.end()
        entries.append(_Entry(name, kind, doc.line(name_offset), values))
    _refuse_junk(doc, cursor, len(doc.text), entries[-1].name if entries else None)
    return entries


def _layer_name(doc: _Doc, start: int, end: int, previous: str | None) -> tuple[str, str, int]:
    """The `NAME[.weight|.bias] [:|=]` just before `tensor(` at `end`; -> (name, kind, offset)."""
    match = _NAME_TAIL.search(doc.text, start, end)
    if match is None:
        _refuse_junk(doc, start, end, previous)
        after = f" after layer {previous}" if previous else ""
        raise doc.error(end, None, f"a tensor without a layer name{after}", LAYOUT_HINT)
    _refuse_junk(doc, start, match.start(), previous)
    return match.group("name"), match.group("kind") or "weight", match.start()


def _read_tensor(doc: _Doc, start: int, limit: int, layer: str) -> tuple[np.ndarray, int]:
    """Values of the tensor body at `start` (shape kept, float32); -> (values, offset after it)."""
    first = _BLANK.match(doc.text, start, limit).end()  # type: ignore[union-attr]
    if first >= limit or doc.raw[first] != ord("["):
        return _read_scalar(doc, first, limit, layer)
    offsets = first + np.flatnonzero(_IS_BRACKET[doc.buf[first:limit]])
    depth = np.cumsum(np.where(doc.buf[offsets] == ord("["), 1, -1))
    closed = np.flatnonzero(depth == 0)
    if closed.size == 0:
        raise doc.error(first, layer, "the tensor's brackets never close", "the file may be cut off; export it again")
    offsets, depth = offsets[: closed[0] + 1], depth[: closed[0] + 1]
    end = int(offsets[-1]) + 1
    elided = doc.text.find("...", first, end)
    if elided >= 0:
        problem = "the numbers were elided ('...'): PyTorch's default print summarises large tensors"
        raise doc.error(elided, layer, problem, FULL_PRINT_HINT)
    values = _numbers(doc, first, end, layer)
    shape = _shape(doc, offsets, depth, values.size, layer)
    return values.reshape(shape), end


def _read_scalar(doc: _Doc, start: int, limit: int, layer: str) -> tuple[np.ndarray, int]:
    """`tensor(0.5)`: a 0-d tensor."""
    token = _TOKEN.match(doc.text, start, limit)
    if token is None or not _NUMBER.fullmatch(token.group().rstrip(")")):
        todo = f"the text is not a printed tensor; {LAYOUT_HINT}"
        raise doc.error(start, layer, "expected '[' or a number after 'tensor('", todo)
    end = start + len(token.group().rstrip(")"))
    return _numbers(doc, start, end, layer).reshape(()), end


def _numbers(doc: _Doc, start: int, end: int, layer: str) -> np.ndarray:
    """All numbers in text[start:end] as float32, converted by NumPy in one call; finite only."""
    chunk = doc.raw[start:end]
    try:
        if chunk.translate(None, _NUMBER_BYTES):  # a letter no number can hold, e.g. '1_000', 'abc'
            raise ValueError
        values = np.array(chunk.translate(_TO_SPACE).split(), dtype=np.float64)
    except ValueError:
        raise _bad_token(doc, start, end, layer) from None
    with np.errstate(over="ignore"):
        narrow = values.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(narrow))
    if bad.size:
        token = next(itertools.islice(_TOKEN.finditer(doc.text, start, end), int(bad[0]), None))
        what = "NaN or Inf" if not np.isfinite(values[bad[0]]) else "beyond the float32 range"
        todo = "every weight must be a finite float32 number; fix the model or the file"
        raise doc.error(token.start(), layer, f"contains {token.group()} ({what})", todo)
    return narrow


def _bad_token(doc: _Doc, start: int, end: int, layer: str) -> WeightFileError:
    for token in _TOKEN.finditer(doc.text, start, end):
        if not _NUMBER.fullmatch(token.group()):
            problem = f"'{token.group()[:40]}' is not a number"
            return doc.error(token.start(), layer, problem, "a tensor holds only numbers; fix or re-print it")
    return doc.error(start, layer, "the numbers cannot be read", "fix or re-print the tensor")


# ----------------------------------------------------------------------------- bracket structure


def _shape(doc: _Doc, offsets: np.ndarray, depth: np.ndarray, n_values: int, layer: str) -> tuple[int, ...]:
    """Shape from the bracket positions and depths (depth after each bracket; the last is 0)."""
    ndim = int(depth.max())
    if offsets.size == 2 * ndim:  # '[' * ndim, one row of numbers, ']' * ndim: the usual filter
        for left, right in zip(offsets[:-1], offsets[1:]):
            if left != offsets[ndim - 1] and doc.text[left + 1 : right].strip(" \t\r\n\f\v,"):
                raise doc.error(int(left) + 1, layer, "numbers and brackets are mixed at one level", MALFORMED)
        return (1,) * (ndim - 1) + (n_values,)
    return _nested_shape(doc, offsets, depth, ndim, layer)


def _nested_shape(doc: _Doc, offsets: np.ndarray, depth: np.ndarray, ndim: int, layer: str) -> tuple[int, ...]:
    """Several rows: count numbers per row and rows per level with NumPy; all must agree."""
    opening = doc.buf[offsets] == ord("[")
    token = _IS_TOKEN[doc.buf[offsets[0] : offsets[-1] + 1]]
    starts = token.copy()
    starts[1:] &= ~token[:-1]
    before = np.concatenate(([0], np.cumsum(starts)))  # numbers starting before each position
    relative = offsets - offsets[0]
    between = before[relative[1:]] - before[relative[:-1] + 1]  # numbers between consecutive brackets
    row = opening[:-1] & ~opening[1:]  # '[' followed by ']': an innermost row
    stray = np.flatnonzero(~row & (between > 0))
    if stray.size:
        raise doc.error(int(offsets[stray[0]]) + 1, layer, "numbers and brackets are mixed at one level", MALFORMED)
    shallow = np.flatnonzero(row & (depth[:-1] != ndim))
    if shallow.size:
        problem = "ragged nested brackets (rows at different depths)"
        raise doc.error(int(offsets[shallow[0]]), layer, problem, "every row must have the same shape; re-print the tensor")
    shape = [_equal_counts(doc, offsets, opening, depth, level, layer) for level in range(1, ndim)]
    return (*shape, _equal(doc, between[row], offsets[:-1][row], "numbers per row", layer))


def _equal_counts(doc: _Doc, offsets: np.ndarray, opening: np.ndarray, depth: np.ndarray, level: int, layer: str) -> int:
    """Number of children of every bracket at `level` (1 = outermost); they must all agree."""
    levels = depth[opening]  # depth right after an '[' is its level
    parent = np.cumsum(levels == level)[levels == level + 1] - 1
    counts = np.bincount(parent, minlength=int((levels == level).sum()))
    return _equal(doc, counts, offsets[opening][levels == level], "rows per level", layer)


def _equal(doc: _Doc, counts: np.ndarray, where: np.ndarray, what: str, layer: str) -> int:
    odd = np.flatnonzero(counts != counts[0])
    if odd.size:
        raise doc.error(
            int(where[odd[0]]), layer,
            f"ragged nested brackets ({what}: {int(counts[0])} then {int(counts[odd[0]])})",
            "every row must have the same length; re-print the tensor",
        )
    return int(counts[0])


# ----------------------------------------------------------------------------- layers


def parse_weight_text(
    text: str, source: str = "<text>", first_layer: int = DEFAULT_FIRST_LAYER, last_layer: int = DEFAULT_LAST_LAYER
) -> FilterBank:
    """Parse a weight file's text into the filter bank conv{first_layer} .. conv{last_layer}.

    Raises WeightFileError, naming file, line and layer, for anything that is not exactly those
    layers, in order, each one finite 1-D filter.
    """
    _refuse_binary(text.encode("utf-8", "replace"), source)
    return _parse(text, source, first_layer, last_layer)


def parse_weight_file(
    path: Path | str, first_layer: int = DEFAULT_FIRST_LAYER, last_layer: int = DEFAULT_LAST_LAYER
) -> FilterBank:
    """Read a weight file (UTF-8 text) and parse it; see `parse_weight_text`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        todo = f"generate one with `cwtops weights generate --out {path}`"
        raise WeightFileError(f"{path}: weight file not found; {todo}") from None
    except OSError as error:
        todo = "check the path and its permissions"
        raise WeightFileError(f"{path}: cannot read the weight file ({error.strerror}); {todo}") from None
    _refuse_binary(data, str(path))
    return _parse(data.decode("utf-8"), str(path), first_layer, last_layer)


def _parse(text: str, source: str, first_layer: int, last_layer: int) -> FilterBank:
    if not 0 <= first_layer <= last_layer:
        raise CwtopsError(f"layer range conv{first_layer} .. conv{last_layer} is empty; first_layer must be <= last_layer")
    doc = _clean_text(text, source)
    expected = [f"conv{index}" for index in range(first_layer, last_layer + 1)]
    found = _collect(doc, _entries(doc), expected)
    return FilterBank(tuple(expected), tuple(found[name].values for name in expected), source)


def _collect(doc: _Doc, entries: list[_Entry], expected: list[str]) -> dict[str, _Entry]:
    """Weight entries by name, in order, each a 1-D filter; `.bias` entries are read, then ignored."""
    position = {name: index for index, name in enumerate(expected)}
    found: dict[str, _Entry] = {}
    for entry in entries:
        if entry.kind == "bias":
            continue
        where = f"{doc.source}, line {entry.line}, layer {entry.name}"
        if entry.name not in position:
            raise WeightFileError(f"{where}: unexpected layer; the file must hold exactly {expected[0]} .. {expected[-1]}")
        if entry.name in found:
            first = found[entry.name].line
            raise WeightFileError(f"{where}: duplicated layer (first defined at line {first}); keep one definition")
        last = next(reversed(found.values()), None)
        if last is not None and position[entry.name] < position[last.name]:
            problem = f"out of order (comes after {last.name}, line {last.line})"
            raise WeightFileError(f"{where}: {problem}; write the layers in ascending order")
        entry.values = _as_filter(entry.values, where)
        found[entry.name] = entry
    _refuse_missing(doc, found, expected)
    return found


def _as_filter(values: np.ndarray, where: str) -> np.ndarray:
    """Drop singleton dimensions ([1, 1, k] -> [k]); what remains must be one non-empty filter."""
    squeezed = values.squeeze()
    if squeezed.ndim > 1:
        raise WeightFileError(
            f"{where}: filter has shape {list(values.shape)}, not 1-D after dropping singleton dimensions; "
            "each layer must hold one filter, e.g. shape [1, 1, k]"
        )
    if squeezed.size == 0:
        shape = list(values.shape)
        raise WeightFileError(f"{where}: the filter is empty (shape {shape}); each layer needs at least one tap")
    return squeezed.reshape(-1)


def _refuse_missing(doc: _Doc, found: dict[str, _Entry], expected: list[str]) -> None:
    missing = [name for name in expected if name not in found]
    if not missing:
        return
    index = expected.index(missing[0])
    after = found.get(expected[index - 1]) if index else None
    before = next((found[name] for name in expected[index + 1 :] if name in found), None)
    if before is not None:
        order = f"right after {after.name}" if after else "first"
        where = f"line {before.line}: layer {missing[0]} is missing ({before.name} comes {order})"
    elif after is not None:
        where = f"line {after.line}: layer {missing[0]} is missing (the file ends after {after.name})"
    else:
        where = f"no weight layers at all (layer {missing[0]} is missing)"
    raise WeightFileError(
        f"{doc.source}, {where}; {len(missing)} of {len(expected)} layers missing, "
        f"the file must hold every layer {expected[0]} .. {expected[-1]}"
    )


# ----------------------------------------------------------------------------- generator


def _morlet(frequency: float, w0: float, max_half: int) -> np.ndarray:
    """Real Morlet: cos carrier under a Gaussian (sigma = w0 / (2 pi f)), support +/-3 sigma."""
    sigma = w0 / (2 * math.pi * frequency)
    half = min(max_half, math.ceil(3 * sigma))
    t = np.arange(-half, half + 1, dtype=np.float64)
    envelope = np.exp(-0.5 * (t / sigma) ** 2)
    wave = envelope * np.cos(2 * math.pi * frequency * t)
    wave -= envelope * (wave.sum() / envelope.sum())  # admissibility: exactly zero mean as sampled
    return wave / np.linalg.norm(wave)


def _ricker(frequency: float, max_half: int) -> np.ndarray:
    """Ricker (Mexican hat) whose spectrum peaks at `frequency`: sigma = sqrt(2) / (2 pi f).

    Support +/-4 sigma: its t^2 factor makes the tail heavier than a Gaussian's, and a +/-3 sigma
    cut moves the spectral peak by 2-4 %.
    """
    sigma = math.sqrt(2) / (2 * math.pi * frequency)
    half = min(max_half, math.ceil(4 * sigma))
    t = np.arange(-half, half + 1, dtype=np.float64) / sigma
    wave = (1 - t**2) * np.exp(-0.5 * t**2)
    wave -= wave.mean()
    return wave / np.linalg.norm(wave)


def _peak_frequency(taps: np.ndarray, n_fft: int = 1 << 16) -> float:
    spectrum = np.abs(np.fft.rfft(taps.astype(np.float64), n_fft))
    return float(np.argmax(spectrum) / n_fft)


# The Morlet's w0 sets its quality factor: a Gaussian of sigma = w0 / (2 pi f) samples, so a relative
# bandwidth of about 1 / w0. The scales take DEFAULT_W0's values in turn, three resolutions over one
# range, each at 5.6 filters an octave: frequency-sharp filters (w0 6, the usual Morlet), time-sharp
# ones (w0 3: half the support, twice the bandwidth) and one-cycle ones (w0 1.5: a quarter of the
# support; the zero-mean correction lifts their spectral peak 1.2-1.6x above the nominal frequency,
# as the header's measured peaks show). Measured on the development list (BENCHMARKS.md, what was
# tried). Earlier versions wrote w0 6 and 3 in turn, and before that w0 6 on every scale; a bank they
# generated is still recognised as a default (`default_bank_w0`) and refitted with its own w0.
DEFAULT_W0: tuple[float, ...] = (6.0, 3.0, 1.5)
EARLIER_DEFAULT_W0: tuple[tuple[float, ...], ...] = ((6.0, 3.0), (6.0,))
# The default range and support: the generator's defaults, and what recognising a default bank
# (`default_bank_w0`) and fitting it to short signals (`fitted_filter_bank`) start from.
DEFAULT_SCALES, DEFAULT_F_MAX, DEFAULT_F_MIN, DEFAULT_MAX_LENGTH = 112, 0.4, 0.004, 257


def _w0_values(w0: float | Sequence[float]) -> tuple[float, ...]:
    values = (float(w0),) if isinstance(w0, (int, float)) else tuple(float(v) for v in w0)
    if not values or min(values) <= 0:
        raise CwtopsError(f"w0: one positive number or a list of them (taken by the scales in turn), got {w0!r}")
    return values


def _check_generator_args(scales: int, wavelet: str, f_max: float, f_min: float, max_length: int) -> None:
    if wavelet not in ("morlet", "ricker"):
        raise CwtopsError(f"unknown wavelet '{wavelet}'; choose one of: morlet, ricker")
    if scales < 1 or max_length < 3 or max_length % 2 == 0:
        raise CwtopsError(f"need scales >= 1 and an odd max_length >= 3 (got scales={scales}, max_length={max_length})")
    if not 0 < f_min <= f_max < 0.5:
        raise CwtopsError(f"need 0 < f_min <= f_max < 0.5 cycles/sample (got f_min={f_min}, f_max={f_max})")


def _generated(scales: int, wavelet: str, first_layer: int, f_max: float, f_min: float,
               w0: float | Sequence[float], max_length: int) -> tuple[FilterBank, tuple[float, ...], np.ndarray]:
    """The generator's filters alone (without the header's measured spectral peaks, 112 long FFTs),
    with the w0 values and centre frequencies they were built from."""
    _check_generator_args(scales, wavelet, f_max, f_min, max_length)
    w0s = _w0_values(w0)
    frequencies = np.geomspace(f_max, f_min, scales)
    max_half = (max_length - 1) // 2
    if wavelet == "morlet":
        waves = [_morlet(float(f), w0s[i % len(w0s)], max_half) for i, f in enumerate(frequencies)]
    else:
        waves = [_ricker(float(f), max_half) for f in frequencies]
    names = tuple(f"conv{first_layer + i}" for i in range(scales))
    return FilterBank(names, tuple(wave.astype(np.float32) for wave in waves), "<generated>"), w0s, frequencies


def generate_filter_bank(
    scales: int = DEFAULT_SCALES,
    wavelet: Literal["morlet", "ricker"] = "morlet",
    first_layer: int = DEFAULT_FIRST_LAYER,
    f_max: float = DEFAULT_F_MAX,
    f_min: float = DEFAULT_F_MIN,
    w0: float | Sequence[float] = DEFAULT_W0,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[FilterBank, dict[str, Any]]:
    """A real CWT filter bank and its header: one L2-normalised, zero-mean wavelet per scale.

    Centre frequencies are geometrically spaced from `f_max` down to `f_min` cycles/sample.
    Morlet: scale i has w0[i % len(w0)] (one number: every scale the same).
    Filters have odd lengths; the lowest frequencies would need more than `max_length` taps, so
    their support is capped there (the header counts them and records the measured spectral
    peak of every filter next to its nominal centre frequency).
    """
    bank, w0s, frequencies = _generated(scales, wavelet, first_layer, f_max, f_min, w0, max_length)
    header = {
        "wavelet": wavelet,
        "scales": scales,
        "first_layer": first_layer,
        "w0": list(w0s) if wavelet == "morlet" else None,
        "support_sigmas": 3.0 if wavelet == "morlet" else 4.0,
        "max_length": max_length,
        "capped": bank.lengths.count(max_length),
        "centre_frequencies": [float(f) for f in frequencies],
        "peak_frequencies": [_peak_frequency(taps) for taps in bank.filters],
        "lengths": list(bank.lengths),
    }
    return bank, header


# ----------------------------------------------------------------------------- writer


def _format_taps(taps: np.ndarray, indent: int, per_line: int = 6) -> str:
    # '%.8e' is 9 significant digits: every float32 survives the round trip through text exactly.
    numbers = np.char.mod("% .8e", taps.astype(np.float64)).tolist()
    rows = [", ".join(numbers[i : i + per_line]) for i in range(0, len(numbers), per_line)]
    return (",\n" + " " * indent).join(rows)


def _header_lines(bank: FilterBank, header: dict[str, Any]) -> list[str]:
    lines = [
        "# CWT filter bank in PyTorch's tensor print format, full float32 precision.",
        f"# layers: {bank.names[0]} .. {bank.names[-1]} "
        f"({len(bank.names)} filters, lengths {min(bank.lengths)} .. {max(bank.lengths)})",
    ]
    if header.get("wavelet"):
        values = _w0_values(header["w0"]) if header.get("w0") else ()
        w0 = f" (w0 = {', '.join(f'{v:g}' for v in values)}{' in turn' if len(values) > 1 else ''})" if values else ""
        lines.append(f"# wavelet: {header['wavelet']}{w0}, scales: {header.get('scales', len(bank.names))}")
    if header.get("max_length"):
        sigmas, capped = header.get("support_sigmas", 3), header.get("capped", 0)
        lines.append(f"# support: +/-{sigmas:g} sigma, at most {header['max_length']} taps ({capped} filters capped)")
    frequencies = header.get("centre_frequencies") or []
    if frequencies:
        lines.append(f"# centre frequencies (cycles/sample), {bank.names[0]} first:")
        for i in range(0, len(frequencies), 8):
            lines.append("#   " + " ".join(f"{f:.6g}" for f in frequencies[i : i + 8]))
    return lines


def format_weight_file(bank: FilterBank, header: dict[str, Any] | None = None) -> str:
    """The user's format: a '#' header, then `convN.weight: tensor([[[...]]])` per layer, exact float32."""
    lines = _header_lines(bank, header or {})
    for name, taps in zip(bank.names, bank.filters):
        prefix = f"{name}.weight: tensor([[["
        lines.append(f"{prefix}{_format_taps(taps, len(prefix))}]]])")
    return "\n".join(lines) + "\n"


def write_weight_file(path: Path | str, bank: FilterBank, header: dict[str, Any] | None = None) -> Path:
    """Write atomically; the file parses back to exactly the same float32 values."""
    try:
        return write_text(path, format_weight_file(bank, header))
    except OSError as error:
        raise WeightFileError(f"{path}: cannot write the weight file ({error.strerror}); choose another path") from None


def summarize(bank: FilterBank) -> dict[str, Any]:
    """Layers, first and last name, filter lengths and L2 norms (each, min, max), and the hash."""
    norms = [float(np.linalg.norm(taps.astype(np.float64))) for taps in bank.filters]
    return {
        "source": bank.source,
        "layers": len(bank.names),
        "first": bank.names[0],
        "last": bank.names[-1],
        "lengths": list(bank.lengths),
        "min_length": min(bank.lengths),
        "max_length": max(bank.lengths),
        "norms": norms,
        "min_norm": min(norms),
        "max_norm": max(norms),
        "sha256": bank.sha256(),
    }


# ----------------------------------------------------------------------------- fitting to the data

# The default bank is fitted to signals too short for it: its lowest filter moves up to about two
# cycles per signal and no filter is longer than the signal (a longer one sees mostly the zero
# padding, and a period longer than the signal measures the padding's edge). Signals long enough
# for the default range keep it: lowering it further spent scales on frequencies below 8 cycles
# per signal, and the sample data lost 4 points of macro-F1 (0.888 -> 0.848).
FIT_CYCLES_PER_SIGNAL = 2.0


def default_bank_w0(bank: FilterBank) -> tuple[float, ...] | None:
    """Which default `bank` is, by its w0: the bank `cwtops init` writes now (DEFAULT_W0) or one it
    wrote before (EARLIER_DEFAULT_W0), matched tap by tap to float32 rounding; None for any other
    bank, a user's own."""
    for w0 in (DEFAULT_W0, *EARLIER_DEFAULT_W0):
        default, _, _ = _generated(DEFAULT_SCALES, "morlet", DEFAULT_FIRST_LAYER, DEFAULT_F_MAX,
                                   DEFAULT_F_MIN, w0, DEFAULT_MAX_LENGTH)
        if bank.names == default.names and bank.lengths == default.lengths and all(
            np.allclose(mine, theirs, rtol=0, atol=1e-6) for mine, theirs in zip(bank.filters, default.filters)
        ):
            return w0
    return None


def is_default_bank(bank: FilterBank) -> bool:
    """True for a bank `cwtops init` writes or wrote (the generator's defaults), to float32 rounding."""
    return default_bank_w0(bank) is not None


def fitted_filter_bank(signal_length: int, scales: int = DEFAULT_SCALES,
                       w0: float | Sequence[float] = DEFAULT_W0) -> tuple[FilterBank, dict[str, Any]]:
    """The default generator, its frequency range and filter lengths fitted to `signal_length`."""
    f_max = DEFAULT_F_MAX
    f_min = min(f_max / 2, max(DEFAULT_F_MIN, FIT_CYCLES_PER_SIGNAL / signal_length))
    max_length = min(DEFAULT_MAX_LENGTH, max(3, signal_length - 1 if signal_length % 2 == 0 else signal_length))
    bank, header = generate_filter_bank(scales=scales, f_max=f_max, f_min=f_min, w0=w0, max_length=max_length)
    return bank, {**header, "fitted_to_length": signal_length}


def fit_warnings(bank: FilterBank, signal_length: int) -> list[str]:
    """What in a user's bank does not fit signals of `signal_length` samples (the bank is kept)."""
    warnings = []
    longer = [name for name, n in zip(bank.names, bank.lengths) if n > signal_length]
    if longer:
        warnings.append(f"{len(longer)} of {len(bank.names)} filters ({longer[0]} ..) are longer than the "
                        f"{signal_length}-sample signals: they see mostly the zero padding")
    slow = [name for name, taps in zip(bank.names, bank.filters) if 0 < _peak_frequency(taps) * signal_length < 1]
    if slow:
        warnings.append(f"{len(slow)} filters ({slow[0]} ..) peak below one cycle per signal: they measure the "
                        "signal's edges more than its content")
    return warnings

"""Weight-file parser throughput: the generated my.txt and ~10 MB files in two tensor layouts.

Usage: python -m bench.bench_parser [--quick] [--json bench/results/parser.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench.common import RESULTS_DIR, median_seconds, print_table, write_json
from cwtops.data.weights import FilterBank, format_weight_file, generate_filter_bank, parse_weight_file

TARGET_SECONDS = 1.0  # a 10 MB file must parse in well under this
ROW_TAPS = 4200  # 112 filters x 4200 taps x ~21 bytes per printed number: ~10 MB
COLUMN_TAPS = 3300  # ~27 bytes per number when each sits in its own brackets: ~10 MB


def _random_bank(taps: int, seed: int = 0) -> FilterBank:
    rng = np.random.default_rng(seed)
    return FilterBank(tuple(f"conv{i}" for i in range(5, 117)), tuple(rng.standard_normal(taps) for _ in range(112)))


def _column_layout(bank: FilterBank) -> str:
    """Every tap in its own row, shape [k, 1]: the bracket-heavy worst case for the parser."""
    lines = []
    for name, taps in zip(bank.names, bank.filters):
        rows = ",\n        ".join(f"[{value}]" for value in np.char.mod("% .8e", taps.astype(np.float64)).tolist())
        lines.append(f"{name}.weight: tensor([{rows}])")
    return "\n".join(lines) + "\n"


def _files(scratch: Path) -> dict[str, Path]:
    generated, header = generate_filter_bank()
    texts = {
        "generated my.txt [1,1,k]": format_weight_file(generated, header),
        "10 MB, rows [1,1,k]": format_weight_file(_random_bank(ROW_TAPS)),
        "10 MB, columns [k,1]": _column_layout(_random_bank(COLUMN_TAPS)),
    }
    paths = {}
    for index, (label, text) in enumerate(texts.items()):
        paths[label] = scratch / f"weights{index}.txt"
        paths[label].write_text(text)
    return paths


def run(quick: bool = False) -> dict:
    """Median parse time of each file; `holds` when every ~10 MB file parses under TARGET_SECONDS."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, path in _files(Path(scratch)).items():
            size_mb = path.stat().st_size / 1e6
            seconds = median_seconds(lambda: parse_weight_file(path), repeats=3 if quick else 5)
            rows.append({"file": label, "size_mb": size_mb, "seconds": seconds, "mb_per_s": size_mb / seconds})
    print_table(f"weight-file parser (target: a 10 MB file in well under {TARGET_SECONDS:g} s; median)", rows, list(rows[0]))
    holds = all(row["seconds"] < TARGET_SECONDS for row in rows if row["size_mb"] > 5)
    return {"rows": rows, "target_seconds": TARGET_SECONDS, "holds": holds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 5")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "parser.json", help="where to write the results")
    args = parser.parse_args()
    print(f"wrote {write_json(args.json, run(args.quick))}")


if __name__ == "__main__":
    main()

"""Weight-file parser throughput on a ~10 MB file (112 long filters in PyTorch's print format)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench.common import RESULTS_DIR, median_seconds, print_table, write_json
from tasks.weights import FilterBank, format_weight_file, parse_weight_file


def run(quick: bool = False) -> dict:
    rng = np.random.default_rng(0)
    filters = tuple(rng.standard_normal(5900).astype(np.float32) for _ in range(112))
    bank = FilterBank(tuple(f"conv{i}" for i in range(5, 117)), filters)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "big.txt"
        path.write_text(format_weight_file(bank, {"wavelet": "random", "centre_frequencies": []}))
        size_mb = path.stat().st_size / 1e6
        seconds = median_seconds(lambda: parse_weight_file(path), repeats=3 if quick else 5)
    row = {"file_mb": size_mb, "seconds": seconds, "mb_per_s": size_mb / seconds, "under_1s": seconds < 1.0}
    print_table("weight-file parser (target: a 10 MB file in well under a second)", [row], list(row))
    return {"rows": [row], "holds": row["under_1s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(RESULTS_DIR / "parser.json"))
    args = parser.parse_args()
    write_json(args.json, run(args.quick))


if __name__ == "__main__":
    main()

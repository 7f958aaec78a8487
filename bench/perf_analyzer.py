"""Triton's own load generator, `perf_analyzer` (C++), for the served side of the benchmarks.

A Python load generator on the same two cores costs about as much CPU per request as the model
itself, so it measures the client more than the server. `perf_analyzer` is what Triton's users
measure with. It ships in the `tritonclient` wheel of the server's release (2.51, the tritonserver
inside nvidia-pytriton 0.7.0); newer releases moved it to a `perf-analyzer` wheel built for glibc
2.38, which this Debian 12 machine does not have. At run time it needs `libcudart.so.12` (the
`nvidia-cuda-runtime-cu12` wheel; no GPU is used) and `libb64.so.0d` (Debian's `libb64-0d`).

    python -m bench.perf_analyzer install    # what `make perf-analyzer` runs
    python -m bench.perf_analyzer check      # prints the binary and its version, or what is missing
"""

from __future__ import annotations

import csv
import ctypes.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cwtops.core.errors import CwtopsError
from cwtops.serving.server import triton_home

CLIENT_VERSION = "2.51.0"  # the tritonclient release of the bundled tritonserver 2.51
CUDART = "nvidia-cuda-runtime-cu12"
LIBB64 = "libb64.so.0d"
DEBIAN_LIBB64 = "libb64-0d"


def home() -> Path:
    """Where the binary and its CUDA runtime live (override with CWTOPS_PERF_ANALYZER_HOME)."""
    return Path(os.environ.get("CWTOPS_PERF_ANALYZER_HOME", triton_home() / "perf_analyzer"))


def binary() -> Path:
    return home() / "bin" / "perf_analyzer"


def _cudart_dir() -> Path:
    return home() / "cudart" / "nvidia" / "cuda_runtime" / "lib"


def environment() -> dict[str, str]:
    """The process environment with the bundled CUDA runtime on LD_LIBRARY_PATH."""
    paths = [str(_cudart_dir()), *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(paths)}


def missing() -> list[str]:
    """What stops perf_analyzer from running here, each with the command that fixes it; [] when ready."""
    problems = []
    if not binary().exists():
        problems.append(f"{binary()}: not installed; run `make perf-analyzer`")
    elif not (_cudart_dir() / "libcudart.so.12").exists():
        problems.append(f"{_cudart_dir()}: libcudart.so.12 missing; run `make perf-analyzer`")
    if ctypes.util.find_library("b64") != LIBB64:
        problems.append(f"{LIBB64} not found; install Debian's `{DEBIAN_LIBB64}` (apt-get install {DEBIAN_LIBB64})")
    return problems


def available() -> bool:
    return not missing()


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def _install_libb64() -> None:
    if ctypes.util.find_library("b64") == LIBB64:
        return
    from cwtops.services.debian import ensure

    ensure([DEBIAN_LIBB64], f"perf_analyzer ({LIBB64})")


def install() -> Path:
    """Unpack perf_analyzer from the tritonclient wheel, add the CUDA runtime it links, and libb64.

    Everything lands in a temporary folder next to the target and is renamed into place, so an
    interrupted install leaves either the previous one or nothing."""
    target = home()
    if binary().exists() and (_cudart_dir() / "libcudart.so.12").exists():
        _install_libb64()
        return binary()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".perf_analyzer-", dir=target.parent) as scratch:
        staging = Path(scratch) / "home"
        wheels = Path(scratch) / "wheels"
        _pip("download", "--no-deps", "--only-binary=:all:", "--platform", "manylinux1_x86_64",
             "-d", str(wheels), f"tritonclient=={CLIENT_VERSION}")
        wheel = next(wheels.glob("tritonclient-*.whl"))
        member = f"tritonclient-{CLIENT_VERSION}.data/data/bin/perf_analyzer"
        (staging / "bin").mkdir(parents=True)
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(staging / "bin" / "perf_analyzer", "wb") as sink:
            shutil.copyfileobj(source, sink)
        (staging / "bin" / "perf_analyzer").chmod(0o755)
        _pip("install", "--no-deps", "--target", str(staging / "cudart"), CUDART)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    _install_libb64()
    return binary()


def version() -> str:
    """The version `perf_analyzer --version` reports (raises with the reason when it cannot run)."""
    problems = missing()
    if problems:
        raise CwtopsError("perf_analyzer cannot run: " + "; ".join(problems))
    result = subprocess.run([str(binary()), "--version"], env=environment(), capture_output=True, text=True, timeout=30)
    text = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise CwtopsError(f"{binary()} --version failed: {text[-500:]}")
    found = re.search(r"Version (\S+)", text)
    return found.group(1) if found else text.splitlines()[-1]


@dataclass(frozen=True)
class Measurement:
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    client_cpu_s: float  # CPU seconds used by the perf_analyzer process


def input_file(folder: Path, name: str, signal: np.ndarray) -> Path:
    """perf_analyzer's --input-data JSON: the one signal (without its batch dimension) every request sends."""
    path = folder / "perf_analyzer_input.json"
    sample = signal[0]
    path.write_text(json.dumps({"data": [{name: {"content": sample.ravel().tolist(), "shape": list(sample.shape)}}]}))
    return path


def command(url: str, model: str, concurrency: int, inputs: Path, csv_path: Path, interval_ms: int) -> list[str]:
    """One measurement at one concurrency, over HTTP with binary tensors, closed loop (each of
    `concurrency` synchronous workers sends its next request when the previous one is answered)."""
    return [
        str(binary()), "-m", model, "-u", url, "-i", "http", "-b", "1",
        f"--concurrency-range={concurrency}", f"--input-data={inputs}",
        f"--measurement-interval={interval_ms}",
        # medians over rounds are taken by the caller; perf_analyzer only has to finish
        "--stability-percentage=50", "--max-trials=6", "-f", str(csv_path),
    ]


def parse_csv(text: str) -> dict[str, float]:
    """The first row of perf_analyzer's CSV (-f): throughput and latency percentiles (us -> ms)."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise CwtopsError("perf_analyzer wrote no measurement rows")
    row = rows[0]
    return {"concurrency": int(row["Concurrency"]), "rps": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1e3, "p99_ms": float(row["p99 latency"]) / 1e3}


def measure(url: str, model: str, concurrency: int, inputs: Path, interval_ms: int = 2000) -> Measurement:
    """Run perf_analyzer once; its CSV gives the figures, /proc gives its CPU time."""
    with tempfile.TemporaryDirectory(prefix="cwtops-pa-") as scratch:
        csv_path = Path(scratch) / "result.csv"
        before = os.times()
        result = subprocess.run(command(url, model, concurrency, inputs, csv_path, interval_ms), env=environment(),
                                capture_output=True, text=True, timeout=120)
        after = os.times()
        if result.returncode != 0 or not csv_path.exists():
            raise CwtopsError(f"perf_analyzer failed (exit {result.returncode}) against {url} model {model}: "
                              f"{(result.stdout + result.stderr).strip()[-1500:]}")
        figures = parse_csv(csv_path.read_text())
    spent = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return Measurement(concurrency, figures["rps"], figures["p50_ms"], figures["p99_ms"], spent)


def main() -> None:
    action = sys.argv[1] if len(sys.argv) > 1 else "check"
    try:
        if action == "install":
            print(f"perf_analyzer: {install()} (version {version()})")
        elif action == "check":
            print(f"perf_analyzer: {binary()} (version {version()})")
        else:
            raise SystemExit(f"usage: python -m bench.perf_analyzer [install|check], not {action!r}")
    except CwtopsError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()

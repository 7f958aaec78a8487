"""Stage `parity`: PyTorch against ONNX Runtime, on the real test signals and on random ones.

Every case (test signals and random signals at each batch size) reports the max absolute and
relative logit error, the argmax agreement and the ties among the disagreements. A logit passes
when its error is within `atol + rtol * |reference|` (numpy's `allclose`, torch.testing's
`assert_close`); with any logit beyond that, or a class that differs on a real signal other than
by a tie within that tolerance (cwtops/model/parity.py; with `parity.allow_ties: false`, any
class that differs), the stage fails with the report saying where. The reference
inputs and outputs are saved: the registry and the served model are checked against them later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cwtops.core.artifacts import atomic_path, sha256_file, write_json
from cwtops.core.config import BaseConfig, ParityConfig
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import artifact_paths
from cwtops.data.signals import load_signals, read_manifest
from cwtops.model.network import HybridCWTNet, load_checkpoint
from cwtops.model.parity import compare_logits
from cwtops.model.signature import INPUT_NAME, OUTPUT_NAME, read_metadata
from tasks.evaluate import predict_logits

REFERENCE_SIGNALS = 64  # rows of real test signals saved as the served-model reference


@dataclass(frozen=True)
class ParityResult:
    passed: bool
    max_abs_error: float
    max_rel_error: float
    argmax_agreement: float
    report: Path


def compare(
    reference: np.ndarray, candidate: np.ndarray, cfg: ParityConfig, require_argmax: bool = True
) -> dict[str, float | int | bool]:
    """Error figures of `candidate` logits against `reference` logits (both [N, C]).

    Every logit must be within tolerance. On real signals the class must agree too, but for a
    tie within tolerance (`parity.allow_ties`, cwtops/model/parity.py); random signals are
    full of near-ties, so their classes are only reported.
    """
    figures = compare_logits(reference, candidate, cfg.atol, cfg.rtol, cfg.allow_ties)
    within, agree = figures.pop("within"), figures.pop("classes_agree")
    return {**figures, "passed": bool(within and (agree or not require_argmax))}


def onnx_session(path: Path | str, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=ort.get_available_providers())


def run_onnx(session: ort.InferenceSession, signals: np.ndarray) -> np.ndarray:
    """[N, L] or [N, 1, L] signals -> [N, C] logits."""
    batch = signals.reshape(len(signals), 1, -1).astype(np.float32)
    return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def _cases(test_signals: np.ndarray, cfg: ParityConfig, length: int, seed: int, complete: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cases = {f"test[{size}]": test_signals[:size] for size in cfg.batch_sizes if size <= len(test_signals)}
    cases["test[all]" if complete else f"test[first {len(test_signals)}]"] = test_signals
    for size in cfg.batch_sizes:
        cases[f"random[{size}]"] = rng.standard_normal((size, length)).astype(np.float32)
    cases["random[many]"] = rng.standard_normal((cfg.random_signals, length)).astype(np.float32) * 5
    return cases


def check_cases(
    model: HybridCWTNet, session: ort.InferenceSession, cases: dict[str, np.ndarray], cfg: ParityConfig
) -> list[dict]:
    results = []
    for name, signals in cases.items():
        real = name.startswith("test")
        figures = compare(predict_logits(model, signals), run_onnx(session, signals), cfg, require_argmax=real)
        results.append({"name": name, "batch_size": int(len(signals)), **figures})
    return results


def run(cfg: ParityConfig, base: BaseConfig) -> ParityResult:
    """Compare PyTorch and ONNX Runtime; write the report and the reference; fail beyond tolerance."""
    paths = artifact_paths(base)
    model, checkpoint = load_checkpoint(paths.model)
    metadata = read_metadata(paths.onnx)
    if metadata.get("filter_bank_sha256") != checkpoint["filter_bank_sha256"]:
        mismatch = f"ONNX {metadata.get('filter_bank_sha256')} vs checkpoint {checkpoint['filter_bank_sha256']}"
    else:
        mismatch = ""
    manifest = read_manifest(paths.split_manifest)
    test_rows = manifest[manifest.split == "test"]
    # the first `max_test_signals` (all of most test splits): bounded memory for a very large one
    test_signals = load_signals(test_rows.head(cfg.max_test_signals), Path(base.raw_dir))
    session = onnx_session(paths.onnx)
    cases = check_cases(model, session, _cases(test_signals, cfg, test_signals.shape[1], base.seed, len(test_rows) <= cfg.max_test_signals), cfg)
    report = _report(cases, cfg, sha256_file(paths.onnx), mismatch)
    reference = test_signals[:REFERENCE_SIGNALS][:, None, :]
    with atomic_path(paths.reference) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, inputs=reference, outputs=predict_logits(model, reference[:, 0, :]))
    write_json(paths.parity_report, report)
    if not report["passed"]:
        raise CwtopsError(f"parity failed ({paths.parity_report}): {report['failure']}")
    return ParityResult(True, report["max_abs_error"], report["max_rel_error"], report["argmax_agreement"], paths.parity_report)


def _report(cases: list[dict], cfg: ParityConfig, onnx_sha: str, bank_mismatch: str) -> dict:
    failed = [case for case in cases if not case["passed"]]
    reasons = [
        f"{case['name']}: max abs {case['max_abs_error']:.3g}, max rel {case['max_rel_error']:.3g} "
        f"(allowed: {cfg.atol} + {cfg.rtol} * |logit|), argmax agreement {case['argmax_agreement']:.4f} "
        f"({case['argmax_ties']} of the differing classes ties within tolerance"
        + (")" if cfg.allow_ties else "; parity.allow_ties is false)")
        for case in failed
    ]
    if bank_mismatch:
        reasons.insert(0, f"filter bank differs: {bank_mismatch}")
    return {
        "passed": not reasons,
        "failure": "; ".join(reasons),
        "atol": cfg.atol,
        "rtol": cfg.rtol,
        "max_abs_error": max(case["max_abs_error"] for case in cases),
        "max_rel_error": max(case["max_rel_error"] for case in cases),
        "argmax_agreement": min(case["argmax_agreement"] for case in cases if case["name"].startswith("test")),
        # real test signals whose class differs only by a tie within tolerance (the largest case: all of them)
        "argmax_ties": max(case["argmax_ties"] for case in cases if case["name"].startswith("test")),
        "allow_ties": cfg.allow_ties,
        "cases": cases,
        "onnx_sha256": onnx_sha,
    }


def load_report(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())

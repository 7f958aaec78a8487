"""When two runs of one model agree: PyTorch against ONNX Runtime (the parity stage), the recorded
reference against the served model (publishing).

Every logit must be within `atol + rtol * |reference|` (numpy's `allclose`). The class must be the
same, except where the reference's own two classes are tied within that tolerance: arithmetic in
another order (another backend, batch size or thread count) moves a logit by a few units in the
last place, and where a signal's top two classes are closer than that, which one wins is the
arithmetic's call, not the model's; no tolerance on the logits can prevent it. Such a tie is
counted (`argmax_ties`) and allowed by default (`parity.allow_ties`). A class that differs
beyond a tie needs a logit beyond the tolerance, so it fails with it.
"""

from __future__ import annotations

import numpy as np


def compare_logits(reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float,
                   allow_ties: bool = True) -> dict[str, float | int | bool]:
    """Figures of `candidate` logits against `reference` logits (both [N, C]).

    `within`: every logit inside the tolerance; `classes_agree`: the same class on every row, or
    (with `allow_ties`) a different one only where the reference's two logits are tied within
    the tolerance both of them are allowed.
    """
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"logits of different shapes: {reference.shape} vs {candidate.shape}")
    error = np.abs(candidate - reference)
    # float32 rounding grows with the logits' size: an error is judged against atol + rtol * |x|,
    # not against each bound alone (a logit of 2.5 may be 1e-4 off and still be 4e-5 relative)
    allowed = atol + rtol * np.abs(reference)
    rows = np.arange(len(reference))
    expected, got = reference.argmax(1), candidate.argmax(1)  # empty for no rows (C > 0)
    differs = expected != got
    # the reference's lead of its class over the one the candidate picked, against what the
    # tolerance lets the two logits move towards each other
    lead = reference[rows, expected] - reference[rows, got]
    ties = differs & (lead <= allowed[rows, expected] + allowed[rows, got])
    return {
        "max_abs_error": float(error.max(initial=0.0)),
        "max_rel_error": float((error / np.maximum(np.abs(reference), 1.0)).max(initial=0.0)),  # relative where large
        "argmax_agreement": float(np.mean(~differs)) if len(reference) else 1.0,
        "argmax_ties": int(ties.sum()),
        "within": bool(np.all(error <= allowed)),
        "classes_agree": bool(not differs.any() or (allow_ties and bool(ties[differs].all()))),
    }

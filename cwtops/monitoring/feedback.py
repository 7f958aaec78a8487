"""Labels that arrive after the fact: live accuracy per served version.

`cwtops feedback FILE.csv` reads `request_id,label` rows (and `row`, the signal's index within its
request, when a request carried several; 0 otherwise), joins them with the inference log, and
reports per version the share of labelled signals it classified right. The figures go to MLflow
as `live_accuracy` and `live_labelled` on the run that produced each version (and as tags on the
version). Only logged requests can be scored: `monitoring.sample_rate` is the share of them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cwtops.core.config import Params
from cwtops.core.errors import CwtopsError
from cwtops.monitoring.logs import read_log


@dataclass(frozen=True)
class VersionAccuracy:
    version: int
    labelled: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled


@dataclass(frozen=True)
class Feedback:
    versions: list[VersionAccuracy]
    labels: int  # rows in the file
    unmatched: int  # labels whose request is not in the log (not sampled, or another model)


def read_labels(path: Path) -> pd.DataFrame:
    """request_id, row, label; every problem names the file and the line."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"request_id", "label"} - set(reader.fieldnames or [])
            if missing:
                raise CwtopsError(f"{path}: line 1: the header needs the columns request_id and label (missing: {', '.join(sorted(missing))})")
            rows = []
            for line, entry in enumerate(reader, start=2):
                request_id, label = (entry.get("request_id") or "").strip(), (entry.get("label") or "").strip()
                if not request_id or not label:
                    raise CwtopsError(f"{path}: line {line}: request_id and label must both be set")
                row = (entry.get("row") or "0").strip()
                if not row.isdigit():
                    raise CwtopsError(f"{path}: line {line}: row {row!r} is not the index of a signal in its request (0, 1, ...)")
                rows.append((request_id, int(row), label))
    except OSError as error:
        raise CwtopsError(f"{path}: cannot read the labels ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise CwtopsError(f"{path}: not a UTF-8 CSV file") from None
    return pd.DataFrame(rows, columns=["request_id", "row", "label"])


def score(labels: pd.DataFrame, logged: pd.DataFrame) -> Feedback:
    """Join labels with logged predictions (on request id and row) and count the right ones per version."""
    keys = logged[["request_id", "row", "version", "predicted"]].drop_duplicates(["request_id", "row"])
    joined = labels.merge(keys.astype({"row": int}), on=["request_id", "row"], how="left")
    matched = joined.dropna(subset=["version"])
    versions = [
        VersionAccuracy(int(version), len(group), int((group["predicted"] == group["label"]).sum()))
        for version, group in matched.groupby("version")
    ]
    return Feedback(sorted(versions, key=lambda v: v.version), len(labels), len(joined) - len(matched))


def apply_feedback(params: Params, path: Path) -> Feedback:
    """Score the labels in `path` and record live accuracy per version in MLflow."""
    from cwtops.registry.versions import log_version_metrics

    labels = read_labels(path)
    logged = read_log(params.monitoring.inference_log, params.base.model_name, arrays=False).frame
    result = score(labels, logged)
    for entry in result.versions:
        log_version_metrics(params, entry.version, {"live_accuracy": entry.accuracy, "live_labelled": entry.labelled},
                            step=entry.labelled, tags={"live_accuracy": f"{entry.accuracy:.6f}", "live_labelled": str(entry.labelled)})
    return result

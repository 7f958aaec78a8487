"""The inference log read back: the Parquet files the serving backend writes
(cwtops/serving/backend/inference_log.py), as one table per model, filtered by version and time.

Files are read through pyarrow's dataset API, whose hive partitioning turns the
`model=<name>/version=<N>/date=<day>/` folders into columns; on S3 through pyarrow's S3 file
system, with the endpoint and credentials from the environment (docs/s3.md). Files being written
(dot-prefixed temporary names) are never read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from cwtops.core.errors import CwtopsError
from cwtops.core.waiting import wait_until


@dataclass(frozen=True)
class Logged:
    """Logged signals, oldest first."""

    frame: pd.DataFrame  # time, request_id, row, predicted, version (one row per signal)
    signals: np.ndarray  # [N, L] float32
    logits: np.ndarray  # [N, C] float32

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def newest(self) -> datetime | None:
        return None if self.frame.empty else self.frame["time"].max().to_pydatetime()


def _filesystem(location: str):  # noqa: ANN202 - (pyarrow FileSystem or None, root path)
    if not location.startswith("s3://"):
        return None, str(Path(location).resolve())
    from cwtops.serving.backend.inference_log import s3_filesystem

    return s3_filesystem(), location.removeprefix("s3://").rstrip("/")


FRAME_COLUMNS = ("time", "request_id", "row", "predicted", "version")


def read_log(location: str, model: str, version: int | None = None, since: datetime | None = None,
             limit: int | None = None, until: datetime | None = None, arrays: bool = True) -> Logged:
    """Logged signals of `model` (one version, or all) from after `since` up to `until`, the newest
    `limit` of them; `arrays=False` reads the table without the signals and logits (empty arrays)."""
    import pyarrow.dataset as ds

    filesystem, root = _filesystem(location)
    folder = f"{root}/model={model}"
    try:
        dataset = ds.dataset(folder, format="parquet", partitioning="hive", filesystem=filesystem)
        condition = None
        if version is not None:
            condition = ds.field("version") == int(version)
        if since is not None:
            after = ds.field("time") > _utc(since)
            condition = after if condition is None else condition & after
        if until is not None:
            before = ds.field("time") <= _utc(until)
            condition = before if condition is None else condition & before
        columns = None if arrays else [c for c in FRAME_COLUMNS if c in dataset.schema.names]
        table = dataset.to_table(filter=condition, columns=columns)
    except FileNotFoundError:
        return _empty()
    except OSError as error:
        raise CwtopsError(f"inference log {location}: cannot read model '{model}' ({error}); check monitoring.inference_log") from None
    if table.num_rows == 0:
        return _empty()
    frame = table.to_pandas()
    frame = frame.sort_values("time", kind="stable").reset_index(drop=True)
    if limit is not None and len(frame) > limit:
        frame = frame.iloc[-limit:].reset_index(drop=True)
    frame["version"] = frame["version"].astype(int)
    if not arrays:
        return Logged(frame, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))
    signals = np.stack([np.asarray(s, np.float32) for s in frame.pop("signal")])
    logits = np.stack([np.asarray(x, np.float32) for x in frame.pop("logits")])
    return Logged(frame, signals, logits)


def _utc(moment: datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")


def _empty() -> Logged:
    frame = pd.DataFrame({"time": pd.Series([], dtype="datetime64[us, UTC]"), "request_id": [], "row": [], "predicted": [], "version": []})
    return Logged(frame, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))


def wait_for_rows(location: str, model: str, rows: int, timeout: float, version: int | None = None,
                  since: datetime | None = None) -> Logged:
    """The log once it holds `rows` signals (the writer flushes every few seconds); what it holds after `timeout`."""
    wait_until(lambda: len(read_log(location, model, version, since)) >= rows, timeout, interval=0.5)
    return read_log(location, model, version, since)


class Watermark:
    """The newest log time a pass has judged, per pass and model (a small JSON file, written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> datetime | None:
        try:
            return datetime.fromisoformat(json.loads(self.path.read_text())["time"])
        except (OSError, ValueError, KeyError):
            return None

    def write(self, time: datetime) -> None:
        from cwtops.core.artifacts import write_json

        write_json(self.path, {"time": time.isoformat()})

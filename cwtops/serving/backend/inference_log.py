"""The inference log: a sampled share of served requests, written to Parquet off the request path.

The serving backend offers each answered request here; a sampled one is copied into a bounded
queue (`offer` never blocks and never raises), and a writer thread turns the queue into Parquet
files: one row per signal, with the time, the request id, the model and version, the signal, the
logits and the predicted class. Files are written whole or not at all (a temporary name, then a
rename; on S3 one PUT), under hive-style folders that pandas and pyarrow read as columns:

    <location>/model=<name>/version=<N>/date=<YYYY-MM-DD>/part-<time>-<id>.parquet

A full disk, a folder that cannot be written or an S3 endpoint that does not answer costs the
rows of that file, counted in `stats`; requests are answered as before. When the queue is full
(the writer is behind), new samples are dropped and counted instead of waited for.

This file is installed next to the backend's model.py and imports only the standard library,
NumPy and pyarrow (its own S3 client too), so it runs in any Triton Python-backend environment.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

log = logging.getLogger("cwtops.inference_log")
SCHEMA_VERSION = 1
# Requests whose id starts with this are cwtops's own checks (the served-parity check at publication),
# not traffic: never logged.
CHECK_PREFIX = "cwtops-check"
# Snappy: 3-4x less CPU than zstd here for about the same size (signals compress little), and
# the codec every Parquet reader has.
COMPRESSION = "snappy"


def s3_filesystem(**settings: object):  # noqa: ANN201 - a pyarrow S3FileSystem
    """pyarrow's S3 client with the endpoint and region from the environment (the variables
    cwtops.core.s3 reads; this file imports nothing of cwtops), credentials found by the AWS SDK.
    The monitoring passes read the log through it too."""
    from urllib.parse import urlparse

    from pyarrow import fs

    endpoint = next((os.environ[v] for v in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
                     if os.environ.get(v)), None)
    options: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        options = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options, **settings)


def _lists(blocks: list[np.ndarray]):  # noqa: ANN202 - a pyarrow ListArray
    """Rows of 2-D float32 blocks (rows may differ in length between blocks) as one list<float32> column."""
    import pyarrow as pa

    lengths = np.concatenate([np.full(len(block), block.shape[1], dtype=np.int64) for block in blocks])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([block.ravel() for block in blocks]).astype(np.float32, copy=False)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


@functools.cache  # once it has loaded: where `ssl` cannot, each `import ssl` would search and fail again
def import_parquet():  # noqa: ANN201 - the pyarrow.parquet module
    """pyarrow.parquet, also where `ssl` cannot be imported.

    Importing pyarrow.parquet imports pyarrow.fs, which asks `ssl` once for the CA paths of
    pyarrow's own cloud clients. A Triton backend stub built against another patch release of
    Python cannot load the interpreter's `_ssl` extension (undefined symbol), so that import would
    fail; the log never uses pyarrow's cloud clients. A stand-in answers that one question during
    the import and is removed right after, so a later `import ssl` fails as it would have."""
    import sys
    import types

    try:
        import ssl  # noqa: F401 - only whether it loads
    except ImportError:
        if "pyarrow.parquet" not in sys.modules:
            stand_in = types.ModuleType("ssl")
            stand_in.get_default_verify_paths = lambda: types.SimpleNamespace(cafile=None, capath=None)
            sys.modules["ssl"] = stand_in
            try:
                import pyarrow.parquet  # noqa: F401
            finally:
                if sys.modules.get("ssl") is stand_in:
                    del sys.modules["ssl"]
    import pyarrow.parquet as pq

    return pq


@dataclass
class LogStats:
    offered: int = 0
    sampled: int = 0
    dropped: int = 0  # the queue was full
    written: int = 0  # signals in files that landed
    failed: int = 0  # signals in files that could not be written
    last_error: str = ""
    files: list[str] = field(default_factory=list)  # the last few files written


@dataclass(frozen=True)
class Record:
    time_ns: int
    request_id: str
    signals: np.ndarray  # [n, L] float32
    logits: np.ndarray  # [n, C] float32


class InferenceLog:
    """Samples requests of one model version and writes them to `location` (a folder or s3://bucket/prefix)."""

    def __init__(self, location: str, model: str, version: int, class_names: list[str], sample_rate: float,
                 queue_size: int = 1024, flush_seconds: float = 2.0, flush_rows: int = 4096, seed: int | None = None) -> None:
        self.location = location.rstrip("/")
        self.model, self.version, self.class_names = model, int(version), list(class_names)
        self.sample_rate = min(max(float(sample_rate), 0.0), 1.0)
        self.flush_seconds, self.flush_rows = float(flush_seconds), int(flush_rows)
        self.stats = LogStats()
        self._queue: queue.Queue[Record | None] = queue.Queue(maxsize=max(1, int(queue_size)))
        self._random = random.Random(seed)
        self._s3 = None
        try:
            # Here, on the thread that builds the log (the backend's initialize, before any request),
            # not on the writer thread: the import may put a stand-in `ssl` in sys.modules for a
            # moment, and a request importing asyncio at that moment would get the stand-in.
            import_parquet()
        except Exception as error:  # noqa: BLE001 - the writes will fail and count it; serving goes on
            self.stats.last_error = f"{type(error).__name__}: {error}"[:500]
        self._thread = threading.Thread(target=self._run, name="cwtops-inference-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ request path

    def offer(self, request_id: str, signals: np.ndarray, logits: np.ndarray) -> bool:
        """Record one answered request with probability `sample_rate`; never blocks, never raises."""
        try:
            self.stats.offered += 1
            if request_id.startswith(CHECK_PREFIX) or self.sample_rate <= 0.0 or self._random.random() >= self.sample_rate:
                return False
            record = Record(time.time_ns(), request_id or "", np.array(signals, np.float32, copy=True).reshape(len(signals), -1),
                            np.array(logits, np.float32, copy=True).reshape(len(logits), -1))
            self._queue.put_nowait(record)
            self.stats.sampled += 1
            return True
        except queue.Full:
            self.stats.dropped += len(signals)
            return False
        except Exception as error:  # noqa: BLE001 - the request is answered whatever happens here
            self.stats.last_error = f"{type(error).__name__}: {error}"
            return False

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        pending: list[Record] = []
        deadline = time.monotonic() + self.flush_seconds
        while True:
            try:
                record = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                record = False  # time to flush
            if record is None:  # close()
                self._flush(pending)
                return
            if record is not False:
                pending.append(record)
            rows = sum(len(r.signals) for r in pending)
            if pending and (record is False or rows >= self.flush_rows):
                self._flush(pending)
                pending = []
            if record is False or not pending:
                deadline = time.monotonic() + self.flush_seconds

    def _flush(self, records: list[Record]) -> None:
        if not records:
            return
        rows = sum(len(r.signals) for r in records)
        try:
            key = self._write(self._table(records), records[0].time_ns)
            self.stats.written += rows
            self.stats.files = [*self.stats.files[-9:], key]
        except Exception as error:  # noqa: BLE001 - a full disk or an unreachable store loses these rows only
            self.stats.failed += rows
            self.stats.last_error = f"{type(error).__name__}: {error}"[:500]
            log.warning("inference log: %d signals not written to %s: %s", rows, self.location, self.stats.last_error)

    def _table(self, records: list[Record]):  # noqa: ANN202 - a pyarrow.Table
        """Columns built from whole NumPy buffers (no per-value Python objects: this thread shares the
        backend's interpreter with the requests)."""
        import_parquet()
        import pyarrow as pa

        rows = [len(record.signals) for record in records]
        times = np.repeat([record.time_ns // 1000 for record in records], rows)
        index = np.concatenate([np.arange(count, dtype=np.int32) for count in rows])
        logits = np.concatenate([record.logits for record in records])
        predicted = logits.argmax(axis=1)
        names = np.array(self.class_names + [str(i) for i in range(len(self.class_names), logits.shape[1])], dtype=object)
        return pa.table({
            "time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "request_id": pa.array(np.repeat(np.array([r.request_id for r in records], dtype=object), rows), pa.string()),
            "row": pa.array(index, pa.int32()),
            "signal": _lists([record.signals for record in records]),
            "logits": _lists([record.logits for record in records]),
            "predicted": pa.array(names[predicted], pa.string()),
        }, metadata={"cwtops_inference_log": str(SCHEMA_VERSION), "class_names": ",".join(self.class_names)})

    def _write(self, table, first_ns: int) -> str:  # noqa: ANN001 - a pyarrow.Table
        pq = import_parquet()

        day = datetime.fromtimestamp(first_ns / 1e9, UTC).strftime("%Y-%m-%d")
        name = f"part-{first_ns}-{uuid.uuid4().hex[:8]}.parquet"
        relative = f"model={self.model}/version={self.version}/date={day}/{name}"
        if self.location.startswith("s3://"):
            bucket, _, prefix = self.location.removeprefix("s3://").partition("/")
            key = f"{prefix.strip('/')}/{relative}".lstrip("/")
            # S3 has no partial objects: the upload completes on close, or nothing is there
            with self._s3_filesystem().open_output_stream(f"{bucket}/{key}") as stream:
                pq.write_table(table, stream, compression=COMPRESSION)
            return f"s3://{bucket}/{key}"
        path = os.path.join(self.location, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{name}.tmp")
        try:
            pq.write_table(table, tmp, compression=COMPRESSION)
            os.replace(tmp, path)  # readers never see half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def _s3_filesystem(self):  # noqa: ANN202 - a pyarrow S3FileSystem
        """pyarrow's S3 client (boto3 needs `ssl`, which a backend stub may not load): short timeouts, two attempts."""
        if self._s3 is None:
            from pyarrow import fs

            self._s3 = s3_filesystem(connect_timeout=2, request_timeout=10, retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=2))
        return self._s3

    # ------------------------------------------------------------------ shutdown

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (within `timeout`) and stop the writer."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

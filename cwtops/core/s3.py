"""S3 (AWS, MinIO, moto) for the DVC remote, MLflow's artifact store and Triton's model repository.

Locations are plain `s3://bucket/prefix` URIs in params; the endpoint of an S3-compatible store
comes from the environment, the variables boto3 itself reads (`AWS_ENDPOINT_URL_S3`, then
`AWS_ENDPOINT_URL`; MLflow's `MLFLOW_S3_ENDPOINT_URL` is the last fallback), and so do the
credentials (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or a profile).
Nothing here prints or stores a credential. See docs/s3.md.

Triton's model repository on S3 is written object by object: a version's `model.onnx` is uploaded
and read back (SHA-256) before the `config.pbtxt` that names it, so Triton never sees a config
that points at a missing or half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cwtops.core.errors import CwtopsError

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rule, and all Triton's S3 path parser takes
_KEY_PART = re.compile(r"^[0-9A-Za-z._-]+$")  # Triton's parser takes no other characters in a path
_TRITON_HOST = re.compile(r"^[0-9A-Za-z.-]+$")
REPOSITORY_NOTE = "README.txt"  # a file at the repository root: Triton only takes folders for models


@dataclass(frozen=True)
class S3Location:
    """`s3://bucket/prefix`: a bucket and a key prefix without leading or trailing slashes."""

    bucket: str
    prefix: str = ""

    def key(self, *parts: str) -> str:
        """The object key of `parts` under the prefix."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for an `s3://` URI."""
    return str(uri).startswith("s3://")


def parse_s3_url(url: str, for_triton: bool = False) -> S3Location:
    """Split `s3://bucket/prefix`; refuse what S3 (and, `for_triton`, Triton's S3 path parser) does not accept."""
    if not is_s3(url):
        raise CwtopsError(f"{url!r} is not an S3 URI; expected s3://bucket/prefix")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if ":" in bucket:
        raise CwtopsError(
            f"{url!r}: put the endpoint in AWS_ENDPOINT_URL_S3 (e.g. http://{bucket}), not in the URI; "
            "write the location as s3://bucket/prefix"
        )
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise CwtopsError(f"{url!r}: bucket {bucket!r} is not a valid S3 bucket name (3-63 characters a-z 0-9 . -)")
    prefix = prefix.strip("/")
    bad = [part for part in prefix.split("/") if for_triton and prefix and not _KEY_PART.match(part)]
    if bad:
        raise CwtopsError(f"{url!r}: prefix parts {bad} must use only A-Z a-z 0-9 . _ - (Triton's S3 paths allow no others)")
    return S3Location(bucket, prefix)


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment (first of ENDPOINT_VARIABLES), or None for AWS itself."""
    for name in ENDPOINT_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value.rstrip("/")
    return None


def client(endpoint: str | None = None) -> Any:
    """A boto3 S3 client: endpoint and credentials from the environment, path-style for custom endpoints."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint or endpoint_url()
    config = Config(
        s3={"addressing_style": "path"} if endpoint else {},  # MinIO and moto serve buckets as paths
        retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def triton_url(location: S3Location, endpoint: str | None = None) -> str:
    """Triton's spelling: `s3://bucket/prefix` on AWS, `s3://http://host:port/bucket/prefix` elsewhere."""
    endpoint = endpoint or endpoint_url()
    if not endpoint:
        return str(location)
    parsed = urlparse(endpoint)
    host = parsed.hostname or ""
    if parsed.scheme not in ("http", "https") or not _TRITON_HOST.match(host) or parsed.path.strip("/"):
        raise CwtopsError(
            f"S3 endpoint {endpoint!r} (from {'/'.join(ENDPOINT_VARIABLES)}): Triton needs http(s)://host[:port] "
            "with no path; fix the variable"
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"s3://{parsed.scheme}://{host}:{port}/{location.bucket}/{location.prefix}".rstrip("/")


def _where(location: S3Location | str) -> str:
    endpoint = endpoint_url()
    return f"{location} (endpoint {endpoint or 'AWS'})"


def check_bucket(location: S3Location, s3: Any | None = None) -> None:
    """Fail early, naming the bucket and the endpoint, when the bucket cannot be reached."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        (s3 or client()).head_bucket(Bucket=location.bucket)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "?")
        raise CwtopsError(
            f"S3 bucket of {_where(location)} answered {code}: create the bucket or fix AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY and the endpoint variable (AWS_ENDPOINT_URL_S3)"
        ) from None
    except BotoCoreError as error:
        raise CwtopsError(f"S3 bucket of {_where(location)} is unreachable ({type(error).__name__}): {error}; "
                          "check AWS_ENDPOINT_URL_S3 and the credentials in the environment") from None


def _missing(error: Exception) -> bool:
    """True for botocore's "no such object" (NoSuchKey from GET, a bare 404 from HEAD)."""
    return getattr(error, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404")


def _object_sha256(s3: Any, bucket: str, key: str) -> str | None:
    """SHA-256 of an object's bytes (streamed), or None when it does not exist."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as error:
        if _missing(error):
            return None
        raise
    digest = hashlib.sha256()
    for chunk in iter(lambda: body.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def upload_verified(s3: Any, path: Path, bucket: str, key: str) -> str:
    """Upload a file, read it back and compare SHA-256; a mismatch deletes the object and raises."""
    from cwtops.core.artifacts import sha256_file

    expected = sha256_file(path)
    s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": expected}})
    if _object_sha256(s3, bucket, key) != expected:
        s3.delete_object(Bucket=bucket, Key=key)
        raise CwtopsError(f"s3://{bucket}/{key}: the uploaded bytes differ from {path}; the object was removed, retry the upload")
    return expected


def delete_prefix(s3: Any, bucket: str, prefix: str) -> int:
    """Delete every object under `prefix/` (a "folder"); returns how many went."""
    deleted = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            deleted += len(keys)
    return deleted


def list_folders(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Names of the "sub-folders" directly under `prefix` (common prefixes with delimiter '/')."""
    start = prefix.strip("/") + "/" if prefix.strip("/") else ""
    names = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start, Delimiter="/"):
        names += [entry["Prefix"][len(start):].rstrip("/") for entry in page.get("CommonPrefixes", [])]
    return sorted(names)


class S3ModelRepository:
    """Triton's model repository on S3, with the operations publishing needs (keys relative to it)."""

    def __init__(self, url: str, s3: Any | None = None) -> None:
        self.location = parse_s3_url(url, for_triton=True)
        self.s3 = s3 or client()

    def describe(self, key: str) -> str:
        return f"s3://{self.location.bucket}/{self.location.key(key)}"

    def read_text(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.get_object(Bucket=self.location.bucket, Key=self.location.key(key))["Body"].read().decode()
        except ClientError as error:
            if _missing(error):
                return None
            raise

    def write_text(self, key: str, text: str) -> None:
        self.s3.put_object(Bucket=self.location.bucket, Key=self.location.key(key), Body=text.encode())

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.location.bucket, Key=self.location.key(key))

    def remove_tree(self, key: str) -> None:
        delete_prefix(self.s3, self.location.bucket, self.location.key(key))

    def has_model(self, name: str) -> bool:
        """True when any object lies under `<name>/`."""
        page = self.s3.list_objects_v2(Bucket=self.location.bucket, Prefix=self.location.key(name) + "/", MaxKeys=1)
        return bool(page.get("KeyCount"))

    def versions(self, name: str) -> list[int]:
        """Version numbers with a folder under `<name>/`."""
        return sorted(int(v) for v in list_folders(self.s3, self.location.bucket, self.location.key(name)) if v.isdigit())

    def sha256(self, key: str) -> str | None:
        return _object_sha256(self.s3, self.location.bucket, self.location.key(key))

    def write_version(self, name: str, version: int, onnx_path: Path) -> None:
        """`<name>/<version>/model.onnx`, read back and checked before any config may name it."""
        upload_verified(self.s3, Path(onnx_path), self.location.bucket, self.location.key(name, str(version), "model.onnx"))

    @contextlib.contextmanager
    def fetch(self, key: str) -> Iterator[Path | None]:
        """A local copy of an object for as long as the block runs (None when it does not exist)."""
        from botocore.exceptions import ClientError

        with tempfile.TemporaryDirectory(prefix="cwtops-s3-") as scratch:
            path = Path(scratch) / Path(key).name
            try:
                self.s3.download_file(self.location.bucket, self.location.key(key), str(path))
            except ClientError as error:
                if not _missing(error):
                    raise
                path = None
            yield path

    def ensure_exists(self) -> None:
        """S3 has no empty folders and Triton refuses a repository path with no object under it: leave a note."""
        prefix = self.location.prefix + "/" if self.location.prefix else ""
        page = self.s3.list_objects_v2(Bucket=self.location.bucket, Prefix=prefix, MaxKeys=1)
        if not page.get("KeyCount"):
            self.write_text(REPOSITORY_NOTE, "Triton model repository written by `cwtops publish` (<model>/<version>/model.onnx, config.pbtxt)\n")

    def models(self, skip_suffix: str = "") -> list[str]:
        """Models with a config.pbtxt and at least one numeric version folder (as Triton would load them)."""
        found = []
        for name in list_folders(self.s3, self.location.bucket, self.location.prefix):
            if (skip_suffix and name.endswith(skip_suffix)) or self.read_text(f"{name}/config.pbtxt") is None:
                continue
            if any(v.isdigit() for v in list_folders(self.s3, self.location.bucket, self.location.key(name))):
                found.append(name)
        return found

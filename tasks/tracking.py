"""The local MLflow tracking server and the tracking URI everybody uses.

`MLFLOW_TRACKING_URI` wins (a team server works unchanged); otherwise the local server on
`mlflow.host:mlflow.port` (127.0.0.1:5000), SQLite under mlflow/, artifacts served from
mlflow/artifacts (or S3 when `artifacts_destination` is an s3:// URI).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.config import Params
from tasks.errors import CwtopsError
from tasks.io import atomic_path
from tasks.services import Service, http_ok

MLFLOW = Service("mlflow")


def local_uri(params: Params) -> str:
    return f"http://{params.mlflow.host}:{params.mlflow.port}"


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or local_uri(params)


def _encryption_key(params: Params) -> str:
    """MLflow encrypts stored webhook secrets; a key kept beside the store survives restarts."""
    from cryptography.fernet import Fernet

    path = Path(params.mlflow.artifacts_destination).parent / "webhook-secret.key"
    if "://" in params.mlflow.artifacts_destination:
        path = Path("mlflow") / "webhook-secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(Fernet.generate_key())
            tmp.chmod(0o600)
    return path.read_text().strip()


def _server_env(params: Params) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", _encryption_key(params))
    # Webhooks to the local receiver on 127.0.0.1 over http (MLflow allows only public https by default).
    env.setdefault("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    env.setdefault("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    env.setdefault("MLFLOW_WEBHOOK_CACHE_TTL", "2")
    return env


def start(params: Params, port: int | None = None, wait: float = 90.0) -> dict:
    """Start `mlflow server` unless one answers already; returns its URI and PID."""
    cfg = params.mlflow
    port = port or cfg.port
    uri = f"http://{cfg.host}:{port}"
    if http_ok(f"{uri}/health"):
        return {"uri": uri, "pid": MLFLOW.pid(), "started": False}
    backend = cfg.backend_store
    if backend.startswith("sqlite:///") and not backend.startswith("sqlite:////"):
        Path(backend.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    destination = cfg.artifacts_destination
    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
        destination = str(Path(destination).resolve())
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", cfg.host, "--port", str(port),
        "--backend-store-uri", backend,
        "--artifacts-destination", destination,
        "--serve-artifacts", "--workers", "1",
    ]
    pid = MLFLOW.launch(command, _server_env(params))
    MLFLOW.wait_healthy(lambda: http_ok(f"{uri}/health"), wait)
    return {"uri": uri, "pid": pid, "started": True, "log": str(MLFLOW.log_file)}


def stop(params: Params) -> bool:
    return MLFLOW.stop()


def status(params: Params) -> dict:
    uri = tracking_uri(params)
    return {"uri": uri, "healthy": http_ok(f"{uri}/health"), "pid": MLFLOW.pid(), "log": str(MLFLOW.log_file)}


def ensure_server(params: Params) -> str:
    """The tracking URI, starting the local server when no other is configured and none runs."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    uri = local_uri(params)
    if not http_ok(f"{uri}/health"):
        start(params)
    return uri


def require_reachable(uri: str) -> None:
    if uri.startswith("http") and not http_ok(f"{uri}/health", timeout=5):
        raise CwtopsError(
            f"MLflow tracking server {uri} is unreachable; start it with `cwtops mlflow start` "
            "or set MLFLOW_TRACKING_URI"
        )

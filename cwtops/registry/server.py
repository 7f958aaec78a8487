"""The MLflow tracking server this project runs, and the tracking URI everybody uses.

`MLFLOW_TRACKING_URI` wins (a team server works unchanged); otherwise the local server on
`mlflow.host:mlflow.port` (127.0.0.1:5000 by default). The local server is a real
`mlflow server`: its store is `mlflow.backend_store`, SQLite by default (relative paths from the
project root) or a database URI such as `postgresql://user@host:5432/mlflow` for a team (the
password from `PGPASSWORD` or `~/.pgpass`, or the whole URI from `MLFLOW_BACKEND_STORE_URI`: the
URI reaches the server through its environment, never its command line, and is recorded and
printed with the password masked),
artifacts proxied by the server from `mlflow.artifacts_destination` (a folder, or an `s3://`
URI with the endpoint in `AWS_ENDPOINT_URL_S3` or `MLFLOW_S3_ENDPOINT_URL` and AWS credentials in the
environment for MinIO or moto; docs/s3.md).
`MLFLOW_BACKEND_STORE_URI` and `MLFLOW_ARTIFACTS_DESTINATION`, the variables `mlflow server`
itself reads, override the params. PID, log and start details live under the state dir
(`CWTOPS_STATE_DIR`, default `.cwtops/`) in `mlflow/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from cwtops.core.artifacts import atomic_path, write_json
from cwtops.core.config import MlflowConfig
from cwtops.core.errors import CwtopsError
from cwtops.core.waiting import retry, wait_until
from cwtops.services.processes import Service, http_ok, process_alive

MLFLOW = Service("mlflow")
T = TypeVar("T")

# Set for the server unless the caller's environment says otherwise.
SERVER_ENV_DEFAULTS = {
    # Webhooks to the local receiver on 127.0.0.1 over http (MLflow allows only public https by default).
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    # A webhook created a moment ago fires on the next event, not a minute later.
    "MLFLOW_WEBHOOK_CACHE_TTL": "2",
    # The GenAI job runner adds eight processes (~1.5 GB) and doubles start-up; nothing here uses it.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def local_uri(cfg: MlflowConfig, port: int | None = None) -> str:
    """`http://host:port` of the local server."""
    return f"http://{cfg.host}:{port or cfg.port}"


def tracking_uri(cfg: MlflowConfig) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the local server's URI."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_uri(cfg)


def backend_store_uri(cfg: MlflowConfig) -> str:
    """The server's store; a relative SQLite path is made absolute (from the project root)."""
    uri = os.environ.get("MLFLOW_BACKEND_STORE_URI") or cfg.backend_store
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def masked(uri: str) -> str:
    """`uri` with any password replaced by `***` (for logs, status and error messages)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if uri.startswith("sqlite:"):
        return uri
    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return uri.split("@")[-1] if "@" in uri else uri


def check_database(uri: str, timeout: int = 10) -> None:
    """A database store (not SQLite) is reachable with its driver, or a clear error naming what to do.

    Without this the server starts, then dies on its first migration with a long traceback in its log.
    """
    if uri.startswith("sqlite:") or "://" not in uri or uri.startswith("file:"):
        return
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    shown = masked(uri)
    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": timeout} if uri.startswith("postgresql") else {})
    except (ArgumentError, NoSuchModuleError) as error:
        raise CwtopsError(f"mlflow.backend_store {shown!r} is not a database URI this environment can open ({error}); "
                          "PostgreSQL needs `postgresql://user@host:port/database` and psycopg2 (a project dependency)") from error
    except ImportError as error:
        raise CwtopsError(f"the driver for {shown} is not installed ({error}); reinstall the project (make setup)") from error
    try:
        with engine.connect():
            pass
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise CwtopsError(
            f"cannot reach the MLflow database {shown}: {reason}. Start the database, create the database named "
            "in the URI, and give the password in PGPASSWORD or ~/.pgpass (or the whole URI in "
            "MLFLOW_BACKEND_STORE_URI), or set mlflow.backend_store back to sqlite:///mlflow/mlflow.db"
        ) from error
    finally:
        engine.dispose()


def artifacts_destination(cfg: MlflowConfig) -> str:
    """Where the server keeps artifacts: an absolute folder, or a URI such as `s3://bucket/prefix`."""
    destination = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or cfg.artifacts_destination
    return destination if "://" in destination else str(Path(destination).resolve())


def _encryption_key(cfg: MlflowConfig) -> str:
    """MLflow encrypts stored webhook secrets; a key kept beside the store survives restarts."""
    from cryptography.fernet import Fernet

    store = backend_store_uri(cfg)
    folder = Path(store.removeprefix("sqlite:///")).parent if store.startswith("sqlite:///") else Path("mlflow")
    path = folder / "webhook-secret.key"
    if not path.exists():
        with atomic_path(path) as tmp:
            tmp.write_bytes(Fernet.generate_key())
            tmp.chmod(0o600)
    return path.read_text().strip()


def server_env(cfg: MlflowConfig) -> dict[str, str]:
    """The server's environment: the caller's (S3 endpoint and credentials pass through) plus defaults."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the server is the tracking server, not a client of one
    for key, value in SERVER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    env.setdefault("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", _encryption_key(cfg))
    env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri(cfg)  # not in argv: `ps` would show a password
    if artifacts_destination(cfg).startswith("s3://"):
        from cwtops.core.s3 import endpoint_url

        endpoint = endpoint_url()  # AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL: one variable for DVC, MLflow and Triton
        if endpoint:
            env.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
    return env


def server_command(cfg: MlflowConfig, port: int) -> list[str]:
    """`mlflow server` on 127.0.0.1 with one worker (start-up time matters more than throughput)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", cfg.host, "--port", str(port),
        "--artifacts-destination", artifacts_destination(cfg),
        "--serve-artifacts", "--workers", "1",
    ]


def _info_file() -> Path:
    return MLFLOW.folder / "server.json"


def _server_pid() -> int | None:
    """The PID from the PID file when that process is still an MLflow server (not exited, not reused)."""
    pid = MLFLOW.pid()
    if pid is None:
        return None
    import psutil

    try:
        command = " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        command = ""
    except psutil.AccessDenied:
        return pid if process_alive(pid) else None  # another user's process: trust the PID file
    if "mlflow" not in command or not process_alive(pid):
        MLFLOW.pid_file.unlink(missing_ok=True)
        return None
    return pid


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _prepare_storage(cfg: MlflowConfig) -> None:
    store = backend_store_uri(cfg)
    if store.startswith("sqlite:///"):
        Path(store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    check_database(store)
    destination = artifacts_destination(cfg)
    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
    elif destination.startswith("s3://"):  # else the server starts and only the first artifact upload fails
        from cwtops.core.s3 import check_bucket, parse_s3_url

        check_bucket(parse_s3_url(destination))


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """Two callers starting the server at once (a DVC stage and a flow) start one server."""
    from filelock import FileLock

    MLFLOW.folder.mkdir(parents=True, exist_ok=True)
    with FileLock(MLFLOW.folder / "start.lock"):
        yield


def start(cfg: MlflowConfig, port: int | None = None, wait: float = 60) -> dict:
    """Start the local `mlflow server` unless one answers already; wait until `/health` is OK.

    Idempotent: a healthy server on the port is left alone, a server of ours still starting is
    waited for, a stale PID file is ignored. Returns uri, pid, started, log (and seconds).
    """
    port = port or cfg.port
    uri = local_uri(cfg, port)
    health = f"{uri}/health"
    with _start_lock():
        if http_ok(health):
            return {"uri": uri, "pid": _server_pid(), "started": False, "log": str(MLFLOW.log_file)}
        started = time.monotonic()
        pid = _server_pid() or _launch(cfg, port, uri)
        MLFLOW.wait_healthy(lambda: http_ok(health), wait, pid)
    return {"uri": uri, "pid": pid, "started": True, "log": str(MLFLOW.log_file), "seconds": round(time.monotonic() - started, 2)}


def _launch(cfg: MlflowConfig, port: int, uri: str) -> int:
    if _port_in_use(cfg.host, port):
        raise CwtopsError(
            f"{cfg.host}:{port} is taken by a program that is not a healthy MLflow server; "
            "stop it, or choose another port (mlflow.port in params.yaml or `cwtops mlflow start --port`)"
        )
    _prepare_storage(cfg)
    pid = MLFLOW.launch(server_command(cfg, port), server_env(cfg))
    write_json(_info_file(), {"uri": uri, "pid": pid, "backend_store": masked(backend_store_uri(cfg)),
                              "artifacts_destination": artifacts_destination(cfg)})
    return pid


def stop(cfg: MlflowConfig, timeout: float = 20.0) -> bool:
    """Stop the server this project started (its whole process group); False when none runs."""
    pid = _server_pid()
    if pid is None:
        MLFLOW.pid_file.unlink(missing_ok=True)
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # started with its own session: uvicorn and its workers go too
        if wait_until(lambda: not process_alive(pid), timeout):
            break
    uri = _recorded_uri(cfg)
    # uvicorn, in the same process group, closes the port a moment later
    wait_until(lambda: not http_ok(f"{uri}/health", timeout=0.5), timeout)
    MLFLOW.pid_file.unlink(missing_ok=True)
    _info_file().unlink(missing_ok=True)
    return True


def _recorded_uri(cfg: MlflowConfig) -> str:
    try:
        return str(json.loads(_info_file().read_text())["uri"])
    except (OSError, ValueError, KeyError):
        return local_uri(cfg)


def status(cfg: MlflowConfig) -> dict:
    """Tracking URI, whether it answers, and the local server's PID, store and log."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or _recorded_uri(cfg)
    try:
        info = json.loads(_info_file().read_text())
    except (OSError, ValueError):
        info = {}
    return {
        "uri": uri,
        "healthy": http_ok(f"{uri}/health") if uri.startswith("http") else None,
        "pid": _server_pid(),
        "backend_store": info.get("backend_store", masked(backend_store_uri(cfg))),
        "artifacts_destination": info.get("artifacts_destination", artifacts_destination(cfg)),
        "log": str(MLFLOW.log_file),
    }


def ensure_server(cfg: MlflowConfig) -> str:
    """The tracking URI, starting the local server when no other is configured and none answers."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    uri = local_uri(cfg)
    if not http_ok(f"{uri}/health"):
        start(cfg)
    return uri


class TrackingUnreachable(CwtopsError):
    """The tracking server did not answer (after retries)."""


def unreachable(uri: str, detail: str = "") -> TrackingUnreachable:
    """The error every MLflow caller raises when the server does not answer."""
    reason = f" ({detail})" if detail else ""
    return TrackingUnreachable(
        f"MLflow tracking server {uri} is unreachable{reason}; start it with `cwtops mlflow start` "
        "or point MLFLOW_TRACKING_URI at a running server"
    )


def require_reachable(uri: str, attempts: int = 3, backoff: float = 1.0) -> None:
    """Probe `/health` up to `attempts` times (waits backoff, 2*backoff, ...), then raise `unreachable`."""
    if not uri.startswith("http"):
        return  # a database or file store URI: nothing to probe

    def probe() -> None:
        if not http_ok(f"{uri}/health", timeout=5):
            raise ConnectionError(f"no answer on {uri}/health")

    try:
        retry(probe, lambda error: isinstance(error, ConnectionError), attempts, backoff)
    except ConnectionError:
        raise unreachable(uri, f"no answer on /health after {attempts} attempts") from None


def is_connection_error(error: BaseException | None) -> bool:
    """True for failures to reach the server (as opposed to MLflow rejecting a request). MLflow
    raises its own exception inside the handler of the transport's, so the chain is walked."""
    import requests

    transport = (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError, ConnectionError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, transport):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def bounded_client_retries(max_retries: int = 3, backoff_factor: int = 1) -> Iterator[None]:
    """Cap the MLflow client's own HTTP retries (default 7 with factor 2: minutes per call) while
    our code runs, unless the user set them; our `with_retries` decides what happens next."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(backoff_factor)}
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def with_retries(action: Callable[[], T], uri: str, attempts: int = 3, backoff: float = 1.0) -> T:
    """Run `action`; on a connection error wait and try again, then raise `unreachable`.

    Only for actions that are safe to repeat (the registry's register is idempotent).
    """
    def worth_retrying(error: BaseException) -> bool:
        return not isinstance(error, CwtopsError) and is_connection_error(error)

    try:
        return retry(action, worth_retrying, attempts, backoff)
    except Exception as error:  # MLflow wraps connection failures in MlflowException
        if not worth_retrying(error):
            raise
        raise unreachable(uri, f"{type(error).__name__} after {attempts} attempts") from error

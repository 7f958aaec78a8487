"""A real local Triton Inference Server (2.51, from the nvidia-pytriton wheel unpacked in `.triton/`).

The wheel has no native ONNX Runtime backend, so start-up assembles a backend directory from
Triton's Python backend and a Python-based backend named `onnxruntime`
(cwtops/serving/backend/model.py): every model whose config says `platform: "onnxruntime_onnx"`
loads through it, the same config.pbtxt the NGC container serves natively. The backend's stub
runs this project's Python environment (onnxruntime, numpy). The server binds to 127.0.0.1, runs
with explicit model control, and loads at start every model whose version folders are already in
the repository, so a restarted server serves what was published. The repository is a folder or
`s3://bucket/prefix` (cwtops/core/s3.py: endpoint and credentials from the environment, docs/s3.md).

The model-repository API (load, unload, index) and the logging and trace APIs are locked: they
answer only requests that carry the header `cwtops-api-key: <key>`. The key is
`CWTOPS_TRITON_API_KEY` when set; otherwise the first start writes a random one to
`<state dir>/triton/api-key`, readable by its owner only, which this checkout's commands read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cwtops.core.config import Params
from cwtops.core.errors import CwtopsError
from cwtops.services.processes import Service, http_ok, state_dir, stop_group
from cwtops.serving.auth import API_KEY_ENV, API_KEY_HEADER, admin_headers, api_key, key_file  # noqa: F401 - re-exported

TRITON = Service("triton")
RESTRICTED_APIS = "model-repository,logging,trace"
BACKEND_SOURCE = Path(__file__).parent / "backend" / "model.py"
STAGING_SUFFIX = ".candidate"  # publishing checks a new version under `<model>.candidate` first
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ServerInfo:
    url: str
    pid: int | None
    started: bool
    log: str
    models: dict[str, str] = field(default_factory=dict)  # model -> "READY versions [..]" or the reason it is not

    def __str__(self) -> str:
        state = "started" if self.started else "already running"
        models = "; ".join(f"{name}: {state}" for name, state in self.models.items()) or "no models loaded"
        return f"{self.url} (pid {self.pid}, {state}, log {self.log}; {models})"


def triton_home() -> Path:
    """Where `make setup` unpacked nvidia-pytriton (override with CWTOPS_TRITON_HOME)."""
    default = Path(__file__).resolve().parents[2] / ".triton"  # the checkout: cwtops/serving/ is two folders down
    return Path(os.environ.get("CWTOPS_TRITON_HOME", default))


def _server_dir() -> Path:
    return triton_home() / "pytriton" / "tritonserver"


def _binary() -> Path:
    binary = _server_dir() / "bin" / "tritonserver"
    if not binary.exists():
        raise CwtopsError(f"{binary}: tritonserver not found; run `make setup` (it unpacks nvidia-pytriton into .triton/)")
    return binary


def build_backends(target: Path) -> Path:
    """`python/` (Triton's Python backend + the stub for this Python) and `onnxruntime/model.py`."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = _server_dir() / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise CwtopsError(f"{stub}: no Triton Python-backend stub for Python {version}; run cwtops with Python 3.11")
    python_dir, ort_dir = target / "python", target / "onnxruntime"
    python_dir.mkdir(parents=True, exist_ok=True)
    ort_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _install(_server_dir() / "backends" / "python" / name, python_dir / name)
    _install(stub, python_dir / stub.name)
    _install(BACKEND_SOURCE, ort_dir / "model.py")
    _install(BACKEND_SOURCE.with_name("inference_log.py"), ort_dir / "inference_log.py")  # model.py loads it
    return target


def _install(source: Path, target: Path) -> None:
    """Copy beside `target`, then rename over it. A backend stub still running from the old file (a
    Triton killed a moment ago) keeps its inode; writing into that busy file fails (ETXTBSY)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copy2(source, tmp)
    os.replace(tmp, target)


def server_environment() -> dict[str, str]:
    """tritonserver's libraries, and this Python environment first on PATH for the backend stub.

    The stub embeds the `python3` it finds on PATH, so that interpreter's venv (and its
    onnxruntime and numpy) is what the backend imports; PYTHONHOME/PYTHONPATH would override it.
    """
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONHOME", "PYTHONPATH", API_KEY_ENV)}
    libs = str(triton_home() / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")))
    return env


def models_on_disk(repository: Path) -> list[str]:
    """Models with a config.pbtxt and at least one numeric version folder (staging copies aside)."""
    if not repository.is_dir():
        return []
    return sorted(
        folder.name for folder in repository.iterdir()
        if MODEL_NAME.match(folder.name) and not folder.name.endswith(STAGING_SUFFIX) and (folder / "config.pbtxt").is_file()
        and any(version.is_dir() and version.name.isdigit() for version in folder.iterdir())
    )


def repository_location(params: Params) -> tuple[str, list[str]]:
    """Triton's `--model-repository` value and the models in it to load at start.

    A folder is created when absent; `s3://bucket/prefix` becomes Triton's own spelling with the
    endpoint from the environment (cwtops.core.s3.triton_url), after checking that the bucket answers.
    """
    location = params.triton.model_repository
    if location.startswith("s3://"):
        from cwtops.core import s3

        repository = s3.S3ModelRepository(location)
        s3.check_bucket(repository.location, repository.s3)
        repository.ensure_exists()
        return s3.triton_url(repository.location), repository.models(STAGING_SUFFIX)
    folder = Path(location).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder), models_on_disk(folder)


def _ports(params: Params, http_port: int | None, grpc_port: int | None, metrics_port: int | None) -> dict[str, int]:
    cfg = params.triton
    return {"http": http_port or cfg.http_port, "grpc": grpc_port or cfg.grpc_port, "metrics": metrics_port or cfg.metrics_port}


def _command(params: Params, ports: dict[str, int], repository: str, models: list[str], backends: Path) -> list[str]:
    host = params.triton.host
    command = [
        str(_binary()), f"--model-repository={repository}", f"--backend-directory={backends}",
        "--model-control-mode=explicit",
        f"--http-address={host}", f"--http-port={ports['http']}",
        f"--grpc-address={host}", f"--grpc-port={ports['grpc']}",
        f"--metrics-address={host}", f"--metrics-port={ports['metrics']}",
        # a model that fails to load is reported by `status`; it must not keep the others down
        "--exit-on-error=false", "--strict-readiness=false", "--exit-timeout-secs=15", "--log-verbose=0",
    ]
    command += [f"--load-model={name}" for name in models]
    key = api_key(create=True)  # locked by default: a key of this checkout's own when none is given
    command.append(f"--http-restricted-api={RESTRICTED_APIS}:{API_KEY_HEADER}={key}")
    command.append(f"--grpc-restricted-protocol={RESTRICTED_APIS}:{API_KEY_HEADER}={key}")
    return command


def _record_file() -> Path:
    return TRITON.folder / "server.json"


def _recorded_url() -> str | None:
    """The URL of the server this state directory started, while it runs."""
    if TRITON.pid() is None:
        return None
    try:
        return json.loads(_record_file().read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


def http_url(params: Params, port: int | None = None) -> str:
    """host:port of the HTTP endpoint: an explicit port, else the running server's, else params."""
    if port is not None:
        return f"{params.triton.host}:{port}"
    return _recorded_url() or f"{params.triton.host}:{params.triton.http_port}"


def is_ready(url: str) -> bool:
    return http_ok(f"http://{url}/v2/health/ready")


def model_states(url: str) -> dict[str, str]:
    """Per model in the repository index: its READY versions and any version that failed to load."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    try:
        client = httpclient.InferenceServerClient(url.removeprefix("http://"), connection_timeout=120.0, network_timeout=120.0)
        index = client.get_model_repository_index(headers=admin_headers())
    except InferenceServerException as error:
        return {"(repository index)": f"unavailable: {error.message()}"}
    ready: dict[str, list[int]] = {}
    failed: dict[str, list[str]] = {}
    for entry in index:
        name, version, state = entry.get("name", "?"), entry.get("version", ""), entry.get("state", "")
        if state == "READY" and version.isdigit():
            ready.setdefault(name, []).append(int(version))
        elif state == "UNAVAILABLE" and entry.get("reason", "unloaded") != "unloaded":
            failed.setdefault(name, []).append(f"version {version or '?'} failed: {entry['reason']}")
    return {name: "; ".join(([f"READY versions {sorted(ready[name])}"] if name in ready else []) + failed.get(name, []))
            for name in sorted(set(ready) | set(failed))}


def start(params: Params, wait: float = 60.0, *, http_port: int | None = None, grpc_port: int | None = None,
          metrics_port: int | None = None) -> ServerInfo:
    """Start tritonserver and wait until it is ready; a running one is reported, not restarted."""
    ports = _ports(params, http_port, grpc_port, metrics_port)
    url = http_url(params, ports["http"])
    running = TRITON.pid()  # None also when the PID file is stale (it is removed)
    if running is not None:
        url = _recorded_url() or url
        _wait_ready(url, running, wait)
        return ServerInfo(url, running, False, str(TRITON.log_file), model_states(url))
    if is_ready(url):  # one this state directory did not start (another checkout, a container): use it
        return ServerInfo(url, None, False, f"(not started from {state_dir()})", model_states(url))
    repository, models = repository_location(params)
    backends = build_backends((state_dir() / "triton" / "backends").resolve())
    pid = TRITON.launch(_command(params, ports, repository, models, backends), server_environment())
    _record_file().write_text(json.dumps({"url": url, "ports": ports, "repository": repository, "pid": pid}))
    try:
        _wait_ready(url, pid, wait)
    except CwtopsError:
        stop(params)
        raise
    return ServerInfo(url, pid, True, str(TRITON.log_file), model_states(url))


def _wait_ready(url: str, pid: int, timeout: float) -> None:
    TRITON.wait_healthy(lambda: is_ready(url), timeout, pid)


def stop(params: Params, timeout: float = 30.0) -> bool:
    """Stop the server this state directory started (SIGTERM, then SIGKILL); False when none was running."""
    pid = TRITON.pid()
    _record_file().unlink(missing_ok=True)
    if pid is None:
        return False
    # its own session: the backend stubs get the signal too, and any that outlives the server is killed;
    # Triton drains in-flight requests first (--exit-timeout-secs)
    stop_group(pid, timeout)
    TRITON.pid_file.unlink(missing_ok=True)
    return True


def status(params: Params, http_port: int | None = None) -> dict:
    """URL, readiness, PID, log file and the models' states."""
    url = http_url(params, http_port)
    ready = is_ready(url)
    return {"url": url, "ready": ready, "pid": TRITON.pid(), "log": str(TRITON.log_file), "models": model_states(url) if ready else {}}

"""A real local Triton Inference Server (2.51, from the nvidia-pytriton wheel in `.triton/`).

The wheel has no native ONNX Runtime backend, so start-up assembles a backend directory with
Triton's Python backend and a Python-based backend named `onnxruntime`
(tasks/triton_backend/model.py): every model whose config says `platform: "onnxruntime_onnx"`
loads through it, the same config.pbtxt the NGC container serves natively. The server binds to
127.0.0.1, runs with explicit model control, and loads at start every model whose version
folders are already in the repository (so a restarted server serves what was published).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tasks.config import Params
from tasks.errors import CwtopsError
from tasks.services import Service, http_ok, state_dir

TRITON = Service("triton")
API_KEY_ENV = "CWTOPS_TRITON_API_KEY"
API_KEY_HEADER = "cwtops-api-key"
BACKEND_SOURCE = Path(__file__).parent / "triton_backend" / "model.py"


@dataclass(frozen=True)
class ServerInfo:
    url: str
    pid: int | None
    started: bool
    log: str

    def __str__(self) -> str:
        return f"{self.url} (pid {self.pid}, {'started' if self.started else 'already running'}, log {self.log})"


def triton_home() -> Path:
    """Where `make setup` unpacked nvidia-pytriton (override with CWTOPS_TRITON_HOME)."""
    default = Path(__file__).resolve().parent.parent / ".triton"
    return Path(os.environ.get("CWTOPS_TRITON_HOME", default))


def _binary() -> Path:
    binary = triton_home() / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not binary.exists():
        raise CwtopsError(f"{binary}: tritonserver not found; run `make setup` (it unpacks nvidia-pytriton into .triton/)")
    return binary


def build_backends(target: Path) -> Path:
    """`python/` (Triton's Python backend + the stub for this Python) and `onnxruntime/model.py`."""
    server = triton_home() / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    python_dir, ort_dir = target / "python", target / "onnxruntime"
    python_dir.mkdir(parents=True, exist_ok=True)
    ort_dir.mkdir(parents=True, exist_ok=True)
    for item in (server / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, python_dir / item.name)
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise CwtopsError(f"{stub}: no Triton Python-backend stub for Python {version}; use Python 3.11")
    shutil.copy2(stub, python_dir / stub.name)
    shutil.copy2(BACKEND_SOURCE, ort_dir / "model.py")
    return target


def _env() -> dict[str, str]:
    env = dict(os.environ)
    libs = str(triton_home() / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, env.get("LD_LIBRARY_PATH", "")) if p)
    # The Python-backend stub is built against NumPy 1.x and takes its packages from the first
    # `python3` on PATH: a venv of its own (made by `make setup`) with numpy<2 and onnxruntime.
    stub_venv = triton_home() / "venv"
    if not (stub_venv / "bin" / "python3").exists():
        raise CwtopsError(f"{stub_venv}: the Triton backend's environment is missing; run `make setup`")
    env["PATH"] = str(stub_venv / "bin") + os.pathsep + env.get("PATH", "")
    for variable in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(variable, None)
    return env


def http_url(params: Params, port: int | None = None) -> str:
    return f"{params.triton.host}:{port or params.triton.http_port}"


def _models_on_disk(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return sorted(
        d.name for d in repository.iterdir()
        if (d / "config.pbtxt").exists() and any(v.is_dir() and v.name.isdigit() for v in d.iterdir())
    )


def start(params: Params, http_port: int | None = None, grpc_port: int | None = None, metrics_port: int | None = None, wait: float = 120.0) -> ServerInfo:
    """Start tritonserver unless it already answers; wait for readiness."""
    cfg = params.triton
    url = http_url(params, http_port)
    if http_ok(f"http://{url}/v2/health/ready"):
        return ServerInfo(url, TRITON.pid(), False, str(TRITON.log_file))
    repository = Path(cfg.model_repository).resolve()
    repository.mkdir(parents=True, exist_ok=True)
    backends = build_backends(state_dir() / "triton" / "backends")
    command = [
        str(_binary()),
        f"--model-repository={repository}", f"--backend-directory={backends.resolve()}",
        "--model-control-mode=explicit",
        f"--http-address={cfg.host}", f"--http-port={http_port or cfg.http_port}",
        f"--grpc-address={cfg.host}", f"--grpc-port={grpc_port or cfg.grpc_port}",
        f"--metrics-address={cfg.host}", f"--metrics-port={metrics_port or cfg.metrics_port}",
        "--exit-on-error=false", "--strict-readiness=false", "--log-verbose=0",
    ]
    command += [f"--load-model={name}" for name in _models_on_disk(repository)]
    if os.environ.get(API_KEY_ENV):
        command.append(f"--http-restricted-api=model-repository:{API_KEY_HEADER}={os.environ[API_KEY_ENV]}")
    pid = TRITON.launch(command, _env())
    TRITON.wait_healthy(lambda: http_ok(f"http://{url}/v2/health/ready"), wait)
    return ServerInfo(url, pid, True, str(TRITON.log_file))


def stop(params: Params) -> bool:
    return TRITON.stop()


def status(params: Params, http_port: int | None = None) -> dict:
    url = http_url(params, http_port)
    return {"url": url, "ready": http_ok(f"http://{url}/v2/health/ready"), "pid": TRITON.pid(), "log": str(TRITON.log_file)}

"""Shared fixtures: a small real project (git + DVC), real MLflow and Triton servers on free ports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.scratch import ROOT, SMALL_COUNTS, free_port, make_project, staged_params  # noqa: F401 - tests import it from here
from bench.scratch import small_params as _small_params

BIN = Path(sys.executable).parent


def run(command: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env or os.environ.copy(), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def small_params(mlflow_port: int, triton_ports: tuple[int, int, int]) -> dict:
    params = _small_params()
    params["mlflow"]["port"] = mlflow_port
    params["triton"].update({"http_port": triton_ports[0], "grpc_port": triton_ports[1], "metrics_port": triton_ports[2]})
    # The shared test project logs no traffic: the fuzz and fault tests send signals nothing was trained
    # on, and a drift pass of some `cwtops serve` would start retraining under another test. The
    # production-loop tests turn logging on in a params file of their own.
    params["monitoring"]["sample_rate"] = 0.0
    return params


@pytest.fixture(scope="session")
def services_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Environment for subprocesses: isolated state dir and this venv's bin first on PATH."""
    state = tmp_path_factory.mktemp("state")
    env = os.environ.copy()
    env["CWTOPS_STATE_DIR"] = str(state)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env["CWTOPS_TRITON_HOME"] = str(ROOT / ".triton")
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory, services_env: dict) -> Path:
    """A small initialised project (sample data with fewer signals, generated weights, DVC)."""
    root = make_project(tmp_path_factory.mktemp("project"))
    params = small_params(free_port(), (free_port(), free_port(), free_port()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code = (
        "from cwtops.data.signals import write_sample_dataset; "
        f"write_sample_dataset('data/raw', seed=42, counts={SMALL_COUNTS!r})"
    )
    run([sys.executable, "-c", code], root, services_env)
    run([str(BIN / "cwtops"), "init"], root, services_env)
    return root


@pytest.fixture(scope="session")
def mlflow_server(project: Path, services_env: dict) -> str:
    run([str(BIN / "cwtops"), "mlflow", "start"], project, services_env, timeout=180)
    params = yaml.safe_load((project / "params.yaml").read_text())
    yield f"http://127.0.0.1:{params['mlflow']['port']}"
    run([str(BIN / "cwtops"), "mlflow", "stop"], project, services_env, check=False)


@pytest.fixture(scope="session")
def triton_server(project: Path, services_env: dict) -> str:
    run([str(BIN / "cwtops"), "triton", "start"], project, services_env, timeout=180)
    params = yaml.safe_load((project / "params.yaml").read_text())
    yield f"127.0.0.1:{params['triton']['http_port']}"
    run([str(BIN / "cwtops"), "triton", "stop"], project, services_env, check=False)


@pytest.fixture(scope="session")
def built_project(project: Path, services_env: dict, mlflow_server: str) -> Path:
    """The project after one full `dvc repro` (every stage, MLflow tracking included)."""
    run([str(BIN / "dvc"), "repro"], project, services_env, timeout=1200)
    return project


@pytest.fixture()
def in_project(built_project: Path, services_env: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in-process code from inside the built project, with its environment."""
    monkeypatch.chdir(built_project)
    for key in ("CWTOPS_STATE_DIR", "CWTOPS_TRITON_HOME", "PATH"):
        monkeypatch.setenv(key, services_env[key])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return built_project


@pytest.fixture(scope="session")
def harness():
    """A temporary Prefect API (its own database) for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def params(in_project: Path):
    """The built project's params, loaded from inside it."""
    from cwtops.core.config import load_params

    return load_params()


def new_version(params) -> int:
    """A new registry version: a new tracked run of the same artifacts, registered (what a retrain gives)."""
    from cwtops.registry.versions import register
    from tasks.track import run as track_run

    track_run(params.mlflow, params.base)
    return register(params).version


@contextlib.contextmanager
def webhook_receiver(params, params_file: Path, secret: str):  # noqa: ANN201 - a context manager
    """The MLflow webhook and its receiver, as `cwtops serve` runs them, for the block only: both are
    removed after it, so a later test's promotion is not rolled out by this test's receiver."""
    import time

    from cwtops.registry.server import tracking_uri
    from flows.serve import register_mlflow_webhook, start_receiver
    from mlflow import MlflowClient

    cfg = params.rollout
    server = start_receiver(params, str(params_file), secret)
    hook = register_mlflow_webhook(params, f"http://{cfg.webhook_host}:{cfg.webhook_port}/mlflow/webhook", secret)
    try:
        time.sleep(3)  # the server caches its webhook list for MLFLOW_WEBHOOK_CACHE_TTL seconds
        yield
    finally:
        MlflowClient(tracking_uri=tracking_uri(params.mlflow)).delete_webhook(hook)
        server.stop()


def wait_served(params, version: int, timeout: float, url: str | None = None) -> float:
    """Seconds until Triton serves `version` (a server that is restarting counts as not yet)."""
    import time

    from cwtops.serving.publish import served_version

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if served_version(params, url) == version:
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 - Triton may be starting
            pass
        time.sleep(0.25)
    raise AssertionError(f"Triton did not serve version {version} within {timeout} s")

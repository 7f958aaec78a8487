"""The deployments as a team runs them: a Prefect server, a process work pool, `prefect deploy --all`
from this repository's prefect.yaml, and `prefect worker start` executing the runs.

A triggered nightly run executes on the worker to the end (a new registered version); the
reconcile deployment, run by the worker, makes Triton serve the promoted version. A worker killed
(with its flow-run process) while the train stage runs leaves the last good outputs in place,
and the next run completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from bench.scratch import ROOT
from tests.conftest import BIN, free_port, run

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 900  # seconds for one flow run on 2 busy cores (a retrain included)


@contextlib.contextmanager
def _process(command: list[str], cwd: Path, env: dict, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{api}/health", timeout=2).ok:
                return
        time.sleep(1)
    raise AssertionError(f"the Prefect server did not answer at {api}:\n{log.read_text()[-3000:]}")


def _trigger(api: str, flow: str, deployment: str) -> str:
    found = requests.get(f"{api}/deployments/name/{flow}/{deployment}", timeout=10)
    assert found.ok, found.text
    deadline = time.monotonic() + 60
    while True:  # a busy server (its SQLite locked by the scheduler and the worker) answers 503: ask again
        created = requests.post(f"{api}/deployments/{found.json()['id']}/create_flow_run", json={}, timeout=10)
        if created.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert created.ok, created.text
    return created.json()["id"]


def _state(api: str, flow_run: str) -> dict:
    answer = requests.get(f"{api}/flow_runs/{flow_run}", timeout=10)
    answer.raise_for_status()
    return answer.json()["state"]


def _wait_final(api: str, flow_run: str, logs: list[Path], timeout: float = RUN_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(api, flow_run)
        if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return state
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run} did not finish in {timeout} s: {_state(api, flow_run)}\n"
                         + "\n".join(log.read_text()[-2000:] for log in logs))


def _task_running(api: str, flow_run: str, name: str) -> bool:
    answer = requests.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run]}}}, timeout=10)
    return answer.ok and any(t["name"] == name and t["state"]["type"] == "RUNNING" for t in answer.json())


def _latest_version(params) -> int:
    from cwtops.registry.versions import list_versions

    return max((int(entry["version"]) for entry in list_versions(params)), default=0)


def test_a_worker_runs_the_deployments_and_a_killed_worker_loses_nothing(in_project: Path, params, mlflow_server: str,
                                                                         triton_server: str, services_env: dict,
                                                                         tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**services_env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "CWTOPS_CHECKOUT": str(in_project), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "10"}
    prefect = str(BIN / "prefect")
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    with _process([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], in_project, env, server_log) as server:
        _wait_healthy(api, server, server_log)
        run([prefect, "work-pool", "create", "cwtops", "--type", "process"], in_project, env, timeout=120)
        run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(ROOT / "prefect.yaml")], in_project, env, timeout=300)

        original = (in_project / "params.yaml").read_text()
        try:
            _worker_runs_then_dies(api, env, in_project, params, triton_server, worker_log)
        finally:
            (in_project / "params.yaml").write_text(original)


def _worker_runs_then_dies(api: str, env: dict, in_project: Path, params, triton_server: str, worker_log: Path) -> None:
    from cwtops.core.artifacts import sha256_file
    from cwtops.registry.versions import promote
    from cwtops.serving.publish import served_version

    prefect = str(BIN / "prefect")
    # 1. the nightly deployment, executed by a worker to the end: a new registered version
    _scale_lr(in_project, 1.1)  # new inputs: the run retrains and registers a new version
    before = _latest_version(params)
    with _process([prefect, "worker", "start", "--pool", "cwtops"], in_project, env, worker_log):
        nightly = _trigger(api, "cwtops-train", "nightly")
        state = _wait_final(api, nightly, [worker_log])
        assert state["type"] == "COMPLETED", (state, worker_log.read_text()[-4000:])
        newer = _latest_version(params)
        assert newer == before + 1
        # 2. promoted (rollout.promotion is manual): the reconcile deployment makes Triton serve it
        promote(params, newer)
        reconcile = _trigger(api, "cwtops-rollout", "reconcile")
        assert _wait_final(api, reconcile, [worker_log])["type"] == "COMPLETED", worker_log.read_text()[-4000:]
        assert served_version(params, triton_server) == newer

    # 3. a worker killed with its run while the train stage works: the last good state stays
    lock_before = (in_project / "dvc.lock").read_text()
    model = in_project / "artifacts" / "train" / "model.pt"
    model_sha = sha256_file(model)
    _scale_lr(in_project, 1.1)  # tune (off: seconds) and train run again, both read train's params: real work to lose
    with _process([prefect, "worker", "start", "--pool", "cwtops"], in_project, env, worker_log) as worker:
        killed = _trigger(api, "cwtops-train", "nightly")
        deadline = time.monotonic() + RUN_TIMEOUT
        while not _task_running(api, killed, "train"):
            assert time.monotonic() < deadline, worker_log.read_text()[-4000:]
            time.sleep(0.5)
        time.sleep(3)  # inside the epochs
        _kill_tree(worker.pid)
    # nothing committed half-way: train and every stage after it are locked as they were; tune, which
    # finished before train started, is recorded with the new params and the same output (the search is off)
    lock_after = yaml.safe_load((in_project / "dvc.lock").read_text())["stages"]
    locked_before = yaml.safe_load(lock_before)["stages"]
    assert {k: v for k, v in lock_after.items() if k != "tune"} == {k: v for k, v in locked_before.items() if k != "tune"}
    assert lock_after["tune"]["outs"] == locked_before["tune"]["outs"]
    assert sha256_file(model) == model_sha  # the last good model, whole
    assert not list((in_project / "artifacts").rglob("*.tmp*")), "a temporary file was left behind"
    assert _latest_version(params) == newer  # nothing registered

    with _process([prefect, "worker", "start", "--pool", "cwtops"], in_project, env, worker_log):
        again = _trigger(api, "cwtops-train", "nightly")
        state = _wait_final(api, again, [worker_log])
    assert state["type"] == "COMPLETED", (state, worker_log.read_text()[-4000:])
    assert _latest_version(params) == newer + 1
    assert sha256_file(model) != model_sha  # retrained with the new learning rate
    status = run([str(BIN / "dvc"), "status", "--json"], in_project, env)
    assert json.loads(status.stdout or "{}") == {}, status.stdout


def _scale_lr(project: Path, factor: float) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"]["lr"] = float(raw["train"]["lr"]) * factor
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _kill_tree(pid: int) -> None:
    """SIGKILL the worker's process group: the worker and the flow-run process it started (a lost machine)."""
    import psutil

    parent = psutil.Process(pid)
    family = [parent, *parent.children(recursive=True)]
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=30)

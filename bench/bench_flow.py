"""Orchestration overhead, `dvc repro` no-op time and rollout latency, on a real scratch project.

One child process (so Prefect reads its API URL before it is imported) does, with real services:
1. starts a Prefect server, MLflow and Triton for a scratch copy of this project;
2. runs the training flow once and compares its wall time with the sum of its steps' own time:
   each stage's own work (the stage function, timed inside the task) plus the register, promote
   and publish tasks (their run times as Prefect records them). The difference is what Prefect
   and DVC's bookkeeping cost;
3. times `dvc repro` when everything is up to date (median of 3);
4. registers a new version, promotes it through MLflow's REST API (what the UI does) and times
   until Triton serves it, through the webhook receiver.
Quick mode uses a small dataset (the test suite's, 25 epochs); full mode the default data and params.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import RESULTS_DIR, print_table, write_json
from bench.scratch import SMALL_COUNTS, free_port, make_project, small_params

OVERHEAD_TARGET = 0.15
NOOP_TARGET_S = 5.0
ROLLOUT_TARGET_S = 15.0
STEP_TASKS = ("register_task", "promote_task", "publish_task")


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="cwtops-bench-flow-") as scratch:
        root = make_project(Path(scratch))
        (root / "params.yaml").write_text(yaml.safe_dump(small_params(small=quick), sort_keys=False))
        out = root / "flow.json"
        env = _child_env(root)
        command = [sys.executable, "-m", "bench.bench_flow", "--child", str(out)] + (["--quick"] if quick else [])
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"flow benchmark child failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    _print(result)
    return result


def _child_env(root: Path) -> dict[str, str]:
    env = os.environ.copy()
    env.update({"CWTOPS_STATE_DIR": str(root / ".cwtops"), "PREFECT_HOME": str(root / ".cwtops" / "prefect"),
                "CWTOPS_PREFECT_PORT": str(free_port()), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.setdefault("CWTOPS_TRITON_HOME", str(Path(".triton").resolve()))
    return env


def _print(result: dict) -> None:
    flow = result["flow"]
    rows = [{"step": name, "seconds": seconds} for name, seconds in flow["steps"].items()]
    rows += [{"step": "sum of steps' own time", "seconds": flow["own_seconds"]},
             {"step": "flow wall time", "seconds": flow["wall_seconds"]}]
    verdict = "holds" if result["holds_overhead"] else "MISSED"
    print_table(f"flow overhead {flow['overhead']:.1%} (target <= {OVERHEAD_TARGET:.0%}: {verdict})", rows, ["step", "seconds"])
    targets = [
        {"check": "flow overhead", "value": f"{flow['overhead']:.1%}", "target": f"<= {OVERHEAD_TARGET:.0%}", "holds": result["holds_overhead"]},
        {"check": "dvc repro no-op", "value": f"{result['dvc_noop_seconds']:.2f} s", "target": f"< {NOOP_TARGET_S:.0f} s", "holds": result["holds_noop"]},
        {"check": "rollout after promotion", "value": f"{result['rollout_seconds']:.2f} s", "target": f"<= {ROLLOUT_TARGET_S:.0f} s", "holds": result["holds_rollout"]},
    ]
    print_table("orchestration, DVC and rollout targets", targets, ["check", "value", "target", "holds"])


# ---------------------------------------------------------------- child process


def child(out: Path, quick: bool) -> None:
    from cwtops.core.config import load_params

    params = load_params("params.yaml")
    prefect = _start_prefect()
    try:
        result = _measure(params, quick)
    finally:
        _stop_services(params, prefect)
    write_json(out, result)


def _start_prefect() -> subprocess.Popen:
    from flows.serve import PREFECT_PORT, _healthy

    url = f"http://127.0.0.1:{PREFECT_PORT}/api"
    state = Path(os.environ["CWTOPS_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "prefect-server.log", "ab")  # noqa: SIM115 - the server outlives this scope
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(PREFECT_PORT)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not _healthy(url):
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"Prefect server did not start; see {log.name}")
        time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = url
    return server


def _stop_services(params: object, prefect: subprocess.Popen) -> None:
    from cwtops.registry import server as tracking
    from cwtops.serving import server as triton_server

    triton_server.stop(params)
    tracking.stop(params.mlflow)
    os.killpg(prefect.pid, signal.SIGTERM)
    prefect.wait(30)


def _measure(params: object, quick: bool) -> dict:
    from cwtops.data.project import init_project
    from cwtops.data.signals import write_sample_dataset
    from cwtops.registry.server import ensure_server
    from cwtops.serving.server import start as start_triton

    if quick:
        write_sample_dataset(params.base.raw_dir, seed=params.base.seed, counts=SMALL_COUNTS)
    list(init_project(params))
    ensure_server(params.mlflow)
    start_triton(params)
    flow = _flow_overhead()
    noop = statistics.median(_timed(["dvc", "repro"]) for _ in range(3))
    rollout = _rollout_latency(params)
    return {
        "quick": quick, "flow": flow, "dvc_noop_seconds": noop, "rollout_seconds": rollout,
        "holds_overhead": flow["overhead"] <= OVERHEAD_TARGET, "holds_noop": noop < NOOP_TARGET_S,
        "holds_rollout": rollout <= ROLLOUT_TARGET_S,
        "holds": flow["overhead"] <= OVERHEAD_TARGET and noop < NOOP_TARGET_S and rollout <= ROLLOUT_TARGET_S,
    }


def _flow_overhead() -> dict:
    from prefect import flow

    from flows.pipeline import train_flow

    flow(name="warm-up")(lambda: None)()  # the API client and the server's first-request costs, paid once
    started = time.perf_counter()
    state = train_flow(params_file=str(Path("params.yaml").resolve()), return_state=True)
    wall = time.perf_counter() - started
    summary = state.result()
    steps = {f"stage {name}": seconds for name, seconds in summary["stage_seconds"].items()}
    steps.update(_task_seconds(state.state_details.flow_run_id))
    own = sum(steps.values())
    return {"wall_seconds": wall, "own_seconds": own, "overhead": wall / own - 1, "steps": steps,
            "stages_run": summary["stages_run"]}


def _task_seconds(flow_run_id: object) -> dict[str, float]:
    """Run time of the non-stage tasks, as Prefect recorded it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    seconds = {run.name.rsplit("-", 1)[0]: run.total_run_time.total_seconds() for run in runs}  # "register_task-a1b"
    return {name: value for name, value in seconds.items() if name in STEP_TASKS}


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    if "Running stage" in done.stdout:
        raise RuntimeError(f"`{' '.join(command)}` re-ran a stage after the flow:\n{done.stdout[-2000:]}")
    return seconds


def _rollout_latency(params: object) -> float:
    """Seconds from setting `production` through MLflow's REST API until Triton serves that version."""
    import secrets

    import requests

    from cwtops.registry.server import tracking_uri
    from cwtops.registry.versions import register
    from cwtops.serving.publish import served_version
    from flows.serve import register_mlflow_webhook, start_receiver
    from tasks.track import run as track_run

    track_run(params.mlflow, params.base)
    newer = register(params).version
    secret = secrets.token_urlsafe(32)
    start_receiver(params, str(Path("params.yaml").resolve()), secret)
    cfg = params.rollout
    register_mlflow_webhook(params, f"http://{cfg.webhook_host}:{cfg.webhook_port}/mlflow/webhook", secret)
    time.sleep(3)  # the MLflow server caches its webhook list for a few seconds
    started = time.monotonic()
    answer = requests.post(f"{tracking_uri(params.mlflow)}/api/2.0/mlflow/registered-models/alias",
                           json={"name": params.base.model_name, "alias": "production", "version": str(newer)}, timeout=10)
    answer.raise_for_status()
    while served_version(params) != newer:
        if time.monotonic() - started > 120:
            raise RuntimeError(f"version {newer} was not served within 120 s of its promotion")
        time.sleep(0.1)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick)
        return
    result = run(args.quick)
    write_json(RESULTS_DIR / "flow.json", result)
    print(f"wrote {RESULTS_DIR / 'flow.json'}")


if __name__ == "__main__":
    main()

"""`cwtops serve`: Prefect server + deployments, the MLflow webhook and its receiver, in one command.

- Prefect: joins PREFECT_API_URL when set, else starts a local server on 127.0.0.1.
- Deployments (served by this process): those prefect.yaml lists, the one place they are written
  (nightly retraining, also started by the drift event; the rollout reconciler every minute; the monitor
  pass every 5 minutes; flows/deployments.py reads them).
- Webhook: MLflow calls the receiver when an alias is set or removed; a verified change of the
  `production` or `challenger` alias of the registered model runs the rollout flow at once (the
  schedule is the safety net).
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import requests

from cwtops.core.config import DEFAULT_PARAMS, Params, load_params
from cwtops.core.errors import CwtopsError
from cwtops.core.waiting import wait_until
from cwtops.services.processes import state_dir
from cwtops.serving.webhook import EVENTS, PATH, WebhookServer, WebhookVerifier, make_app

log = logging.getLogger(__name__)
WEBHOOK_NAME = "cwtops-rollout"
PREFECT_PORT = int(os.environ.get("CWTOPS_PREFECT_PORT", "4200"))
SHUTDOWN_SECONDS = 10.0  # SIGTERM or Ctrl-C to exit, whatever else is down


def ensure_prefect_server(timeout: float = 90.0) -> str:
    """PREFECT_API_URL if set; else start `prefect server start` on 127.0.0.1 and wait for health."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    url = f"http://127.0.0.1:{PREFECT_PORT}/api"
    if not _healthy(url):
        logs = state_dir() / "prefect"
        logs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(PREFECT_PORT)]
        # The scheduler turns interval schedules into runs; its default 60 s loop would add up to a
        # minute before the reconciler's first run. A local server can afford to look every 10 s.
        env = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "10", **os.environ}
        with open(logs / "server.log", "ab") as out:
            subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        if not wait_until(lambda: _healthy(url), timeout, interval=1.0):
            raise CwtopsError(f"Prefect server did not become healthy at {url}; see {logs / 'server.log'}")
    os.environ["PREFECT_API_URL"] = url
    return url


def _healthy(api_url: str) -> bool:
    try:
        return requests.get(f"{api_url}/health", timeout=2).ok
    except requests.RequestException:
        return False


def register_mlflow_webhook(params: Params, receiver_url: str, secret: str) -> str:
    """Create or update the MLflow webhook that calls our receiver when an alias is set or removed."""
    from cwtops.registry.server import ensure_server
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ensure_server(params.mlflow))
    for hook in client.list_webhooks():
        if hook.name == WEBHOOK_NAME:
            client.update_webhook(hook.webhook_id, url=receiver_url, secret=secret, events=list(EVENTS), status="ACTIVE")
            return hook.webhook_id
    hook = client.create_webhook(name=WEBHOOK_NAME, url=receiver_url, events=list(EVENTS), secret=secret)
    return hook.webhook_id


def start_receiver(params: Params, params_file: str, secret: str) -> WebhookServer:
    """The webhook receiver, listening on rollout.webhook_host:webhook_port when this returns."""
    from flows.rollout import rollout_flow

    def on_promotion(payload: dict) -> None:
        data = payload.get("data", {})
        log.info("alias %s %s (version %s); reconciling", data.get("alias"), payload.get("action"), data.get("version"))
        rollout_flow(params_file=params_file)

    cfg = params.rollout
    app = make_app(WebhookVerifier(secret), params.base.model_name, on_promotion)
    return WebhookServer(app, cfg.webhook_host, cfg.webhook_port).start()


def _converge_once(rollout_flow: object, params_file: str) -> None:
    """Bring Triton in line at start-up, before the first scheduled pass (a restart must not wait)."""
    try:
        outcome = rollout_flow(params_file=params_file)
        print(f"rollout at start-up: {outcome['action']}, serving version {outcome['served']}")
    except Exception as error:  # noqa: BLE001 - the schedule retries; serving must start regardless
        print(f"rollout at start-up failed ({error}); the reconciler retries every minute")


def serve(params_file: str = str(DEFAULT_PARAMS), webhook: bool = True) -> None:
    """Run everything until interrupted."""
    import signal

    from cwtops.registry.server import ensure_server
    from cwtops.serving.server import start as start_triton

    def stop_during_start_up(signum: int, frame: object) -> None:
        # SIGTERM before the runner takes it over (serve_deployments): nothing is served yet, so leave
        # now, and within the bound even if a retrying call below swallows the exit
        print("cwtops serve: stopped during start-up", file=sys.stderr, flush=True)
        exit_within(SHUTDOWN_SECONDS, "stopped during start-up")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop_during_start_up)
    params = load_params(params_file)
    print(f"Prefect API: {ensure_prefect_server()}")  # before Prefect is imported: it reads the URL once
    from flows.deployments import runner_deployments
    from flows.rollout import rollout_flow

    print(f"MLflow: {ensure_server(params.mlflow)}")
    start_triton(params)
    if webhook:
        secret = os.environ.get("CWTOPS_WEBHOOK_SECRET") or secrets.token_urlsafe(32)
        start_receiver(params, params_file, secret)
        cfg = params.rollout
        receiver = f"http://{cfg.webhook_host}:{cfg.webhook_port}{PATH}"
        register_mlflow_webhook(params, receiver, secret)
        print(f"webhook receiver: {receiver}")
    absolute = str(Path(params_file).resolve())
    _converge_once(rollout_flow, absolute)
    serve_deployments(*runner_deployments(absolute))


def exit_within(seconds: float, reason: str) -> threading.Timer:
    """Leave the process after `seconds` whatever its shutdown is waiting on, saying what was left."""

    def leave() -> None:
        print(f"cwtops serve: not stopped cleanly within {seconds:.0f} s: {reason}; exiting anyway", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()
    return timer


def serve_deployments(*deployments: object) -> None:
    """What `prefect.serve` does, with a shutdown that ends within SHUTDOWN_SECONDS of SIGTERM or
    Ctrl-C. Prefect's runner stops gracefully by pausing the deployments' schedules through the
    API; with the Prefect server gone those calls wait and retry for minutes. Past the bound the
    process exits, naming what it could not clean up."""
    import asyncio
    import signal

    from prefect.runner import Runner

    api = os.environ.get("PREFECT_API_URL", "the Prefect API")
    reason = (f"could not pause the deployments' schedules at {api} (is the Prefect server down?); they run again "
              "when `cwtops serve` starts, or pause them in the Prefect UI")

    stopping = threading.Event()

    class BoundedRunner(Runner):
        def handle_sigterm(self, *args: object, **kwargs: object) -> None:
            stopping.set()
            exit_within(SHUTDOWN_SECONDS, reason)
            super().handle_sigterm(*args, **kwargs)

    def on_interrupt(signum: int, frame: object) -> None:
        stopping.set()
        exit_within(SHUTDOWN_SECONDS, reason)
        raise KeyboardInterrupt

    runner = BoundedRunner(pause_on_shutdown=True)
    for deployment in deployments:
        runner.add_deployment(deployment)
    print("serving deployments: " + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments), flush=True)
    signal.signal(signal.SIGINT, on_interrupt)  # asyncio.run keeps a handler it did not install
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        log.info("interrupted; shutting down")
    except Exception as error:
        if not stopping.is_set():
            raise
        # the pause failed at once (connection refused) rather than waiting out the bound
        print(f"cwtops serve: not stopped cleanly: {reason} ({type(error).__name__}: {error}); exiting",
              file=sys.stderr, flush=True)
        sys.exit(1)

"""Receiver for MLflow's registry webhooks: HMAC-verified, replay-protected, then a rollout.

MLflow (>= 3.3, SQL backend) signs `"{delivery_id}.{timestamp}.{body}"` with HMAC-SHA256 and
sends `X-MLflow-Signature: v1,<base64>`, `X-MLflow-Timestamp` (unix seconds) and
`X-MLflow-Delivery-Id`. A request outside the replay window, seen before, or not signed with
our secret is rejected and starts nothing. The receiver is a FastAPI app (`make_app`) served by
uvicorn on a daemon thread (`WebhookServer`), leaving the process's signal handling alone.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from typing import Self

import uvicorn
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cwtops.core.errors import CwtopsError
from cwtops.core.waiting import wait_until

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
PATH = "/mlflow/webhook"
MAX_BODY = 64 * 1024


class WebhookRejected(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """MLflow's signature of one delivery (the same function verifies it)."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookVerifier:
    """Checks signature, timestamp window and delivery-id uniqueness."""

    def __init__(self, secret: str, window_seconds: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("a webhook secret is required (set CWTOPS_WEBHOOK_SECRET)")
        self._secret = secret
        self._window = window_seconds
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def verify(self, headers: Mapping[str, str], body: bytes) -> dict:
        delivery_id = headers.get(DELIVERY_HEADER, "")
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        if not (delivery_id and timestamp and signature):
            raise WebhookRejected(HTTPStatus.UNAUTHORIZED, "missing signature, timestamp or delivery id")
        expected = sign(self._secret, delivery_id, timestamp, body.decode("utf-8", "replace"))
        if not hmac.compare_digest(expected, signature):
            raise WebhookRejected(HTTPStatus.UNAUTHORIZED, "bad signature")
        try:
            age = self._clock() - int(timestamp)
        except ValueError:
            raise WebhookRejected(HTTPStatus.BAD_REQUEST, "timestamp is not unix seconds") from None
        if abs(age) > self._window:
            raise WebhookRejected(HTTPStatus.UNAUTHORIZED, f"timestamp outside the {self._window:.0f} s window")
        with self._lock:
            now = self._clock()
            self._seen = {k: t for k, t in self._seen.items() if now - t <= 2 * self._window}
            if delivery_id in self._seen:
                raise WebhookRejected(HTTPStatus.CONFLICT, "replayed delivery id")
            self._seen[delivery_id] = now
        try:
            payload = json.loads(body)
        except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
            raise WebhookRejected(HTTPStatus.BAD_REQUEST, "body is not JSON") from None
        if not isinstance(payload, dict):
            raise WebhookRejected(HTTPStatus.BAD_REQUEST, "body is not a JSON object")
        return payload


SERVED_ALIASES = ("production", "challenger")  # the aliases whose changes the rollout follows
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")  # what the MLflow webhook subscribes to


def is_promotion(payload: dict, model_name: str, aliases: tuple[str, ...] = SERVED_ALIASES) -> bool:
    """An alias that decides what Triton serves was set on, or removed from, a version of our model."""
    data = payload.get("data") or {}
    return (
        payload.get("entity") == "model_version_alias"
        and payload.get("action") in ("created", "deleted")
        and data.get("name") == model_name
        and data.get("alias") in aliases
    )


def make_app(verifier: WebhookVerifier, model_name: str, on_promotion: Callable[[dict], None]) -> FastAPI:
    """An app whose POST /mlflow/webhook verifies, answers at once, then acts."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # no route but PATH

    @app.exception_handler(HTTPException)
    async def unrouted(request: Request, error: HTTPException) -> JSONResponse:
        message = "unknown path" if error.status_code == HTTPStatus.NOT_FOUND else str(error.detail).lower()
        return _answer(error.status_code, message)

    @app.post(PATH)
    async def receive(request: Request, background: BackgroundTasks) -> JSONResponse:
        body = await _read_body(request)
        if body is None:
            return _answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
        try:
            payload = verifier.verify(request.headers, body)
        except WebhookRejected as rejected:
            log.warning("webhook rejected: %s", rejected)
            return _answer(rejected.status, str(rejected))
        if not is_promotion(payload, model_name):
            return _answer(HTTPStatus.OK, "ignored")
        # MLflow delivers fire-and-forget: answer first, roll out in the background. The rollout
        # blocks for seconds, so it gets its own daemon thread: as a sync background task it would
        # hold a worker of the shared thread pool and keep this request's task open, so stop()
        # would wait for it.
        background.add_task(_start_thread, on_promotion, payload)
        return _answer(HTTPStatus.ACCEPTED, "accepted")

    return app


async def _read_body(request: Request) -> bytes | None:
    """The body, or None when it is over MAX_BODY (declared or actually sent)."""
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None  # refused before a byte of it is read
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:  # a chunked body, or one longer than it said
            return None
    return bytes(body)


def _answer(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": message}, status_code=status)


async def _start_thread(target: Callable[[dict], None], payload: dict) -> None:
    threading.Thread(target=target, args=(payload,), name="webhook-rollout", daemon=True).start()


class _ThreadServer(uvicorn.Server):
    """uvicorn's server without its SIGINT/SIGTERM handlers: the process owns its signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebhookServer:
    """An ASGI app served by uvicorn on a daemon thread: `start()` returns once it is listening."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port  # the bound port once started (port 0 picks a free one)
        config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="off", timeout_graceful_shutdown=2)
        self._server = _ThreadServer(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{PATH}"

    def start(self, timeout: float = 10.0) -> Self:
        # Bound here, not by uvicorn: a port in use is an error in the caller, not a log line and
        # a thread that quietly ends.
        sock = self._bind()
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="webhook", daemon=True)
        self._thread.start()
        thread = self._thread
        wait_until(lambda: self._server.started or not thread.is_alive(), timeout, interval=0.01)
        if not self._server.started:
            self.stop()
            sock.close()
            raise CwtopsError(f"webhook receiver did not start on {self.host}:{self.port}; see the log above")
        log.info("webhook receiver listening on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let answers in progress finish (2 s at most), and end the thread."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(1.0)

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            return socket.create_server((self.host, self.port), family=family)
        except OSError as error:
            hint = ("; is another `cwtops serve` running? Set rollout.webhook_port to a free port"
                    if error.errno == errno.EADDRINUSE else "")
            raise CwtopsError(f"webhook receiver cannot listen on {self.host}:{self.port}: {error.strerror or error}{hint}") from error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

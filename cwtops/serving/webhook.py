"""Receiver for MLflow's registry webhooks: HMAC-verified, replay-protected, then a rollout.

MLflow (>= 3.3, SQL backend) signs `"{delivery_id}.{timestamp}.{body}"` with HMAC-SHA256 and
sends `X-MLflow-Signature: v1,<base64>`, `X-MLflow-Timestamp` (unix seconds) and
`X-MLflow-Delivery-Id`. A request outside the replay window, seen before, or not signed with
our secret is rejected and starts nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

    def verify(self, headers: dict[str, str], body: bytes) -> dict:
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
            return json.loads(body)
        except json.JSONDecodeError:
            raise WebhookRejected(HTTPStatus.BAD_REQUEST, "body is not JSON") from None


def is_promotion(payload: dict, model_name: str, alias: str = "production") -> bool:
    data = payload.get("data") or {}
    return (
        payload.get("entity") == "model_version_alias"
        and payload.get("action") == "created"
        and data.get("name") == model_name
        and data.get("alias") == alias
    )


def make_server(
    host: str, port: int, verifier: WebhookVerifier, model_name: str, on_promotion: Callable[[dict], None]
) -> ThreadingHTTPServer:
    """An HTTP server whose POST /mlflow/webhook verifies, answers at once, then acts."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            if self.path != PATH:
                self._answer(HTTPStatus.NOT_FOUND, "unknown path")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large")
                return
            body = self.rfile.read(length)
            try:
                payload = verifier.verify(dict(self.headers.items()), body)
            except WebhookRejected as rejected:
                log.warning("webhook rejected: %s", rejected)
                self._answer(rejected.status, str(rejected))
                return
            relevant = is_promotion(payload, model_name)
            self._answer(HTTPStatus.ACCEPTED if relevant else HTTPStatus.OK, "accepted" if relevant else "ignored")
            if relevant:
                # MLflow delivers fire-and-forget: answer first, roll out in the background.
                threading.Thread(target=on_promotion, args=(payload,), daemon=True).start()

        def _answer(self, status: HTTPStatus, message: str) -> None:
            data = json.dumps({"status": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.info("webhook %s", format % args)

    return ThreadingHTTPServer((host, port), Handler)

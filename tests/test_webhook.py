"""Webhook receiver: only correctly signed, fresh, first-seen promotions start a rollout."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from cwtops.serving.webhook import (
    DELIVERY_HEADER,
    PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookRejected,
    WebhookVerifier,
    is_promotion,
    make_server,
    sign,
)

SECRET = "s3cret-for-tests"
PROMOTION = {"entity": "model_version_alias", "action": "created", "data": {"name": "cwtops", "alias": "production", "version": "3"}}


def signed_headers(body: str, delivery: str = "d-1", timestamp: int | None = None, secret: str = SECRET) -> dict:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {DELIVERY_HEADER: delivery, TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: sign(secret, delivery, stamp, body)}


def test_signature_matches_mlflows_own_signer() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    assert sign(SECRET, "id", "123", "{}") == _generate_hmac_signature(SECRET, "id", "123", "{}")


def test_valid_delivery_is_accepted_once() -> None:
    verifier = WebhookVerifier(SECRET)
    body = json.dumps(PROMOTION)
    assert verifier.verify(signed_headers(body), body.encode()) == PROMOTION
    with pytest.raises(WebhookRejected, match="replayed"):
        verifier.verify(signed_headers(body), body.encode())


@pytest.mark.parametrize(
    "headers_for, reason",
    [
        (lambda body: signed_headers(body, secret="wrong"), "bad signature"),
        (lambda body: signed_headers(body, timestamp=int(time.time()) - 3600), "window"),
        (lambda body: {k: v for k, v in signed_headers(body).items() if k != SIGNATURE_HEADER}, "missing"),
        (lambda body: signed_headers(body + " "), "bad signature"),
    ],
)
def test_bad_deliveries_are_rejected(headers_for, reason: str) -> None:
    body = json.dumps(PROMOTION)
    with pytest.raises(WebhookRejected, match=reason):
        WebhookVerifier(SECRET).verify(headers_for(body), body.encode())


def test_only_production_alias_of_our_model_counts() -> None:
    assert is_promotion(PROMOTION, "cwtops")
    assert not is_promotion(PROMOTION, "other-model")
    assert not is_promotion({**PROMOTION, "data": {**PROMOTION["data"], "alias": "staging"}}, "cwtops")
    assert not is_promotion({**PROMOTION, "action": "deleted"}, "cwtops")


def test_receiver_starts_rollout_only_for_verified_promotions() -> None:
    started: list[dict] = []
    event = threading.Event()

    def on_promotion(payload: dict) -> None:
        started.append(payload)
        event.set()

    server = make_server("127.0.0.1", 0, WebhookVerifier(SECRET), "cwtops", on_promotion)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}{PATH}"
    body = json.dumps(PROMOTION)
    try:
        forged = requests.post(url, data=body, headers=signed_headers(body, secret="nope"), timeout=5)
        assert forged.status_code == 401
        good_headers = signed_headers(body, delivery="d-2")
        assert requests.post(url, data=body, headers=good_headers, timeout=5).status_code == 202
        assert event.wait(5)
        replay = requests.post(url, data=body, headers=good_headers, timeout=5)
        assert replay.status_code == 409
        time.sleep(0.2)
        assert len(started) == 1 and started[0]["data"]["version"] == "3"
    finally:
        server.shutdown()

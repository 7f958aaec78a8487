"""Webhook receiver: only correctly signed, fresh, first-seen promotions start a rollout."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest
import requests

from cwtops.core.errors import CwtopsError
from cwtops.serving.webhook import (
    DELIVERY_HEADER,
    MAX_BODY,
    PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookRejected,
    WebhookServer,
    WebhookVerifier,
    is_promotion,
    make_app,
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


def test_only_the_served_aliases_of_our_model_count() -> None:
    assert is_promotion(PROMOTION, "cwtops")
    assert not is_promotion(PROMOTION, "other-model")
    assert not is_promotion({**PROMOTION, "data": {**PROMOTION["data"], "alias": "staging"}}, "cwtops")
    challenger = {**PROMOTION, "data": {**PROMOTION["data"], "alias": "challenger"}}
    assert is_promotion(challenger, "cwtops")
    assert is_promotion({**challenger, "action": "deleted"}, "cwtops")  # removing it retires its version
    assert not is_promotion({**PROMOTION, "action": "updated"}, "cwtops")
    assert not is_promotion({**PROMOTION, "entity": "model_version_tag"}, "cwtops")


def receiver(on_promotion: Callable[[dict], None] = lambda payload: None, port: int = 0) -> WebhookServer:
    return WebhookServer(make_app(WebhookVerifier(SECRET), "cwtops", on_promotion), "127.0.0.1", port)


def test_receiver_starts_rollout_only_for_verified_promotions() -> None:
    started: list[dict] = []
    event = threading.Event()

    def on_promotion(payload: dict) -> None:
        started.append(payload)
        event.set()

    server = receiver(on_promotion).start()
    url = f"http://127.0.0.1:{server.port}{PATH}"
    body = json.dumps(PROMOTION)
    try:
        forged = requests.post(url, data=body, headers=signed_headers(body, secret="nope"), timeout=5)
        assert forged.status_code == 401
        good_headers = signed_headers(body, delivery="d-2")
        accepted = requests.post(url, data=body, headers=good_headers, timeout=5)
        assert accepted.status_code == 202 and accepted.json() == {"status": "accepted"}
        assert event.wait(5)
        replay = requests.post(url, data=body, headers=good_headers, timeout=5)
        assert replay.status_code == 409
        time.sleep(0.2)
        assert len(started) == 1 and started[0]["data"]["version"] == "3"
    finally:
        server.stop()


def test_receiver_answers_every_other_request_with_its_status() -> None:
    with receiver() as server:
        url = server.url
        other = json.dumps({**PROMOTION, "data": {**PROMOTION["data"], "alias": "staging"}})
        ignored = requests.post(url, data=other, headers=signed_headers(other, delivery="d-3"), timeout=5)
        assert (ignored.status_code, ignored.json()) == (200, {"status": "ignored"})
        garbage = "not json"
        assert requests.post(url, data=garbage, headers=signed_headers(garbage, delivery="d-4"), timeout=5).status_code == 400
        stale = signed_headers(other, delivery="d-5", timestamp=int(time.time()) - 3600)
        assert requests.post(url, data=other, headers=stale, timeout=5).status_code == 401
        bad_stamp = {**signed_headers(other, delivery="d-6", timestamp=0), TIMESTAMP_HEADER: "soon"}
        bad_stamp[SIGNATURE_HEADER] = sign(SECRET, "d-6", "soon", other)
        assert requests.post(url, data=other, headers=bad_stamp, timeout=5).status_code == 400
        elsewhere = requests.post(f"http://127.0.0.1:{server.port}/elsewhere", data=other, timeout=5)
        assert (elsewhere.status_code, elsewhere.json()) == (404, {"status": "unknown path"})
        assert requests.get(f"http://127.0.0.1:{server.port}/docs", timeout=5).status_code == 404
        assert requests.get(url, timeout=5).status_code == 405


def test_receiver_refuses_a_body_over_the_limit_declared_or_sent() -> None:
    with receiver() as server:
        # Declared too large: answered at once, without waiting for a body that never comes.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.putrequest("POST", PATH)
        conn.putheader("Content-Length", str(MAX_BODY + 1))
        conn.endheaders()
        answer = conn.getresponse()
        assert (answer.status, json.loads(answer.read())) == (413, {"status": "body too large"})
        conn.close()
        # Sent chunked, no length declared: counted as it is read.
        chunks = (b"x" * 1024 for _ in range(MAX_BODY // 1024 + 1))
        assert requests.post(server.url, data=chunks, timeout=5).status_code == 413


def test_a_slow_rollout_blocks_neither_answers_nor_stop() -> None:
    release = threading.Event()
    server = receiver(lambda payload: release.wait(30)).start()
    try:
        body = json.dumps(PROMOTION)
        began = time.monotonic()
        with requests.Session() as session:  # one kept-alive connection, as a client may reuse
            assert session.post(server.url, data=body, headers=signed_headers(body, delivery="d-7"), timeout=5).status_code == 202
            other = json.dumps({"entity": "model_version", "action": "created", "data": {}})
            assert session.post(server.url, data=other, headers=signed_headers(other, delivery="d-8"), timeout=5).status_code == 200
        assert time.monotonic() - began < 2
        stopping = time.monotonic()
        server.stop()  # the rollout is still running
        assert time.monotonic() - stopping < 1.5
    finally:
        release.set()
        server.stop()


def test_receiver_keeps_the_process_signal_handlers_and_stops_cleanly() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    server = receiver().start()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    server.stop()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with pytest.raises(requests.ConnectionError):
        requests.post(server.url, data="{}", timeout=2)


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(CwtopsError, match=f"cannot listen on 127.0.0.1:{port}: .*another `cwtops serve`"):
            receiver(port=port).start()

"""Promotion policy (pure decision) and the rollout lock."""

from __future__ import annotations

import threading
import time

from cwtops.core.config import RolloutConfig
from cwtops.registry.promotion import should_promote
from cwtops.serving.rollout import rollout_lock


def test_manual_never_promotes() -> None:
    assert not should_promote(RolloutConfig(promotion="manual"), 0.99, None)


def test_auto_promotes_first_version_and_clear_improvements_only() -> None:
    cfg = RolloutConfig(promotion="auto", margin=0.01)
    assert should_promote(cfg, 0.90, None)
    assert should_promote(cfg, 0.95, 0.93)
    assert not should_promote(cfg, 0.935, 0.93)  # inside the margin
    assert not should_promote(cfg, 0.80, 0.93)


def test_second_rollout_waits_for_the_first(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CWTOPS_STATE_DIR", str(tmp_path))
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with rollout_lock():
            order.append("first-in")
            holding.set()
            time.sleep(0.5)
            order.append("first-out")

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(10)  # the first holds the lock (a fixed sleep raced a loaded machine)
    with rollout_lock(timeout=5):
        order.append("second-in")
    thread.join()
    assert order == ["first-in", "first-out", "second-in"]


def test_a_reconcile_pass_with_mlflow_unreachable_fails_instead_of_reporting_nothing_to_do(tmp_path, monkeypatch) -> None:
    import pytest

    from cwtops.core.config import params_from_dict
    from cwtops.registry.server import TrackingUnreachable
    from cwtops.serving.rollout import reconcile
    from tests.mlflow_fixtures import free_port

    monkeypatch.setenv("CWTOPS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = params_from_dict({"mlflow": {"port": free_port()}})  # nothing listens there
    with pytest.raises(TrackingUnreachable, match="unreachable"):
        reconcile(params)

"""`cwtops serve`'s shutdown without servers: when pausing the schedules fails at once (the
Prefect server refuses the connection) rather than waiting out the bound, it still ends with the
message that names what it could not clean up, not a bare traceback."""

from __future__ import annotations

import httpx
import pytest


class _FakeRunner:
    """Prefect's Runner as far as serve_deployments uses it: SIGTERM arrives while it runs, and its
    shutdown's pause call is refused."""

    refuse = True

    def __init__(self, pause_on_shutdown: bool) -> None:
        assert pause_on_shutdown
        self.added: list[object] = []

    def add_deployment(self, deployment: object) -> None:
        self.added.append(deployment)

    def handle_sigterm(self, *args: object, **kwargs: object) -> None:
        raise SystemExit(0)  # what Runner.handle_sigterm ends with

    async def start(self) -> None:
        try:
            self.handle_sigterm()
        finally:
            if self.refuse:
                raise httpx.ConnectError("All connection attempts failed")


class _Deployment:
    flow_name, name = "cwtops-rollout", "reconcile"


def _serve(monkeypatch: pytest.MonkeyPatch, refuse: bool) -> list[tuple[float, str]]:
    import prefect.runner

    from flows import serve

    bounds: list[tuple[float, str]] = []
    monkeypatch.setattr(prefect.runner, "Runner", type("Runner", (_FakeRunner,), {"refuse": refuse}))
    monkeypatch.setattr(serve, "exit_within", lambda seconds, reason: bounds.append((seconds, reason)))  # no real timer
    monkeypatch.setattr("signal.signal", lambda *args: None)  # leave the test process's handlers alone
    serve.serve_deployments(_Deployment())
    return bounds


def test_a_refused_pause_on_sigterm_exits_1_naming_what_was_left(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        _serve(monkeypatch, refuse=True)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "not stopped cleanly" in err and "Prefect server down" in err and "ConnectError" in err, err


def test_a_clean_stop_on_sigterm_keeps_the_runners_exit(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        _serve(monkeypatch, refuse=False)
    assert stopped.value.code == 0
    assert "not stopped cleanly" not in capsys.readouterr().err

"""The one wait helper and retry policy (cwtops/core/waiting.py), and what counts as a connection failure."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import pytest
import requests

from cwtops.core.waiting import retry, wait_until


def test_wait_until_returns_when_the_condition_holds_or_at_the_deadline() -> None:
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) >= 3, timeout=5, interval=0.01) and len(calls) == 3
    started = time.monotonic()
    assert not wait_until(lambda: False, timeout=0.3, interval=0.05)
    assert 0.25 <= time.monotonic() - started < 2


def test_retry_repeats_only_what_is_worth_it_with_backoff() -> None:
    attempts = []

    def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("down")
        return "up"

    assert retry(flaky, lambda error: isinstance(error, ConnectionError), attempts=3, backoff=0.05) == "up"
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09  # backoff, then twice it
    tried = []
    with pytest.raises(ValueError):
        retry(lambda: tried.append(1) or int("x"), lambda error: isinstance(error, ConnectionError), attempts=3, backoff=0.01)
    assert len(tried) == 1
    with pytest.raises(ConnectionError):
        retry(lambda: (_ for _ in ()).throw(ConnectionError("still down")), lambda e: True, attempts=2, backoff=0.01)


def test_connection_failures_are_found_in_the_exception_chain_not_the_text() -> None:
    from mlflow.exceptions import MlflowException

    from cwtops.registry.server import is_connection_error

    try:
        try:
            raise requests.ConnectionError("refused")
        except requests.ConnectionError as transport:
            raise MlflowException(f"API request failed with exception {transport}")  # noqa: B904 - as MLflow does
    except MlflowException as wrapped:
        assert is_connection_error(wrapped)
    assert not is_connection_error(MlflowException("RESOURCE_DOES_NOT_EXIST: Connection refused is only text here"))
    assert is_connection_error(requests.exceptions.RetryError("too many 503 error responses"))


@contextlib.contextmanager
def _server_with_a_stubborn_child(tmp_path, monkeypatch):  # noqa: ANN202 - a context manager
    """A toy server launched as a Service (its own session) whose child ignores SIGTERM, as a Triton
    backend stub can: (service, server PID, child PID). Whatever is left of the group is killed after."""
    from cwtops.services import processes

    monkeypatch.setenv("CWTOPS_STATE_DIR", str(tmp_path))
    child = tmp_path / "child.pid"
    (tmp_path / "stub.py").write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n")
    (tmp_path / "server.py").write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])\n"
        "time.sleep(600)\n")
    service = processes.Service("toy")
    pid = service.launch([sys.executable, str(tmp_path / "server.py"), str(tmp_path / "stub.py"), str(child)],
                         dict(os.environ))
    try:
        assert wait_until(lambda: child.exists() and child.read_text().strip(), timeout=30, interval=0.05)
        yield service, pid, int(child.read_text())
    finally:  # a failed assertion leaves no orphan behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_stopping_a_server_kills_a_child_that_ignores_sigterm_and_outlives_it(tmp_path, monkeypatch) -> None:
    # stopping the server must not leave the child running as an orphan
    from cwtops.services import processes

    with _server_with_a_stubborn_child(tmp_path, monkeypatch) as (service, pid, stub):
        assert os.getpgid(stub) == pid and sorted(processes.group_alive(pid)) == sorted([pid, stub])
        assert service.stop(timeout=10)
        assert not processes.process_alive(pid) and not processes.process_alive(stub)
        assert processes.group_alive(pid) == [] and service.pid() is None


def test_a_stale_pid_file_reaps_what_its_killed_server_left_running(tmp_path, monkeypatch) -> None:
    # the server is killed (a crash, SIGKILL): its child lives on as an orphan in the server's process
    # group; the next look at the PID file finds it stale, removes it and kills the leftover
    from cwtops.services import processes

    with _server_with_a_stubborn_child(tmp_path, monkeypatch) as (service, pid, stub):
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not processes.process_alive(pid), timeout=10, interval=0.05)
        assert processes.process_alive(stub) and processes.group_alive(pid) == [stub]  # the orphan runs on
        assert service.pid() is None
        assert not service.pid_file.exists()
        assert not processes.process_alive(stub) and processes.group_alive(pid) == []

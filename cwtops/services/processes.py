"""Local background services (MLflow, Triton): PID file, log file, health wait, idempotent start/stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from cwtops.core.errors import CwtopsError
from cwtops.core.waiting import wait_until


def state_dir() -> Path:
    """Where PID and log files live (`CWTOPS_STATE_DIR` isolates tests and parallel checkouts)."""
    return Path(os.environ.get("CWTOPS_STATE_DIR", ".cwtops"))


@dataclass(frozen=True)
class Service:
    name: str

    @property
    def folder(self) -> Path:
        return state_dir() / self.name

    @property
    def pid_file(self) -> Path:
        return self.folder / "server.pid"

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    def pid(self) -> int | None:
        """The running server's PID, or None. A stale PID file (the server died without `stop`: killed,
        crashed) is removed, and whatever the server left running in its process group is killed."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not process_alive(pid):
            reap_group(pid)
            self.pid_file.unlink(missing_ok=True)
            return None
        return pid

    def launch(self, command: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
        self.pid_file.write_text(str(process.pid))
        return process.pid

    def wait_healthy(self, healthy: Callable[[], bool], timeout: float, pid: int | None = None) -> None:
        """Poll `healthy` until it holds; fail fast with the log tail if the process exits."""
        def gone() -> bool:
            return not process_alive(pid) if pid is not None else self.pid() is None

        if not wait_until(lambda: healthy() or gone(), timeout, interval=0.5):
            raise CwtopsError(f"{self.name} server not healthy after {timeout:.0f} s; see {self.log_file}:\n{self.tail()}")
        if not healthy():
            raise CwtopsError(f"{self.name} server exited during start-up; see {self.log_file}:\n{self.tail()}")

    def stop(self, timeout: float = 20.0) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        stop_group(pid, timeout)
        self.pid_file.unlink(missing_ok=True)
        return True

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def process_alive(pid: int) -> bool:
    """Whether `pid` still runs. A child of this process that exited is reaped (a zombie is not alive)."""
    import psutil

    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the kernel
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie of another parent
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


# How long the processes a server started (Triton's backend stubs) get to follow it out after SIGTERM
GROUP_GRACE = 5.0


def group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`: a server launched in its own session
    and whatever it started, which outlive it when they ignore SIGTERM (reparented to init)."""
    import psutil

    alive = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.info["pid"]) == pgid:
                alive.append(process.info["pid"])
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return alive


def stop_group(pid: int, timeout: float, grace: float = GROUP_GRACE) -> None:
    """SIGTERM to the server's process group (its own session), SIGKILL to the group if the server
    outlives `timeout`, and SIGKILL to any process of the group still alive `grace` seconds after it
    exits: a child that ignores SIGTERM (a Triton backend stub) would otherwise run on as an orphan."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if not wait_until(lambda: not process_alive(pid), timeout):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    if not wait_until(lambda: not group_alive(pid), grace):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: not group_alive(pid), grace)


def reap_group(pgid: int, grace: float = GROUP_GRACE) -> list[int]:
    """SIGKILL what is left of the process group of a server that died (`pgid`, its PID: it was
    launched in its own session), such as Triton backend stubs that outlived a killed server;
    the PIDs killed. Only leftovers can match: the kernel does not hand out a PID again while a
    process group of that number has members."""
    left = group_alive(pgid)
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        wait_until(lambda: not group_alive(pgid), grace)
    return left


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(url, timeout=timeout).ok
    except requests.RequestException:
        return False

"""Which way imports point: the contracts in pyproject.toml ([tool.importlinter]), checked by
import-linter: the package (cwtops) never imports the stages (tasks), flows, bench or tests; the
stages never import flows, bench or tests; flows never import bench or tests; bench never imports
tests; the package's concerns are layered (cli over serving over registry ... over core); and no
modules of one package import each other in a cycle."""

from __future__ import annotations

import subprocess

from tests.conftest import BIN, ROOT


def test_import_contracts_hold() -> None:
    done = subprocess.run([str(BIN / "lint-imports"), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "6 kept, 0 broken" in done.stdout, done.stdout[-2000:]


def test_files_the_package_finds_beside_itself_exist(monkeypatch) -> None:  # noqa: ANN001
    """Paths computed from a module's own location survive a move: the Python backend's source and
    the Triton that `make setup` unpacks at the checkout's root."""
    from cwtops.serving import server

    monkeypatch.delenv("CWTOPS_TRITON_HOME", raising=False)
    assert server.BACKEND_SOURCE.is_file()
    assert server.triton_home() == ROOT / ".triton"

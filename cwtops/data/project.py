"""Project bootstrap: the inputs a fresh clone needs, created when absent and tracked by DVC."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cwtops.core.config import Params
from cwtops.core.errors import CwtopsError

DEFAULT_REMOTE = ".dvc-storage"  # a local folder in the checkout (git-ignored); DVC stores it relative to .dvc/


def dvc(*args: str, cwd: Path | None = None) -> str:
    """Run the DVC command line of this interpreter's environment; raise with its output on failure."""
    command = [sys.executable, "-m", "dvc", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=_env())
    if done.returncode != 0:
        raise CwtopsError(f"`dvc {' '.join(args)}` failed:\n{done.stdout}{done.stderr}".rstrip())
    return done.stdout


def _env() -> dict[str, str]:
    """DVC stages call `cwtops`: make sure this environment's bin folder is on PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _has_signals(raw_dir: Path) -> bool:
    return raw_dir.is_dir() and any(raw_dir.rglob("*.npy"))


def init_project(params: Params, root: Path = Path(".")) -> list[str]:
    """Sample data and weight file when absent; DVC repo, remote and tracking; returns what it did."""
    from cwtops.data.signals import write_sample_dataset
    from cwtops.data.weights import generate_filter_bank, write_weight_file

    done: list[str] = []
    weights, raw_dir = root / params.base.weights, root / params.base.raw_dir
    if not weights.exists():
        bank, header = generate_filter_bank()
        write_weight_file(weights, bank, header)
        done.append(f"wrote {weights} ({len(bank.names)} Morlet filters)")
    if not _has_signals(raw_dir):
        counts = write_sample_dataset(raw_dir, seed=params.base.seed)
        done.append(f"wrote sample signals to {raw_dir}: {counts}")
    if not (root / ".dvc").is_dir():
        dvc("init", "--subdir" if not (root / ".git").exists() else "-q", cwd=root)
        done.append("initialised DVC")
    if "local" not in dvc("remote", "list", cwd=root):
        dvc("remote", "add", "--default", "local", DEFAULT_REMOTE, cwd=root)
        done.append(f"configured default DVC remote 'local' at {DEFAULT_REMOTE} (relative to .dvc/)")
    dvc("add", "-q", str(params.base.raw_dir), str(params.base.weights), cwd=root)
    dvc("push", "-q", str(params.base.raw_dir) + ".dvc", str(params.base.weights) + ".dvc", cwd=root)
    done.append(f"tracked {raw_dir} and {weights} with DVC (pushed to the default remote)")
    return done

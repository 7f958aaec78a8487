"""Where a model came from: DVC hashes of the raw data and the weight file, the split and filter-bank
digests and the git commit (tags on the run and on every registered version), and the tracked run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from cwtops.core.artifacts import sha256_file
from cwtops.core.config import BaseConfig
from cwtops.core.errors import CwtopsError
from cwtops.core.paths import artifact_paths


def dvc_hash(dvc_file: Path) -> str:
    """`outs[0].md5` of a `.dvc` file ("untracked" when the file is absent or has none)."""
    try:
        return str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(root: Path = Path(".")) -> str:
    """`git rev-parse HEAD`, or "unknown" outside a repository."""
    return _git(root, "rev-parse", "HEAD") or "unknown"


def git_dirty(root: Path = Path(".")) -> str:
    """"true" when tracked files differ from HEAD (dvc.lock excluded: a repro rewrites it)."""
    changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock")
    return "unknown" if changes is None else str(bool(changes)).lower()


def _dvc_file(path: Path) -> Path:
    return path.with_name(path.name + ".dvc")


def lineage(base: BaseConfig) -> dict[str, str]:
    """Where a model came from: data, weights, split, filter bank, code (run and version tags)."""
    paths = artifact_paths(base)
    bank = json.loads(paths.filter_bank_summary.read_text())
    return {
        "data_dvc_md5": dvc_hash(_dvc_file(Path(base.raw_dir))),
        "weights_dvc_md5": dvc_hash(_dvc_file(Path(base.weights))),
        "split_manifest_sha256": sha256_file(paths.split_manifest),
        "filter_bank_sha256": str(bank["sha256"]),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }


def load_run(base: BaseConfig) -> dict:
    """artifacts/track/run.json (run_id, experiment_id, tracking_uri, run_url)."""
    path = artifact_paths(base).track_run
    if not path.exists():
        raise CwtopsError(f"{path}: no tracked run; run the track stage (`dvc repro track`) first")
    return json.loads(path.read_text())

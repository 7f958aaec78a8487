"""Run a DVC stage from Python, so orchestrators keep `dvc.lock` true."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.errors import CwtopsError


def _with_bin_on_path() -> None:
    """Stage commands call `cwtops`: this interpreter's bin folder must be on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def repro_stage(name: str, root: Path | str = ".") -> bool:
    """`dvc repro --single-item NAME`: True when the stage ran, False when it was up to date."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    _with_bin_on_path()
    try:
        with Repo(str(root)) as repo:
            ran = repo.reproduce(name, single_item=True)
    except DvcException as error:
        raise CwtopsError(f"DVC stage '{name}' failed: {error}") from None
    return bool(ran)

"""Debian packages the project needs beside its Python dependencies: installed when run as root, named otherwise.

    python -m cwtops.services.debian postgresql chromium chromium-driver    # what `make system-packages` runs

A package counts as present when dpkg reports it installed. As root with apt-get, the missing ones
are installed (the package lists are refreshed first on a fresh machine, where there are none);
as any other user the command fails with the `apt-get install` line to run, and nothing changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

from cwtops.core.errors import CwtopsError


def installed(package: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip().endswith("installed") and "not-installed" not in done.stdout


def missing(packages: Sequence[str]) -> list[str]:
    return [package for package in packages if not installed(package)]


def ensure(packages: Sequence[str], needed_for: str) -> list[str]:
    """Install what is missing of `packages` (root), or raise naming the command; returns what was installed."""
    absent = missing(packages)
    if not absent:
        return []
    apt = shutil.which("apt-get")
    command = f"apt-get install {' '.join(absent)}"
    if apt is None or os.geteuid() != 0:
        raise CwtopsError(f"{needed_for} needs Debian's {', '.join(absent)}: run `{command}` as root "
                          "(or `make system-packages` as root), then run the command again")
    quiet = {"stdout": subprocess.DEVNULL, "env": {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}}
    if subprocess.run([apt, "install", "-y", "-q", *absent], **quiet).returncode != 0:
        subprocess.run([apt, "update", "-q"], check=True, **quiet)  # a fresh machine has no package lists yet
        subprocess.run([apt, "install", "-y", "-q", *absent], check=True, **quiet)
    return absent


def main(argv: Sequence[str] | None = None) -> int:
    packages = list(argv if argv is not None else sys.argv[1:])
    try:
        added = ensure(packages, "the test suite")
    except CwtopsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"installed {' '.join(added)}" if added else f"present: {' '.join(packages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

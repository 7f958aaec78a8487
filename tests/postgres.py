"""A throwaway PostgreSQL cluster for tests: initdb and pg_ctl in a temporary folder, a free port on 127.0.0.1.

Debian's `postgresql` package provides the server (`make postgres` installs it when run as root).
initdb refuses to run as root, so under root the cluster belongs to the `postgres` system user the
package creates; its folder is made outside pytest's 0700 temporary tree so that user can reach it.
Password authentication (scram-sha-256) even on loopback: clients read the password from
`PGPASSWORD`, as a team's server would be used, never from a URI on a command line.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.scratch import free_port

USER = "cwtops"
INSTALL_HINT = ("PostgreSQL's server programs (initdb, pg_ctl) were not found: run `make postgres` as root, "
                "or install Debian's `postgresql` (apt-get install postgresql)")


def server_bin() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@dataclass
class Cluster:
    folder: Path
    port: int
    password: str
    bin: Path
    owner: str | None  # the system user that runs the server (root cannot)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def uri(self, database: str) -> str:
        """A SQLAlchemy URI without the password (it comes from PGPASSWORD)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / "pg_ctl"), "-D", str(self.data), *args]
        return subprocess.run(command, user=self.owner, capture_output=True, text=True, timeout=120, check=check)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._ctl("start", "-w", "-t", "60", "-l", str(self.folder / "server.log"), "-o", options)

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-w", "-m", mode, check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        import psycopg2

        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                                                 dbname="postgres")) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """initdb, start on a free port, yield; stop and remove everything afterwards."""
    bin_dir = server_bin()
    if bin_dir is None:
        raise RuntimeError(INSTALL_HINT)
    owner = None
    folder = Path(tempfile.mkdtemp(prefix="cwtops-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError as error:
            raise RuntimeError("running as root, and no `postgres` system user to run the cluster as: "
                               "install Debian's `postgresql` (make postgres)") from error
        owner = "postgres"
        os.chown(folder, account.pw_uid, account.pw_gid)
    password = os.urandom(12).hex()
    pwfile = folder / "pwfile"
    pwfile.write_text(password + "\n")
    if owner:
        os.chown(pwfile, pwd.getpwnam(owner).pw_uid, -1)
    pwfile.chmod(0o600)
    cluster = Cluster(folder, free_port(), password, bin_dir, owner)
    subprocess.run([str(bin_dir / "initdb"), "-D", str(cluster.data), "-U", USER, "--pwfile", str(pwfile),
                    "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"],
                   user=owner, capture_output=True, text=True, timeout=300, check=True)
    pwfile.unlink()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)

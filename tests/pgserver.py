"""A throwaway PostgreSQL server for the distributed-search tests: ``initdb`` in a temporary folder,
started on a free local port, stopped and removed afterwards.

The Debian package ``postgresql`` provides the binaries (``scripts/setup.sh`` installs it). The
server refuses to run as root, so as root it runs as the ``postgres`` user the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Optional


def pg_bindir() -> Optional[str]:
    """The folder of ``initdb``/``pg_ctl`` (PATH first, then Debian's versioned folders), or ``None``."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``with PostgresServer() as url:`` a SQLAlchemy URL of a fresh, empty server."""

    def __init__(self):
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed (no initdb): apt-get install postgresql (scripts/setup.sh does)")
        self.root = tempfile.mkdtemp(prefix="gransearch-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self.user = None
        if os.geteuid() == 0:  # postgres refuses root: run it as the package's user
            self.user = pwd.getpwnam("postgres")
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")

    def start(self) -> str:
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-o", opts, "-l", os.path.join(self.root, "log"), "-w", "start")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

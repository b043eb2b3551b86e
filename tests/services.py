"""Services that tests start themselves: a throwaway PostgreSQL cluster in a temp dir on a free port.

Where a service cannot be had, its tests are skipped with one line saying why, through require_service;
in a strict run (`make test STRICT=1`, which CI runs, or wherever the CI variable is set) they fail instead.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

STRICT = any(os.environ.get(name, "").lower() not in ("", "0", "false") for name in ("JWTAUTH_TEST_STRICT", "CI"))


def require_service(name: str, reason: str) -> NoReturn:
    """Skip the calling test (or, called at its top, the calling module) because `name` (a database, a
    browser, a program) cannot be had here, with the reason printed by `-ra`; in a strict run, fail instead.
    The one place where a missing service becomes a skip: never skip silently."""
    message = f"{name} is not available: {reason}"
    if STRICT:
        pytest.fail(f"{message} (a strict run needs every service)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def postgres_bin_dir() -> Path | None:
    """The directory of initdb and pg_ctl: on the PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda path: int(path.split("/")[4]))
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster of the tests' own: trust authentication on 127.0.0.1 only, durability off."""

    bin_dir: Path
    directory: Path
    port: int
    run_as: list[str]  # `runuser -u postgres --` when the tests run as root: initdb refuses root
    superuser: str = "jwtauth"

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, program: str, *args: str, timeout: float = 60) -> None:
        command = [*self.run_as, str(self.bin_dir / program), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stdout}{result.stderr}")

    def init(self) -> None:
        self._run("initdb", "--auth=trust", f"--username={self.superuser}", "--encoding=UTF8", "--no-sync",
                  f"--pgdata={self.directory / 'data'}")  # fmt: skip

    def start(self) -> None:
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=64MB"
        )
        self._run("pg_ctl", "start", "--wait", f"--pgdata={self.directory / 'data'}", f"--options={options}",
                  f"--log={self.directory / 'server.log'}")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "--wait", "--mode=fast", f"--pgdata={self.directory / 'data'}")

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(sql)


class DatabaseSupply:
    """Databases copied from a template ahead of the tests that take them, in a thread of their own, and
    dropped the same way: a copy takes about 0.1 s, which the tests would otherwise wait for. One thread,
    since PostgreSQL refuses two copies of one template at the same time."""

    def __init__(self, cluster: PostgresCluster, template: str) -> None:
        self.cluster, self.template = cluster, template
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="databases")
        self._next = self._worker.submit(self._copy)

    def _copy(self) -> str:
        name = f"test_{uuid.uuid4().hex}"
        self.cluster.execute(f"create database {name} template {self.template}")
        return name

    def take(self) -> str:
        """The name of a fresh copy of the template, the tests' own to change and to drop."""
        name, self._next = self._next.result(), self._worker.submit(self._copy)
        return name

    def drop(self, name: str) -> None:
        self._worker.submit(self.cluster.execute, f"drop database {name} with (force)")

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def start_postgres() -> PostgresCluster:
    """A new cluster in a temp dir on a free port, started.

    Raises:
        RuntimeError: initdb or pg_ctl failed.
        FileNotFoundError: PostgreSQL's programs are not installed.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("no initdb or pg_ctl (Debian package postgresql; `make test` installs it as root)")
    directory = Path(tempfile.mkdtemp(prefix="jwtauth-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = "postgres" if _has_user("postgres") else "nobody"
        os.chown(directory, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        run_as = ["runuser", "-u", user, "--"]
    cluster = PostgresCluster(bin_dir, directory, free_port(), run_as)
    cluster.init()
    cluster.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            cluster.execute("select 1")
            return cluster
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_postgres(cluster: PostgresCluster) -> None:
    try:
        cluster.stop()
    finally:
        shutil.rmtree(cluster.directory, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

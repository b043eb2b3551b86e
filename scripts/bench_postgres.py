"""The bench's PostgreSQL: a cluster of its own in the bench's temp directory, on a free port, pinned to the
server's cores like the server, so that the database's CPU is counted against the same limits.

Durability is PostgreSQL's default (fsync on) with synchronous_commit off, the same promise as SQLite's WAL
with synchronous=NORMAL that jwtauth uses: a crash may lose the last commits, never corrupt the database.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from bench_noise import parse_cpus
from bench_server import HOST, free_port, process_tree

SETTINGS = "-c synchronous_commit=off -c max_connections=100 -c shared_buffers=128MB -c unix_socket_directories=''"


def bin_dir() -> Path:
    """Where initdb and pg_ctl are: on the PATH, or Debian's /usr/lib/postgresql/<version>/bin.

    Raises:
        RuntimeError: PostgreSQL's server programs are not installed.
    """
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda path: int(path.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql); run --database sqlite")
    return Path(found[-1]).parent


@contextmanager
def postgres_cluster(cpus: str) -> Iterator[tuple[str, int]]:
    """Start a cluster in a temp dir of its own, pinned to `cpus`; yield (the URL of its database `bench`, the
    postmaster's pid); stop and delete it at the end. As root, it runs as the postgres user (initdb refuses
    root), so its directory is that user's."""
    programs, port = bin_dir(), free_port()
    directory = Path(tempfile.mkdtemp(prefix="jwtauth-bench-pg-"))
    data = directory / "pgdata"
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(directory, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]

    def run(*command: str) -> None:
        subprocess.run([*run_as, *command], check=True, capture_output=True, timeout=120)

    run(str(programs / "initdb"), "--auth=trust", "--username=jwtauth", "--encoding=UTF8", f"--pgdata={data}")
    options = f"-c port={port} -c listen_addresses={HOST} {SETTINGS}"
    run("taskset", "-c", cpus, str(programs / "pg_ctl"), "start", "--wait", f"--pgdata={data}",
        f"--options={options}", f"--log={directory / 'postgres.log'}")  # fmt: skip
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        run(str(programs / "createdb"), f"--port={port}", f"--host={HOST}", "--username=jwtauth", "bench")
        yield f"postgresql://jwtauth@{HOST}:{port}/bench", pid
    finally:
        run(str(programs / "pg_ctl"), "stop", "--wait", "--mode=fast", f"--pgdata={data}")
        shutil.rmtree(directory, ignore_errors=True)


def pin(postmaster: int, cpus: str) -> None:
    """Move the cluster (the postmaster, which new backends inherit it from, and every backend) to `cpus`."""
    for pid in process_tree(postmaster):
        try:
            os.sched_setaffinity(pid, parse_cpus(cpus))
        except ProcessLookupError:
            continue  # a backend that has just ended
    time.sleep(0.05)


def create_database(url: str, name: str) -> str:
    """Create database `name` in the cluster of `url` (a database of the bench's own); return its URL."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'create database "{name}"')  # a name of the bench's, not an input
    return url.rpartition("/")[0] + f"/{name}"

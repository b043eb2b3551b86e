"""The SQLite database and its -wal and -shm files are mode 0600 from their creation (API.md "Files"): they hold
the password hashes and the refresh-token hashes, which no other local user may read."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from jwtauth.config import Settings

from .conftest import PASSWORD, add_user, in_background, login, run_cli, start_server, stop_server

pytestmark = pytest.mark.sqlite_only
SUFFIXES = ("", "-wal", "-shm")


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """Files made by this process and its children get the usual umask, 022: 0644 unless asked otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(database: Path) -> dict[str, int]:
    """The permission bits of the database and of its -wal and -shm files, of those that exist."""
    found = {}
    for suffix in SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            found[database.name + suffix] = stat.S_IMODE(os.stat(f"{database}{suffix}").st_mode)
    return found


@contextlib.contextmanager
def watching_modes(database: Path) -> Iterator[dict[str, set[int]]]:
    """Every mode the database's files are seen with, looked at over and over while the block runs: a file made
    with a wider mode and narrowed afterwards may be caught with it."""
    seen: dict[str, set[int]] = {}

    def watch(stop: threading.Event) -> None:
        while not stop.is_set():
            for name, mode in modes(database).items():
                seen.setdefault(name, set()).add(mode)

    with in_background(watch):
        yield seen


# Installed through PYTHONPATH in the processes a test starts (the server's workers too): each time the process
# opens an SQLite database, which creates a missing file at once, the file's mode is written to OPENED_MODES,
# before jwtauth can do anything else to it. An audit hook only observes (PEP 578).
OBSERVER = """
import os, sys

def _observe(event, args):
    if event == "sqlite3.connect":
        _observe.path = os.fspath(args[0])
    elif event == "sqlite3.connect/handle" and os.path.exists(_observe.path):
        with open(os.environ["OPENED_MODES"], "a") as log:
            log.write(f"{os.path.basename(_observe.path)} {os.stat(_observe.path).st_mode & 0o777:o}\\n")

sys.addaudithook(_observe)
"""


@pytest.fixture
def observed(env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose processes log the mode of each database file as they open it, and that log."""
    (tmp_path / "observer").mkdir()
    (tmp_path / "observer" / "sitecustomize.py").write_text(OBSERVER)
    log = tmp_path / "opened-modes.txt"
    return {**env, "PYTHONPATH": str(tmp_path / "observer"), "OPENED_MODES": str(log)}, log


def opened_modes(log: Path) -> set[str]:
    return set(log.read_text().splitlines())


def test_users_add_creates_a_database_of_mode_0600(observed: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, log = observed
    database = tmp_path / "new.db"

    with watching_modes(database) as seen:
        result = run_cli("users", "add", "alice@example.com", "--password-stdin", stdin=PASSWORD,
                         env={**env, "JWTAUTH_DATABASE": str(database)})  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert opened_modes(log) == {"new.db 600"}  # from its creation
    assert modes(database) == {"new.db": 0o600}  # the -wal and -shm files went with the last connection
    assert {mode for name in seen for mode in seen[name]} == {0o600}


def test_a_first_start_creates_the_database_and_its_wal_and_shm_of_mode_0600(
    observed: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, log = observed
    database = tmp_path / "new.db"
    server_env = {**env, "JWTAUTH_DATABASE": str(database)}

    with watching_modes(database) as seen:
        server = start_server(server_env)
        try:
            with httpx.Client(base_url=server.url) as http:  # a write: the failure is counted
                failure = http.post("/login", json={"email": "alice@example.com", "password": PASSWORD})
            running = modes(database)  # while the server's connections are open
        finally:
            stop_server(server)

    assert failure.status_code == 400
    assert opened_modes(log) == {"new.db 600"}  # from its creation, in the server and in each worker
    assert running == {"new.db": 0o600, "new.db-wal": 0o600, "new.db-shm": 0o600}
    assert seen == {"new.db": {0o600}, "new.db-wal": {0o600}, "new.db-shm": {0o600}}


def test_a_database_readable_by_all_is_made_0600_at_the_next_start(env: dict[str, str]) -> None:
    """A database from an older jwtauth, 0644 with its -wal and -shm files (kept by a reader that has it open)."""
    database = Path(env["JWTAUTH_DATABASE"])
    add_user(Settings.from_env(env), "alice@example.com")
    with contextlib.closing(sqlite3.connect(database)) as reader:
        reader.execute("select count(*) from users").fetchone()  # the -wal and -shm files exist while it is open
        for suffix in SUFFIXES:
            os.chmod(f"{database}{suffix}", 0o644)
        assert set(modes(database).values()) == {0o644}

        server = start_server(env)
        try:
            running = modes(database)
            with httpx.Client(base_url=server.url) as http:
                pair = login(http, "alice@example.com")
        finally:
            stop_server(server)

    assert running == {"auth.db": 0o600, "auth.db-wal": 0o600, "auth.db-shm": 0o600}
    assert pair["token_type"] == "Bearer"

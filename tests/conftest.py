"""Shared fixtures: a real SQLite file and real keys under tmp_path, the real app, a real server process."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings
from jwtauth.keys import FileKeyRepository, KeyStore
from jwtauth.passwords import PasswordHasher
from jwtauth.service import UserAdmin
from jwtauth.store import open_store

# Cheap Argon2, set the way users set it: through the environment.
DATA_TABLES = ("users", "sessions")
CHEAP_ARGON2 = {
    "JWTAUTH_ARGON2_TIME_COST": "1",
    "JWTAUTH_ARGON2_MEMORY_KIB": "8",
    "JWTAUTH_ARGON2_PARALLELISM": "1",
}
ISSUER = "https://auth.test"
PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class Account:
    email: str
    password: str
    id: str


@pytest.fixture(scope="session")
def keys_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key set made once per run; each test gets its own copy (RSA generation is slow)."""
    directory = tmp_path_factory.mktemp("template") / "keys"
    KeyStore.from_settings(Settings(), FileKeyRepository(directory)).load_or_create(int(time.time()))
    return directory


@pytest.fixture
def env(tmp_path: Path, keys_template: Path) -> dict[str, str]:
    """The environment of one jwtauth installation in tmp_path, with a copy of the template keys."""
    shutil.copytree(keys_template, tmp_path / "keys")
    return {
        **CHEAP_ARGON2,
        "JWTAUTH_DATABASE": str(tmp_path / "auth.db"),
        "JWTAUTH_KEYS_DIR": str(tmp_path / "keys"),
        "JWTAUTH_ISSUER": ISSUER,
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:  # `with` runs the lifespan
        yield client


def add_user(settings: Settings, email: str, password: str = PASSWORD, name: str = "") -> Account:
    store = open_store(settings)
    store.migrate()
    user = UserAdmin(store, PasswordHasher(settings.argon2)).add_user(email, password, name)
    store.close()
    return Account(user.email, password, user.id)


@pytest.fixture
def alice(settings: Settings) -> Account:
    return add_user(settings, "alice@example.com", name="Alice")


def login(client: TestClient | httpx.Client, email: str, password: str = PASSWORD) -> dict[str, object]:
    response = client.post("/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def query(database: str | Path, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """The rows of one query, read straight from the database (not through jwtauth)."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return conn.execute(sql, parameters).fetchall()


def database_contents(database: str | Path) -> bytes:
    """Everything a copy of the database holds: its files' bytes (free pages and the WAL included) and
    every value of every table as text; to search for what must never be stored."""
    files = b"".join(
        Path(f"{database}{suffix}").read_bytes() for suffix in ("", "-wal") if Path(f"{database}{suffix}").exists()
    )
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return files + "\n".join(conn.iterdump()).encode()


def table_counts(database: str | Path) -> dict[str, int]:
    """Users and sessions, read straight from the database: to show that a rejected request wrote none.
    (Login-attempt counters are meant to change on failures; tests/test_throttle.py.)"""
    return {table: query(database, f"select count(*) from {table}")[0][0] for table in DATA_TABLES}


def require_service(name: str, reason: str) -> NoReturn:
    """Skip the calling test, or the calling test module when called at its top, because `name` (a program,
    a browser) cannot be had on this machine. The one place where a missing service becomes a skip, printed
    with its reason by `-ra`; never skip silently."""
    pytest.skip(f"{name} is not available: {reason}", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_cli(*args: str, env: Mapping[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m jwtauth ARGS` as a user would, with only this environment's JWTAUTH_* variables."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}
    return subprocess.run(
        [sys.executable, "-m", "jwtauth", *args],
        env={**clean, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    log: IO[bytes]  # its stderr, in a file: a pipe nobody reads would fill and block the server


def start_server(env: Mapping[str, str], *args: str, own_issuer: bool = False) -> Server:
    """Start `jwtauth serve` on a free port and wait until /healthz answers 200. With own_issuer,
    JWTAUTH_ISSUER is its own URL, for clients that follow the metadata's endpoints."""
    port = free_port()
    env = {**env, "JWTAUTH_ISSUER": f"http://127.0.0.1:{port}"} if own_issuer else env
    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}
    log = tempfile.TemporaryFile()  # noqa: SIM115 - stop_server closes it
    process = subprocess.Popen(
        [sys.executable, "-m", "jwtauth", "serve", "--port", str(port), *args],
        env={**clean, **env},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    server = Server(f"http://127.0.0.1:{port}", process, dict(env), log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jwtauth serve exited: {stop_server(server)}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"jwtauth serve did not become healthy in 30 s: {stop_server(server)}")


def stop_server(server: Server) -> str:
    """Stop the server; return what it logged (its stderr)."""
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    server.log.seek(0)
    text = server.log.read().decode(errors="replace")
    server.log.close()
    return text


class Clock:
    """A clock the test moves by hand, handed to create_app; it starts at the real time so that
    tokens it stamps also pass PyJWT's own expiry checks."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def bearer(token: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}

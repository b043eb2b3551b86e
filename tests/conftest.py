"""Shared fixtures: a real SQLite file and real keys under tmp_path, the real app, a real server process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx2 as httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings
from jwtauth.keys import FileKeyRepository, KeyStore, StoredKeys
from jwtauth.passwords import PasswordHasher
from jwtauth.service import UserAdmin
from jwtauth.sessions import Decision, SessionState
from jwtauth.store import Store, decode_spent, is_postgres_url, open_store
from jwtauth.store.sqlite import MIGRATIONS

from .services import DatabaseSupply, PostgresCluster, free_port, require_service, start_postgres, stop_postgres

# Cheap Argon2, set the way users set it: through the environment.
DATA_TABLES = ("users", "sessions")
CHEAP_ARGON2 = {
    "JWTAUTH_ARGON2_TIME_COST": "1",
    "JWTAUTH_ARGON2_MEMORY_KIB": "8",
    "JWTAUTH_ARGON2_PARALLELISM": "1",
}
ISSUER = "https://auth.test"
PASSWORD = "correct horse battery"
# A JWT whose header is JSON arrays nested 3,000 deep (within the 4,096 characters of a field): Python's json
# parser gives up on it with RecursionError, not ValueError.
NESTED_HEADER_TOKEN = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=") + ".e30.c2ln"


@dataclass(frozen=True)
class Account:
    email: str
    password: str
    id: str


BACKENDS = ("sqlite", "postgresql")
PG_PASSPHRASE = "the tests' passphrase for keys in PostgreSQL"
PG_TEMPLATE = "jwtauth_template"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sqlite_only: run on SQLite only: about SQLite's files or the keys directory, or the backend plays no part",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses an installation (the `backend` fixture, through `env`) runs on each backend."""
    if "backend" in metafunc.fixturenames:
        backends = BACKENDS[:1] if metafunc.definition.get_closest_marker("sqlite_only") else BACKENDS
        metafunc.parametrize("backend", backends, indirect=True, scope="function")


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def keys_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key set made once per run; each test gets its own copy (RSA generation is slow)."""
    directory = tmp_path_factory.mktemp("template") / "keys"
    KeyStore.from_settings(Settings(), FileKeyRepository(directory)).load_or_create(int(time.time()))
    return directory


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One PostgreSQL cluster for the run, with a template database that holds the schema and a key set."""
    try:
        cluster = start_postgres()
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        require_service("PostgreSQL", str(exc).strip().splitlines()[-1])
    try:
        cluster.execute(f"create database {PG_TEMPLATE}")
        settings = Settings.from_env(pg_env(cluster, PG_TEMPLATE))
        store = open_store(settings)
        store.migrate()
        KeyStore.from_settings(settings, store.key_repository()).load_or_create(int(time.time()))
        store.close()
        yield cluster
    finally:
        stop_postgres(cluster)


@pytest.fixture(scope="session")
def pg_databases(postgres: PostgresCluster) -> Iterator[DatabaseSupply]:
    """Copies of the template database (schema and keys), made ahead of the tests that take them."""
    supply = DatabaseSupply(postgres, PG_TEMPLATE)
    yield supply
    supply.close()


def pg_env(cluster: PostgresCluster, dbname: str) -> dict[str, str]:
    return {
        **CHEAP_ARGON2,
        "JWTAUTH_DATABASE": cluster.url(dbname),
        "JWTAUTH_KEYS_PASSPHRASE": PG_PASSPHRASE,
        "JWTAUTH_ISSUER": ISSUER,
    }


@pytest.fixture
def env(backend: str, tmp_path: Path, keys_template: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The environment of one jwtauth installation: a SQLite file in tmp_path with a copy of the template
    keys, or a PostgreSQL database of its own made from the template (schema and keys)."""
    if backend == "postgresql":
        databases: DatabaseSupply = request.getfixturevalue("pg_databases")
        dbname = databases.take()
        yield pg_env(databases.cluster, dbname)
        databases.drop(dbname)
        return
    shutil.copytree(keys_template, tmp_path / "keys")
    yield {
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


def disable_user(settings: Settings, email: str) -> None:
    """`jwtauth users disable`, in process."""
    store = open_store(settings)
    try:
        UserAdmin(store, PasswordHasher(settings.argon2)).set_disabled(email, True)
    finally:
        store.close()


@pytest.fixture
def alice(settings: Settings) -> Account:
    return add_user(settings, "alice@example.com", name="Alice")


def login(client: TestClient | httpx.Client, email: str, password: str = PASSWORD) -> dict[str, object]:
    response = client.post("/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def query(database: str | Path, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """The rows of one statement, run straight on the database (not through jwtauth); `?` placeholders."""
    if is_postgres_url(str(database)):
        with psycopg.connect(str(database), autocommit=True) as pg:
            cursor = pg.execute(sql.replace("?", "%s"), parameters)
            return cursor.fetchall() if cursor.description else []
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        return conn.execute(sql, parameters).fetchall()


async def rotate_at_once(
    store: Store, requests: Sequence[tuple[str, Callable[[SessionState | None], Decision]]]
) -> list[Decision]:
    """Ask for the rotations in one turn of the event loop (in one round, where the backend makes rounds)."""
    return await asyncio.gather(*(store.rotate_async(family, decide) for family, decide in requests))


def insert_many(database: str | Path, sql: str, rows: Sequence[Sequence[object]]) -> None:
    """Many rows in one transaction, straight into the database; `?` placeholders."""
    if is_postgres_url(str(database)):
        with psycopg.connect(str(database)) as pg, pg.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)
        return
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.executemany(sql, rows)


def table_names(database: str | Path) -> list[str]:
    if is_postgres_url(str(database)):
        return [row[0] for row in query(database, "select tablename from pg_tables where schemaname = 'public'")]
    return [row[0] for row in query(database, "select name from sqlite_master where type = 'table'")]


def snapshot(database: str | Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, login-attempt counters included: to show that a request wrote nothing."""
    return {table: sorted(query(database, f"select * from {table}"), key=repr) for table in table_names(database)}


def database_contents(database: str | Path) -> bytes:
    """Everything a copy of the database holds, to search for what must never be stored: every value of every
    table as text, and for SQLite its files' bytes too (free pages and the WAL included)."""
    if is_postgres_url(str(database)):
        tables = table_names(database)
        rows = [row[0] for table in tables for row in query(database, f"select row_to_json(t)::text from {table} t")]
        return "\n".join(rows).encode()
    paths = [Path(f"{database}{suffix}") for suffix in ("", "-wal")]
    with contextlib.closing(sqlite3.connect(database)) as conn:
        dump = "\n".join(conn.iterdump()).encode()
    return b"".join(path.read_bytes() for path in paths if path.exists()) + dump


def sqlite_at_schema(database: str | Path, version: int) -> sqlite3.Connection:
    """A SQLite database made as a jwtauth of schema `version` made it (to test the upgrade from there)."""
    conn = sqlite3.connect(database)
    for statement in itertools.chain(*MIGRATIONS[:version]):
        statement(conn) if callable(statement) else conn.execute(statement)
    conn.execute(f"pragma user_version = {version}")
    return conn


def spent_tokens(database: str | Path) -> list[int]:
    """How many spent tokens each session remembers, straight from the database."""
    return [len(decode_spent(bytes(row[0]))) for row in query(database, "select spent from sessions")]


def stored_keys(env: Mapping[str, str]) -> StoredKeys:
    """The key set as the installation stores it (a keys directory, or the database), read as an insider would."""
    store = open_store(Settings.from_env(env))
    try:
        return store.key_repository().read()
    finally:
        store.close()


def key_entries(env: Mapping[str, str]) -> list[dict[str, Any]]:
    """Each key's lifecycle entry, oldest first."""
    return [dataclasses.asdict(entry) for entry in stored_keys(env).entries]


def kid_in_state(env: Mapping[str, str], state: str) -> str:
    return next(str(entry["kid"]) for entry in key_entries(env) if entry["state"] == state)


def private_key(env: Mapping[str, str], kid: str) -> rsa.RSAPrivateKey:
    """A signing key, decrypted as an insider (or a thief with the passphrase) would."""
    passphrase = env.get("JWTAUTH_KEYS_PASSPHRASE")
    key = serialization.load_pem_private_key(stored_keys(env).pems[kid], passphrase.encode() if passphrase else None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def without_keys(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The installation as before its first start: no key set yet (a new keys directory, or none in the
    database)."""
    if is_postgres_url(env["JWTAUTH_DATABASE"]):
        query(env["JWTAUTH_DATABASE"], "delete from signing_keys")
        query(env["JWTAUTH_DATABASE"], "update key_set set refresh_secret = null, version = version + 1")
        return env
    return {**env, "JWTAUTH_KEYS_DIR": str(tmp_path / "new-keys")}


def age_keys(env: Mapping[str, str], seconds: int) -> None:
    """Make every key of the set `seconds` older, as if the set had been made that long ago."""
    if is_postgres_url(env["JWTAUTH_DATABASE"]):
        query(env["JWTAUTH_DATABASE"], "update signing_keys set created_at = created_at - ?", [seconds])
        query(env["JWTAUTH_DATABASE"], "update key_set set version = version + 1")
        return
    path = Path(env["JWTAUTH_KEYS_DIR"]) / "keyset.json"
    metadata = json.loads(path.read_text())
    for entry in metadata["keys"]:
        entry["created_at"] -= seconds
    path.write_text(json.dumps(metadata))


def table_counts(database: str | Path) -> dict[str, int]:
    """Users and sessions, read straight from the database: to show that a rejected request wrote none.
    (Login-attempt counters are meant to change on failures; tests/test_throttle.py.)"""
    return {table: query(database, f"select count(*) from {table}")[0][0] for table in DATA_TABLES}


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


def start_server(
    env: Mapping[str, str],
    *args: str,
    own_issuer: bool = False,
    open_files: int | None = None,
    cpus: set[int] | None = None,
) -> Server:
    """Start `jwtauth serve` on a free port and wait until /healthz answers 200. With own_issuer,
    JWTAUTH_ISSUER is its own URL, for clients that follow the metadata's endpoints; with open_files, the
    server runs under that limit on open files (`ulimit -n`); with cpus, on those CPUs only (`taskset`)."""
    port = free_port()
    env = {**env, "JWTAUTH_ISSUER": f"http://127.0.0.1:{port}"} if own_issuer else env
    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}
    log = tempfile.TemporaryFile()  # noqa: SIM115 - stop_server closes it

    def in_the_child() -> None:
        if open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        if cpus:
            os.sched_setaffinity(0, cpus)

    process = subprocess.Popen(
        [sys.executable, "-m", "jwtauth", "serve", "--port", str(port), *args],
        env={**clean, **env},
        stdout=subprocess.DEVNULL,
        stderr=log,
        preexec_fn=in_the_child if open_files or cpus else None,
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


@contextlib.contextmanager
def in_background(work: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run `work(stop)` in a thread while the block runs; at its end, set `stop` and wait for the thread."""
    stop = threading.Event()
    thread = threading.Thread(target=work, args=(stop,))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def bearer(token: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def full_width(text: str) -> str:
    """The look-alike of ASCII text in full-width forms (U+FF01 to U+FF5E), which NFKC maps back."""
    return "".join(chr(ord(character) + 0xFEE0) if "!" <= character <= "~" else character for character in text)

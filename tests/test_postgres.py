"""PostgreSQL: several `jwtauth serve` processes sharing one database behave as one server (API.md, "Storage").

Each test makes its own database on the run's cluster (the `postgres` fixture); the outage test starts a
cluster of its own, since it stops it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx2 as httpx
import jwt
import psycopg
import pytest

from jwtauth.config import Settings
from jwtauth.sessions import Decision, SessionState
from jwtauth.store import Store, open_store

from .conftest import (
    PASSWORD,
    PG_PASSPHRASE,
    Server,
    add_user,
    bearer,
    in_background,
    kid_in_state,
    pg_env,
    query,
    rotate_at_once,
    run_cli,
    start_server,
    stop_server,
    table_counts,
)
from .services import DatabaseSupply, PostgresCluster, require_service, start_postgres, stop_postgres


@pytest.fixture
def database(postgres: PostgresCluster) -> Iterator[dict[str, str]]:
    """The environment of an installation on an empty database of its own: no schema, no keys yet."""
    dbname = f"empty_{uuid.uuid4().hex}"
    postgres.execute(f"create database {dbname}")
    yield pg_env(postgres, dbname)
    postgres.execute(f"drop database {dbname} with (force)")


@contextmanager
def nodes(env: dict[str, str], count: int) -> Iterator[list[Server]]:
    """`count` servers on their own ports sharing the database of `env`, started one after another."""
    with ExitStack() as stack:
        servers = []
        for _ in range(count):
            server = start_server(env)
            stack.callback(stop_server, server)
            servers.append(server)
        yield servers


def login(server: Server, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(f"{server.url}/login", json={"email": "alice@example.com", "password": password}, timeout=30)


def refresh(server: Server, token: str) -> httpx.Response:
    return httpx.post(f"{server.url}/refresh", json={"refresh_token": token}, timeout=30)


def userinfo(server: Server, access_token: str) -> int:
    return httpx.get(f"{server.url}/userinfo", headers=bearer(access_token), timeout=30).status_code


def jwks_etags(servers: list[Server]) -> set[str]:
    return {httpx.get(f"{server.url}/.well-known/jwks.json").headers["etag"] for server in servers}


def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """Poll until `condition` holds; return how long that took, or fail."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic() - started


# Several nodes, one server


def test_a_pair_issued_by_one_node_refreshes_at_another_and_ends_at_all(database: dict[str, str]) -> None:
    add_user(Settings.from_env(database), "alice@example.com")
    with nodes(database, 3) as (a, b, c):
        pair = login(a).json()

        refreshed = refresh(b, pair["refresh_token"])
        assert refreshed.status_code == 200
        assert userinfo(c, refreshed.json()["access_token"]) == 200

        assert httpx.post(f"{c.url}/revoke", data={"token": refreshed.json()["refresh_token"]}).status_code == 200

        assert refresh(a, refreshed.json()["refresh_token"]).status_code == 400  # at once, at every node
        assert userinfo(b, refreshed.json()["access_token"]) == 401
        other = login(b).json()
        assert httpx.post(f"{b.url}/logout", headers=bearer(other["access_token"])).status_code == 204
        assert (refresh(c, other["refresh_token"]).status_code, userinfo(a, other["access_token"])) == (400, 401)


def test_login_failures_add_up_across_nodes(database: dict[str, str]) -> None:
    add_user(Settings.from_env(database), "alice@example.com")
    with nodes({**database, "JWTAUTH_LOGIN_MAX_FAILURES": "3"}, 3) as servers:
        statuses = [login(server, "wrong password").status_code for server in servers]

        blocked = [login(server) for server in servers]  # the right password, at every node

    assert statuses == [400, 400, 400]
    assert {response.status_code for response in blocked} == {429}
    assert {response.json()["error"] for response in blocked} == {"slow_down"}
    assert all(int(response.headers["retry-after"]) > 0 for response in blocked)


def test_concurrent_refreshes_across_nodes_with_interval_0_have_one_winner(database: dict[str, str]) -> None:
    add_user(Settings.from_env(database), "alice@example.com")
    with nodes({**database, "JWTAUTH_REFRESH_REUSE_INTERVAL": "0"}, 3) as servers:
        token = login(servers[0]).json()["refresh_token"]
        start = threading.Barrier(20)

        def one(index: int) -> int:
            start.wait()
            return refresh(servers[index % 3], token).status_code

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            statuses = sorted(pool.map(one, range(20)))

    assert statuses == [200] + [400] * 19


@pytest.mark.parametrize("command", [("rotate", "--force"), ("prune", "--force")])
def test_a_key_change_anywhere_reaches_every_node_within_2_s(
    database: dict[str, str], command: tuple[str, ...]
) -> None:
    add_user(Settings.from_env(database), "alice@example.com")
    with nodes(database, 3) as servers:
        if command[0] == "prune":  # a retired key to prune
            assert run_cli("keys", "rotate", "--force", env=database).returncode == 0
            wait_for(lambda: len(jwks_etags(servers)) == 1 and len(published(servers[0])) == 3, timeout=2.5)
        before = jwks_etags(servers)

        result = run_cli("keys", *command, env=database)  # committed when it returns
        assert result.returncode == 0, result.stderr
        current = kid_in_state(database, "current")
        took = wait_for(lambda: len(jwks_etags(servers) - before) == 1 and len(jwks_etags(servers)) == 1, timeout=3)
        signed = {jwt.get_unverified_header(login(server).json()["access_token"])["kid"] for server in servers}

    assert took < 2  # one new ETag, the same at every node, within 2 s
    assert signed == {current}


@contextmanager
def light_load(server: Server) -> Iterator[list[int]]:
    """Refreshes of one session, one after another, in a thread while the block runs; their statuses. The
    session is started before the block, so that the block cannot stop the database under its login."""
    statuses: list[int] = []
    first = login(server).json()["refresh_token"]

    def loop(stop: threading.Event) -> None:
        token = first
        while not stop.wait(0.02):
            response = refresh(server, token)
            statuses.append(response.status_code)
            token = response.json().get("refresh_token", token)

    with in_background(loop):
        yield statuses


def published(server: Server) -> list[str]:
    return [key["kid"] for key in httpx.get(f"{server.url}/.well-known/jwks.json").json()["keys"]]


def test_four_nodes_started_at_once_on_an_empty_database_make_one_schema_and_one_key_set(
    database: dict[str, str],
) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        servers = list(pool.map(lambda _: start_server(database), range(4)))
    try:
        etags = jwks_etags(servers)
        kids = {tuple(published(server)) for server in servers}
    finally:
        for server in servers:
            stop_server(server)

    url = database["JWTAUTH_DATABASE"]
    assert query(url, "select count(*) from jwtauth_schema") == [(1,)]
    assert sorted(row[0] for row in query(url, "select state from signing_keys")) == ["current", "next"]
    assert query(url, "select refresh_secret is not null from key_set") == [(True,)]
    assert len(etags) == 1 and len(kids) == 1


# The database under the service


def test_a_session_locked_by_another_transaction_waits_then_goes_on(database: dict[str, str]) -> None:
    add_user(Settings.from_env(database), "alice@example.com")
    with nodes(database, 1) as (server,):
        token = login(server).json()["refresh_token"]
        with psycopg.connect(database["JWTAUTH_DATABASE"]) as other:
            other.execute("select id from sessions for update")  # holds the row lock until the rollback
            release = threading.Timer(0.5, other.rollback)
            started = time.monotonic()
            release.start()
            response = refresh(server, token)
            waited = time.monotonic() - started
            release.join()

    assert response.status_code == 200, response.text
    assert 0.5 <= waited < 5


def waiting_for_locks(url: str, count: int, timeout: float = 5) -> bool:
    """Whether `count` of jwtauth's connections come to wait for a lock within the timeout."""
    sql = "select count(*) from pg_stat_activity where application_name = 'jwtauth' and wait_event_type = 'Lock'"
    deadline = time.monotonic() + timeout
    while query(url, sql) != [(count,)]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_rotations_queued_behind_a_lock_converge_on_the_token_of_the_one_that_saved(
    database: dict[str, str],
) -> None:
    """Two nodes read the session and decide to rotate it while another transaction holds its row; when
    that ends, one saves its rotation, and the other, finding the session rotated, decides again: the reuse
    interval's answer, the same token."""
    add_user(Settings.from_env(database), "alice@example.com")
    with nodes({**database, "JWTAUTH_REFRESH_REUSE_INTERVAL": "10"}, 2) as servers:
        token = login(servers[0]).json()["refresh_token"]
        with psycopg.connect(database["JWTAUTH_DATABASE"]) as other, concurrent.futures.ThreadPoolExecutor(2) as pool:
            other.execute("select id from sessions for update")
            answers = [pool.submit(refresh, server, token) for server in servers]
            assert waiting_for_locks(database["JWTAUTH_DATABASE"], 2)  # both decided, and wait to save
            other.rollback()
            responses = [answer.result() for answer in answers]
        generations = query(database["JWTAUTH_DATABASE"], "select generation, revoked_at from sessions")

    assert [response.status_code for response in responses] == [200, 200], [r.text for r in responses]
    assert len({response.json()["refresh_token"] for response in responses}) == 1
    assert generations == [(1, None)]  # one rotation saved, the session alive


# Rotations in rounds (PostgresStore.rotate_async)


@contextmanager
def two_sessions(database: dict[str, str]) -> Iterator[tuple[Store, SessionState, SessionState]]:
    """A store on the database and two sessions of one user in it, the first with the lower id."""
    store = open_store(Settings.from_env(database))
    try:
        store.migrate()
        user = store.add_user("alice@example.com", "Alice", "hash", int(time.time()))
        now = time.time()
        sessions = [SessionState(f"{name}-{uuid.uuid4()}", uuid.uuid4().hex[:22], user, now, 0, "h0", now + 3600)
                    for name in ("a", "b")]  # fmt: skip
        for session in sessions:
            store.start_session(session, 100, "address-key", "pair", [])
        yield store, sessions[0], sessions[1]
    finally:
        store.close()


def to_next_generation(state: SessionState | None) -> Decision:
    assert state is not None
    rotated = dataclasses.replace(state, generation=state.generation + 1, token_hash=f"h{state.generation + 1}")
    return Decision("rotated", "rotated", rotated, f"t{state.generation + 1}")


def test_rotations_that_meet_a_deadlock_are_saved_one_by_one(database: dict[str, str]) -> None:
    """A round's UPDATE locks the first session, then waits for the second, which another transaction holds
    while it comes to wait for the first: PostgreSQL fails the round's UPDATE (its deadlock check comes
    first), which saved nothing, and the rotations are then decided and saved one by one."""
    url = database["JWTAUTH_DATABASE"]
    deadlocks = "select deadlocks from pg_stat_database where datname = current_database()"
    with two_sessions(database) as (store, first, second), psycopg.connect(url) as other:
        before = query(url, deadlocks)[0][0]
        other.execute("set deadlock_timeout = '10s'")  # so that the round's check, after 1 s, finds the cycle
        other.execute("select 1 from sessions where id = %s for update", [second.id])
        requests = [(first.family, to_next_generation), (second.family, to_next_generation)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            rotations = pool.submit(asyncio.run, rotate_at_once(store, requests))
            assert waiting_for_locks(url, 1)  # the round's UPDATE, with the first session's row locked
            other.execute("select 1 from sessions where id = %s for update", [first.id])  # the cycle
            other.rollback()
            decisions = rotations.result(timeout=30)
        rows = query(url, "select id, generation, token_hash from sessions order by id")

    wait_for(lambda: query(url, deadlocks)[0][0] == before + 1, timeout=15)  # counted once flushed to the stats
    assert [decision.refresh_token for decision in decisions] == ["t1", "t1"]
    assert rows == [(first.id, 1, "h1"), (second.id, 1, "h1")]


def test_a_request_that_ends_while_its_rotation_waits_for_the_round_rotates_nothing(
    database: dict[str, str],
) -> None:
    async def cancel_the_second_before_the_round() -> tuple[Decision, bool]:
        kept = asyncio.ensure_future(store.rotate_async(first.family, to_next_generation))
        ended = asyncio.ensure_future(store.rotate_async(second.family, to_next_generation))
        asyncio.get_running_loop().call_soon(ended.cancel)  # after both asked, before the round runs
        decision = await kept
        await asyncio.gather(ended, return_exceptions=True)
        return decision, ended.cancelled()

    with two_sessions(database) as (store, first, second):
        decision, cancelled = asyncio.run(cancel_the_second_before_the_round())
        rows = query(database["JWTAUTH_DATABASE"], "select id, generation from sessions order by id")

    assert (decision.refresh_token, cancelled) == ("t1", True)
    assert rows == [(first.id, 1), (second.id, 0)]


def test_a_lock_held_past_the_busy_timeout_gets_503_and_no_winner(database: dict[str, str]) -> None:
    add_user(Settings.from_env(database), "alice@example.com")
    env = {**database, "JWTAUTH_DB_BUSY_TIMEOUT_MS": "300", "JWTAUTH_REFRESH_REUSE_INTERVAL": "0"}
    with nodes(env, 1) as (server,):
        token = login(server).json()["refresh_token"]
        sessions = "select generation, token_hash, revoked_at from sessions"
        before = query(database["JWTAUTH_DATABASE"], sessions)
        with psycopg.connect(database["JWTAUTH_DATABASE"]) as other:
            other.execute("select id from sessions for update")
            response = refresh(server, token)
            other.rollback()
        unchanged = query(database["JWTAUTH_DATABASE"], sessions)
        after = refresh(server, token)

    assert (response.status_code, response.json()["error"]) == (503, "temporarily_unavailable")
    assert response.headers["retry-after"] == "1"
    assert unchanged == before  # the timed-out rotation changed nothing...
    assert after.status_code == 200  # ...so the token still refreshes (with no reuse interval to hide a spend)


def test_an_outage_answers_503_and_the_same_processes_resume(postgres: PostgresCluster) -> None:
    try:  # a cluster of its own, since it stops it
        cluster = start_postgres()
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        require_service("a second PostgreSQL cluster", str(exc))
    try:
        cluster.execute("create database outage")
        env = pg_env(cluster, "outage")
        add_user(Settings.from_env(env), "alice@example.com")
        with nodes(env, 1) as (server,), light_load(server) as statuses:
            pair = login(server).json()
            token = pair["refresh_token"]
            cluster.stop()

            answers = [
                login(server),
                refresh(server, token),
                httpx.get(f"{server.url}/userinfo", headers=bearer(pair["access_token"]), timeout=30),
            ]
            health = httpx.get(f"{server.url}/healthz")
            public = [httpx.get(f"{server.url}/.well-known/{name}") for name in ("jwks.json", "openid-configuration")]
            cluster.start()
            took = wait_for(lambda: login(server).status_code == 200, timeout=10)
            resumed = refresh(server, token)
            alive = server.process.poll() is None
    finally:
        stop_postgres(cluster)

    assert set(statuses) == {200, 503}  # the load met the outage and its end, and never a 500
    assert [(a.status_code, a.json()["error"]) for a in answers] == [(503, "temporarily_unavailable")] * 3
    assert all(a.headers["retry-after"] == "1" for a in answers)
    assert health.status_code == 503
    assert [response.status_code for response in public] == [200, 200]
    assert took < 10 and alive
    assert resumed.status_code == 200, resumed.text


def test_a_dump_of_the_database_holds_no_usable_private_key(database: dict[str, str], tmp_path: Path) -> None:
    add_user(Settings.from_env(database), "alice@example.com")
    pg_dump = shutil.which("pg_dump")
    assert pg_dump is not None
    with nodes(database, 1) as (server,):  # a dump of a running deployment
        login(server)
        assert run_cli("keys", "rotate", "--force", env=database).returncode == 0
        dump = subprocess.run(
            [pg_dump, "--data-only", f"--dbname={database['JWTAUTH_DATABASE']}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip

    assert dump.count("BEGIN ENCRYPTED PRIVATE KEY") == 4  # three signing keys and the refresh secret
    assert "BEGIN PRIVATE KEY" not in dump and "BEGIN RSA PRIVATE KEY" not in dump


def test_db_backup_writes_a_custom_format_archive(database: dict[str, str], tmp_path: Path) -> None:
    add_user(Settings.from_env(database), "alice@example.com")

    result = run_cli("db", "backup", str(tmp_path / "jwtauth.dump"), env=database)

    assert result.returncode == 0, result.stderr
    archive = tmp_path / "jwtauth.dump"
    assert archive.read_bytes().startswith(b"PGDMP")  # pg_dump's custom format
    assert (archive.stat().st_mode & 0o777) == 0o600
    assert "@" not in result.stdout  # the URL's user and password are not printed


def test_db_backup_without_pg_dump_says_why(database: dict[str, str], tmp_path: Path) -> None:
    add_user(Settings.from_env(database), "alice@example.com")

    result = run_cli("db", "backup", str(tmp_path / "jwtauth.dump"), env={**database, "PATH": str(tmp_path)})

    assert result.returncode == 1
    assert (
        result.stderr.strip() == "jwtauth: cannot back up: pg_dump is not on the PATH (install the PostgreSQL client)"
    )
    assert not (tmp_path / "jwtauth.dump").exists()


def test_db_check_checks_the_connection_and_the_schema(database: dict[str, str], postgres: PostgresCluster) -> None:
    unreachable = {**database, "JWTAUTH_DATABASE": postgres.url("no_such_database")}
    assert run_cli("db", "check", env=database).returncode == 1  # an empty database: no schema yet
    add_user(Settings.from_env(database), "alice@example.com")

    good, bad = run_cli("db", "check", env=database), run_cli("db", "check", env=unreachable)

    assert (good.returncode, good.stdout.strip()) == (0, "ok")
    assert bad.returncode == 1 and "no_such_database" in bad.stderr + bad.stdout and "Traceback" not in bad.stderr


@pytest.mark.parametrize("verb", [("serve", "--port", "1"), ("users", "list"), ("keys", "list"), ("db", "check")])
def test_every_verb_refuses_to_run_without_the_passphrase(database: dict[str, str], verb: tuple[str, ...]) -> None:
    env = {name: value for name, value in database.items() if name != "JWTAUTH_KEYS_PASSPHRASE"}

    result = run_cli(*verb, env=env)

    assert result.returncode == 1
    assert result.stderr.strip() == (
        "jwtauth: JWTAUTH_KEYS_PASSPHRASE must be set with PostgreSQL: the keys are stored encrypted"
    )


def test_a_malformed_url_stops_every_verb_without_showing_the_password(database: dict[str, str]) -> None:
    env = {**database, "JWTAUTH_DATABASE": "postgresql://alice:s3cr%zzet@127.0.0.1:1/jwtauth"}  # % not encoded

    results = [run_cli(*verb, env=env) for verb in (("serve", "--port", "1"), ("users", "list"))]

    assert [(result.returncode, result.stderr.strip()) for result in results] == [
        (1, "jwtauth: JWTAUTH_DATABASE is not a valid postgresql:// URL (is the password percent-encoded?)")
    ] * 2


def test_a_wrong_passphrase_stops_serve_naming_the_key(database: dict[str, str]) -> None:
    assert run_cli("keys", "list", env=database).returncode == 0  # the key set is made

    result = run_cli("serve", "--port", "1", env={**database, "JWTAUTH_KEYS_PASSPHRASE": "not it"})

    assert result.returncode == 1
    assert "JWTAUTH_KEYS_PASSPHRASE" in result.stderr and "Traceback" not in result.stderr


# Moving a SQLite deployment


@pytest.mark.sqlite_only
def test_copy_to_moves_a_deployment_without_logging_anyone_out(env: dict[str, str], database: dict[str, str]) -> None:
    add_user(Settings.from_env(env), "alice@example.com")
    add_user(Settings.from_env(env), "bob@example.com")
    with nodes(env, 1) as (old,):
        pair = login(old).json()
        login(old)
        revoked = login(old).json()
        httpx.post(f"{old.url}/revoke", data={"token": revoked["refresh_token"]})
        kids = published(old)
    url = database["JWTAUTH_DATABASE"]

    result = run_cli("db", "copy-to", url, env={**env, "JWTAUTH_KEYS_PASSPHRASE": PG_PASSPHRASE})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"copied 2 users, 2 live sessions and 2 keys to {url.replace('jwtauth@', '')}"
    with nodes(database, 1) as (new,):
        assert published(new) == kids
        assert userinfo(new, pair["access_token"]) == 200  # signed by the old deployment's key
        assert refresh(new, pair["refresh_token"]).status_code == 200  # its refresh secret came along
        assert refresh(new, revoked["refresh_token"]).status_code == 400  # revoked sessions stay behind
        assert login(new).status_code == 200


@pytest.mark.sqlite_only
def test_copy_to_refuses_a_target_with_jwtauth_data(env: dict[str, str], pg_databases: DatabaseSupply) -> None:
    dbname = pg_databases.take()  # a schema and a key set
    add_user(Settings.from_env(env), "alice@example.com")
    url = pg_databases.cluster.url(dbname)
    before = query(url, "select kid, pem from signing_keys order by kid")
    try:
        result = run_cli("db", "copy-to", url, env={**env, "JWTAUTH_KEYS_PASSPHRASE": PG_PASSPHRASE})
        after = query(url, "select kid, pem from signing_keys order by kid"), table_counts(url)
    finally:
        pg_databases.drop(dbname)

    assert result.returncode == 1
    assert result.stderr.strip().endswith("already holds jwtauth data; nothing was copied")
    assert after == (before, {"users": 0, "sessions": 0})


@pytest.mark.sqlite_only
@pytest.mark.parametrize("target", ["not-a-url.db", "mysql://host/db"])
def test_copy_to_needs_a_postgresql_url(env: dict[str, str], target: str) -> None:
    result = run_cli("db", "copy-to", target, env={**env, "JWTAUTH_KEYS_PASSPHRASE": PG_PASSPHRASE})

    assert (result.returncode, result.stderr.strip()) == (1, "jwtauth: db copy-to needs a postgresql:// URL")

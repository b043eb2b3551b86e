"""Live sessions per user are capped (API.md "Throttling", JWTAUTH_MAX_SESSIONS_PER_USER): a login beyond the cap
ends the user's oldest live session, and nobody else's."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import psycopg
import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings
from jwtauth.store import is_postgres_url

from .conftest import (
    PASSWORD,
    Account,
    Clock,
    Server,
    add_user,
    bearer,
    in_background,
    login,
    query,
    start_server,
    stop_server,
)
from .test_sessions import assert_invalid_grant, refresh, sid_of

CAP = 3


def capped_client(env: dict[str, str], clock: Clock, **variables: str) -> TestClient:
    settings = Settings.from_env({**env, "JWTAUTH_MAX_SESSIONS_PER_USER": str(CAP), **variables})
    return TestClient(create_app(settings, clock=clock))


@pytest.fixture
def capped(env: dict[str, str], clock: Clock) -> Iterator[TestClient]:
    with capped_client(env, clock) as client:
        yield client


def logins(client: TestClient, clock: Clock, email: str, count: int) -> list[dict[str, object]]:
    """`count` logins, a second apart."""
    pairs = []
    for _ in range(count):
        pairs.append(login(client, email))
        clock.advance(1)
    return pairs


def works(client: TestClient, pair: dict[str, object]) -> bool:
    """Whether the session of a pair is live: its access token passes /userinfo and its refresh token rotates."""
    userinfo = client.get("/userinfo", headers=bearer(pair["access_token"]))
    return userinfo.status_code == 200 and refresh(client, pair["refresh_token"]).status_code == 200


def live_sessions(env: dict[str, str], user_id: str) -> int:
    sql = "select count(*) from sessions where user_id = ? and revoked_at is null and expires_at > ?"
    return int(query(env["JWTAUTH_DATABASE"], sql, [user_id, time.time()])[0][0])


def rows_of(env: dict[str, str], user_id: str) -> list[tuple[Any, ...]]:
    return query(env["JWTAUTH_DATABASE"], "select * from sessions where user_id = ? order by id", [user_id])


@contextlib.contextmanager
def watching_live_sessions(database: str, user_id: str) -> Iterator[list[int]]:
    """Count the user's sessions that are not revoked, over and over on one connection, while the block runs."""
    seen: list[int] = []
    sql = "select count(*) from sessions where revoked_at is null and user_id = ?"

    def watch(stop: threading.Event) -> None:
        if is_postgres_url(database):
            with psycopg.connect(database, autocommit=True) as pg:
                while not stop.is_set():
                    seen.append(pg.execute(sql.replace("?", "%s"), [user_id]).fetchone()[0])  # type: ignore[index]
            return
        with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as conn:
            while not stop.is_set():
                seen.append(conn.execute(sql, [user_id]).fetchone()[0])

    with in_background(watch):
        yield seen


def audit_records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "event", None) == event]


def test_the_default_cap_is_100() -> None:
    assert Settings.from_env({}).max_sessions_per_user == 100


def test_a_login_beyond_the_cap_ends_the_oldest_session(capped: TestClient, clock: Clock, alice: Account) -> None:
    oldest, *newer = logins(capped, clock, alice.email, CAP + 1)

    userinfo = capped.get("/userinfo", headers=bearer(oldest["access_token"]))
    assert (userinfo.status_code, userinfo.json()["error"]) == (401, "invalid_token")
    assert userinfo.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert_invalid_grant(refresh(capped, oldest["refresh_token"]))
    assert [works(capped, pair) for pair in newer] == [True] * CAP


def test_logins_up_to_the_cap_end_nothing(
    capped: TestClient, clock: Clock, alice: Account, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "jwtauth.audit")
    pairs = logins(capped, clock, alice.email, CAP)

    assert [works(capped, pair) for pair in pairs] == [True] * CAP
    assert audit_records(caplog, "sessions_capped") == []


def test_ending_a_session_for_the_cap_is_an_audit_event(
    capped: TestClient, clock: Clock, alice: Account, caplog: pytest.LogCaptureFixture
) -> None:
    logins(capped, clock, alice.email, CAP)
    caplog.set_level(logging.INFO, "jwtauth.audit")

    login(capped, alice.email)

    [record] = audit_records(caplog, "sessions_capped")
    assert record.getMessage() == f"sessions_capped user={alice.id} count=1"
    assert (getattr(record, "user", None), getattr(record, "count", None)) == (alice.id, 1)


def test_logins_at_the_same_instant_end_an_older_session_never_the_new_one(
    capped: TestClient, env: dict[str, str], alice: Account
) -> None:
    """The clock does not move between these logins: every session starts at the same time. The one a login
    starts is still the newest, and its tokens must work."""
    for number in range(CAP + 3):
        pair = login(capped, alice.email)

        assert works(capped, pair), f"login {number + 1} returned a session that it ended itself"
        assert live_sessions(env, alice.id) == min(number + 1, CAP)


def test_ended_and_expired_sessions_do_not_count_and_stay_as_they_were(
    env: dict[str, str], clock: Clock, alice: Account, caplog: pytest.LogCaptureFixture
) -> None:
    with capped_client(env, clock, JWTAUTH_REFRESH_TTL="100") as client:
        logged_out = login(client, alice.email)
        assert client.post("/logout", headers=bearer(logged_out["access_token"])).status_code == 204
        clock.advance(1)
        login(client, alice.email)
        clock.advance(101)  # the second session has expired
        ended = rows_of(env, alice.id)
        caplog.set_level(logging.INFO, "jwtauth.audit")

        pairs = logins(client, clock, alice.email, CAP)

        assert audit_records(caplog, "sessions_capped") == []
        assert [works(client, pair) for pair in pairs] == [True] * CAP
        assert [row for row in rows_of(env, alice.id) if row in ended] == ended  # not revoked again, not deleted


def test_other_users_sessions_are_untouched(
    capped: TestClient, clock: Clock, env: dict[str, str], settings: Settings, alice: Account
) -> None:
    bob = add_user(settings, "bob@example.com")
    bobs = logins(capped, clock, bob.email, CAP)
    bob_logged_out = login(capped, bob.email)  # this ends bob's oldest
    capped.post("/logout", headers=bearer(bob_logged_out["access_token"]))
    before = rows_of(env, bob.id)

    logins(capped, clock, alice.email, CAP + 2)

    assert rows_of(env, bob.id) == before
    assert [works(capped, pair) for pair in bobs[1:]] == [True] * (CAP - 1)


def logins_at_once(server: Server, email: str, addresses: list[str]) -> list[httpx.Response]:
    """A correct login of `email` from each of `addresses` (as X-Forwarded-For), all sent at the same moment
    on connections opened before."""
    start = threading.Barrier(len(addresses))

    def log_in(address: str) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            http.get("/healthz")  # connected before the race
            start.wait()
            credentials = {"email": email, "password": PASSWORD}
            return http.post("/login", json=credentials, headers={"X-Forwarded-For": address})

    with concurrent.futures.ThreadPoolExecutor(len(addresses)) as pool:
        return list(pool.map(log_in, addresses))


def test_concurrent_logins_never_leave_more_sessions_than_the_cap(env: dict[str, str]) -> None:
    """24 correct logins at once against a real server (two workers): at most the cap stays live, and the
    sessions of another user are not touched."""
    cap, count = 5, 24
    # Twelve logins at once in each worker, not one per core, so that their transactions overlap; each from an
    # address of its own, so that the logins in flight stay below the limit per email and address.
    server_env = {**env, "JWTAUTH_MAX_SESSIONS_PER_USER": str(cap), "JWTAUTH_HASH_CONCURRENCY": "12",
                  "JWTAUTH_TRUSTED_PROXIES": "127.0.0.1"}  # fmt: skip
    alice = add_user(Settings.from_env(server_env), "alice@example.com")
    bob = add_user(Settings.from_env(server_env), "bob@example.com")
    server = start_server(server_env, "--workers", "2")
    try:
        with httpx.Client(base_url=server.url) as http:
            bobs = [login(http, bob.email) for _ in range(2)]
        with watching_live_sessions(env["JWTAUTH_DATABASE"], alice.id) as seen:
            responses = logins_at_once(server, alice.email, [f"192.0.2.{number}" for number in range(count)])
        live_after_race = live_sessions(env, alice.id)
        with httpx.Client(base_url=server.url) as http:
            pairs = [response.json() for response in responses if response.status_code == 200]
            usable = [http.get("/userinfo", headers=bearer(pair["access_token"])).status_code for pair in pairs]
            bob_usable = [http.get("/userinfo", headers=bearer(pair["access_token"])).status_code for pair in bobs]
    finally:
        stop_server(server)

    assert [response.status_code for response in responses] == [200] * count, [r.text for r in responses]
    assert len(seen) > 10 and max(seen) <= cap  # never more, not even for a moment during the race
    assert live_after_race == cap
    assert sorted(usable) == [200] * cap + [401] * (count - cap)
    assert len({sid_of(pair) for pair in pairs}) == count
    assert query(env["JWTAUTH_DATABASE"], "select count(*) from sessions where user_id = ?", [alice.id]) == [(count,)]
    assert bob_usable == [200, 200]
    assert live_sessions(env, bob.id) == 2


def test_logins_of_one_user_from_one_address_at_once_all_start_their_session(env: dict[str, str]) -> None:
    """Eight correct logins of one user from one address at once, each round from an address the user has not
    logged in from (so that the logins also count under the account's ceiling, and forgive three counts):
    every one is answered 200 and keeps its session. A login that took its counts in one order and forgave
    them in another met another's in a deadlock, which PostgreSQL ended with a 503."""
    rounds, count = 6, 8
    server_env = {**env, "JWTAUTH_HASH_CONCURRENCY": str(count), "JWTAUTH_TRUSTED_PROXIES": "127.0.0.1",
                  "JWTAUTH_LOGIN_MAX_FAILURES": str(2 * count)}  # fmt: skip
    alice = add_user(Settings.from_env(server_env), "alice@example.com")
    server = start_server(server_env)
    try:
        statuses = [
            response.status_code
            for round_ in range(rounds)
            for response in logins_at_once(server, alice.email, [f"198.51.100.{round_}"] * count)
        ]
    finally:
        stop_server(server)

    assert statuses == [200] * rounds * count
    assert live_sessions(env, alice.id) == rounds * count
    assert query(env["JWTAUTH_DATABASE"], "select count(*) from login_attempts where attempts > 0") == [(0,)]

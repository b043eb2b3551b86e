"""/metrics costs the same at one session or a million (API.md "Metrics"): the live sessions are counted in the
background every COUNT_SESSIONS_EVERY seconds, and a scrape reports the last count; no scrape counts rows."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from jwtauth.app import COUNT_SESSIONS_EVERY, create_app
from jwtauth.config import Settings

from .conftest import Account, add_user, insert_many
from .services import DatabaseSupply
from .test_operations import scrape, value

BULK = 50_000
POLL_SECONDS = 0.05


def add_sessions(database: str, user_id: str, count: int) -> None:
    """`count` live sessions of a user, written straight into the database in one transaction."""
    now, tag = time.time(), uuid.uuid4().hex
    rows = [(f"{tag}-{n}", f"{tag}-{n}", user_id, now, 0, "hash", now + 86_400) for n in range(count)]
    insert_many(
        database,
        "insert into sessions (id, family, user_id, created_at, generation, token_hash, expires_at)"
        " values (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


def gauge(client: TestClient) -> float:
    return value(scrape(client), "jwtauth_active_sessions")


def wait_for_gauge(client: TestClient, expected: float, seconds: float) -> float:
    """Scrape until the gauge shows `expected`; return how long that took.

    Raises:
        AssertionError: it did not within `seconds`.
    """
    started = time.monotonic()
    while (shown := gauge(client)) != expected:
        assert time.monotonic() - started < seconds, f"the gauge shows {shown}, not {expected}, after {seconds} s"
        time.sleep(POLL_SECONDS)
    return time.monotonic() - started


@pytest.fixture
def other_env(env: dict[str, str], backend: str, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """A second installation beside `env`, with its own database and the same keys."""
    if backend == "sqlite":
        yield {**env, "JWTAUTH_DATABASE": env["JWTAUTH_DATABASE"].removesuffix(".db") + "-other.db"}
        return
    databases: DatabaseSupply = request.getfixturevalue("pg_databases")
    dbname = databases.take()
    yield {**env, "JWTAUTH_DATABASE": databases.cluster.url(dbname)}
    databases.drop(dbname)


@pytest.mark.sqlite_only  # the counting in the background: tests/test_store.py counts on both backends
def test_scrapes_between_two_counts_report_the_last_count(
    client: TestClient, env: dict[str, str], alice: Account
) -> None:
    """Right after the background count has taken in a bulk of sessions, more are written: scrapes until the next
    count still show the last one, so none of them counted."""
    database = env["JWTAUTH_DATABASE"]
    add_sessions(database, alice.id, BULK)
    wait_for_gauge(client, BULK, COUNT_SESSIONS_EVERY + 2)
    counted = time.monotonic()  # within a poll of the count: the next is COUNT_SESSIONS_EVERY seconds away

    add_sessions(database, alice.id, 1000)
    shown = []
    while time.monotonic() - counted < COUNT_SESSIONS_EVERY / 2:
        shown.append(gauge(client))
        time.sleep(POLL_SECONDS)

    assert shown and set(shown) == {BULK}
    wait_for_gauge(client, BULK + 1000, COUNT_SESSIONS_EVERY + 2)


def test_a_scrape_takes_as_long_at_one_session_as_at_fifty_thousand(
    env: dict[str, str], other_env: dict[str, str], alice: Account
) -> None:
    """Two installations side by side, one with 50,000 live sessions and one with one, scraped in turns: the
    medians of their scrape times are alike. Counting 50,000 rows in each scrape would take several times a
    scrape's own time (4 to 6 times, measured with a count added to each scrape on both backends)."""
    add_sessions(env["JWTAUTH_DATABASE"], alice.id, BULK)
    other = add_user(Settings.from_env(other_env), "alice@example.com")
    add_sessions(other_env["JWTAUTH_DATABASE"], other.id, 1)
    big_times: list[float] = []
    small_times: list[float] = []
    with (
        TestClient(create_app(Settings.from_env(env))) as big,
        TestClient(create_app(Settings.from_env(other_env))) as small,
    ):
        for _ in range(3):  # warm up
            scrape(big)
            scrape(small)
        for _ in range(40):
            for client, times in ((big, big_times), (small, small_times)):
                started = time.perf_counter()
                assert client.get("/metrics").status_code == 200
                times.append(time.perf_counter() - started)

    assert statistics.median(big_times) < 2 * statistics.median(small_times)  # with a count per scrape: 4-6 times

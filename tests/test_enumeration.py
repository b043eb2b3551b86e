"""No user enumeration: unknown email, wrong password and disabled user look the same, in body and in time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings

from .conftest import PASSWORD, add_user, disable_user, run_cli, start_server, stop_server

VARYING_HEADERS = {"x-request-id", "date"}


@pytest.fixture
def hashing(env: dict[str, str]) -> Iterator[tuple[TestClient, Settings]]:
    """Argon2 costly enough (4 MiB) that a missing dummy verification would show; no throttling in the way."""
    settings = Settings.from_env({
        **env, "JWTAUTH_ARGON2_MEMORY_KIB": "4096", "JWTAUTH_LOGIN_MAX_FAILURES": "100000",
        "JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS": "100000",
    })  # fmt: skip
    add_user(settings, "alice@example.com")
    add_user(settings, "dora@example.com")
    disable_user(settings, "dora@example.com")
    with TestClient(create_app(settings)) as client:
        yield client, settings


def answer(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {name: value for name, value in response.headers.items() if name not in VARYING_HEADERS}
    return response.status_code, response.content, headers


def test_unknown_wrong_and_disabled_get_the_same_answer(hashing: tuple[TestClient, Settings]) -> None:
    client, _ = hashing
    unknown = client.post("/login", json={"email": "nobody@example.com", "password": "guess one"})
    wrong = client.post("/login", json={"email": "alice@example.com", "password": "guess one"})
    disabled = client.post("/login", json={"email": "dora@example.com", "password": "correct horse battery"})

    assert answer(unknown) == answer(wrong) == answer(disabled)
    assert unknown.status_code == 400


def timed_login(client: TestClient | httpx.Client, email: str, password: str) -> float:
    started = time.perf_counter()
    response = client.post("/login", json={"email": email, "password": password})
    elapsed = time.perf_counter() - started
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")  # timed to the end
    return elapsed


def test_unknown_email_takes_as_long_as_a_wrong_password(hashing: tuple[TestClient, Settings]) -> None:
    client, _ = hashing
    unknown, wrong, disabled = [], [], []
    for _ in range(3):  # warm up
        timed_login(client, "nobody@example.com", "guess one")
    for _ in range(40):  # interleaved, so that load on the machine falls on all alike
        unknown.append(timed_login(client, "nobody@example.com", "guess one"))
        wrong.append(timed_login(client, "alice@example.com", "guess one"))
        disabled.append(timed_login(client, "dora@example.com", "correct horse battery"))

    assert 0.8 <= statistics.median(unknown) / statistics.median(wrong) <= 1.25
    assert 0.8 <= statistics.median(disabled) / statistics.median(wrong) <= 1.25


def test_a_stale_hash_fails_no_faster_than_a_current_one(env: dict[str, str]) -> None:
    """Issue 15: an account added by `jwtauth users add` with cheaper Argon2 than the server's failed its logins
    in 8 ms against 148 ms, so the time of a failed login told which accounts had not logged in since."""
    server_env = {**env, "JWTAUTH_ARGON2_MEMORY_KIB": "16384", "JWTAUTH_LOGIN_MAX_FAILURES": "100000",
                  "JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS": "100000"}  # fmt: skip
    add = ("users", "add", "--password-stdin")
    assert run_cli(*add, "stale@example.com", env=env, stdin=PASSWORD).returncode == 0  # cheap Argon2 (8 KiB)
    assert run_cli(*add, "current@example.com", env=server_env, stdin=PASSWORD).returncode == 0
    server = start_server(server_env)
    stale, current = [], []
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for _ in range(3):  # warm up
                timed_login(http, "current@example.com", "guess one")
            for _ in range(30):  # interleaved, so that load on the machine falls on both alike
                stale.append(timed_login(http, "stale@example.com", "guess one"))
                current.append(timed_login(http, "current@example.com", "guess one"))
    finally:
        stop_server(server)

    assert statistics.median(stale) / statistics.median(current) >= 0.85  # was 0.15; equal costs give 0.95 to 1.15

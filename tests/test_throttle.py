"""Login throttling: per email and client address, per address, shared by workers, behind trusted proxies."""

from __future__ import annotations

import concurrent.futures
import statistics
import threading
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings

from .conftest import PASSWORD, Account, Clock, add_user, full_width, start_server, stop_server, table_counts

PROXY = ("10.0.0.2", 40000)  # the peer every request comes from: a reverse proxy we trust


def attempt(
    client: TestClient | httpx.Client, email: str, password: str, address: str = "203.0.113.7"
) -> httpx.Response:
    """A login from `address`, as the trusted proxy reports it."""
    return client.post("/login", json={"email": email, "password": password}, headers={"X-Forwarded-For": address})


def fail(client: TestClient | httpx.Client, email: str, times: int, address: str = "203.0.113.7") -> list[int]:
    return [attempt(client, email, "wrong password", address).status_code for _ in range(times)]


@pytest.fixture
def proxied(env: dict[str, str], clock: Clock) -> Iterator[TestClient]:
    settings = Settings.from_env({**env, "JWTAUTH_TRUSTED_PROXIES": "10.0.0.0/24", "JWTAUTH_PASSWORD_GRANT": "1"})
    with TestClient(create_app(settings, clock=clock), client=PROXY) as client:
        yield client


def test_after_the_limit_even_the_right_password_gets_429(proxied: TestClient, alice: Account) -> None:
    assert fail(proxied, alice.email, 5) == [400] * 5

    response = attempt(proxied, alice.email, alice.password)

    assert (response.status_code, response.json()["error"]) == (429, "slow_down")
    assert response.json()["error_description"]
    assert response.headers["retry-after"] == "900"
    assert "access_token" not in response.json()


def test_retry_after_counts_down_and_the_window_passes(proxied: TestClient, clock: Clock, alice: Account) -> None:
    fail(proxied, alice.email, 5)
    clock.advance(600)

    assert attempt(proxied, alice.email, alice.password).headers["retry-after"] == "300"
    clock.advance(300)
    assert attempt(proxied, alice.email, alice.password).status_code == 200


def test_another_email_from_the_same_address_is_unaffected(
    proxied: TestClient, settings: Settings, alice: Account
) -> None:
    bob = add_user(settings, "bob@example.com")
    fail(proxied, alice.email, 5)

    assert attempt(proxied, bob.email, bob.password).status_code == 200


def test_the_same_email_from_another_address_is_unaffected(proxied: TestClient, alice: Account) -> None:
    fail(proxied, alice.email, 5, address="203.0.113.7")

    assert attempt(proxied, alice.email, alice.password, address="198.51.100.9").status_code == 200
    assert attempt(proxied, alice.email, alice.password, address="203.0.113.7").status_code == 429


def test_a_success_resets_the_count(proxied: TestClient, alice: Account) -> None:
    assert fail(proxied, alice.email, 4) == [400] * 4
    assert attempt(proxied, alice.email, alice.password).status_code == 200

    assert fail(proxied, alice.email, 6) == [400] * 5 + [429]


def test_unknown_emails_are_counted_like_known_ones(proxied: TestClient, alice: Account) -> None:
    known = fail(proxied, alice.email, 6)
    unknown = fail(proxied, "nobody@example.com", 6)

    assert known == unknown == [400] * 5 + [429]


def test_the_count_ignores_the_emails_case(proxied: TestClient, alice: Account) -> None:
    fail(proxied, "ALICE@example.com", 3)
    fail(proxied, "alice@EXAMPLE.com", 2)

    assert attempt(proxied, alice.email, alice.password).status_code == 429


def test_the_count_ignores_look_alike_spellings_of_the_email(proxied: TestClient, alice: Account) -> None:
    fail(proxied, full_width("alice@example.com"), 2)
    fail(proxied, full_width("ALICE") + "@example.com", 2)
    fail(proxied, "\u3000Alice@Example.com", 1)  # an ideographic space before it

    assert attempt(proxied, alice.email, alice.password).status_code == 429


def test_failures_at_the_token_endpoint_count_too(proxied: TestClient, alice: Account) -> None:
    fail(proxied, alice.email, 3)
    form = {"grant_type": "password", "username": alice.email, "password": "wrong password"}
    token = [proxied.post("/token", data=form, headers={"X-Forwarded-For": "203.0.113.7"}) for _ in range(3)]

    assert [response.status_code for response in token] == [400, 400, 429]
    assert token[2].json()["error"] == "slow_down"
    assert attempt(proxied, alice.email, alice.password).status_code == 429


def test_one_address_has_a_ceiling_across_emails(env: dict[str, str], alice: Account) -> None:
    settings = Settings.from_env(
        {**env, "JWTAUTH_TRUSTED_PROXIES": "10.0.0.2", "JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS": "4"}
    )
    with TestClient(create_app(settings), client=PROXY) as client:
        tries = [fail(client, f"user{n}@example.com", 1)[0] for n in range(4)]

        assert tries == [400] * 4
        assert attempt(client, alice.email, alice.password).status_code == 429  # even a right password
        assert attempt(client, alice.email, alice.password, address="198.51.100.9").status_code == 200


def test_successes_do_not_fill_the_address_ceiling(env: dict[str, str], alice: Account) -> None:
    settings = Settings.from_env({**env, "JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS": "3"})
    with TestClient(create_app(settings)) as client:
        statuses = [attempt(client, alice.email, alice.password).status_code for _ in range(10)]

    assert statuses == [200] * 10


def test_forwarded_for_from_an_untrusted_peer_is_ignored(env: dict[str, str], alice: Account) -> None:
    with TestClient(create_app(Settings.from_env(env)), client=PROXY) as client:  # no trusted proxies
        statuses = [
            attempt(client, alice.email, "wrong password", address=f"198.51.100.{n}").status_code for n in range(6)
        ]

    assert statuses == [400] * 5 + [429]  # a made-up header does not buy more guesses


def test_only_the_nearest_untrusted_hop_counts(proxied: TestClient, alice: Account) -> None:
    """A client may prepend anything to X-Forwarded-For; the address our proxy appended is the one used."""
    for n in range(6):
        response = attempt(proxied, alice.email, "wrong password", address=f"1.2.3.{n}, 203.0.113.7, 10.0.0.3")
    assert response.status_code == 429
    assert attempt(proxied, alice.email, alice.password, address="203.0.113.7").status_code == 429


def test_the_count_is_shared_by_two_workers(env: dict[str, str]) -> None:
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server(env, "--workers", "2")
    try:
        statuses = []
        for _ in range(10):
            with httpx.Client(base_url=server.url) as http:  # a new connection each time: either worker
                statuses.append(attempt(http, "alice@example.com", "wrong password").status_code)
        with httpx.Client(base_url=server.url) as http:
            final = attempt(http, "alice@example.com", PASSWORD).status_code
    finally:
        stop_server(server)

    assert statuses == [400] * 5 + [429] * 5
    assert final == 429


def test_concurrent_guesses_get_no_more_checks_than_the_limit(proxied: TestClient, alice: Account) -> None:
    start = threading.Barrier(20)

    def guess(_: int) -> int:
        start.wait()
        return attempt(proxied, alice.email, "wrong password").status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = sorted(pool.map(guess, range(20)))

    assert statuses == [400] * 5 + [429] * 15


@pytest.mark.parametrize(
    "spellings",
    [("203.0.113.7", "203.0.113.7:5000", "203.0.113.7:6001"), ("2001:db8::1", "2001:DB8:0::1", "[2001:db8::1]:80")],
)
def test_one_client_is_one_address_however_it_is_spelt(
    proxied: TestClient, alice: Account, spellings: tuple[str, ...]
) -> None:
    for n in range(5):
        attempt(proxied, alice.email, "wrong password", address=spellings[n % len(spellings)])

    assert attempt(proxied, alice.email, alice.password, address=spellings[-1]).status_code == 429


def test_an_ipv6_client_counts_by_its_64_network(proxied: TestClient, alice: Account) -> None:
    """One subscriber gets a whole /64 and may use any address in it: sixty addresses are not sixty budgets."""
    assert [fail(proxied, alice.email, 1, address=f"2001:db8:1:2::{n:x}")[0] for n in range(1, 6)] == [400] * 5

    assert attempt(proxied, alice.email, alice.password, address="2001:db8:1:2:ffff:ffff:ffff:ffff").status_code == 429
    assert attempt(proxied, alice.email, alice.password, address="2001:db8:1:3::1").status_code == 200


def test_an_ipv4_mapped_address_counts_as_its_ipv4_address(proxied: TestClient, alice: Account) -> None:
    fail(proxied, alice.email, 3, address="::ffff:203.0.113.7")
    fail(proxied, alice.email, 2, address="203.0.113.7")

    assert attempt(proxied, alice.email, alice.password, address="[::ffff:203.0.113.7]:4000").status_code == 429


@pytest.mark.parametrize("made_up", ["unknown", "203.0.113.7 user=admin", "fe80::1%eth0 user=admin", "_hidden"])
def test_a_forwarded_hop_that_is_not_an_address_is_not_believed(
    proxied: TestClient, alice: Account, made_up: str
) -> None:
    """A proxy may pass on a header its client wrote: the nearest hop that is an address counts, so a client
    cannot buy a fresh budget with each made-up text."""
    statuses = [fail(proxied, alice.email, 1, address=f"203.0.113.7, {made_up}{n}")[0] for n in range(6)]

    assert statuses == [400] * 5 + [429]


@pytest.mark.parametrize(
    "made_up",
    ["1.2.3.4 user=admin", "1.2.3.4\nlogin_succeeded user=admin", "fe80::1%eth0\nlogin_succeeded user=admin"],
)
def test_a_made_up_hop_never_reaches_the_log(
    env: dict[str, str], alice: Account, caplog: pytest.LogCaptureFixture, made_up: str
) -> None:
    settings = Settings.from_env({**env, "JWTAUTH_TRUSTED_PROXIES": "10.0.0.0/24", "JWTAUTH_LOGIN_MAX_FAILURES": "1"})
    with caplog.at_level("INFO"), TestClient(create_app(settings), client=PROXY) as client:
        statuses = [attempt(client, alice.email, "wrong password", address=made_up).status_code for _ in range(2)]

    assert statuses == [400, 429]
    throttled = [record.getMessage() for record in caplog.records if record.getMessage().startswith("login_throttled")]
    assert throttled == ["login_throttled address=10.0.0.2"]  # no address in the header: the proxy's counts
    assert "user=admin" not in caplog.text


@pytest.mark.parametrize("path", ["/login", "/users"])
def test_logins_beyond_the_queue_get_503_at_once(env: dict[str, str], path: str) -> None:
    """One hashing slot, two places in the queue, twelve logins (or registrations) at once: the ones that find
    the queue full are refused before any password is hashed, and write nothing."""
    server_env = {**env, "JWTAUTH_ARGON2_TIME_COST": "6", "JWTAUTH_ARGON2_MEMORY_KIB": "32768",  # ~0.2 s a hash
                  "JWTAUTH_HASH_CONCURRENCY": "1", "JWTAUTH_LOGIN_QUEUE": "2",
                  "JWTAUTH_OPEN_REGISTRATION": "1"}  # fmt: skip
    add_user(Settings.from_env(server_env), "alice@example.com")
    server = start_server(server_env)
    start = threading.Barrier(12)

    def log_in(number: int) -> tuple[httpx.Response, float]:
        email = "alice@example.com" if path == "/login" else f"new{number}@example.com"
        with httpx.Client(base_url=server.url, timeout=30) as http:
            http.get("/healthz")  # connected before the race
            start.wait()
            started = time.monotonic()
            response = http.post(path, json={"email": email, "password": PASSWORD})
            return response, time.monotonic() - started

    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(log_in, range(12)))
    finally:
        stop_server(server)

    done = [seconds for response, seconds in outcomes if response.status_code in (200, 201)]
    refused = [(response, seconds) for response, seconds in outcomes if response.status_code == 503]
    assert len(done) + len(refused) == 12 and len(done) >= 3 and refused
    for response, _ in refused:
        assert (response.json()["error"], response.headers["retry-after"]) == ("temporarily_unavailable", "1")
    assert statistics.median(seconds for _, seconds in refused) < min(done)  # at once, not after a hash
    counts = table_counts(server_env["JWTAUTH_DATABASE"])
    assert counts["sessions" if path == "/login" else "users"] == len(done) + (0 if path == "/login" else 1)

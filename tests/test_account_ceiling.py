"""The per-account ceiling on failed logins (API.md "Throttling", JWTAUTH_LOGIN_MAX_FAILURES_PER_ACCOUNT):
failures for one email from any number of addresses add up; past the ceiling, no password is checked for that
email, except from the address of the account's last successful login, so that the owner is not locked out."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings

from .conftest import PASSWORD, Account, Clock, add_user, snapshot, start_server, stop_server
from .test_throttle import PROXY, attempt, fail

PAIR_LIMIT, ACCOUNT_CEILING, WINDOW = 3, 6, 900
OWNER = "198.51.100.1"  # where alice logs in from
NEWCOMER = "192.0.2.200"  # an address that has never tried anything


def botnet(count: int) -> list[str]:
    """`count` addresses, none of them another's."""
    return [f"203.0.113.{n}" for n in range(1, count + 1)]


def spread_failures(client: TestClient | httpx.Client, email: str, count: int) -> list[int]:
    """`count` failed logins for `email`, two from each address: below every address's pair limit."""
    addresses = [address for address in botnet(count) for _ in range(2)][:count]
    return [attempt(client, email, "wrong password", address).status_code for address in addresses]


def audit_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(getattr(record, "event", "")) for record in caplog.records if record.name == "jwtauth.audit"]


@pytest.fixture
def guarded(env: dict[str, str], clock: Clock) -> Iterator[TestClient]:
    """Behind a trusted proxy, with a pair limit of 3 and an account ceiling of 6 per 900 s window."""
    settings = Settings.from_env({
        **env,
        "JWTAUTH_TRUSTED_PROXIES": "10.0.0.0/24",
        "JWTAUTH_LOGIN_MAX_FAILURES": str(PAIR_LIMIT),
        "JWTAUTH_LOGIN_MAX_FAILURES_PER_ACCOUNT": str(ACCOUNT_CEILING),
        "JWTAUTH_LOGIN_WINDOW": str(WINDOW),
    })  # fmt: skip
    with TestClient(create_app(settings, clock=clock), client=PROXY) as client:
        yield client


def test_the_default_ceiling_is_100_per_window() -> None:
    assert Settings.from_env({}).login_max_failures_per_account == 100


def test_failures_from_many_addresses_add_up_to_the_ceiling(
    guarded: TestClient, env: dict[str, str], alice: Account, caplog: pytest.LogCaptureFixture
) -> None:
    assert spread_failures(guarded, alice.email, ACCOUNT_CEILING) == [400] * ACCOUNT_CEILING
    before = snapshot(env["JWTAUTH_DATABASE"])
    caplog.set_level(logging.INFO, "jwtauth.audit")

    response = attempt(guarded, alice.email, alice.password, NEWCOMER)  # the right password, a fresh address

    assert (response.status_code, response.json()["error"]) == (429, "slow_down")
    assert response.headers["retry-after"] == str(WINDOW)
    assert "access_token" not in response.json()
    assert audit_events(caplog) == ["login_throttled"]  # no password was checked
    assert snapshot(env["JWTAUTH_DATABASE"]) == before  # no session, and the 429 counted nowhere


def test_below_the_ceiling_a_new_address_logs_in(guarded: TestClient, alice: Account) -> None:
    assert spread_failures(guarded, alice.email, ACCOUNT_CEILING - 1) == [400] * (ACCOUNT_CEILING - 1)

    assert attempt(guarded, alice.email, alice.password, NEWCOMER).status_code == 200


def test_an_unknown_email_gets_the_same_answer_past_the_ceiling(guarded: TestClient, alice: Account) -> None:
    """No enumeration: unknown emails have a ceiling too, reached at the same count, with the same answer."""
    known = spread_failures(guarded, alice.email, ACCOUNT_CEILING + 1)
    unknown = spread_failures(guarded, "nobody@example.com", ACCOUNT_CEILING + 1)
    known_answer = attempt(guarded, alice.email, alice.password, NEWCOMER)
    unknown_answer = attempt(guarded, "nobody@example.com", alice.password, NEWCOMER)

    assert known == unknown == [400] * ACCOUNT_CEILING + [429]
    assert known_answer.status_code == unknown_answer.status_code == 429
    assert known_answer.json() == unknown_answer.json()
    assert known_answer.headers["retry-after"] == unknown_answer.headers["retry-after"]


def test_the_ceiling_is_per_account(guarded: TestClient, settings: Settings, alice: Account) -> None:
    bob = add_user(settings, "bob@example.com")
    spread_failures(guarded, alice.email, ACCOUNT_CEILING)

    assert attempt(guarded, bob.email, bob.password, NEWCOMER).status_code == 200
    assert attempt(guarded, alice.email, alice.password, NEWCOMER).status_code == 429


def test_the_owner_logs_in_from_the_address_of_the_last_success(guarded: TestClient, alice: Account) -> None:
    """Failures from elsewhere cannot lock the owner out; a typo or two of the owner's own do not either."""
    assert attempt(guarded, alice.email, alice.password, OWNER).status_code == 200
    spread_failures(guarded, alice.email, ACCOUNT_CEILING)
    assert attempt(guarded, alice.email, alice.password, NEWCOMER).status_code == 429

    typos = fail(guarded, alice.email, PAIR_LIMIT - 1, OWNER)
    response = attempt(guarded, alice.email, alice.password, OWNER)

    assert typos == [400] * (PAIR_LIMIT - 1)
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer"


def test_the_owners_address_keeps_its_pair_limit(guarded: TestClient, alice: Account) -> None:
    assert attempt(guarded, alice.email, alice.password, OWNER).status_code == 200
    spread_failures(guarded, alice.email, ACCOUNT_CEILING)

    statuses = fail(guarded, alice.email, PAIR_LIMIT, OWNER)
    response = attempt(guarded, alice.email, alice.password, OWNER)

    assert statuses == [400] * PAIR_LIMIT
    assert (response.status_code, response.json()["error"]) == (429, "slow_down")


def test_the_owners_success_does_not_lift_the_ceiling_for_others(guarded: TestClient, alice: Account) -> None:
    """A success from the exempt address resets that address's own count only: the attackers' failures stay
    counted against the account until their window passes."""
    assert attempt(guarded, alice.email, alice.password, OWNER).status_code == 200
    spread_failures(guarded, alice.email, ACCOUNT_CEILING)

    assert attempt(guarded, alice.email, alice.password, OWNER).status_code == 200
    assert attempt(guarded, alice.email, alice.password, NEWCOMER).status_code == 429
    assert fail(guarded, alice.email, 1, botnet(1)[0]) == [429]


def test_only_the_last_successful_address_is_exempt(guarded: TestClient, alice: Account) -> None:
    assert attempt(guarded, alice.email, alice.password, OWNER).status_code == 200
    assert attempt(guarded, alice.email, alice.password, "198.51.100.2").status_code == 200  # the owner moved
    spread_failures(guarded, alice.email, ACCOUNT_CEILING)

    assert attempt(guarded, alice.email, alice.password, OWNER).status_code == 429
    assert attempt(guarded, alice.email, alice.password, "198.51.100.2").status_code == 200


def test_429s_do_not_count_towards_the_ceiling(guarded: TestClient, alice: Account) -> None:
    """Only failed password checks count: attempts refused by an address's pair limit add nothing."""
    first, second = botnet(2)
    assert fail(guarded, alice.email, PAIR_LIMIT + 10, first) == [400] * PAIR_LIMIT + [429] * 10
    assert fail(guarded, alice.email, PAIR_LIMIT, second) == [400] * PAIR_LIMIT  # 6 failed checks in all

    assert attempt(guarded, alice.email, alice.password, NEWCOMER).status_code == 429


def test_successful_logins_do_not_count_towards_the_ceiling(guarded: TestClient, alice: Account) -> None:
    travels = [f"198.51.100.{n}" for n in range(10, 20)]  # the owner, from ten places
    assert [attempt(guarded, alice.email, alice.password, address).status_code for address in travels] == [200] * 10
    assert spread_failures(guarded, alice.email, ACCOUNT_CEILING - 1) == [400] * (ACCOUNT_CEILING - 1)
    assert attempt(guarded, alice.email, alice.password, "198.51.100.30").status_code == 200  # still below

    assert fail(guarded, alice.email, 1, "192.0.2.7") == [400]  # the sixth failed check
    assert attempt(guarded, alice.email, alice.password, NEWCOMER).status_code == 429


def test_the_ceiling_lifts_when_the_window_passes(guarded: TestClient, clock: Clock, alice: Account) -> None:
    spread_failures(guarded, alice.email, ACCOUNT_CEILING)
    clock.advance(WINDOW - 300)
    assert attempt(guarded, alice.email, alice.password, NEWCOMER).headers["retry-after"] == "300"

    clock.advance(300)

    assert attempt(guarded, alice.email, alice.password, NEWCOMER).status_code == 200


def test_the_ceiling_is_shared_by_two_workers(env: dict[str, str]) -> None:
    """Each login on a new connection, so that either worker answers it: the failures add up in the database."""
    server_env = {**env, "JWTAUTH_TRUSTED_PROXIES": "127.0.0.1", "JWTAUTH_LOGIN_MAX_FAILURES_PER_ACCOUNT": "4"}
    add_user(Settings.from_env(server_env), "alice@example.com")
    add_user(Settings.from_env(server_env), "bob@example.com")
    server = start_server(server_env, "--workers", "2")

    def login_from(address: str, email: str, password: str) -> httpx.Response:
        with httpx.Client(base_url=server.url) as http:
            return attempt(http, email, password, address)

    try:
        failures = [login_from(address, "alice@example.com", "wrong password") for address in botnet(4)]
        refused = [login_from(f"192.0.2.{n}", "alice@example.com", PASSWORD) for n in range(10, 16)]
        bob = login_from("192.0.2.20", "bob@example.com", PASSWORD)
    finally:
        stop_server(server)

    assert [response.status_code for response in failures] == [400] * 4
    assert [(response.status_code, response.json()["error"]) for response in refused] == [(429, "slow_down")] * 6
    assert bob.status_code == 200

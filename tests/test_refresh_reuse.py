"""Refresh rotation as clients meet it on a real `jwtauth serve`: concurrency is not theft (API.md, "Refresh
tokens"). Concurrent refreshes converge on one token; a replay after the interval still revokes; a made-up
token revokes nothing; and the database never holds a usable refresh token."""

from __future__ import annotations

import base64
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx2 as httpx
import jwt

from jwtauth.config import Settings
from jwtauth.sessions import MAX_SPENT_TOKENS

from .conftest import (
    PASSWORD,
    Server,
    add_user,
    bearer,
    database_contents,
    query,
    spent_tokens,
    start_server,
    stop_server,
)


@contextmanager
def serving(env: dict[str, str], interval: float, *args: str) -> Iterator[Server]:
    """A real server with alice, and JWTAUTH_REFRESH_REUSE_INTERVAL=interval."""
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server({**env, "JWTAUTH_REFRESH_REUSE_INTERVAL": str(interval)}, *args)
    try:
        yield server
    finally:
        stop_server(server)


def login(server: Server) -> dict[str, str]:
    response = httpx.post(f"{server.url}/login", json={"email": "alice@example.com", "password": PASSWORD})
    assert response.status_code == 200, response.text
    body: dict[str, str] = response.json()
    return body


def refresh(server: Server, token: str) -> httpx.Response:
    return httpx.post(f"{server.url}/refresh", json={"refresh_token": token}, timeout=30)


def at_once(count: int, call: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """`count` calls started together from as many threads, each on its own connection."""
    start = threading.Barrier(count)

    def one(_: int) -> httpx.Response:
        start.wait()
        return call()

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def sid_of(pair: dict[str, str]) -> str:
    return str(jwt.decode(pair["access_token"], options={"verify_signature": False})["sid"])


def assert_invalid_grant(response: httpx.Response) -> None:
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant"), response.text


def test_fifty_concurrent_refreshes_over_two_workers_converge(env: dict[str, str]) -> None:
    with serving(env, 10, "--workers", "2") as server:
        first = login(server)

        answers = at_once(50, lambda: refresh(server, first["refresh_token"]))

        assert [answer.status_code for answer in answers] == [200] * 50, [a.text for a in answers if a.is_error]
        pairs = [answer.json() for answer in answers]
        assert len({pair["refresh_token"] for pair in pairs}) == 1  # one and the same refresh token
        assert {sid_of(pair) for pair in pairs} == {sid_of(first)}
        assert len({pair["access_token"] for pair in pairs}) == 50  # each its own access token
        assert refresh(server, pairs[0]["refresh_token"]).status_code == 200  # the session lives on
        assert httpx.get(f"{server.url}/userinfo", headers=bearer(pairs[-1]["access_token"])).status_code == 200


def test_concurrent_refreshes_of_many_sessions_each_get_the_access_token_of_their_own(env: dict[str, str]) -> None:
    """The access tokens of refreshes that a worker finds ready at once are signed in one round
    (tokens.SigningRounds); each answer still carries its own user's and session's."""
    accounts = [add_user(Settings.from_env(env), f"user{number}@example.com") for number in range(16)]
    server = start_server(env)
    try:
        pairs = [
            httpx.post(f"{server.url}/login", json={"email": account.email, "password": PASSWORD}).json()
            for account in accounts
        ]
        start = threading.Barrier(len(pairs))

        def refresh_one(pair: dict[str, str]) -> httpx.Response:
            start.wait()
            return refresh(server, pair["refresh_token"])

        with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
            answers = list(pool.map(refresh_one, pairs))

        assert [answer.status_code for answer in answers] == [200] * len(pairs), [a.text for a in answers]
        for account, pair, answer in zip(accounts, pairs, answers, strict=True):
            claims = jwt.decode(answer.json()["access_token"], options={"verify_signature": False})
            assert (claims["sub"], claims["email"], claims["sid"]) == (account.id, account.email, sid_of(pair))
            userinfo = httpx.get(f"{server.url}/userinfo", headers=bearer(answer.json()["access_token"]))
            assert (userinfo.status_code, userinfo.json()["sub"]) == (200, account.id)  # signed by the server
    finally:
        stop_server(server)


def test_two_tabs_that_race_keep_working_after_the_interval(env: dict[str, str]) -> None:
    """Tabs that refreshed at the same moment refresh at the same moment again, an access token later."""
    with serving(env, 1) as server:
        token = login(server)["refresh_token"]
        for _ in range(2):
            tabs = at_once(2, lambda token=token: refresh(server, token))  # type: ignore[misc]

            assert [tab.status_code for tab in tabs] == [200, 200]
            assert tabs[0].json()["refresh_token"] == tabs[1].json()["refresh_token"]
            token = tabs[0].json()["refresh_token"]
            time.sleep(1.1)  # past the interval

        assert httpx.get(f"{server.url}/userinfo", headers=bearer(tabs[1].json()["access_token"])).status_code == 200


def test_a_chain_within_the_interval_gives_the_newest_token(env: dict[str, str]) -> None:
    with serving(env, 10) as server:
        t0 = login(server)["refresh_token"]
        t1 = refresh(server, t0).json()["refresh_token"]
        t2 = refresh(server, t1).json()["refresh_token"]

        answers = [refresh(server, t0), refresh(server, t1)]

        assert [answer.status_code for answer in answers] == [200, 200]
        assert [answer.json()["refresh_token"] for answer in answers] == [t2, t2]


def test_reuse_after_the_interval_revokes_the_session(env: dict[str, str]) -> None:
    with serving(env, 1) as server:
        first = login(server)
        second = refresh(server, first["refresh_token"]).json()
        time.sleep(1.1)

        assert_invalid_grant(refresh(server, first["refresh_token"]))

        assert_invalid_grant(refresh(server, second["refresh_token"]))
        assert httpx.get(f"{server.url}/userinfo", headers=bearer(second["access_token"])).status_code == 401


def test_with_interval_0_exactly_one_of_two_racers_wins(env: dict[str, str]) -> None:
    with serving(env, 0, "--workers", "2") as server:
        first = login(server)

        racers = at_once(2, lambda: refresh(server, first["refresh_token"]))

        assert sorted(racer.status_code for racer in racers) == [200, 400]
        winner = next(racer.json() for racer in racers if racer.status_code == 200)
        assert_invalid_grant(refresh(server, winner["refresh_token"]))  # the loser's reuse revoked the session


def test_made_up_and_truncated_tokens_revoke_nothing(env: dict[str, str]) -> None:
    with serving(env, 10) as server:
        token = login(server)["refresh_token"]
        family, generation, secret, mac = token.split(".")
        before = query(env["JWTAUTH_DATABASE"], "select revoked_at, generation, token_hash from sessions")

        for forged in (
            f"{family}.{generation}.{'x' * 43}.{mac}",  # a made-up secret after the real prefix
            f"{family}.{generation}.{secret}.{'x' * 22}",
            f"{family}.{generation}.{secret}",
            f"{family}.{generation}.{secret[:20]}",
            token[:-3],  # truncated
            family,
            f"{family}.",
        ):
            assert_invalid_grant(refresh(server, forged))

        assert query(env["JWTAUTH_DATABASE"], "select revoked_at, generation, token_hash from sessions") == before
        assert refresh(server, token).status_code == 200


def test_white_space_around_a_token_is_ignored(env: dict[str, str]) -> None:
    with serving(env, 0) as server:
        token = login(server)["refresh_token"]
        for before, after, body in (
            ("", "\n", "json"),
            ("  ", " \r\n", "form"),
            ("\t", "", "json"),
        ):  # \n: curl -d @file
            padded = f"{before}{token}{after}"
            data = {"refresh_token": padded}
            if body == "json":
                response = httpx.post(f"{server.url}/refresh", json=data)
            else:
                response = httpx.post(f"{server.url}/token", data={**data, "grant_type": "refresh_token"})
            assert response.status_code == 200, (padded, response.text)
            token = response.json()["refresh_token"]

        revoked = httpx.post(f"{server.url}/revoke", data={"token": f" {token}\n"})

        assert revoked.status_code == 200
        assert_invalid_grant(refresh(server, token))


def test_the_database_never_holds_a_usable_refresh_token(env: dict[str, str]) -> None:
    issued: list[str] = []
    with serving(env, 10, "--workers", "2") as server:
        for _ in range(3):
            pair = login(server)
            issued.append(pair["refresh_token"])
            for step in range(2 * MAX_SPENT_TOKENS):
                if step % 4 == 0:  # races: concurrent refreshes of one token
                    answers = at_once(4, lambda token=issued[-1]: refresh(server, token))  # type: ignore[misc]
                else:
                    answers = [refresh(server, issued[-1])]
                assert {answer.status_code for answer in answers} == {200}
                issued.append(answers[0].json()["refresh_token"])
        contents = database_contents(env["JWTAUTH_DATABASE"])

    secrets = [token.split(".")[2] for token in issued]
    raw_secrets = [base64.urlsafe_b64decode(secret + "=") for secret in secrets]
    assert not [token for token in issued if token.encode() in contents]
    assert not [secret for secret in secrets if secret.encode() in contents]
    assert not [raw for raw in raw_secrets if raw in contents or raw.hex().encode() in contents]  # bytea as hex too
    spent = spent_tokens(env["JWTAUTH_DATABASE"])
    assert len(spent) == 3 and max(spent) <= MAX_SPENT_TOKENS  # one bounded row per session

"""Sessions: refresh rotation with reuse detection, revocation, logout, and clean-up (RFC 9700, RFC 7009)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Iterator

import httpx2 as httpx
import jwt
import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings
from jwtauth.passwords import PasswordHasher
from jwtauth.sessions import MAX_SPENT_TOKENS
from jwtauth.store.sqlite import MIGRATIONS

from .conftest import (
    NESTED_HEADER_TOKEN,
    PASSWORD,
    Account,
    Clock,
    add_user,
    bearer,
    login,
    query,
    run_cli,
    snapshot,
    spent_tokens,
    sqlite_at_schema,
    start_server,
    stop_server,
    table_counts,
)


def sid_of(pair: dict[str, object]) -> str:
    return str(jwt.decode(str(pair["access_token"]), options={"verify_signature": False})["sid"])


def refresh(client: TestClient, token: object) -> httpx.Response:
    return client.post("/refresh", json={"refresh_token": token})


def assert_invalid_grant(response: httpx.Response) -> None:
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant"), response.text
    assert "access_token" not in response.json()


def make_client(env: dict[str, str], clock: Clock, **variables: str) -> TestClient:
    settings = Settings.from_env({**env, **{f"JWTAUTH_{name.upper()}": value for name, value in variables.items()}})
    return TestClient(create_app(settings, clock=clock))


@pytest.fixture
def strict(env: dict[str, str], clock: Clock) -> Iterator[TestClient]:
    """No reuse interval: any second use of a refresh token is an attack."""
    with make_client(env, clock, refresh_reuse_interval="0") as client:
        yield client


@pytest.fixture
def lenient(env: dict[str, str], clock: Clock) -> Iterator[TestClient]:
    """A 10 s reuse interval, the default."""
    with make_client(env, clock, refresh_reuse_interval="10") as client:
        yield client


# Rotation


def test_refresh_rotates_within_the_session(strict: TestClient, alice: Account) -> None:
    first = login(strict, alice.email)

    response = refresh(strict, first["refresh_token"])

    assert response.status_code == 200
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert sid_of(second) == sid_of(first)
    assert (response.headers["cache-control"], response.headers["pragma"]) == ("no-store", "no-cache")
    assert refresh(strict, second["refresh_token"]).status_code == 200  # the new one works
    assert strict.get("/userinfo", headers=bearer(second["access_token"])).status_code == 200


def test_new_refresh_token_lives_the_full_ttl_from_its_issue(env: dict[str, str], clock: Clock, alice: Account) -> None:
    with make_client(env, clock, refresh_ttl="100") as client:
        pair = login(client, alice.email)
        clock.advance(90)
        pair = refresh(client, pair["refresh_token"]).json()
        clock.advance(90)  # 180 s after login, 90 s after the last refresh

        response = refresh(client, pair["refresh_token"])

    assert response.status_code == 200
    assert response.json()["refresh_expires_in"] == 100


def test_expired_refresh_token_is_invalid_grant(env: dict[str, str], clock: Clock, alice: Account) -> None:
    with make_client(env, clock, refresh_ttl="60") as client:
        pair = login(client, alice.email)
        clock.advance(60)

        assert_invalid_grant(refresh(client, pair["refresh_token"]))


@pytest.mark.parametrize("token", ["", "   ", None, 42, ["x"]])
def test_missing_or_malformed_refresh_token_is_invalid_request(
    strict: TestClient, settings: Settings, alice: Account, token: object
) -> None:
    login(strict, alice.email)
    before = snapshot(settings.database)

    response = strict.post("/refresh", json={"refresh_token": token})

    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert snapshot(settings.database) == before


def test_unknown_refresh_token_is_invalid_grant(strict: TestClient, settings: Settings, alice: Account) -> None:
    login(strict, alice.email)
    before = snapshot(settings.database)

    assert_invalid_grant(refresh(strict, "not-a-token-we-issued"))
    assert snapshot(settings.database) == before


def test_token_endpoint_refresh_grant_rotates(strict: TestClient, alice: Account) -> None:
    first = login(strict, alice.email)

    response = strict.post("/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})

    assert response.status_code == 200
    assert sid_of(response.json()) == sid_of(first)
    assert_invalid_grant(refresh(strict, first["refresh_token"]))


# Reuse detection


def test_reuse_with_interval_0_revokes_the_family(strict: TestClient, alice: Account) -> None:
    first = login(strict, alice.email)
    other_session = login(strict, alice.email)
    second = refresh(strict, first["refresh_token"]).json()

    assert_invalid_grant(refresh(strict, first["refresh_token"]))

    assert_invalid_grant(refresh(strict, second["refresh_token"]))  # the newest of the family fails too
    assert strict.get("/userinfo", headers=bearer(second["access_token"])).status_code == 401
    assert refresh(strict, other_session["refresh_token"]).status_code == 200  # untouched


def test_replay_of_a_token_spent_generations_ago_revokes_the_family(strict: TestClient, alice: Account) -> None:
    """A thief who keeps rotating a stolen token is found out when the owner presents the old one."""
    stolen = login(strict, alice.email)
    thiefs = refresh(strict, stolen["refresh_token"]).json()
    for _ in range(3):
        thiefs = refresh(strict, thiefs["refresh_token"]).json()

    assert_invalid_grant(refresh(strict, stolen["refresh_token"]))

    assert_invalid_grant(refresh(strict, thiefs["refresh_token"]))
    assert strict.get("/userinfo", headers=bearer(thiefs["access_token"])).status_code == 401


def test_the_sid_gives_no_hold_on_the_refresh_tokens(strict: TestClient, settings: Settings, alice: Account) -> None:
    """The sid is in every access token, so resource servers and logs see it: naming it does nothing."""
    pair = login(strict, alice.email)
    before = snapshot(settings.database)

    for made_up in (sid_of(pair) + ".made-up-secret", sid_of(pair)):
        assert_invalid_grant(refresh(strict, made_up))

    assert snapshot(settings.database) == before
    assert refresh(strict, pair["refresh_token"]).status_code == 200


def test_a_made_up_secret_under_a_live_family_changes_nothing(
    strict: TestClient, settings: Settings, alice: Account
) -> None:
    """The family id sits in the token's prefix, which logs may show: naming it gives no hold on the session."""
    pair = login(strict, alice.email)
    prefix, generation, secret, mac = str(pair["refresh_token"]).split(".")
    before = snapshot(settings.database)

    for made_up in (
        f"{prefix}.not-the-secret",
        f"{prefix}.{generation}.{'A' * 43}.{mac}",
        f"{prefix}.{generation}.{secret}.{'A' * 22}",
        f"{prefix}.{int(generation) + 1}.{secret}.{mac}",
        str(pair["refresh_token"])[:-1],
        f"{prefix}.{generation}.{secret}",
    ):
        assert_invalid_grant(refresh(strict, made_up))

    assert snapshot(settings.database) == before
    assert refresh(strict, pair["refresh_token"]).status_code == 200


def test_a_made_up_token_of_a_spent_generation_revokes_nothing(
    lenient: TestClient, clock: Clock, settings: Settings, alice: Account
) -> None:
    """Presenting a spent token after the interval revokes the session: a made-up one, naming a spent
    generation of a real family (as a log line shows them), must not."""
    first = login(lenient, alice.email)
    second = refresh(lenient, first["refresh_token"]).json()
    clock.advance(60)
    family, _, secret, mac = str(first["refresh_token"]).split(".")
    before = snapshot(settings.database)

    for forged in (f"{family}.0.{'A' * 43}.{mac}", f"{family}.0.{secret}.{'A' * 22}", f"{family}.0.{secret}"):
        assert_invalid_grant(refresh(lenient, forged))

    assert snapshot(settings.database) == before
    assert refresh(lenient, second["refresh_token"]).status_code == 200


def test_a_made_up_token_naming_no_session_changes_nothing(
    strict: TestClient, settings: Settings, alice: Account
) -> None:
    pair = login(strict, alice.email)
    before = snapshot(settings.database)

    for made_up in ("AAAAAAAAAAAAAAAAAAAAAA.secret", "too-short.secret", "no-dot-at-all"):
        assert_invalid_grant(refresh(strict, made_up))

    assert snapshot(settings.database) == before
    assert refresh(strict, pair["refresh_token"]).status_code == 200


def test_reuse_within_the_interval_gets_the_same_refresh_token(
    lenient: TestClient, clock: Clock, alice: Account
) -> None:
    first = login(lenient, alice.email)
    second = refresh(lenient, first["refresh_token"]).json()
    clock.advance(9.9)

    again = refresh(lenient, first["refresh_token"])

    assert again.status_code == 200
    assert again.json()["refresh_token"] == second["refresh_token"]
    assert again.json()["access_token"] != second["access_token"]  # a fresh access token
    assert sid_of(again.json()) == sid_of(first)
    assert refresh(lenient, second["refresh_token"]).status_code == 200  # the client goes on with it


def test_a_chain_within_the_interval_converges_on_the_live_token(
    lenient: TestClient, clock: Clock, alice: Account
) -> None:
    """T0 → T1 → T2 within the interval; T0 and T1 presented again both get T2."""
    tokens = [login(lenient, alice.email)["refresh_token"]]
    for _ in range(2):
        clock.advance(1)
        tokens.append(refresh(lenient, tokens[-1]).json()["refresh_token"])

    answers = [refresh(lenient, tokens[0]), refresh(lenient, tokens[1])]

    assert [answer.status_code for answer in answers] == [200, 200]
    assert [answer.json()["refresh_token"] for answer in answers] == [tokens[2], tokens[2]]
    assert refresh(lenient, tokens[2]).status_code == 200


def test_any_number_of_reuses_within_the_interval_never_end_the_session(lenient: TestClient, alice: Account) -> None:
    first = login(lenient, alice.email)
    second = refresh(lenient, first["refresh_token"]).json()

    answers = [refresh(lenient, first["refresh_token"]) for _ in range(30)]

    assert {answer.status_code for answer in answers} == {200}
    assert {answer.json()["refresh_token"] for answer in answers} == {second["refresh_token"]}
    assert refresh(lenient, second["refresh_token"]).status_code == 200


def test_the_interval_is_measured_below_a_second(env: dict[str, str], clock: Clock, alice: Account) -> None:
    clock.now = float(int(clock.now)) + 0.9  # a rotation late in one second, its reuse early in the next
    with make_client(env, clock, refresh_reuse_interval="1") as client:
        first = login(client, alice.email)
        second = refresh(client, first["refresh_token"]).json()
        clock.advance(0.5)
        within = refresh(client, first["refresh_token"])
        clock.advance(0.6)  # 1.1 s after the rotation

        after = refresh(client, first["refresh_token"])

    assert (within.status_code, within.json()["refresh_token"]) == (200, second["refresh_token"])
    assert_invalid_grant(after)


def test_two_tabs_that_raced_both_carry_on_after_the_interval(
    lenient: TestClient, clock: Clock, alice: Account
) -> None:
    """Two tabs refresh the same token at once, and each keeps the answer it got; the session never forks,
    so both hold the same token, and the one that refreshes second gets the other's newer token."""
    first = login(lenient, alice.email)
    tab_a = refresh(lenient, first["refresh_token"]).json()
    tab_b = refresh(lenient, first["refresh_token"]).json()
    assert tab_a["refresh_token"] == tab_b["refresh_token"]
    clock.advance(60)

    tab_a = refresh(lenient, tab_a["refresh_token"]).json()
    tab_b_response = refresh(lenient, tab_b["refresh_token"])

    assert tab_b_response.status_code == 200
    assert tab_b_response.json()["refresh_token"] == tab_a["refresh_token"]
    clock.advance(60)
    assert refresh(lenient, tab_a["refresh_token"]).status_code == 200


def test_a_token_from_before_the_last_five_rotations_is_taken_as_theft(lenient: TestClient, alice: Account) -> None:
    """Within the interval a session remembers its five newest spent tokens: enough for a client's
    concurrent refreshes, while a fast thief cannot make it keep every token it ever spent."""
    tokens = [login(lenient, alice.email)["refresh_token"]]
    for _ in range(6):  # six rotations within the interval: the first token drops out of the newest five
        tokens.append(refresh(lenient, tokens[-1]).json()["refresh_token"])

    remembered = refresh(lenient, tokens[1])
    assert (remembered.status_code, remembered.json()["refresh_token"]) == (200, tokens[-1])

    assert_invalid_grant(refresh(lenient, tokens[0]))

    assert_invalid_grant(refresh(lenient, tokens[-1]))  # the session is revoked
    assert lenient.get("/userinfo", headers=bearer(remembered.json()["access_token"])).status_code == 401


def test_reuse_after_the_interval_revokes_the_family(lenient: TestClient, clock: Clock, alice: Account) -> None:
    first = login(lenient, alice.email)
    second = refresh(lenient, first["refresh_token"]).json()
    clock.advance(11)

    assert_invalid_grant(refresh(lenient, first["refresh_token"]))

    assert_invalid_grant(refresh(lenient, second["refresh_token"]))
    assert lenient.get("/userinfo", headers=bearer(second["access_token"])).status_code == 401


def test_concurrent_refreshes_across_two_workers_give_exactly_one_pair(env: dict[str, str]) -> None:
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server({**env, "JWTAUTH_REFRESH_REUSE_INTERVAL": "0"}, "--workers", "2")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            pair = http.post("/login", json={"email": "alice@example.com", "password": PASSWORD}).json()
        start = threading.Barrier(20)

        def refresh_once(_: int) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                start.wait()
                return http.post("/refresh", json={"refresh_token": pair["refresh_token"]})

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(refresh_once, range(20)))
        statuses = sorted(response.status_code for response in responses)
        winner = next(response.json() for response in responses if response.status_code == 200)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            winner_refresh = http.post("/refresh", json={"refresh_token": winner["refresh_token"]})
            winner_userinfo = http.get("/userinfo", headers=bearer(winner["access_token"]))
    finally:
        stop_server(server)

    assert statuses == [200] + [400] * 19
    assert {response.json()["error"] for response in responses if response.status_code == 400} == {"invalid_grant"}
    # The 19 reuses revoked the family: the winner's tokens are dead too, and nothing of it is left to use.
    assert (winner_refresh.status_code, winner_userinfo.status_code) == (400, 401)
    assert query(env["JWTAUTH_DATABASE"], "select revoked_at is not null from sessions") == [(1,)]
    assert spent_tokens(env["JWTAUTH_DATABASE"]) == [0]


# Revoke (RFC 7009)


def test_revoke_a_refresh_token_ends_its_session(strict: TestClient, alice: Account) -> None:
    pair = login(strict, alice.email)
    other = login(strict, alice.email)

    response = strict.post("/revoke", data={"token": pair["refresh_token"], "token_type_hint": "refresh_token"})

    assert (response.status_code, response.json()) == (200, {})
    assert_invalid_grant(refresh(strict, pair["refresh_token"]))
    assert strict.get("/userinfo", headers=bearer(pair["access_token"])).status_code == 401
    assert refresh(strict, other["refresh_token"]).status_code == 200


def test_revoke_an_access_token_ends_its_session(strict: TestClient, alice: Account) -> None:
    pair = login(strict, alice.email)

    response = strict.post("/revoke", json={"token": pair["access_token"], "token_type_hint": "access_token"})

    assert response.status_code == 200
    assert_invalid_grant(refresh(strict, pair["refresh_token"]))
    assert strict.get("/userinfo", headers=bearer(pair["access_token"])).status_code == 401


@pytest.mark.parametrize(
    "token", ["unknown-token", "eyJhbGciOiJub25lIn0.eyJzaWQiOiJ4In0.", "a.b.c", "x" * 4000, NESTED_HEADER_TOKEN]
)
def test_revoke_an_unknown_or_malformed_token_is_200_and_changes_nothing(
    strict: TestClient, settings: Settings, alice: Account, token: str
) -> None:
    pair = login(strict, alice.email)
    before = snapshot(settings.database)

    response = strict.post("/revoke", data={"token": token})

    assert (response.status_code, response.json()) == (200, {})
    assert snapshot(settings.database) == before
    assert refresh(strict, pair["refresh_token"]).status_code == 200


def test_revoke_an_already_revoked_token_is_200(strict: TestClient, alice: Account) -> None:
    pair = login(strict, alice.email)
    assert strict.post("/revoke", data={"token": pair["refresh_token"]}).status_code == 200

    response = strict.post("/revoke", data={"token": pair["refresh_token"]})

    assert (response.status_code, response.json()) == (200, {})


@pytest.mark.parametrize("body", [{}, {"token": ""}, {"token": 1}, {"token_type_hint": "refresh_token"}])
def test_revoke_without_a_token_is_invalid_request(
    strict: TestClient, settings: Settings, alice: Account, body: dict[str, object]
) -> None:
    login(strict, alice.email)
    before = snapshot(settings.database)

    response = strict.post("/revoke", json=body)

    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert snapshot(settings.database) == before


# Logout


def test_logout_local_ends_only_the_bearers_session(strict: TestClient, alice: Account) -> None:
    one, two = login(strict, alice.email), login(strict, alice.email)

    response = strict.post("/logout", headers=bearer(one["access_token"]))

    assert (response.status_code, response.content) == (204, b"")
    assert_invalid_grant(refresh(strict, one["refresh_token"]))
    assert strict.get("/userinfo", headers=bearer(one["access_token"])).status_code == 401
    assert strict.get("/userinfo", headers=bearer(two["access_token"])).status_code == 200
    assert refresh(strict, two["refresh_token"]).status_code == 200


def test_logout_global_ends_every_session_of_the_user(strict: TestClient, settings: Settings, alice: Account) -> None:
    one, two = login(strict, alice.email), login(strict, alice.email)
    bob = add_user(settings, "bob@example.com")
    bobs = login(strict, bob.email)

    response = strict.post("/logout", headers=bearer(one["access_token"]), data={"scope": "global"})

    assert response.status_code == 204
    for pair in (one, two):
        assert_invalid_grant(refresh(strict, pair["refresh_token"]))
        assert strict.get("/userinfo", headers=bearer(pair["access_token"])).status_code == 401
    assert refresh(strict, bobs["refresh_token"]).status_code == 200


def test_logout_takes_scope_as_json(strict: TestClient, alice: Account) -> None:
    one, two = login(strict, alice.email), login(strict, alice.email)

    assert strict.post("/logout", headers=bearer(one["access_token"]), json={"scope": "global"}).status_code == 204
    assert_invalid_grant(refresh(strict, two["refresh_token"]))


@pytest.mark.parametrize("body", [{"scope": "everything"}, {"scope": 1}, {"scope": ""}])
def test_logout_with_a_bad_scope_is_invalid_request_and_ends_nothing(
    strict: TestClient, alice: Account, body: dict[str, object]
) -> None:
    pair = login(strict, alice.email)

    response = strict.post("/logout", headers=bearer(pair["access_token"]), json=body)

    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert refresh(strict, pair["refresh_token"]).status_code == 200


def test_logout_without_a_valid_bearer_is_401(strict: TestClient, alice: Account) -> None:
    pair = login(strict, alice.email)

    for headers in ({}, bearer("nonsense"), bearer(pair["refresh_token"])):
        response = strict.post("/logout", headers=headers)
        assert (response.status_code, response.json()["error"]) == (401, "invalid_token")
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert refresh(strict, pair["refresh_token"]).status_code == 200


def test_logout_twice_is_401_the_second_time(strict: TestClient, alice: Account) -> None:
    pair = login(strict, alice.email)
    strict.post("/logout", headers=bearer(pair["access_token"]))

    assert strict.post("/logout", headers=bearer(pair["access_token"])).status_code == 401


# The CLI ends sessions


@pytest.mark.parametrize(
    "command",
    [
        ("users", "revoke-sessions", "alice@example.com"),
        ("users", "disable", "alice@example.com"),
        ("users", "passwd", "alice@example.com", "--password-stdin"),
    ],
)
def test_cli_ends_every_session(env: dict[str, str], clock: Clock, alice: Account, command: tuple[str, ...]) -> None:
    with make_client(env, clock) as client:
        pairs = [login(client, alice.email), login(client, alice.email)]

        result = run_cli(*command, env=env, stdin="a brand new password\n")

        assert result.returncode == 0, result.stderr
        for pair in pairs:
            assert_invalid_grant(refresh(client, pair["refresh_token"]))
            assert client.get("/userinfo", headers=bearer(pair["access_token"])).status_code == 401


def test_revoke_sessions_all_logs_everyone_out(
    env: dict[str, str], clock: Clock, settings: Settings, alice: Account
) -> None:
    bob = add_user(settings, "bob@example.com")
    with make_client(env, clock) as client:
        pairs = [login(client, alice.email), login(client, bob.email), login(client, bob.email)]

        result = run_cli("users", "revoke-sessions", "--all", env=env)

        assert (result.returncode, result.stdout.strip()) == (0, "revoked 3 sessions")
        for pair in pairs:
            assert_invalid_grant(refresh(client, pair["refresh_token"]))


@pytest.mark.parametrize("args", [(), ("alice@example.com", "--all")])
def test_revoke_sessions_needs_an_email_or_all(env: dict[str, str], alice: Account, args: tuple[str, ...]) -> None:
    result = run_cli("users", "revoke-sessions", *args, env=env)

    assert (result.returncode, result.stderr.strip()) == (1, "jwtauth: give an EMAIL or --all")


def test_disabled_user_cannot_refresh_even_after_reenabling_the_old_session(
    env: dict[str, str], clock: Clock, alice: Account
) -> None:
    with make_client(env, clock) as client:
        pair = login(client, alice.email)
        run_cli("users", "disable", alice.email, env=env)
        assert_invalid_grant(refresh(client, pair["refresh_token"]))
        run_cli("users", "enable", alice.email, env=env)

        assert_invalid_grant(refresh(client, pair["refresh_token"]))
        assert login(client, alice.email)["token_type"] == "Bearer"


# Clean-up


def test_rows_stay_bounded_over_1000_rotations(strict: TestClient, settings: Settings, alice: Account) -> None:
    pairs = [login(strict, alice.email), login(strict, alice.email)]

    for round_ in range(500):
        for index, pair in enumerate(pairs):
            response = refresh(strict, pair["refresh_token"])
            assert response.status_code == 200, (round_, response.text)
            pairs[index] = response.json()

    assert table_counts(settings.database)["sessions"] == 2  # one row per session, whatever its rotations
    assert spent_tokens(settings.database) == [0, 0]  # with no reuse interval, nothing spent is worth remembering


def test_rows_stay_bounded_when_a_session_rotates_fast_within_the_interval(
    lenient: TestClient, settings: Settings, alice: Account
) -> None:
    pair = login(lenient, alice.email)

    for round_ in range(200):  # all at one instant of the clock: every spent token is within the interval
        response = refresh(lenient, pair["refresh_token"])
        assert response.status_code == 200, (round_, response.text)
        pair = response.json()
        for _ in range(round_ % 3):  # and concurrent uses of the new token's predecessor
            assert refresh(lenient, response.json()["refresh_token"]).status_code == 200

    assert table_counts(settings.database)["sessions"] == 1
    assert spent_tokens(settings.database) == [MAX_SPENT_TOKENS]


def legacy_token(family: str) -> str:
    """A refresh token of the format from before generations: `<family>.<256 bits>`."""
    return f"{family}.{'s' * 43}"


@pytest.mark.sqlite_only
def test_sessions_survive_the_upgrade_from_schema_3(settings: Settings, clock: Clock) -> None:
    """A session's live token from before generations goes on working once, and is then replaced; a
    session from before families (schema 2) ends."""
    family, now = "F" * 22, int(clock())
    with contextlib.closing(sqlite_at_schema(settings.database, 3)) as conn, conn:
        password_hash = PasswordHasher(settings.argon2).hash(PASSWORD)
        conn.execute("insert into users values ('u1', 'old@example.com', '', ?, 0, ?, ?)", [password_hash, now, now])
        conn.execute("insert into sessions (id, user_id, created_at, family) values ('s1', 'u1', ?, ?)", [now, family])
        conn.execute("insert into sessions (id, user_id, created_at) values ('s0', 'u1', ?)", [now])
        for session_id, old_token in (("s1", legacy_token(family)), ("s0", "from-before-families")):
            hashed = hashlib.sha256(old_token.encode()).hexdigest()
            conn.execute("insert into refresh_tokens values (?, ?, ?, ?, null)", [hashed, session_id, now, now + 60])

    with TestClient(create_app(settings, clock=clock)) as client:
        response = refresh(client, legacy_token(family))
        assert_invalid_grant(refresh(client, "from-before-families"))

        assert response.status_code == 200, response.text
        assert sid_of(response.json()) == "s1"
        assert refresh(client, response.json()["refresh_token"]).status_code == 200
    assert query(settings.database, "select id, generation from sessions") == [("s1", 2)]
    assert query(settings.database, "pragma foreign_key_check") == []
    assert query(settings.database, "pragma user_version")[0][0] == len(MIGRATIONS)


@pytest.mark.sqlite_only
def test_the_live_token_survives_the_upgrade_from_schema_4(settings: Settings, clock: Clock) -> None:
    """Of a schema-4 session's tokens, the newest unspent one stays live; spent ones and forks are forgotten
    (presenting one changes nothing, since a token without a MAC cannot be told from a made-up one)."""
    family, now = "G" * 22, int(clock())
    live, fork, spent = (f"{family}.{letter * 43}" for letter in "lfs")
    with contextlib.closing(sqlite_at_schema(settings.database, 4)) as conn, conn:
        password_hash = PasswordHasher(settings.argon2).hash(PASSWORD)
        conn.execute("insert into users values ('u1', 'old@example.com', '', ?, 0, ?, ?)", [password_hash, now, now])
        conn.execute("insert into sessions (id, user_id, created_at, family) values ('s1', 'u1', ?, ?)", [now, family])
        for token, used_at, generation in ((spent, now, 1), (fork, None, 2), (live, None, 3)):
            conn.execute(
                "insert into refresh_tokens values ('s1', ?, ?, ?, ?, ?)",
                [hashlib.sha256(token.encode()).hexdigest(), now, now + 60, used_at, generation],
            )

    with TestClient(create_app(settings, clock=clock)) as client:
        assert_invalid_grant(refresh(client, spent))
        assert_invalid_grant(refresh(client, fork))

        response = refresh(client, live)
        assert response.status_code == 200, response.text
        assert refresh(client, response.json()["refresh_token"]).status_code == 200


def schema_4_session(settings: Settings, clock: Clock, family: str) -> str:
    """A database of schema 4 with one session whose live token is of the old format; that token."""
    token, now = f"{family}.{'l' * 43}", int(clock())
    with contextlib.closing(sqlite_at_schema(settings.database, 4)) as conn, conn:
        password_hash = PasswordHasher(settings.argon2).hash(PASSWORD)
        conn.execute("insert into users values ('u1', 'old@example.com', '', ?, 0, ?, ?)", [password_hash, now, now])
        conn.execute("insert into sessions (id, user_id, created_at, family) values ('s1', 'u1', ?, ?)", [now, family])
        conn.execute(
            "insert into refresh_tokens values ('s1', ?, ?, ?, null, 0)",
            [hashlib.sha256(token.encode()).hexdigest(), now, now + 60],
        )
    return token


@pytest.mark.sqlite_only
def test_a_token_from_before_the_upgrade_converges_within_the_interval_and_revokes_after(
    settings: Settings, clock: Clock
) -> None:
    """The first refresh after the upgrade is raced by two tabs like any other; a replay of the old token
    after the interval revokes, as before the upgrade; a made-up token in the old format changes nothing."""
    old = schema_4_session(settings, clock, "H" * 22)

    with TestClient(create_app(settings, clock=clock)) as client:
        tabs = [refresh(client, old), refresh(client, old)]
        assert [tab.status_code for tab in tabs] == [200, 200]
        assert tabs[0].json()["refresh_token"] == tabs[1].json()["refresh_token"]
        assert_invalid_grant(refresh(client, f"{'H' * 22}.{'m' * 43}"))  # made up: nothing happens
        assert refresh(client, tabs[0].json()["refresh_token"]).status_code == 200
        clock.advance(60)

        assert_invalid_grant(refresh(client, old))

        assert query(settings.database, "select revoked_at is not null from sessions") == [(1,)]


def test_expired_tokens_and_ended_sessions_are_deleted(env: dict[str, str], clock: Clock, alice: Account) -> None:
    with make_client(env, clock, refresh_ttl="60") as client:
        login(client, alice.email)
        revoked = login(client, alice.email)
        client.post("/revoke", data={"token": revoked["refresh_token"]})
        live = login(client, alice.email)
        clock.advance(30)
        live = refresh(client, live["refresh_token"]).json()
    clock.advance(1000)  # past the first session's expiry and the revoked one's access tokens

    with make_client(env, clock, refresh_ttl="2000") as client:  # a start sweeps
        counts = table_counts(env["JWTAUTH_DATABASE"])

        assert refresh(client, live["refresh_token"]).status_code == 400  # it had expired: 60 s TTL
    assert counts["sessions"] == 0


def test_sweep_keeps_live_sessions(env: dict[str, str], clock: Clock, alice: Account) -> None:
    with make_client(env, clock) as client:
        pair = login(client, alice.email)
    clock.advance(3600)

    with make_client(env, clock) as client:
        assert refresh(client, pair["refresh_token"]).status_code == 200


# Audit trail


def test_each_action_logs_one_audit_event_without_secrets(
    strict: TestClient, alice: Account, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pair = login(strict, alice.email)
    strict.post("/login", json={"email": alice.email, "password": "wrong password"})
    second = refresh(strict, pair["refresh_token"]).json()
    refresh(strict, pair["refresh_token"])  # reuse: the family is revoked
    third = login(strict, alice.email)
    strict.post("/revoke", data={"token": third["refresh_token"]})
    fourth = login(strict, alice.email)
    strict.post("/logout", headers=bearer(fourth["access_token"]))

    events = [getattr(record, "event", None) for record in caplog.records if record.name == "jwtauth.audit"]
    assert events == [
        "login_succeeded",
        "login_failed",
        "refresh",
        "refresh_reuse_detected",
        "login_succeeded",
        "revoke",
        "login_succeeded",
        "logout",
    ]
    text = caplog.text + json.dumps([vars(record) for record in caplog.records], default=str)  # and extra fields
    secrets = [alice.password, "wrong password"]
    secrets += [str(p[k]) for p in (pair, second, third, fourth) for k in ("access_token", "refresh_token")]
    assert not [secret for secret in secrets if secret in text]

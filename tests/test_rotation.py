"""The key lifecycle: next → current → retired → deleted, on schedule and on demand, across workers and crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import jwt
import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings

from .conftest import (
    Account,
    Clock,
    add_user,
    age_keys,
    bearer,
    key_entries,
    kid_in_state,
    login,
    run_cli,
    start_server,
    stop_server,
    stored_keys,
    without_keys,
)


def published_kids(client: TestClient | httpx.Client) -> list[str]:
    return [key["kid"] for key in client.get("/.well-known/jwks.json").json()["keys"]]


def kid_of(token: object) -> str:
    return str(jwt.get_unverified_header(str(token))["kid"])


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until the server's once-a-second key check has acted, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the server did not act in time"
        time.sleep(0.05)


def fresh_env_of(settings: Settings) -> dict[str, str]:
    """The variables that reach the key set of an installation's settings."""
    env = {"JWTAUTH_DATABASE": settings.database, "JWTAUTH_KEYS_DIR": str(settings.keys_dir)}
    return {**env, "JWTAUTH_KEYS_PASSPHRASE": settings.keys_passphrase.decode()} if settings.keys_passphrase else env


def verifies_through_jwks(client: TestClient, token: object, settings: Settings) -> bool:
    jwks = client.get("/.well-known/jwks.json").json()
    key = next((jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid_of(token)), None)
    if key is None:
        return False
    # The signature through the published key; the times belong to the test's clock, not the system's.
    jwt.decode(str(token), key, algorithms=["RS256"], audience=settings.audience, issuer=settings.issuer,
               options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})  # fmt: skip
    return True


@pytest.fixture
def fresh_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Keys created by the app under test, on its own clock; quick timings: 1000 s keys, 100 s JWKS cache."""
    return {
        **without_keys(env, tmp_path),
        "JWTAUTH_KEY_ROTATE_EVERY": "1000",
        "JWTAUTH_JWKS_MAX_AGE": "100",
        "JWTAUTH_ACCESS_TTL": "60",
        "JWTAUTH_LEEWAY": "5",
    }


@pytest.fixture
def lifecycle(fresh_env: dict[str, str], alice: Account) -> Iterator[tuple[TestClient, Clock, Settings]]:
    clock = Clock()
    settings = Settings.from_env(fresh_env)
    with TestClient(create_app(settings, clock=clock)) as client:
        yield client, clock, settings


def test_lifecycle_on_schedule(lifecycle: tuple[TestClient, Clock, Settings], alice: Account) -> None:
    client, clock, settings = lifecycle
    env = fresh_env_of(settings)
    first, upcoming = kid_in_state(env, "current"), kid_in_state(env, "next")
    # Publication ahead of use: both are published, only the current key signs.
    assert published_kids(client) == [first, upcoming]
    clock.advance(990)
    old_token = login(client, alice.email)["access_token"]
    assert kid_of(old_token) == first

    clock.advance(10)  # the rotation is due: 1000 s after the first start
    wait_for(lambda: kid_in_state(env, "current") == upcoming)

    third = kid_in_state(env, "next")
    wait_for(lambda: published_kids(client) == [first, upcoming, third])
    assert kid_of(login(client, alice.email)["access_token"]) == upcoming
    assert verifies_through_jwks(client, old_token, settings)  # the retired key still verifies
    assert client.get("/userinfo", headers=bearer(old_token)).status_code == 200

    clock.advance(60 + 5 + 100 - 1)  # retired for access TTL + leeway + max-age, less one second
    time.sleep(1.2)  # a key check runs: nothing is due
    assert first in published_kids(client)

    clock.advance(1)
    wait_for(lambda: published_kids(client) == [upcoming, third])
    assert first not in stored_keys(env).pems
    assert [entry["state"] for entry in key_entries(env)] == ["current", "next"]


def test_due_rotation_waits_for_the_next_key_to_be_published_long_enough(
    fresh_env: dict[str, str], alice: Account
) -> None:
    clock = Clock()
    settings = Settings.from_env({**fresh_env, "JWTAUTH_KEY_ROTATE_EVERY": "10", "JWTAUTH_JWKS_MAX_AGE": "300"})
    with TestClient(create_app(settings, clock=clock)) as client:
        env = fresh_env_of(settings)
        first, upcoming = kid_in_state(env, "current"), kid_in_state(env, "next")
        clock.advance(301)  # due since 291 s, but the next key can sign only from 302 s (300 + 2 s pick-up)
        time.sleep(1.2)
        assert kid_of(login(client, alice.email)["access_token"]) == first

        clock.advance(1)
        wait_for(lambda: kid_of(login(client, alice.email)["access_token"]) == upcoming)


def test_etag_changes_when_the_key_set_does(lifecycle: tuple[TestClient, Clock, Settings]) -> None:
    client, clock, _ = lifecycle
    before = client.get("/.well-known/jwks.json").headers["etag"]
    clock.advance(1000)
    wait_for(lambda: client.get("/.well-known/jwks.json").headers["etag"] != before)

    stale = client.get("/.well-known/jwks.json", headers={"If-None-Match": before})

    assert stale.status_code == 200
    assert len(stale.json()["keys"]) == 3


# On demand, from another process


def test_rotate_is_refused_while_the_next_key_is_too_young(env: dict[str, str], tmp_path: Path) -> None:
    fresh = without_keys(env, tmp_path)
    assert run_cli("keys", "list", env=fresh).returncode == 0  # a key set made now; max-age is 300 s
    before = key_entries(fresh)

    result = run_cli("keys", "rotate", env=fresh)

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--force" in result.stderr and "rotate can run from 20" in result.stderr
    assert key_entries(fresh) == before


def test_rotate_force_rotates_at_once(env: dict[str, str]) -> None:
    current, upcoming = kid_in_state(env, "current"), kid_in_state(env, "next")

    result = run_cli("keys", "rotate", "--force", env=env)

    assert result.returncode == 0, result.stderr
    states = {entry["kid"]: entry["state"] for entry in key_entries(env)}
    assert (states.pop(current), states.pop(upcoming), list(states.values())) == ("retired", "current", ["next"])


def test_rotate_without_force_once_the_next_key_is_old_enough(env: dict[str, str]) -> None:
    age_keys(env, 3600)  # a key set made an hour ago
    upcoming = kid_in_state(env, "next")

    result = run_cli("keys", "rotate", env=env)

    assert result.returncode == 0, result.stderr
    assert kid_in_state(env, "current") == upcoming


def test_new_keys_have_the_configured_size(env: dict[str, str]) -> None:
    run_cli("keys", "rotate", "--force", env={**env, "JWTAUTH_KEY_SIZE": "3072"})

    listed = json.loads(run_cli("keys", "list", "--json", env=env).stdout)

    assert [(key["state"], key["size"]) for key in listed] == [("retired", 2048), ("current", 2048), ("next", 3072)]
    assert {"kid", "alg", "created_at"} <= listed[0].keys() and listed[0]["alg"] == "RS256"
    assert [sorted(key.keys() - {"kid", "state", "alg", "size", "created_at"}) for key in listed] == [
        ["activated_at", "deletes_at", "retired_at"],
        ["activated_at", "rotates_at"],
        ["signs_from"],
    ]


def test_prune_deletes_only_keys_whose_tokens_have_expired(env: dict[str, str]) -> None:
    retired = kid_in_state(env, "current")
    run_cli("keys", "rotate", "--force", env=env)

    assert run_cli("keys", "prune", env=env).stdout.strip() == "nothing to delete"
    # Access TTL 1 s, leeway 0, max-age 0: the retired key is spent 1 s after its retirement.
    short = {**env, "JWTAUTH_ACCESS_TTL": "1", "JWTAUTH_LEEWAY": "0", "JWTAUTH_JWKS_MAX_AGE": "0"}
    time.sleep(1.1)
    result = run_cli("keys", "prune", env=short)

    assert result.stdout.strip() == f"deleted {retired}"
    assert [entry["state"] for entry in key_entries(env)] == ["current", "next"]
    assert retired not in stored_keys(env).pems


def test_prune_force_deletes_a_leaked_key_at_once(env: dict[str, str]) -> None:
    leaked = kid_in_state(env, "current")
    run_cli("keys", "rotate", "--force", env=env)

    result = run_cli("keys", "prune", "--force", env=env)

    assert result.stdout.strip() == f"deleted {leaked}"
    assert [entry["state"] for entry in key_entries(env)] == ["current", "next"]
    with TestClient(create_app(Settings.from_env(env))) as client:
        assert leaked not in published_kids(client)


def test_every_worker_signs_with_the_new_key_within_2_s(env: dict[str, str]) -> None:
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server(env, "--workers", "2")
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:

            def fresh_token() -> str:  # a connection of its own, so that logins reach both workers
                with httpx.Client(base_url=server.url, timeout=10) as own:
                    return str(login(own, "alice@example.com")["access_token"])

            old_token = fresh_token()
            result = run_cli("keys", "rotate", "--force", env=env)
            rotated_at = time.monotonic()
            assert result.returncode == 0, result.stderr
            new_kid = kid_in_state(env, "current")
            time.sleep(max(0.0, rotated_at + 2 - time.monotonic()))

            kids = [kid_of(fresh_token()) for _ in range(60)]
            old_still_works = http.get("/userinfo", headers=bearer(old_token)).status_code
            jwks_client = jwt.PyJWKClient(f"{server.url}/.well-known/jwks.json")
            old_claims = jwt.decode(old_token, jwks_client.get_signing_key_from_jwt(old_token), algorithms=["RS256"],
                                    audience="jwtauth", issuer=env["JWTAUTH_ISSUER"])  # fmt: skip
    finally:
        stop_server(server)

    assert kid_of(old_token) != new_kid
    assert set(kids) == {new_kid}
    assert old_still_works == 200
    assert old_claims["email"] == "alice@example.com"


# Crash safety


def test_rotation_killed_at_any_moment_leaves_a_usable_set(env: dict[str, str]) -> None:
    clean = {**{k: v for k, v in os.environ.items() if not k.startswith("JWTAUTH_")}, **env}
    signers = {kid_in_state(env, "current")}
    for delay in (0.2, 0.35, 0.5, 0.65, 0.8, 1.0):  # through the phases of a rotation: keys made, written, committed
        process = subprocess.Popen([sys.executable, "-m", "jwtauth", "keys", "rotate", "--force"], env=clean,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()

        listed = run_cli("keys", "list", "--json", env=env)
        assert listed.returncode == 0, (delay, listed.stderr)
        states = [key["state"] for key in json.loads(listed.stdout)]
        assert states.count("current") == 1 and states.count("next") == 1, (delay, states)
        signers.add(kid_in_state(env, "current"))
        assert signers <= {key["kid"] for key in json.loads(listed.stdout)}  # no key that signed was lost

    assert run_cli("keys", "prune", env=env).returncode == 0
    assert set(stored_keys(env).pems) == {entry["kid"] for entry in key_entries(env)}  # no key left half made


@pytest.mark.sqlite_only
def test_leftovers_of_an_interrupted_rotation_are_ignored_then_pruned(env: dict[str, str], alice: Account) -> None:
    keys_dir = Path(env["JWTAUTH_KEYS_DIR"])
    before = key_entries(env)
    template_pem = next(keys_dir.glob("*.pem")).read_bytes()
    (keys_dir / "orphan.pem").write_bytes(template_pem)  # written, but the metadata was never committed
    (keys_dir / ".keyset.json.tmp").write_text('{"keys": [{"kid": "half')  # died while writing the metadata
    (keys_dir / ".another.pem.tmp").write_bytes(template_pem[:100])  # died while writing a PEM

    with TestClient(create_app(Settings.from_env(env))) as client:
        assert len(published_kids(client)) == 2
        assert client.get("/healthz").status_code == 200
        assert login(client, alice.email)["token_type"] == "Bearer"

    assert key_entries(env) == before
    assert run_cli("keys", "prune", env=env).stdout.strip() == "deleted orphan"
    assert sorted(path.name for path in keys_dir.iterdir() if path.name != ".lock") == sorted(
        [f"{entry['kid']}.pem" for entry in before] + ["keyset.json", "refresh.secret"]
    )


@pytest.mark.sqlite_only
def test_corrupt_pem_stops_serve_naming_the_file(env: dict[str, str]) -> None:
    keys_dir = Path(env["JWTAUTH_KEYS_DIR"])
    pem = keys_dir / f"{kid_in_state(env, 'next')}.pem"
    pem.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    files = sorted(path.name for path in keys_dir.iterdir())

    result = run_cli("serve", "--port", "1", env=env)

    assert result.returncode == 1
    assert str(pem) in result.stderr and "Traceback" not in result.stderr
    assert sorted(path.name for path in keys_dir.iterdir()) == files

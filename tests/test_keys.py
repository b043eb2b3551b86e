"""The key store as users meet it: the keys directory on disk, the JWKS, and `jwtauth keys list`."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings
from jwtauth.store import is_postgres_url

from .conftest import (
    Account,
    add_user,
    key_entries,
    kid_in_state,
    login,
    private_key,
    run_cli,
    stored_keys,
    without_keys,
)

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
PASSPHRASE = "open sesame, but longer"


def b64url_uint(value: int) -> str:
    data = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rfc7638_thumbprint(e: str, n: str) -> str:
    """RFC 7638 §3: SHA-256 of the required members in lexicographic order, no white space."""
    canonical = '{"e":"' + e + '","kty":"RSA","n":"' + n + '"}'
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def keyset_entries(keys_dir: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((keys_dir / "keyset.json").read_text())["keys"]
    return entries


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a directory with its mode and bytes: to show that nothing was deleted or changed."""
    return {path.name: (path.stat().st_mode, path.read_bytes()) for path in directory.iterdir()}


@pytest.fixture
def fresh_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The installation's environment before its first start: no key set yet (for SQLite, a keys directory
    that does not exist yet)."""
    fresh = without_keys(env, tmp_path)
    assert is_postgres_url(fresh["JWTAUTH_DATABASE"]) or not Path(fresh["JWTAUTH_KEYS_DIR"]).exists()
    return fresh


@pytest.fixture
def fresh_settings(fresh_env: dict[str, str]) -> Settings:
    return Settings.from_env(fresh_env)


@pytest.fixture
def fresh_client(fresh_settings: Settings) -> Iterator[TestClient]:
    """The first start of a server: it creates its keys."""
    with TestClient(create_app(fresh_settings)) as client:
        yield client


@pytest.fixture
def encrypted_env(fresh_env: dict[str, str]) -> dict[str, str]:
    return {**fresh_env, "JWTAUTH_KEYS_PASSPHRASE": PASSPHRASE}


# First start


def test_first_start_creates_a_current_and_a_next_key(fresh_client: TestClient, fresh_env: dict[str, str]) -> None:
    entries = key_entries(fresh_env)

    assert sorted(entry["state"] for entry in entries) == ["current", "next"]
    kids = {entry["kid"] for entry in entries}
    assert len(kids) == 2
    assert set(stored_keys(fresh_env).pems) == kids


@pytest.mark.sqlite_only
def test_first_start_writes_unencrypted_pkcs8_pems(fresh_client: TestClient, fresh_settings: Settings) -> None:
    pems = sorted(fresh_settings.keys_dir.glob("*.pem"))
    assert len(pems) == 2  # the current key and the next one
    for path in pems:
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n"), path
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 2048


@pytest.mark.sqlite_only
def test_first_start_makes_the_keys_private(fresh_client: TestClient, fresh_settings: Settings) -> None:
    pems = list(fresh_settings.keys_dir.glob("*.pem"))

    assert stat.S_IMODE(fresh_settings.keys_dir.stat().st_mode) == 0o700
    assert len(pems) == 2
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in pems} == {path.name: 0o600 for path in pems}


@pytest.mark.sqlite_only
def test_first_start_makes_an_existing_keys_dir_private(fresh_settings: Settings) -> None:
    fresh_settings.keys_dir.mkdir(mode=0o755)  # as a checkout's keys/ is

    with TestClient(create_app(fresh_settings)):
        pass

    assert stat.S_IMODE(fresh_settings.keys_dir.stat().st_mode) == 0o700


def test_second_start_keeps_the_keys(
    fresh_client: TestClient, fresh_settings: Settings, fresh_env: dict[str, str]
) -> None:
    before = stored_keys(fresh_env)

    with TestClient(create_app(fresh_settings)) as client:
        assert client.get("/healthz").status_code == 200

    after = stored_keys(fresh_env)
    assert (after.entries, dict(after.pems), after.refresh_secret) == (before.entries, dict(before.pems),
                                                                       before.refresh_secret)  # fmt: skip


# JWKS


def test_jwks_publishes_both_keys_and_no_private_member(fresh_client: TestClient, fresh_env: dict[str, str]) -> None:
    keys = fresh_client.get("/.well-known/jwks.json").json()["keys"]

    on_disk = key_entries(fresh_env)
    assert sorted(key["kid"] for key in keys) == sorted(entry["kid"] for entry in on_disk)
    for key in keys:
        assert set(key) == {"kty", "n", "e", "kid", "alg", "use"}
        assert not PRIVATE_MEMBERS & set(key)
        assert (key["kty"], key["alg"], key["use"]) == ("RSA", "RS256", "sig")


def test_rfc7638_thumbprint_helper_matches_the_rfc_example() -> None:
    # RFC 7638 §3.1: the example key and its thumbprint, so the next test checks against a known-good helper.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
        "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgd"
        "AZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur"
        "-kEgU8awapJzKnqDKgw"
    )

    assert rfc7638_thumbprint("AQAB", n) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_kid_is_the_rfc7638_thumbprint_of_the_stored_key(fresh_client: TestClient, fresh_env: dict[str, str]) -> None:
    published = {key["kid"]: key for key in fresh_client.get("/.well-known/jwks.json").json()["keys"]}
    stored = list(stored_keys(fresh_env).pems)

    assert len(stored) == len(published) == 2
    for stored_kid in stored:
        numbers = private_key(fresh_env, stored_kid).public_key().public_numbers()
        e, n = b64url_uint(numbers.e), b64url_uint(numbers.n)
        kid = rfc7638_thumbprint(e, n)
        assert stored_kid == kid
        assert (published[kid]["e"], published[kid]["n"]) == (e, n)


def test_jwks_is_cacheable_for_max_age_with_an_etag(fresh_client: TestClient) -> None:
    response = fresh_client.get("/.well-known/jwks.json")

    assert response.status_code == 200
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.headers["etag"].strip('"')
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("form", ["{etag}", "W/{etag}", '"other", {etag}', "*"], ids=["exact", "weak", "list", "star"])
def test_jwks_with_a_matching_if_none_match_gets_304(fresh_client: TestClient, form: str) -> None:
    # RFC 9110 §13.1.2: If-None-Match uses the weak comparison, may list several tags, and `*` matches
    # any current representation; a GET whose condition is false MUST get 304.
    etag = fresh_client.get("/.well-known/jwks.json").headers["etag"]

    response = fresh_client.get("/.well-known/jwks.json", headers={"If-None-Match": form.format(etag=etag)})

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == "public, max-age=300"


def test_jwks_with_another_if_none_match_gets_the_keys(fresh_client: TestClient) -> None:
    response = fresh_client.get("/.well-known/jwks.json", headers={"If-None-Match": '"not-the-etag"'})

    assert response.status_code == 200
    assert len(response.json()["keys"]) == 2


def test_access_token_verifies_with_the_published_jwk(
    client: TestClient, settings: Settings, env: dict[str, str], alice: Account
) -> None:
    token = str(login(client, alice.email, alice.password)["access_token"])
    header = jwt.get_unverified_header(token)
    jwks = client.get("/.well-known/jwks.json").json()
    jwk = next(key for key in jwks["keys"] if key["kid"] == header["kid"])
    current = kid_in_state(env, "current")

    claims = jwt.decode(
        token, jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=settings.audience, issuer=settings.issuer
    )

    assert (header["alg"], header["typ"], header["kid"]) == ("RS256", "at+jwt", current)
    assert claims["sub"] == alice.id


# Passphrase


@pytest.mark.sqlite_only
def test_passphrase_encrypts_every_pem(encrypted_env: dict[str, str]) -> None:
    settings = Settings.from_env(encrypted_env)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200

    pems = list(settings.keys_dir.glob("*.pem"))
    assert len(pems) == 2
    for path in pems:
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"), path
        with pytest.raises(TypeError):  # cryptography: "Password was not given but private key is encrypted"
            serialization.load_pem_private_key(path.read_bytes(), password=None)


@pytest.mark.sqlite_only
def test_server_with_encrypted_keys_issues_verifiable_tokens(encrypted_env: dict[str, str]) -> None:
    settings = Settings.from_env(encrypted_env)
    alice = add_user(settings, "alice@example.com")

    with TestClient(create_app(settings)) as client:
        token = str(login(client, alice.email, alice.password)["access_token"])
        userinfo = client.get("/userinfo", headers={"Authorization": f"Bearer {token}"})
        jwks = client.get("/.well-known/jwks.json").json()

    assert userinfo.status_code == 200
    jwk = next(key for key in jwks["keys"] if key["kid"] == jwt.get_unverified_header(token)["kid"])
    claims = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=settings.audience)
    assert claims["sub"] == alice.id


# Keys that cannot be loaded: one clear line, exit 1, nothing touched


def assert_fails_naming_a_pem(result: subprocess.CompletedProcess[str], keys_dir: Path, pems: list[Path]) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert any(str(path) in lines[0] for path in pems), lines[0]


@pytest.mark.sqlite_only
@pytest.mark.parametrize("passphrase", ["wrong passphrase", None], ids=["wrong", "missing"])
def test_keys_list_with_the_wrong_passphrase_fails_and_changes_nothing(
    encrypted_env: dict[str, str], passphrase: str | None
) -> None:
    keys_dir = Path(encrypted_env["JWTAUTH_KEYS_DIR"])
    assert run_cli("keys", "list", env=encrypted_env).returncode == 0  # creates the encrypted keys
    before = snapshot(keys_dir)
    env = {name: value for name, value in encrypted_env.items() if name != "JWTAUTH_KEYS_PASSPHRASE"}
    if passphrase is not None:
        env["JWTAUTH_KEYS_PASSPHRASE"] = passphrase

    result = run_cli("keys", "list", env=env)

    assert_fails_naming_a_pem(result, keys_dir, list(keys_dir.glob("*.pem")))
    assert snapshot(keys_dir) == before


@pytest.mark.sqlite_only
def test_keys_list_with_a_passphrase_for_unencrypted_keys_fails_and_changes_nothing(env: dict[str, str]) -> None:
    keys_dir = Path(env["JWTAUTH_KEYS_DIR"])
    before = snapshot(keys_dir)

    result = run_cli("keys", "list", env={**env, "JWTAUTH_KEYS_PASSPHRASE": PASSPHRASE})

    assert_fails_naming_a_pem(result, keys_dir, list(keys_dir.glob("*.pem")))
    assert snapshot(keys_dir) == before


@pytest.mark.sqlite_only
@pytest.mark.parametrize("state", ["current", "next"])
@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty", "public key"])
def test_keys_list_with_a_corrupt_pem_fails_naming_it_and_changes_nothing(
    env: dict[str, str], state: str, corruption: str
) -> None:
    keys_dir = Path(env["JWTAUTH_KEYS_DIR"])
    kid = next(entry["kid"] for entry in keyset_entries(keys_dir) if entry["state"] == state)
    pem = keys_dir / f"{kid}.pem"
    original = pem.read_bytes()
    key = serialization.load_pem_private_key(original, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    pem.write_bytes(
        {
            "garbage": b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n",
            "truncated": original[: len(original) // 2],
            "empty": b"",
            "public key": key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }[corruption]
    )
    before = snapshot(keys_dir)

    result = run_cli("keys", "list", env=env)

    assert_fails_naming_a_pem(result, keys_dir, [pem])
    assert snapshot(keys_dir) == before


@pytest.mark.sqlite_only
def test_keys_list_with_a_missing_pem_fails_naming_it_and_changes_nothing(env: dict[str, str]) -> None:
    keys_dir = Path(env["JWTAUTH_KEYS_DIR"])
    kid = next(entry["kid"] for entry in keyset_entries(keys_dir) if entry["state"] == "next")
    (keys_dir / f"{kid}.pem").unlink()
    before = snapshot(keys_dir)

    result = run_cli("keys", "list", env=env)

    assert_fails_naming_a_pem(result, keys_dir, [keys_dir / f"{kid}.pem"])
    assert snapshot(keys_dir) == before

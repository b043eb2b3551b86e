"""The HTTP API as clients use it: login, /token, /userinfo, discovery, health, errors and limits."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings

from .conftest import (
    PASSWORD,
    Account,
    Clock,
    add_user,
    bearer,
    disable_user,
    full_width,
    login,
    query,
    table_counts,
)

TOKEN_FIELDS = {"access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_in"}


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return header, claims


def assert_error(response: object, status: int, error: str) -> None:
    from httpx2 import Response

    assert isinstance(response, Response)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error
    assert isinstance(body["error_description"], str) and body["error_description"]
    assert not TOKEN_FIELDS & body.keys()


# Login: the four cases of the original token API


def test_valid_credentials_get_a_token_pair(client: TestClient, alice: Account) -> None:
    response = client.post("/login", json={"email": alice.email, "password": alice.password})

    assert response.status_code == 200
    body = response.json()
    assert set(body) == TOKEN_FIELDS
    assert body["token_type"] == "Bearer"
    assert (body["expires_in"], body["refresh_expires_in"]) == (900, 2_592_000)
    family, generation, secret, mac = body["refresh_token"].split(".")
    assert len(family) == 22 and family not in body["access_token"]  # 128 bits, never shown elsewhere
    assert generation == "0"  # no rotation yet
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32  # 256 bits
    assert len(base64.urlsafe_b64decode(mac + "==")) == 16
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"


def test_wrong_password_gets_invalid_grant_and_no_tokens(client: TestClient, alice: Account) -> None:
    response = client.post("/login", json={"email": alice.email, "password": "wrong password"})

    assert_error(response, 400, "invalid_grant")


def test_unknown_email_gets_the_same_body_as_a_wrong_password(client: TestClient, alice: Account) -> None:
    wrong_password = client.post("/login", json={"email": alice.email, "password": "wrong password"})
    unknown_email = client.post("/login", json={"email": "nobody@example.com", "password": "wrong password"})

    assert_error(unknown_email, 400, "invalid_grant")
    assert unknown_email.json() == wrong_password.json()
    assert unknown_email.headers.get("cache-control") == wrong_password.headers.get("cache-control")


@pytest.mark.parametrize("password", ["", "   "])
def test_blank_password_is_an_invalid_request(client: TestClient, alice: Account, password: str) -> None:
    assert_error(client.post("/login", json={"email": alice.email, "password": password}), 400, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"email": "alice@example.com"},
        {"password": PASSWORD},
        {"email": "", "password": PASSWORD},
        {"email": None, "password": PASSWORD},
        {"email": "alice@example.com", "password": None},
    ],
)
def test_missing_or_blank_fields_are_an_invalid_request(
    client: TestClient, alice: Account, settings: Settings, body: dict[str, object]
) -> None:
    before = table_counts(settings.database)

    assert_error(client.post("/login", json=body), 400, "invalid_request")
    assert table_counts(settings.database) == before


@pytest.mark.parametrize(
    "body",
    [
        {"email": 1, "password": PASSWORD},
        {"email": ["alice@example.com"], "password": PASSWORD},
        {"email": "alice@example.com", "password": 12345678},
        {"email": "alice@example.com", "password": {"x": 1}},
        {"email": "alice@example.com", "password": True},
    ],
)
def test_wrong_types_are_an_invalid_request(
    client: TestClient, alice: Account, settings: Settings, body: dict[str, object]
) -> None:
    before = table_counts(settings.database)

    assert_error(client.post("/login", json=body), 400, "invalid_request")
    assert table_counts(settings.database) == before


@pytest.mark.parametrize("raw", [b"{", b"[]", b'"alice"', b"null", b"\xff\xfe", b'{"email": "a@b.c", }'])
def test_malformed_json_is_an_invalid_request(
    client: TestClient, alice: Account, settings: Settings, raw: bytes
) -> None:
    before = table_counts(settings.database)

    response = client.post("/login", content=raw, headers={"content-type": "application/json"})

    assert_error(response, 400, "invalid_request")
    assert table_counts(settings.database) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("email", "a" * 243 + "@example.com"), ("password", "p" * 1025), ("password", "correct\x00horse")],
)
def test_oversized_or_nul_fields_are_an_invalid_request(
    client: TestClient, alice: Account, settings: Settings, field: str, value: str
) -> None:
    body = {"email": alice.email, "password": alice.password, field: value}
    before = table_counts(settings.database)

    assert_error(client.post("/login", json=body), 400, "invalid_request")
    assert table_counts(settings.database) == before


def test_lone_surrogate_is_an_invalid_request(client: TestClient, alice: Account, settings: Settings) -> None:
    raw = b'{"email": "alice@example.com", "password": "\\ud800correct horse"}'
    before = table_counts(settings.database)

    response = client.post("/login", content=raw, headers={"content-type": "application/json"})

    assert_error(response, 400, "invalid_request")
    assert table_counts(settings.database) == before


def test_form_encoded_login_works(client: TestClient, alice: Account) -> None:
    response = client.post("/login", data={"email": alice.email, "password": alice.password})

    assert response.status_code == 200
    assert set(response.json()) == TOKEN_FIELDS


def test_repeated_form_field_is_an_invalid_request(client: TestClient, alice: Account, settings: Settings) -> None:
    raw = f"email={alice.email}&password=x&password={alice.password}".encode()
    before = table_counts(settings.database)

    response = client.post("/login", content=raw, headers={"content-type": "application/x-www-form-urlencoded"})

    assert_error(response, 400, "invalid_request")
    assert table_counts(settings.database) == before


def test_other_content_type_is_refused_with_415(client: TestClient, alice: Account, settings: Settings) -> None:
    raw = json.dumps({"email": alice.email, "password": alice.password}).encode()  # valid, but not declared
    before = table_counts(settings.database)

    response = client.post("/login", content=raw, headers={"content-type": "text/plain"})

    assert_error(response, 415, "invalid_request")
    assert table_counts(settings.database) == before


def test_email_is_case_insensitive_at_login(client: TestClient, alice: Account) -> None:
    login(client, "  ALICE@Example.COM ")


@pytest.mark.parametrize(
    "spelling",
    ["jose\u0301@example.com", full_width("jos") + "é" + full_width("@example.com"), "JOSÉ@Example.COM"],
    ids=["nfd", "full-width", "upper-case"],
)
def test_every_spelling_of_an_address_logs_in_to_its_one_account(
    client: TestClient, settings: Settings, spelling: str
) -> None:
    josé = add_user(settings, "José@example.com")  # stored NFC, case folded

    pair = login(client, spelling)

    _, claims = decode_unverified(str(pair["access_token"]))
    assert (claims["sub"], claims["email"]) == (josé.id, "josé@example.com")


def test_disabled_user_gets_invalid_grant(client: TestClient, alice: Account, settings: Settings) -> None:
    disable_user(settings, alice.email)

    response = client.post("/login", json={"email": alice.email, "password": alice.password})

    assert_error(response, 400, "invalid_grant")
    unknown = client.post("/login", json={"email": "nobody@example.com", "password": alice.password})
    assert response.json() == unknown.json()


def test_failed_logins_write_nothing(client: TestClient, alice: Account, settings: Settings) -> None:
    before = table_counts(settings.database)

    client.post("/login", json={"email": alice.email, "password": "wrong password"})
    client.post("/login", json={"email": "nobody@example.com", "password": "wrong password"})

    assert table_counts(settings.database) == before


def test_login_starts_a_session_with_a_hashed_refresh_token(
    client: TestClient, alice: Account, settings: Settings
) -> None:
    pair = login(client, alice.email)

    sessions = query(settings.database, "select id, user_id, token_hash from sessions")
    _, claims = decode_unverified(str(pair["access_token"]))
    token_hash = hashlib.sha256(str(pair["refresh_token"]).encode()).hexdigest()
    assert sessions == [(claims["sid"], alice.id, token_hash)]


# Token shape (RFC 9068)


def test_access_token_has_the_rfc_9068_header_and_claims(
    client: TestClient, alice: Account, settings: Settings
) -> None:
    before = int(time.time())
    pair = login(client, alice.email)

    header, claims = decode_unverified(str(pair["access_token"]))
    kids = [key["kid"] for key in client.get("/.well-known/jwks.json").json()["keys"]]
    assert (header["alg"], header["typ"]) == ("RS256", "at+jwt")
    assert header["kid"] in kids
    assert {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "sid"} <= claims.keys()
    assert (claims["iss"], claims["aud"], claims["sub"]) == (settings.issuer, settings.audience, alice.id)
    assert claims["email"] == alice.email
    assert isinstance(claims["iat"], int) and isinstance(claims["exp"], int)
    assert claims["exp"] - claims["iat"] == pair["expires_in"]
    assert claims["nbf"] == claims["iat"] and before <= claims["iat"] <= int(time.time())


def test_every_token_has_a_unique_jti_and_each_login_a_new_session(client: TestClient, alice: Account) -> None:
    claims = [decode_unverified(str(login(client, alice.email)["access_token"]))[1] for _ in range(5)]

    assert len({c["jti"] for c in claims}) == 5
    assert len({c["sid"] for c in claims}) == 5


def test_access_ttl_comes_from_the_environment(env: dict[str, str], alice: Account) -> None:
    settings = Settings.from_env({**env, "JWTAUTH_ACCESS_TTL": "60", "JWTAUTH_REFRESH_TTL": "3600"})
    with TestClient(create_app(settings)) as client:
        pair = login(client, alice.email)

    _, claims = decode_unverified(str(pair["access_token"]))
    assert (pair["expires_in"], pair["refresh_expires_in"]) == (60, 3600)
    assert claims["exp"] - claims["iat"] == 60


# /userinfo


def test_userinfo_returns_the_bearer(client: TestClient, alice: Account) -> None:
    token = login(client, alice.email)["access_token"]

    response = client.get("/userinfo", headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 200
    assert response.json() == {"sub": alice.id, "email": alice.email, "name": "Alice"}


def test_userinfo_without_a_token_is_401(client: TestClient) -> None:
    response = client.get("/userinfo")

    assert_error(response, 401, "invalid_token")
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_userinfo_rejects_an_expired_token(env: dict[str, str], alice: Account) -> None:
    clock = Clock()
    with TestClient(create_app(Settings.from_env(env), clock=clock)) as client:
        token = login(client, alice.email)["access_token"]
        clock.advance(900 + 30 - 1)  # just inside the access TTL plus the leeway
        assert client.get("/userinfo", headers=bearer(token)).status_code == 200
        clock.advance(1)

        response = client.get("/userinfo", headers=bearer(token))

    assert_error(response, 401, "invalid_token")


def test_userinfo_rejects_a_token_of_a_user_disabled_since(
    client: TestClient, alice: Account, settings: Settings
) -> None:
    token = login(client, alice.email)["access_token"]
    disable_user(settings, alice.email)

    response = client.get("/userinfo", headers={"Authorization": f"Bearer {token}"})

    assert_error(response, 401, "invalid_token")


# /token


def test_password_grant_is_refused_by_default(client: TestClient, alice: Account, settings: Settings) -> None:
    before = table_counts(settings.database)

    response = client.post(
        "/token", data={"grant_type": "password", "username": alice.email, "password": alice.password}
    )

    assert_error(response, 400, "unsupported_grant_type")
    assert table_counts(settings.database) == before


@pytest.fixture
def password_grant_client(env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(Settings.from_env({**env, "JWTAUTH_PASSWORD_GRANT": "1"}))) as client:
        yield client


def test_password_grant_issues_a_pair_when_enabled(password_grant_client: TestClient, alice: Account) -> None:
    response = password_grant_client.post(
        "/token", data={"grant_type": "password", "username": alice.email, "password": alice.password}
    )

    assert response.status_code == 200
    assert set(response.json()) == TOKEN_FIELDS
    assert response.headers["cache-control"] == "no-store"


def test_password_grant_with_a_wrong_password_is_invalid_grant(
    password_grant_client: TestClient, alice: Account
) -> None:
    response = password_grant_client.post(
        "/token", data={"grant_type": "password", "username": alice.email, "password": "wrong password"}
    )

    assert_error(response, 400, "invalid_grant")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({}, "invalid_request"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({"grant_type": "password", "password": PASSWORD}, "invalid_request"),
        ({"grant_type": "password", "username": "alice@example.com"}, "invalid_request"),
    ],
)
def test_token_endpoint_bad_requests(
    password_grant_client: TestClient, alice: Account, data: dict[str, str], error: str
) -> None:
    assert_error(password_grant_client.post("/token", data=data), 400, error)


# Discovery and health


@pytest.mark.parametrize("path", ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"])
def test_metadata_names_our_endpoints(client: TestClient, settings: Settings, path: str) -> None:
    metadata = client.get(path).json()

    assert metadata["issuer"] == settings.issuer
    assert metadata["jwks_uri"] == f"{settings.issuer}/.well-known/jwks.json"
    assert metadata["token_endpoint"] == f"{settings.issuer}/token"
    assert metadata["userinfo_endpoint"] == f"{settings.issuer}/userinfo"
    assert "password" not in metadata["grant_types_supported"]


def test_metadata_lists_the_password_grant_only_when_enabled(password_grant_client: TestClient) -> None:
    metadata = password_grant_client.get("/.well-known/openid-configuration").json()

    assert "password" in metadata["grant_types_supported"]


def test_healthz_is_ok(client: TestClient) -> None:
    response = client.get("/healthz")

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_healthz_is_503_when_the_database_is_unusable(client: TestClient, settings: Settings) -> None:
    query(settings.database, "drop table sessions")
    query(settings.database, "drop table users")

    response = client.get("/healthz")

    assert (response.status_code, response.json()["status"]) == (503, "unavailable")


# Errors and limits


def test_unknown_path_is_a_json_404(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")


def test_wrong_method_is_a_json_405_with_allow(client: TestClient) -> None:
    response = client.get("/login")

    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_body_over_16_kib_is_413(client: TestClient, alice: Account, settings: Settings) -> None:
    before = table_counts(settings.database)
    body = {"email": alice.email, "password": alice.password, "padding": "x" * 16_384}

    assert_error(client.post("/login", json=body), 413, "invalid_request")
    assert table_counts(settings.database) == before


def test_chunked_body_over_16_kib_without_length_is_413(client: TestClient, alice: Account, settings: Settings) -> None:
    before = table_counts(settings.database)

    def chunks() -> Iterator[bytes]:
        yield json.dumps({"email": alice.email, "password": alice.password}).encode()[:-1]
        for _ in range(20):
            yield b" " * 1024
        yield b"}"

    response = client.post("/login", content=chunks(), headers={"content-type": "application/json"})

    assert "content-length" not in response.request.headers
    assert_error(response, 413, "invalid_request")
    assert table_counts(settings.database) == before  # the credentials in it were never checked


def test_body_of_exactly_16_kib_is_accepted(client: TestClient, alice: Account) -> None:
    prefix = json.dumps({"email": alice.email, "password": alice.password})[:-1]
    raw = (prefix + " " * (16_384 - len(prefix) - 1) + "}").encode()
    assert len(raw) == 16_384

    response = client.post("/login", content=raw, headers={"content-type": "application/json"})

    assert response.status_code == 200


def test_rehash_on_login_when_argon2_parameters_change(env: dict[str, str], tmp_path: Path) -> None:
    old = Settings.from_env(env)
    account = add_user(old, "bob@example.com")
    stronger = Settings.from_env({**env, "JWTAUTH_ARGON2_TIME_COST": "2"})

    def stored_hash() -> str:
        value: str = query(old.database, "select password_hash from users")[0][0]
        return value

    assert ",t=1," in stored_hash()
    with TestClient(create_app(stronger)) as client:
        login(client, account.email)
        assert ",t=2," in stored_hash()
        login(client, account.email)  # the new hash verifies


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_json_not_in_utf8_is_an_invalid_request(
    client: TestClient, alice: Account, settings: Settings, encoding: str
) -> None:
    """RFC 8259 §8.1: a filter that reads UTF-8 would not see through UTF-16 or UTF-32 (with or without BOM)."""
    raw = json.dumps({"email": alice.email, "password": alice.password}).encode(encoding)
    before = table_counts(settings.database)

    response = client.post("/login", content=raw, headers={"content-type": "application/json"})

    assert_error(response, 400, "invalid_request")
    assert "UTF-8" in response.json()["error_description"]
    assert table_counts(settings.database) == before


def test_json_in_utf8_with_a_byte_order_mark_is_read(client: TestClient, alice: Account) -> None:
    """RFC 8259 §8.1 lets a parser ignore a UTF-8 byte order mark; we do."""
    raw = json.dumps({"email": alice.email, "password": alice.password}).encode("utf-8-sig")

    response = client.post("/login", content=raw, headers={"content-type": "application/json"})

    assert response.status_code == 200

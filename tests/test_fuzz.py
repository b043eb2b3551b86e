"""Bad input from anyone: random bodies and headers at every endpoint, a schema-driven run, and crashes."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings

from .conftest import CHEAP_ARGON2, PASSWORD, add_user, bearer, login, query, start_server, stop_server, stored_keys

ENDPOINTS = [
    ("POST", "/login"), ("POST", "/refresh"), ("POST", "/token"), ("POST", "/revoke"), ("POST", "/logout"),
    ("GET", "/userinfo"), ("POST", "/userinfo"), ("GET", "/.well-known/jwks.json"), ("GET", "/healthz"),
    ("GET", "/.well-known/openid-configuration"), ("DELETE", "/login"), ("GET", "/nowhere"), ("POST", "/users"),
]  # fmt: skip
FIELDS = ["email", "password", "refresh_token", "token", "token_type_hint", "grant_type", "username", "scope", "name"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(), inner, max_size=4),
    max_leaves=10,
)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data",
        "",
        "application/json; charset=latin-1",
    ]
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One server for all examples (hypothesis runs many per test); throttling out of the way."""
    directory = tmp_path_factory.mktemp("fuzz")
    env = {**CHEAP_ARGON2, "JWTAUTH_DATABASE": str(directory / "auth.db"), "JWTAUTH_KEYS_DIR": str(directory / "keys"),
           "JWTAUTH_LOGIN_MAX_FAILURES": "1000000", "JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS": "1000000",
           "JWTAUTH_PASSWORD_GRANT": "1", "JWTAUTH_OPEN_REGISTRATION": "1",
           "JWTAUTH_TRUSTED_PROXIES": "10.0.0.0/8"}  # fmt: skip
    add_user(Settings.from_env(env), "alice@example.com")
    with TestClient(create_app(Settings.from_env(env)), client=("10.1.2.3", 40000)) as client:  # a trusted proxy
        yield client


def assert_handled(response: object) -> None:
    from httpx2 import Response

    assert isinstance(response, Response)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json()["error"], str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=JSON,
    content_type=CONTENT_TYPES,
    authorization=st.none() | HEADER_TEXT | HEADER_TEXT.map(lambda text: f"Bearer {text}"),
    forwarded=st.none() | HEADER_TEXT,
)
def test_json_bodies_and_headers_never_crash(
    fuzzed: TestClient, endpoint: tuple[str, str], body: object, content_type: str,
    authorization: str | None, forwarded: str | None,
) -> None:  # fmt: skip
    headers = {"content-type": content_type}
    if authorization is not None:
        headers["authorization"] = authorization
    if forwarded is not None:
        headers["x-forwarded-for"] = forwarded
    method, path = endpoint

    assert_handled(fuzzed.request(method, path, content=json.dumps(body).encode(), headers=headers))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    form=st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=10), st.text(max_size=40)), max_size=6),
)
def test_form_bodies_never_crash(fuzzed: TestClient, endpoint: tuple[str, str], form: list[tuple[str, str]]) -> None:
    method, path = endpoint

    assert_handled(fuzzed.request(method, path, data=dict(form)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=300), content_type=CONTENT_TYPES)
def test_raw_bytes_never_crash(fuzzed: TestClient, endpoint: tuple[str, str], raw: bytes, content_type: str) -> None:
    method, path = endpoint

    assert_handled(fuzzed.request(method, path, content=raw, headers={"content-type": content_type}))


def test_schemathesis_finds_no_server_error_and_no_schema_violation(env: dict[str, str], tmp_path: Path) -> None:
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server({**env, "JWTAUTH_PASSWORD_GRANT": "1"})
    try:
        import httpx2

        token = httpx2.post(f"{server.url}/login", json={"email": "alice@example.com", "password": PASSWORD}).json()
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
             "response_schema_conformance,response_headers_conformance",
             "--max-examples", "25", "--seed", "7", "--no-color",
             "--header", f"Authorization: Bearer {token['access_token']}"],
            capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,  # its reports go there
        )  # fmt: skip
    finally:
        stop_server(server)

    assert result.returncode == 0, result.stdout[-3000:]
    counts = re.search(r"(\d+) generated, (\d+) passed\n", result.stdout)
    assert counts is not None and int(counts[1]) == int(counts[2]) > 100, result.stdout[-3000:]


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    document = client.get("/openapi.json").json()

    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/login", "/refresh", "/token", "/revoke", "/logout", "/userinfo", "/.well-known/jwks.json",
        "/.well-known/openid-configuration", "/.well-known/oauth-authorization-server", "/healthz", "/users",
    }  # fmt: skip
    assert document["paths"]["/login"]["post"]["responses"]["429"]
    paths = document["paths"]
    using_the_database = ["/login", "/refresh", "/token", "/revoke", "/logout", "/userinfo", "/users"]
    undocumented = [
        path for path in using_the_database if any("503" not in op["responses"] for op in paths[path].values())
    ]
    assert undocumented == []  # a database out of reach: 503 temporarily_unavailable


# Unexpected failures


def test_an_unexpected_error_is_a_json_500_with_a_request_id_in_the_log(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    add_user(settings, "alice@example.com")
    with TestClient(create_app(settings)) as client:  # it would raise what the app let escape
        query(settings.database, "alter table users rename to lost")  # the database breaks under the running server

        response = client.post("/login", json={"email": "alice@example.com", "password": PASSWORD})

    body = response.json()
    assert (response.status_code, body["error"]) == (500, "server_error")
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    assert "sqlite" not in response.text.lower() and "psycopg" not in response.text.lower()
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert any(body["request_id"] in record.getMessage() and record.exc_info for record in errors)
    assert PASSWORD not in caplog.text


def test_no_secret_reaches_the_log(settings: Settings, env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    add_user(settings, "alice@example.com")
    with TestClient(create_app(settings)) as client:
        pair = login(client, "alice@example.com")
        client.post("/login", json={"email": "alice@example.com", "password": "a wrong guess"})
        client.get("/userinfo", headers=bearer(pair["access_token"]))
        client.get("/userinfo", headers=bearer(str(pair["access_token"])[:-4] + "AAAA"))  # tampered
        second = client.post("/refresh", json={"refresh_token": pair["refresh_token"]}).json()
        client.post("/refresh", json={"refresh_token": pair["refresh_token"]})  # a replay
        client.post("/revoke", data={"token": second["refresh_token"]})
        client.post("/revoke", data={"token": second["access_token"]})
    stored = stored_keys(env)
    private_keys = [pem.decode() for pem in [*stored.pems.values(), stored.refresh_secret or b""]]
    secrets = [
        PASSWORD,
        "a wrong guess",
        *(str(p[k]) for p in (pair, second) for k in ("access_token", "refresh_token")),
    ]
    pem_lines = [line for pem in private_keys for line in pem.splitlines()[1:-1]]

    logged = caplog.text + json.dumps([vars(record) for record in caplog.records], default=str)  # extra fields too

    assert caplog.records and pem_lines  # something was logged at all, and there were keys to look for
    assert not [secret for secret in secrets + pem_lines if secret in logged]


@pytest.mark.sqlite_only
def test_a_write_waiting_for_another_writer_goes_on_when_the_lock_frees(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)  # the default busy timeout, 10 s
    add_user(settings, "alice@example.com")
    with TestClient(create_app(settings)) as client:
        pair = client.post("/login", json={"email": "alice@example.com", "password": PASSWORD}).json()
        other_writer = sqlite3.connect(settings.database, check_same_thread=False)
        other_writer.execute("begin immediate")
        release = threading.Timer(0.3, other_writer.rollback)
        started = time.monotonic()
        release.start()
        try:
            response = client.post("/refresh", json={"refresh_token": pair["refresh_token"]})
            waited = time.monotonic() - started
        finally:
            release.join()
            other_writer.close()

    assert response.status_code == 200, response.text
    assert 0.3 <= waited < 2  # it waited for the lock, and went on soon after it was released


@pytest.mark.sqlite_only
def test_a_database_locked_past_the_busy_timeout_gets_503(env: dict[str, str]) -> None:
    settings = Settings.from_env({**env, "JWTAUTH_DB_BUSY_TIMEOUT_MS": "200"})
    add_user(settings, "alice@example.com")
    with TestClient(create_app(settings)) as client:
        other_writer = sqlite3.connect(settings.database)
        other_writer.execute("begin immediate")
        try:
            response = client.post("/login", json={"email": "alice@example.com", "password": PASSWORD})
        finally:
            other_writer.rollback()
            other_writer.close()
        after = client.post("/login", json={"email": "alice@example.com", "password": PASSWORD})

    assert (response.status_code, response.json()["error"]) == (503, "temporarily_unavailable")
    assert response.headers["retry-after"] == "1"
    assert after.status_code == 200

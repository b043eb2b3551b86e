"""The OAuth 2.0 face of a real `jwtauth serve`, through a standard client: authlib's OAuth2Session.

Endpoints come from the discovery document, as a client configured with only the issuer finds them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from jwtauth.verify import Verifier

from .conftest import PASSWORD, Server, bearer, stop_server
from .issuer import issuer_env, start_issuer

CLIENT_ID = "jwtauth"  # the first-party public client (no secret: token_endpoint_auth_method "none")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys_template: Path) -> Iterator[Server]:
    server, _ = start_issuer(issuer_env(tmp_path_factory.mktemp("oauth"), keys_template, PASSWORD_GRANT="1"))
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def metadata(server: Server) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(f"{server.url}/.well-known/openid-configuration").json()
    return document


@pytest.fixture
def session(metadata: dict[str, Any]) -> Iterator[OAuth2Session]:
    with OAuth2Session(CLIENT_ID, token_endpoint_auth_method="none", token_endpoint=metadata["token_endpoint"]) as s:
        yield s


def password_grant(session: OAuth2Session, metadata: dict[str, Any], password: str = PASSWORD) -> dict[str, Any]:
    token: dict[str, Any] = session.fetch_token(
        metadata["token_endpoint"], username="alice@example.com", password=password
    )
    return token


def oauth_error(session: OAuth2Session, metadata: dict[str, Any], **params: str) -> tuple[int, str]:
    """POST params to the token endpoint through authlib; return the status and the error authlib read."""
    statuses: list[int] = []
    session.hooks["response"].append(lambda response, *args, **kwargs: statuses.append(response.status_code))
    with pytest.raises(OAuthError) as caught:
        session.fetch_token(metadata["token_endpoint"], **params)
    return statuses[-1], str(caught.value.error)


def test_password_grant(session: OAuth2Session, metadata: dict[str, Any], server: Server) -> None:
    token = password_grant(session, metadata)

    assert token["token_type"] == "Bearer"
    assert token["expires_at"] == pytest.approx(time.time() + 900, abs=5)
    assert Verifier(server.url).verify_access_token(token["access_token"])["email"] == "alice@example.com"


def test_refresh_token_grant(session: OAuth2Session, metadata: dict[str, Any], server: Server) -> None:
    first = password_grant(session, metadata)

    second = session.refresh_token(metadata["token_endpoint"], refresh_token=first["refresh_token"])

    verifier = Verifier(server.url)
    assert second["refresh_token"] != first["refresh_token"]
    assert (
        verifier.verify_access_token(second["access_token"])["sid"]
        == verifier.verify_access_token(first["access_token"])["sid"]
    )  # the same session, rotated


def test_expired_access_token_is_refreshed_automatically(session: OAuth2Session, metadata: dict[str, Any]) -> None:
    updates: list[dict[str, Any]] = []
    session.update_token = lambda token, refresh_token=None, access_token=None: updates.append(token)
    session.token = {**password_grant(session, metadata), "expires_at": int(time.time()) - 1}

    response = session.get(metadata["userinfo_endpoint"])

    assert response.status_code == 200
    assert response.json()["email"] == "alice@example.com"
    assert len(updates) == 1


def test_revocation_through_the_discovered_endpoint(session: OAuth2Session, metadata: dict[str, Any]) -> None:
    token = password_grant(session, metadata)

    revoked = session.revoke_token(  # type: ignore[no-untyped-call]  # untyped in types-authlib
        metadata["revocation_endpoint"], token=token["refresh_token"], token_type_hint="refresh_token"
    )

    assert revoked.status_code == 200
    with pytest.raises(OAuthError, match="invalid_grant"):
        session.refresh_token(metadata["token_endpoint"], refresh_token=token["refresh_token"])
    userinfo = requests.get(metadata["userinfo_endpoint"], headers=bearer(token["access_token"]), timeout=10)
    assert userinfo.status_code == 401


def test_unknown_grant_type_is_unsupported_grant_type(session: OAuth2Session, metadata: dict[str, Any]) -> None:
    assert oauth_error(session, metadata, grant_type="client_credentials") == (400, "unsupported_grant_type")


def test_missing_password_is_invalid_request(session: OAuth2Session, metadata: dict[str, Any]) -> None:
    assert oauth_error(session, metadata, grant_type="password", username="alice@example.com") == (
        400,
        "invalid_request",
    )


def test_wrong_password_is_invalid_grant(session: OAuth2Session, metadata: dict[str, Any]) -> None:
    params = {"grant_type": "password", "username": "alice@example.com", "password": "wrong password"}

    assert oauth_error(session, metadata, **params) == (400, "invalid_grant")


def test_unknown_refresh_token_is_invalid_grant(session: OAuth2Session, metadata: dict[str, Any]) -> None:
    params = {"grant_type": "refresh_token", "refresh_token": "not-a-token-we-issued"}

    assert oauth_error(session, metadata, **params) == (400, "invalid_grant")

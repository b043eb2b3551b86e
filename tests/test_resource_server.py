"""examples/resource_server.py, a downstream API protected by jwtauth.verify_starlette.

Tokens come from the real jwtauth app; the example fetches its JWKS through an HTTP client (TestClient).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from starlette.testclient import TestClient

from examples.resource_server import create_app
from jwtauth.verify import Fetched, JWKSClient, Verifier

from .conftest import ISSUER, Account, Clock, bearer, login

PAGE = "http://127.0.0.1:8080"  # the origin of a browser app that calls the API (examples/spa/)


@pytest.fixture
def api(client: TestClient, clock: Clock) -> Iterator[TestClient]:
    """The example API, trusting the jwtauth app under test; its clock is the test's."""

    def fetch(url: str, headers: Mapping[str, str], timeout: float) -> Fetched:
        response = client.get(url, headers=dict(headers))
        return Fetched(response.status_code, dict(response.headers.items()), response.content)

    verifier = Verifier(ISSUER, "jwtauth", jwks=JWKSClient(ISSUER, fetch=fetch, clock=clock), clock=clock)
    with TestClient(create_app(verifier, cors_origins=[PAGE])) as api:
        yield api


@pytest.fixture
def token(client: TestClient, alice: Account) -> str:
    return str(login(client, alice.email)["access_token"])


def test_valid_token_gets_200(api: TestClient, token: str, alice: Account) -> None:
    response = api.get("/orders", headers=bearer(token))

    assert response.status_code == 200
    assert response.json() == {"owner": alice.id, "email": alice.email, "orders": []}


def test_no_token_gets_401_with_a_bearer_challenge(api: TestClient) -> None:
    response = api.get("/orders")

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_expired_token_gets_401_invalid_token(api: TestClient, clock: Clock, token: str) -> None:
    clock.advance(900 + 30 + 1)  # access TTL + leeway + 1 s

    response = api.get("/orders", headers=bearer(token))

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert response.json()["error"] == "invalid_token"


def test_tampered_token_gets_401(api: TestClient, token: str) -> None:
    header, payload, signature = token.split(".")

    response = api.get("/orders", headers=bearer(f"{header}.{payload}.{signature[::-1]}"))

    assert response.status_code == 401


def test_public_route_needs_no_token(api: TestClient) -> None:
    assert api.get("/health").status_code == 200


def test_other_authorization_schemes_stay_anonymous(api: TestClient) -> None:
    assert api.get("/health", headers={"Authorization": "Basic YWxpY2U6cHc="}).status_code == 200
    assert api.get("/orders", headers={"Authorization": "Basic YWxpY2U6cHc="}).status_code == 401


def test_a_page_of_a_listed_origin_may_call_it_with_its_token(api: TestClient, token: str) -> None:
    preflight = api.options(
        "/orders",
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    response = api.get("/orders", headers={**bearer(token), "Origin": PAGE})

    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == PAGE
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert (response.status_code, response.headers["access-control-allow-origin"]) == (200, PAGE)
    assert "access-control-allow-credentials" not in response.headers  # a bearer token, never a cookie


def test_a_page_of_another_origin_gets_no_cors_headers(api: TestClient, token: str) -> None:
    response = api.get("/orders", headers={**bearer(token), "Origin": "http://127.0.0.1:9999"})

    assert response.status_code == 200  # answered, but its page cannot read the answer
    assert "access-control-allow-origin" not in response.headers

"""Browser apps (API.md "Browser apps"): allowed origins, CORS, and the refresh token in an HttpOnly cookie.

Through the HTTP API: TestClient for most, a real `jwtauth serve` for two clients that share one cookie jar.
tests/test_spa.py drives the same through a real browser.
"""

from __future__ import annotations

import concurrent.futures
import http.cookiejar
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx2 as httpx
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
    login,
    run_cli,
    snapshot,
    start_server,
    stop_server,
)

ISSUER = "https://auth.example.com"
APP = "https://app.example.com"  # listed in JWTAUTH_CORS_ORIGINS: the same site as the issuer
EVIL = "https://evil.example.net"
EXPOSED = "Retry-After, WWW-Authenticate, X-Request-ID"
CORS = {
    "access-control-allow-origin": APP,
    "access-control-allow-credentials": "true",
    "vary": "Origin",
    "access-control-expose-headers": EXPOSED,
}
PREFLIGHT = {
    "access-control-allow-methods": "GET, POST",
    "access-control-allow-headers": "Authorization, Content-Type",
    "access-control-max-age": "7200",
}
SECURE_COOKIE = "; Path=/; HttpOnly; SameSite=Strict; Secure"  # the attributes after name=value; Max-Age
CLEARED = f"jwtauth_refresh=; Max-Age=0{SECURE_COOKIE}"
REFUSED = {"error": "invalid_request", "error_description": "origin not allowed"}


def make_client(env: dict[str, str], clock: Clock, **variables: str) -> TestClient:
    """The app of an issuer at ISSUER that lists APP, with open registration; the client speaks from ISSUER."""
    settings = Settings.from_env({
        **env, "JWTAUTH_ISSUER": ISSUER, "JWTAUTH_CORS_ORIGINS": APP, "JWTAUTH_OPEN_REGISTRATION": "1",
        **{f"JWTAUTH_{name.upper()}": value for name, value in variables.items()},
    })  # fmt: skip
    return TestClient(create_app(settings, clock=clock), base_url=settings.issuer)


@pytest.fixture
def web(env: dict[str, str], clock: Clock) -> Iterator[TestClient]:
    with make_client(env, clock) as client:
        yield client


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {
        name: value for name, value in response.headers.items() if name.startswith("access-control-") or name == "vary"
    }


def cookie_set(response: httpx.Response) -> str:
    """The one Set-Cookie header of a response."""
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 1, cookies
    return cookies[0]


def cookie_token(response: httpx.Response, attributes: str = f"; Max-Age=2592000{SECURE_COOKIE}") -> str:
    """The refresh token that a response sets as the cookie, after checking every attribute of it."""
    match = re.fullmatch(r"jwtauth_refresh=([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+)(;.*)", cookie_set(response))
    assert match is not None, cookie_set(response)
    assert match[2] == attributes
    return match[1]


def with_cookie(token: str) -> dict[str, str]:
    return {"Origin": APP, "Cookie": f"jwtauth_refresh={token}"}


def sid_of(access_token: object) -> str:
    return str(jwt.decode(str(access_token), options={"verify_signature": False})["sid"])


def browser_login(client: TestClient, account: Account) -> httpx.Response:
    response = client.post("/login", json={"email": account.email, "password": PASSWORD}, headers={"Origin": APP})
    assert response.status_code == 200, response.text
    return response


# A valid request to each POST endpoint, given alice's token pair; and its answer from an allowed origin.
POSTS: dict[str, tuple[Callable[[dict[str, object]], dict[str, Any]], int]] = {
    "/login": (lambda pair: {"json": {"email": "alice@example.com", "password": PASSWORD}}, 200),
    "/refresh": (lambda pair: {"json": {"refresh_token": pair["refresh_token"]}}, 200),
    "/token": (lambda pair: {"data": {"grant_type": "refresh_token", "refresh_token": pair["refresh_token"]}}, 200),
    "/revoke": (lambda pair: {"data": {"token": pair["refresh_token"]}}, 200),
    "/logout": (lambda pair: {"headers": bearer(pair["access_token"]), "json": {"scope": "global"}}, 204),
    "/users": (lambda pair: {"json": {"email": "bob@example.com", "password": "a long new passphrase"}}, 201),
    "/userinfo": (lambda pair: {"headers": bearer(pair["access_token"])}, 200),
}


def post(client: TestClient, path: str, pair: dict[str, object], origin: str) -> httpx.Response:
    request = POSTS[path][0](pair)
    return client.post(path, **{**request, "headers": {**request.get("headers", {}), "Origin": origin}})


def test_a_bad_origin_stops_the_server_at_start(env: dict[str, str]) -> None:
    result = run_cli("serve", "--port", "1", env={**env, "JWTAUTH_CORS_ORIGINS": "https://app.example.com/"})

    assert result.returncode == 1
    assert result.stderr.startswith("jwtauth: JWTAUTH_CORS_ORIGINS must be comma-separated origins")
    assert len(result.stderr.splitlines()) == 1


# Origins: a POST from anywhere else is refused before anything is read or written


@pytest.mark.parametrize("path", [*POSTS, "/nowhere"])
@pytest.mark.parametrize("origin", [EVIL, "null"])
def test_a_post_from_another_origin_is_refused_and_writes_nothing(
    web: TestClient, settings: Settings, alice: Account, path: str, origin: str
) -> None:
    pair = login(web, alice.email)
    before = snapshot(settings.database)

    response = post(web, path, pair, origin) if path in POSTS else web.post(path, headers={"Origin": origin})

    assert (response.status_code, response.json()) == (403, REFUSED)
    assert response.headers["content-type"] == "application/json"
    assert (cors_headers(response), response.headers.get_list("set-cookie")) == ({}, [])
    assert snapshot(settings.database) == before


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com:8443",  # another port
        "http://app.example.com",  # another scheme
        "https://app.example.com.evil.net",  # a suffix
        "https://evil.app.example.com",  # a subdomain of a listed origin
        "https://APP.example.com",  # browsers send lower case: matching is exact
        "https://app.example.com/",
        "",
    ],
)
def test_matching_is_exact(web: TestClient, settings: Settings, alice: Account, origin: str) -> None:
    before = snapshot(settings.database)

    response = web.post("/login", json={"email": alice.email, "password": PASSWORD}, headers={"Origin": origin})

    assert (response.status_code, response.json()) == (403, REFUSED)
    assert snapshot(settings.database) == before


@pytest.mark.parametrize("path", POSTS)
def test_a_post_from_an_allowed_origin_is_answered_with_cors_headers(
    web: TestClient, alice: Account, path: str
) -> None:
    pair = login(web, alice.email)

    response = post(web, path, pair, APP)

    assert response.status_code == POSTS[path][1], response.text
    assert cors_headers(response) == CORS


def test_the_issuers_own_origin_is_allowed_without_being_listed(
    env: dict[str, str], clock: Clock, alice: Account
) -> None:
    with make_client(env, clock, cors_origins="") as client:
        listed = client.post("/login", json={"email": alice.email, "password": PASSWORD}, headers={"Origin": APP})
        own = client.post("/login", json={"email": alice.email, "password": PASSWORD}, headers={"Origin": ISSUER})

    assert (listed.status_code, own.status_code) == (403, 200)
    assert cors_headers(own) == {**CORS, "access-control-allow-origin": ISSUER}


def test_the_issuers_default_port_is_left_out_of_its_origin(env: dict[str, str], clock: Clock, alice: Account) -> None:
    with make_client(env, clock, cors_origins="", issuer="https://auth.example.com:443") as client:
        response = client.post("/login", json={"email": alice.email, "password": PASSWORD}, headers={"Origin": ISSUER})

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("request_args", "status"),
    [
        ({"method": "POST", "url": "/login", "json": {"email": "alice@example.com", "password": "wrong guess"}}, 400),
        ({"method": "GET", "url": "/userinfo"}, 401),
        ({"method": "POST", "url": "/login", "content": b"{}", "headers": {"Content-Length": "20000"}}, 413),
        ({"method": "GET", "url": "/nowhere"}, 404),
        ({"method": "DELETE", "url": "/login"}, 405),
    ],
)
def test_errors_to_an_allowed_origin_carry_the_cors_headers(
    web: TestClient, alice: Account, request_args: dict[str, Any], status: int
) -> None:
    request_args = dict(request_args)  # the parameter is shared by both backends' runs
    headers = {**request_args.pop("headers", {}), "Origin": APP}

    response = web.request(**request_args, headers=headers)

    assert response.status_code == status
    assert cors_headers(response) == CORS


def test_a_throttled_login_exposes_retry_after(env: dict[str, str], clock: Clock, alice: Account) -> None:
    with make_client(env, clock, login_max_failures="1") as client:
        client.post("/login", json={"email": alice.email, "password": "wrong guess"}, headers={"Origin": APP})
        response = client.post("/login", json={"email": alice.email, "password": PASSWORD}, headers={"Origin": APP})

    assert response.status_code == 429
    assert response.headers["retry-after"].isdigit()
    assert cors_headers(response) == CORS


def test_requests_without_an_origin_get_no_cors_headers_and_no_cookie(web: TestClient, alice: Account) -> None:
    response = web.post("/login", json={"email": alice.email, "password": PASSWORD})

    assert response.status_code == 200
    assert set(response.json()) == {"access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_in"}
    assert (cors_headers(response), response.headers.get_list("set-cookie")) == ({}, [])


def test_a_get_from_another_origin_is_answered_without_cors_headers(web: TestClient, alice: Account) -> None:
    pair = login(web, alice.email)

    response = web.get("/userinfo", headers={**bearer(pair["access_token"]), "Origin": EVIL})

    assert response.status_code == 200  # a GET changes nothing; without the headers its page cannot read it
    assert cors_headers(response) == {}


# Preflights


def test_a_preflight_from_an_allowed_origin_gets_204_and_the_cors_headers(web: TestClient) -> None:
    response = web.options(
        "/refresh",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )

    assert (response.status_code, response.content) == (204, b"")
    assert cors_headers(response) == {**CORS, **PREFLIGHT}


@pytest.mark.parametrize("origin", [EVIL, "null"])
def test_a_preflight_from_another_origin_gets_no_allow_headers(web: TestClient, origin: str) -> None:
    response = web.options("/login", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})

    assert response.status_code == 405  # as without an Origin: the route takes POST only
    assert not [name for name in response.headers if name.startswith("access-control-allow-")]


@pytest.mark.parametrize(
    "path", ["/.well-known/jwks.json", "/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"]
)
def test_the_public_documents_are_open_to_every_origin(web: TestClient, path: str) -> None:
    response = web.get(path, headers={"Origin": EVIL})
    preflight = web.options(path, headers={"Origin": EVIL, "Access-Control-Request-Method": "GET"})

    assert response.status_code == 200
    assert cors_headers(response) == {"access-control-allow-origin": "*", "vary": "Origin"}  # no credentials
    assert preflight.status_code == 204
    assert cors_headers(preflight) == {"access-control-allow-origin": "*", "vary": "Origin", **PREFLIGHT}


def test_the_jwks_gives_an_allowed_origin_its_own_origin(web: TestClient) -> None:
    response = web.get("/.well-known/jwks.json", headers={"Origin": APP})

    assert response.status_code == 200
    assert cors_headers(response) == CORS


def test_the_jwks_without_an_origin_is_as_before(web: TestClient) -> None:
    response = web.get("/.well-known/jwks.json")

    assert response.status_code == 200
    assert cors_headers(response) == {}


# The cookie: its attributes


def test_a_login_from_an_allowed_origin_sets_the_cookie_and_leaves_the_token_out_of_the_body(
    web: TestClient, alice: Account
) -> None:
    response = browser_login(web, alice)

    assert set(response.json()) == {"access_token", "token_type", "expires_in", "refresh_expires_in"}
    assert response.json()["refresh_expires_in"] == 2_592_000
    token = cookie_token(response)  # HttpOnly; SameSite=Strict; Path=/; Max-Age; Secure; no Domain
    assert web.post("/refresh", json={"refresh_token": token}).status_code == 200  # a real refresh token


def test_the_cookie_on_an_http_issuer_is_not_secure_and_lives_the_refresh_ttl(
    env: dict[str, str], clock: Clock, alice: Account
) -> None:
    issuer = "http://127.0.0.1:8000"
    with make_client(env, clock, issuer=issuer, cors_origins="http://127.0.0.1:8001", refresh_ttl="600") as client:
        response = client.post(
            "/login", json={"email": alice.email, "password": PASSWORD}, headers={"Origin": "http://127.0.0.1:8001"}
        )

    assert response.status_code == 200
    cookie_token(response, "; Max-Age=600; Path=/; HttpOnly; SameSite=Strict")


def test_the_cookie_path_is_the_issuers_path(env: dict[str, str], clock: Clock, alice: Account) -> None:
    """Behind a proxy that serves jwtauth under /auth: the cookie goes to jwtauth's paths only."""
    with make_client(env, clock, issuer="https://example.com/auth", cors_origins=APP) as client:
        credentials = {"email": alice.email, "password": PASSWORD}
        response = client.post(
            "https://example.com/login", json=credentials, headers={"Origin": APP}
        )  # the proxy's view

    assert response.status_code == 200
    cookie_token(response, "; Max-Age=2592000; Path=/auth; HttpOnly; SameSite=Strict; Secure")


def test_the_password_grant_from_an_allowed_origin_sets_the_cookie(
    env: dict[str, str], clock: Clock, alice: Account
) -> None:
    with make_client(env, clock, password_grant="1") as client:
        response = client.post(
            "/token",
            data={"grant_type": "password", "username": alice.email, "password": PASSWORD},
            headers={"Origin": APP},
        )

    assert response.status_code == 200
    assert "refresh_token" not in response.json()
    cookie_token(response)


# Refresh by the cookie


def test_refresh_by_the_cookie_rotates_it(web: TestClient, alice: Account) -> None:
    login_response = browser_login(web, alice)
    first = cookie_token(login_response)

    response = web.post("/refresh", headers=with_cookie(first))

    assert response.status_code == 200
    assert set(response.json()) == {"access_token", "token_type", "expires_in", "refresh_expires_in"}
    second = cookie_token(response)
    assert second != first
    assert sid_of(response.json()["access_token"]) == sid_of(login_response.json()["access_token"])
    assert cors_headers(response) == CORS


def test_the_token_endpoint_takes_the_cookie(web: TestClient, alice: Account) -> None:
    first = cookie_token(browser_login(web, alice))

    response = web.post("/token", data={"grant_type": "refresh_token"}, headers=with_cookie(first))

    assert response.status_code == 200
    assert cookie_token(response) != first


def test_a_field_in_the_body_wins_over_the_cookie(web: TestClient, alice: Account) -> None:
    cookie = cookie_token(browser_login(web, alice))
    other = login(web, alice.email)

    response = web.post("/refresh", json={"refresh_token": other["refresh_token"]}, headers=with_cookie(cookie))

    assert response.status_code == 200
    assert sid_of(response.json()["access_token"]) == sid_of(other["access_token"])
    assert web.post("/refresh", headers=with_cookie(cookie)).status_code == 200  # the cookie was not spent


def test_reuse_of_a_spent_cookie_after_the_interval_clears_it(web: TestClient, clock: Clock, alice: Account) -> None:
    first = cookie_token(browser_login(web, alice))
    second = cookie_token(web.post("/refresh", headers=with_cookie(first)))
    clock.advance(11)  # past JWTAUTH_REFRESH_REUSE_INTERVAL (10 s)

    response = web.post("/refresh", headers=with_cookie(first))

    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    assert cookie_set(response) == CLEARED
    assert cors_headers(response) == CORS
    assert web.post("/refresh", headers=with_cookie(second)).status_code == 400  # the session was revoked


def test_a_made_up_cookie_is_refused_and_cleared(web: TestClient, settings: Settings, alice: Account) -> None:
    before = snapshot(settings.database)

    response = web.post("/refresh", headers=with_cookie("AAAAAAAAAAAAAAAAAAAAAA.made-up"))

    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")
    assert cookie_set(response) == CLEARED
    assert snapshot(settings.database) == before


def test_a_refused_token_in_the_body_leaves_the_cookie_alone(web: TestClient, alice: Account) -> None:
    response = web.post("/refresh", json={"refresh_token": "AAAAAAAAAAAAAAAAAAAAAA.made-up"}, headers={"Origin": APP})

    assert (response.status_code, response.headers.get_list("set-cookie")) == (400, [])


@pytest.mark.parametrize(
    ("path", "data"), [("/refresh", {}), ("/token", {"grant_type": "refresh_token"}), ("/revoke", {})]
)
def test_neither_field_nor_cookie_is_invalid_request(web: TestClient, path: str, data: dict[str, str]) -> None:
    response = web.post(path, data=data, headers={"Origin": APP})

    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert response.headers.get_list("set-cookie") == []


@pytest.mark.parametrize(
    ("path", "data", "status"),
    [
        ("/refresh", {}, 400),
        ("/token", {"grant_type": "refresh_token"}, 400),
        ("/revoke", {}, 400),
        ("/logout", {}, 401),
    ],
)
def test_the_cookie_without_an_origin_is_ignored(
    web: TestClient, alice: Account, path: str, data: dict[str, str], status: int
) -> None:
    cookie = cookie_token(browser_login(web, alice))

    response = web.post(path, data=data, headers={"Cookie": f"jwtauth_refresh={cookie}"})

    assert response.status_code == status  # as if there were no cookie: missing token, or no bearer
    assert (cors_headers(response), response.headers.get_list("set-cookie")) == ({}, [])
    assert web.post("/refresh", headers=with_cookie(cookie)).status_code == 200  # neither spent nor revoked


# Logout and revoke by the cookie


def test_logout_by_the_cookie_ends_its_session_and_clears_it(web: TestClient, alice: Account) -> None:
    cookie = cookie_token(browser_login(web, alice))
    other = login(web, alice.email)

    response = web.post("/logout", headers=with_cookie(cookie))

    assert (response.status_code, cookie_set(response)) == (204, CLEARED)
    assert cors_headers(response) == CORS
    assert web.post("/refresh", json={"refresh_token": cookie}).status_code == 400
    assert web.post("/refresh", json={"refresh_token": other["refresh_token"]}).status_code == 200


def test_global_logout_by_the_cookie_ends_every_session_of_its_user(web: TestClient, alice: Account) -> None:
    cookie = cookie_token(browser_login(web, alice))
    other = login(web, alice.email)

    response = web.post("/logout", json={"scope": "global"}, headers=with_cookie(cookie))

    assert (response.status_code, cookie_set(response)) == (204, CLEARED)
    assert web.get("/userinfo", headers=bearer(other["access_token"])).status_code == 401
    assert web.post("/refresh", json={"refresh_token": other["refresh_token"]}).status_code == 400


def test_logout_by_a_dead_cookie_is_401_and_clears_it(web: TestClient, alice: Account) -> None:
    cookie = cookie_token(browser_login(web, alice))
    assert web.post("/revoke", data={"token": cookie}).status_code == 200

    response = web.post("/logout", headers=with_cookie(cookie))

    assert (response.status_code, response.json()["error"]) == (401, "invalid_token")
    assert cookie_set(response) == CLEARED


def test_logout_by_the_bearer_from_an_allowed_origin_clears_the_cookie(web: TestClient, alice: Account) -> None:
    response_login = browser_login(web, alice)
    cookie = cookie_token(response_login)

    response = web.post("/logout", headers={**with_cookie(cookie), **bearer(response_login.json()["access_token"])})

    assert (response.status_code, cookie_set(response)) == (204, CLEARED)
    assert web.post("/refresh", json={"refresh_token": cookie}).status_code == 400


def test_revoke_by_the_cookie_ends_its_session_and_clears_it(web: TestClient, alice: Account) -> None:
    cookie = cookie_token(browser_login(web, alice))

    response = web.post("/revoke", headers=with_cookie(cookie))

    assert (response.status_code, response.json(), cookie_set(response)) == (200, {}, CLEARED)
    assert cors_headers(response) == CORS
    assert web.post("/refresh", json={"refresh_token": cookie}).status_code == 400


def test_revoke_of_a_token_in_the_body_leaves_the_cookie_alone(web: TestClient, alice: Account) -> None:
    cookie = cookie_token(browser_login(web, alice))
    other = login(web, alice.email)

    response = web.post("/revoke", data={"token": other["refresh_token"]}, headers=with_cookie(cookie))

    assert (response.status_code, response.headers.get_list("set-cookie")) == (200, [])
    assert web.post("/refresh", json={"refresh_token": other["refresh_token"]}).status_code == 400
    assert web.post("/refresh", headers=with_cookie(cookie)).status_code == 200


# Two tabs: one cookie jar, refreshing at once


def jar_token(jar: http.cookiejar.CookieJar) -> str:
    return next(cookie.value or "" for cookie in jar if cookie.name == "jwtauth_refresh")


def test_two_clients_sharing_one_cookie_jar_refresh_at_once_and_converge(env: dict[str, str]) -> None:
    """Two tabs of one browser share its cookie: both refresh with it at the same moment. API.md: within the
    reuse interval both get the same refresh token, so the session never forks and stays alive."""
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server(env, "--workers", "2", own_issuer=True)
    jar = http.cookiejar.CookieJar()
    tabs = [httpx.Client(base_url=server.url, cookies=jar, headers={"Origin": server.url}, timeout=30) for _ in "ab"]
    try:
        login_response = tabs[0].post("/login", json={"email": "alice@example.com", "password": PASSWORD})
        shared = {"Origin": server.url, "Cookie": f"jwtauth_refresh={jar_token(jar)}"}  # what both tabs send
        start = threading.Barrier(len(tabs), timeout=30)

        def refresh(_: httpx.Client) -> httpx.Response:
            start.wait()
            return httpx.post(f"{server.url}/refresh", headers=shared, timeout=30)

        with concurrent.futures.ThreadPoolExecutor(len(tabs)) as pool:
            responses = list(pool.map(refresh, tabs))
        after = [  # each tab goes on with the cookie its answer set
            httpx.post(
                f"{server.url}/refresh", headers={**shared, "Cookie": response.headers["set-cookie"].split(";")[0]}
            )
            for response in responses
        ]
    finally:
        for tab in tabs:
            tab.close()
        stop_server(server)

    attributes = "; Max-Age=2592000; Path=/; HttpOnly; SameSite=Strict"
    assert login_response.status_code == 200
    assert [response.status_code for response in responses] == [200, 200], [r.text for r in responses]
    tokens = {cookie_token(response, attributes) for response in responses}
    assert len(tokens) == 1  # one and the same refresh token: no fork
    assert [response.status_code for response in after] == [200, 200]
    assert {sid_of(response.json()["access_token"]) for response in [login_response, *responses, *after]} == {
        sid_of(login_response.json()["access_token"])
    }


# The OpenAPI document


def test_the_openapi_document_describes_the_cookie(web: TestClient) -> None:
    document = web.get("/openapi.json").json()
    cookie = {"$ref": "#/components/parameters/RefreshCookie"}

    for path in ("/refresh", "/token", "/revoke"):
        assert cookie in document["paths"][path]["post"]["parameters"]
    assert {"bearer": []} in document["paths"]["/logout"]["post"]["security"]
    assert {"refreshCookie": []} in document["paths"]["/logout"]["post"]["security"]
    assert document["components"]["parameters"]["RefreshCookie"]["in"] == "cookie"
    assert document["components"]["parameters"]["RefreshCookie"]["name"] == "jwtauth_refresh"
    assert "Set-Cookie" in document["components"]["responses"]["TokenPair"]["headers"]
    assert "refresh_token" not in document["components"]["schemas"]["TokenPair"]["required"]

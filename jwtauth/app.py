"""The HTTP face: create_app(settings), thin endpoints; request plumbing and error rendering are in web.py."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.schemas import SchemaGenerator

from jwtauth import browser
from jwtauth.config import Settings
from jwtauth.emails import MAX_EMAIL_LENGTH
from jwtauth.errors import (
    AccessDeniedError,
    AuthError,
    InvalidRequestError,
    KeyStoreError,
    StoreUnavailableError,
    TemporarilyUnavailableError,
    UnsupportedGrantTypeError,
)
from jwtauth.keys import KeyStore
from jwtauth.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jwtauth.metrics import Metrics
from jwtauth.openapi import BASE as openapi_base
from jwtauth.passwords import MAX_PASSWORD_LENGTH, PasswordHasher
from jwtauth.server import on_every_cpu, start_worker, take_cpu
from jwtauth.service import MAX_NAME_LENGTH, AuthService
from jwtauth.store import open_store
from jwtauth.web import (
    Envelope,
    client_address,
    etag_matches,
    parse_bearer,
    read_params,
    render_auth_error,
    render_http_error,
    text_param,
)

log = logging.getLogger("jwtauth")
T = TypeVar("T")


# Endpoints


async def login(request: Request) -> Response:
    """Log in with email and password: a new session and its token pair.
    ---
    requestBody: {$ref: "#/components/requestBodies/Login"}
    responses:
      "200": {$ref: "#/components/responses/TokenPair"}
      "400": {$ref: "#/components/responses/Error"}
      "403": {$ref: "#/components/responses/Error"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "429": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Error"}
    """
    params = await read_params(request)
    return await _password_login(request, text_param(params, "email", MAX_EMAIL_LENGTH), params)


async def _password_login(request: Request, email: str, params: Mapping[str, object]) -> Response:
    password = text_param(params, "password", MAX_PASSWORD_LENGTH)
    service: AuthService = request.state.service
    address = client_address(request, service.settings.trusted_proxies)
    hashing: HashingQueue = request.state.hashing
    pair = await hashing.run(functools.partial(service.login, email, password, address))
    return browser.token_response(request, pair)


async def register(request: Request) -> Response:
    """Create an account, when JWTAUTH_OPEN_REGISTRATION=1.
    ---
    requestBody: {$ref: "#/components/requestBodies/Registration"}
    responses:
      "201":
        description: Created
        content: {application/json: {schema: {$ref: "#/components/schemas/User"}}}
      "400": {$ref: "#/components/responses/Error"}
      "403": {$ref: "#/components/responses/Error"}
      "409": {$ref: "#/components/responses/Error"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "429": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Error"}
    """
    service: AuthService = request.state.service
    if not service.settings.open_registration:
        raise AccessDeniedError("registration is closed; an operator adds users with `jwtauth users add`")
    params = await read_params(request)
    email = text_param(params, "email", MAX_EMAIL_LENGTH)
    password = text_param(params, "password", MAX_PASSWORD_LENGTH)
    name = text_param(params, "name", MAX_NAME_LENGTH, required=False)
    address = client_address(request, service.settings.trusted_proxies)
    hashing: HashingQueue = request.state.hashing
    user = await hashing.run(functools.partial(service.register, email, password, name, address))
    return JSONResponse({"id": user.id, "email": user.email, "name": user.name}, 201, {"Cache-Control": "no-store"})


async def refresh(request: Request) -> Response:
    """Rotate a refresh token (the field, or a browser's cookie): a new pair in the same session.
    ---
    parameters: [{$ref: "#/components/parameters/RefreshCookie"}]
    requestBody: {$ref: "#/components/requestBodies/Refresh"}
    responses:
      "200": {$ref: "#/components/responses/TokenPair"}
      "400": {$ref: "#/components/responses/Error"}
      "403": {$ref: "#/components/responses/Error"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Error"}
    """
    return await _refresh(request, await read_params(request))


async def _refresh(request: Request, params: Mapping[str, object]) -> Response:
    refresh_token = browser.presented_token(request, params, "refresh_token")  # the field, or a browser's cookie
    service: AuthService = request.state.service
    with browser.clearing_refused_cookie(request):
        pair = await service.refresh(refresh_token)
    return browser.token_response(request, pair)


async def token(request: Request) -> Response:
    """The OAuth 2.0 token endpoint (RFC 6749 §3.2): refresh_token grant; password grant if enabled.
    ---
    parameters: [{$ref: "#/components/parameters/RefreshCookie"}]
    requestBody: {$ref: "#/components/requestBodies/Token"}
    responses:
      "200": {$ref: "#/components/responses/TokenPair"}
      "400": {$ref: "#/components/responses/Error"}
      "403": {$ref: "#/components/responses/Error"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "429": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Error"}
    """
    params = await read_params(request)
    grant_type = text_param(params, "grant_type")
    service: AuthService = request.state.service
    if grant_type == "refresh_token":
        return await _refresh(request, params)
    if grant_type == "password" and service.settings.password_grant:
        return await _password_login(request, text_param(params, "username", MAX_EMAIL_LENGTH), params)
    raise UnsupportedGrantTypeError(f"grant_type {grant_type!r} is not supported")


async def revoke(request: Request) -> Response:
    """Revoke the session of a refresh or access token (RFC 7009), or of a browser's cookie; 200 for any
    well-formed request.
    ---
    parameters: [{$ref: "#/components/parameters/RefreshCookie"}]
    requestBody: {$ref: "#/components/requestBodies/Revoke"}
    responses:
      "200":
        description: Revoked, or nothing to revoke; a cookie that named the session is cleared
        headers: {Set-Cookie: {description: "jwtauth_refresh=; Max-Age=0; ...", schema: {type: string}}}
        content: {application/json: {schema: {$ref: "#/components/schemas/Empty"}}}
      "400": {$ref: "#/components/responses/Error"}
      "403": {$ref: "#/components/responses/Error"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Error"}
    """
    # token_type_hint is optional: both kinds are tried. A browser may name its session by the cookie instead.
    token = browser.presented_token(request, await read_params(request), "token")
    service: AuthService = request.state.service
    await service.run(service.revoke, token)
    browser.forget_presented_cookie(request)
    return JSONResponse({}, headers={"Cache-Control": "no-store"})  # RFC 7009 §2.2: 200 for any token


async def logout(request: Request) -> Response:
    """End the bearer's session (scope local) or every session of its user (scope global); from a browser,
    the cookie may name the session instead.
    ---
    security: [{bearer: []}, {refreshCookie: []}]
    requestBody: {$ref: "#/components/requestBodies/Logout"}
    responses:
      "204":
        description: Logged out; to an allowed origin, the cookie is cleared
        headers: {Set-Cookie: {description: "jwtauth_refresh=; Max-Age=0; ...", schema: {type: string}}}
      "400": {$ref: "#/components/responses/Error"}
      "401": {$ref: "#/components/responses/Error"}
      "403": {$ref: "#/components/responses/Error"}
      "413": {$ref: "#/components/responses/Error"}
      "415": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Error"}
    """
    cookie = browser.logout_cookie(request)  # from an allowed origin, the cookie may stand for the bearer
    access_token = "" if cookie else parse_bearer(request.headers.get("authorization"))
    scope = (await read_params(request)).get("scope", "local")
    if not isinstance(scope, str):
        raise InvalidRequestError("scope must be local or global")
    service: AuthService = request.state.service
    with browser.clearing_refused_cookie(request):
        if cookie:
            await service.run(service.logout_by_refresh_token, cookie, scope)
        else:
            await service.run(service.logout, access_token, scope)
    browser.clear_cookie(request)
    return Response(status_code=204)


async def userinfo(request: Request) -> Response:
    """Who the bearer of an access token is.
    ---
    security: [{bearer: []}]
    responses:
      "200":
        description: OK
        content: {application/json: {schema: {$ref: "#/components/schemas/UserInfo"}}}
      "401": {$ref: "#/components/responses/Error"}
      "503": {$ref: "#/components/responses/Error"}
    """
    service: AuthService = request.state.service
    user = await service.userinfo(parse_bearer(request.headers.get("authorization")))
    return JSONResponse({"sub": user.id, "email": user.email, "name": user.name}, headers={"Cache-Control": "no-store"})


async def jwks(request: Request) -> Response:
    """The public keys that verify access tokens (RFC 7517).
    ---
    responses:
      "200":
        description: OK
        content: {application/json: {schema: {$ref: "#/components/schemas/JWKS"}}}
      "304": {description: Not modified (If-None-Match)}
    """
    service: AuthService = request.state.service
    keyset = service.keyset
    fresh, not_modified = jwks_responses(keyset.jwks_body, keyset.etag, service.settings.jwks_max_age)
    return not_modified if etag_matches(request.headers.get("if-none-match"), keyset.etag) else fresh


@functools.lru_cache(maxsize=4)
def jwks_responses(body: bytes, etag: str, max_age: int) -> tuple[Response, Response]:
    """The JWKS answers (200, 304), built once per key set: a Response sends the same bytes each time."""
    headers = {"Cache-Control": f"public, max-age={max_age}", "ETag": etag}
    return Response(body, media_type="application/json", headers=headers), Response(status_code=304, headers=headers)


async def metadata(request: Request) -> Response:
    """Authorization server metadata (RFC 8414).
    ---
    responses:
      "200":
        description: OK
        content: {application/json: {schema: {$ref: "#/components/schemas/Metadata"}}}
    """
    return Response(request.state.metadata, media_type="application/json")


async def healthz(request: Request) -> Response:
    """Whether the database answers.
    ---
    responses:
      "200":
        description: OK
        content: {application/json: {schema: {$ref: "#/components/schemas/Health"}}}
      "503":
        description: Unavailable
        content: {application/json: {schema: {$ref: "#/components/schemas/Health"}}}
    """
    service: AuthService = request.state.service
    if await service.run(service.store.is_usable):  # the key set was checked (one current key, all loadable)
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})
    return JSONResponse({"status": "unavailable"}, 503, {"Cache-Control": "no-store"})


async def prometheus(request: Request) -> Response:
    metrics: Metrics = request.state.metrics
    return Response(await anyio.to_thread.run_sync(metrics.render), media_type=METRICS_CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return Response(request.state.openapi, media_type="application/json")


def server_metadata(settings: Settings) -> bytes:
    """Return the RFC 8414 authorization server metadata, serialised once."""
    grants = ["refresh_token", "password"] if settings.password_grant else ["refresh_token"]
    document = {
        "issuer": settings.issuer,
        "token_endpoint": f"{settings.issuer}/token",
        "revocation_endpoint": f"{settings.issuer}/revoke",
        "revocation_endpoint_auth_methods_supported": ["none"],
        "jwks_uri": f"{settings.issuer}/.well-known/jwks.json",
        "userinfo_endpoint": f"{settings.issuer}/userinfo",
        "grant_types_supported": grants,
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["none"],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def open_service(settings: Settings, clock: Callable[[], float] = time.time) -> AuthService:
    """Migrate the database, load (or create) the keys, build the service and sweep what has expired.

    Raises:
        KeyStoreError: the keys cannot be used.
    """
    store = open_store(settings)
    store.migrate()
    keystore = KeyStore.from_settings(settings, store.key_repository())
    service = AuthService(settings, store, keystore, PasswordHasher(settings.argon2), clock)
    service.clean_up()
    return service


class HashingQueue:
    """Calls that hash a password, run in worker threads so that the event loop keeps serving: at most `slots`
    at once (one per core: each takes Argon2's memory), and at most `queue` more waiting for a slot."""

    def __init__(self, slots: int, queue: int) -> None:
        self.limiter = anyio.CapacityLimiter(slots)
        self.queue = queue
        self.calls = 0  # hashing or waiting; counted here, as anyio's limiter counts its waiters only later

    async def run(self, call: Callable[[], T]) -> T:
        """Run `call` in a worker thread once a slot is free.

        Raises:
            TemporarilyUnavailableError: `queue` calls already wait; nothing was run.
        """
        if self.calls >= self.limiter.total_tokens + self.queue:
            raise TemporarilyUnavailableError("too many logins wait for a password check; try again shortly")
        self.calls += 1
        try:
            return await anyio.to_thread.run_sync(functools.partial(on_every_cpu, call), limiter=self.limiter)
        finally:
            self.calls -= 1


CLEAN_UP_EVERY = 60  # seconds between sweeps of ended sessions
COUNT_SESSIONS_EVERY = 5  # seconds between counts of the live sessions, for /metrics


async def maintain(service: AuthService, metrics: Metrics) -> None:
    """In every worker: look at the key set once a second (API.md), count the live sessions every few
    seconds (so that a scrape costs the same at any size) and sweep the database once a minute."""
    failing = False
    for tick in itertools.count(0):
        take_cpu(service.settings.cpu_slots)  # a worker started beside the one it replaces (SIGHUP) takes its CPU
        try:
            if tick % COUNT_SESSIONS_EVERY == 0:
                await anyio.to_thread.run_sync(metrics.count_sessions)
            if tick:
                await anyio.to_thread.run_sync(service.maintain_keys)
            if tick % CLEAN_UP_EVERY == CLEAN_UP_EVERY - 1:
                await anyio.to_thread.run_sync(service.clean_up)
        except (StoreUnavailableError, KeyStoreError) as exc:  # a database outage: said once, not every second
            if not failing:
                log.warning("maintenance failed (%s); the server goes on with the keys it has", exc)
            failing = True
        except Exception:  # whatever it is, the loop goes on: try again in a second
            log.exception("maintenance failed; the server goes on with the keys it has")
        else:
            if failing:
                log.warning("maintenance works again")
            failing = False
        await anyio.sleep(1)


def create_app(settings: Settings, clock: Callable[[], float] = time.time) -> Starlette:
    """Return the ASGI application; the database and keys are opened when its lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        service = await anyio.to_thread.run_sync(open_service, settings, clock)
        metrics = Metrics(service, {route.path for route in routes if isinstance(route, Route)})
        service.on_event = metrics.count_event
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(maintain, service, metrics)
            yield {
                "openapi": json.dumps(SchemaGenerator(openapi_base).get_schema(routes)).encode(),
                "service": service,
                "metrics": metrics,
                "hashing": HashingQueue(settings.hash_concurrency, settings.login_queue),
                "metadata": server_metadata(settings),
            }
            tasks.cancel_scope.cancel()
        service.store.close()

    routes: list[BaseRoute] = [  # the router tries them in order: the busiest first
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        Route("/refresh", refresh, methods=["POST"]),
        Route("/userinfo", userinfo, methods=["GET", "POST"]),
        Route("/token", token, methods=["POST"]),
        Route("/login", login, methods=["POST"]),
        Route("/users", register, methods=["POST"]),
        Route("/revoke", revoke, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/.well-known/openid-configuration", metadata, methods=["GET"]),
        Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        Route("/metrics", prometheus, methods=["GET"], include_in_schema=False),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            AuthError: render_auth_error,
            HTTPException: render_http_error,
        },
    )
    app.add_middleware(Envelope, gate=browser.Browser(settings))
    return app


def create_app_from_env() -> Starlette:
    """The factory `jwtauth serve` hands to uvicorn, run in each worker: settings from the environment."""
    settings = Settings.from_env()
    start_worker(settings.cpu_slots)
    return create_app(settings)

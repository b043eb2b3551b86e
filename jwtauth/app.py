"""The HTTP face: create_app(settings), thin endpoints, and the one place errors become JSON."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jwtauth.config import IPNetwork, Settings
from jwtauth.errors import (
    AuthError,
    BodyTooLargeError,
    InvalidRequestError,
    InvalidTokenError,
    SlowDownError,
    UnsupportedGrantTypeError,
    UnsupportedMediaTypeError,
)
from jwtauth.keys import KeyStore
from jwtauth.passwords import MAX_PASSWORD_LENGTH, PasswordHasher
from jwtauth.service import MAX_EMAIL_LENGTH, AuthService, TokenPair
from jwtauth.store import Store

log = logging.getLogger("jwtauth")

MAX_BODY_BYTES = 16_384
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)  # RFC 6750 §2.1 b64token


# Request parsing


def parse_bearer(authorization: str | None) -> str:
    """Return the token of an `Authorization: Bearer <token>` header.

    Raises:
        InvalidTokenError: the header is missing, empty, of another scheme or malformed.
    """
    match = _BEARER.fullmatch(authorization.strip()) if authorization else None
    if match is None:
        raise InvalidTokenError("missing or malformed bearer token")
    return match.group(1)


async def read_params(request: Request) -> Mapping[str, object]:
    """Return the fields of a JSON object or form-encoded body; an empty body gives no fields.

    Raises:
        InvalidRequestError: malformed JSON, not an object, or a repeated form field (RFC 6749 §3.2).
        UnsupportedMediaTypeError: a body of another content type.
        BodyTooLargeError: the body is over 16 KiB.
    """
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    body = await request.body()
    if content_type == "application/json":
        try:
            params = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidRequestError("malformed JSON body") from None
        if not isinstance(params, dict):
            raise InvalidRequestError("the JSON body must be an object")
        return params
    if content_type == "application/x-www-form-urlencoded":
        form = await request.form()
        if any(len(form.getlist(key)) > 1 for key in form):
            raise InvalidRequestError("a parameter was sent more than once")
        return dict(form)
    if not body:
        return {}
    raise UnsupportedMediaTypeError("send application/json or application/x-www-form-urlencoded")


def text_param(params: Mapping[str, object], name: str, max_length: int = 4096) -> str:
    """Return a required, non-blank string field.

    Raises:
        InvalidRequestError: missing, blank, not a string, too long, or holding a NUL or unpaired surrogate.
    """
    value = params.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidRequestError(f"missing {name}")
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string")
    if len(value) > max_length:
        raise InvalidRequestError(f"{name} is longer than {max_length} characters")
    if "\x00" in value or not _is_utf8(value):
        raise InvalidRequestError(f"{name} holds characters that are not allowed")
    return value


def _is_utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class RequestId:
    """Give every request an id, in `request.state.request_id` and the `X-Request-ID` response header,
    so that a client's report of an error can be found in the log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimit:
    """Refuse request bodies over a limit with 413, whether announced by Content-Length or sent chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await _error_response(BodyTooLargeError("request body too large"))(scope, receive, send)
                return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLargeError("request body too large")
            return message

        await self.app(scope, receive_limited, send)


# Responses and error rendering


def _error_response(exc: AuthError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": exc.error, "error_description": exc.description or exc.error}
    all_headers = {"Cache-Control": "no-store", **(headers or {})}
    if exc.status_code == 401:
        all_headers["WWW-Authenticate"] = f'Bearer error="{exc.error}"'  # RFC 6750 §3
    return JSONResponse(body, exc.status_code, all_headers)


async def render_auth_error(request: Request, exc: Exception) -> Response:
    """Turn an AuthError into OAuth-style JSON (RFC 6749 §5.2, RFC 6750 §3.1)."""
    assert isinstance(exc, AuthError)
    if exc.status_code == 401:
        log.info("bearer token rejected: %s", exc.description)  # the client is told only invalid_token
        exc = InvalidTokenError("the access token is invalid, expired or revoked")
    if isinstance(exc, SlowDownError):
        return _error_response(exc, {"Retry-After": str(exc.retry_after)})
    return _error_response(exc)


_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "invalid_request"}


async def render_http_error(request: Request, exc: Exception) -> Response:
    """Turn Starlette's 404, 405 (with its Allow header) and friends into the same JSON shape."""
    assert isinstance(exc, HTTPException)
    error = AuthError(exc.detail)
    error.error = _HTTP_ERRORS.get(exc.status_code, "invalid_request")
    error.status_code = exc.status_code
    return _error_response(error, exc.headers)


async def render_server_error(request: Request, exc: Exception) -> Response:
    """Log an unexpected exception under the request id; the client gets the id, never the traceback."""
    request_id = request.scope.get("state", {}).get("request_id", "-")
    log.error("unhandled error, request_id=%s", request_id, exc_info=exc)
    body = {"error": "server_error", "error_description": "internal error", "request_id": request_id}
    return JSONResponse(body, 500, {"Cache-Control": "no-store"})


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header matches our entity tag (RFC 9110 §13.1.2: weak comparison, `*`)."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def token_response(pair: TokenPair) -> Response:
    return JSONResponse(pair.as_json(), headers=NO_STORE)


# Endpoints


async def login(request: Request) -> Response:
    params = await read_params(request)
    return await _password_login(request, text_param(params, "email", MAX_EMAIL_LENGTH), params)


async def _password_login(request: Request, email: str, params: Mapping[str, object]) -> Response:
    password = text_param(params, "password", MAX_PASSWORD_LENGTH)
    service: AuthService = request.state.service
    address = client_address(request, service.settings.trusted_proxies)
    # Argon2 runs in a worker thread, at most one per core, so the event loop keeps serving.
    login = functools.partial(service.login, email, password, address)
    return token_response(await anyio.to_thread.run_sync(login, limiter=request.state.hash_limiter))


def client_address(request: Request, trusted_proxies: tuple[IPNetwork, ...]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the nearest address in
    X-Forwarded-For that is not a trusted proxy (the ones to its left could be made up by the client)."""
    peer = request.client.host if request.client else ""
    if not _is_trusted(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for header in request.headers.getlist("x-forwarded-for") for hop in header.split(",")]
    return next((hop for hop in reversed(hops) if hop and not _is_trusted(hop, trusted_proxies)), peer)


def _is_trusted(address: str, trusted_proxies: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted_proxies)


async def refresh(request: Request) -> Response:
    return await _refresh(request, await read_params(request))


async def _refresh(request: Request, params: Mapping[str, object]) -> Response:
    refresh_token = text_param(params, "refresh_token")
    # A thread, because the rotation may wait for another process's write lock.
    return token_response(await anyio.to_thread.run_sync(request.state.service.refresh, refresh_token))


async def token(request: Request) -> Response:
    params = await read_params(request)
    grant_type = text_param(params, "grant_type")
    service: AuthService = request.state.service
    if grant_type == "refresh_token":
        return await _refresh(request, params)
    if grant_type == "password" and service.settings.password_grant:
        return await _password_login(request, text_param(params, "username", MAX_EMAIL_LENGTH), params)
    raise UnsupportedGrantTypeError(f"grant_type {grant_type!r} is not supported")


async def revoke(request: Request) -> Response:
    token = text_param(await read_params(request), "token")  # token_type_hint is optional: both kinds are tried
    await anyio.to_thread.run_sync(request.state.service.revoke, token)
    return JSONResponse({}, headers={"Cache-Control": "no-store"})  # RFC 7009 §2.2: 200 for any token


async def logout(request: Request) -> Response:
    access_token = parse_bearer(request.headers.get("authorization"))
    scope = (await read_params(request)).get("scope", "local")
    if not isinstance(scope, str):
        raise InvalidRequestError("scope must be local or global")
    await anyio.to_thread.run_sync(request.state.service.logout, access_token, scope)
    return Response(status_code=204)


async def userinfo(request: Request) -> Response:
    service: AuthService = request.state.service
    _, user = service.authenticate(parse_bearer(request.headers.get("authorization")))
    return JSONResponse({"sub": user.id, "email": user.email, "name": user.name}, headers={"Cache-Control": "no-store"})


async def jwks(request: Request) -> Response:
    keyset = request.state.service.keyset
    max_age = request.state.service.settings.jwks_max_age
    headers = {"Cache-Control": f"public, max-age={max_age}", "ETag": keyset.etag}
    if etag_matches(request.headers.get("if-none-match"), keyset.etag):
        return Response(status_code=304, headers=headers)
    return Response(keyset.jwks_body, media_type="application/json", headers=headers)


async def metadata(request: Request) -> Response:
    return Response(request.state.metadata, media_type="application/json")


async def healthz(request: Request) -> Response:
    service: AuthService = request.state.service
    if service.store.is_usable():  # the key set was checked (one current key, all loadable) when loaded
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})
    return JSONResponse({"status": "unavailable"}, 503, {"Cache-Control": "no-store"})


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
    store = Store(settings.db_path)
    store.migrate()
    service = AuthService(settings, store, KeyStore.from_settings(settings), PasswordHasher(settings.argon2), clock)
    service.clean_up()
    return service


CLEAN_UP_EVERY = 60  # seconds between sweeps of expired refresh tokens and ended sessions


async def maintain(service: AuthService) -> None:
    """In every worker: look at the key set once a second (API.md), sweep the database once a minute."""
    for tick in itertools.count(1):
        await anyio.sleep(1)
        try:
            await anyio.to_thread.run_sync(service.maintain_keys)
            if tick % CLEAN_UP_EVERY == 0:
                await anyio.to_thread.run_sync(service.clean_up)
        except Exception:  # a locked database or unreadable key file must not end the loop: try again later
            log.exception("maintenance failed; the server goes on with the keys it has")


def create_app(settings: Settings, clock: Callable[[], float] = time.time) -> Starlette:
    """Return the ASGI application; the database and keys are opened when its lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        service = await anyio.to_thread.run_sync(open_service, settings, clock)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(maintain, service)
            yield {
                "service": service,
                "hash_limiter": anyio.CapacityLimiter(os.cpu_count() or 1),
                "metadata": server_metadata(settings),
            }
            tasks.cancel_scope.cancel()
        service.store.close()

    routes = [
        Route("/login", login, methods=["POST"]),
        Route("/refresh", refresh, methods=["POST"]),
        Route("/token", token, methods=["POST"]),
        Route("/revoke", revoke, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/userinfo", userinfo, methods=["GET", "POST"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        Route("/.well-known/openid-configuration", metadata, methods=["GET"]),
        Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            AuthError: render_auth_error,
            HTTPException: render_http_error,
            Exception: render_server_error,
        },
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(RequestId)
    return app


def create_app_from_env() -> Starlette:
    """The factory `jwtauth serve` hands to uvicorn: settings from the environment."""
    return create_app(Settings.from_env())

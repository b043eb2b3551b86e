"""Protect a downstream Starlette app with jwtauth access tokens:

    app = Starlette(routes=routes, middleware=[bearer_auth(Verifier("https://auth.example.com"))])

    @requires("authenticated", status_code=401)
    async def orders(request: Request) -> Response: ...  # request.user.claims holds the token's claims

A module of its own rather than a lazy import inside `jwtauth.verify`: the backend must subclass
Starlette's `AuthenticationBackend` when its class is defined, and a class built inside a function is
hard to type, to document and to import by name. So `import jwtauth.verify` never loads Starlette,
and importing this module (which only a Starlette app does) loads it and nothing of the server.
"""

from __future__ import annotations

import logging

from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jwtauth.tokens import AccessClaims
from jwtauth.verify import InvalidTokenError, Verifier

__all__ = ["BearerAuthMiddleware", "BearerTokenBackend", "TokenUser", "Verifier", "bearer_auth", "reject_invalid_token"]

log = logging.getLogger("jwtauth.verify")


class TokenUser(BaseUser):
    """The user an access token speaks for; `claims` are the verified claims of the token."""

    def __init__(self, claims: AccessClaims) -> None:
        self.claims = claims

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.claims.get("email") or self.claims["sub"]

    @property
    def identity(self) -> str:
        return self.claims["sub"]


class BearerTokenBackend(AuthenticationBackend):
    """Authenticates `Authorization: Bearer <access token>` with a Verifier; the scope is `authenticated`.

    A request without an Authorization header, or with another scheme, stays anonymous (routes decide
    with `requires`); a Bearer token that fails verification ends the request with 401.
    """

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        """Return the credentials and user of a valid bearer token, None without one.

        Raises:
            AuthenticationError: a Bearer token was sent and is not valid.
        """
        scheme, _, token = conn.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        try:
            claims = await self.verifier.verify_access_token_async(token.strip())
        except InvalidTokenError as exc:
            log.info("bearer token rejected: %s", exc.description)  # the client learns only invalid_token
            raise AuthenticationError("the access token is invalid or expired") from exc
        return AuthCredentials(["authenticated"]), TokenUser(claims)


def reject_invalid_token(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    """The 401 for a bad bearer token, as RFC 6750 §3 describes it."""
    body = {"error": "invalid_token", "error_description": str(exc)}
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"', "Cache-Control": "no-store"}
    return JSONResponse(body, 401, headers)


class BearerAuthMiddleware:
    """Starlette's AuthenticationMiddleware with a BearerTokenBackend, whose 401s all carry a challenge.

    A 401 without `WWW-Authenticate`, such as the one of `requires("authenticated", status_code=401)`
    for a request without a token, gets `WWW-Authenticate: Bearer` (RFC 7235 §3.1: a 401 must carry one;
    RFC 6750 §3: no error code when no token was sent).
    """

    def __init__(self, app: ASGIApp, verifier: Verifier) -> None:
        self.app = AuthenticationMiddleware(app, backend=BearerTokenBackend(verifier), on_error=reject_invalid_token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_challenge(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"www-authenticate" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"www-authenticate", b"Bearer")]}
            await send(message)

        await self.app(scope, receive, send_with_challenge if scope["type"] == "http" else send)


def bearer_auth(verifier: Verifier) -> Middleware:
    """The middleware that puts the token's user on `request.user`: `Starlette(middleware=[bearer_auth(v)])`."""
    return Middleware(BearerAuthMiddleware, verifier=verifier)

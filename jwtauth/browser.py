"""Browser apps (API.md "Browser apps"): the allowed origins, CORS, and the refresh token in an HttpOnly cookie.

web.Envelope hands a request to Browser only when it carries an Origin header, so servers, native apps and
curl never reach this module. Browser refuses a POST from any other origin before anything is read, answers
preflights and adds the CORS headers; for a request from an allowed origin it leaves a Visit in
`request.state.browser`, through which the endpoints take the cookie instead of a body field and set or
clear it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jwtauth.config import Settings, issuer_origin
from jwtauth.errors import InvalidGrantError, InvalidRequestError, InvalidTokenError, OriginNotAllowedError
from jwtauth.service import TokenPair
from jwtauth.web import NO_STORE, error_response, text_param

COOKIE = "jwtauth_refresh"
# Open to every origin: the public keys and the discovery documents hold nothing a page could abuse.
PUBLIC_PATHS = frozenset(
    {"/.well-known/jwks.json", "/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"}
)
PREFLIGHT_MAX_AGE = 7200  # seconds; Chromium caches a preflight for at most 2 hours, Firefox for 24
_PREFLIGHT_HEADERS = [
    (b"access-control-allow-methods", b"GET, POST"),
    (b"access-control-allow-headers", b"Authorization, Content-Type"),
    (b"access-control-max-age", str(PREFLIGHT_MAX_AGE).encode()),
]
_PUBLIC_HEADERS = [(b"access-control-allow-origin", b"*"), (b"vary", b"Origin")]  # no credentials with `*`


@dataclass(slots=True)
class Visit:
    """One request from an allowed origin: whether it presented the cookie to the service, the cookie to send."""

    cookie_attributes: str
    presented: bool = False  # the token the endpoint used came from the cookie
    set_cookie: bytes | None = None

    def send_cookie(self, value: str, max_age: int) -> None:
        self.set_cookie = f"{COOKIE}={value}; Max-Age={max_age}{self.cookie_attributes}".encode()


class Browser:
    """The policy of API.md "Browser apps", built once from the settings; web.Envelope calls it as a gate."""

    def __init__(self, settings: Settings) -> None:
        self.origins = frozenset({issuer_origin(settings.issuer), *settings.cors_origins})
        issuer = urlsplit(settings.issuer)
        # No Domain: the cookie goes back to the issuer's host only. Path: the issuer's, e.g. behind a proxy prefix.
        secure = "; Secure" if issuer.scheme == "https" else ""
        self.cookie_attributes = f"; Path={issuer.path or '/'}; HttpOnly; SameSite=Strict{secure}"

    async def __call__(self, origin: bytes, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse, answer or forward one request that carries an Origin header."""
        method, text = scope["method"], origin.decode("latin-1")
        if text in self.origins:
            visit = Visit(self.cookie_attributes)
            scope["state"]["browser"] = visit
            headers = [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"Retry-After, WWW-Authenticate, X-Request-ID"),
            ]
        elif method == "POST":  # CSRF and login CSRF: nothing is read or written
            await error_response(OriginNotAllowedError("origin not allowed"))(scope, receive, send)
            return
        elif scope["path"] in PUBLIC_PATHS:
            visit, headers = None, _PUBLIC_HEADERS
        else:  # a GET (or a preflight) from elsewhere: answered as without Origin; its page cannot read the answer
            await app(scope, receive, send)
            return
        if method == "OPTIONS" and any(name == b"access-control-request-method" for name, _ in scope["headers"]):
            await Response(status_code=204)(scope, receive, _adding(send, [*headers, *_PREFLIGHT_HEADERS], None))
            return
        await app(scope, receive, _adding(send, headers, visit))


def _adding(send: Send, headers: list[tuple[bytes, bytes]], visit: Visit | None) -> Send:
    """`send`, with the headers, and the visit's cookie if one is due by then, added to the response."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            cookie = [(b"set-cookie", visit.set_cookie)] if visit is not None and visit.set_cookie else []
            message["headers"] = [*message.get("headers", []), *headers, *cookie]
        await send(message)

    return send_with_headers


# For the endpoints


def _visit(request: Request) -> Visit | None:
    visit: Visit | None = request.scope["state"].get("browser")  # request.state would raise and catch for None
    return visit


def _take_cookie(request: Request, visit: Visit) -> str:
    token = request.cookies.get(COOKIE, "").strip()
    visit.presented = bool(token)
    return token


def presented_token(request: Request, params: Mapping[str, object], name: str) -> str:
    """The token in the field `name`; without one, the refresh cookie of a request from an allowed origin.

    Raises:
        InvalidRequestError: neither (without an Origin header the cookie is not looked at), or a bad field.
    """
    token = text_param(params, name, required=False)
    if not token and (visit := _visit(request)) is not None:
        token = _take_cookie(request, visit)
    if not token:
        raise InvalidRequestError(f"missing {name}")
    return token


def logout_cookie(request: Request) -> str:
    """The cookie that names the session at /logout: from an allowed origin that sends no Authorization
    header; else ""."""
    visit = _visit(request)
    return "" if visit is None or "authorization" in request.headers else _take_cookie(request, visit)


@contextmanager
def clearing_refused_cookie(request: Request) -> Iterator[None]:
    """Clear the cookie when the block refuses the token this request took from it (API.md)."""
    try:
        yield
    except (InvalidGrantError, InvalidTokenError):
        forget_presented_cookie(request)
        raise


def forget_presented_cookie(request: Request) -> None:
    """Clear the cookie, if this request took its token from it: its session is over, or never was."""
    if (visit := _visit(request)) is not None and visit.presented:
        visit.send_cookie("", 0)


def clear_cookie(request: Request) -> None:
    """Clear the cookie of a request from an allowed origin that brought one (a logout, by any means)."""
    if (visit := _visit(request)) is not None and COOKIE in request.cookies:
        visit.send_cookie("", 0)


def token_response(request: Request, pair: TokenPair) -> Response:
    """The token pair; to an allowed origin, the refresh token goes in the cookie instead of the body."""
    body = pair.as_json()
    if (visit := _visit(request)) is not None:
        visit.send_cookie(str(body.pop("refresh_token")), pair.refresh_expires_in)
    return JSONResponse(body, headers=NO_STORE)

"""A downstream API that accepts jwtauth access tokens, verified offline against the issuer's JWKS.

    JWTAUTH_ISSUER=http://127.0.0.1:8000 uvicorn --factory examples.resource_server:create_app --port 9000
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:9000/orders

It needs `jwtauth.verify` (and Starlette), not the server: no database, no keys of its own. For the browser
app of examples/spa/, which calls it from another origin, name that origin in API_CORS_ORIGINS
(comma-separated, e.g. `API_CORS_ORIGINS=http://127.0.0.1:8080`): the page sends its access token in the
Authorization header, never a cookie, so this API needs no credentials mode and no CSRF defence.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from jwtauth.verify import Verifier
from jwtauth.verify_starlette import bearer_auth


@requires("authenticated", status_code=401)  # no token: 401 (Starlette's default for requires is 403)
async def orders(request: Request) -> JSONResponse:
    return JSONResponse({"owner": request.user.identity, "email": request.user.claims.get("email"), "orders": []})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})  # public: no token needed


def create_app(verifier: Verifier | None = None, cors_origins: list[str] | None = None) -> Starlette:
    """The API; by default it trusts the issuer and audience named by JWTAUTH_ISSUER and JWTAUTH_AUDIENCE, and
    lets the pages of the origins in API_CORS_ORIGINS call it."""
    verifier = verifier or Verifier(
        os.environ.get("JWTAUTH_ISSUER", "http://127.0.0.1:8000"), os.environ.get("JWTAUTH_AUDIENCE", "jwtauth")
    )
    if cors_origins is None:
        cors_origins = [
            origin.strip() for origin in os.environ.get("API_CORS_ORIGINS", "").split(",") if origin.strip()
        ]
    routes = [Route("/orders", orders), Route("/health", health)]
    cors = Middleware(  # outermost, so that a preflight is answered before authentication looks for a token
        CORSMiddleware,
        allow_origins=cors_origins,
        allow_methods=["GET"],
        allow_headers=["Authorization"],
        expose_headers=["WWW-Authenticate"],  # a page can tell an expired token (refresh, retry) from others
    )
    return Starlette(routes=routes, middleware=[cors, bearer_auth(verifier)])

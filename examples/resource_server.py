"""A downstream API that accepts jwtauth access tokens, verified offline against the issuer's JWKS.

    JWTAUTH_ISSUER=http://127.0.0.1:8000 uvicorn --factory examples.resource_server:create_app --port 9000
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:9000/orders

It needs `jwtauth.verify` (and Starlette), not the server: no database, no keys of its own.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.authentication import requires
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


def create_app(verifier: Verifier | None = None) -> Starlette:
    """The API; by default it trusts the issuer and audience named by JWTAUTH_ISSUER and JWTAUTH_AUDIENCE."""
    verifier = verifier or Verifier(
        os.environ.get("JWTAUTH_ISSUER", "http://127.0.0.1:8000"), os.environ.get("JWTAUTH_AUDIENCE", "jwtauth")
    )
    routes = [Route("/orders", orders), Route("/health", health)]
    return Starlette(routes=routes, middleware=[bearer_auth(verifier)])

"""The baseline server: bare Starlette JSON endpoints under exactly the uvicorn set-up of `jwtauth serve`.

`python scripts/bench_bare.py serve --port P --workers N` runs jwtauth's own `serve` command with
jwtauth.server.run_server wrapped so that it loads `create_app` below instead of jwtauth's app. Every other
option (workers and their listening sockets, lifespan, proxy headers, server header, logging, and whatever
cli.py and server.py add later) is the one jwtauth uses, so the baseline follows them without being kept in
step by hand.

- `GET /get`: a small JSON object, as a handler that only serialises does.
- `POST /post`: parses a JSON body and answers an object shaped like a token pair, of about its size.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jwtauth import server
from jwtauth.cli import main as jwtauth_main
from jwtauth.config import Settings

TOKEN_PAIR_SHAPE = {
    "access_token": "x" * 800,  # an RS256 access token with our claims and a 2048-bit key is ~800 chars
    "token_type": "Bearer",
    "expires_in": 900,
    "refresh_token": "y" * 43,
    "refresh_expires_in": 2_592_000,
}


async def get_json(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def post_json(request: Request) -> Response:
    params = await request.json()
    if not isinstance(params, dict):
        return JSONResponse({"error": "invalid_request"}, 400)
    return JSONResponse(TOKEN_PAIR_SHAPE, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def create_app() -> Starlette:
    """The factory uvicorn loads in each worker; it starts the worker as jwtauth's factory does."""
    server.start_worker(Settings.from_env().cpu_slots)
    return Starlette(routes=[Route("/get", get_json, methods=["GET"]), Route("/post", post_json, methods=["POST"])])


def run_bare_instead(real_run: Any) -> Any:
    """Wrap run_server: keep everything jwtauth's serve passes, swap the application for ours."""

    def run(app: object, *args: Any, **options: Any) -> None:
        print(f"bench_bare: serving bench_bare:create_app in place of {app!r}", file=sys.stderr)
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # where the workers import us from
        real_run("bench_bare:create_app", *args, **options)

    return run


def main(argv: list[str]) -> int:
    """Run `jwtauth <argv>` (a `serve` command) with the bare application."""
    server.run_server = run_bare_instead(server.run_server)
    return jwtauth_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

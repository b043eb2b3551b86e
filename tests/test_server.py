"""A real `jwtauth serve` process on a free port, used by real HTTP clients and verifiers."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import jwt
import pytest

from .conftest import PASSWORD, Server, key_entries, run_cli, start_server, stop_server, table_counts, without_keys


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    fresh = without_keys(env, tmp_path)  # the first start creates them
    assert run_cli("users", "add", "alice@example.com", "--password-stdin", env=fresh, stdin=PASSWORD).returncode == 0
    server = start_server(fresh)
    yield server
    stop_server(server)


def test_first_start_creates_the_database_and_keys(server: Server) -> None:
    states = sorted(entry["state"] for entry in key_entries(server.env))

    assert states == ["current", "next"]
    assert table_counts(server.env["JWTAUTH_DATABASE"])["users"] == 1


def test_access_token_verifies_offline_with_pyjwkclient(server: Server) -> None:
    response = httpx.post(f"{server.url}/login", json={"email": "alice@example.com", "password": PASSWORD})
    token = response.json()["access_token"]

    signing_key = jwt.PyJWKClient(f"{server.url}/.well-known/jwks.json").get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token, signing_key, algorithms=["RS256"], audience="jwtauth", issuer=server.env["JWTAUTH_ISSUER"]
    )

    assert claims["email"] == "alice@example.com"
    userinfo = httpx.get(f"{server.url}/userinfo", headers={"Authorization": f"Bearer {token}"})
    assert (userinfo.status_code, userinfo.json()["sub"]) == (200, claims["sub"])


def test_form_login_through_the_real_server(server: Server) -> None:
    response = httpx.post(f"{server.url}/login", data={"email": "alice@example.com", "password": PASSWORD})

    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"


def test_chunked_body_over_16_kib_is_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"email": "alice@example.com", "password": "x", "pad": "'
        for _ in range(32):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(f"{server.url}/login", content=chunks(), headers={"content-type": "application/json"})

    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"


def read_all(sock: socket.socket) -> bytes:
    """The whole reply: until the server closes the connection."""
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    return reply


def test_declared_length_over_16_kib_is_refused_before_the_body(server: Server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\nConnection: close\r\n\r\n")  # fmt: skip
        reply = read_all(sock)

    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"error":"invalid_request"' in reply


def test_a_client_that_leaves_mid_body_leaves_no_traceback_in_the_log(env: dict[str, str]) -> None:
    server = start_server(env)
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"email\":")  # fmt: skip
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # the server went on
    finally:
        log = stop_server(server)

    assert "Traceback" not in log and "Exception in ASGI application" not in log


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nA header without a colon\r\n\r\n",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nnot-a-chunk-size\r\n",
    ],
    ids=["request-line", "header", "chunk"],
)
def test_a_malformed_request_gets_a_json_400(server: Server, request_bytes: bytes) -> None:
    """uvicorn's own answer was plain text; every error body is JSON (API.md "Endpoints")."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request_bytes)
        reply = read_all(sock)

    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body) == {"error": "invalid_request", "error_description": "malformed HTTP request"}

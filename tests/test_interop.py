"""Tokens of a real `jwtauth serve` verify with jwtauth.verify and with standard verifiers: PyJWT's
PyJWKClient, joserfc and Node's jose; across forced key rotations; and a flood of unknown kids stays
a trickle of JWKS fetches."""

from __future__ import annotations

import itertools
import json
import math
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet
from starlette.testclient import TestClient

from examples.resource_server import create_app
from jwtauth.verify import Fetched, InvalidTokenError, JWKSClient, Verifier, fetch_url

from .conftest import PASSWORD, Server, bearer, run_cli, stop_server
from .issuer import issuer_env, start_issuer

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys_template: Path) -> Iterator[Server]:
    server, _ = start_issuer(issuer_env(tmp_path_factory.mktemp("interop"), keys_template))
    yield server
    stop_server(server)


def fresh_token(http: httpx.Client | str) -> str:
    """An access token for alice, from POST /login."""
    if isinstance(http, str):
        with httpx.Client(base_url=http, timeout=10) as client:
            return fresh_token(client)
    response = http.post("/login", json={"email": "alice@example.com", "password": PASSWORD})
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def jwks_uri(server: Server) -> str:
    return str(httpx.get(f"{server.url}/.well-known/openid-configuration").json()["jwks_uri"])


def pyjwt_verify(client: jwt.PyJWKClient, token: str, issuer: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, client.get_signing_key_from_jwt(token), algorithms=["RS256"], audience="jwtauth", issuer=issuer
    )
    return claims


class CountingFetch:
    """The default transport of jwtauth.verify, counting the requests that reach the network."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, url: str, headers: Mapping[str, str], timeout: float) -> Fetched:
        with self._lock:
            self.urls.append(url)
        return fetch_url(url, headers, timeout)

    def count(self, suffix: str = "/jwks.json") -> int:
        with self._lock:
            return sum(url.endswith(suffix) for url in self.urls)


# Verifiers


def test_token_verifies_with_jwtauth_verify(server: Server) -> None:
    token = fresh_token(server.url)

    claims = Verifier(server.url).verify_access_token(token)  # the issuer's URL is all it needs

    assert (claims["iss"], claims["email"]) == (server.url, "alice@example.com")


def test_token_verifies_with_pyjwkclient(server: Server) -> None:
    token = fresh_token(server.url)

    claims = pyjwt_verify(jwt.PyJWKClient(jwks_uri(server)), token, server.url)

    assert claims["email"] == "alice@example.com"


def test_token_verifies_with_joserfc(server: Server) -> None:
    token = fresh_token(server.url)
    keys = KeySet.import_key_set(httpx.get(jwks_uri(server)).json())

    decoded = jose_jwt.decode(token, keys, algorithms=["RS256"])
    registry = jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": server.url}, aud={"essential": True, "value": "jwtauth"},
        exp={"essential": True}, nbf={"essential": True}, sub={"essential": True},
    )  # fmt: skip
    registry.validate(decoded.claims)

    assert decoded.header["typ"] == "at+jwt"
    assert decoded.claims["email"] == "alice@example.com"


def node_jose(server: Server, tokens: list[str]) -> list[dict[str, Any]]:
    """Verify tokens with Node's jose (createRemoteJWKSet + jwtVerify), in tests/node/verify.mjs."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: Node's jose cannot be tried here")
    if not (NODE_DIR / "node_modules" / "jose").is_dir():
        pytest.fail("Node's jose is not installed in tests/node: run `make test` (npm ci there), or npm ci yourself")
    result = subprocess.run(
        [node, str(NODE_DIR / "verify.mjs"), jwks_uri(server), server.url, "jwtauth"],
        input="\n".join(tokens) + "\n", capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_token_verifies_with_node_jose(server: Server) -> None:
    token = fresh_token(server.url)
    header, payload, signature = token.split(".")

    good, tampered = node_jose(server, [token, f"{header}.{payload}.{signature[::-1]}"])

    assert good["ok"], good
    assert good["payload"]["email"] == "alice@example.com"
    assert tampered == {"ok": False, "code": "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"}


def test_example_resource_server_accepts_the_servers_token(server: Server) -> None:
    with TestClient(create_app(Verifier(server.url))) as api:
        assert api.get("/orders", headers=bearer(fresh_token(server.url))).status_code == 200
        assert api.get("/orders").status_code == 401


# Rotation

Verify = Callable[[str], object]


def failures_across_rotations(server: Server, rotations: int, verifiers: dict[str, Verify]) -> list[str]:
    """Rotate with `jwtauth keys rotate --force` while a thread logs in and verifies every new token,
    and the first one, with each verifier; return the failures. Every rotation is seen signing."""
    failures: list[str] = []
    kids: list[str] = []
    stop = threading.Event()

    def verify_in_a_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            first = fresh_token(http)
            while not stop.is_set():
                fresh = fresh_token(http)
                for token, (name, verify) in itertools.product((fresh, first), verifiers.items()):
                    try:
                        verify(token)
                    except (InvalidTokenError, jwt.PyJWTError) as exc:
                        failures.append(f"{name}, kid {jwt.get_unverified_header(token)['kid']}: {exc!r}")
                kids.append(str(jwt.get_unverified_header(fresh)["kid"]))

    def wait_for_kids(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(set(kids)) < count:
            assert time.monotonic() < deadline, "the server did not sign with the new key in time"
            time.sleep(0.05)

    loop = threading.Thread(target=verify_in_a_loop)
    loop.start()
    try:
        wait_for_kids(1)
        for rotation in range(1, rotations + 1):
            assert run_cli("keys", "rotate", "--force", env=server.env).returncode == 0
            wait_for_kids(1 + rotation)
        time.sleep(0.5)  # and a little more traffic under the newest key
    finally:
        stop.set()
        loop.join(timeout=30)
    assert len(set(kids)) == 1 + rotations
    return failures


@pytest.fixture
def rotating_server(tmp_path: Path, keys_template: Path) -> Iterator[Server]:
    server, _ = start_issuer(issuer_env(tmp_path, keys_template))
    yield server
    stop_server(server)


def test_tokens_verify_across_a_forced_rotation(rotating_server: Server) -> None:
    server = rotating_server
    ours, pyjwk = Verifier(server.url), jwt.PyJWKClient(jwks_uri(server))  # both with their defaults
    verifiers: dict[str, Verify] = {
        "jwtauth.verify": ours.verify_access_token,
        "PyJWKClient": lambda token: pyjwt_verify(pyjwk, token, server.url),
    }

    assert failures_across_rotations(server, 1, verifiers) == []


def test_a_key_that_signs_before_any_cache_saw_it_is_fetched_at_once(rotating_server: Server) -> None:
    """Back-to-back forced rotations (a leaked key): the second makes a key sign that was published only
    by the first. jwtauth.verify refetches on its first unknown kid; PyJWKClient does so only with its
    cooldown off (by default it waits 30 s after any fetch, and fails meanwhile)."""
    server = rotating_server
    ours, pyjwk = Verifier(server.url), jwt.PyJWKClient(jwks_uri(server), cooldown_duration=0)
    verifiers: dict[str, Verify] = {
        "jwtauth.verify": ours.verify_access_token,
        "PyJWKClient": lambda token: pyjwt_verify(pyjwk, token, server.url),
    }

    assert failures_across_rotations(server, 2, verifiers) == []


# Unknown kids


@pytest.fixture(scope="module")
def unknown_kid_tokens(server: Server) -> list[str]:
    """1,000 well-formed tokens, signed, each with a random kid that no JWKS holds."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(fresh_token(server.url), options={"verify_signature": False})
    return [
        jwt.encode(claims, key, algorithm="RS256", headers={"kid": secrets.token_urlsafe(16), "typ": "at+jwt"})
        for _ in range(1000)
    ]


@pytest.mark.parametrize("refetch_interval", [30.0, 0.02])  # the default, and one the flood outlasts
def test_unknown_kid_flood_makes_a_bounded_number_of_fetches(
    server: Server, unknown_kid_tokens: list[str], refetch_interval: float
) -> None:
    fetches = CountingFetch()
    verifier = Verifier(server.url, jwks=JWKSClient(server.url, fetch=fetches, refetch_interval=refetch_interval))
    token = fresh_token(server.url)
    verifier.verify_access_token(token)  # the first use: discovery and the key set
    rejected: list[str] = []
    accepted: list[str] = []

    def flood(share: list[str]) -> None:
        for i, forged in enumerate(share):
            try:
                verifier.verify_access_token(forged)
            except InvalidTokenError as exc:
                rejected.append(exc.description)
            if i % 50 == 0:  # real traffic goes on during the flood
                accepted.append(verifier.verify_access_token(token)["sub"])

    threads = [threading.Thread(target=flood, args=(unknown_kid_tokens[i::4],)) for i in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    elapsed = time.monotonic() - started

    refetches = fetches.count() - 1
    print(f"\n{len(rejected)} unknown kids in {elapsed:.2f} s, interval {refetch_interval} s: {refetches} refetches")
    assert rejected == ["unknown key"] * 1000
    assert len(accepted) == 20
    assert fetches.count("/openid-configuration") == 1
    assert 1 <= refetches <= 1 + math.floor(elapsed / refetch_interval)

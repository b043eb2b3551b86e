"""jwtauth.verify, the resource servers' kit: the JWKS client's caching and rate limits, and the Verifier.

The JWKS comes from the real app through TestClient (an HTTP client), by way of a Fetch that records
every request; the clock of the client and verifier is a Clock the test moves.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.testclient import TestClient

from jwtauth.keys import public_jwk
from jwtauth.tokens import public_keys_of
from jwtauth.verify import Fetched, InvalidTokenError, JWKSClient, Verifier, fetch_url, max_age_of

from .conftest import ISSUER, NESTED_HEADER_TOKEN, Account, Clock, login, private_key

JWKS_URI = f"{ISSUER}/.well-known/jwks.json"
DISCOVERY_URI = f"{ISSUER}/.well-known/openid-configuration"


class Recorder:
    """A Fetch that sends each GET to the app through an HTTP client and records it; it can play dead."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.statuses: list[int] = []
        self.threads: list[int] = []
        self.is_down = False

    def __call__(self, url: str, headers: Mapping[str, str], timeout: float) -> Fetched:
        self.requests.append((url, dict(headers)))
        self.threads.append(threading.get_ident())
        if self.is_down:
            raise OSError("connection refused")
        response = self.client.get(url, headers=dict(headers))
        self.statuses.append(response.status_code)
        return Fetched(response.status_code, dict(response.headers.items()), response.content)

    @property
    def jwks_fetches(self) -> int:
        return sum(url == JWKS_URI for url, _ in self.requests)


@pytest.fixture
def recorder(client: TestClient) -> Recorder:
    return Recorder(client)


@pytest.fixture
def verifier(recorder: Recorder, clock: Clock) -> Verifier:
    return Verifier(ISSUER, jwks=JWKSClient(ISSUER, fetch=recorder, clock=clock), clock=clock)


@pytest.fixture
def token(client: TestClient, alice: Account) -> str:
    return str(login(client, alice.email)["access_token"])


@pytest.fixture(scope="module")
def foreign_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def resigned(token: str, key: rsa.RSAPrivateKey | bytes | str, header: Mapping[str, Any] | None = None,
             **claims: object) -> str:  # fmt: skip
    """The token's claims and header, changed as given, signed again with key (RS256 unless header says)."""
    headers = {**jwt.get_unverified_header(token), **(header or {})}
    payload = {**jwt.decode(token, options={"verify_signature": False}), **claims}
    return jwt.encode(payload, key, algorithm=headers["alg"], headers=headers)


def rejection(verifier: Verifier, token: str) -> str:
    with pytest.raises(InvalidTokenError) as caught:
        verifier.verify_access_token(token)
    return caught.value.description


# Imports


@pytest.mark.parametrize("module", ["jwtauth.verify", "jwtauth.verify_starlette"])
def test_verifying_loads_none_of_the_server(module: str) -> None:
    server_only = ["sqlite3", "psycopg", "argon2", "jwtauth.config", "jwtauth.store", "jwtauth.app"]
    if module == "jwtauth.verify":
        server_only.append("starlette")
    code = f"import sys, {module}; print(sorted(set({server_only!r}) & set(sys.modules)))"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)

    assert result.stdout.strip() == "[]"


# The Verifier


def test_token_from_the_server_verifies(verifier: Verifier, token: str, alice: Account) -> None:
    claims = verifier.verify_access_token(token)

    assert (claims["sub"], claims["email"], claims["iss"]) == (alice.id, alice.email, ISSUER)


def test_key_set_is_found_through_discovery(verifier: Verifier, recorder: Recorder, token: str) -> None:
    verifier.verify_access_token(token)

    assert [url for url, _ in recorder.requests] == [DISCOVERY_URI, JWKS_URI]


def test_discovery_document_of_another_issuer_is_not_followed(recorder: Recorder, clock: Clock, token: str) -> None:
    other = "https://other.test"
    verifier = Verifier(other, jwks=JWKSClient(other, fetch=recorder, clock=clock), clock=clock)
    # The app answers for any host name; its metadata says issuer https://auth.test.

    assert rejection(verifier, token) == "unknown key"
    assert recorder.jwks_fetches == 0


def test_expired_token_is_rejected_after_the_leeway(verifier: Verifier, clock: Clock, token: str) -> None:
    clock.now = jwt.decode(token, options={"verify_signature": False})["exp"] + verifier.leeway

    assert rejection(verifier, token) == "expired"


def test_expired_token_is_accepted_within_the_leeway(verifier: Verifier, clock: Clock, token: str) -> None:
    clock.now = jwt.decode(token, options={"verify_signature": False})["exp"] + verifier.leeway - 1

    assert verifier.verify_access_token(token)["iss"] == ISSUER


def test_token_not_yet_valid_is_rejected(verifier: Verifier, clock: Clock, token: str) -> None:
    clock.now = jwt.decode(token, options={"verify_signature": False})["nbf"] - verifier.leeway - 1

    assert rejection(verifier, token) == "not yet valid"


def test_token_for_another_audience_is_rejected(recorder: Recorder, clock: Clock, token: str) -> None:
    verifier = Verifier(ISSUER, "billing", jwks=JWKSClient(ISSUER, fetch=recorder, clock=clock), clock=clock)

    assert "audience" in rejection(verifier, token).lower()


def test_token_of_another_issuer_signed_with_our_key_is_rejected(
    verifier: Verifier, env: dict[str, str], token: str
) -> None:
    forged = resigned(token, private_key(env, str(jwt.get_unverified_header(token)["kid"])), iss=ISSUER + ".x")

    assert "issuer" in rejection(verifier, forged).lower()


def test_token_of_another_type_signed_with_our_key_is_rejected(
    verifier: Verifier, env: dict[str, str], token: str
) -> None:
    key = private_key(env, str(jwt.get_unverified_header(token)["kid"]))

    assert rejection(verifier, resigned(token, key, {"typ": "JWT"})) == "not an access token"


@pytest.mark.parametrize("alg", ["HS256", "none"])
def test_token_of_another_algorithm_is_rejected(verifier: Verifier, token: str, alg: str) -> None:
    forged = resigned(token, secrets.token_bytes(32) if alg == "HS256" else "", {"alg": alg})

    assert rejection(verifier, forged) == "algorithm not allowed"


def test_token_signed_by_a_foreign_key_under_our_kid_is_rejected(
    verifier: Verifier, token: str, foreign_key: rsa.RSAPrivateKey
) -> None:
    assert "Signature verification failed" in rejection(verifier, resigned(token, foreign_key))


# The JWKS client: caching


def test_key_set_is_fetched_once_within_its_max_age(
    verifier: Verifier, recorder: Recorder, clock: Clock, token: str
) -> None:
    for _ in range(5):
        verifier.verify_access_token(token)
        clock.advance(59)  # 295 s in all, within the JWKS max-age of 300 s

    assert recorder.jwks_fetches == 1


def test_stale_key_set_is_revalidated_with_its_etag(
    verifier: Verifier, recorder: Recorder, clock: Clock, token: str
) -> None:
    verifier.verify_access_token(token)
    clock.advance(301)

    verifier.verify_access_token(token)

    (_, first_headers), (_, second_headers) = recorder.requests[1:]
    assert "If-None-Match" not in first_headers
    assert second_headers["If-None-Match"] == recorder.client.get(JWKS_URI).headers["etag"]
    assert recorder.statuses[1:3] == [200, 304]


def test_key_set_kept_after_a_304_is_fresh_for_another_max_age(
    verifier: Verifier, recorder: Recorder, clock: Clock, token: str
) -> None:
    verifier.verify_access_token(token)
    clock.advance(301)
    verifier.verify_access_token(token)  # 304
    clock.advance(299)

    verifier.verify_access_token(token)

    assert recorder.jwks_fetches == 2


def test_cached_keys_serve_while_the_issuer_is_down(
    verifier: Verifier, recorder: Recorder, clock: Clock, token: str
) -> None:
    verifier.verify_access_token(token)
    recorder.is_down = True
    clock.advance(301)

    claims = verifier.verify_access_token(token)
    verifier.verify_access_token(token)  # within a second of the failure: no new try

    assert claims["iss"] == ISSUER
    assert recorder.jwks_fetches == 2


@pytest.mark.parametrize(
    ("cache_control", "seconds"),
    [("public, max-age=300", 300), ("max-age=60, public", 60), ('max-age="5"', 5), ("no-cache", 1),
     ("max-age=0", 1), ("public", 300), ("", 300), ("max-age=99999999", 86_400), ("s-maxage=10", 300)],
)  # fmt: skip
def test_max_age_of_cache_control(cache_control: str, seconds: float) -> None:
    assert max_age_of({"cache-control": cache_control} if cache_control else {}) == seconds


def test_a_header_nested_too_deep_to_parse_is_a_malformed_token(verifier: Verifier, recorder: Recorder) -> None:
    assert rejection(verifier, NESTED_HEADER_TOKEN) == "malformed token"
    assert recorder.jwks_fetches == 0


def test_key_set_members_that_cannot_verify_rs256_are_skipped(foreign_key: rsa.RSAPrivateKey) -> None:
    good = public_jwk(foreign_key.public_key())
    small = public_jwk(rsa.generate_private_key(65537, 1024).public_key())  # noqa: S505 (to be skipped)
    members = [good, small, {**good, "kid": "enc", "use": "enc"}, {**good, "kid": "ps", "alg": "PS256"},
               {"kty": "EC", "kid": "ec", "crv": "P-256"}, {**good, "kid": None},
               {**good, "kid": "bad", "n": "!"}]  # fmt: skip

    assert list(public_keys_of({"keys": members})) == [good["kid"]]


# The JWKS client: unknown kids


def test_unknown_kid_refetches_the_key_set(
    verifier: Verifier, recorder: Recorder, token: str, foreign_key: rsa.RSAPrivateKey
) -> None:
    verifier.verify_access_token(token)

    rejection(verifier, resigned(token, foreign_key, {"kid": secrets.token_urlsafe(8)}))

    assert recorder.jwks_fetches == 2


def test_unknown_kids_refetch_at_most_once_per_interval(
    verifier: Verifier, recorder: Recorder, clock: Clock, token: str, foreign_key: rsa.RSAPrivateKey
) -> None:
    verifier.verify_access_token(token)
    unknown = [resigned(token, foreign_key, {"kid": secrets.token_urlsafe(8)}) for _ in range(4)]

    fetches = []
    for forged in unknown:
        rejection(verifier, forged)
        fetches.append(recorder.jwks_fetches)
        clock.advance(verifier.jwks.refetch_interval / 2)

    assert fetches == [2, 2, 3, 3]
    assert verifier.verify_access_token(token)["iss"] == ISSUER


def test_concurrent_first_uses_fetch_once(verifier: Verifier, recorder: Recorder, token: str) -> None:
    barrier = threading.Barrier(8)
    subjects: list[str] = []

    def verify() -> None:
        barrier.wait()
        subjects.append(verifier.verify_access_token(token)["sub"])

    threads = [threading.Thread(target=verify) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(subjects) == 8
    assert recorder.jwks_fetches == 1


# Async


def test_async_verification_fetches_off_the_event_loop(verifier: Verifier, recorder: Recorder, token: str) -> None:
    async def verify_twice() -> tuple[int, str]:
        await verifier.verify_access_token_async(token)
        claims = await verifier.verify_access_token_async(token)
        return threading.get_ident(), claims["iss"]

    loop_thread, issuer = asyncio.run(verify_twice())

    assert issuer == ISSUER
    assert recorder.jwks_fetches == 1
    assert loop_thread not in recorder.threads


def test_async_verification_raises_the_same_error(verifier: Verifier, clock: Clock, token: str) -> None:
    clock.advance(3600)

    with pytest.raises(InvalidTokenError, match="expired"):
        asyncio.run(verifier.verify_access_token_async(token))


def test_async_key_lookup_fetches_off_the_event_loop(verifier: Verifier, recorder: Recorder, token: str) -> None:
    kid = str(jwt.get_unverified_header(token)["kid"])

    key = asyncio.run(verifier.jwks.get_key_async(kid))

    assert isinstance(key, rsa.RSAPublicKey)
    assert threading.get_ident() not in recorder.threads


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/jwks.json", "data:,{}"])
def test_only_http_urls_are_fetched(url: str) -> None:
    with pytest.raises(OSError, match="not an http"):
        fetch_url(url, {}, 1.0)

"""Named attacks on our own access-token verification, at GET /userinfo.

Every rejected token differs from a token that `test_forged_token_with_our_key_is_accepted` shows
is accepted in the one way the test names, so each 401 is for the reason the test claims.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import RSAAlgorithm
from starlette.testclient import TestClient

from jwtauth.config import Settings
from jwtauth.errors import InvalidTokenError
from jwtauth.web import parse_bearer

from .conftest import NESTED_HEADER_TOKEN, Account, add_user, kid_in_state, login, private_key, table_counts

ATTACKER = "https://attacker.example"
RS256 = RSAAlgorithm(RSAAlgorithm.SHA256)
Forge = Callable[..., str]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def assert_rejected(client: TestClient, settings: Settings, authorization: str | None) -> None:
    """GET /userinfo with this Authorization header gets 401 invalid_token and writes nothing."""
    before = table_counts(settings.database)
    headers = {} if authorization is None else {"Authorization": authorization}

    response = client.get("/userinfo", headers=headers)

    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert response.json()["error"] == "invalid_token"
    assert table_counts(settings.database) == before


@dataclass(frozen=True)
class OurKey:
    kid: str
    private_key: rsa.RSAPrivateKey


@dataclass(frozen=True)
class Session:
    access_token: str
    refresh_token: str
    sid: str


@pytest.fixture
def our_key(env: dict[str, str]) -> OurKey:
    """The current signing key, read from where the installation keeps it, as an insider (or a thief) would."""
    kid = kid_in_state(env, "current")
    return OurKey(kid, private_key(env, kid))


@pytest.fixture(scope="module")
def foreign_key() -> rsa.RSAPrivateKey:
    """An attacker's own RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def session(client: TestClient, alice: Account) -> Session:
    """Alice's real session: a login through the API."""
    pair = login(client, alice.email, alice.password)
    access_token, refresh_token = str(pair["access_token"]), str(pair["refresh_token"])
    return Session(access_token, refresh_token, str(unverified_claims(access_token)["sid"]))


@pytest.fixture
def valid_claims(settings: Settings, alice: Account, session: Session) -> dict[str, Any]:
    """Claims as our server issues them, for alice's real session."""
    now = int(time.time())
    return {
        "iss": settings.issuer,
        "sub": alice.id,
        "aud": settings.audience,
        "exp": now + 900,
        "iat": now,
        "nbf": now,
        "jti": secrets.token_urlsafe(16),
        "client_id": "jwtauth",
        "sid": session.sid,
        "email": alice.email,
    }


def sign_rs256(header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    """Assemble a JWS by hand (PyJWT's encode refuses some of the malformed claims we send)."""
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
    return f"{signing_input}.{b64url(RS256.sign(signing_input.encode(), key))}"


@pytest.fixture
def forge(our_key: OurKey, valid_claims: dict[str, Any]) -> Forge:
    """Sign valid_claims with RS256, changed by `changes` and `headers` (a None value removes the member).

    The key is our current key unless another is given.
    """

    def sign(
        changes: dict[str, Any] | None = None,
        *,
        key: rsa.RSAPrivateKey | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        claims = {**valid_claims, **(changes or {})}
        header = {"alg": "RS256", "typ": "at+jwt", "kid": our_key.kid, **(headers or {})}
        return sign_rs256(
            {name: value for name, value in header.items() if value is not None},
            {name: value for name, value in claims.items() if value is not None},
            key or our_key.private_key,
        )

    return sign


def hand_made(header: dict[str, Any], claims: dict[str, Any], signature: bytes) -> str:
    return f"{b64url_json(header)}.{b64url_json(claims)}.{b64url(signature)}"


def jwks_public_key(client: TestClient, kid: str) -> rsa.RSAPublicKey:
    """Our public key as an attacker gets it: from the JWKS."""
    jwk = next(key for key in client.get("/.well-known/jwks.json").json()["keys"] if key["kid"] == kid)
    public_key = jwt.PyJWK(jwk).key
    assert isinstance(public_key, rsa.RSAPublicKey)
    return public_key


# Positive controls: tokens that differ from the attacks below only in the attack


def test_forged_token_with_our_key_is_accepted(client: TestClient, alice: Account, forge: Forge) -> None:
    response = client.get("/userinfo", headers={"Authorization": f"Bearer {forge()}"})

    assert response.status_code == 200, response.text
    assert response.json()["sub"] == alice.id


def test_token_expired_within_the_leeway_is_accepted(client: TestClient, forge: Forge) -> None:
    now = int(time.time())
    token = forge({"exp": now - 10, "iat": now - 910, "nbf": now - 910})

    assert client.get("/userinfo", headers={"Authorization": f"Bearer {token}"}).status_code == 200


# Algorithm and header attacks


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_unsigned_token_is_rejected(
    client: TestClient, settings: Settings, our_key: OurKey, valid_claims: dict[str, Any], alg: str
) -> None:
    token = hand_made({"alg": alg, "typ": "at+jwt", "kid": our_key.kid}, valid_claims, b"")

    assert_rejected(client, settings, f"Bearer {token}")


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", "id_token+jwt", "", None, 1])
def test_token_of_another_type_is_rejected(client: TestClient, settings: Settings, forge: Forge, typ: object) -> None:
    token = forge(headers={"typ": typ})
    assert jwt.get_unverified_header(token).get("typ") == typ

    assert_rejected(client, settings, f"Bearer {token}")


@pytest.mark.parametrize(
    "public_format",
    [serialization.PublicFormat.SubjectPublicKeyInfo, serialization.PublicFormat.PKCS1],
    ids=["spki", "pkcs1"],
)
def test_hs256_with_our_public_key_as_secret_is_rejected(
    client: TestClient,
    settings: Settings,
    our_key: OurKey,
    valid_claims: dict[str, Any],
    public_format: serialization.PublicFormat,
) -> None:
    # Algorithm confusion (RFC 8725 §2.1): a verifier that lets the token pick HS256 would use the
    # public PEM as the HMAC secret. PyJWT refuses PEM secrets, so the token is built by hand.
    secret = jwks_public_key(client, our_key.kid).public_bytes(serialization.Encoding.PEM, public_format)
    header = {"alg": "HS256", "typ": "at+jwt", "kid": our_key.kid}
    signing_input = f"{b64url_json(header)}.{b64url_json(valid_claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()

    assert_rejected(client, settings, f"Bearer {signing_input}.{b64url(signature)}")


def test_token_signed_by_a_foreign_key_with_our_kid_is_rejected(
    client: TestClient, settings: Settings, forge: Forge, foreign_key: rsa.RSAPrivateKey
) -> None:
    assert_rejected(client, settings, f"Bearer {forge(key=foreign_key)}")


@pytest.mark.parametrize("kid", ["absent", "random", "ours"])
@pytest.mark.parametrize("key_header", ["jku", "x5u", "jwk"])
def test_key_pointed_at_by_the_token_is_ignored(
    client: TestClient,
    settings: Settings,
    forge: Forge,
    our_key: OurKey,
    foreign_key: rsa.RSAPrivateKey,
    key_header: str,
    kid: str,
) -> None:
    foreign_jwk = RSAAlgorithm.to_jwk(foreign_key.public_key(), as_dict=True)
    pointers = {"jku": f"{ATTACKER}/jwks.json", "x5u": f"{ATTACKER}/cert.pem", "jwk": foreign_jwk}
    kids = {"absent": None, "random": secrets.token_urlsafe(32), "ours": our_key.kid}
    token = forge(key=foreign_key, headers={key_header: pointers[key_header], "kid": kids[kid]})
    assert jwt.get_unverified_header(token).get("kid") == kids[kid]

    assert_rejected(client, settings, f"Bearer {token}")


@pytest.mark.parametrize("kid", ["../../etc/passwd", "../../../../../../dev/null", "' or 1=1 --", "x' or '1'='1"])
def test_kid_injection_is_rejected(
    client: TestClient, settings: Settings, forge: Forge, foreign_key: rsa.RSAPrivateKey, kid: str
) -> None:
    assert_rejected(client, settings, f"Bearer {forge(key=foreign_key, headers={'kid': kid})}")


def test_kid_of_an_empty_file_with_an_empty_hmac_secret_is_rejected(
    client: TestClient, settings: Settings, valid_claims: dict[str, Any]
) -> None:
    # The classic kid attack: point kid at /dev/null, whose content (nothing) is the HMAC secret.
    header = {"alg": "HS256", "typ": "at+jwt", "kid": "../../../../../../dev/null"}
    signing_input = f"{b64url_json(header)}.{b64url_json(valid_claims)}"
    signature = hmac.new(b"", signing_input.encode(), hashlib.sha256).digest()

    assert_rejected(client, settings, f"Bearer {signing_input}.{b64url(signature)}")


# Tampering


def test_payload_with_another_users_sub_and_sid_is_rejected(
    client: TestClient, settings: Settings, alice: Account, session: Session
) -> None:
    # Bob turns his own real token into alice's: accepted if the signature were not checked.
    bob = add_user(settings, "bob@example.com")
    bob_token = str(login(client, bob.email, bob.password)["access_token"])
    header, _, signature = bob_token.split(".")
    claims = {**unverified_claims(bob_token), "sub": alice.id, "sid": session.sid}

    assert_rejected(client, settings, f"Bearer {header}.{b64url_json(claims)}.{signature}")


def test_payload_with_later_exp_is_rejected(client: TestClient, settings: Settings, session: Session) -> None:
    header, _, signature = session.access_token.split(".")
    claims = unverified_claims(session.access_token)
    claims["exp"] += 365 * 86_400

    assert_rejected(client, settings, f"Bearer {header}.{b64url_json(claims)}.{signature}")


@pytest.mark.parametrize("tamper", ["first byte", "last byte", "truncated", "empty", "doubled"])
def test_tampered_signature_is_rejected(client: TestClient, settings: Settings, session: Session, tamper: str) -> None:
    header, payload, encoded = session.access_token.split(".")
    signature = bytearray(b64url_decode(encoded))
    # Flip bits of the decoded bytes: changing the last base64url character may touch only padding bits.
    if tamper == "first byte":
        signature[0] ^= 0x01
    elif tamper == "last byte":
        signature[-1] ^= 0x80
    elif tamper == "truncated":
        signature = signature[:-1]
    elif tamper == "empty":
        signature = bytearray()
    else:
        signature = signature + signature
    token = f"{header}.{payload}.{b64url(bytes(signature))}"
    assert token != session.access_token

    assert_rejected(client, settings, f"Bearer {token}")


# Time and claims


def test_expired_token_is_rejected(client: TestClient, settings: Settings, forge: Forge) -> None:
    now = int(time.time())
    beyond_leeway = settings.leeway + 60
    token = forge({"exp": now - beyond_leeway, "iat": now - 900 - beyond_leeway, "nbf": now - 900 - beyond_leeway})

    assert_rejected(client, settings, f"Bearer {token}")


def test_token_not_yet_valid_is_rejected(client: TestClient, settings: Settings, forge: Forge) -> None:
    token = forge({"nbf": int(time.time()) + settings.leeway + 60})

    assert_rejected(client, settings, f"Bearer {token}")


@pytest.mark.parametrize("iss", [ATTACKER, "https://auth.test/", "https://AUTH.test", "", ["https://auth.test"]])
def test_wrong_issuer_is_rejected(client: TestClient, settings: Settings, forge: Forge, iss: object) -> None:
    assert settings.issuer == "https://auth.test"

    assert_rejected(client, settings, f"Bearer {forge({'iss': iss})}")


@pytest.mark.parametrize(
    "aud",
    ["another-service", "JWTAUTH", "", ["another-service"], [], 1],
    ids=["other", "upper-case", "empty", "list-of-other", "empty-list", "number"],
)
def test_wrong_audience_is_rejected(client: TestClient, settings: Settings, forge: Forge, aud: object) -> None:
    assert settings.audience == "jwtauth"

    assert_rejected(client, settings, f"Bearer {forge({'aud': aud})}")


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "sid"])
def test_token_missing_a_required_claim_is_rejected(
    client: TestClient, settings: Settings, forge: Forge, valid_claims: dict[str, Any], claim: str
) -> None:
    token = forge({claim: None})
    assert claim not in unverified_claims(token) and claim in valid_claims

    assert_rejected(client, settings, f"Bearer {token}")


@pytest.mark.parametrize("claim", ["sub", "sid"])
def test_claim_of_the_wrong_type_is_rejected(
    client: TestClient, settings: Settings, forge: Forge, valid_claims: dict[str, Any], claim: str
) -> None:
    assert_rejected(client, settings, f"Bearer {forge({claim: [valid_claims[claim]]})}")


def test_sid_of_another_users_session_is_rejected(client: TestClient, settings: Settings, forge: Forge) -> None:
    bob = add_user(settings, "bob@example.com")
    bob_sid = unverified_claims(str(login(client, bob.email, bob.password)["access_token"]))["sid"]

    assert_rejected(client, settings, f"Bearer {forge({'sid': bob_sid})}")


# Token confusion and the Authorization header


def test_refresh_token_as_bearer_is_rejected(client: TestClient, settings: Settings, session: Session) -> None:
    assert_rejected(client, settings, f"Bearer {session.refresh_token}")


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic abc",
        "Bearer a b",
        "Basic {token}",
        "Token {token}",
        "{token}",
        "Bearer{token}",
        "Bearer {token} {token}",
        "Bearer {token},",
        'Bearer "{token}"',
        f"Bearer {NESTED_HEADER_TOKEN}",
    ],
)
def test_malformed_authorization_header_is_rejected(
    client: TestClient, settings: Settings, session: Session, authorization: str | None
) -> None:
    header = None if authorization is None else authorization.replace("{token}", session.access_token)

    assert_rejected(client, settings, header)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(client: TestClient, session: Session, scheme: str) -> None:
    # RFC 9110 §11.1: the auth-scheme is case-insensitive, so a lower-case `bearer` must work.
    response = client.get("/userinfo", headers={"Authorization": f"{scheme} {session.access_token}"})

    assert response.status_code == 200, response.text


# parse_bearer, a pure function


@given(st.text() | st.text().map("Bearer ".__add__))
def test_parse_bearer_returns_a_token_or_raises_invalid_token(authorization: str) -> None:
    try:
        token = parse_bearer(authorization)
    except InvalidTokenError:
        return
    assert isinstance(token, str)
    assert token and token in authorization
    assert not any(character.isspace() for character in token)


@given(st.from_regex(r"[A-Za-z0-9\-._~+/]+=*", fullmatch=True))
def test_parse_bearer_returns_any_b64token_unchanged(token: str) -> None:
    assert parse_bearer(f"Bearer {token}") == token

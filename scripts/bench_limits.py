"""The limits the endpoints are compared with: the cryptography alone, measured in a process of its own.

Run as `python scripts/bench_limits.py KIND --seconds S [--argon2 T,M,P]`, it prints `{"ops_per_s": x}`.
`measure_limit` runs one such process per core, each pinned to its core, and adds up their rates.

Kinds:
- `rs256-sign`: PyJWT encode with a preloaded key, claims and header the size of ours;
- `rs256-verify`: PyJWT decode of such a token with a preloaded public key and our checks;
- `argon2-verify`: argon2-cffi verification of a correct password at the given parameters;
- `verify-access-token`: jwtauth.tokens.verify_access_token of the same token;
- `jwtauth-verify`: jwtauth.verify.Verifier (for resource servers), its key set served from memory.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import argon2
import jwt
from bench_server import DEFAULT_ARGON2, PASSWORD
from cryptography.hazmat.primitives.asymmetric import rsa

from jwtauth.keys import public_jwk
from jwtauth.tokens import REQUIRED_CLAIMS, verify_access_token
from jwtauth.verify import Fetched, JWKSClient, Verifier

KINDS = ("rs256-sign", "rs256-verify", "argon2-verify", "verify-access-token", "jwtauth-verify")
ISSUER = "http://127.0.0.1:18000"  # as long as the issuer the bench server runs with
AUDIENCE = "jwtauth"


@dataclass(frozen=True, slots=True)
class Signer:
    """A preloaded key pair, its kid, and one token signed the way jwtauth signs access tokens."""

    private_key: rsa.RSAPrivateKey
    kid: str
    claims: dict[str, object]
    token: str


def make_signer(key_size: int = 2048) -> Signer:
    """Return a new key and a token with the claims of a jwtauth access token (same names and sizes)."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    kid = public_jwk(private_key.public_key())["kid"]
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "sub": str(uuid.uuid4()),
        "aud": AUDIENCE,
        "exp": now + 900,
        "iat": now,
        "nbf": now,
        "jti": secrets.token_urlsafe(16),
        "client_id": "jwtauth",
        "sid": str(uuid.uuid4()),
        "email": "cheap-0000@bench.example.com",
    }
    return Signer(private_key, kid, claims, sign(private_key, kid, claims))


def sign(private_key: rsa.RSAPrivateKey, kid: str, claims: dict[str, object]) -> str:
    return jwt.encode(claims, private_key, algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"})


def rs256_sign(signer: Signer) -> Callable[[], object]:
    return lambda: sign(signer.private_key, signer.kid, signer.claims)


def rs256_verify(signer: Signer) -> Callable[[], object]:
    public_key = signer.private_key.public_key()
    return lambda: jwt.decode(
        signer.token,
        public_key,
        algorithms=["RS256"],
        issuer=ISSUER,
        audience=AUDIENCE,
        options={"require": REQUIRED_CLAIMS},
    )


def jwtauth_verify_access_token(signer: Signer) -> Callable[[], object]:
    keys = {signer.kid: signer.private_key.public_key()}
    return lambda: verify_access_token(
        signer.token, keys.get, issuer=ISSUER, audience=AUDIENCE, leeway=30, now=time.time()
    )


def jwtauth_verify(signer: Signer) -> Callable[[], object]:
    """jwtauth.verify's Verifier, whose JWKS client gets the key set from memory: no HTTP is timed."""
    body = json.dumps({"keys": [public_jwk(signer.private_key.public_key())]}).encode()
    fetched = Fetched(200, {"cache-control": "max-age=86400"}, body)
    client = JWKSClient(jwks_uri=f"{ISSUER}/.well-known/jwks.json", fetch=lambda *_: fetched)
    verifier = Verifier(ISSUER, AUDIENCE, jwks=client)
    return lambda: verifier.verify_access_token(signer.token)


def argon2_verify(parameters: argon2.Parameters) -> Callable[[], object]:
    hasher = argon2.PasswordHasher.from_parameters(parameters)
    stored = hasher.hash(PASSWORD)
    return lambda: hasher.verify(stored, PASSWORD)


def operations_per_second(operation: Callable[[], object], seconds: float) -> float:
    """Run operation (after one untimed call) until `seconds` have passed; return calls per second."""
    operation()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        operation()
        count += 1
    return count / elapsed


def parse_argon2(text: str) -> argon2.Parameters:
    """`T,M,P` (time cost, memory in KiB, parallelism) over argon2-cffi's default profile."""
    time_cost, memory_kib, parallelism = (int(part) for part in text.split(","))
    default = argon2.profiles.get_default_parameters()
    return argon2.Parameters(
        type=default.type,
        version=default.version,
        salt_len=default.salt_len,
        hash_len=default.hash_len,
        time_cost=time_cost,
        memory_cost=memory_kib,
        parallelism=parallelism,
    )


def operation_of(kind: str, argon2_text: str) -> Callable[[], object]:
    if kind == "argon2-verify":
        return argon2_verify(parse_argon2(argon2_text))
    signer = make_signer()
    makers = {
        "rs256-sign": rs256_sign,
        "rs256-verify": rs256_verify,
        "verify-access-token": jwtauth_verify_access_token,
        "jwtauth-verify": jwtauth_verify,
    }
    return makers[kind](signer)


def measure_limit(kind: str, cpus: Sequence[int], seconds: float, argon2_text: str = DEFAULT_ARGON2) -> float:
    """Run KIND in one process per CPU, each pinned to its CPU, at once; return the summed rate."""
    command = [sys.executable, __file__, kind, "--seconds", str(seconds), "--argon2", argon2_text]
    processes = [
        subprocess.Popen(["taskset", "-c", str(cpu), *command], stdout=subprocess.PIPE, text=True) for cpu in cpus
    ]
    total = 0.0
    for process in processes:
        stdout, _ = process.communicate(timeout=seconds + 60)
        if process.returncode != 0:
            raise RuntimeError(f"bench_limits {kind} failed with exit code {process.returncode}")
        total += float(json.loads(stdout)["ops_per_s"])
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--argon2", default=DEFAULT_ARGON2, help="time cost, memory KiB, parallelism")
    args = parser.parse_args(argv)
    rate = operations_per_second(operation_of(args.kind, args.argon2), args.seconds)
    print(json.dumps({"kind": args.kind, "ops_per_s": rate}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

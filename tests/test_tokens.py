"""Access-token signatures on the event loop, in rounds (tokens.SigningRounds)."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from jwtauth.tokens import AccessClaims, SigningRounds, sign_access_token


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims_of(number: int) -> AccessClaims:
    return AccessClaims(
        iss="https://auth.test", sub=f"user-{number}", aud="jwtauth", exp=2_000_000_000, iat=1_000_000_000,
        nbf=1_000_000_000, jti=f"jti-{number}", client_id="jwtauth", sid=f"sid-{number}", email=f"{number}@a.test",
    )  # fmt: skip


def signing(claims: AccessClaims, private_key: rsa.RSAPrivateKey) -> Callable[[], str]:
    return functools.partial(sign_access_token, claims, "kid-1", private_key)


def decoded(token: str, private_key: rsa.RSAPrivateKey) -> dict[str, object]:
    header = jwt.get_unverified_header(token)
    assert (header["kid"], header["typ"]) == ("kid-1", "at+jwt")
    claims: dict[str, object] = jwt.decode(token, private_key.public_key(), ["RS256"], audience="jwtauth")
    return claims


def test_tokens_asked_for_at_once_are_each_signed_with_their_own_claims(private_key: rsa.RSAPrivateKey) -> None:
    rounds = SigningRounds()

    async def ask_all() -> list[str]:
        return await asyncio.gather(*(rounds.sign(signing(claims_of(n), private_key)) for n in range(8)))

    tokens = asyncio.run(ask_all())

    assert [decoded(token, private_key) for token in tokens] == [dict(claims_of(n)) for n in range(8)]


def test_a_request_cancelled_while_it_waits_leaves_the_others_signed(private_key: rsa.RSAPrivateKey) -> None:
    rounds = SigningRounds()

    async def ask_and_cancel_one() -> tuple[bool, list[str]]:
        tasks = [asyncio.create_task(rounds.sign(signing(claims_of(n), private_key))) for n in range(3)]
        await asyncio.sleep(0)  # every task now waits for the round
        tasks[1].cancel()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        return isinstance(done[1], asyncio.CancelledError), [done[0], done[2]]  # type: ignore[list-item]

    cancelled, tokens = asyncio.run(ask_and_cancel_one())

    assert cancelled
    assert [decoded(token, private_key)["sub"] for token in tokens] == ["user-0", "user-2"]


def test_rounds_of_several_event_loops_stay_apart(private_key: rsa.RSAPrivateKey) -> None:
    """Each loop signs for its own callers: two loops in two threads (as TestClients run them) that both have
    callers waiting at once each get their own tokens."""
    rounds, both_waiting = SigningRounds(), threading.Barrier(2, timeout=10)
    signed: dict[int, list[str]] = {}

    async def ask(first: int) -> list[str]:
        tasks = [asyncio.create_task(rounds.sign(signing(claims_of(n), private_key))) for n in range(first, first + 4)]
        # runs after the four have asked and before their round: the other loop's callers are waiting too
        asyncio.get_running_loop().call_soon(both_waiting.wait)
        return await asyncio.gather(*tasks)

    threads = [
        threading.Thread(target=lambda f=first: signed.update({f: asyncio.run(ask(f))}), daemon=True)
        for first in (0, 100)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert {first: [decoded(token, private_key)["sub"] for token in tokens] for first, tokens in signed.items()} == {
        0: [f"user-{n}" for n in range(4)],
        100: [f"user-{n}" for n in range(100, 104)],
    }

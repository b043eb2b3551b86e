"""The rotation rule (jwtauth.sessions.decide_rotation) on its own: a pure function, so Hypothesis can drive
it through any sequence of refreshes, replays and pauses that clients and thieves could make."""

from __future__ import annotations

import dataclasses
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from jwtauth.sessions import (
    FRESH_BYTES,
    MAX_SPENT_TOKENS,
    Decision,
    RotationPolicy,
    SessionState,
    User,
    decide_rotation,
)
from jwtauth.tokens import PresentedToken, RefreshTokens, hash_refresh_token

TOKENS = RefreshTokens(b"k" * 32)
POLICY = RotationPolicy(reuse_interval=10.0, refresh_ttl=1000)
ALICE = User("u1", "alice@example.com", "", "hash", False, 0, 0)


def new_session(now: float) -> tuple[SessionState, str]:
    token = TOKENS.mint("F" * 22, 0, os.urandom(32))
    return SessionState("s1", "F" * 22, ALICE, now, 0, hash_refresh_token(token), now + POLICY.refresh_ttl), token


def present(state: SessionState, token: str, now: float) -> Decision:
    presented = TOKENS.read(token)
    assert presented is not None
    return decide_rotation(state, presented, now, POLICY, TOKENS, os.urandom(FRESH_BYTES))


# Each step: a pause, then which issued token is presented (counted back from the newest).
steps = st.lists(st.tuples(st.floats(0, 15, allow_nan=False), st.integers(0, 12)), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_a_spent_token_is_answered_with_the_live_one_within_the_interval_and_revokes_after(
    plan: list[tuple[float, int]],
) -> None:
    now = 1000.0
    state, token = new_session(now)
    issued, spent_at = [token], [float("inf")]  # spent_at[i]: when issued[i] was rotated
    for pause, back in plan:
        now += pause
        index = max(0, len(issued) - 1 - back)
        decision = present(state, issued[index], now)
        rotations_ago = len(issued) - 1 - index
        if index == len(issued) - 1:  # the live token
            assert decision.outcome == "rotated"
            assert decision.refresh_token is not None and decision.state is not None
            spent_at[index] = now
            issued.append(decision.refresh_token)
            spent_at.append(float("inf"))
        elif now - spent_at[index] < POLICY.reuse_interval and rotations_ago <= MAX_SPENT_TOKENS:
            assert (decision.outcome, decision.refresh_token) == ("replayed", issued[-1])
            assert decision.state == state  # nothing to save: the session never forks
        else:
            assert decision.outcome == "reuse_detected"
            assert decision.state is not None and decision.state.is_revoked
            later = present(decision.state, issued[-1], now)
            assert (later.outcome, later.reason) == ("invalid", "revoked")
            return
        state = decision.state
        assert len(state.spent) <= MAX_SPENT_TOKENS


@given(st.text(max_size=200))
def test_only_tokens_this_server_minted_are_read(text: str) -> None:
    presented = TOKENS.read(text)

    assert presented is None or presented.generation is None  # the format from before generations


@given(st.binary(min_size=32, max_size=32), st.integers(0, 10**6), st.integers(0, 200), st.characters())
def test_a_changed_character_is_never_read_as_ours(secret: bytes, generation: int, where: int, new: str) -> None:
    token = TOKENS.mint("F" * 22, generation, secret)
    changed = token[: where % len(token)] + new + token[where % len(token) + 1 :]

    read = TOKENS.read(changed)

    assert read is None or read.text == token.strip(" \t\r\n") or changed.strip(" \t\r\n") == token


def test_a_token_is_read_back_with_its_parts() -> None:
    token = TOKENS.mint("F" * 22, 7, b"s" * 32)

    assert TOKENS.read(f" {token}\r\n") == PresentedToken(token, "F" * 22, 7)
    assert RefreshTokens(b"other secret").read(token) is None


def test_the_token_format_and_its_seal_stay_what_earlier_releases_wrote() -> None:
    """Tokens already issued, and successors already sealed, must still be read and opened: the MAC and the
    sealing key of a given secret never change."""
    tokens = RefreshTokens(b"k" * 32)
    token = tokens.mint("A" * 22, 7, bytes(range(32)))
    sealed = bytes.fromhex(
        "000000000000000000000000847b44414714640eb42bbeead5af7b882d2740b126e4959f"
        "8c40a7e21454c76ff9bed2684ab7cfda3d0e9b09529b3271"
    )

    assert token == "AAAAAAAAAAAAAAAAAAAAAA.7.AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8.YfDZcqOccexXUfLIvXUDFQ"
    assert tokens.seal(token, bytes(32), bytes(12)) == sealed
    assert tokens.open(token, sealed) == bytes(32)


def test_a_sealed_successor_opens_only_with_its_parent() -> None:
    sealed = TOKENS.seal("parent", b"the successor's secret", b"n" * 12)

    assert TOKENS.open("parent", sealed) == b"the successor's secret"
    assert TOKENS.open("another parent", sealed) is None
    assert RefreshTokens(b"other secret").open("parent", sealed) is None


def test_an_expired_revoked_or_disabled_session_refuses_even_its_live_token() -> None:
    state, token = new_session(1000.0)
    for changed, now, reason in (
        (state, 1000.0 + POLICY.refresh_ttl, "expired"),
        (dataclasses.replace(state, revoked_at=1001.0), 1002.0, "revoked"),
        (dataclasses.replace(state, user=dataclasses.replace(ALICE, is_disabled=True)), 1002.0, "disabled"),
    ):
        decision = present(changed, token, now)

        assert (decision.outcome, decision.reason, decision.refresh_token) == ("invalid", reason, None)


def test_with_no_interval_every_reuse_revokes_and_nothing_spent_is_kept() -> None:
    state, token = new_session(1000.0)
    policy = dataclasses.replace(POLICY, reuse_interval=0)
    presented = TOKENS.read(token)
    assert presented is not None

    rotated = decide_rotation(state, presented, 1000.0, policy, TOKENS, os.urandom(FRESH_BYTES))
    assert rotated.state is not None and rotated.state.spent == ()
    replay = decide_rotation(rotated.state, presented, 1000.0, policy, TOKENS, os.urandom(FRESH_BYTES))

    assert replay.outcome == "reuse_detected"

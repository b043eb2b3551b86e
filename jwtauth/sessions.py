"""Sessions and the rotation rule: what presenting a refresh token does, as a pure function of the session's
state and the token. Both storage backends load the state, call `decide_rotation`, and save what it returns
unless another rotation saved first (store.rotate_optimistically), so the rule is written once (RFC 9700
§4.14.2, API.md "Refresh tokens").
"""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass
from typing import Literal

from jwtauth.tokens import NONCE_BYTES, PresentedToken, RefreshTokens, hash_refresh_token

# Spent tokens a session remembers for the reuse interval, newest first: enough for a client's concurrent
# refreshes and lost answers, while a thief rotating fast cannot make a session keep every token it spent.
MAX_SPENT_TOKENS = 5
FRESH_BYTES = 32 + NONCE_BYTES  # a new token's secret, and the nonce that seals it


@dataclass(frozen=True, slots=True)
class User:
    """An account."""

    id: str
    email: str
    name: str
    password_hash: str
    is_disabled: bool
    created_at: float
    updated_at: float
    last_login_key: str | None = None  # the throttle key of the address of the last successful login


@dataclass(frozen=True, slots=True)
class SpentToken:
    """A token of the session that was rotated within the reuse interval: its generation, when it was
    spent, and its successor sealed under a key derived from its own text (RefreshTokens.seal)."""

    generation: int
    spent_at: float
    sealed_successor: bytes


@dataclass(frozen=True, slots=True)
class SessionState:
    """One session (a refresh-token family): its live token, known only by hash, and its recent spent ones."""

    id: str
    family: str
    user: User
    created_at: float
    generation: int  # of the live token: rotations since the login
    token_hash: str  # SHA-256 of the live token
    expires_at: float  # of the live token (sliding: each token lives the full refresh TTL)
    revoked_at: float | None = None
    spent: tuple[SpentToken, ...] = ()  # oldest first, consecutive generations up to generation - 1
    legacy_hash: str | None = None  # SHA-256 of its token from before generations (generation 0), if it had one

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """The settings the rule depends on."""

    reuse_interval: float  # seconds
    refresh_ttl: int  # seconds


Outcome = Literal["rotated", "replayed", "reuse_detected", "invalid"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What presenting a token comes to.

    - `rotated`: the live token was spent; save `state` (its successor is `refresh_token`).
    - `replayed`: a token spent within the reuse interval; `refresh_token` is the session's live one,
      nothing changes.
    - `reuse_detected`: a token spent longer ago than the interval (or dropped from memory); save `state`,
      which is revoked.
    - `invalid`: nothing changes (unknown session, revoked, expired, disabled user, or not a token that
      this session issued); `reason` says which, for logs only.
    """

    outcome: Outcome
    reason: str
    state: SessionState | None = None
    refresh_token: str | None = None

    @property
    def user(self) -> User | None:
        return self.state.user if self.state else None


def decide_rotation(
    state: SessionState | None,
    presented: PresentedToken,
    now: float,
    policy: RotationPolicy,
    tokens: RefreshTokens,
    fresh: bytes,
) -> Decision:
    """Decide what presenting `presented` to the session `state` (None: no session has its family) does at
    `now`. `fresh` is FRESH_BYTES random bytes for a successor; the function has no other input.

    Within the reuse interval a spent token gets the session's live token back, however often and by
    whomever it comes, so concurrent refreshes converge on one token and the session never forks.
    """
    if state is None:
        return Decision("invalid", "unknown_session")
    if state.is_revoked:
        return Decision("invalid", "revoked", state)
    if state.user.is_disabled:
        return Decision("invalid", "disabled", state)
    if state.expires_at <= now:
        return Decision("invalid", "expired", state)
    if presented.generation is None:  # from before generations: this session's generation 0, or nothing
        if hmac.compare_digest(presented.hash, state.token_hash):
            return _rotate(state, presented.text, now, policy, tokens, fresh)
        if state.legacy_hash is None or not hmac.compare_digest(presented.hash, state.legacy_hash):
            return Decision("invalid", "not_issued", state)  # has no MAC: a made-up one is refused here
        presented = dataclasses.replace(presented, generation=0)  # spent: the rule for spent tokens below
    elif presented.generation == state.generation:
        if not hmac.compare_digest(presented.hash, state.token_hash):  # carries our MAC: the MAC key leaked?
            return Decision("invalid", "not_live", state)
        return _rotate(state, presented.text, now, policy, tokens, fresh)
    generation = presented.generation or 0
    if generation > state.generation:  # carries our MAC yet was never issued: the MAC key leaked?
        return Decision("invalid", "future_generation", state)
    spent = next((token for token in state.spent if token.generation == generation), None)
    if spent is None or now - spent.spent_at >= policy.reuse_interval:
        return Decision(
            "reuse_detected", "spent_before_the_interval", dataclasses.replace(state, revoked_at=now, spent=())
        )
    live = _open_chain(state, presented.text, spent.generation, tokens)
    if live is None or not hmac.compare_digest(hash_refresh_token(live), state.token_hash):
        return Decision("invalid", "seal_not_opened", state)  # carries our MAC, yet opens no seal: MAC key leaked?
    return Decision("replayed", "within_interval", state, live)


def was_issued(state: SessionState, presented: PresentedToken) -> bool:
    """Whether `presented` is a token that the session `state` issued, live or spent."""
    if presented.generation is None:
        hashes = (state.token_hash, state.legacy_hash or "")
        return any([hmac.compare_digest(presented.hash, known) for known in hashes])  # both compared, always
    if presented.generation == state.generation:
        return hmac.compare_digest(presented.hash, state.token_hash)
    return presented.generation < state.generation  # its MAC says it is ours


def _rotate(
    state: SessionState, live: str, now: float, policy: RotationPolicy, tokens: RefreshTokens, fresh: bytes
) -> Decision:
    successor = tokens.mint(state.family, state.generation + 1, fresh[:32])
    spent: tuple[SpentToken, ...] = ()  # with no interval every reuse is theft: nothing to remember
    if policy.reuse_interval > 0:
        recent = [token for token in state.spent if now - token.spent_at < policy.reuse_interval]
        sealed = tokens.seal(live, fresh[:32], fresh[32:])
        spent = (*recent[-(MAX_SPENT_TOKENS - 1) :], SpentToken(state.generation, now, sealed))
    rotated = dataclasses.replace(
        state,
        generation=state.generation + 1,
        token_hash=hash_refresh_token(successor),
        expires_at=now + policy.refresh_ttl,
        spent=spent,
    )
    return Decision("rotated", "rotated", rotated, successor)


def _open_chain(state: SessionState, text: str, generation: int, tokens: RefreshTokens) -> str | None:
    """Open the successor of the token `text` (of `generation`), then its successor, up to the live token."""
    by_generation = {token.generation: token.sealed_successor for token in state.spent}
    for step in range(generation, state.generation):
        sealed = by_generation.get(step)
        secret = tokens.open(text, sealed) if sealed is not None else None
        if secret is None:
            return None
        text = tokens.mint(state.family, step + 1, secret)
    return text

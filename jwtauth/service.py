"""What the endpoints and the CLI do: log in, issue token pairs, look up the bearer, manage users."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import secrets
import time
import unicodedata
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from jwtauth.config import CLIENT_ID, Settings
from jwtauth.emails import check_email, normalise_email
from jwtauth.errors import (
    ConflictError,
    EmailTakenError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidTokenError,
    SlowDownError,
    StoreUnavailableError,
    TemporarilyUnavailableError,
)
from jwtauth.keys import KeyStore
from jwtauth.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, PasswordHasher, is_common_password
from jwtauth.sessions import FRESH_BYTES, Decision, RotationPolicy, SessionState, decide_rotation, was_issued
from jwtauth.store import Store, User
from jwtauth.tokens import (
    AccessClaims,
    SigningRounds,
    hash_refresh_token,
    new_family_id,
    new_session_id,
    new_token_id,
    sign_access_token,
    verify_access_token,
)

log = logging.getLogger("jwtauth.audit")
P = ParamSpec("P")
T = TypeVar("T")

MAX_NAME_LENGTH = 200
BAD_CREDENTIALS = "invalid email or password"  # one answer for unknown email, wrong password, disabled user


def audit(event: str, **fields: object) -> None:
    """Log one audit event as `event key=value ...`; the fields go along as `extra` for structured logs.
    Never pass a password or a token."""
    log.info(" ".join([event, *(f"{key}={value}" for key, value in fields.items())]), extra={"event": event, **fields})


class store_errors_answered(AbstractContextManager[None]):
    """Answer a database that cannot answer now with 503 temporarily_unavailable (and Retry-After). A class:
    it is around every request that uses the store, and a generator's context manager costs four times more."""

    __slots__ = ()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, traceback: object) -> None:
        if isinstance(exc, StoreUnavailableError):
            raise TemporarilyUnavailableError("the database is unavailable; try again shortly") from exc


def answers_store_errors(method: Callable[P, T]) -> Callable[P, T]:
    """store_errors_answered, around every call of `method`."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with store_errors_answered():
            return method(*args, **kwargs)

    return wrapper


@dataclass(frozen=True, slots=True)
class TokenPair:
    """An access token and a refresh token, as the token endpoints return them (RFC 6749 §5.1)."""

    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int

    def as_json(self) -> dict[str, str | int]:
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "refresh_expires_in": self.refresh_expires_in,
        }


class AuthService:
    """Login, token issue and user management over one store, one key set and one password hasher."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        keystore: KeyStore,
        hasher: PasswordHasher,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str], None] = lambda event: None,
    ) -> None:
        """Raises:
        KeyStoreError: the keys cannot be loaded or created."""
        self.settings = settings
        self.store = store
        self.keystore = keystore
        self.keyset = keystore.load_or_create(int(clock()))
        self.hasher = hasher
        self.clock = clock
        self.on_event = on_event  # told the name of every audit event, e.g. to count it
        self.policy = RotationPolicy(settings.refresh_reuse_interval, settings.refresh_ttl)
        self.signing = SigningRounds()  # for the access tokens of refreshes, signed on the event loop

    def now(self) -> int:
        return int(self.clock())

    async def run(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call a method that uses the store, for a caller on the event loop (Store.run).

        Raises:
            TemporarilyUnavailableError: the database cannot answer now.
        """
        with store_errors_answered():
            return await self.store.run(functools.partial(work, *args, **kwargs))

    def _audit(self, event: str, **fields: object) -> None:
        audit(event, **fields)
        self.on_event(event)

    @answers_store_errors
    def login(self, email: str, password: str, address: str) -> TokenPair:
        """Check the credentials of a client at `address` and start a session; blocking (one Argon2 verify).

        Raises:
            SlowDownError: too many failures for this email from this address, from this address at all,
                or for this email from anywhere but the address of its last successful login; no password
                is checked.
            InvalidGrantError: unknown email, wrong password or disabled user, all alike.
            TemporarilyUnavailableError: the database cannot answer now.
        """
        email = normalise_email(email)
        user = self.store.find_user_by_email(email)
        # Unknown emails are counted like known ones, so that a 429 tells nothing about who has an account.
        bucket = _address_bucket(address)
        pair_key, address_key = _throttle_key(email, bucket), _throttle_key("", bucket)
        limits = {pair_key: self.settings.login_max_failures, address_key: self.settings.login_max_failures_per_address}
        if user is None or user.last_login_key != address_key:  # failures elsewhere cannot lock the owner out
            limits[_throttle_key(email, "\x01account")] = self.settings.login_max_failures_per_account
        self._take_attempt(limits, "login_throttled", address)
        user = self._check_credentials(user, password)
        # The session starts and the attempt is forgiven in one transaction (Store.start_session).
        pair = self._start_session(
            user, address_key, reset=pair_key, release=[key for key in limits if key != pair_key]
        )
        self._audit("login_succeeded", user=user.id)
        return pair

    @answers_store_errors
    def register(self, email: str, password: str, name: str, address: str) -> User:
        """Create an account (open registration); blocking (one Argon2 hash).

        Every attempt, refused or not, counts against the address's registration quota (as many per login
        window as JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS), so that neither probing which emails are taken
        nor making accounts is unbounded.

        Raises:
            SlowDownError: too many attempts from this address.
            InvalidRequestError: a bad address, or a password too short, too long or too common.
            EmailTakenError: the email is taken.
            TemporarilyUnavailableError: the database cannot answer now.
        """
        limits = {
            _throttle_key("\x01registration", _address_bucket(address)): self.settings.login_max_failures_per_address
        }
        self._take_attempt(limits, "registration_throttled", address)
        user = UserAdmin(self.store, self.hasher, self.clock).add_user(email, password, name)
        self._audit("user_registered", user=user.id)
        return user

    def _take_attempt(self, limits: dict[str, int], throttled_event: str, address: str) -> None:
        retry_after = self.store.take_login_attempt(limits, self.now(), self.settings.login_window)
        if retry_after is not None:
            self._audit(throttled_event, address=address)
            raise SlowDownError(retry_after)

    def _check_credentials(self, user: User | None, password: str) -> User:
        """The user, if the password is theirs and they are not disabled.

        Raises:
            InvalidGrantError: unknown email, wrong password or disabled user, all alike.
        """
        if user is None:
            self.hasher.verify_dummy(password)  # as long as a wrong password takes
            self._audit("login_failed", reason="unknown_email")
            raise InvalidGrantError(BAD_CREDENTIALS)
        if not self.hasher.verify(user.password_hash, password) or user.is_disabled:
            self._audit("login_failed", reason="disabled" if user.is_disabled else "wrong_password", user=user.id)
            raise InvalidGrantError(BAD_CREDENTIALS)
        if self.hasher.needs_rehash(user.password_hash):
            self.store.set_password_hash(user.id, self.hasher.hash(password), self.now())
        return user

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate a refresh token: spend it and return a new pair in the same session (RFC 9700 §4.14.2); a
        token spent within the reuse interval gets the session's live refresh token (sessions.decide_rotation).
        The database's part runs as the store runs it (Store.rotate_async: with PostgreSQL, together with the
        rotations of the other requests ready at the same time); the signature on the event loop, so that a
        worker thread does no more than wait for the database, with those of the other requests ready at the
        same time (tokens.SigningRounds).

        Raises:
            InvalidGrantError: not a token of ours, unknown, expired, revoked or disabled; or reused after the
                reuse interval, which revokes the whole session.
            TemporarilyUnavailableError: the database cannot answer now.
        """
        decision = await self._rotate(refresh_token)
        now = self.clock()
        state, user = decision.state, decision.user
        if decision.refresh_token is None or state is None or user is None:
            event = "refresh_reuse_detected" if decision.outcome == "reuse_detected" else "refresh_failed"
            self._audit(event, user=user.id if user else None, sid=state.id if state else None, reason=decision.reason)
            raise InvalidGrantError("the refresh token is invalid, expired or revoked")
        self._audit("refresh", user=user.id, sid=state.id, outcome=decision.outcome)
        access_token = await self.signing.sign(functools.partial(self._access_token, user, state.id, int(now)))
        return TokenPair(access_token, self.settings.access_ttl, decision.refresh_token, round(state.expires_at - now))

    async def _rotate(self, refresh_token: str) -> Decision:
        tokens = self.keyset.refresh_tokens
        presented = tokens.read(refresh_token)
        if presented is None:  # made up, truncated or malformed: never looked up
            return Decision("invalid", "malformed_or_forged")
        # One from before generations has no MAC: the rule tells a made-up one by its hash, and nothing is saved.
        fresh = secrets.token_bytes(FRESH_BYTES)
        with store_errors_answered():
            return await self.store.rotate_async(  # the time is read at each decision, made again if the
                presented.family,  # session changed meanwhile
                lambda state: decide_rotation(state, presented, self.clock(), self.policy, tokens, fresh),
            )

    @answers_store_errors
    def revoke(self, token: str) -> None:
        """Revoke the session of a refresh token or of a valid access token; anything else is ignored
        (RFC 7009 §2.2: the client cannot act on it).

        Raises:
            TemporarilyUnavailableError: the database cannot answer now.
        """
        session = self._issued_session(token)
        if session is not None:
            session_id = session.id
        else:
            try:
                session_id = self._verify(token)["sid"]
            except InvalidTokenError:
                self._audit("revoke_ignored")
                return
        if self.store.revoke_session(session_id, self.clock()):
            self._audit("revoke", sid=session_id)

    @answers_store_errors
    def logout(self, access_token: str, scope: str) -> None:
        """End the bearer's session (`local`) or every session of its user (`global`).

        Raises:
            InvalidTokenError: the access token is rejected.
            InvalidRequestError: scope is neither local nor global.
            TemporarilyUnavailableError: the database cannot answer now.
        """
        if scope not in ("local", "global"):
            raise InvalidRequestError("scope must be local or global")
        claims, user = self.authenticate(access_token)
        if scope == "local":
            self.store.revoke_session(claims["sid"], self.clock())
        else:
            self.store.revoke_user_sessions(user.id, self.clock())
        self._audit("logout", user=user.id, sid=claims["sid"], scope=scope)

    @answers_store_errors
    def logout_by_refresh_token(self, refresh_token: str, scope: str) -> None:
        """End the session of a refresh token (`local`) or every session of its user (`global`): a browser's
        logout, whose cookie names the session (API.md "Browser apps").

        Raises:
            InvalidRequestError: scope is neither local nor global.
            InvalidTokenError: the token names no live session.
            TemporarilyUnavailableError: the database cannot answer now.
        """
        if scope not in ("local", "global"):
            raise InvalidRequestError("scope must be local or global")
        session = self._issued_session(refresh_token)
        user = self.store.find_session_user(session.id) if session is not None else None
        if session is None or user is None:
            self._audit("logout_refused")
            raise InvalidTokenError("the refresh token names no live session")
        if scope == "local":
            self.store.revoke_session(session.id, self.clock())
        else:
            self.store.revoke_user_sessions(user.id, self.clock())
        self._audit("logout", user=user.id, sid=session.id, scope=scope)

    def _issued_session(self, refresh_token: str) -> SessionState | None:
        """The session that issued this refresh token, live or spent; None for anything else (read only)."""
        presented = self.keyset.refresh_tokens.read(refresh_token)
        session = self.store.find_session(presented.family) if presented is not None else None
        return session if presented is not None and session is not None and was_issued(session, presented) else None

    def maintain_keys(self) -> None:
        """Pick up a key set changed by another process, rotate on schedule, prune; once a second.

        Raises:
            KeyStoreError: the set cannot be read; the one in use stays.
        """
        self.keyset = self.keystore.maintain(self.keyset, self.now())

    def clean_up(self) -> None:
        """Delete sessions that are over: expired, or revoked for longer than an access token lives (so that
        nothing can still refer to them); and login-attempt windows that have passed.

        Raises:
            StoreUnavailableError: the database cannot answer now.
        """
        now = self.clock()
        revoked_before = now - self.settings.access_ttl - self.settings.leeway
        sessions = self.store.delete_expired(now, revoked_before, self.now() - self.settings.login_window)
        if sessions:
            log.debug("deleted %d ended sessions", sessions)

    @answers_store_errors
    def authenticate(self, access_token: str) -> tuple[AccessClaims, User]:
        """Verify a bearer access token and return its claims and user.

        Raises:
            InvalidTokenError: the token fails verification, or its session is revoked or its user disabled.
            TemporarilyUnavailableError: the database cannot answer now.
        """
        claims = self._verify(access_token)
        return claims, self._bearer(claims)

    async def userinfo(self, access_token: str) -> User:
        """The user of a bearer access token: the signature checked on the event loop, the session as the
        store runs it (Store.run).

        Raises:
            InvalidTokenError: the token fails verification, or its session is revoked or its user disabled.
            TemporarilyUnavailableError: the database cannot answer now.
        """
        claims = self._verify(access_token)
        return await self.run(self._bearer, claims)

    def _bearer(self, claims: AccessClaims) -> User:  # its store errors answered by its callers (authenticate, run)
        user = self.store.find_session_user(claims["sid"])
        if user is None or user.id != claims["sub"]:
            raise InvalidTokenError("session revoked or user disabled")
        return user

    def _verify(self, access_token: str) -> AccessClaims:
        return verify_access_token(
            access_token,
            self.keyset.public_key,
            issuer=self.settings.issuer,
            audience=self.settings.audience,
            leeway=self.settings.leeway,
            now=self.clock(),
        )

    def _start_session(self, user: User, address_key: str, reset: str, release: list[str]) -> TokenPair:
        now = self.clock()
        family, ttl = new_family_id(), self.settings.refresh_ttl
        refresh_token = self.keyset.refresh_tokens.mint(family, 0, secrets.token_bytes(32))
        session = SessionState(new_session_id(), family, user, now, 0, hash_refresh_token(refresh_token), now + ttl)
        ended = self.store.start_session(session, self.settings.max_sessions_per_user, address_key, reset, release)
        if ended:
            self._audit("sessions_capped", user=user.id, count=ended)
        return TokenPair(self._access_token(user, session.id, int(now)), self.settings.access_ttl, refresh_token, ttl)

    def _access_token(self, user: User, session_id: str, now: int) -> str:
        claims = AccessClaims(
            iss=self.settings.issuer,
            sub=user.id,
            aud=self.settings.audience,
            exp=now + self.settings.access_ttl,
            iat=now,
            nbf=now,
            jti=new_token_id(),
            client_id=CLIENT_ID,
            sid=session_id,
            email=user.email,
        )
        kid, private_key = self.keyset.signing_key
        return sign_access_token(claims, kid, private_key)


class UserAdmin:
    """User management for the CLI and registration: add, look up, change password, disable."""

    def __init__(self, store: Store, hasher: PasswordHasher, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.hasher = hasher
        self.clock = clock

    def now(self) -> int:
        return int(self.clock())

    def add_user(self, email: str, password: str, name: str = "") -> User:
        """Create a user with a hashed password.

        Raises:
            InvalidRequestError: a bad address or a password too short or too long.
            EmailTakenError: the email is taken.
        """
        email, name = check_email(email), check_name(name)
        check_password(password)
        try:
            user = self.store.add_user(email, name, self.hasher.hash(password), self.now())
        except ConflictError:
            raise EmailTakenError("a user with this email exists") from None
        audit("user_added", user=user.id)
        return user

    def find_user(self, email: str) -> User:
        """Return the user with this email.

        Raises:
            InvalidRequestError: there is none.
        """
        user = self.store.find_user_by_email(normalise_email(email))
        if user is None:
            raise InvalidRequestError(f"no user with email {normalise_email(email)}")
        return user

    def set_password(self, email: str, password: str) -> None:
        """Replace a user's password.

        Raises:
            InvalidRequestError: no such user, or the password is too short or too long.
        """
        user = self.find_user(email)
        check_password(password)
        self.store.set_password_hash(user.id, self.hasher.hash(password), self.now())
        audit("password_changed", user=user.id)
        self.revoke_sessions(email)

    def set_disabled(self, email: str, is_disabled: bool) -> None:
        """Disable or enable a user; a disabled user can neither log in nor use its tokens at /userinfo.

        Raises:
            InvalidRequestError: no such user.
        """
        user = self.find_user(email)
        self.store.set_user_disabled(user.id, is_disabled, self.now())
        audit("user_disabled" if is_disabled else "user_enabled", user=user.id)
        if is_disabled:
            self.revoke_sessions(email)

    def revoke_sessions(self, email: str) -> int:
        """End every session of a user; return how many were live.

        Raises:
            InvalidRequestError: no such user.
        """
        user = self.find_user(email)
        count = self.store.revoke_user_sessions(user.id, self.now())
        audit("sessions_revoked", user=user.id, count=count)
        return count

    def revoke_all_sessions(self) -> int:
        """End every session of every user (after a breach); return how many were live."""
        count = self.store.revoke_all_sessions(self.now())
        audit("sessions_revoked", user="*", count=count)
        return count


def _throttle_key(email: str, bucket: str) -> str:
    """The key under which login attempts are counted: for an email (or none) from an address's bucket."""
    return hashlib.sha256(f"{email}\x00{bucket}".encode()).hexdigest()


def _address_bucket(address: str) -> str:
    """What a client address counts as in throttling: an IPv6 address by its /64 network, which one subscriber
    or host gets whole (RFC 6177, RFC 7421) and may fill with addresses at will; anything else as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ipaddress.ip_network((ip, 64), strict=False)) if ip.version == 6 else address


def check_name(name: str) -> str:
    """Return the trimmed display name.

    Raises:
        InvalidRequestError: it is too long or holds control or formatting characters (terminal escapes,
            bidirectional overrides), which would reach an operator's terminal through `users list`.
    """
    if len(name) > MAX_NAME_LENGTH or has_control_characters(name):
        raise InvalidRequestError(f"name must be at most {MAX_NAME_LENGTH} printable characters")
    return name.strip()


def has_control_characters(text: str) -> bool:
    """Whether text holds a control (Cc) or format (Cf) character, such as ESC, NUL or U+202E."""
    return any(unicodedata.category(character) in ("Cc", "Cf") for character in text)


def check_password(password: str) -> None:
    """Check a new password: its length, its characters, and that it is not one of the most common.

    Raises:
        InvalidRequestError: shorter than 8 or longer than 1024 characters, one of the most common
            passwords or one character repeated, or holding a NUL or lone surrogate.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidRequestError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidRequestError(f"password must be at most {MAX_PASSWORD_LENGTH} characters")
    if is_common_password(password):
        raise InvalidRequestError("this password is one of the most common ones, or one character repeated")
    if any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in password):
        raise InvalidRequestError("password holds characters that are not allowed (NUL, unpaired surrogates)")

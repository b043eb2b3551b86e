"""What the endpoints and the CLI do: log in, issue token pairs, look up the bearer, manage users."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from jwtauth.config import CLIENT_ID, Settings
from jwtauth.errors import InvalidGrantError, InvalidRequestError, InvalidTokenError
from jwtauth.keys import KeySet
from jwtauth.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, PasswordHasher
from jwtauth.store import Store, User
from jwtauth.tokens import (
    AccessClaims,
    hash_refresh_token,
    new_refresh_token,
    new_token_id,
    sign_access_token,
    verify_access_token,
)

audit = logging.getLogger("jwtauth.audit")

MAX_EMAIL_LENGTH = 254  # RFC 5321 §4.5.3.1.3, less the angle brackets
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")
BAD_CREDENTIALS = "invalid email or password"  # one answer for unknown email, wrong password, disabled user


def normalise_email(email: str) -> str:
    """Return the form in which emails are stored and compared: trimmed, lower case."""
    return email.strip().lower()


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
        keyset: KeySet,
        hasher: PasswordHasher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.keyset = keyset
        self.hasher = hasher
        self.clock = clock

    def now(self) -> int:
        return int(self.clock())

    def login(self, email: str, password: str) -> TokenPair:
        """Check the credentials and start a session; blocking (one Argon2 verification).

        Raises:
            InvalidGrantError: unknown email, wrong password or disabled user, all alike.
        """
        user = self.store.find_user_by_email(normalise_email(email))
        if user is None:
            self.hasher.verify_dummy(password)  # as long as a wrong password takes
            audit.info("login failed: unknown email")
            raise InvalidGrantError(BAD_CREDENTIALS)
        if not self.hasher.verify(user.password_hash, password) or user.is_disabled:
            audit.info("login failed: user=%s %s", user.id, "disabled" if user.is_disabled else "wrong password")
            raise InvalidGrantError(BAD_CREDENTIALS)
        if self.hasher.needs_rehash(user.password_hash):
            self.store.set_password_hash(user.id, self.hasher.hash(password), self.now())
        pair = self._start_session(user)
        audit.info("login succeeded: user=%s", user.id)
        return pair

    def authenticate(self, access_token: str) -> tuple[AccessClaims, User]:
        """Verify a bearer access token and return its claims and user.

        Raises:
            InvalidTokenError: the token fails verification, or its session is revoked or its user disabled.
        """
        claims = verify_access_token(
            access_token,
            self.keyset.public_key,
            issuer=self.settings.issuer,
            audience=self.settings.audience,
            leeway=self.settings.leeway,
        )
        user = self.store.find_session_user(claims["sid"])
        if user is None or user.id != claims["sub"]:
            raise InvalidTokenError("session revoked or user disabled")
        return claims, user

    def _start_session(self, user: User) -> TokenPair:
        now = self.now()
        refresh_token = new_refresh_token()
        refresh_ttl = self.settings.refresh_ttl
        session_id = self.store.start_session(user.id, hash_refresh_token(refresh_token), now, now + refresh_ttl)
        return TokenPair(
            self._access_token(user, session_id, now), self.settings.access_ttl, refresh_token, refresh_ttl
        )

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
        key = self.keyset.current
        return sign_access_token(claims, key.kid, key.private_key)


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
            ConflictError: the email is taken.
        """
        email = check_email(email)
        check_password(password)
        return self.store.add_user(email, name.strip(), self.hasher.hash(password), self.now())

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

    def set_disabled(self, email: str, is_disabled: bool) -> None:
        """Disable or enable a user; a disabled user can neither log in nor use its tokens at /userinfo.

        Raises:
            InvalidRequestError: no such user.
        """
        self.store.set_user_disabled(self.find_user(email).id, is_disabled, self.now())


def check_email(email: str) -> str:
    """Return the normalised email.

    Raises:
        InvalidRequestError: it is not an address, or longer than 254 characters.
    """
    email = normalise_email(email)
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL.fullmatch(email):
        raise InvalidRequestError(f"not a valid email address: {email!r}")
    return email


def check_password(password: str) -> None:
    """Check a new password's length.

    Raises:
        InvalidRequestError: shorter than 8 or longer than 1024 characters.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidRequestError(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidRequestError(f"password must be at most {MAX_PASSWORD_LENGTH} characters")

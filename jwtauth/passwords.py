"""Argon2id password hashing: hash, verify, needs-rehash, and a dummy verify for unknown users."""

from __future__ import annotations

import secrets
from importlib import resources

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
# The most common passwords of 8 characters or more, from public breach lists: refused for new passwords.
COMMON_PASSWORDS = frozenset(
    line.strip().lower()
    for line in resources.files("jwtauth").joinpath("common_passwords.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)


class PasswordHasher:
    """Hashes and verifies passwords with one set of Argon2 parameters; safe to share across threads."""

    def __init__(self, parameters: argon2.Parameters) -> None:
        self._hasher = argon2.PasswordHasher.from_parameters(parameters)
        # Verified against when the email is unknown, so that costs the same as a wrong password.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        """Return a new Argon2id hash of password with a random salt."""
        return self._hasher.hash(password)

    def verify(self, stored_hash: str, password: str) -> bool:
        """Return whether password matches stored_hash; a malformed hash never matches.

        A failed check of a hash made with other parameters than ours (say, by `jwtauth users add` without the
        server's JWTAUTH_ARGON2_*) also spends a dummy verification: a cheaper hash would otherwise fail
        faster, and the time of a failed login would tell which accounts have not logged in since.
        """
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):  # InvalidHashError is not an Argon2Error
            if self.needs_rehash(stored_hash):
                self.verify_dummy(password)
            return False

    def verify_dummy(self, password: str) -> None:
        """Spend the time of one verification, for an email that has no account."""
        self.verify(self._dummy_hash, password)

    def needs_rehash(self, stored_hash: str) -> bool:
        """Return whether stored_hash was made with other parameters than ours."""
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True

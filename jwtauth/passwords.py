"""Argon2id password hashing (hash, verify, needs-rehash, a dummy verify for unknown users), and the rule that
refuses common passwords, from zxcvbn's list."""

from __future__ import annotations

import functools
import importlib.util
import secrets
from pathlib import Path

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


def is_common_password(password: str) -> bool:
    """Whether password, ignoring case, is one of the 30,000 most common passwords of zxcvbn's list (from
    public breaches), or one character repeated: refused for new passwords (API.md "Limits on input")."""
    return len(set(password)) <= 1 or password.lower() in _common_passwords()


@functools.cache
def _common_passwords() -> frozenset[str]:
    """zxcvbn's list of common passwords (lower case, most common first), those long enough to be allowed.

    Read from its data module alone, once, in about 10 ms: importing the zxcvbn package would also build and
    keep its matchers for all six of its word lists (20 to 50 ms, and 13 MB in every worker).
    """
    package = importlib.util.find_spec("zxcvbn")  # finds the package without importing it
    assert package is not None and package.origin is not None, "zxcvbn is a dependency"
    path = Path(package.origin).with_name("frequency_lists.py")
    spec = importlib.util.spec_from_file_location("zxcvbn_frequency_lists", path)
    assert spec is not None and spec.loader is not None, f"zxcvbn's word lists are missing: {path}"
    lists = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lists)
    passwords: list[str] = lists.FREQUENCY_LISTS["passwords"]
    return frozenset(password for password in passwords if len(password) >= MIN_PASSWORD_LENGTH)


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

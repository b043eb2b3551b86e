"""A real `jwtauth serve` whose issuer is its own URL, for standard clients that follow its discovery document
(`jwks_uri`, `token_endpoint`, `revocation_endpoint` must be the address the server really answers on)."""

from __future__ import annotations

import shutil
from pathlib import Path

from jwtauth.config import Settings

from .conftest import CHEAP_ARGON2, PASSWORD, Account, Server, add_user, start_server


def issuer_env(directory: Path, keys_template: Path, **variables: str) -> dict[str, str]:
    """The environment of an installation in directory, with a copy of the template keys and alice."""
    shutil.copytree(keys_template, directory / "keys")
    return {
        **CHEAP_ARGON2,
        "JWTAUTH_DATABASE": str(directory / "auth.db"),
        "JWTAUTH_KEYS_DIR": str(directory / "keys"),
        **{f"JWTAUTH_{name}": value for name, value in variables.items()},
    }


def start_issuer(env: dict[str, str]) -> tuple[Server, Account]:
    """Start `jwtauth serve` with JWTAUTH_ISSUER set to its own URL, with alice as a user."""
    alice = add_user(Settings.from_env(env), "alice@example.com", PASSWORD, "Alice")
    return start_server(env, own_issuer=True), alice

"""A real `jwtauth serve` whose issuer is its own URL, for standard clients that follow its discovery document.

conftest.start_server picks its port itself, after the environment (and so JWTAUTH_ISSUER) is fixed;
clients that read `jwks_uri`, `token_endpoint` or `revocation_endpoint` from the metadata need the
issuer to be the address the server really answers on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from jwtauth.config import Settings

from .conftest import CHEAP_ARGON2, PASSWORD, Account, Server, add_user, free_port


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
    """Start `jwtauth serve` with JWTAUTH_ISSUER set to its own URL, with alice as a user; wait for /healthz."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**env, "JWTAUTH_ISSUER": url}
    alice = add_user(Settings.from_env(env), "alice@example.com", PASSWORD, "Alice")
    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}
    log_path = Path(env["JWTAUTH_DATABASE"]).with_name("serve.log")  # a file: a pipe nobody reads could fill
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jwtauth", "serve", "--port", str(port)],
            env={**clean, **env},
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return Server(url, process, env), alice
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"jwtauth serve did not become healthy: {log_path.read_text()[-2000:]}")

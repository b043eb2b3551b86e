"""Signing keys on disk: create, load, kid (RFC 7638 thumbprint) and the public JWKS (RFC 7517).

On-disk format, in the keys directory (mode 0700):
- `<kid>.pem`: one RSA private key per file, PKCS#8 PEM, mode 0600, encrypted with the passphrase if set;
- `keyset.json`: the lifecycle metadata `{"keys": [{"kid", "state", "size", "created_at", ...}]}`,
  where state is `next` (published, not signing), `current` (signing, exactly one) or `retired`;
- `.lock`: taken (flock) by whoever changes the set.
Every file is written to a temporary name, flushed and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from jwtauth.errors import KeyStoreError

KeyState = Literal["next", "current", "retired"]
METADATA_FILE = "keyset.json"
LOCK_FILE = ".lock"


def _b64url_uint(value: int) -> str:
    data = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """Return the public JWK of an RSA key with its RFC 7638 thumbprint as `kid`."""
    numbers = public_key.public_numbers()
    members = {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)}
    # RFC 7638 §3: the required members only, lexicographic order, no white space.
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": members["n"], "e": members["e"]}


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One keypair of the set, with its lifecycle metadata."""

    kid: str
    state: KeyState
    private_key: rsa.RSAPrivateKey
    public_key: rsa.RSAPublicKey
    created_at: int

    @classmethod
    def of(cls, kid: str, state: KeyState, private_key: rsa.RSAPrivateKey, created_at: int) -> SigningKey:
        """Pair a private key with its public key, derived once."""
        return cls(kid, state, private_key, private_key.public_key(), created_at)


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys in force, with the JWKS body prepared once."""

    keys: tuple[SigningKey, ...]
    jwks_body: bytes
    etag: str

    @classmethod
    def of(cls, keys: tuple[SigningKey, ...]) -> KeySet:
        """Build a key set and serialise its JWKS.

        Raises:
            KeyStoreError: the set does not have exactly one current key.
        """
        if sum(key.state == "current" for key in keys) != 1:
            raise KeyStoreError("the key set must have exactly one current key")
        body = json.dumps({"keys": [public_jwk(key.public_key) for key in keys]}, separators=(",", ":")).encode()
        return cls(keys, body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    @property
    def current(self) -> SigningKey:
        return next(key for key in self.keys if key.state == "current")

    def public_key(self, kid: str) -> rsa.RSAPublicKey | None:
        """Return the public key published under kid, or None."""
        return next((key.public_key for key in self.keys if key.kid == kid), None)


def generate_private_key(size: int) -> rsa.RSAPrivateKey:
    """Return a new RSA private key (public exponent 65537)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


class KeyStore:
    """The keys directory: loads the key set, creating a `current` and a `next` key on first use."""

    def __init__(self, directory: Path, passphrase: bytes | None, key_size: int) -> None:
        self.directory = directory
        self.passphrase = passphrase
        self.key_size = key_size

    def load_or_create(self, now: int) -> KeySet:
        """Return the key set on disk; create the directory and a first set if there is none.

        Raises:
            KeyStoreError: the directory cannot be used, or a key file cannot be read (the message names it).
        """
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self._locked():
                if not (self.directory / METADATA_FILE).exists():
                    self._create_first_set(now)
                return self.load()
        except OSError as exc:
            raise KeyStoreError(f"cannot use keys directory {self.directory}: {exc.strerror or exc}") from None

    def load(self) -> KeySet:
        """Return the key set described by keyset.json.

        Raises:
            KeyStoreError: the metadata or a key file is missing, corrupt, or needs another passphrase.
        """
        metadata_path = self.directory / METADATA_FILE
        try:
            entries = json.loads(metadata_path.read_bytes())["keys"]
            keys = tuple(
                SigningKey.of(entry["kid"], entry["state"], self._read_private_key(entry["kid"]), entry["created_at"])
                for entry in entries
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"cannot read key metadata {metadata_path}: {exc}") from None
        return KeySet.of(keys)

    def write_key(self, private_key: rsa.RSAPrivateKey) -> str:
        """Write a private key as `<kid>.pem` (mode 0600, encrypted if a passphrase is set); return its kid."""
        kid = public_jwk(private_key.public_key())["kid"]
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self.passphrase) if self.passphrase else serialization.NoEncryption()
        )
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        self._write_atomically(self.directory / f"{kid}.pem", pem)
        return kid

    def write_metadata(self, keys: list[dict[str, object]]) -> None:
        """Replace keyset.json with these entries."""
        body = json.dumps({"keys": keys}, indent=2).encode() + b"\n"
        self._write_atomically(self.directory / METADATA_FILE, body)

    def _create_first_set(self, now: int) -> None:
        os.chmod(self.directory, 0o700)  # also a directory that existed, such as the checkout's keys/
        entries: list[dict[str, object]] = []
        for state in ("current", "next"):
            kid = self.write_key(generate_private_key(self.key_size))
            entries.append({"kid": kid, "state": state, "size": self.key_size, "created_at": now})
        self.write_metadata(entries)

    def _read_private_key(self, kid: str) -> rsa.RSAPrivateKey:
        path = self.directory / f"{kid}.pem"
        if Path(kid).name != kid or kid.startswith("."):
            raise KeyStoreError(f"bad kid {kid!r} in {self.directory / METADATA_FILE}")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=self.passphrase)
        except OSError as exc:
            raise KeyStoreError(f"cannot read private key {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyStoreError(
                f"cannot load private key {path}: wrong or missing JWTAUTH_KEYS_PASSPHRASE, or a corrupt file"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyStoreError(f"private key {path} is not an RSA key")
        return key

    def _write_atomically(self, path: Path, data: bytes) -> None:
        temporary = path.with_name(f".{path.name}.tmp")
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # also when an interrupted write left the file with another mode
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)  # make the rename itself durable
        finally:
            os.close(directory_fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

"""Signing keys on disk: create, load, rotate, prune; kid (RFC 7638 thumbprint) and the public JWKS (RFC 7517).

On-disk format, in the keys directory (mode 0700):
- `<kid>.pem`: one RSA private key per file, PKCS#8 PEM, mode 0600, encrypted with the passphrase if set;
- `keyset.json`: the lifecycle, `{"keys": [{"kid", "state", "size", "created_at", "activated_at",
  "retired_at"}]}`, where state is `next` (published, not signing), `current` (signing, exactly one)
  or `retired` (published until every token it signed has expired);
- `.lock`: held (flock) by whoever changes the set: a rotation, a prune, a first start.
A change writes any new PEM first, then replaces keyset.json by an atomic rename: that rename is the
commit point, so a crash at any step leaves the old set or the new one, never half of one. A PEM that
no keyset.json names (a rotation that died before its commit) is never used and `prune` deletes it.
Running servers notice a change by the stat of keyset.json, which they look at once a second.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from jwtauth.config import Settings
from jwtauth.errors import KeyStoreError, RotationTooEarlyError

log = logging.getLogger("jwtauth.keys")

KeyState = Literal["next", "current", "retired"]
METADATA_FILE = "keyset.json"
LOCK_FILE = ".lock"
PICKUP_SECONDS = 2  # every worker serves a changed key set within this long (it looks once a second)


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
class KeyPolicy:
    """The timing of the lifecycle, from the settings."""

    rotate_every: int  # seconds a key signs before the next one takes over
    publish_for: int  # JWTAUTH_JWKS_MAX_AGE: how long a key is in the JWKS before it may sign
    retain_for: int  # how long a retired key stays published: access TTL + leeway + JWKS max-age


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key's line in keyset.json."""

    kid: str
    state: KeyState
    size: int
    created_at: int
    activated_at: int | None = None
    retired_at: int | None = None

    def signs_from(self, policy: KeyPolicy) -> int:
        """When a `next` key may first sign: once every cache of the JWKS can have seen it."""
        return self.created_at + PICKUP_SECONDS + policy.publish_for

    def rotates_at(self, policy: KeyPolicy) -> int | None:
        """When a `current` key is due to hand over to the next one."""
        return None if self.state != "current" else (self.activated_at or self.created_at) + policy.rotate_every

    def deletes_at(self, policy: KeyPolicy) -> int | None:
        """When a `retired` key has no live token left to verify and leaves the JWKS."""
        return None if self.retired_at is None else self.retired_at + policy.retain_for


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys in force, their private and public halves loaded once, and the JWKS body prepared once."""

    entries: tuple[KeyEntry, ...]
    private_keys: dict[str, rsa.RSAPrivateKey]
    public_keys: dict[str, rsa.RSAPublicKey]
    jwks_body: bytes
    etag: str

    @classmethod
    def of(cls, entries: tuple[KeyEntry, ...], private_keys: dict[str, rsa.RSAPrivateKey]) -> KeySet:
        """Build a key set and serialise its JWKS.

        Raises:
            KeyStoreError: the set does not have exactly one current key.
        """
        if sum(entry.state == "current" for entry in entries) != 1:
            raise KeyStoreError("the key set must have exactly one current key")
        public_keys = {entry.kid: private_keys[entry.kid].public_key() for entry in entries}
        body = json.dumps({"keys": [public_jwk(key) for key in public_keys.values()]}, separators=(",", ":"))
        digest = hashlib.sha256(body.encode()).hexdigest()[:32]
        return cls(entries, private_keys, public_keys, body.encode(), f'"{digest}"')

    @property
    def current(self) -> KeyEntry:
        current = _in_state(self.entries, "current")
        assert current is not None  # checked when the set was built
        return current

    @property
    def next(self) -> KeyEntry | None:
        return _in_state(self.entries, "next")

    @property
    def signing_key(self) -> tuple[str, rsa.RSAPrivateKey]:
        kid = self.current.kid
        return kid, self.private_keys[kid]

    def public_key(self, kid: str) -> rsa.RSAPublicKey | None:
        """Return the public key published under kid, or None."""
        return self.public_keys.get(kid)


def generate_private_key(size: int) -> rsa.RSAPrivateKey:
    """Return a new RSA private key (public exponent 65537)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


class KeyStore:
    """The keys directory and its lifecycle: load, create, rotate, prune."""

    def __init__(self, directory: Path, passphrase: bytes | None, key_size: int, policy: KeyPolicy) -> None:
        self.directory = directory
        self.passphrase = passphrase
        self.key_size = key_size
        self.policy = policy
        self._loaded: dict[str, rsa.RSAPrivateKey] = {}  # PEMs already read (decrypting one is slow)
        self._version: tuple[int, int, int] | None = None  # of keyset.json when last loaded
        self._waiting_for: str | None = None  # the next key a due rotation waits for, once logged

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """The key store that the settings describe."""
        retain_for = settings.access_ttl + settings.leeway + settings.jwks_max_age
        policy = KeyPolicy(settings.key_rotate_every, settings.jwks_max_age, retain_for)
        return cls(settings.keys_dir, settings.keys_passphrase, settings.key_size, policy)

    def load_or_create(self, now: int) -> KeySet:
        """Return the key set on disk; create the directory and a first set if there is none.

        Raises:
            KeyStoreError: the directory cannot be used, or a key file cannot be read (the message names it).
        """
        with self._locked():
            if not (self.directory / METADATA_FILE).exists():
                os.chmod(self.directory, 0o700)  # also a directory that existed, such as a checkout's keys/
                self._commit([self._new_entry("current", now, activated_at=now), self._new_entry("next", now)])
        return self.load()

    def load(self) -> KeySet:
        """Return the key set that keyset.json describes.

        Raises:
            KeyStoreError: the metadata or a key file is missing, corrupt, or needs another passphrase.
        """
        self._version = self.version()  # before reading, so that a change made meanwhile is seen next time
        entries = self._read_entries()
        self._loaded = {
            entry.kid: self._loaded.get(entry.kid) or self._read_private_key(entry.kid) for entry in entries
        }
        return KeySet.of(entries, dict(self._loaded))

    def version(self) -> tuple[int, int, int] | None:
        """A cheap fingerprint of keyset.json that changes whenever the set does, or None if it is missing."""
        try:
            status = (self.directory / METADATA_FILE).stat()
        except OSError:
            return None
        return status.st_ino, status.st_mtime_ns, status.st_size

    def maintain(self, keyset: KeySet, now: int) -> KeySet:
        """What a running server does once a second: follow changes that another process made, rotate
        when the schedule says so, prune retired keys; return the key set to use from now on.

        Raises:
            KeyStoreError: the set on disk cannot be read (the caller keeps using the one it has).
        """
        if self.version() != self._version:
            keyset = self.load()
        due_at = keyset.current.rotates_at(self.policy)
        if due_at is not None and now >= due_at:
            upcoming = keyset.next
            if upcoming is None or now >= upcoming.signs_from(self.policy):
                keyset = self.rotate(now, scheduled=True)
            elif self._waiting_for != upcoming.kid:
                self._waiting_for = upcoming.kid
                log.warning(
                    "key rotation is due, but next key %s is published too recently to sign: waiting until %d",
                    upcoming.kid, upcoming.signs_from(self.policy),
                )  # fmt: skip
        if any(self._is_spent(entry, now) for entry in keyset.entries):
            self.prune(now)
            keyset = self.load()
        return keyset

    def rotate(self, now: int, force: bool = False, scheduled: bool = False) -> KeySet:
        """Promote `next` to `current`, retire the old `current`, and create a new `next`.

        With `scheduled`, rotate only if the set on disk is still due, so that of several workers that
        found it due at once, one rotates and the others load its result.

        Raises:
            RotationTooEarlyError: `next` has not been published for the JWKS max-age yet (unless force).
            KeyStoreError: the set cannot be read or written.
        """
        with self._locked():
            entries = list(self._read_entries())
            current = _in_state(entries, "current")
            if current is None:
                raise KeyStoreError("the key set must have exactly one current key")
            if scheduled and now < (current.rotates_at(self.policy) or now):
                return self.load()
            upcoming = _in_state(entries, "next")
            if upcoming is not None and not force and now < upcoming.signs_from(self.policy):
                raise RotationTooEarlyError(upcoming.signs_from(self.policy))
            rotated = [_retire(entry, now) if entry.state == "current" else entry for entry in entries]
            if upcoming is None:  # only after a hand edit of keyset.json: make the new key current at once
                rotated.append(self._new_entry("current", now, activated_at=now))
            else:
                rotated[entries.index(upcoming)] = dataclasses.replace(upcoming, state="current", activated_at=now)
            self._commit([*rotated, self._new_entry("next", now)])
            log.info("keys rotated: %s signs from now on", upcoming.kid if upcoming else rotated[-1].kid)
        return self.load()

    def prune(self, now: int, force: bool = False) -> list[str]:
        """Delete retired keys whose tokens have all expired, and PEMs that no key set names; return their kids.
        With `force`, delete every retired key now: for a leaked key, whose tokens must stop verifying.

        Raises:
            KeyStoreError: the set cannot be read or written.
        """
        with self._locked():
            entries = self._read_entries()
            keep = [e for e in entries if not (self._is_spent(e, now) or (force and e.state == "retired"))]
            if len(keep) < len(entries):
                self._commit(keep)
            kept = {entry.kid for entry in keep}
            deleted = []
            for path in self.directory.glob("*.pem"):
                if path.stem not in kept:
                    path.unlink()
                    deleted.append(path.stem)
            for path in self.directory.glob(".*.tmp"):
                path.unlink()
        if deleted:
            log.info("keys pruned: %s", ", ".join(sorted(deleted)))
        return sorted(deleted)

    def _is_spent(self, entry: KeyEntry, now: int) -> bool:
        deletes_at = entry.deletes_at(self.policy)
        return deletes_at is not None and deletes_at <= now

    def _new_entry(self, state: KeyState, now: int, activated_at: int | None = None) -> KeyEntry:
        private_key = generate_private_key(self.key_size)
        kid = self._write_key(private_key)
        self._loaded[kid] = private_key
        return KeyEntry(kid, state, self.key_size, now, activated_at)

    def _write_key(self, private_key: rsa.RSAPrivateKey) -> str:
        kid = public_jwk(private_key.public_key())["kid"]
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self.passphrase) if self.passphrase else serialization.NoEncryption()
        )
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        self._write_atomically(self.directory / f"{kid}.pem", pem)
        return kid

    def _commit(self, entries: list[KeyEntry]) -> None:
        """Replace keyset.json: the one step that makes a change take effect."""
        body = {"keys": [{k: v for k, v in dataclasses.asdict(entry).items() if v is not None} for entry in entries]}
        self._write_atomically(self.directory / METADATA_FILE, json.dumps(body, indent=2).encode() + b"\n")

    def _read_entries(self) -> tuple[KeyEntry, ...]:
        path = self.directory / METADATA_FILE
        try:
            raw: list[dict[str, Any]] = json.loads(path.read_bytes())["keys"]
            entries = tuple(KeyEntry(**item) for item in raw)
        except OSError as exc:
            raise KeyStoreError(f"cannot read key metadata {path}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"cannot read key metadata {path}: {exc}") from None
        for entry in entries:
            if entry.state not in ("next", "current", "retired") or Path(entry.kid).name != entry.kid:
                raise KeyStoreError(f"bad entry {entry.kid!r} in key metadata {path}")
        return entries

    def _read_private_key(self, kid: str) -> rsa.RSAPrivateKey:
        path = self.directory / f"{kid}.pem"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=self.passphrase)
        except OSError as exc:
            raise KeyStoreError(f"cannot read private key {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyStoreError(
                f"cannot load private key {path}: wrong or missing JWTAUTH_KEYS_PASSPHRASE, or a corrupt file"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey) or public_jwk(key.public_key())["kid"] != kid:
            raise KeyStoreError(f"private key {path} is not the RSA key its name says")
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
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"cannot use keys directory {self.directory}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _in_state(entries: Sequence[KeyEntry], state: KeyState) -> KeyEntry | None:
    return next((entry for entry in entries if entry.state == state), None)


def _retire(entry: KeyEntry, now: int) -> KeyEntry:
    return dataclasses.replace(entry, state="retired", retired_at=now)

"""Signing keys and the refresh secret: create, load, rotate, prune over a key repository (a directory, or
the database); kid (RFC 7638 thumbprint) and the public JWKS (RFC 7517).

A key moves through `next` (published, not signing), `current` (signing, exactly one) and `retired`
(published until every token it signed has expired). Every key, and the refresh secret that
authenticates refresh tokens, is stored as PKCS#8 PEM, encrypted with the passphrase if one is set.

The directory (mode 0700, FileKeyRepository) holds:
- `<kid>.pem`: one RSA private key per file, mode 0600;
- `refresh.secret`: the refresh secret, mode 0600;
- `keyset.json`: the lifecycle, `{"keys": [{"kid", "state", "size", "created_at", "activated_at",
  "retired_at"}]}`;
- `.lock`: held (flock) by whoever changes the set: a rotation, a prune, a first start.
A change writes any new PEM first, then replaces keyset.json by an atomic rename: that rename is the
commit point, so a crash at any step leaves the old set or the new one, never half of one. A PEM that
no keyset.json names (a rotation that died before its commit) is never used and the next change deletes it.
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes as PrivateKey

from jwtauth.config import Settings
from jwtauth.errors import KeyStoreError, RotationTooEarlyError
from jwtauth.tokens import RefreshTokens

log = logging.getLogger("jwtauth.keys")

KeyState = Literal["next", "current", "retired"]
METADATA_FILE = "keyset.json"
REFRESH_SECRET_FILE = "refresh.secret"  # noqa: S105 - a file name
REFRESH_SECRET = "refresh secret"  # noqa: S105 - its name for KeyRepository.where
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
    refresh_tokens: RefreshTokens

    @classmethod
    def of(
        cls, entries: tuple[KeyEntry, ...], private_keys: dict[str, rsa.RSAPrivateKey], refresh_tokens: RefreshTokens
    ) -> KeySet:
        """Build a key set and serialise its JWKS.

        Raises:
            KeyStoreError: the set does not have exactly one current key.
        """
        if sum(entry.state == "current" for entry in entries) != 1:
            raise KeyStoreError("the key set must have exactly one current key")
        public_keys = {entry.kid: private_keys[entry.kid].public_key() for entry in entries}
        body = json.dumps({"keys": [public_jwk(key) for key in public_keys.values()]}, separators=(",", ":"))
        digest = hashlib.sha256(body.encode()).hexdigest()[:32]
        return cls(entries, private_keys, public_keys, body.encode(), f'"{digest}"', refresh_tokens)

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


@dataclass(frozen=True, slots=True)
class StoredKeys:
    """What a key repository holds: the lifecycle, each key's PKCS#8 PEM by kid, and the PEM of the refresh
    secret (None until the first start that knows of it)."""

    entries: tuple[KeyEntry, ...]
    pems: Mapping[str, bytes]
    refresh_secret: bytes | None


class KeyChange(Protocol):
    """One change of the key set, made while the repository's lock is held."""

    def read(self) -> StoredKeys | None:
        """The key set as it is now; None if there is none yet.

        Raises:
            KeyStoreError: it cannot be read.
        """

    def write(self, keys: StoredKeys) -> list[str]:
        """Make `keys` the key set, atomically; return the kids of keys it no longer holds (and leftovers
        of an interrupted change).

        Raises:
            KeyStoreError: it cannot be written.
        """


class KeyRepository(Protocol):
    """Where keys live: files in a directory (one machine), or the database (several)."""

    def version(self) -> object:
        """A cheap fingerprint that changes whenever the key set does (servers look at it once a second).

        Raises:
            KeyStoreError: it cannot be read.
        """

    def read(self) -> StoredKeys:
        """The key set.

        Raises:
            KeyStoreError: there is none, or it cannot be read.
        """

    def change(self) -> AbstractContextManager[KeyChange]:
        """Hold the repository's lock, across processes and machines, for one change.

        Raises:
            KeyStoreError: the repository cannot be used.
        """

    def where(self, name: str) -> str:
        """Where the key of kid `name` (or REFRESH_SECRET) lives, for messages."""


class KeyStore:
    """The lifecycle of the signing keys and the refresh secret over a key repository: load, create,
    rotate, prune. Decrypted keys are kept, since decrypting one is slow."""

    def __init__(self, repository: KeyRepository, passphrase: bytes | None, key_size: int, policy: KeyPolicy) -> None:
        self.repository = repository
        self.passphrase = passphrase
        self.key_size = key_size
        self.policy = policy
        self._loaded: dict[str, rsa.RSAPrivateKey] = {}
        self._version: object = None  # of the repository when last loaded
        self._waiting_for: str | None = None  # the next key a due rotation waits for, once logged

    @classmethod
    def from_settings(cls, settings: Settings, repository: KeyRepository) -> KeyStore:
        """The key store that the settings describe, over `repository`."""
        retain_for = settings.access_ttl + settings.leeway + settings.jwks_max_age
        policy = KeyPolicy(settings.key_rotate_every, settings.jwks_max_age, retain_for)
        return cls(repository, settings.keys_passphrase, settings.key_size, policy)

    def load_or_create(self, now: int) -> KeySet:
        """Return the key set; create a first one (a current and a next key), or the refresh secret that an
        older key set lacks, if needed. Of several processes starting at once, one creates, the others load.

        Raises:
            KeyStoreError: the keys cannot be read or written (the message names what).
        """
        with self.repository.change() as change:
            stored = change.read()
            if stored is None:
                entries = (self._new_entry("current", now, activated_at=now), self._new_entry("next", now))
                change.write(StoredKeys(entries, self._pems(entries), self._new_refresh_secret()))
            elif stored.refresh_secret is None:
                change.write(dataclasses.replace(stored, refresh_secret=self._new_refresh_secret()))
        return self.load()

    def load(self) -> KeySet:
        """Return the key set the repository holds.

        Raises:
            KeyStoreError: it is missing, corrupt, or needs another passphrase.
        """
        self._version = self.repository.version()  # before reading: a change made meanwhile is seen next time
        stored = self.repository.read()
        if stored.refresh_secret is None:
            raise KeyStoreError("the key set has no refresh secret; start jwtauth serve once to create it")
        self._loaded = {entry.kid: self._loaded.get(entry.kid) or self._private_key(stored, entry.kid)
                        for entry in stored.entries}  # fmt: skip
        secret = self._refresh_secret(stored.refresh_secret)
        return KeySet.of(stored.entries, dict(self._loaded), RefreshTokens(secret))

    def maintain(self, keyset: KeySet, now: int) -> KeySet:
        """What a running server does once a second: follow changes that another process made, rotate
        when the schedule says so, prune retired keys; return the key set to use from now on.

        Raises:
            KeyStoreError: the set cannot be read (the caller keeps using the one it has).
        """
        if self.repository.version() != self._version:
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

        With `scheduled`, rotate only if the set is still due, so that of several workers (or nodes) that
        found it due at once, one rotates and the others load its result.

        Raises:
            RotationTooEarlyError: `next` has not been published for the JWKS max-age yet (unless force).
            KeyStoreError: the set cannot be read or written.
        """
        with self.repository.change() as change:
            stored = _existing(change)
            entries = list(stored.entries)
            current = _in_state(entries, "current")
            if current is None:
                raise KeyStoreError("the key set must have exactly one current key")
            if not (scheduled and now < (current.rotates_at(self.policy) or now)):  # else another has rotated
                self._rotate(change, stored, now, force)
        return self.load()  # once the change is over: with the database, it holds a connection of its own

    def _rotate(self, change: KeyChange, stored: StoredKeys, now: int, force: bool) -> None:
        entries = list(stored.entries)
        upcoming = _in_state(entries, "next")
        if upcoming is not None and not force and now < upcoming.signs_from(self.policy):
            raise RotationTooEarlyError(upcoming.signs_from(self.policy))
        rotated = [_retire(entry, now) if entry.state == "current" else entry for entry in entries]
        if upcoming is None:  # only after a hand edit of the key set: make the new key current at once
            rotated.append(self._new_entry("current", now, activated_at=now))
        else:
            rotated[entries.index(upcoming)] = dataclasses.replace(upcoming, state="current", activated_at=now)
        rotated.append(self._new_entry("next", now))
        change.write(dataclasses.replace(stored, entries=tuple(rotated), pems=self._pems(rotated, stored.pems)))
        log.info("keys rotated: %s signs from now on", upcoming.kid if upcoming else rotated[-2].kid)

    def prune(self, now: int, force: bool = False) -> list[str]:
        """Delete retired keys whose tokens have all expired, and leftovers of interrupted changes; return
        their kids. With `force`, delete every retired key now: for a leaked key, whose tokens must stop
        verifying.

        Raises:
            KeyStoreError: the set cannot be read or written.
        """
        with self.repository.change() as change:
            stored = _existing(change)
            keep = tuple(e for e in stored.entries if not (self._is_spent(e, now) or (force and e.state == "retired")))
            deleted = change.write(dataclasses.replace(stored, entries=keep, pems=self._pems(keep, stored.pems)))
        if deleted:
            log.info("keys pruned: %s", ", ".join(sorted(deleted)))
        return sorted(deleted)

    def export(self, passphrase: bytes) -> StoredKeys:
        """The key set, every key and the refresh secret encrypted with `passphrase`, for `jwtauth db copy-to`:
        the keys of a directory move into a database. Keys stored without encryption (no passphrase was set)
        are read as they are.

        Raises:
            KeyStoreError: the keys cannot be read or decrypted.
        """
        stored = self.repository.read()
        stored_pems = [stored.pems.get(entry.kid, b"") for entry in stored.entries]
        is_encrypted = any(pem.startswith(b"-----BEGIN ENCRYPTED") for pem in stored_pems)
        reader = self if is_encrypted else KeyStore(self.repository, None, self.key_size, self.policy)
        keyset = reader.load()
        writer = KeyStore(self.repository, passphrase, self.key_size, self.policy)
        secret = x25519.X25519PrivateKey.from_private_bytes(keyset.refresh_tokens.secret)
        pems = {kid: writer._serialise(key) for kid, key in keyset.private_keys.items()}
        return StoredKeys(stored.entries, pems, writer._serialise(secret))

    def _is_spent(self, entry: KeyEntry, now: int) -> bool:
        deletes_at = entry.deletes_at(self.policy)
        return deletes_at is not None and deletes_at <= now

    def _new_entry(self, state: KeyState, now: int, activated_at: int | None = None) -> KeyEntry:
        private_key = generate_private_key(self.key_size)
        kid = public_jwk(private_key.public_key())["kid"]
        self._loaded[kid] = private_key
        return KeyEntry(kid, state, self.key_size, now, activated_at)

    def _pems(self, entries: Sequence[KeyEntry], stored: Mapping[str, bytes] | None = None) -> dict[str, bytes]:
        """The PEM of each entry: as stored, or serialised now for a key just made."""
        return {entry.kid: (stored or {}).get(entry.kid) or self._serialise(self._loaded[entry.kid])
                for entry in entries}  # fmt: skip

    def _serialise(self, key: PrivateKey) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self.passphrase) if self.passphrase else serialization.NoEncryption()
        )
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    def _new_refresh_secret(self) -> bytes:
        # 256 random bits, held as an X25519 private key only so that they are stored as PKCS#8 and
        # encrypted with the passphrase exactly like the signing keys.
        return self._serialise(x25519.X25519PrivateKey.generate())

    def _private_key(self, stored: StoredKeys, kid: str) -> rsa.RSAPrivateKey:
        key = self._deserialise(stored.pems.get(kid), kid, "private key")
        if not isinstance(key, rsa.RSAPrivateKey) or public_jwk(key.public_key())["kid"] != kid:
            raise KeyStoreError(f"private key {self.repository.where(kid)} is not the RSA key its name says")
        return key

    def _refresh_secret(self, pem: bytes) -> bytes:
        key = self._deserialise(pem, REFRESH_SECRET, "refresh secret")
        if not isinstance(key, x25519.X25519PrivateKey):
            raise KeyStoreError(f"refresh secret {self.repository.where(REFRESH_SECRET)} is not in its format")
        return key.private_bytes_raw()

    def _deserialise(self, pem: bytes | None, name: str, what: str) -> PrivateKey:
        where = self.repository.where(name)
        if pem is None:
            raise KeyStoreError(f"cannot read {what} {where}: it is missing")
        try:
            return serialization.load_pem_private_key(pem, password=self.passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyStoreError(
                f"cannot load {what} {where}: wrong or missing JWTAUTH_KEYS_PASSPHRASE, or a corrupt file"
            ) from None


class FileKeyRepository:
    """Keys in a directory (mode 0700), as the module's docstring describes; `.lock` serialises changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def version(self) -> object:
        try:
            status = (self.directory / METADATA_FILE).stat()
        except OSError:
            return None
        return status.st_ino, status.st_mtime_ns, status.st_size

    def read(self) -> StoredKeys:
        entries = self._read_entries()
        return StoredKeys(entries, _PemFiles(self.directory), self._read_optional(REFRESH_SECRET_FILE))

    def where(self, name: str) -> str:
        return str(self.directory / (REFRESH_SECRET_FILE if name == REFRESH_SECRET else f"{name}.pem"))

    @contextlib.contextmanager
    def change(self) -> Iterator[KeyChange]:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"cannot use keys directory {self.directory}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield _FileChange(self)
        finally:
            os.close(fd)

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

    def _read_optional(self, name: str) -> bytes | None:
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyStoreError(f"cannot read {self.directory / name}: {exc.strerror or exc}") from None

    def write_atomically(self, path: Path, data: bytes) -> None:
        """Write a file of mode 0600 by fsync and rename, so that it is there whole or not at all."""
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


class _PemFiles(Mapping[str, bytes]):
    """The PEM files of a keys directory, read when asked for: a server reads only the keys it lacks."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __getitem__(self, kid: str) -> bytes:
        path = self.directory / f"{kid}.pem"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyError(kid) from None
        except OSError as exc:
            raise KeyStoreError(f"cannot read private key {path}: {exc.strerror or exc}") from None

    def get(self, kid: str, default: Any = None) -> Any:
        try:
            return self[kid]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return (path.stem for path in self.directory.glob("*.pem"))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _FileChange:
    def __init__(self, repository: FileKeyRepository) -> None:
        self.repository = repository

    def read(self) -> StoredKeys | None:
        if not (self.repository.directory / METADATA_FILE).exists():
            os.chmod(self.repository.directory, 0o700)  # also a directory that existed, such as a checkout's keys/
            return None
        return self.repository.read()

    def write(self, keys: StoredKeys) -> list[str]:
        """New PEMs first, then keyset.json by an atomic rename (the commit point), then the leftovers go."""
        directory, write = self.repository.directory, self.repository.write_atomically
        for entry in keys.entries:
            path = directory / f"{entry.kid}.pem"
            if not path.exists():
                write(path, keys.pems[entry.kid])
        if keys.refresh_secret is not None and not (directory / REFRESH_SECRET_FILE).exists():
            write(directory / REFRESH_SECRET_FILE, keys.refresh_secret)
        body = {"keys": [{k: v for k, v in dataclasses.asdict(e).items() if v is not None} for e in keys.entries]}
        write(directory / METADATA_FILE, json.dumps(body, indent=2).encode() + b"\n")
        kept = {entry.kid for entry in keys.entries}
        deleted = []
        for path in directory.glob("*.pem"):
            if path.stem not in kept:
                path.unlink()
                deleted.append(path.stem)
        for path in directory.glob(".*.tmp"):
            path.unlink()
        return deleted


def _existing(change: KeyChange) -> StoredKeys:
    stored = change.read()
    if stored is None:
        raise KeyStoreError("there is no key set yet; start jwtauth serve once to create it")
    return stored


def _in_state(entries: Sequence[KeyEntry], state: KeyState) -> KeyEntry | None:
    return next((entry for entry in entries if entry.state == state), None)


def _retire(entry: KeyEntry, now: int) -> KeyEntry:
    return dataclasses.replace(entry, state="retired", retired_at=now)

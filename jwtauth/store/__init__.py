"""Storage: the `Store` protocol the service talks to, and `open_store`, which picks the backend.

`JWTAUTH_DATABASE` is a file path (SQLite, one machine) or a `postgresql://` URL (PostgreSQL, any number of
machines). Both backends implement the same domain operations and raise the same store-neutral errors
(StoreUnavailableError, ConflictError); decisions, such as the rotation rule, live above them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from jwtauth.config import Settings
from jwtauth.errors import StoreUnavailableError
from jwtauth.keys import KeyRepository, StoredKeys
from jwtauth.sessions import Decision, SessionState, SpentToken, User

T = TypeVar("T")
Decide = Callable[[SessionState | None], Decision]  # the rotation rule, for one presented token (Store.rotate)

__all__ = ["Decision", "SessionState", "Snapshot", "Store", "User", "open_store"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Users, live sessions and the key set, as `jwtauth db copy-to` moves them from one database to another."""

    users: Sequence[User]
    sessions: Sequence[SessionState]
    keys: StoredKeys | None = None  # the PEMs encrypted as the target is to hold them


class Store(Protocol):
    """What jwtauth keeps in a database. Every method is one transaction; times are Unix seconds."""

    def migrate(self) -> None:
        """Create or upgrade the schema (once, however many processes start at the same moment).

        Raises:
            StoreError: the database cannot be opened, or is from a newer jwtauth.
        """

    def close(self) -> None:
        """Give back this process's connections."""

    def is_usable(self) -> bool:
        """Whether the database answers a query now (for /healthz)."""

    def check(self) -> list[str]:
        """The problems a consistency check finds (schema, integrity, emails that collide); none if sound.

        Raises:
            StoreError: there is no database to check.
            StoreUnavailableError: the database cannot be reached.
        """

    def backup(self, target: Path) -> None:
        """Write a consistent copy of the database to `target`, while others go on using it.

        Raises:
            StoreError: the copy cannot be made.
        """

    def key_repository(self) -> KeyRepository:
        """Where this deployment keeps its signing keys and refresh secret."""

    async def run(self, work: Callable[[], T]) -> T:
        """Run blocking `work` that uses this store for a caller on the event loop, in the way this backend
        does it best (on the loop when that cannot block, else in a worker thread). `work` may be started
        twice (SQLite: on the loop, then again in a thread when a lock was taken before it wrote anything), so
        it must make at most one write, or writes that may be repeated."""

    # Users

    def add_user(self, email: str, name: str, password_hash: str, now: int) -> User:
        """Insert a user with a new stable id.

        Raises:
            ConflictError: the email is taken.
        """

    def find_user_by_email(self, email: str) -> User | None:
        """The user with this (normalised) email, or None."""

    def find_user(self, user_id: str) -> User | None:
        """The user with this id, or None."""

    def list_users(self) -> list[User]:
        """Every user, oldest first."""

    def set_password_hash(self, user_id: str, password_hash: str, now: int) -> None:
        """Store a new hash for the user (a changed password, or a re-hash with new parameters)."""

    def set_user_disabled(self, user_id: str, is_disabled: bool, now: int) -> None:
        """Disable or enable the user."""

    # Sessions

    def start_session(
        self, session: SessionState, max_sessions: int, address_key: str, reset: str, release: Sequence[str]
    ) -> int:
        """A successful login, in one transaction: store its new session; end the user's oldest live sessions
        beyond `max_sessions`, never the new one (it counts as the newest, even if another has the same
        created_at); remember `address_key` as the user's last login address; and forgive the attempt the
        login counted (take_login_attempt): clear the count under `reset`, take back one attempt under each
        of `release`. Return how many sessions that ended. Concurrent calls for one user never leave more
        than `max_sessions` live."""

    def rotate(self, family: str, decide: Decide) -> Decision:
        """Call `decide` on the state of the session of `family` (None if there is none), save what the
        decision says (a rotated or a revoked session), and return the decision (rotate_optimistically).
        Of concurrent calls for one session, from any process or machine, that decided on one state, one saves
        and the others decide again on the state it saved.

        Raises:
            StoreUnavailableError: the row's lock could not be had within the busy timeout; nothing was done.
        """

    async def rotate_async(self, family: str, decide: Decide) -> Decision:
        """rotate, for a caller on the event loop, in the way this backend does it best: SQLite as run
        runs it; PostgreSQL with the rotations asked for in the same turn of the loop, read together in one
        statement and saved together in another (rotate_together).

        Raises:
            StoreUnavailableError: as rotate.
        """

    def find_session(self, family: str) -> SessionState | None:
        """The session of `family`, revoked or not, or None."""

    def revoke_session(self, session_id: str, now: float) -> int:
        """Revoke one session; return how many this revoked (0 or 1)."""

    def revoke_user_sessions(self, user_id: str, now: float) -> int:
        """Revoke every live session of a user; return how many."""

    def revoke_all_sessions(self, now: float) -> int:
        """Revoke every live session; return how many."""

    def find_session_user(self, session_id: str) -> User | None:
        """The user of a session that exists and is not revoked, if that user is not disabled."""

    def count_live_sessions(self, now: float) -> int:
        """The number of sessions neither revoked nor expired (counts rows: not for every scrape)."""

    def delete_expired(self, now: float, revoked_before: float, attempts_before: int) -> int:
        """Delete sessions expired, or revoked before `revoked_before`, and login-attempt windows opened
        before `attempts_before`, a batch at a time; return how many sessions were deleted."""

    # Throttling

    def take_login_attempt(self, limits: dict[str, int], now: int, window: int) -> int | None:
        """Count one attempt under each key, unless a key has reached its limit in its current window.
        Atomic: concurrent attempts from any number of processes never get past a limit. Return None if
        the attempt may go on, else the seconds until the last window that blocks it ends."""

    # Moving a deployment (jwtauth db copy-to)

    def export(self, now: float) -> Snapshot:
        """Every user and every live session (not the keys: KeyStore.export re-encrypts those)."""

    def import_(self, snapshot: Snapshot) -> None:
        """Write a snapshot, keys included, into a database that holds no jwtauth data yet, in one transaction.

        Raises:
            StoreError: the database already holds jwtauth data; nothing was written.
        """


def open_store(settings: Settings) -> Store:
    """The store that JWTAUTH_DATABASE names: a `postgresql://` (or `postgres://`) URL, else a SQLite file.

    Raises:
        ConfigError: PostgreSQL without JWTAUTH_KEYS_PASSPHRASE.
    """
    if is_postgres_url(settings.database):
        from jwtauth.store.postgres import PostgresStore  # psycopg is imported only where it is used

        return PostgresStore(settings)
    from jwtauth.store.sqlite import SqliteStore

    return SqliteStore(Path(settings.database), settings.keys_dir, settings.db_busy_timeout)


def is_postgres_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def describe_database(database: str) -> str:
    """The database for messages: a file path as it is; a URL without its user, password and parameters."""
    if not is_postgres_url(database):
        return database
    scheme, _, rest = database.partition("://")
    location = rest.rpartition("@")[2].partition("?")[0]
    return f"{scheme}://{location}"


# The rotation both backends run (Store.rotate)

# Each failed attempt means that another rotation of the session saved first. With the rotation rule a call
# fails at most once (it then finds its token spent, and a spent token is never rotated); the bound only keeps
# a rule that always rotates, under contention, from trying for ever.
MAX_ROTATION_ATTEMPTS = 64


def rotate_optimistically(
    read: Callable[[], SessionState | None],
    decide: Callable[[SessionState | None], Decision],
    save_rotation: Callable[[SessionState, int], bool],
    save_revocation: Callable[[SessionState], object],
) -> Decision:
    """Decide on the session as read, with no lock held, then save only if no other rotation or revocation
    saved meanwhile; else read and decide again. `save_rotation(state, generation)` saves a rotation if the
    session is still at the generation it was read at and not revoked, in one statement that takes the row's
    write lock, and says whether it did. Of rotations that decided on one generation, exactly one saves;
    the others then find the token spent (the reuse interval's answer, or theft). The lock is held only
    for that statement, not while the rule runs, so other processes' rotations seldom wait for it.

    Raises:
        StoreUnavailableError: another rotation of the session saved first at each of MAX_ROTATION_ATTEMPTS.
    """
    for _ in range(MAX_ROTATION_ATTEMPTS):
        state = read()
        decision = decide(state)
        saved = decision.state
        if decision.outcome == "rotated" and saved is not None and state is not None:
            if not save_rotation(saved, state.generation):
                continue
        elif decision.outcome == "reuse_detected" and saved is not None:
            save_revocation(saved)  # revoked by this or by a revocation that came first: the same
        return decision
    raise StoreUnavailableError("the session was rotated by others at every attempt")


def rotate_together(
    requests: Sequence[tuple[str, Decide]],
    read: Callable[[list[str]], dict[str, SessionState]],
    save_rotations: Callable[[list[tuple[SessionState, int]]], set[str]],
    save_revocation: Callable[[SessionState], object],
    rotate: Callable[[str, Decide], Decision],
) -> list[Decision | StoreUnavailableError]:
    """rotate_optimistically for several (family, decide) requests at once, in two statements where it would
    take two each: `read` the sessions of their families (by family), call each `decide`, then
    `save_rotations` (state, generation read) together, each only if its session is still at the generation
    it was read at and not revoked; it returns the ids of the sessions it saved. A rotation that another saved
    before is decided again alone (`rotate`: rotate_optimistically), as is a request for a session that an
    earlier request of the same call asked for, once that one is done: each decides on the state the one
    before it left. Returns each request's decision, or the error that ended it alone."""
    first: dict[str, int] = {}  # the request that asks first for each family
    for index, (family, _) in enumerate(requests):
        first.setdefault(family, index)
    states = read(list(first))
    decisions = {family: requests[index][1](states.get(family)) for family, index in first.items()}
    rotations = {
        family: (decision.state, states[family].generation)
        for family, decision in decisions.items()
        if decision.outcome == "rotated" and decision.state is not None and family in states
    }
    saved = save_rotations(list(rotations.values())) if rotations else set()
    answers: list[Decision | StoreUnavailableError] = []
    for index, (family, decide) in enumerate(requests):
        decision = decisions[family]
        try:
            if first[family] != index or (family in rotations and rotations[family][0].id not in saved):
                decision = rotate(family, decide)
            elif decision.outcome == "reuse_detected" and decision.state is not None:
                save_revocation(decision.state)
        except StoreUnavailableError as exc:  # rotated by others at every attempt: this request fails alone
            answers.append(exc)
            continue
        answers.append(decision)
    return answers


# Rows as both backends select them (the same SQL): a user's columns; a session's, then its user's.
USER_FIELDS = ("id", "email", "name", "password_hash", "is_disabled", "created_at", "updated_at", "last_login_key")
SESSION_FIELDS = (
    "id", "family", "created_at", "generation", "token_hash", "expires_at", "revoked_at", "spent", "legacy_hash"
)  # fmt: skip
USER_COLUMNS = ", ".join(f"users.{field}" for field in USER_FIELDS)
SELECT_SESSION = (
    f"select {', '.join(f'sessions.{field}' for field in SESSION_FIELDS)}, {USER_COLUMNS}"
    " from sessions join users on users.id = sessions.user_id"
)


def user_of(row: Sequence[Any] | None) -> User | None:
    """The user of a row of USER_COLUMNS."""
    if row is None:
        return None
    id_, email, name, password_hash, is_disabled, created_at, updated_at, last_login_key = row
    return User(id_, email, name, password_hash, bool(is_disabled), created_at, updated_at, last_login_key)


def session_of(row: Sequence[Any] | None) -> SessionState | None:
    """The session of a row of SELECT_SESSION."""
    if row is None:
        return None
    session_id, family, created_at, generation, token_hash, expires_at, revoked_at, spent, legacy_hash = row[:9]
    user = user_of(row[9:])
    assert user is not None
    return SessionState(session_id, family, user, created_at, generation, token_hash, expires_at, revoked_at,
                        decode_spent(bytes(spent)), legacy_hash)  # fmt: skip


# The spent tokens of a session, as both backends store them (a BLOB, a bytea): for each, its generation
# (8 bytes), when it was spent (a double) and the length of its sealed successor (2 bytes), then the sealed
# successor itself. Read and written at every rotation: a fixed layout, no JSON.
_SPENT_HEADER = struct.Struct("<qdH")


def encode_spent(spent: Sequence[SpentToken]) -> bytes:
    return b"".join(
        _SPENT_HEADER.pack(token.generation, token.spent_at, len(token.sealed_successor)) + token.sealed_successor
        for token in spent
    )


def decode_spent(data: bytes) -> tuple[SpentToken, ...]:
    spent, offset = [], 0
    while offset < len(data):
        generation, spent_at, length = _SPENT_HEADER.unpack_from(data, offset)
        offset += _SPENT_HEADER.size
        spent.append(SpentToken(generation, spent_at, bytes(data[offset : offset + length])))
        offset += length
    return tuple(spent)

"""Every SQL statement of jwtauth: migrations, users, sessions and refresh tokens (SQLite via sqlite-utils).

The rest of the package sees only `Store` and the row dataclasses, so that another backend can slot in here.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlite_utils import Database

from jwtauth.errors import ConflictError, StoreError, TemporarilyUnavailableError, WouldBlockError

# Each entry moves the schema one version up; PRAGMA user_version records how far a database has come.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """create table users (
            id text primary key,
            email text not null unique collate nocase,  -- stored normalised, in lower case
            name text not null default '',
            password_hash text not null,
            is_disabled integer not null default 0,
            created_at integer not null,
            updated_at integer not null
        )""",
        """create table sessions (
            id text primary key,
            user_id text not null references users(id) on delete cascade,
            created_at integer not null,
            revoked_at integer
        )""",
        "create index sessions_by_user on sessions(user_id)",
        """create table refresh_tokens (
            token_hash text primary key,  -- the SHA-256 of the token, never the token itself
            session_id text not null references sessions(id) on delete cascade,
            issued_at integer not null,
            expires_at integer not null,
            used_at integer
        )""",
        "create index refresh_tokens_by_session on refresh_tokens(session_id)",
    ),
    (
        # Login attempts per (email, client address) and per address, in fixed windows. The key is a
        # SHA-256, so the table does not keep the emails that were tried.
        """create table login_attempts (
            key text primary key,
            window_start integer not null,
            attempts integer not null
        )""",
    ),
    (
        # The refresh-token family id: named by every refresh token of the session, shown nowhere else.
        "alter table sessions add column family text",
        "create unique index sessions_by_family on sessions(family)",
    ),
    (
        # Refresh tokens clustered by session: a rotation reads and writes one place of one B-tree, instead
        # of three B-trees at random places. Found by (family → session, hash), so a session from before
        # families, whose tokens name none, can no longer be found: it ends, and its user logs in again.
        "delete from sessions where family is null",  # its refresh tokens go with it (on delete cascade)
        """create table refresh_tokens_v4 (
            session_id text not null references sessions(id) on delete cascade,
            token_hash text not null,  -- the SHA-256 of the token, never the token itself
            issued_at integer not null,
            expires_at integer not null,
            used_at integer,
            generation integer not null default 0,  -- rotations since the login: a fork shares its sibling's
            primary key (session_id, token_hash)
        ) without rowid""",
        """insert into refresh_tokens_v4 (session_id, token_hash, issued_at, expires_at, used_at)
            select session_id, token_hash, issued_at, expires_at, used_at from refresh_tokens""",
        "drop table refresh_tokens",
        "alter table refresh_tokens_v4 rename to refresh_tokens",
    ),
)

# Per session: the live token plus the forks of concurrent refreshes within the reuse interval; and the spent
# tokens of the last few rotations, remembered for that interval, so that a late duplicate gets its fork.
MAX_LIVE_REFRESH_TOKENS = 5
MAX_SPENT_REFRESH_TOKENS = 5
WRITE_RETRY_FIRST_SECONDS, WRITE_RETRY_MAX_SECONDS = 0.0001, 0.002  # between tries for another process's lock


@dataclass(frozen=True, slots=True)
class User:
    """A row of the users table."""

    id: str
    email: str
    name: str
    password_hash: str
    is_disabled: bool
    created_at: int
    updated_at: int


_USER_COLUMNS = "id, email, name, password_hash, is_disabled, created_at, updated_at"
_USER_COLUMNS_OF_USERS = ", ".join(f"users.{column}" for column in _USER_COLUMNS.split(", "))


@dataclass(frozen=True, slots=True)
class Rotation:
    """What presenting a refresh token came to: `rotated` (or `reused_within_interval`) stored a successor;
    `reuse_detected` revoked the session; `invalid` changed nothing (unknown, expired, revoked, disabled)."""

    outcome: Literal["rotated", "reused_within_interval", "reuse_detected", "invalid"]
    user: User | None = None
    session_id: str | None = None


def _user(row: Any) -> User | None:
    if row is None:
        return None
    id_, email, name, password_hash, is_disabled, created_at, updated_at = row
    return User(id_, email, name, password_hash, bool(is_disabled), created_at, updated_at)


class Store:
    """The SQLite database: one connection per thread, WAL, foreign keys on, and a busy timeout after
    which a write that other writers keep waiting fails with TemporarilyUnavailableError."""

    def __init__(self, path: Path, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._write_lock = threading.Lock()  # this process's waiting writers queue here; only its holder polls

    @property
    def _db(self) -> Database:
        db: Database | None = getattr(self._local, "db", None)
        if db is None:
            # A thread's reads wait for the busy timeout (the event loop's do not: see _write); in WAL mode
            # reads meet a lock only in rare moments, such as another process checkpointing as it closes.
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout)
            db = Database(conn, recursive_triggers=False, execute_plugins=False)
            db.execute("pragma foreign_keys = on")
            db.execute("pragma synchronous = normal")  # durable in WAL mode, fsyncs only at checkpoints
            self._local.db = db
            self._local.waits = True
        return db

    def _set_waits(self, conn: sqlite3.Connection, waits: bool) -> None:
        """Let SQLite wait for locks for the busy timeout, or not at all; a pragma only on a change."""
        if self._local.waits != waits:
            conn.execute(f"pragma busy_timeout = {int(self.busy_timeout * 1000) if waits else 0}")
            self._local.waits = waits

    @contextmanager
    def _write(self, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction that takes the database's write lock at once (BEGIN IMMEDIATE).

        Taking the lock up front means concurrent writers, in this or another process, wait for it
        instead of failing on a lock upgrade half way through. Waiting writers of this process queue on a
        thread lock first, so that only one of them polls SQLite. Without `wait`, a lock held by another
        writer raises WouldBlockError at once: for callers on the event loop, which must not sleep (they
        go straight to SQLite, past the queue), and whose thread's connection then never waits (so its
        reads do not either). Statements go straight to the sqlite3 connection: the transaction is ours,
        so sqlite-utils' own transaction handling around each statement would only cost time on the
        busiest path.

        Raises:
            WouldBlockError: without `wait`, another writer holds a lock; nothing was done.
            TemporarilyUnavailableError: the locks stayed taken for the whole busy timeout.
        """
        conn = self._db.conn
        if wait and not self._write_lock.acquire(timeout=self.busy_timeout):
            raise TemporarilyUnavailableError("the database is busy; try again")
        try:
            self._set_waits(conn, False)  # _begin_write waits for the write lock itself
            self._begin_write(conn, wait)
            try:
                yield conn
                conn.commit()
            except BaseException:
                conn.rollback()  # also when the commit failed: never keep the write lock
                raise
        finally:
            if wait:
                self._write_lock.release()
                self._set_waits(conn, True)

    def _begin_write(self, conn: sqlite3.Connection, wait: bool) -> None:
        """BEGIN IMMEDIATE, tried again while another process holds the lock, for up to the busy timeout.

        SQLite's own busy handler sleeps 1, 2, 5, 10, … 100 ms between tries, so that a writer waiting
        behind transactions of a tenth of a millisecond (another worker's refreshes) sleeps for far longer
        than the lock is held. This one tries again after 0.1 ms, doubling up to 2 ms.

        Raises:
            WouldBlockError: without `wait`, the lock is taken.
            TemporarilyUnavailableError: the lock stayed taken for the whole busy timeout.
        """
        deadline, delay = 0.0, WRITE_RETRY_FIRST_SECONDS
        while True:
            try:
                conn.execute("begin immediate")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if not wait:
                    raise WouldBlockError from exc
                now = time.monotonic()
                deadline = deadline or now + self.busy_timeout
                if now >= deadline:
                    raise TemporarilyUnavailableError("the database is busy; try again") from exc
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, WRITE_RETRY_MAX_SECONDS)

    def _read(self, sql: str, parameters: Sequence[object] = ()) -> list[Any]:
        """Every row of a query.

        Raises:
            TemporarilyUnavailableError: the database stayed locked (a connection that does not wait).
        """
        try:
            return self._db.conn.execute(sql, parameters).fetchall()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            raise TemporarilyUnavailableError("the database is busy; try again") from exc

    def migrate(self) -> None:
        """Create the database file if needed, switch it to WAL and apply the migrations it lacks.

        Raises:
            StoreError: the file cannot be opened or written, is not a database, or is from a newer version.
        """
        try:
            db = self._db
            db.execute("pragma journal_mode = wal")
            with self._write():
                version = int(db.execute("pragma user_version").fetchone()[0])
                if version > len(MIGRATIONS):
                    raise StoreError(f"database {self.path} has schema {version}, newer than this jwtauth knows")
                for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in statements:
                        db.execute(statement)
                    db.execute(f"pragma user_version = {number}")
        except (sqlite3.Error, TemporarilyUnavailableError) as exc:
            self.close()
            cause = exc.__cause__ if isinstance(exc, TemporarilyUnavailableError) else exc
            raise StoreError(f"cannot use database {self.path}: {cause}") from None

    def backup(self, target: Path) -> None:
        """Copy the database, consistent as of one instant, while others go on writing (SQLite's backup API).

        Raises:
            StoreError: the copy cannot be made or written.
        """
        own_files = {
            self.path.resolve(),
            *(self.path.resolve().with_name(self.path.name + x) for x in ("-wal", "-shm")),
        }
        if target.resolve() in own_files:
            raise StoreError(f"cannot back up {self.path} onto itself")
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            temporary.unlink(missing_ok=True)
            with contextlib.closing(sqlite3.connect(temporary)) as copy:
                self._db.conn.backup(copy)
            os.chmod(temporary, 0o600)  # it holds the password hashes
            os.replace(temporary, target)
        except (OSError, sqlite3.Error) as exc:
            temporary.unlink(missing_ok=True)
            raise StoreError(f"cannot back up {self.path} to {target}: {exc}") from None

    def check_integrity(self) -> list[str]:
        """Return the problems that SQLite's integrity and foreign-key checks find; none if it is sound."""
        try:
            db = self._db
            problems = [str(row[0]) for row in db.execute("pragma integrity_check").fetchall() if row[0] != "ok"]
            foreign = db.execute("pragma foreign_key_check").fetchall()
        except sqlite3.DatabaseError as exc:  # too damaged to check at all
            return [str(exc)]
        return problems + [f"foreign key broken: {row[0]} row {row[1]}" for row in foreign]

    def close(self) -> None:
        """Close this thread's connection, if it has one."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
            self._local.waits = True

    # Users

    def add_user(self, email: str, name: str, password_hash: str, now: int) -> User:
        """Insert a user with a new stable id.

        Raises:
            ConflictError: the email is taken (compared case-insensitively).
        """
        user = User(str(uuid.uuid4()), email, name, password_hash, False, now, now)
        try:
            with self._write() as db:
                db.execute(
                    f"insert into users ({_USER_COLUMNS}) values (?, ?, ?, ?, ?, ?, ?)",
                    [user.id, email, name, password_hash, 0, now, now],
                )
        except sqlite3.IntegrityError:
            raise ConflictError("a user with this email exists") from None
        return user

    def find_user_by_email(self, email: str) -> User | None:
        """Return the user with this email (case-insensitive), or None."""
        return _user(_first(self._read(f"select {_USER_COLUMNS} from users where email = ?", [email])))

    def find_user(self, user_id: str) -> User | None:
        """Return the user with this id, or None."""
        return _user(_first(self._read(f"select {_USER_COLUMNS} from users where id = ?", [user_id])))

    def list_users(self) -> list[User]:
        """Return every user, oldest first."""
        rows = self._read(f"select {_USER_COLUMNS} from users order by created_at, email")
        return [user for user in map(_user, rows) if user is not None]

    def set_password_hash(self, user_id: str, password_hash: str, now: int) -> None:
        """Store a new hash for the user (a changed password, or a re-hash with new parameters)."""
        with self._write() as db:
            db.execute(
                "update users set password_hash = ?, updated_at = ? where id = ?",
                [password_hash, now, user_id],
            )

    def set_user_disabled(self, user_id: str, is_disabled: bool, now: int) -> None:
        """Disable or enable the user."""
        with self._write() as db:
            db.execute(
                "update users set is_disabled = ?, updated_at = ? where id = ?",
                [int(is_disabled), now, user_id],
            )

    # Sessions and refresh tokens

    def start_session(
        self, session_id: str, family: str, user_id: str, token_hash: str, now: int, expires_at: int
    ) -> None:
        """Create a session (a refresh-token family) with its first refresh token."""
        with self._write() as db:
            db.execute(
                "insert into sessions (id, family, user_id, created_at) values (?, ?, ?, ?)",
                [session_id, family, user_id, now],
            )
            db.execute(
                "insert into refresh_tokens (session_id, token_hash, issued_at, expires_at) values (?, ?, ?, ?)",
                [session_id, token_hash, now, expires_at],
            )

    def rotate_refresh_token(
        self,
        family: str,
        token_hash: str,
        new_hash: str,
        now: int,
        expires_at: int,
        reuse_interval: int,
        wait: bool = True,
    ) -> Rotation:
        """Spend a refresh token of `family` and store its successor, or detect its reuse, in one transaction.

        BEGIN IMMEDIATE takes SQLite's write lock before the token is read, so concurrent refreshes of
        one token, from any thread or process, are decided one after another: exactly one finds it unspent.
        A session keeps one line of tokens: a rotation deletes the other unspent tokens (forks made within
        the reuse interval), spent ones out of the interval, and all but the newest MAX_SPENT_REFRESH_TOKENS
        spent ones (by spending time, then by generation: rotations since the login). A token that is not
        stored but names a live session's family was therefore spent or forked away: a reuse, which
        revokes the session, and that revocation is committed.

        Raises:
            WouldBlockError: without `wait`, another writer holds the lock; nothing was done.
            TemporarilyUnavailableError: the lock stayed taken for the whole busy timeout.
        """
        with self._write(wait) as db:
            row = db.execute(
                "select sessions.id, sessions.revoked_at, refresh_tokens.token_hash is not null,"
                " refresh_tokens.expires_at, refresh_tokens.used_at, refresh_tokens.generation,"
                f" {_USER_COLUMNS_OF_USERS}"
                " from sessions join users on users.id = sessions.user_id left join refresh_tokens"
                " on refresh_tokens.session_id = sessions.id and refresh_tokens.token_hash = ?"
                " where sessions.family = ?",
                [token_hash, family],
            ).fetchone()
            if row is None:
                return Rotation("invalid")
            session_id, revoked_at, stored, token_expires_at, used_at, generation = row[:6]
            user = _user(row[6:])
            if revoked_at is not None:
                return Rotation("invalid", user, session_id)
            if not stored:  # the family id is in this session's tokens only: whoever names it held one of them
                _revoke_sessions(db, "id = ?", [session_id], now)
                return Rotation("reuse_detected", user, session_id)
            if token_expires_at <= now or user is None or user.is_disabled:
                return Rotation("invalid", user, session_id)
            if used_at is None:
                db.execute(
                    "update refresh_tokens set used_at = ? where session_id = ? and token_hash = ?",
                    [now, session_id, token_hash],
                )
                db.execute(  # the session's few rows, in one place of the table
                    "delete from refresh_tokens where session_id = ?1 and token_hash != ?2 and (used_at is null"
                    " or used_at <= ?3 or token_hash not in (select token_hash from refresh_tokens"
                    " where session_id = ?1 and token_hash != ?2 and used_at is not null"
                    " order by used_at desc, generation desc limit ?4))",
                    [session_id, token_hash, now - reuse_interval, MAX_SPENT_REFRESH_TOKENS - 1],
                )
            elif now - used_at >= reuse_interval or _live_tokens(db, session_id) >= MAX_LIVE_REFRESH_TOKENS:
                _revoke_sessions(db, "id = ?", [session_id], now)
                return Rotation("reuse_detected", user, session_id)
            db.execute(
                "insert into refresh_tokens (session_id, token_hash, issued_at, expires_at, generation)"
                " values (?, ?, ?, ?, ?)",
                [session_id, new_hash, now, expires_at, generation + 1],
            )
            return Rotation("rotated" if used_at is None else "reused_within_interval", user, session_id)

    def find_refresh_session(self, family: str, token_hash: str) -> str | None:
        """Return the id of the session a refresh token belongs to (spent or not), or None."""
        row = _first(self._read(
            "select sessions.id from sessions join refresh_tokens on refresh_tokens.session_id = sessions.id"
            " where sessions.family = ? and refresh_tokens.token_hash = ?",
            [family, token_hash],
        ))  # fmt: skip
        return None if row is None else str(row[0])

    def revoke_session(self, session_id: str, now: int) -> int:
        """Revoke one session and delete its refresh tokens; return how many sessions this revoked (0 or 1)."""
        with self._write() as db:
            return _revoke_sessions(db, "id = ?", [session_id], now)

    def revoke_user_sessions(self, user_id: str, now: int) -> int:
        """Revoke every session of a user and delete their refresh tokens; return how many were revoked."""
        with self._write() as db:
            return _revoke_sessions(db, "user_id = ?", [user_id], now)

    def revoke_all_sessions(self, now: int) -> int:
        """Revoke every live session and delete every refresh token; return how many sessions were live."""
        with self._write() as db:
            return _revoke_sessions(db, "1 = 1", [], now)

    def delete_expired(self, now: int, revoked_before: int, attempts_before: int) -> tuple[int, int]:
        """Delete expired refresh tokens, then sessions revoked before `revoked_before` or left without
        any refresh token, and login-attempt windows opened before `attempts_before`; return the number
        of (tokens, sessions) deleted."""
        with self._write() as db:
            db.execute("delete from login_attempts where window_start <= ?", [attempts_before])
            tokens = db.execute("delete from refresh_tokens where expires_at <= ?", [now]).rowcount
            sessions = db.execute(
                "delete from sessions where revoked_at <= ? or (revoked_at is null and not exists"
                " (select 1 from refresh_tokens where refresh_tokens.session_id = sessions.id))",
                [revoked_before],
            ).rowcount
        return tokens, sessions

    def take_login_attempt(self, limits: dict[str, int], now: int, window: int) -> int | None:
        """Count one login attempt under each key, unless a key has reached its limit in the current window.

        The attempt is counted before the password is checked, in one write transaction, so that
        concurrent guesses from any number of workers never get more checks than the limit.
        Returns None if the attempt may go on, else the seconds until the earliest window that blocks it ends.
        """
        with self._write() as db:
            rows = {
                key: db.execute("select window_start, attempts from login_attempts where key = ?", [key]).fetchone()
                for key in limits
            }
            live = {key: row for key, row in rows.items() if row is not None and row[0] + window > now}
            blocked = [int(row[0]) + window - now for key, row in live.items() if row[1] >= limits[key]]
            if blocked:
                return max(blocked)
            for key in limits:
                start, attempts = live.get(key, (now, 0))
                db.execute(
                    "insert or replace into login_attempts (key, window_start, attempts) values (?, ?, ?)",
                    [key, start, attempts + 1],
                )
        return None

    def forgive_login_attempt(self, reset: str, release: str) -> None:
        """After a successful login: clear the count under `reset`, take back one attempt under `release`."""
        with self._write() as db:
            db.execute("delete from login_attempts where key = ?", [reset])
            db.execute("update login_attempts set attempts = max(attempts - 1, 0) where key = ?", [release])

    def count_live_sessions(self, now: int) -> int:
        """Return the number of sessions not revoked that hold an unexpired refresh token."""
        rows = self._read(
            "select count(*) from sessions where revoked_at is null and exists (select 1 from refresh_tokens"
            " where refresh_tokens.session_id = sessions.id and refresh_tokens.expires_at > ?)",
            [now],
        )
        return int(rows[0][0])

    def find_session_user(self, session_id: str) -> User | None:
        """Return the user of a session that exists and is not revoked, if that user is not disabled."""
        return _user(_first(self._read(
            f"select {_USER_COLUMNS_OF_USERS} from sessions join users on users.id = sessions.user_id"
            " where sessions.id = ? and sessions.revoked_at is null and users.is_disabled = 0",
            [session_id],
        )))  # fmt: skip

    def is_usable(self) -> bool:
        """Return whether the database answers a query on the users table."""
        try:
            self._db.execute("select count(*) from users").fetchone()
        except sqlite3.Error:
            return False
        return True


def _first(rows: list[Any]) -> Any:
    return rows[0] if rows else None


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite answered SQLITE_BUSY (or one of its extended codes): another connection holds a lock."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def _live_tokens(db: sqlite3.Connection, session_id: str) -> int:
    return int(db.execute(
        "select count(*) from refresh_tokens where session_id = ? and used_at is null", [session_id]
    ).fetchone()[0])  # fmt: skip


def _revoke_sessions(db: sqlite3.Connection, where: str, params: list[object], now: int) -> int:
    """Mark the matching live sessions revoked and delete their refresh tokens, inside the caller's transaction;
    return how many sessions that revoked."""
    live = f"select id from sessions where revoked_at is null and {where}"
    db.execute(f"delete from refresh_tokens where session_id in ({live})", params)
    return db.execute(f"update sessions set revoked_at = ? where id in ({live})", [now, *params]).rowcount

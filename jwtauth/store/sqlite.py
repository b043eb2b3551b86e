"""The SQLite backend: every SQL statement for one machine's database file.

WAL mode; one connection per thread; a write takes the write lock up front (BEGIN IMMEDIATE), so concurrent
writers in any process wait for it instead of failing half way; a write that other writers keep waiting for
longer than the busy timeout fails with StoreUnavailableError. A rotation reads its session outside the write
transaction and saves in one of a single UPDATE (store.rotate_optimistically).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio

from jwtauth.emails import email_problems, normalised_spellings
from jwtauth.errors import ConflictError, StoreError, StoreUnavailableError
from jwtauth.keys import FileKeyRepository, KeyRepository
from jwtauth.sessions import Decision, SessionState, User
from jwtauth.store import (
    SELECT_SESSION,
    USER_COLUMNS,
    USER_FIELDS,
    Decide,
    Snapshot,
    encode_spent,
    rotate_optimistically,
    session_of,
    user_of,
)

T = TypeVar("T")


def _normalise_emails(conn: sqlite3.Connection) -> None:
    """Schema 6: every email in its normalised form (emails.normalise_email: NFKC and case folding, where it
    used to be only lower case). Accounts that become one address are left as they were, never merged:
    `jwtauth db check` names them, for an operator to resolve."""
    spellings = normalised_spellings(row[0] for row in conn.execute("select email from users"))
    conn.executemany(
        "update users set email = ? where email = ?",
        [
            (normalised, stored[0])
            for normalised, stored in spellings.items()
            if len(stored) == 1 and stored[0] != normalised
        ],
    )


# Each entry moves the schema one version up; PRAGMA user_version records how far a database has come. A step
# is a statement, or a function of the connection for what SQL alone cannot do.
MIGRATIONS: tuple[tuple[str | Callable[[sqlite3.Connection], None], ...], ...] = (
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
        # Refresh tokens clustered by session. A session from before families, whose tokens name none, ends.
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
    (
        # One row per session, whatever the number of rotations: the live token's hash and generation, and
        # the spent tokens of the reuse interval with their successors sealed (sessions.decide_rotation).
        # A session's live token from schema 4 (its newest unspent one) goes on working; its spent tokens
        # and forks are forgotten. Times become real numbers: the reuse interval is measured below a second.
        """create table sessions_v5 (
            id text primary key,
            family text not null unique,
            user_id text not null references users(id) on delete cascade,
            created_at real not null,
            revoked_at real,
            generation integer not null,  -- of the live token
            token_hash text not null,  -- SHA-256 of the live token, never the token itself
            expires_at real not null,  -- of the live token
            spent blob not null default x'',  -- store.encode_spent: generation, spent_at, sealed successor
            legacy_hash text  -- SHA-256 of its token from schema 4 (no generation): its reuse is still recognised
        )""",
        """insert into sessions_v5
            (id, family, user_id, created_at, revoked_at, generation, token_hash, expires_at, legacy_hash)
            select sessions.id, family, user_id, created_at, revoked_at, 0, token_hash, expires_at, token_hash
            from sessions join refresh_tokens on refresh_tokens.session_id = sessions.id
            where token_hash = (select token_hash from refresh_tokens as newest where newest.session_id = sessions.id
                and newest.used_at is null order by newest.generation desc, newest.issued_at desc limit 1)""",
        "drop table refresh_tokens",
        "drop table sessions",
        "alter table sessions_v5 rename to sessions",
        "create index sessions_by_user on sessions(user_id, created_at)",
        "create index sessions_by_expiry on sessions(expires_at)",
        "alter table users add column last_login_key text",  # the throttle key of the last login's address
    ),
    (_normalise_emails,),
    (
        # The session cap at each login looks only at the user's live sessions, the ones this index holds:
        # revoked ones stay in the table until the sweep, and a user past the cap leaves one at each login.
        "create index sessions_live_by_user on sessions(user_id, created_at, expires_at) where revoked_at is null",
    ),
    (
        # A rotation changes a session's expires_at: no index holds it, so that a rotation writes the table
        # alone. The sweep scans anyway (its condition is an OR), and the cap reads the few live sessions of one
        # user from the table.
        "drop index sessions_by_expiry",
        "drop index sessions_live_by_user",
        "create index sessions_live_by_user on sessions(user_id, created_at) where revoked_at is null",
    ),
)
SAVE_ROTATION = (  # if no other rotation or revocation saved since the session was read (rotate_optimistically)
    "update sessions set generation = ?, token_hash = ?, expires_at = ?, spent = ?"
    " where id = ? and generation = ? and revoked_at is null"
)
SAVE_REVOCATION = "update sessions set revoked_at = ?, spent = x'' where id = ? and revoked_at is null"
WRITE_RETRY_FIRST_SECONDS, WRITE_RETRY_MAX_SECONDS = 0.0001, 0.002  # between tries for another process's lock
SWEEP_BATCH = 500  # rows deleted per transaction by the sweep, so that writers never wait long behind it


class _WouldBlock(Exception):  # an internal signal: never leaves this module
    """A lock is taken and the caller (on the event loop) must not wait: SqliteStore.run tries in a thread."""


class SqliteStore:
    """The SQLite database: one connection per thread, WAL, foreign keys on, files of mode 0600."""

    def __init__(self, path: Path, keys_dir: Path, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.keys_dir = keys_dir
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._write_lock = threading.Lock()  # this process's waiting writers queue here; only its holder polls

    # Connections and transactions

    @property
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if not self.path.exists():  # SQLite gives the -wal and -shm files the database file's mode
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            # Set up with SQLite's busy handler on (the first statement reads the schema, which a process that
            # creates or recovers the database may hold locked), then off: it sleeps 1, 2, 5, 10, … 100 ms
            # between tries, so that a statement waiting behind transactions of a tenth of a millisecond
            # (another worker's logins and refreshes) would sleep far longer than the lock is held.
            # _retry_while_busy waits instead.
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.execute("pragma foreign_keys = on")
            conn.execute("pragma synchronous = normal")  # durable in WAL mode, fsyncs only at checkpoints
            conn.execute("pragma busy_timeout = 0")
            self._local.conn = conn
        return conn

    @property
    def _inline(self) -> bool:
        """Whether this thread is the event loop trying work inline (run), which must never wait for a lock."""
        return bool(getattr(self._local, "inline", False))

    def _retry_while_busy(self, statement: Callable[[], T]) -> T:
        """Run `statement`; while another connection holds the lock it needs, try again after 0.1 ms, doubling
        up to 2 ms, for up to the busy timeout. On the event loop (run) nothing waits: _WouldBlock at once.

        Raises:
            StoreUnavailableError: the lock stayed taken for the whole busy timeout.
        """
        pauses = _pauses(self.busy_timeout)
        while True:
            try:
                return statement()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if self._inline:
                    raise _WouldBlock from exc
                pause = next(pauses, None)
                if pause is None:
                    raise StoreUnavailableError("the database is busy") from exc
            time.sleep(pause)

    @contextmanager
    def _waiting(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection with SQLite's busy handler on for the busy timeout, for what runs seldom
        and may meet a lock anywhere (switching to WAL, checking, backing up)."""
        conn = self._conn
        conn.execute(f"pragma busy_timeout = {int(self.busy_timeout * 1000)}")
        try:
            yield conn
        finally:
            conn.execute("pragma busy_timeout = 0")

    async def run(self, work: Callable[[], T]) -> T:
        """Do `work` on the event loop, never waiting there for a lock (a rotation is shorter than a hop to a
        thread). While another process holds the write lock, try again after a pause in which the loop serves
        other requests: 0.1 ms, doubling up to 2 ms, for up to the busy timeout. No thread: with several
        workers the lock is often taken for a moment, and a thread per such request cost more than its wait.

        Raises:
            StoreUnavailableError: the lock stayed taken for the whole busy timeout.
        """
        pauses = _pauses(self.busy_timeout)
        while True:
            self._local.inline = True
            try:
                return work()
            except _WouldBlock:
                pass
            finally:
                self._local.inline = False
            pause = next(pauses, None)
            if pause is None:
                raise StoreUnavailableError("the database is busy")
            await anyio.sleep(pause)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that takes the database's write lock at once (BEGIN IMMEDIATE), its
        statements then meeting no lock.

        Waiting writers of this process queue on a thread lock first, so that only one of them polls
        SQLite. On the event loop (run) nothing waits: a lock held by another writer raises _WouldBlock.

        Raises:
            StoreUnavailableError: the locks stayed taken for the whole busy timeout.
        """
        conn, wait = self._conn, not self._inline
        if wait and not self._write_lock.acquire(timeout=self.busy_timeout):
            raise StoreUnavailableError("the database is busy")
        try:
            self._retry_while_busy(lambda: conn.execute("begin immediate"))
            try:
                yield conn
                conn.execute("commit")
            except BaseException:
                conn.rollback()  # also when the commit failed: never keep the write lock
                raise
        finally:
            if wait:
                self._write_lock.release()

    def _write_one(self, sql: str, parameters: Sequence[object]) -> int:
        """One statement as a write transaction of its own; the number of rows it changed. On the event loop,
        SQLite's implicit transaction around the statement (two statements fewer than BEGIN and COMMIT); in a
        thread, _write's.

        Raises:
            StoreUnavailableError: the locks stayed taken for the whole busy timeout.
        """
        if not self._inline:
            with self._write() as conn:
                return conn.execute(sql, parameters).rowcount
        return self._execute(sql, parameters).rowcount

    def _read(self, sql: str, parameters: Sequence[object] = ()) -> list[Any]:
        """Every row of a query.

        Raises:
            StoreUnavailableError: the database stayed locked for the busy timeout.
        """
        return self._execute(sql, parameters).fetchall()

    def _execute(self, sql: str, parameters: Sequence[object]) -> sqlite3.Cursor:
        """One statement outside any transaction of ours (_retry_while_busy). In WAL mode a read meets a lock
        only in rare moments, such as another process checkpointing as it closes.

        Raises:
            StoreUnavailableError: the database stayed locked for the busy timeout.
        """
        conn = self._conn
        return self._retry_while_busy(lambda: conn.execute(sql, parameters))

    # The database as a whole

    def migrate(self) -> None:
        try:
            for suffix in ("", "-wal", "-shm"):  # a database made by an older jwtauth may be readable by all
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{self.path}{suffix}", 0o600)
            with self._waiting() as conn:  # SQLite skips its busy handler where waiting could deadlock: retried
                self._retry_while_busy(lambda: conn.execute("pragma journal_mode = wal"))
            with self._write() as conn:
                version = int(conn.execute("pragma user_version").fetchone()[0])
                if version > len(MIGRATIONS):
                    raise StoreError(f"database {self.path} has schema {version}, newer than this jwtauth knows")
                for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in statements:
                        statement(conn) if callable(statement) else conn.execute(statement)
                    conn.execute(f"pragma user_version = {number}")
        except (sqlite3.Error, OSError, StoreUnavailableError) as exc:
            self.close()
            cause = exc.__cause__ if isinstance(exc, StoreUnavailableError) else exc
            raise StoreError(f"cannot use database {self.path}: {cause}") from None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def is_usable(self) -> bool:
        try:
            self._read("select 1 from users limit 1")
        except (sqlite3.Error, StoreUnavailableError):
            return False
        return True

    def check(self) -> list[str]:
        """SQLite's integrity and foreign-key checks, and the stored emails (emails.email_problems)."""
        if not self.path.exists():
            raise StoreError(f"no database at {self.path}")
        try:
            with self._waiting() as conn:
                problems = [str(row[0]) for row in conn.execute("pragma integrity_check").fetchall() if row[0] != "ok"]
                foreign = conn.execute("pragma foreign_key_check").fetchall()
                emails = email_problems(row[0] for row in conn.execute("select email from users"))
        except sqlite3.DatabaseError as exc:  # too damaged to check at all
            return [str(exc)]
        return problems + [f"foreign key broken: {row[0]} row {row[1]}" for row in foreign] + emails

    def backup(self, target: Path) -> None:
        """SQLite's backup API: consistent as of one instant, written 0600."""
        if not self.path.exists():
            raise StoreError(f"no database at {self.path}")
        own_files = {
            self.path.resolve(),
            *(self.path.resolve().with_name(self.path.name + x) for x in ("-wal", "-shm")),
        }
        if target.resolve() in own_files:
            raise StoreError(f"cannot back up {self.path} onto itself")
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            temporary.unlink(missing_ok=True)
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # it holds the password hashes
            with contextlib.closing(sqlite3.connect(temporary)) as copy, self._waiting() as conn:
                conn.backup(copy)
            os.replace(temporary, target)
        except (OSError, sqlite3.Error) as exc:
            temporary.unlink(missing_ok=True)
            raise StoreError(f"cannot back up {self.path} to {target}: {exc}") from None

    def key_repository(self) -> KeyRepository:
        return FileKeyRepository(self.keys_dir)

    # Users

    def add_user(self, email: str, name: str, password_hash: str, now: int) -> User:
        user = User(str(uuid.uuid4()), email, name, password_hash, False, now, now)
        try:
            with self._write() as conn:
                conn.execute(
                    "insert into users (id, email, name, password_hash, is_disabled, created_at, updated_at)"
                    " values (?, ?, ?, ?, 0, ?, ?)",
                    [user.id, email, name, password_hash, now, now],
                )
        except sqlite3.IntegrityError:
            raise ConflictError("a user with this email exists") from None
        return user

    def find_user_by_email(self, email: str) -> User | None:
        return user_of(_first(self._read(f"select {USER_COLUMNS} from users where email = ?", [email])))

    def find_user(self, user_id: str) -> User | None:
        return user_of(_first(self._read(f"select {USER_COLUMNS} from users where id = ?", [user_id])))

    def list_users(self) -> list[User]:
        rows = self._read(f"select {USER_COLUMNS} from users order by created_at, email")
        return [user for user in map(user_of, rows) if user is not None]

    def set_password_hash(self, user_id: str, password_hash: str, now: int) -> None:
        with self._write() as conn:
            conn.execute(
                "update users set password_hash = ?, updated_at = ? where id = ?", [password_hash, now, user_id]
            )

    def set_user_disabled(self, user_id: str, is_disabled: bool, now: int) -> None:
        with self._write() as conn:
            conn.execute(
                "update users set is_disabled = ?, updated_at = ? where id = ?", [int(is_disabled), now, user_id]
            )

    # Sessions

    def start_session(
        self, session: SessionState, max_sessions: int, address_key: str, reset: str, release: Sequence[str]
    ) -> int:
        with self._write() as conn:
            new = _insert_session(conn, session)
            conn.execute(  # a row left as it is is not written: the usual login is from the last one's address
                "update users set last_login_key = ?1 where id = ?2 and last_login_key is not ?1",
                [address_key, session.user.id],
            )
            # The new session is the newest whatever its created_at (another login may bear the same time):
            # it is kept, and of the others the newest max_sessions - 1. By rowid, which the index holds, so that
            # the UPDATE finds the rows it ends without a lookup in the index of ids.
            ended = conn.execute(
                "update sessions set revoked_at = ?1 where rowid in (select rowid from sessions where user_id = ?2"
                " and rowid != ?4 and revoked_at is null and expires_at > ?1 order by created_at desc"
                " limit -1 offset ?3)",
                [session.created_at, session.user.id, max_sessions - 1, new],
            ).rowcount
            conn.execute("delete from login_attempts where key = ?", [reset])
            conn.executemany(
                "update login_attempts set attempts = max(attempts - 1, 0) where key = ?", [[key] for key in release]
            )
            return ended

    def rotate(self, family: str, decide: Decide) -> Decision:
        """rotate_optimistically: the session read, then saved in a write transaction of one UPDATE, so that
        the write lock is held for that statement, not while the rule runs. On the event loop, a write lock
        held by another process means reading and deciding again after the pause (run)."""

        def save_rotation(state: SessionState, generation: int) -> bool:
            columns = [state.generation, state.token_hash, state.expires_at, encode_spent(state.spent)]
            return self._write_one(SAVE_ROTATION, [*columns, state.id, generation]) == 1

        def save_revocation(state: SessionState) -> None:
            self._write_one(SAVE_REVOCATION, [state.revoked_at, state.id])

        return rotate_optimistically(lambda: self.find_session(family), decide, save_rotation, save_revocation)

    async def rotate_async(self, family: str, decide: Decide) -> Decision:
        """rotate, as run runs it: on the event loop, where a rotation costs less than a round trip would."""
        return await self.run(functools.partial(self.rotate, family, decide))

    def find_session(self, family: str) -> SessionState | None:
        return session_of(_first(self._read(SELECT_SESSION + " where family = ?", [family])))

    def revoke_session(self, session_id: str, now: float) -> int:
        return self._revoke("id = ?", [session_id], now)

    def revoke_user_sessions(self, user_id: str, now: float) -> int:
        return self._revoke("user_id = ?", [user_id], now)

    def revoke_all_sessions(self, now: float) -> int:
        return self._revoke("1 = 1", [], now)

    def _revoke(self, where: str, parameters: list[object], now: float) -> int:
        with self._write() as conn:
            return conn.execute(
                f"update sessions set revoked_at = ?, spent = x'' where revoked_at is null and {where}",
                [now, *parameters],
            ).rowcount

    def find_session_user(self, session_id: str) -> User | None:
        return user_of(_first(self._read(
            f"select {USER_COLUMNS} from sessions join users on users.id = sessions.user_id"
            " where sessions.id = ? and sessions.revoked_at is null and users.is_disabled = 0",
            [session_id],
        )))  # fmt: skip

    def count_live_sessions(self, now: float) -> int:
        rows = self._read("select count(*) from sessions where expires_at > ? and revoked_at is null", [now])
        return int(rows[0][0])

    def delete_expired(self, now: float, revoked_before: float, attempts_before: int) -> int:
        deleted = 0
        while True:
            with self._write() as conn:
                conn.execute(
                    "delete from login_attempts where key in"
                    " (select key from login_attempts where window_start <= ? limit ?)",
                    [attempts_before, SWEEP_BATCH],
                )
                count = conn.execute(
                    "delete from sessions where id in (select id from sessions where expires_at <= ?"
                    " or revoked_at <= ? limit ?)",
                    [now, revoked_before, SWEEP_BATCH],
                ).rowcount
            deleted += count
            if count < SWEEP_BATCH:
                return deleted

    # Throttling

    def take_login_attempt(self, limits: dict[str, int], now: int, window: int) -> int | None:
        """Counted before the password is checked, in one write transaction."""
        keys = list(limits)
        with self._write() as conn:
            rows = conn.execute(
                f"select key, window_start, attempts from login_attempts where key in ({', '.join('?' * len(keys))})",
                keys,
            ).fetchall()
            live = {key: (start, attempts) for key, start, attempts in rows if start + window > now}
            blocked = [int(start) + window - now for key, (start, attempts) in live.items() if attempts >= limits[key]]
            if blocked:
                return max(blocked)
            conn.executemany(
                "insert or replace into login_attempts (key, window_start, attempts) values (?, ?, ?)",
                [(key, *_counted(live.get(key), now)) for key in keys],
            )
        return None

    # Moving a deployment

    def export(self, now: float) -> Snapshot:
        users = self.list_users()
        rows = self._read(
            f"{SELECT_SESSION} where sessions.revoked_at is null and sessions.expires_at > ?"
            " order by sessions.created_at",
            [now],
        )
        return Snapshot(users, [session for session in map(session_of, rows) if session is not None])

    def import_(self, snapshot: Snapshot) -> None:
        """The keys go to the keys directory, which must hold none yet, under its lock; then the rows."""
        repository = FileKeyRepository(self.keys_dir)
        with repository.change() as keys, self._write() as conn:
            has_data = conn.execute("select exists (select 1 from users) or exists (select 1 from sessions)")
            if has_data.fetchone()[0] or keys.read() is not None:
                raise StoreError(f"database {self.path} or keys directory {self.keys_dir} already holds jwtauth data")
            if snapshot.keys is not None:
                keys.write(snapshot.keys)
            conn.executemany(
                f"insert into users ({', '.join(USER_FIELDS)}) values (?, ?, ?, ?, ?, ?, ?, ?)",
                [[u.id, u.email, u.name, u.password_hash, int(u.is_disabled), u.created_at, u.updated_at,
                  u.last_login_key] for u in snapshot.users],
            )  # fmt: skip
            for session in snapshot.sessions:
                _insert_session(conn, session)


def _insert_session(conn: sqlite3.Connection, session: SessionState) -> int:
    """Insert the session's row; its rowid."""
    cursor = conn.execute(
        "insert into sessions (id, family, user_id, created_at, generation, token_hash, expires_at, spent,"
        " legacy_hash) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [session.id, session.family, session.user.id, session.created_at, session.generation, session.token_hash,
         session.expires_at, encode_spent(session.spent), session.legacy_hash],
    )  # fmt: skip
    return cursor.lastrowid or 0


def _counted(row: tuple[int, int] | None, now: int) -> tuple[int, int]:
    """A key's window start and count with one more attempt: in its live window, else in one from now."""
    start, attempts = row if row is not None else (now, 0)
    return start, attempts + 1


def _pauses(busy_timeout: float) -> Iterator[float]:
    """The pauses between tries for a lock that another connection holds: 0.1 ms, doubling up to 2 ms, until
    the busy timeout has passed since the first was asked for."""
    deadline, delay = time.monotonic() + busy_timeout, WRITE_RETRY_FIRST_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        yield min(delay, left)
        delay = min(delay * 2, WRITE_RETRY_MAX_SECONDS)


def _first(rows: list[Any]) -> Any:
    return rows[0] if rows else None


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite answered SQLITE_BUSY (or one of its extended codes): another connection holds a lock."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY

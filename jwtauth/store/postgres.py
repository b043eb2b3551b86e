"""The PostgreSQL backend: every SQL statement for a database that many jwtauth processes, on any number of
machines, share (psycopg 3 with psycopg_pool; the store is synchronous and runs in worker threads).

- A rotation reads its session, decides, and saves with an UPDATE that takes the session's row lock and
  saves only if no other rotation did since the read (store.rotate_optimistically), under a lock_timeout
  local to the statement: of concurrent refreshes of one session, from any node, one saves and the others
  decide again on what it saved; a wait past the busy timeout ends in StoreUnavailableError (503), never in
  two winners. The refreshes a worker finds ready at once are read in one SELECT and saved in one UPDATE
  (rotate_async, store.rotate_together).
- Login counters are counted by INSERT … ON CONFLICT DO UPDATE, all or none in one transaction.
- The sweep deletes ended sessions a small batch at a time, FOR UPDATE SKIP LOCKED, so nodes that sweep
  at once share the work instead of waiting for each other.
- Schema changes and key changes are made under transaction-scoped advisory locks.
- The signing keys and the refresh secret live in the database as encrypted PKCS#8 PEM (PostgresKeyRepository).
"""

from __future__ import annotations

import asyncio
import functools
import os
import select
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import psycopg
import psycopg.errors
from psycopg import Connection, Cursor
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from jwtauth.config import Settings
from jwtauth.emails import email_problems
from jwtauth.errors import ConfigError, ConflictError, KeyStoreError, StoreError, StoreUnavailableError
from jwtauth.keys import REFRESH_SECRET, KeyChange, KeyEntry, KeyRepository, StoredKeys
from jwtauth.rounds import Ask, Rounds
from jwtauth.sessions import Decision, SessionState, User
from jwtauth.store import (
    SELECT_SESSION,
    USER_COLUMNS,
    USER_FIELDS,
    Decide,
    Snapshot,
    describe_database,
    encode_spent,
    rotate_optimistically,
    rotate_together,
    session_of,
    user_of,
)

T = TypeVar("T")
Row = tuple[Any, ...]

SCHEMA_LOCK, KEYS_LOCK = 0x6A77_7461_7501, 0x6A77_7461_7502  # advisory lock ids: "jwtau" + 1, 2
# Each step moves the schema one version up, in its own transaction; jwtauth_schema records the version.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """create table users (
            id text primary key,
            email text not null unique,  -- stored normalised
            name text not null default '',
            password_hash text not null,
            is_disabled boolean not null default false,
            created_at bigint not null,
            updated_at bigint not null,
            last_login_key text  -- the throttle key of the address of the last successful login
        )""",
        # One row per session, whatever the number of rotations (sessions.decide_rotation).
        """create table sessions (
            id text primary key,
            family text not null unique,
            user_id text not null references users(id) on delete cascade,
            created_at double precision not null,
            revoked_at double precision,
            generation bigint not null,  -- of the live token
            token_hash text not null,  -- SHA-256 of the live token, never the token itself
            expires_at double precision not null,  -- of the live token
            spent bytea not null default '',  -- store.encode_spent: generation, spent_at, sealed successor
            legacy_hash text  -- SHA-256 of its token from before generations (moved here from SQLite)
        )""",
        "create index sessions_by_user on sessions(user_id, created_at)",
        "create index sessions_by_expiry on sessions(expires_at)",
        # Login attempts per key (SHA-256 of email and address, of the address, of the email), in fixed windows.
        """create table login_attempts (
            key text primary key,
            window_start bigint not null,
            attempts integer not null
        )""",
        # The key set: PKCS#8 PEMs encrypted with JWTAUTH_KEYS_PASSPHRASE; `version` changes with every change.
        """create table signing_keys (
            kid text primary key,
            state text not null check (state in ('next', 'current', 'retired')),
            size integer not null,
            created_at bigint not null,
            activated_at bigint,
            retired_at bigint,
            pem text not null
        )""",
        """create table key_set (
            id integer primary key check (id = 1),
            version bigint not null,
            refresh_secret text
        )""",
        "insert into key_set (id, version) values (1, 0)",
    ),
    (
        # The session cap at each login looks only at the user's live sessions, the ones this index holds:
        # revoked ones stay in the table until the sweep, and a user past the cap leaves one at each login.
        "create index sessions_live_by_user on sessions(user_id, created_at, expires_at) where revoked_at is null",
    ),
    (
        # A rotation changes a session's generation, token and expires_at, and nothing that an index holds: the
        # update is HOT (heap-only: no index entries to add, less WAL), given room on the row's page.
        "drop index sessions_by_expiry",
        "drop index sessions_live_by_user",
        "create index sessions_live_by_user on sessions(user_id, created_at) where revoked_at is null",
        "alter table sessions set (fillfactor = 80)",
    ),
)
SWEEP_BATCH = 500  # sessions deleted per transaction
TCP_DEFAULTS: dict[str, str | int] = {  # unless the URL says otherwise
    "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 15_000, "application_name": "jwtauth",
}  # fmt: skip
IDLE_IN_TRANSACTION_MS = 30_000  # a transaction left open by a node that stopped mid-way ends, and its locks
# Joined in the FROM of an UPDATE in autocommit, bounds its wait for the row lock by the busy timeout (the
# parameter, in ms): set_config runs before the row is locked, and `true` keeps the setting to the statement's
# own implicit transaction, so behind PgBouncer in transaction mode too.
LOCK_TIMEOUT = "(select set_config('lock_timeout', %s, true)) as statement_settings"
FIND_SESSION = f"{SELECT_SESSION} where family = %s"
SAVE_ROTATION = (  # if no other rotation or revocation saved since the session was read
    "update sessions set generation = %s, token_hash = %s, expires_at = %s, spent = %s"
    f" from {LOCK_TIMEOUT} where id = %s and generation = %s and revoked_at is null"
)
FIND_SESSIONS = f"{SELECT_SESSION} where family = any(%s)"
SAVE_ROTATIONS = (  # each if no other rotation or revocation saved since its session was read; says which did
    "update sessions set generation = saved.generation, token_hash = saved.token_hash,"
    " expires_at = saved.expires_at, spent = saved.spent"
    f" from {LOCK_TIMEOUT}, unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::float8[], %s::bytea[])"
    " as saved(id, read_generation, generation, token_hash, expires_at, spent)"
    " where sessions.id = saved.id and sessions.generation = saved.read_generation and sessions.revoked_at is null"
    " returning sessions.id"
)
SAVE_REVOCATION = (
    f"update sessions set revoked_at = %s, spent = '' from {LOCK_TIMEOUT} where id = %s and revoked_at is null"
)
CONNECTION_WAIT_SECONDS = 2.0  # how long a request waits for a pooled connection (all busy, or being made)
FAIL_FAST_SECONDS = 0.2  # how long it waits while the database is known to be down

_KEY_COLUMNS = "kid, state, size, created_at, activated_at, retired_at"


class PostgresStore:
    """A PostgreSQL database shared by any number of processes; a pool of connections per process."""

    def __init__(self, settings: Settings) -> None:
        """Raises:
        ConfigError: JWTAUTH_KEYS_PASSPHRASE is not set (the keys live in the database, encrypted)."""
        if not settings.keys_passphrase:
            raise ConfigError("JWTAUTH_KEYS_PASSPHRASE must be set with PostgreSQL: the keys are stored encrypted")
        self.url = settings.database
        self.busy_timeout = settings.db_busy_timeout
        self.conninfo = conninfo = _conninfo(settings.database)
        self.description = describe_database(settings.database)  # for messages: never the password
        self.pool: ConnectionPool[Connection[Row]] = ConnectionPool(
            conninfo,
            kwargs={"autocommit": True, "prepare_threshold": 5 if settings.db_prepared_statements else None},
            min_size=1,
            max_size=settings.db_pool_size,
            open=False,
            check=_check_alive,
            timeout=min(settings.db_busy_timeout, CONNECTION_WAIT_SECONDS),
            reconnect_timeout=1.0,  # give up soon: the next request asks for a connection at once
            reconnect_failed=self._mark_down,
            name="jwtauth",
        )
        # lock_timeout 0 would wait for ever: a busy timeout of 0 means as short as can be
        self._lock_timeout = str(max(1, int(self.busy_timeout * 1000)))
        self._begin = (
            f"begin; set local lock_timeout = {self._lock_timeout};"
            f" set local idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}"
        )
        # In a worker that keeps to one CPU (server.take_cpu), all its threads share that CPU: threads waiting
        # for a pooled connection would only contend for the GIL there: under load, the slowest refreshes took
        # up to 2 s. Calls beyond the pool's connections wait on the event loop instead, in turn. Elsewhere
        # they wait in threads, where a returned connection goes at once to a thread that is ready (10 % more
        # refreshes with one worker).
        self._threads = settings.db_pool_size if settings.cpu_slots else None
        self._limiter: anyio.CapacityLimiter | None = None  # made at first use, in the event loop
        self._opened = False
        self._open_lock = threading.Lock()
        self._is_down = False  # the pool could not connect: requests do not wait long until one gets through
        self._rotations: Rounds[tuple[str, Decide], Decision] = Rounds(self._start_rotations)
        self._rotating: set[asyncio.Task[None]] = set()  # the rounds of rotations under way

    # Connections and transactions

    def _open(self) -> None:
        """Open the pool at first use, after one connection of its own: a database that cannot be reached
        then fails at once with libpq's reason, instead of after the pool's timeout.

        Raises:
            StoreUnavailableError: the database cannot be reached.
        """
        if self._opened:
            return
        with self._open_lock:
            if not self._opened:
                try:
                    psycopg.connect(self.conninfo).close()
                except psycopg.OperationalError as exc:
                    raise StoreUnavailableError(f"{self.description}: {_first_line(exc)}") from exc
                self.pool.open(wait=False)
                self._opened = True

    @contextmanager
    def _connection(self) -> Iterator[Connection[Row]]:
        """A pooled connection in autocommit mode.

        Raises:
            StoreUnavailableError: no connection within the timeout, or the connection broke.
        """
        self._open()
        timeout = FAIL_FAST_SECONDS if self._is_down else None  # None: the pool's own
        try:
            with self.pool.connection(timeout=timeout) as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailableError(f"{self.description}: {exc}") from exc
        except psycopg.Error as exc:
            if not _is_transient(exc):
                raise
            raise StoreUnavailableError(f"{self.description}: {_first_line(exc)}") from exc
        self._is_down = False

    def _mark_down(self, pool: object) -> None:
        """The pool's reconnect_failed: until a request gets through again, requests do not wait long."""
        self._is_down = True

    @contextmanager
    def _transaction(self) -> Iterator[Cursor[Row]]:
        """One transaction, its statements through one cursor. A wait for a lock (a row, an advisory lock)
        longer than the busy timeout ends it with StoreUnavailableError. BEGIN and the SET LOCALs go to the
        server as one simple query: a round trip and a statement fewer than psycopg's Connection.transaction()
        followed by the SETs, on every rotation. SET LOCAL, not a session-wide setting, since PgBouncer in
        transaction mode keeps it to this transaction. On an error the transaction is rolled back before the
        connection serves again."""
        with self._connection() as conn:
            cursor = conn.cursor()
            cursor.execute(self._begin)
            try:
                yield cursor
            except BaseException:
                conn.rollback()
                raise
            cursor.execute("commit")

    def _read(self, sql: str, parameters: Sequence[object] = ()) -> list[Row]:
        with self._connection() as conn:
            return conn.cursor().execute(sql, parameters).fetchall()

    async def run(self, work: Callable[[], T]) -> T:
        """Every database call waits on the network: in a worker thread, at most one per pooled connection in
        a worker that keeps to one CPU."""
        if self._threads is None:
            return await anyio.to_thread.run_sync(work)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._threads)
        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    # The database as a whole

    def migrate(self) -> None:
        """Each step in its own transaction, under an advisory lock: of nodes that start at once on an empty
        database, one creates the schema and the others find it made."""
        try:
            for number, statements in enumerate(MIGRATIONS, start=1):
                with self._transaction() as cursor:
                    cursor.execute("select pg_advisory_xact_lock(%s)", [SCHEMA_LOCK])
                    cursor.execute("create table if not exists jwtauth_schema (version integer not null)")
                    row = cursor.execute("select version from jwtauth_schema").fetchone()
                    version = 0 if row is None else int(row[0])
                    if version > len(MIGRATIONS):
                        raise StoreError(f"database {self.description} has schema {version}, newer than this jwtauth")
                    if version >= number:
                        continue
                    for statement in statements:
                        cursor.execute(statement)
                    if row is None:
                        cursor.execute("insert into jwtauth_schema (version) values (%s)", [number])
                    else:
                        cursor.execute("update jwtauth_schema set version = %s", [number])
        except (StoreUnavailableError, psycopg.Error) as exc:
            self.close()
            raise StoreError(f"cannot use database {self.description}: {_first_line(exc)}") from None

    def close(self) -> None:
        with self._open_lock:
            if self._opened:
                self.pool.close()
                self._opened = False

    def is_usable(self) -> bool:
        try:
            self._read("select 1 from users limit 1")
        except (StoreUnavailableError, psycopg.Error):
            return False
        return True

    def check(self) -> list[str]:
        """The connection, the schema version, and the stored emails (emails.email_problems)."""
        try:
            rows = self._read("select version from jwtauth_schema")
        except psycopg.errors.UndefinedTable:
            return [f"database {self.description} has no jwtauth schema"]
        except (psycopg.Error, StoreUnavailableError) as exc:
            return [f"cannot use database {self.description}: {_first_line(exc)}"]
        if not rows or rows[0][0] != len(MIGRATIONS):
            return [f"database {self.description} has schema {rows[0][0] if rows else 0}, not {len(MIGRATIONS)}"]
        return email_problems(row[0] for row in self._read("select email from users"))

    def backup(self, target: Path) -> None:
        """pg_dump's custom format, written 0600 (it holds the password hashes and the encrypted keys)."""
        pg_dump = shutil.which("pg_dump")
        if pg_dump is None:
            raise StoreError("cannot back up: pg_dump is not on the PATH (install the PostgreSQL client)")
        params = conninfo_to_dict(_conninfo(self.url))
        password = params.pop("password", None)  # in the environment, not on a command line `ps` shows
        env = {**os.environ, **({"PGPASSWORD": str(password)} if password else {})}
        temporary = target.with_name(f".{target.name}.tmp")
        try:
            temporary.unlink(missing_ok=True)
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            result = subprocess.run(  # noqa: S603 - a fixed program and arguments, no shell
                [pg_dump, "--format=custom", f"--file={temporary}", f"--dbname={make_conninfo('', **params)}"],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                raise StoreError(f"pg_dump failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
            os.replace(temporary, target)
        except OSError as exc:
            raise StoreError(f"cannot back up to {target}: {exc.strerror or exc}") from None
        finally:
            temporary.unlink(missing_ok=True)

    def key_repository(self) -> KeyRepository:
        return PostgresKeyRepository(self)

    # Users

    def add_user(self, email: str, name: str, password_hash: str, now: int) -> User:
        user = User(str(uuid.uuid4()), email, name, password_hash, False, now, now)
        try:
            with self._transaction() as cursor:
                cursor.execute(
                    "insert into users (id, email, name, password_hash, created_at, updated_at)"
                    " values (%s, %s, %s, %s, %s, %s)",
                    [user.id, email, name, password_hash, now, now],
                )
        except psycopg.errors.UniqueViolation:
            raise ConflictError("a user with this email exists") from None
        return user

    def find_user_by_email(self, email: str) -> User | None:
        return user_of(_first(self._read(f"select {USER_COLUMNS} from users where email = %s", [email])))

    def find_user(self, user_id: str) -> User | None:
        return user_of(_first(self._read(f"select {USER_COLUMNS} from users where id = %s", [user_id])))

    def list_users(self) -> list[User]:
        rows = self._read(f"select {USER_COLUMNS} from users order by created_at, email")
        return [user for user in map(user_of, rows) if user is not None]

    def set_password_hash(self, user_id: str, password_hash: str, now: int) -> None:
        with self._transaction() as cursor:  # a transaction for its lock timeout
            cursor.execute(
                "update users set password_hash = %s, updated_at = %s where id = %s", [password_hash, now, user_id]
            )

    def set_user_disabled(self, user_id: str, is_disabled: bool, now: int) -> None:
        with self._transaction() as cursor:
            cursor.execute(
                "update users set is_disabled = %s, updated_at = %s where id = %s", [is_disabled, now, user_id]
            )

    # Sessions

    def start_session(
        self, session: SessionState, max_sessions: int, address_key: str, reset: str, release: Sequence[str]
    ) -> int:
        with self._transaction() as cursor:
            _insert_session(cursor, session)
            # The user's row stays locked until the commit: concurrent logins of one user take their turns
            # from here, and each one's next statement (a new snapshot, in READ COMMITTED) sees the sessions
            # of those before it.
            cursor.execute("update users set last_login_key = %s where id = %s", [address_key, session.user.id])
            # The new session is the newest whatever its created_at (another login may bear the same time):
            # it is kept, and of the others the newest max_sessions - 1.
            capped = cursor.execute(
                "update sessions set revoked_at = %(now)s where id in (select id from sessions"
                " where user_id = %(user)s and id <> %(new)s and revoked_at is null and expires_at > %(now)s"
                " order by created_at desc offset %(keep)s)",
                {"now": session.created_at, "user": session.user.id, "new": session.id, "keep": max_sessions - 1},
            ).rowcount
            # The keys in take_login_attempt's order, the one every process locks them in: a login that forgave
            # its reset key first could wait for a key of another login's take, which waited for the reset key.
            for key in sorted({reset, *release}):
                if key == reset:
                    cursor.execute("delete from login_attempts where key = %s", [key])
                else:
                    cursor.execute(
                        "update login_attempts set attempts = greatest(attempts - 1, 0) where key = %s", [key]
                    )
            return capped

    def rotate(self, family: str, decide: Decide) -> Decision:
        with self._connection() as conn:
            return self._rotate(conn.cursor(), family, decide)

    def _rotate(self, cursor: Cursor[Row], family: str, decide: Decide) -> Decision:
        """rotate_optimistically, in autocommit: a SELECT, and an UPDATE that waits for the row's lock no
        longer than the busy timeout. Half the client and server CPU of SELECT … FOR UPDATE, UPDATE and
        COMMIT in a transaction, and a row lock held for one statement, not while the rule runs."""

        def save_rotation(state: SessionState, generation: int) -> bool:
            columns = [state.generation, state.token_hash, state.expires_at, encode_spent(state.spent)]
            return cursor.execute(SAVE_ROTATION, [*columns, self._lock_timeout, state.id, generation]).rowcount == 1

        return rotate_optimistically(
            lambda: session_of(cursor.execute(FIND_SESSION, [family]).fetchone()),
            decide,
            save_rotation,
            functools.partial(self._save_revocation, cursor),
        )

    def _save_revocation(self, cursor: Cursor[Row], state: SessionState) -> None:
        cursor.execute(SAVE_REVOCATION, [state.revoked_at, self._lock_timeout, state.id])

    async def rotate_async(self, family: str, decide: Decide) -> Decision:
        """rotate, in this event loop's next round of rotations (rounds.Rounds): the rotations asked for in
        one turn of the loop go to the database together, in one worker thread and over one pooled connection
        (rotate_many): two statements for a round instead of two per refresh, and one thread hop. Under
        `make bench`'s refresh load with one worker, a refresh then cost 597 µs of the worker's CPU instead of
        728, and 72 µs of PostgreSQL's instead of 129."""
        return await self._rotations.ask((family, decide))

    def _start_rotations(self, asks: list[Ask[tuple[str, Decide], Decision]]) -> None:
        task = asyncio.get_running_loop().create_task(self._rotate_round(asks))
        self._rotating.add(task)  # a task the loop alone refers to may be garbage collected before it ends
        task.add_done_callback(self._rotating.discard)

    async def _rotate_round(self, asks: list[Ask[tuple[str, Decide], Decision]]) -> None:
        wanted = [ask for ask in asks if ask.is_wanted]  # a request cancelled while it waited spends nothing
        answers: Sequence[Decision | Exception]
        try:
            answers = await self.run(functools.partial(self.rotate_many, [ask.item for ask in wanted]))
        except Exception as exc:  # the database could not be reached, say: every rotation of the round fails
            answers = [exc] * len(wanted)
        for ask, answer in zip(wanted, answers, strict=True):
            ask.answer(answer)

    def rotate_many(self, requests: Sequence[tuple[str, Decide]]) -> list[Decision | StoreUnavailableError]:
        """rotate_together, over one pooled connection in autocommit: a SELECT for all the sessions, and an
        UPDATE for all the rotations, which waits for each row's lock no longer than the busy timeout. It
        lists the rows in the order of their ids, so that two such UPDATEs lock them in one order as a rule.
        If it meets a transaction that holds one of its rows and waits for another (a deadlock, which
        PostgreSQL ends by failing one of the two), it saves nothing, and each rotation is then decided and
        saved alone.

        Raises:
            StoreUnavailableError: the database could not be reached, or a row's lock not had within the busy
                timeout.
        """
        with self._connection() as conn:
            cursor = conn.cursor()

            def read(families: list[str]) -> dict[str, SessionState]:
                states = map(session_of, cursor.execute(FIND_SESSIONS, [families]).fetchall())
                return {state.family: state for state in states if state is not None}

            def save_rotations(rotations: list[tuple[SessionState, int]]) -> set[str]:
                rotations = sorted(rotations, key=lambda rotation: rotation[0].id)
                columns = [
                    [state.id for state, _ in rotations],
                    [generation for _, generation in rotations],
                    [state.generation for state, _ in rotations],
                    [state.token_hash for state, _ in rotations],
                    [state.expires_at for state, _ in rotations],
                    [encode_spent(state.spent) for state, _ in rotations],
                ]
                try:
                    return {row[0] for row in cursor.execute(SAVE_ROTATIONS, [self._lock_timeout, *columns])}
                except psycopg.errors.DeadlockDetected:
                    return set()

            return rotate_together(
                requests,
                read,
                save_rotations,
                functools.partial(self._save_revocation, cursor),
                functools.partial(self._rotate, cursor),
            )

    def find_session(self, family: str) -> SessionState | None:
        return session_of(_first(self._read(FIND_SESSION, [family])))

    def revoke_session(self, session_id: str, now: float) -> int:
        return self._revoke("id = %s", [session_id], now)

    def revoke_user_sessions(self, user_id: str, now: float) -> int:
        return self._revoke("user_id = %s", [user_id], now)

    def revoke_all_sessions(self, now: float) -> int:
        return self._revoke("true", [], now)

    def _revoke(self, where: str, parameters: list[object], now: float) -> int:
        with self._transaction() as cursor:
            return cursor.execute(
                f"update sessions set revoked_at = %s, spent = '' where revoked_at is null and {where}",
                [now, *parameters],
            ).rowcount

    def find_session_user(self, session_id: str) -> User | None:
        return user_of(_first(self._read(
            f"select {USER_COLUMNS} from sessions join users on users.id = sessions.user_id"
            " where sessions.id = %s and sessions.revoked_at is null and not users.is_disabled",
            [session_id],
        )))  # fmt: skip

    def count_live_sessions(self, now: float) -> int:
        rows = self._read("select count(*) from sessions where expires_at > %s and revoked_at is null", [now])
        return int(rows[0][0])

    def delete_expired(self, now: float, revoked_before: float, attempts_before: int) -> int:
        deleted = 0
        while True:
            with self._transaction() as cursor:
                cursor.execute(
                    "delete from login_attempts where key in (select key from login_attempts"
                    " where window_start <= %s limit %s for update skip locked)",
                    [attempts_before, SWEEP_BATCH],
                )
                count = cursor.execute(
                    "delete from sessions where id in (select id from sessions where expires_at <= %s"
                    " or revoked_at <= %s limit %s for update skip locked)",
                    [now, revoked_before, SWEEP_BATCH],
                ).rowcount
            deleted += count
            if count < SWEEP_BATCH:
                return deleted

    # Throttling

    def take_login_attempt(self, limits: dict[str, int], now: int, window: int) -> int | None:
        """Each key counted by one atomic upsert that refuses to go past its limit; if any refuses, the
        transaction is rolled back, so that a blocked attempt counts under no key."""
        blocked: list[int] = []
        try:
            with self._transaction() as cursor:
                for key in sorted(limits):  # one order for every process: no deadlock between them
                    row = cursor.execute(
                        "insert into login_attempts as counted (key, window_start, attempts)"
                        " values (%(key)s, %(now)s, 1) on conflict (key) do update set"
                        " window_start = case when counted.window_start <= %(passed)s then %(now)s"
                        "  else counted.window_start end,"
                        " attempts = case when counted.window_start <= %(passed)s then 1 else counted.attempts + 1 end"
                        " where counted.window_start <= %(passed)s or counted.attempts < %(limit)s"
                        " returning attempts",
                        {"key": key, "now": now, "passed": now - window, "limit": limits[key]},
                    ).fetchone()
                    if row is None:
                        start = cursor.execute(
                            "select window_start from login_attempts where key = %s", [key]
                        ).fetchone()
                        blocked.append(int(start[0]) + window - now if start else window)
                if blocked:
                    raise _Blocked
        except _Blocked:
            return max(blocked)
        return None

    # Moving a deployment

    def export(self, now: float) -> Snapshot:
        users = self.list_users()
        rows = self._read(
            f"{SELECT_SESSION} where revoked_at is null and expires_at > %s order by sessions.created_at", [now]
        )
        return Snapshot(users, [session for session in map(session_of, rows) if session is not None])

    def import_(self, snapshot: Snapshot) -> None:
        with self._transaction() as cursor:
            cursor.execute("select pg_advisory_xact_lock(%s)", [KEYS_LOCK])
            row = cursor.execute(
                "select exists (select 1 from users) or exists (select 1 from sessions)"
                " or exists (select 1 from signing_keys)"
            ).fetchone()
            if row is not None and row[0]:
                raise StoreError(f"database {self.description} already holds jwtauth data; nothing was copied")
            cursor.executemany(
                f"insert into users ({', '.join(USER_FIELDS)}) values (%s, %s, %s, %s, %s, %s, %s, %s)",
                [(u.id, u.email, u.name, u.password_hash, u.is_disabled, u.created_at, u.updated_at, u.last_login_key)
                 for u in snapshot.users],
            )  # fmt: skip
            for session in snapshot.sessions:
                _insert_session(cursor, session)
            if snapshot.keys is not None:
                _PostgresKeyChange(cursor).write(snapshot.keys)


class _Blocked(Exception):  # rolls back the counts of an attempt that a limit refused
    pass


class PostgresKeyRepository:
    """The key set in the database: rows of signing_keys, the refresh secret and a version in key_set.
    A change holds an advisory lock for its transaction; servers look at the version once a second."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    def version(self) -> object:
        try:
            rows = self.store._read("select version from key_set where id = 1")
        except (StoreUnavailableError, psycopg.Error) as exc:
            raise KeyStoreError(f"cannot read the key set from {self.store.description}: {_first_line(exc)}") from None
        return rows[0][0] if rows else None

    def read(self) -> StoredKeys:
        try:
            with self.store._transaction() as cursor:
                stored = _read_keys(cursor)
        except (StoreUnavailableError, psycopg.Error) as exc:
            raise KeyStoreError(f"cannot read the key set from {self.store.description}: {_first_line(exc)}") from None
        if stored is None:
            raise KeyStoreError(f"database {self.store.description} holds no key set yet")
        return stored

    @contextmanager
    def change(self) -> Iterator[KeyChange]:
        try:
            with self.store._transaction() as cursor:
                cursor.execute("select pg_advisory_xact_lock(%s)", [KEYS_LOCK])
                yield _PostgresKeyChange(cursor)
        except (StoreUnavailableError, psycopg.Error) as exc:
            raise KeyStoreError(f"cannot change the key set in {self.store.description}: {_first_line(exc)}") from None

    def where(self, name: str) -> str:
        what = "the refresh secret" if name == REFRESH_SECRET else f"key {name}"
        return f"({what} in {self.store.description})"


class _PostgresKeyChange:
    def __init__(self, cursor: Cursor[Row]) -> None:
        self.cursor = cursor

    def read(self) -> StoredKeys | None:
        return _read_keys(self.cursor)

    def write(self, keys: StoredKeys) -> list[str]:
        kids = [entry.kid for entry in keys.entries]
        deleted = [row[0] for row in self.cursor.execute(
            "delete from signing_keys where not (kid = any(%s)) returning kid", [kids]
        ).fetchall()]  # fmt: skip
        for entry in keys.entries:
            self.cursor.execute(
                f"insert into signing_keys ({_KEY_COLUMNS}, pem) values (%s, %s, %s, %s, %s, %s, %s)"
                " on conflict (kid) do update set state = excluded.state, activated_at = excluded.activated_at,"
                " retired_at = excluded.retired_at",
                [entry.kid, entry.state, entry.size, entry.created_at, entry.activated_at, entry.retired_at,
                 keys.pems[entry.kid].decode()],
            )  # fmt: skip
        secret = keys.refresh_secret.decode() if keys.refresh_secret else None
        self.cursor.execute("update key_set set version = version + 1, refresh_secret = %s where id = 1", [secret])
        return deleted


def _read_keys(cursor: Cursor[Row]) -> StoredKeys | None:
    rows = cursor.execute(  # in the order of the lifecycle, as the JWKS lists them
        f"select {_KEY_COLUMNS}, pem from signing_keys order by created_at,"
        " case state when 'retired' then 0 when 'current' then 1 else 2 end, kid"
    ).fetchall()
    secret_row = cursor.execute("select refresh_secret from key_set where id = 1").fetchone()
    if not rows:
        return None
    entries = tuple(KeyEntry(*row[:6]) for row in rows)
    secret = secret_row[0].encode() if secret_row and secret_row[0] else None
    return StoredKeys(entries, {row[0]: row[6].encode() for row in rows}, secret)


def _insert_session(cursor: Cursor[Row], session: SessionState) -> None:
    cursor.execute(
        "insert into sessions (id, family, user_id, created_at, generation, token_hash, expires_at, spent,"
        " legacy_hash) values (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [session.id, session.family, session.user.id, session.created_at, session.generation, session.token_hash,
         session.expires_at, encode_spent(session.spent), session.legacy_hash],
    )  # fmt: skip


def _first(rows: list[Row]) -> Row | None:
    return rows[0] if rows else None


def _check_alive(conn: Connection[Row]) -> None:
    """The pool's check, without a round trip: an idle connection whose socket is readable was closed by the
    server (a restart, a failover); it is discarded and another one is taken."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        conn.close()  # so that the pool discards it and makes a new one, rather than taking it back
        raise psycopg.OperationalError("the server closed the connection")


def _conninfo(url: str) -> str:
    """The URL as a libpq connection string, with what the URL does not say: a connect timeout, and TCP
    keepalives and a user timeout, so that a connection to a server that vanished without a word (a failover,
    a frozen machine) fails in seconds rather than in the two hours of the system's TCP defaults.

    Raises:
        ConfigError: it is not a URL libpq understands (its own message is left out: it may quote the password).
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ConfigError(
            "JWTAUTH_DATABASE is not a valid postgresql:// URL (is the password percent-encoded?)"
        ) from None
    for name, value in TCP_DEFAULTS.items():
        params.setdefault(name, value)
    return make_conninfo("", **params)


TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "55", "57")  # connection, rollback, resources, locks, operator


def _is_transient(exc: psycopg.Error) -> bool:
    """Whether the database cannot answer now rather than refuse for good: a broken connection, a lock or
    statement timed out, a deadlock, an admin shutdown, a read-only standby after a failover (25006)."""
    state = exc.sqlstate or ""
    return isinstance(exc, psycopg.OperationalError) or state[:2] in TRANSIENT_SQLSTATE_CLASSES or state == "25006"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

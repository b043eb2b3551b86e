"""The Store contract: what every storage backend must do, run against each (the `env` fixture is
parametrised over SQLite and PostgreSQL, as Starlette runs its tests over asyncio and trio)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jwtauth.config import Settings
from jwtauth.errors import ConflictError, StoreError
from jwtauth.keys import KeyEntry, StoredKeys
from jwtauth.sessions import Decision, SessionState, SpentToken, User
from jwtauth.store import Store, open_store

from .conftest import insert_many, rotate_at_once, without_keys
from .services import DatabaseSupply

NOW = 1_800_000_000.0


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    store = open_store(settings)
    store.migrate()
    yield store
    store.close()


def new_user(store: Store, email: str = "alice@example.com") -> User:
    return store.add_user(email, "Alice", "hash", int(NOW))


def new_session(user: User, created_at: float = NOW, ttl: float = 3600) -> SessionState:
    family = uuid.uuid4().hex[:22]
    return SessionState(str(uuid.uuid4()), family, user, created_at, 0, "h0", created_at + ttl)


def started(store: Store, user: User, created_at: float = NOW, ttl: float = 3600) -> SessionState:
    session = new_session(user, created_at, ttl)
    store.start_session(session, 100, "address-key", "pair", [])
    return session


# Users


def test_a_user_is_found_by_email_and_id(store: Store) -> None:
    user = new_user(store)

    assert store.find_user_by_email("alice@example.com") == user
    assert store.find_user(user.id) == user
    assert store.find_user_by_email("bob@example.com") is None
    assert store.list_users() == [user]


def test_a_taken_email_is_a_conflict_and_writes_nothing(store: Store) -> None:
    new_user(store)

    with pytest.raises(ConflictError):
        store.add_user("alice@example.com", "Other", "other hash", int(NOW))

    assert [user.name for user in store.list_users()] == ["Alice"]


def test_a_password_hash_and_the_disabled_flag_are_stored(store: Store) -> None:
    user = new_user(store)

    store.set_password_hash(user.id, "new hash", int(NOW) + 5)
    store.set_user_disabled(user.id, True, int(NOW) + 6)

    changed = store.find_user(user.id)
    assert changed is not None
    assert (changed.password_hash, changed.is_disabled, changed.updated_at) == ("new hash", True, int(NOW) + 6)


# Sessions


def test_a_session_is_stored_as_it_was_started_and_remembers_the_login_address(store: Store) -> None:
    user = new_user(store)
    session = started(store, user)

    found = store.find_session(session.family)

    assert found == dataclasses.replace(session, user=dataclasses.replace(user, last_login_key="address-key"))
    assert store.find_session("no such family") is None


def test_starting_a_session_beyond_the_cap_ends_the_oldest(store: Store) -> None:
    user, other = new_user(store), new_user(store, "bob@example.com")
    others = started(store, other)
    sessions = [started(store, user, NOW + index) for index in range(3)]

    ended = store.start_session(new_session(user, NOW + 3), 3, "address-key", "pair", [])

    assert ended == 1
    assert store.find_session_user(sessions[0].id) is None
    assert [store.find_session_user(s.id) is not None for s in sessions[1:]] == [True, True]
    assert store.find_session_user(others.id) is not None


def test_the_cap_never_ends_the_session_being_started(store: Store) -> None:
    """A login's time is taken before it waits for the database: the session it starts may bear an earlier time
    than live ones, or the same. It is still the newest, and one of the others ends."""
    user = new_user(store)
    sessions = [started(store, user, NOW + 1) for _ in range(3)]
    late = new_session(user, NOW)

    ended = store.start_session(late, 3, "address-key", "pair", [])

    assert ended == 1
    assert store.find_session_user(late.id) is not None
    assert [store.find_session_user(s.id) is None for s in sessions].count(True) == 1


def test_rotate_saves_a_rotation_and_revokes_on_reuse(store: Store) -> None:
    session = started(store, new_user(store))
    spent = (SpentToken(0, NOW + 1, b"sealed"),)
    rotated = dataclasses.replace(session, generation=1, token_hash="h1", expires_at=NOW + 7200, spent=spent)

    decision = store.rotate(session.family, lambda state: Decision("rotated", "rotated", rotated, "t1"))
    after_rotation = store.find_session(session.family)
    store.rotate(session.family, lambda state: Decision("reuse_detected", "late", dataclasses.replace(
        rotated, revoked_at=NOW + 2, spent=())))  # fmt: skip
    after_reuse = store.find_session(session.family)

    assert decision.refresh_token == "t1"
    assert after_rotation is not None and (after_rotation.generation, after_rotation.spent) == (1, spent)
    assert after_rotation.token_hash == "h1"
    assert after_reuse is not None and (after_reuse.revoked_at, after_reuse.spent) == (NOW + 2, ())


@pytest.mark.parametrize("outcome", ["replayed", "invalid"])
def test_rotate_writes_nothing_for_other_decisions(store: Store, outcome: str) -> None:
    session = started(store, new_user(store))
    changed = dataclasses.replace(session, generation=9, revoked_at=NOW)

    before = store.find_session(session.family)

    store.rotate(session.family, lambda state: Decision(outcome, "x", changed))  # type: ignore[arg-type]

    assert store.find_session(session.family) == before


def test_rotate_calls_the_rule_with_none_for_an_unknown_family(store: Store) -> None:
    seen: list[SessionState | None] = []

    def decide(state: SessionState | None) -> Decision:
        seen.append(state)
        return Decision("invalid", "unknown_session")

    store.rotate("no such family", decide)

    assert seen == [None]


def at_once_in_processes(settings: Settings, count: int, work: Callable[[Store], object]) -> None:
    """Call `work` in `count` threads started together, each with a store of its own, as `count` processes
    would; raise what a call raised."""
    stores = [open_store(settings) for _ in range(count)]
    start = threading.Barrier(count)

    def started_together(own: Store) -> object:
        start.wait()
        return work(own)

    try:
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            list(pool.map(started_together, stores))
    finally:
        for own in stores:
            own.close()


def test_concurrent_rotations_of_one_session_are_decided_one_after_another(store: Store, settings: Settings) -> None:
    session = started(store, new_user(store))

    def rotate_ten_times(own: Store) -> None:
        for _ in range(10):
            own.rotate(session.family, lambda state: Decision("rotated", "rotated", dataclasses.replace(
                state, generation=state.generation + 1), "t") if state else Decision("invalid", "unknown"))  # fmt: skip

    at_once_in_processes(settings, 4, rotate_ten_times)

    found = store.find_session(session.family)
    assert found is not None and found.generation == 40  # no rotation was lost to another


def next_generation(seen: list[SessionState | None]) -> Callable[[SessionState | None], Decision]:
    """A rule that rotates any session it finds to its next generation, noting each state it is shown."""

    def decide(state: SessionState | None) -> Decision:
        seen.append(state)
        if state is None:
            return Decision("invalid", "unknown_session")
        generation = state.generation + 1
        rotated = dataclasses.replace(state, generation=generation, token_hash=f"h{generation}")
        return Decision("rotated", "rotated", rotated, f"t{generation}")

    return decide


def saved(store: Store, session: SessionState) -> tuple[int, str, float | None]:
    """The generation, token hash and revocation time of the session as the store holds it."""
    found = store.find_session(session.family)
    assert found is not None
    return found.generation, found.token_hash, found.revoked_at


def test_rotations_asked_for_at_once_are_each_decided_and_saved(store: Store) -> None:
    user = new_user(store)
    twice, once, reused, replayed = (started(store, user) for _ in range(4))
    seen: list[SessionState | None] = []
    revoked = dataclasses.replace(reused, revoked_at=NOW + 2)
    before = store.find_session(replayed.family)

    decisions = asyncio.run(rotate_at_once(store, [
        (twice.family, next_generation(seen)),
        (once.family, next_generation(seen)),
        (twice.family, next_generation(seen)),  # decided on the state the first request for it saved
        (reused.family, lambda state: Decision("reuse_detected", "late", revoked)),
        (replayed.family, lambda state: Decision("replayed", "within_interval", state)),
        ("no such family", next_generation(seen)),
    ]))  # fmt: skip

    assert [decision.refresh_token for decision in decisions] == ["t1", "t1", "t2", None, None, None]
    assert sorted(state.generation if state else -1 for state in seen) == [-1, 0, 0, 1]  # -1: no session
    assert saved(store, twice)[:2] == (2, "h2")
    assert saved(store, once)[:2] == (1, "h1")
    assert saved(store, reused)[2] == NOW + 2
    assert store.find_session(replayed.family) == before


def test_rounds_of_rotations_from_several_processes_lose_none(store: Store, settings: Settings) -> None:
    user = new_user(store)
    sessions = [started(store, user) for _ in range(3)]

    def rotate_in_rounds(own: Store) -> None:
        for _ in range(10):
            requests = [(session.family, next_generation([])) for session in reversed(sessions)] * 2
            decisions = asyncio.run(rotate_at_once(own, requests))
            assert all(decision.outcome == "rotated" for decision in decisions)

    at_once_in_processes(settings, 2, rotate_in_rounds)  # as two workers would

    # 2 processes, 10 rounds, 2 requests for each session in each: no rotation was lost to another
    assert [saved(store, session)[0] for session in sessions] == [40] * 3


def test_revocations_count_the_sessions_they_end(store: Store) -> None:
    alice, bob = new_user(store), new_user(store, "bob@example.com")
    first, second, bobs = started(store, alice), started(store, alice), started(store, bob)

    assert store.revoke_session(first.id, NOW) == 1
    assert store.revoke_session(first.id, NOW) == 0
    assert store.revoke_user_sessions(alice.id, NOW) == 1
    assert store.find_session_user(bobs.id) == dataclasses.replace(bob, last_login_key="address-key")
    assert store.revoke_all_sessions(NOW) == 1
    assert [store.find_session_user(s.id) for s in (first, second, bobs)] == [None, None, None]


def test_a_disabled_users_sessions_name_no_user(store: Store) -> None:
    user = new_user(store)
    session = started(store, user)

    store.set_user_disabled(user.id, True, int(NOW))

    assert store.find_session_user(session.id) is None


def test_live_sessions_are_counted_and_ended_ones_swept_in_batches(store: Store, settings: Settings) -> None:
    user = new_user(store)
    live = started(store, user, NOW, ttl=3600)
    started(store, user, NOW - 7200, ttl=3600)  # expired
    revoked = started(store, user, NOW)
    store.revoke_session(revoked.id, NOW - 100)
    expired_rows = [(f"x{n}", f"f{n}", user.id, NOW - 10, 0, "h", NOW - 1) for n in range(1100)]
    insert_many(
        settings.database,
        "insert into sessions (id, family, user_id, created_at, generation, token_hash,"
        " expires_at) values (?, ?, ?, ?, ?, ?, ?)",
        expired_rows,
    )  # more than one sweep batch

    assert store.count_live_sessions(NOW) == 1
    assert store.delete_expired(NOW, revoked_before=NOW - 50, attempts_before=0) == 1102
    assert store.find_session(live.family) is not None
    assert store.count_live_sessions(NOW) == 1


# Throttling


def test_attempts_are_counted_per_key_until_a_limit_and_its_window_passes(store: Store) -> None:
    limits = {"pair": 2, "address": 10}
    now = int(NOW)

    results = [store.take_login_attempt(limits, now + step, 60) for step in range(3)]

    assert results == [None, None, 58]  # the third is refused; its window ends 60 s after the first attempt
    assert store.take_login_attempt({"address": 10}, now + 3, 60) is None  # a refusal counted under no key
    assert store.take_login_attempt(limits, now + 60, 60) is None  # a new window


def test_a_login_forgives_its_attempt_resetting_one_key_and_releasing_the_others(store: Store) -> None:
    now = int(NOW)
    for _ in range(2):
        store.take_login_attempt({"pair": 2, "address": 2}, now, 60)

    store.start_session(new_session(new_user(store), NOW), 100, "address-key", "pair", ["address"])

    assert store.take_login_attempt({"pair": 2, "address": 2}, now, 60) is None  # address at 1 + 1 = 2
    assert store.take_login_attempt({"address": 2}, now, 60) == 60


def test_concurrent_attempts_never_pass_a_limit(store: Store, settings: Settings) -> None:
    stores = [open_store(settings) for _ in range(4)]
    start = threading.Barrier(20)

    def attempt(index: int) -> int | None:
        start.wait()
        return stores[index % 4].take_login_attempt({"pair": 5, "address": 50}, int(NOW), 60)

    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(attempt, range(20)))
    finally:
        for own in stores:
            own.close()

    assert results.count(None) == 5


# The database as a whole, and moving it


def test_a_new_database_is_usable_and_sound(store: Store) -> None:
    assert store.is_usable()
    assert store.check() == []


def test_a_snapshot_moves_users_live_sessions_and_keys(store: Store, empty_target: Settings) -> None:
    user = new_user(store)
    live, revoked = started(store, user), started(store, user)
    store.revoke_session(revoked.id, NOW)
    keys = StoredKeys((KeyEntry("kid", "current", 2048, 1),), {"kid": b"pem"}, b"secret pem")
    snapshot = dataclasses.replace(store.export(NOW), keys=keys)
    target = open_store(empty_target)
    try:
        target.migrate()
        target.import_(snapshot)
        with pytest.raises(StoreError):
            target.import_(snapshot)  # a target that holds jwtauth data is refused

        copied = target.find_session(live.family)
        stored = target.key_repository().read()
        missing = target.find_session(revoked.family)
    finally:
        target.close()
    assert copied == store.find_session(live.family) and missing is None
    assert (stored.entries, dict(stored.pems), stored.refresh_secret) == (keys.entries, {"kid": b"pem"}, b"secret pem")


@pytest.fixture
def empty_target(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Settings]:
    """Another installation of the same backend, with no data and no keys."""
    if not settings.database.startswith("postgresql://"):
        yield dataclasses.replace(settings, database=str(tmp_path / "target.db"), keys_dir=tmp_path / "target-keys")
        return
    databases: DatabaseSupply = request.getfixturevalue("pg_databases")
    dbname = databases.take()
    target = dataclasses.replace(settings, database=databases.cluster.url(dbname))
    without_keys({"JWTAUTH_DATABASE": target.database}, tmp_path)
    yield target
    databases.drop(dbname)


def test_a_key_change_is_seen_through_the_version(store: Store) -> None:
    repository = store.key_repository()
    before, stored = repository.version(), repository.read()
    entries = (*stored.entries, KeyEntry("added", "retired", 2048, 5, 6, 7))

    with repository.change() as change:
        change.write(dataclasses.replace(stored, entries=entries, pems={**stored.pems, "added": b"added pem"}))

    assert repository.version() != before
    assert "added" in [entry.kid for entry in repository.read().entries]


def test_the_time_is_kept_below_a_second(store: Store) -> None:
    session = started(store, new_user(store), created_at=NOW + 0.25, ttl=0.5)

    found = store.find_session(session.family)

    assert found is not None and (found.created_at, found.expires_at) == (NOW + 0.25, NOW + 0.75)

"""The `jwtauth` command: serve, users and keys verbs; main(argv) returns the exit code."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from jwtauth.config import OVERRIDABLE, Settings
from jwtauth.emails import normalise_email
from jwtauth.errors import (
    AuthError,
    ConfigError,
    KeyStoreError,
    RotationTooEarlyError,
    StoreError,
    StoreUnavailableError,
)
from jwtauth.keys import KeyEntry, KeyPolicy, KeyStore
from jwtauth.passwords import PasswordHasher
from jwtauth.service import UserAdmin
from jwtauth.store import Store, describe_database, is_postgres_url, open_store


class CommandError(Exception):
    """A command that cannot go on; printed as one line, exit 1."""


def build_parser() -> argparse.ArgumentParser:
    config = argparse.ArgumentParser(add_help=False)
    group = config.add_argument_group("configuration (overrides the JWTAUTH_* variable of the same name)")
    for name in OVERRIDABLE:
        group.add_argument(f"--{name.lower().replace('_', '-')}", dest=f"JWTAUTH_{name}", metavar=name)

    parser = argparse.ArgumentParser(prog="jwtauth", description="A small authentication server.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", parents=[config], help="serve the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")

    users = verbs.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    for action in ("add", "passwd"):
        command = users.add_parser(action, parents=[config])
        command.add_argument("email")
        command.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if action == "add":
            command.add_argument("--name", default="")
    users.add_parser("list", parents=[config])
    for action in ("disable", "enable"):
        users.add_parser(action, parents=[config]).add_argument("email")
    revoke = users.add_parser("revoke-sessions", parents=[config], help="log a user, or everyone, out")
    revoke.add_argument("email", nargs="?")
    revoke.add_argument("--all", action="store_true", help="every session of every user")

    db = verbs.add_parser("db", help="back up or check the database").add_subparsers(dest="action", required=True)
    db.add_parser("backup", parents=[config], help="copy the database online, consistently").add_argument("path")
    db.add_parser("check", parents=[config], help="check the connection, the schema and the data; exit 1 on a problem")
    copy_to = db.add_parser("copy-to", parents=[config], help="copy users, live sessions and keys into PostgreSQL")
    copy_to.add_argument("url", help="postgresql://user:password@host:port/dbname, an empty database")

    keys = verbs.add_parser("keys", help="manage signing keys").add_subparsers(dest="action", required=True)
    keys.add_parser("list", parents=[config]).add_argument("--json", action="store_true")
    rotate = keys.add_parser("rotate", parents=[config], help="promote the next key to current now")
    rotate.add_argument("--force", action="store_true", help="rotate even if the next key is too young (a leak)")
    prune = keys.add_parser("prune", parents=[config], help="delete retired keys whose tokens have all expired")
    prune.add_argument("--force", action="store_true", help="delete every retired key now (a leaked key)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (1 with one line on stderr for any expected failure)."""
    args = build_parser().parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if name.startswith("JWTAUTH_") and value}
    try:
        settings = Settings.from_env({**os.environ, **overrides})
        if args.verb == "serve":
            return serve(settings, overrides, args)
        with contextlib.closing(open_store(settings)) as store:
            if args.verb == "users":
                return manage_users(settings, store, args)
            if args.verb == "db":
                return manage_database(settings, store, args)
            return manage_keys(settings, store, args)
    except (AuthError, CommandError) as exc:
        print(f"jwtauth: {exc.description if isinstance(exc, AuthError) else exc}", file=sys.stderr)
    except (ConfigError, KeyStoreError, StoreError) as exc:
        print(f"jwtauth: {exc}", file=sys.stderr)
    except StoreUnavailableError as exc:
        print(f"jwtauth: the database cannot answer now ({exc}); nothing was changed", file=sys.stderr)
    except UnicodeError:
        print("jwtauth: the input is not valid UTF-8 text", file=sys.stderr)
    except (EOFError, KeyboardInterrupt):
        print("\njwtauth: interrupted; nothing was changed", file=sys.stderr)
    return 1


def serve(settings: Settings, overrides: dict[str, str], args: argparse.Namespace) -> int:
    """Prepare the database and keys here, so a bad setting fails once and clearly; then run uvicorn."""
    from jwtauth.app import open_service
    from jwtauth.logs import logging_config
    from jwtauth.server import make_cpu_slots, run_server

    host, port, workers = args.host, args.port, args.workers
    if workers < 1:
        raise CommandError("--workers must be at least 1")
    if not 0 < port < 65536:
        raise CommandError(f"--port must be from 1 to 65535, not {port}")
    open_service(settings).store.close()
    os.environ.update(overrides)  # the workers read their settings from the environment
    # The cores are shared by the workers: together they hash at most one password per core at a time.
    os.environ.setdefault("JWTAUTH_HASH_CONCURRENCY", str(max(1, settings.hash_concurrency // workers)))
    metrics_dir = None
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # counters shared by the workers
        metrics_dir = tempfile.mkdtemp(prefix="jwtauth-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    cpu_slots = make_cpu_slots(workers) if settings.pin_workers else None
    if cpu_slots:
        os.environ["JWTAUTH_CPU_SLOTS"] = str(cpu_slots)
    try:
        log_config = logging_config(args.log_format, args.log_level.upper())
        run_server("jwtauth.app:create_app_from_env", host, port, workers, log_config)
    finally:
        for directory in (metrics_dir, cpu_slots):
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
    return 0


def read_new_password(from_stdin: bool) -> str:
    """Read a password: all of stdin less one trailing newline (LF or CRLF), or a no-echo prompt asked twice."""
    if from_stdin:
        password = sys.stdin.read()
        return password.removesuffix("\r\n") if password.endswith("\r\n") else password.removesuffix("\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != password:
        raise CommandError("the passwords do not match")
    return password


def manage_users(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    store.migrate()
    admin = UserAdmin(store, PasswordHasher(settings.argon2), time.time)
    if args.action == "add":
        user = admin.add_user(args.email, read_new_password(args.password_stdin), args.name)
        print(f"added {user.email} (id {user.id})")
    elif args.action == "passwd":
        admin.find_user(args.email)  # before asking for a password
        admin.set_password(args.email, read_new_password(args.password_stdin))
        print(f"password changed for {normalise_email(args.email)}")
    elif args.action == "revoke-sessions":
        if args.all == bool(args.email):
            raise CommandError("give an EMAIL or --all")
        count = admin.revoke_all_sessions() if args.all else admin.revoke_sessions(args.email)
        print(f"revoked {count} sessions" + ("" if args.all else f" of {normalise_email(args.email)}"))
    elif args.action in ("disable", "enable"):
        admin.set_disabled(args.email, args.action == "disable")
        print(f"{args.action}d {normalise_email(args.email)}")
    else:
        for user in store.list_users():
            state = "disabled" if user.is_disabled else "enabled"
            print(f"{user.email}\t{user.name}\t{state}\t{user.id}\t{_iso(user.created_at)}")
    return 0


def manage_database(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    database = describe_database(settings.database)
    if args.action == "backup":
        store.backup(Path(args.path))
        print(f"backed up {database} to {args.path}")
        return 0
    if args.action == "copy-to":
        return copy_to(settings, store, args.url)
    problems = store.check()
    for problem in problems:
        print(problem, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problems in {database}")
    return 1 if problems else 0


def copy_to(settings: Settings, source: Store, url: str) -> int:
    """Copy users, live sessions and keys into an empty PostgreSQL database, the keys encrypted with the
    passphrase, in one transaction: nobody is logged out by the move, and a refused target gets nothing."""
    if not is_postgres_url(url):
        raise CommandError("db copy-to needs a postgresql:// URL")
    if not settings.keys_passphrase:
        raise ConfigError("JWTAUTH_KEYS_PASSPHRASE must be set: the keys are stored encrypted in PostgreSQL")
    source.migrate()
    keys = KeyStore.from_settings(settings, source.key_repository()).export(settings.keys_passphrase)
    snapshot = dataclasses.replace(source.export(time.time()), keys=keys)
    with contextlib.closing(open_store(dataclasses.replace(settings, database=url))) as target:
        target.migrate()
        target.import_(snapshot)
    print(f"copied {len(snapshot.users)} users, {len(snapshot.sessions)} live sessions and"
          f" {len(keys.entries)} keys to {describe_database(url)}")  # fmt: skip
    return 0


def manage_keys(settings: Settings, store: Store, args: argparse.Namespace) -> int:
    store.migrate()
    keystore = KeyStore.from_settings(settings, store.key_repository())
    now = int(time.time())
    keyset = keystore.load_or_create(now)
    if args.action == "rotate":
        try:
            keyset = keystore.rotate(now, force=args.force)
        except RotationTooEarlyError as exc:
            raise CommandError(
                f"the next key is in the JWKS for less than JWTAUTH_JWKS_MAX_AGE; rotate can run from"
                f" {_iso(exc.signs_from)} (in {exc.signs_from - now} s), or now with --force for a leaked key"
            ) from None
        print(f"rotated: {keyset.current.kid} signs from now on")
    elif args.action == "prune":
        deleted = keystore.prune(now, force=args.force)
        print(f"deleted {', '.join(deleted)}" if deleted else "nothing to delete")
    else:
        rows = [key_row(entry, keystore.policy) for entry in keyset.entries]
        print(json.dumps(rows, indent=2) if args.json else "\n".join("\t".join(map(str, r.values())) for r in rows))
    return 0


def key_row(entry: KeyEntry, policy: KeyPolicy) -> dict[str, object]:
    """One key as `keys list` shows it: the metadata, and the next instant of its lifecycle."""
    row: dict[str, object] = {
        "kid": entry.kid,
        "state": entry.state,
        "alg": "RS256",
        "size": entry.size,
        "created_at": _iso(entry.created_at),
    }
    if entry.activated_at is not None:
        row["activated_at"] = _iso(entry.activated_at)
    if entry.retired_at is not None:
        row["retired_at"] = _iso(entry.retired_at)
    milestones = {"next": ("signs_from", entry.signs_from(policy)), "current": ("rotates_at", entry.rotates_at(policy)),
                  "retired": ("deletes_at", entry.deletes_at(policy))}  # fmt: skip
    name, instant = milestones[entry.state]
    if instant is not None:
        row[name] = _iso(instant)
    return row


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def run() -> None:
    """The console-script entry point."""
    try:
        code = main()
        sys.stdout.flush()  # a reader that has gone (`jwtauth users list | head -1`) shows here, not at exit
    except BrokenPipeError:
        # The reader has what it wanted: no traceback. Point stdout at /dev/null, so that the flush at exit
        # fails no more (Python's documentation, signal module, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)

"""Settings: every JWTAUTH_* variable of the contract, read once into one frozen object."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import argon2

from jwtauth.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

KEY_SIZES = (2048, 3072, 4096)
# The JWTAUTH_* variables that a CLI flag of the same name may override (`--keys-dir` for JWTAUTH_KEYS_DIR).
# JWTAUTH_KEYS_PASSPHRASE is left out on purpose: a secret on the command line shows in `ps`.
OVERRIDABLE = (
    "DATABASE", "KEYS_DIR", "ISSUER", "AUDIENCE", "ACCESS_TTL", "REFRESH_TTL", "REFRESH_REUSE_INTERVAL",
    "LEEWAY", "KEY_SIZE", "KEY_ROTATE_EVERY", "JWKS_MAX_AGE", "ARGON2_TIME_COST", "ARGON2_MEMORY_KIB",
    "ARGON2_PARALLELISM", "LOGIN_MAX_FAILURES", "LOGIN_WINDOW", "LOGIN_MAX_FAILURES_PER_ADDRESS",
    "LOGIN_MAX_FAILURES_PER_ACCOUNT", "MAX_SESSIONS_PER_USER", "TRUSTED_PROXIES", "DB_BUSY_TIMEOUT_MS",
    "DB_POOL_SIZE", "DB_PREPARED_STATEMENTS", "HASH_CONCURRENCY", "LOGIN_QUEUE", "OPEN_REGISTRATION",
    "PASSWORD_GRANT", "CORS_ORIGINS",
)  # fmt: skip
_MAX_NUMBER = 1_000_000_000  # no setting needs more; far below what overflows SQLite or a timestamp
CLIENT_ID = "jwtauth"  # the first-party client every token is issued to (RFC 9068 §2.2 client_id)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"  # underscores too: some container hosts have them
_ORIGIN = re.compile(rf"(https?)://({_LABEL}(?:\.{_LABEL})*|\[[0-9a-f:.]+\])(?::([0-9]{{1,5}}))?", re.IGNORECASE)


def normalise_origin(text: str) -> str:
    """Return an origin `scheme://host[:port]` as a browser sends it in `Origin` (RFC 6454 §6.2): scheme and
    host in lower case, IPv6 in its short form, the scheme's default port left out.

    Raises:
        ValueError: anything else: another scheme, a path (even `/`), a query, user info, a wildcard, `null`.
    """
    match = _ORIGIN.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an origin of the form scheme://host[:port]")
    scheme, host, port = match[1].lower(), match[2].lower(), match[3]
    if host.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"{text!r} does not hold a valid IPv6 address") from None
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} has a port outside 1-65535")
    if port is not None and int(port) != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{int(port)}"
    return f"{scheme}://{host}"


def issuer_origin(issuer: str) -> str:
    """The origin of an issuer URL (scheme, host and port, the default port left out).

    Raises:
        ValueError: the issuer's scheme and authority are not an http(s) origin.
    """
    parts = urlsplit(issuer)
    return normalise_origin(f"{parts.scheme}://{parts.netloc}")


@dataclass(frozen=True, slots=True)
class Settings:
    """The configuration of one server or CLI run; built by from_env, overridden with dataclasses.replace."""

    database: str = field(default="jwtauth.db", repr=False)  # a SQLite file, or a postgresql:// URL (a password)
    keys_dir: Path = Path("keys")
    keys_passphrase: bytes | None = field(default=None, repr=False)
    issuer: str = "http://127.0.0.1:8000"
    audience: str = "jwtauth"
    access_ttl: int = 900
    refresh_ttl: int = 2_592_000
    refresh_reuse_interval: int = 10
    leeway: int = 30
    key_size: int = 2048
    key_rotate_every: int = 2_592_000
    jwks_max_age: int = 300
    argon2: argon2.Parameters = field(default_factory=argon2.profiles.get_default_parameters, repr=False)
    login_max_failures: int = 5
    login_window: int = 900
    login_max_failures_per_address: int = 50  # across all emails: a ceiling on credential stuffing
    login_max_failures_per_account: int = 100  # across all addresses: a ceiling on a botnet's guesses
    max_sessions_per_user: int = 100  # a login beyond ends the user's oldest session
    trusted_proxies: tuple[IPNetwork, ...] = ()  # peers whose X-Forwarded-For is believed
    db_busy_timeout: float = 10.0  # seconds a write waits for other writers (or a row lock) before answering 503
    db_pool_size: int = 4  # PostgreSQL connections per process
    db_prepared_statements: bool = True  # off behind PgBouncer in transaction mode (before PgBouncer 1.21)
    hash_concurrency: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))  # Argon2 at once
    pin_workers: bool = True  # with one worker per usable CPU, each keeps to its own (server.take_cpu)
    cpu_slots: Path | None = None  # set by `jwtauth serve` for its workers when they keep to a CPU each
    login_queue: int = 64  # logins (and registrations) waiting for a hashing slot; more get 503 at once
    open_registration: bool = False
    password_grant: bool = False
    cors_origins: tuple[str, ...] = ()  # besides the issuer's own origin; each as normalise_origin returns it

    def __post_init__(self) -> None:
        if self.key_size not in KEY_SIZES:
            raise ConfigError(f"JWTAUTH_KEY_SIZE must be one of {', '.join(map(str, KEY_SIZES))}, not {self.key_size}")
        try:
            issuer_origin(self.issuer)
        except ValueError:
            raise ConfigError(f"JWTAUTH_ISSUER must be an http(s) URL, not {self.issuer!r}") from None
        for origin in self.cors_origins:
            if not _is_normal_origin(origin):
                raise ConfigError(f"JWTAUTH_CORS_ORIGINS must list origins (scheme://host[:port]), not {origin!r}")
        if self.argon2.memory_cost < 8 * self.argon2.parallelism:
            raise ConfigError("JWTAUTH_ARGON2_MEMORY_KIB must be at least 8 x JWTAUTH_ARGON2_PARALLELISM")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Read the JWTAUTH_* variables; unset ones keep the contract's defaults.

        Raises:
            ConfigError: a value is not a number where one is needed, out of range, or not allowed.
        """
        reader = _Reader(env)
        defaults = cls()
        params = defaults.argon2
        argon2_params = dataclasses.replace(
            params,
            time_cost=reader.number("ARGON2_TIME_COST", params.time_cost, minimum=1),
            memory_cost=reader.number("ARGON2_MEMORY_KIB", params.memory_cost, minimum=8),
            parallelism=reader.number("ARGON2_PARALLELISM", params.parallelism, minimum=1),
        )
        passphrase = env.get("JWTAUTH_KEYS_PASSPHRASE")
        return cls(
            database=reader.text("DATABASE", defaults.database),
            keys_dir=Path(reader.text("KEYS_DIR", str(defaults.keys_dir))),
            keys_passphrase=passphrase.encode() if passphrase else None,
            issuer=reader.text("ISSUER", defaults.issuer).rstrip("/"),
            audience=reader.text("AUDIENCE", defaults.audience),
            access_ttl=reader.number("ACCESS_TTL", defaults.access_ttl, minimum=1),
            refresh_ttl=reader.number("REFRESH_TTL", defaults.refresh_ttl, minimum=1),
            refresh_reuse_interval=reader.number("REFRESH_REUSE_INTERVAL", defaults.refresh_reuse_interval),
            leeway=reader.number("LEEWAY", defaults.leeway),
            key_size=reader.number("KEY_SIZE", defaults.key_size, minimum=1),
            key_rotate_every=reader.number("KEY_ROTATE_EVERY", defaults.key_rotate_every, minimum=1),
            jwks_max_age=reader.number("JWKS_MAX_AGE", defaults.jwks_max_age),
            argon2=argon2_params,
            login_max_failures=reader.number("LOGIN_MAX_FAILURES", defaults.login_max_failures, minimum=1),
            login_window=reader.number("LOGIN_WINDOW", defaults.login_window, minimum=1),
            login_max_failures_per_address=reader.number(
                "LOGIN_MAX_FAILURES_PER_ADDRESS", defaults.login_max_failures_per_address, minimum=1
            ),
            login_max_failures_per_account=reader.number(
                "LOGIN_MAX_FAILURES_PER_ACCOUNT", defaults.login_max_failures_per_account, minimum=1
            ),
            max_sessions_per_user=reader.number("MAX_SESSIONS_PER_USER", defaults.max_sessions_per_user, minimum=1),
            trusted_proxies=reader.networks("TRUSTED_PROXIES"),
            db_busy_timeout=reader.number("DB_BUSY_TIMEOUT_MS", int(defaults.db_busy_timeout * 1000)) / 1000,
            db_pool_size=reader.number("DB_POOL_SIZE", defaults.db_pool_size, minimum=1),
            db_prepared_statements=reader.flag("DB_PREPARED_STATEMENTS", defaults.db_prepared_statements),
            hash_concurrency=reader.number("HASH_CONCURRENCY", defaults.hash_concurrency, minimum=1),
            pin_workers=reader.flag("PIN_WORKERS", defaults.pin_workers),
            cpu_slots=Path(env["JWTAUTH_CPU_SLOTS"]) if env.get("JWTAUTH_CPU_SLOTS") else None,
            login_queue=reader.number("LOGIN_QUEUE", defaults.login_queue),
            open_registration=reader.flag("OPEN_REGISTRATION", defaults.open_registration),
            password_grant=reader.flag("PASSWORD_GRANT", defaults.password_grant),
            cors_origins=reader.origins("CORS_ORIGINS"),
        )


def _is_normal_origin(origin: str) -> bool:
    try:
        return normalise_origin(origin) == origin
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class _Reader:
    """Reads JWTAUTH_<NAME> from a mapping, naming the variable in every error."""

    env: Mapping[str, str]

    def text(self, name: str, default: str) -> str:
        value = self.env.get(f"JWTAUTH_{name}", default).strip()
        if not value:
            raise ConfigError(f"JWTAUTH_{name} must not be empty")
        return value

    def number(self, name: str, default: int, minimum: int = 0) -> int:
        raw = self.env.get(f"JWTAUTH_{name}")
        if raw is None:
            return default
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"JWTAUTH_{name} must be a whole number, not {raw!r}") from None
        if not minimum <= value <= _MAX_NUMBER:
            raise ConfigError(f"JWTAUTH_{name} must be from {minimum} to {_MAX_NUMBER}, not {value}")
        return value

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        raw = self.env.get(f"JWTAUTH_{name}", "")
        try:
            return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in raw.split(",") if item.strip())
        except ValueError:
            raise ConfigError(
                f"JWTAUTH_{name} must be IP addresses or networks, comma-separated, not {raw!r}"
            ) from None

    def origins(self, name: str) -> tuple[str, ...]:
        raw = self.env.get(f"JWTAUTH_{name}", "")
        try:
            return tuple(dict.fromkeys(normalise_origin(item.strip()) for item in raw.split(",") if item.strip()))
        except ValueError as bad:
            raise ConfigError(f"JWTAUTH_{name} must be comma-separated origins (scheme://host[:port]): {bad}") from None

    def flag(self, name: str, default: bool) -> bool:
        raw = self.env.get(f"JWTAUTH_{name}")
        if raw is None:
            return default
        value = raw.strip().lower()
        if value not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
            raise ConfigError(f"JWTAUTH_{name} must be 0 or 1, not {raw!r}")
        return value in ("1", "true", "yes", "on")

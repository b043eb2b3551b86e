"""Settings.from_env: the contract's defaults and the refusal of bad values."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import argon2
import pytest

from jwtauth.config import Settings
from jwtauth.errors import ConfigError


def test_defaults_are_the_contracts() -> None:
    settings = Settings.from_env({})

    assert (settings.database, settings.keys_dir, settings.keys_passphrase) == (
        "jwtauth.db",
        Path("keys"),
        None,
    )
    assert (settings.issuer, settings.audience) == ("http://127.0.0.1:8000", "jwtauth")
    assert (settings.access_ttl, settings.refresh_ttl, settings.refresh_reuse_interval) == (
        900,
        2_592_000,
        10,
    )
    assert (settings.leeway, settings.key_size, settings.key_rotate_every, settings.jwks_max_age) == (
        30, 2048, 2_592_000, 300,
    )  # fmt: skip
    assert settings.argon2 == argon2.profiles.get_default_parameters()
    assert (settings.login_max_failures, settings.login_window) == (5, 900)
    assert (settings.login_max_failures_per_address, settings.login_max_failures_per_account) == (50, 100)
    assert settings.max_sessions_per_user == 100
    assert settings.login_queue == 64
    assert not settings.open_registration and not settings.password_grant


def test_every_variable_is_read() -> None:
    settings = Settings.from_env({
        "JWTAUTH_DATABASE": "/srv/a.db", "JWTAUTH_KEYS_DIR": "/srv/keys", "JWTAUTH_KEYS_PASSPHRASE": "s3cret",
        "JWTAUTH_ISSUER": "https://auth.example.com/", "JWTAUTH_AUDIENCE": "api", "JWTAUTH_ACCESS_TTL": "60",
        "JWTAUTH_REFRESH_TTL": "600", "JWTAUTH_REFRESH_REUSE_INTERVAL": "0", "JWTAUTH_LEEWAY": "5",
        "JWTAUTH_KEY_SIZE": "3072", "JWTAUTH_KEY_ROTATE_EVERY": "86400", "JWTAUTH_JWKS_MAX_AGE": "60",
        "JWTAUTH_ARGON2_TIME_COST": "2", "JWTAUTH_ARGON2_MEMORY_KIB": "1024", "JWTAUTH_ARGON2_PARALLELISM": "2",
        "JWTAUTH_LOGIN_MAX_FAILURES": "3", "JWTAUTH_LOGIN_WINDOW": "60", "JWTAUTH_OPEN_REGISTRATION": "1",
        "JWTAUTH_PASSWORD_GRANT": "1", "JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS": "7",
        "JWTAUTH_TRUSTED_PROXIES": "10.0.0.0/8, ::1", "JWTAUTH_LOGIN_MAX_FAILURES_PER_ACCOUNT": "9",
        "JWTAUTH_MAX_SESSIONS_PER_USER": "4", "JWTAUTH_DB_POOL_SIZE": "6",
        "JWTAUTH_CORS_ORIGINS": "https://app.example.com", "JWTAUTH_LOGIN_QUEUE": "0",
        "JWTAUTH_PIN_WORKERS": "0", "JWTAUTH_CPU_SLOTS": "/run/jwtauth-cpus",
    })  # fmt: skip

    assert settings == Settings(
        database="/srv/a.db", keys_dir=Path("/srv/keys"), keys_passphrase=b"s3cret",
        issuer="https://auth.example.com", audience="api", access_ttl=60, refresh_ttl=600, refresh_reuse_interval=0,
        leeway=5, key_size=3072, key_rotate_every=86400, jwks_max_age=60,
        argon2=argon2.Parameters(argon2.Type.ID, 19, 16, 32, 2, 1024, 2), login_max_failures=3, login_window=60,
        login_max_failures_per_address=7, login_max_failures_per_account=9, max_sessions_per_user=4, db_pool_size=6,
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")),
        open_registration=True, password_grant=True, cors_origins=("https://app.example.com",), login_queue=0,
        pin_workers=False, cpu_slots=Path("/run/jwtauth-cpus"),
    )  # fmt: skip


def test_cors_origins_are_kept_as_browsers_send_them() -> None:
    settings = Settings.from_env({
        "JWTAUTH_CORS_ORIGINS": " https://App.Example.com:443,http://127.0.0.1:8001,http://[0::1]:80 ,,"
        "https://app.example.com",
    })  # fmt: skip

    assert settings.cors_origins == ("https://app.example.com", "http://127.0.0.1:8001", "http://[::1]")


BAD_ORIGINS = [
    "null", "*", "https://*.example.com", "app.example.com", "https://app.example.com/", "https://app.example.com/spa",
    "https://app.example.com?x=1", "https://user@app.example.com", "ftp://app.example.com", "https://app.example.com:0",
    "https://app.example.com:65536", "https://", "http://[not-ipv6]", "https://app example.com",
]  # fmt: skip


def test_passphrase_is_not_in_the_repr() -> None:
    assert "s3cret" not in repr(Settings.from_env({"JWTAUTH_KEYS_PASSPHRASE": "s3cret"}))


@pytest.mark.parametrize(
    "env",
    [
        {"JWTAUTH_ACCESS_TTL": "15m"},
        {"JWTAUTH_ACCESS_TTL": "0"},
        {"JWTAUTH_KEY_SIZE": "4097"},
        {"JWTAUTH_ARGON2_PARALLELISM": "0"},
        {"JWTAUTH_ARGON2_MEMORY_KIB": "8", "JWTAUTH_ARGON2_PARALLELISM": "2"},
        {"JWTAUTH_OPEN_REGISTRATION": "2"},
        {"JWTAUTH_PIN_WORKERS": "sometimes"},
        {"JWTAUTH_DATABASE": " "},
        {"JWTAUTH_TRUSTED_PROXIES": "10.0.0.0/8, proxy.internal"},
        {"JWTAUTH_ISSUER": "https://user@auth.example.com"},
        *({"JWTAUTH_CORS_ORIGINS": f"https://app.example.com, {origin}"} for origin in BAD_ORIGINS),
    ],
)
def test_bad_values_are_refused_naming_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="JWTAUTH_"):
        Settings.from_env(env)

"""The `jwtauth` command as an operator runs it: a subprocess, a real database file, exit codes and stderr."""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from jwtauth.app import create_app
from jwtauth.config import Settings

from .conftest import PASSWORD, add_user, full_width, login, run_cli, table_counts
from .services import free_port


def assert_fails_cleanly(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit 1, exactly one line on stderr that mentions each expected text, and no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0]


def add(env: dict[str, str], email: str, password: str = PASSWORD, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("users", "add", email, "--password-stdin", *args, env=env, stdin=password + "\n")


def can_log_in(env: dict[str, str], email: str, password: str) -> bool:
    with TestClient(create_app(Settings.from_env(env))) as client:
        return client.post("/login", json={"email": email, "password": password}).status_code == 200


def test_users_add_then_login(env: dict[str, str]) -> None:
    result = add(env, "Carol@Example.com", PASSWORD, "--name", "Carol")

    assert result.returncode == 0, result.stderr
    assert "carol@example.com" in result.stdout
    assert can_log_in(env, "carol@example.com", PASSWORD)


def test_users_added_by_many_commands_at_once_all_arrive(env: dict[str, str]) -> None:
    """Processes that open, write and close the database at the same moment wait for each other."""
    emails = [f"user{number}@example.com" for number in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(emails)) as pool:
        done = list(pool.map(lambda email: run_cli("users", "add", email, "--password-stdin", env=env,
                                                    stdin=PASSWORD), emails))  # fmt: skip

    assert [result.returncode for result in done] == [0] * len(emails), [result.stderr for result in done]
    listed = run_cli("users", "list", env=env).stdout
    assert sorted(line.split("\t")[0] for line in listed.splitlines()) == emails


def test_users_list_shows_every_user_and_state(env: dict[str, str]) -> None:
    add(env, "carol@example.com", PASSWORD, "--name", "Carol")
    add(env, "dave@example.com")
    run_cli("users", "disable", "dave@example.com", env=env)

    lines = run_cli("users", "list", env=env).stdout.splitlines()

    assert [line.split("\t")[:3] for line in lines] == [
        ["carol@example.com", "Carol", "enabled"],
        ["dave@example.com", "", "disabled"],
    ]


def test_password_stdin_strips_exactly_one_newline(env: dict[str, str]) -> None:
    run_cli("users", "add", "carol@example.com", "--password-stdin", env=env, stdin=PASSWORD + " \n\n")

    assert can_log_in(env, "carol@example.com", PASSWORD + " \n")
    assert not can_log_in(env, "carol@example.com", PASSWORD)


@pytest.mark.parametrize("duplicate", ["carol@example.com", "CAROL@example.COM", " carol@example.com "])
def test_duplicate_email_fails_and_writes_nothing(env: dict[str, str], duplicate: str) -> None:
    add(env, "carol@example.com")
    before = table_counts(env["JWTAUTH_DATABASE"])

    result = add(env, duplicate, "another password")

    assert_fails_cleanly(result, "exists")
    assert table_counts(env["JWTAUTH_DATABASE"]) == before
    assert can_log_in(env, "carol@example.com", PASSWORD)


@pytest.mark.parametrize(
    "address",
    ["carol", "carol@", "@example.com", "carol@example", "ca rol@example.com", "", '"carol"@example.com',
     "<carol@example.com>", "carol@example.com(comment)", "carol@corp.local"],
)  # fmt: skip
def test_bad_address_fails_and_writes_nothing(env: dict[str, str], address: str) -> None:
    add(env, "seed@example.com")
    before = table_counts(env["JWTAUTH_DATABASE"])

    assert_fails_cleanly(add(env, address), "email")
    assert table_counts(env["JWTAUTH_DATABASE"]) == before


@pytest.mark.parametrize("spelling", ["jose\u0301@example.com", full_width("JOS") + "É@example.com"])
def test_a_look_alike_of_an_existing_address_is_that_user(env: dict[str, str], spelling: str) -> None:
    """Issue 15: `users disable` disabled one of two identical-looking users; now they cannot both exist."""
    add(env, "josé@example.com")
    before = table_counts(env["JWTAUTH_DATABASE"])

    assert_fails_cleanly(add(env, spelling, "another password"), "exists")
    assert table_counts(env["JWTAUTH_DATABASE"]) == before
    assert run_cli("users", "disable", spelling, env=env).returncode == 0
    assert run_cli("users", "list", env=env).stdout.split("\t")[:3] == ["josé@example.com", "", "disabled"]


@pytest.mark.parametrize("password", ["", "1234567", "p" * 1025])
def test_short_or_long_password_fails_and_writes_nothing(env: dict[str, str], password: str) -> None:
    add(env, "seed@example.com")
    before = table_counts(env["JWTAUTH_DATABASE"])

    assert_fails_cleanly(add(env, "carol@example.com", password), "password")
    assert table_counts(env["JWTAUTH_DATABASE"]) == before


def test_passwd_replaces_the_password(env: dict[str, str]) -> None:
    add(env, "carol@example.com")

    result = run_cli("users", "passwd", "CAROL@example.com", "--password-stdin", env=env, stdin="a new password\n")

    assert result.returncode == 0, result.stderr
    assert can_log_in(env, "carol@example.com", "a new password")
    assert not can_log_in(env, "carol@example.com", PASSWORD)


def test_passwd_with_a_short_password_changes_nothing(env: dict[str, str]) -> None:
    add(env, "carol@example.com")

    result = run_cli("users", "passwd", "carol@example.com", "--password-stdin", env=env, stdin="short\n")

    assert_fails_cleanly(result, "password")
    assert can_log_in(env, "carol@example.com", PASSWORD)


COMMON = ["aaaaaaaa", "Lizaveta", "password1"]  # a run of one character; ranks 9,999 and 52 of zxcvbn's list


@pytest.mark.parametrize("password", COMMON)
def test_users_add_refuses_a_common_password(env: dict[str, str], password: str) -> None:
    add(env, "seed@example.com")
    before = table_counts(env["JWTAUTH_DATABASE"])

    assert_fails_cleanly(add(env, "carol@example.com", password), "common")
    assert table_counts(env["JWTAUTH_DATABASE"]) == before


@pytest.mark.parametrize("password", COMMON)
def test_passwd_refuses_a_common_password(env: dict[str, str], password: str) -> None:
    add(env, "carol@example.com")

    result = run_cli("users", "passwd", "carol@example.com", "--password-stdin", env=env, stdin=password + "\n")

    assert_fails_cleanly(result, "common")
    assert can_log_in(env, "carol@example.com", PASSWORD)


def test_disable_and_enable(env: dict[str, str]) -> None:
    add(env, "carol@example.com")

    assert run_cli("users", "disable", "carol@example.com", env=env).returncode == 0
    assert not can_log_in(env, "carol@example.com", PASSWORD)
    assert run_cli("users", "enable", "carol@example.com", env=env).returncode == 0
    assert can_log_in(env, "carol@example.com", PASSWORD)


@pytest.mark.parametrize("verb", ["disable", "enable", "passwd"])
def test_unknown_user_fails_cleanly(env: dict[str, str], verb: str) -> None:
    args = ["users", verb, "nobody@example.com"] + (["--password-stdin"] if verb == "passwd" else [])

    result = run_cli(*args, env=env, stdin=PASSWORD + "\n")

    assert_fails_cleanly(result, "nobody@example.com")


def test_password_prompt_does_not_echo(env: dict[str, str]) -> None:
    """Without --password-stdin the password is asked twice on the terminal, with echo off."""
    master, slave = os.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "jwtauth", "users", "add", "carol@example.com"],
        env={**clean, **env},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 30
    for prompt in (b"Password: ", b"Repeat password: "):
        while prompt not in screen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                screen += os.read(master, 1024)
        screen = screen.replace(prompt, b"", 1)
        os.write(master, PASSWORD.encode() + b"\n")
    assert process.wait(timeout=30) == 0
    while select.select([master], [], [], 0.1)[0]:
        try:
            screen += os.read(master, 1024)
        except OSError:
            break
    os.close(master)

    assert PASSWORD.encode() not in screen
    assert can_log_in(env, "carol@example.com", PASSWORD)


# Configuration errors stop every verb with one line


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("JWTAUTH_ACCESS_TTL", "fifteen", "JWTAUTH_ACCESS_TTL"),
        ("JWTAUTH_REFRESH_TTL", "-1", "JWTAUTH_REFRESH_TTL"),
        ("JWTAUTH_KEY_SIZE", "1024", "JWTAUTH_KEY_SIZE"),
        ("JWTAUTH_ARGON2_MEMORY_KIB", "lots", "JWTAUTH_ARGON2_MEMORY_KIB"),
        ("JWTAUTH_PASSWORD_GRANT", "maybe", "JWTAUTH_PASSWORD_GRANT"),
        ("JWTAUTH_ISSUER", "auth.example.com", "JWTAUTH_ISSUER"),
        ("JWTAUTH_REFRESH_TTL", "99999999999999999999", "JWTAUTH_REFRESH_TTL"),
    ],
)
def test_bad_setting_stops_serve_with_one_line(env: dict[str, str], variable: str, value: str, expected: str) -> None:
    result = run_cli("serve", "--port", str(free_port()), env={**env, variable: value})

    assert_fails_cleanly(result, expected)


@pytest.mark.sqlite_only
def test_unusable_keys_dir_stops_serve_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")

    result = run_cli("serve", "--port", str(free_port()), env={**env, "JWTAUTH_KEYS_DIR": str(not_a_dir)})

    assert_fails_cleanly(result, str(not_a_dir))


def test_unusable_database_stops_serve_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("serve", "--port", str(free_port()), env={**env, "JWTAUTH_DATABASE": str(tmp_path)})

    assert_fails_cleanly(result, str(tmp_path))


def test_flag_overrides_the_environment(env: dict[str, str], tmp_path: Path) -> None:
    other = tmp_path / "other.db"

    result = run_cli("users", "add", "carol@example.com", "--password-stdin", "--database", str(other),
                     env=env, stdin=PASSWORD)  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert table_counts(other)["users"] == 1
    assert not Path(env["JWTAUTH_DATABASE"]).exists()


def test_flag_with_a_bad_value_fails_cleanly(env: dict[str, str]) -> None:
    assert_fails_cleanly(run_cli("users", "list", "--key-size", "512", env=env), "JWTAUTH_KEY_SIZE")


def test_console_script_is_installed(env: dict[str, str]) -> None:
    script = Path(sys.executable).parent / "jwtauth"
    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}

    result = subprocess.run([script, "users", "list"], env={**clean, **env}, capture_output=True, text=True,
                            check=False)  # fmt: skip

    assert result.returncode == 0, result.stderr


def test_login_after_cli_add_through_the_app(env: dict[str, str]) -> None:
    add(env, "carol@example.com")
    with TestClient(create_app(Settings.from_env(env))) as client:
        assert login(client, "carol@example.com")["token_type"] == "Bearer"


def test_password_stdin_strips_one_crlf(env: dict[str, str]) -> None:
    run_cli("users", "add", "carol@example.com", "--password-stdin", env=env, stdin=PASSWORD + "\r\n")

    assert can_log_in(env, "carol@example.com", PASSWORD)


def test_password_with_a_nul_fails_and_writes_nothing(env: dict[str, str]) -> None:
    add(env, "seed@example.com")
    before = table_counts(env["JWTAUTH_DATABASE"])

    assert_fails_cleanly(add(env, "carol@example.com", "correct\x00horse"), "password")
    assert table_counts(env["JWTAUTH_DATABASE"]) == before


def test_password_stdin_that_is_not_utf8_fails_cleanly(env: dict[str, str]) -> None:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}
    result = subprocess.run(
        [sys.executable, "-m", "jwtauth", "users", "add", "carol@example.com", "--password-stdin"],
        env={**clean, **env}, input=b"\xff\xfe not utf-8 at all\n", capture_output=True, check=False,
    )  # fmt: skip

    assert result.returncode == 1  # refused as undecodable, or (surrogateescape) as lone surrogates
    assert len(result.stderr.decode().strip().splitlines()) == 1 and b"Traceback" not in result.stderr
    assert table_counts(env["JWTAUTH_DATABASE"])["users"] == 0


def test_password_prompt_without_a_terminal_or_input_fails_cleanly(env: dict[str, str]) -> None:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}
    result = subprocess.run(
        [sys.executable, "-m", "jwtauth", "users", "add", "carol@example.com"], env={**clean, **env},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, start_new_session=True,
    )  # fmt: skip

    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "nothing was changed" in result.stderr
    assert table_counts(env["JWTAUTH_DATABASE"])["users"] == 0


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_serve_refuses_a_port_out_of_range(env: dict[str, str], port: str) -> None:
    assert_fails_cleanly(run_cli("serve", "--port", port, env=env), "--port")


def test_users_list_into_a_pipe_closed_early_exits_quietly(env: dict[str, str]) -> None:
    """`jwtauth users list | head -1` printed a BrokenPipeError traceback once head had gone."""
    for number in range(3):
        add_user(Settings.from_env(env), f"user{number}@example.com")
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first line
    clean = {key: value for key, value in os.environ.items() if not key.startswith("JWTAUTH_")}
    try:
        result = subprocess.run([sys.executable, "-m", "jwtauth", "users", "list"], env={**clean, **env},
                                stdout=writer, stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    finally:
        os.close(writer)

    assert (result.returncode, result.stderr) == (1, b"")

"""What an operator relies on: metrics, JSON audit logs, registration, online backup and integrity checks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from jwtauth.app import COUNT_SESSIONS_EVERY, create_app
from jwtauth.config import Settings
from jwtauth.logs import TextFormatter
from jwtauth.passwords import PasswordHasher
from jwtauth.store import is_postgres_url

from .conftest import (
    PASSWORD,
    Account,
    Server,
    add_user,
    bearer,
    full_width,
    login,
    query,
    run_cli,
    sqlite_at_schema,
    start_server,
    stop_server,
    table_counts,
)


def scrape(client: TestClient | httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# Metrics


def test_metrics_count_requests_logins_and_reuse(env: dict[str, str], alice: Account) -> None:
    settings = Settings.from_env({**env, "JWTAUTH_REFRESH_REUSE_INTERVAL": "0", "JWTAUTH_LOGIN_MAX_FAILURES": "2"})
    with TestClient(create_app(settings)) as client:
        before = scrape(client)
        pair = login(client, alice.email)
        client.post("/login", json={"email": alice.email, "password": "wrong password"})
        client.post("/login", json={"email": "nobody@example.com", "password": "wrong password"})
        client.post("/login", json={"email": "nobody@example.com", "password": "wrong password"})
        client.post("/login", json={"email": "nobody@example.com", "password": "wrong password"})  # throttled
        client.post("/refresh", json={"refresh_token": pair["refresh_token"]})
        client.post("/refresh", json={"refresh_token": pair["refresh_token"]})  # reuse
        client.get("/no/such/path")
        after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("jwtauth_logins_total", outcome="success") == 1
    assert moved("jwtauth_logins_total", outcome="bad_credentials") == 3
    assert moved("jwtauth_logins_total", outcome="throttled") == 1
    assert moved("jwtauth_refresh_reuse_detections_total") == 1
    assert moved("jwtauth_http_requests_total", endpoint="/login", method="POST", status="200") == 1
    assert moved("jwtauth_http_requests_total", endpoint="/login", method="POST", status="429") == 1
    assert moved("jwtauth_http_requests_total", endpoint="/refresh", method="POST", status="400") == 1
    assert moved("jwtauth_http_requests_total", endpoint="other", method="GET", status="404") == 1
    assert moved("jwtauth_http_request_duration_seconds_count", endpoint="/login") == 5


@pytest.mark.sqlite_only  # counted in the background: tests/test_store.py counts on both backends
def test_metrics_report_sessions_and_the_key_schedule(client: TestClient, alice: Account) -> None:
    login(client, alice.email)
    second = login(client, alice.email)
    client.post("/logout", headers=bearer(second["access_token"]))

    samples = scrape(client)
    deadline = time.monotonic() + COUNT_SESSIONS_EVERY + 2  # counted in the background, not per scrape
    while value(samples, "jwtauth_active_sessions") != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = scrape(client)

    assert value(samples, "jwtauth_active_sessions") == 1
    assert 0 <= value(samples, "jwtauth_signing_key_age_seconds") < 3600
    assert 30 * 86400 - 3600 < value(samples, "jwtauth_key_rotation_due_seconds") <= 30 * 86400


def test_metrics_add_up_across_two_workers(env: dict[str, str]) -> None:
    server = start_server(env, "--workers", "2")
    try:
        for _ in range(20):
            with httpx.Client(base_url=server.url) as http:  # a new connection: either worker
                assert http.get("/.well-known/jwks.json").status_code == 200
        totals = set()
        for _ in range(6):  # scrape several times: each worker must report the sum of both
            with httpx.Client(base_url=server.url) as http:
                samples = scrape(http)
            totals.add(value(samples, "jwtauth_http_requests_total", endpoint="/.well-known/jwks.json", method="GET",
                             status="200"))  # fmt: skip
    finally:
        stop_server(server)

    assert totals == {20.0}


def worker_cpus(server: Server) -> dict[int, set[str]]:
    """Each uvicorn worker of `server` (a child process started by multiprocessing's spawn) and the CPUs its
    threads may run on."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    workers = {}
    for pid in map(int, children):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers[pid] = {
                    task.joinpath("status").read_text().split("Cpus_allowed_list:")[1].split()[0]
                    for task in Path(f"/proc/{pid}/task").iterdir()
                }
    return workers


def cpu_sets(workers: dict[int, set[str]]) -> set[frozenset[str]]:
    return {frozenset(threads) for threads in workers.values()}


def wait_for_workers(server: Server, check: Callable[[dict[int, set[str]]], bool]) -> dict[int, set[str]]:
    deadline = time.monotonic() + 15
    while not check(workers := worker_cpus(server)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return workers


def test_one_worker_per_cpu_keeps_to_its_cpu_and_a_replacement_takes_the_one_left(env: dict[str, str]) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("one CPU: there is no second to give the second worker")
    add_user(Settings.from_env(env), "alice@example.com")
    one_each = {frozenset({str(cpu)}) for cpu in cpus}
    server = start_server(env, "--workers", "2", cpus=set(cpus))
    try:
        started = wait_for_workers(server, lambda found: cpu_sets(found) == one_each)
        with httpx.Client(base_url=server.url) as http:  # the hashing thread spreads over both CPUs, then back
            answers = [login(http, "alice@example.com") for _ in range(12)]
        after_logins = worker_cpus(server)

        def refresh_and_ask(pair: dict[str, object]) -> tuple[int, int]:  # a new connection: either worker
            with httpx.Client(base_url=server.url) as http:
                refreshed = http.post("/refresh", json={"refresh_token": pair["refresh_token"]})
                return refreshed.status_code, http.get("/userinfo", headers=bearer(pair["access_token"])).status_code

        with ThreadPoolExecutor(12) as pool:  # more at once than a worker has database connections
            statuses = list(pool.map(refresh_and_ask, answers))
        killed = next(iter(started))
        os.kill(killed, signal.SIGKILL)
        replaced = wait_for_workers(server, lambda found: killed not in found and cpu_sets(found) == one_each)
        with httpx.Client(base_url=server.url) as http:
            answers += [login(http, "alice@example.com") for _ in range(2)]
    finally:
        log = stop_server(server)

    assert cpu_sets(started) == one_each, started
    assert after_logins == started
    assert killed not in replaced and cpu_sets(replaced) == one_each, replaced
    assert all("access_token" in answer for answer in answers)
    assert statuses == [(200, 200)] * 12
    assert len(re.findall(r"worker \d+ keeps to CPU \d", log)) == 3


def test_a_pinned_worker_checks_passwords_on_every_cpu(tmp_path: Path) -> None:
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    if len(cpus) < 2:
        pytest.skip("one CPU: workers are never pinned there")
    worker = (  # what `jwtauth serve --workers 2` and then a worker do, and what a hashing thread then may use
        "import os\n"
        "from jwtauth import server\n"
        "cpu = server.take_cpu(server.make_cpu_slots(2))\n"
        "print(cpu, sorted(os.sched_getaffinity(0)), server.on_every_cpu(lambda: sorted(os.sched_getaffinity(0))),"
        " sorted(os.sched_getaffinity(0)))\n"
    )
    run = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "TMPDIR": str(tmp_path)},  # where make_cpu_slots makes its directory
                         preexec_fn=lambda: os.sched_setaffinity(0, cpus))  # fmt: skip

    first = min(cpus)
    assert run.stdout.split(" ", 1) == [str(first), f"[{first}] {sorted(cpus)} [{first}]\n"]
    assert sorted(path.name for path in tmp_path.glob("jwtauth-cpus-*/cpu-*")) == [f"cpu-{cpu}" for cpu in sorted(cpus)]


@pytest.mark.parametrize("setting", [{"JWTAUTH_PIN_WORKERS": "0"}, {}])
def test_workers_not_one_per_cpu_or_told_not_to_are_left_to_the_scheduler(
    env: dict[str, str], setting: dict[str, str]
) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("one CPU: workers are never pinned there")
    workers = "2" if setting else "3"  # pinning off; or more workers than CPUs
    server = start_server({**env, **setting}, "--workers", workers, cpus=set(cpus))
    try:
        found = wait_for_workers(server, lambda found: len(found) == int(workers))
    finally:
        log = stop_server(server)

    both = {f"{cpus[0]}-{cpus[1]}" if cpus[1] == cpus[0] + 1 else f"{cpus[0]},{cpus[1]}"}
    assert len(found) == int(workers) and all(threads == both for threads in found.values()), found
    assert "keeps to CPU" not in log


def sockets_per_worker(server: Server, workers: Iterable[int], state: str) -> dict[int, int]:
    """How many sockets on the server's port in `state` (from /proc/net/tcp: "01" established, "0A" listening)
    each worker process holds."""
    port = int(server.url.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in workers:  # a process that has ended holds none
        counts[pid] = 0
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError):  # closed since listed: a worker still starting
                    counts[pid] += os.readlink(fd) in inodes
    return counts


def all_listen(server: Server, workers: Iterable[int]) -> bool:
    """Whether each worker holds a listening socket on the server's port."""
    return all(sockets_per_worker(server, workers, "0A").values())


def open_connections(server: Server, count: int) -> list[socket.socket]:
    """`count` connections opened at once, as a load generator opens them, each then asking for /healthz."""
    host, port = server.url.removeprefix("http://").split(":")
    connections = [socket.create_connection((host, int(port)), timeout=10) for _ in range(count)]
    for connection in connections:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: jwtauth\r\n\r\n")
    for connection in connections:
        assert connection.recv(4096).startswith(b"HTTP/1.1 200 "), "every connection is answered"
    return connections


def test_a_burst_of_new_connections_is_spread_over_the_workers_a_replacement_included(env: dict[str, str]) -> None:
    server = start_server(env, "--workers", "2")
    try:
        first = wait_for_workers(server, lambda found: len(found) == 2 and all_listen(server, found))
        connections = open_connections(server, 32)
        spread = sockets_per_worker(server, first, "01")
        for connection in connections:
            connection.close()
        killed = next(iter(first))
        os.kill(killed, signal.SIGKILL)
        replaced = wait_for_workers(
            server, lambda found: len(found) == 2 and killed not in found and all_listen(server, found)
        )
        connections = open_connections(server, 32)
        spread_after = sockets_per_worker(server, replaced, "01")
        for connection in connections:
            connection.close()
    finally:
        stop_server(server)

    # Each worker listens on a socket of its own, and the kernel spreads connections over them by a hash of
    # their addresses: 32 over 2 leave fewer than 4 to one worker once in hundreds of thousands of runs.
    assert sum(spread.values()) == 32 and min(spread.values()) >= 4, spread
    assert sum(spread_after.values()) == 32 and min(spread_after.values()) >= 4, spread_after


def test_a_server_will_not_start_on_the_port_of_another(env: dict[str, str]) -> None:
    server = start_server(env, "--workers", "2")
    try:
        port = server.url.rsplit(":", 1)[1]
        second = run_cli("serve", "--workers", "2", "--port", port, env=env)
        connections = open_connections(server, 16)
        for connection in connections:
            connection.close()
    finally:
        stop_server(server)

    assert second.returncode == 3, second.stderr  # uvicorn's STARTUP_FAILURE: a worker would not be restarted
    assert "Address already in use" in second.stderr


# Structured logs


def test_json_logs_have_every_audit_event_once_with_its_fields(env: dict[str, str]) -> None:
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server({**env, "JWTAUTH_REFRESH_REUSE_INTERVAL": "0"}, "--log-format", "json")
    try:
        with httpx.Client(base_url=server.url) as http:
            pair = http.post("/login", json={"email": "alice@example.com", "password": PASSWORD}).json()
            http.post("/login", json={"email": "alice@example.com", "password": "wrong password"})
            second = http.post("/refresh", json={"refresh_token": pair["refresh_token"]}).json()
            http.post("/refresh", json={"refresh_token": pair["refresh_token"]})  # reuse: session revoked
            third = http.post("/login", json={"email": "alice@example.com", "password": PASSWORD}).json()
            http.post("/revoke", data={"token": third["refresh_token"]})
            fourth = http.post("/login", json={"email": "alice@example.com", "password": PASSWORD}).json()
            http.post("/logout", headers=bearer(fourth["access_token"]))
    finally:
        log = stop_server(server)

    lines = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line parses
    assert all({"timestamp", "level", "event", "request_id", "message"} <= line.keys() for line in lines)
    audit = [line for line in lines if line["event"] in {
        "login_succeeded", "login_failed", "refresh", "refresh_reuse_detected", "revoke", "logout"}]  # fmt: skip
    assert [line["event"] for line in audit] == [
        "login_succeeded", "login_failed", "refresh", "refresh_reuse_detected", "login_succeeded", "revoke",
        "login_succeeded", "logout",
    ]  # fmt: skip
    assert audit[1]["reason"] == "wrong_password" and audit[1]["user"] == audit[0]["user"]
    assert audit[2]["sid"] == audit[3]["sid"] and audit[7]["scope"] == "local"
    assert all(len(line["request_id"]) == 32 for line in audit)
    secrets = [PASSWORD, *(p[k] for p in (pair, second, third, fourth) for k in ("access_token", "refresh_token"))]
    assert not [secret for secret in secrets if secret in log]


def test_text_logs_by_default(env: dict[str, str]) -> None:
    server = start_server(env)
    httpx.get(f"{server.url}/healthz?access_token=do-not-log-me")
    log = stop_server(server)

    access = [line for line in log.splitlines() if "GET /healthz" in line]  # start_server's and ours
    time_level_logger_id = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO uvicorn\.access \[[0-9a-f]{32}\] "
    assert access and all(
        re.fullmatch(time_level_logger_id + r'127\.0\.0\.1:\d+ - "GET /healthz HTTP/1\.1" 200', line) for line in access
    )
    assert "do-not-log-me" not in log


@given(st.lists(st.floats(min_value=0, max_value=4e9), min_size=1, max_size=20))
def test_text_lines_tell_the_time_as_the_standard_formatter_does(times: list[float]) -> None:
    """The text formatter keeps the last second's text: records of any times, in any order, read alike."""
    fmt = "%(asctime)s %(levelname)s %(name)s %(message)s"
    ours, standard = TextFormatter(fmt), logging.Formatter(fmt)
    for created in times:
        record = logging.LogRecord("jwtauth.audit", logging.INFO, "", 0, "refresh sid=%s", ("s",), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == standard.format(record)


# Registration


@pytest.fixture
def open_client(env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(Settings.from_env({**env, "JWTAUTH_OPEN_REGISTRATION": "1"}))) as client:
        yield client


def test_registration_creates_a_user_who_can_log_in(open_client: TestClient) -> None:
    response = open_client.post("/users", json={"email": "New@Example.com", "password": "a fine password", "name": "N"})

    assert response.status_code == 201
    body = response.json()
    assert (set(body), body["email"], body["name"]) == ({"id", "email", "name"}, "new@example.com", "N")
    pair = login(open_client, "new@example.com", "a fine password")
    userinfo = open_client.get("/userinfo", headers=bearer(pair["access_token"])).json()
    assert userinfo["sub"] == body["id"]


def test_registration_takes_a_form_and_no_name(open_client: TestClient) -> None:
    response = open_client.post("/users", data={"email": "new@example.com", "password": "a fine password"})

    assert (response.status_code, response.json()["name"]) == (201, "")


def test_registration_is_closed_by_default(client: TestClient, settings: Settings) -> None:
    response = client.post("/users", json={"email": "new@example.com", "password": "a fine password"})

    assert (response.status_code, response.json()["error"]) == (403, "access_denied")
    assert table_counts(settings.database)["users"] == 0


@pytest.mark.parametrize(
    ("body", "status", "error", "reason"),
    [
        ({"email": "ALICE@example.com", "password": "a fine password"}, 409, "email_taken", "exists"),
        ({"email": "new@example.com", "password": "short"}, 400, "invalid_request", "at least 8"),
        ({"email": "new@example.com", "password": "Password123"}, 400, "invalid_request", "common"),
        ({"email": "new@example.com", "password": "qwertyuiop"}, 400, "invalid_request", "common"),
        ({"email": "new@example.com", "password": "aaaaaaaa"}, 400, "invalid_request", "repeated"),
        ({"email": "new@example.com", "password": "Lizaveta"}, 400, "invalid_request", "common"),  # rank 9,999
        ({"email": "not-an-address", "password": "a fine password"}, 400, "invalid_request", "email"),
        ({"email": "new@example.com"}, 400, "invalid_request", "password"),
        ({"email": "new@example.com", "password": "a fine password", "name": 7}, 400, "invalid_request", "name"),
        (
            {"email": "new@example.com", "password": "a fine password", "name": "n" * 201},
            400,
            "invalid_request",
            "name",
        ),
        ({"email": "n" * 250 + "@example.com", "password": "a fine password"}, 400, "invalid_request", "longer"),
        ({"email": "new@example.com", "password": "p" * 1025}, 400, "invalid_request", "longer"),
        ({"email": "new@example.com", "password": "a fine\x00password"}, 400, "invalid_request", "not allowed"),
        (
            {"email": "new@example.com", "password": "a fine password", "name": "\x1b[31mred"},
            400,
            "invalid_request",
            "printable",
        ),
        ({"email": ["new@example.com"], "password": "a fine password"}, 400, "invalid_request", "string"),
        ({"email": "new@example.com", "password": 12345678}, 400, "invalid_request", "string"),
    ],
)
def test_registration_refusals_write_nothing(
    env: dict[str, str], alice: Account, body: dict[str, object], status: int, error: str, reason: str
) -> None:
    settings = Settings.from_env({**env, "JWTAUTH_OPEN_REGISTRATION": "1"})
    before = table_counts(settings.database)
    with TestClient(create_app(settings)) as client:
        response = client.post("/users", json=body)

    assert (response.status_code, response.json()["error"]) == (status, error)
    assert reason in response.json()["error_description"]
    assert table_counts(settings.database) == before


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"email": "new@example.com", "password": ', "application/json", 400),  # malformed JSON
        (b"email=new%40example.com&password=a+fine+password", "text/plain", 415),
        (
            b'{"email": "new@example.com", "password": "a fine password", "name": "' + b"n" * 17_000 + b'"}',
            "application/json",
            413,  # over 16 KiB
        ),
    ],
)
def test_registration_bodies_that_cannot_be_read_write_nothing(
    env: dict[str, str], content: bytes, content_type: str, status: int
) -> None:
    settings = Settings.from_env({**env, "JWTAUTH_OPEN_REGISTRATION": "1"})
    add_user(settings, "alice@example.com")
    before = table_counts(settings.database)
    with TestClient(create_app(settings)) as client:
        response = client.post("/users", content=content, headers={"Content-Type": content_type})

    assert (response.status_code, response.json()["error"]) == (status, "invalid_request")
    assert table_counts(settings.database) == before


def test_successful_registrations_count_against_the_address_too(env: dict[str, str]) -> None:
    settings = Settings.from_env(
        {**env, "JWTAUTH_OPEN_REGISTRATION": "1", "JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS": "3"}
    )
    with TestClient(create_app(settings)) as client:
        bodies = [{"email": f"u{n}@example.com", "password": "a fine password"} for n in range(4)]
        statuses = [client.post("/users", json=body).status_code for body in bodies]

    assert statuses == [201, 201, 201, 429]
    assert table_counts(settings.database)["users"] == 3


def test_probing_taken_emails_is_throttled_per_address(env: dict[str, str], alice: Account) -> None:
    settings = Settings.from_env(
        {**env, "JWTAUTH_OPEN_REGISTRATION": "1", "JWTAUTH_LOGIN_MAX_FAILURES_PER_ADDRESS": "3"}
    )
    with TestClient(create_app(settings)) as client:
        statuses = [client.post("/users", json={"email": alice.email, "password": "a fine password"}).status_code
                    for _ in range(4)]  # fmt: skip

    assert statuses == [409, 409, 409, 429]


@pytest.mark.parametrize(
    "email",
    [
        '"quoted"@example.com',
        "<alice@example.com>",
        "Alice <alice@example.com>",
        "alice@example.com(comment)",
        "(comment)alice@example.com",
        "ali ce@example.com",
        "alice@exa mple.com",
        "alice\t@example.com",
        "alice\u200b@example.com",  # a zero-width space
        "alice\u202e@example.com",  # a right-to-left override
        "alice@[192.0.2.1]",
        "alice@example。com",  # an ideographic full stop, which NFKC keeps
        "alice@xn--bcher-kva.example",  # bücher.example in Punycode: one spelling is stored
    ],
)
def test_registration_refuses_what_is_not_a_plain_address(
    open_client: TestClient, settings: Settings, email: str
) -> None:
    add_user(settings, "alice@example.com")
    before = table_counts(settings.database)

    response = open_client.post("/users", json={"email": email, "password": "a fine password"})

    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert "email" in response.json()["error_description"]
    assert table_counts(settings.database) == before


@pytest.mark.parametrize(
    "spelling",
    [
        "jose\u0301@example.com",  # NFD: e and a combining acute accent
        full_width("jos") + "é" + full_width("@example.com"),
        "JOSÉ@EXAMPLE.COM",
        " José@Example.com\u3000",  # an ideographic space around it
    ],
)
def test_registering_another_spelling_of_a_taken_address_is_409(
    open_client: TestClient, settings: Settings, spelling: str
) -> None:
    """Look-alike accounts: every spelling that normalises (NFKC, case folding) to a taken address is that one."""
    add_user(settings, "josé@example.com")
    before = table_counts(settings.database)

    response = open_client.post("/users", json={"email": spelling, "password": "a fine password"})

    assert (response.status_code, response.json()["error"]) == (409, "email_taken")
    assert table_counts(settings.database) == before


def test_registration_stores_the_normalised_address(open_client: TestClient) -> None:
    email = full_width("STRA") + "ß" + full_width("E@B") + "ücher.Example"
    response = open_client.post("/users", json={"email": email, "password": "a fine password"})

    assert (response.status_code, response.json()["email"]) == (201, "strasse@bücher.example")
    pair = login(open_client, "strasse@bücher.example", "a fine password")
    assert (
        jwt.decode(str(pair["access_token"]), options={"verify_signature": False})["email"] == "strasse@bücher.example"
    )


# Backup and integrity


def restore(env: dict[str, str], backup: Path) -> dict[str, str]:
    """The environment of an installation restored from a `jwtauth db backup`: the SQLite file itself, or a
    new PostgreSQL database that pg_restore fills from the archive."""
    database = env["JWTAUTH_DATABASE"]
    if not is_postgres_url(database):
        with sqlite3.connect(backup) as conn:
            assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        return {**env, "JWTAUTH_DATABASE": str(backup)}
    server, _, _ = database.rpartition("/")
    query(f"{server}/postgres", "create database restored")
    pg_restore = shutil.which("pg_restore")
    assert pg_restore is not None
    subprocess.run([pg_restore, "--no-owner", f"--dbname={server}/restored", str(backup)], check=True, timeout=60)
    return {**env, "JWTAUTH_DATABASE": f"{server}/restored"}


def test_backup_under_refresh_load_restores_and_logs_in(env: dict[str, str], tmp_path: Path) -> None:
    add_user(Settings.from_env(env), "alice@example.com")
    server = start_server({**env, "JWTAUTH_REFRESH_REUSE_INTERVAL": "0"})
    stop = threading.Event()
    statuses: list[int] = []

    def refresh_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            token = http.post("/login", json={"email": "alice@example.com", "password": PASSWORD}).json()
            while not stop.is_set():
                response = http.post("/refresh", json={"refresh_token": token["refresh_token"]})
                statuses.append(response.status_code)
                if response.status_code != 200:
                    return
                token = response.json()

    def wait_for_refreshes(count: int) -> None:
        deadline = time.monotonic() + 30
        while len(statuses) < count and loader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    loader = threading.Thread(target=refresh_loop)
    loader.start()
    try:
        wait_for_refreshes(20)
        result = run_cli("db", "backup", str(tmp_path / "copy.db"), env=env)
        wait_for_refreshes(len(statuses) + 20)  # the load went on during and after the backup
    finally:
        stop.set()
        loader.join()
        stop_server(server)

    assert len(statuses) >= 40 and set(statuses) == {200}
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "copy.db"
    assert (copy.stat().st_mode & 0o777) == 0o600
    restored = restore(env, copy)
    assert run_cli("db", "check", env=restored).stdout.strip() == "ok"
    with TestClient(create_app(Settings.from_env(restored))) as client:
        assert login(client, "alice@example.com")["token_type"] == "Bearer"


@pytest.mark.sqlite_only
def test_db_check_reports_a_damaged_database(env: dict[str, str], settings: Settings) -> None:
    add_user(settings, "alice@example.com")
    rows = [(f"id{n}", f"u{n}@example.com") for n in range(2000)]
    conn = sqlite3.connect(settings.database)
    conn.execute("pragma journal_mode = delete")  # everything in the main file, none in a WAL
    with conn:
        conn.executemany(
            "insert into users (id, email, name, password_hash, created_at, updated_at) values (?, ?, '', 'x', 0, 0)",
            rows,
        )
    page_size = conn.execute("pragma page_size").fetchone()[0]
    root = conn.execute("select rootpage from sqlite_master where name = 'users'").fetchone()[0]
    conn.close()
    with Path(settings.database).open("r+b") as file:  # scribble over the users table's root page
        file.seek((root - 1) * page_size)
        file.write(b"\xa5" * page_size)

    result = run_cli("db", "check", env=env)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "problems" in result.stdout


@pytest.mark.sqlite_only
def test_backup_onto_the_database_itself_is_refused(env: dict[str, str], settings: Settings, alice: Account) -> None:
    for target in (env["JWTAUTH_DATABASE"], env["JWTAUTH_DATABASE"] + "-wal"):
        result = run_cli("db", "backup", target, env=env)

        assert (result.returncode, result.stderr.strip()) == (
            1,
            f"jwtauth: cannot back up {settings.database} onto itself",
        )
    assert run_cli("db", "check", env=env).stdout.strip() == "ok"


@pytest.mark.sqlite_only
def test_db_check_and_backup_without_a_database_fail_cleanly(env: dict[str, str], tmp_path: Path) -> None:
    for args in (("db", "check"), ("db", "backup", str(tmp_path / "copy.db"))):
        result = run_cli(*args, env=env)
        assert result.returncode == 1
        assert result.stderr.strip() == f"jwtauth: no database at {env['JWTAUTH_DATABASE']}"


# Emails stored before NFKC and case folding


@pytest.mark.sqlite_only
def test_the_upgrade_normalises_emails_and_leaves_look_alike_accounts_for_db_check(
    env: dict[str, str], settings: Settings
) -> None:
    """Schema 5 stored emails trimmed and lower-cased only; schema 6 brings each to NFKC with case folding,
    except accounts that become one address, which are named by `jwtauth db check` and never merged."""
    now, password_hash = int(time.time()), PasswordHasher(settings.argon2).hash(PASSWORD)
    with contextlib.closing(sqlite_at_schema(settings.database, 5)) as conn, conn:
        for number, email in enumerate(("jose\u0301@example.com", "\uff42ob@example.com", "straße@example.com",
                                        "strasse@example.com", "carol@example.com")):  # fmt: skip
            conn.execute(
                "insert into users (id, email, name, password_hash, is_disabled, created_at, updated_at)"
                " values (?, ?, '', ?, 0, ?, ?)",
                [f"u{number}", email, password_hash, now, now],
            )

    listed = run_cli("users", "list", env=env)  # any verb brings the schema up to date
    checked = run_cli("db", "check", env=env)

    assert listed.returncode == 0, listed.stderr
    assert sorted(row[0] for row in query(settings.database, "select email from users")) == [
        "bob@example.com", "carol@example.com", "josé@example.com", "strasse@example.com", "straße@example.com",
    ]  # fmt: skip
    assert checked.returncode == 1
    assert checked.stderr.strip() == (
        "2 accounts are one address once normalised (strasse@example.com): 'strasse@example.com', 'straße@example.com'"
    )
    with TestClient(create_app(settings)) as client:
        assert login(client, "José@Example.com")["token_type"] == "Bearer"  # NFC and capitals reach the one account
        assert login(client, "BOB@example.com")["token_type"] == "Bearer"


def test_db_check_names_an_email_not_stored_in_its_normalised_form(env: dict[str, str], alice: Account) -> None:
    assert run_cli("db", "check", env=env).returncode == 0
    query(env["JWTAUTH_DATABASE"], "update users set email = ? where id = ?", ["ALICE@example.com", alice.id])

    result = run_cli("db", "check", env=env)

    assert result.returncode == 1
    assert result.stderr.strip() == "email 'ALICE@example.com' is not stored as 'alice@example.com'"

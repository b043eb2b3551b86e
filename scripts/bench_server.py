"""The server side of the bench: an installation in a temp directory, users made with the CLI, a
pinned server process (jwtauth or the bare baseline), its process tree's memory and CPU from /proc,
and logins made before a run to get tokens."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench_noise import CLOCK_TICKS

HOST = "127.0.0.1"  # the bench talks to loopback only
PASSWORD = "bench-password-0123"  # noqa: S105 -- throw-away accounts in a temp database
DEFAULT_ARGON2 = "3,65536,4"  # argon2-cffi's default profile (RFC 9106 low-memory), jwtauth's default
CHEAP_ARGON2 = "1,8192,1"
SCRIPTS = Path(__file__).resolve().parent
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def argon2_env(parameters: str) -> dict[str, str]:
    """The JWTAUTH_ARGON2_* variables for `T,M,P`."""
    time_cost, memory_kib, parallelism = parameters.split(",")
    return {
        "JWTAUTH_ARGON2_TIME_COST": time_cost,
        "JWTAUTH_ARGON2_MEMORY_KIB": memory_kib,
        "JWTAUTH_ARGON2_PARALLELISM": parallelism,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Installation:
    """A fresh database (a SQLite file, or a PostgreSQL database of the bench's own cluster) and key
    directory, and the environment that points jwtauth at them."""

    directory: Path
    port: int
    database_url: str | None = None  # PostgreSQL; None: SQLite in the directory
    postmaster: int | None = None  # the PostgreSQL cluster's, to count its CPU
    command: tuple[str, ...] = ()  # the `jwtauth` to run (another version's, for --before); () for this one's

    @property
    def database(self) -> str:
        return "sqlite" if self.database_url is None else "postgresql"

    def env(self, argon2_parameters: str) -> dict[str, str]:
        database = {"JWTAUTH_DATABASE": str(self.directory / "bench.db")}
        if self.database_url is not None:
            database = {"JWTAUTH_DATABASE": self.database_url, "JWTAUTH_KEYS_PASSPHRASE": "bench passphrase"}
        return {
            **os.environ,
            **argon2_env(argon2_parameters),
            **database,
            "JWTAUTH_KEYS_DIR": str(self.directory / "keys"),
            "JWTAUTH_ISSUER": f"http://{HOST}:{self.port}",
            # Everything else at jwtauth's defaults (a 10 s refresh reuse interval, too).
        }

    def database_pids(self) -> list[int]:
        """The processes of the database server (PostgreSQL's); none for SQLite, which runs in jwtauth."""
        return process_tree(self.postmaster) if self.postmaster is not None else []

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def jwtauth(self) -> list[str]:
        return list(self.command) or jwtauth_command()

    def serve(self, workers: int) -> list[str]:
        """`jwtauth serve` on this installation's port, as a user runs it."""
        return [*self.jwtauth, *serve_arguments(workers, self.port)]


def jwtauth_command() -> list[str]:
    """The `jwtauth` console script of this interpreter's environment, else `python -m jwtauth`."""
    script = Path(sys.executable).with_name("jwtauth")
    return [str(script)] if script.exists() else [sys.executable, "-m", "jwtauth"]


def add_users(installation: Installation, emails: Sequence[str], argon2_parameters: str) -> None:
    """Create the accounts with `jwtauth users add EMAIL --password-stdin`: the first alone (it may create
    the database), the others two at a time.

    Raises:
        RuntimeError: a command failed; with what it printed.
    """
    env = installation.env(argon2_parameters)

    def add(email: str) -> None:
        command = [*installation.jwtauth, "users", "add", email, "--password-stdin"]
        done = subprocess.run(command, input=PASSWORD + "\n", env=env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"`jwtauth users add {email}` failed: {done.stderr.strip() or done.stdout.strip()}")

    for email in emails[:1]:
        add(email)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(add, emails[1:]))


def account_emails(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{number:04d}@bench.example.com" for number in range(count)]


# The process tree, from /proc


def process_tree(root: int) -> list[int]:
    """The pid root and every live descendant of it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory summed over the processes (statm: pages)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time summed over the processes (all their threads)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            continue
    return ticks / CLOCK_TICKS


class RssSampler:
    """Samples the summed RSS of a process tree every 50 ms in a thread; keeps the peak."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(process_tree(self.root)))

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


# Server processes


@dataclass
class Server:
    """A server process group started by the bench, pinned with taskset, logging to a file."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    cpus: str  # as given to taskset

    @property
    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Wait until the server uses under 10 % of a core: work that a finished run left (logins whose
        client is gone still hash) must not be counted against the next run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = cpu_seconds(self.pids)
            time.sleep(0.2)
            if cpu_seconds(self.pids) - before < 0.02:
                return

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully, and stops its workers), SIGKILL to the group after 15 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@contextmanager
def serving(command: Sequence[str], env: dict[str, str], cpus: str, base_url: str, log_path: Path) -> Iterator[Server]:
    """Start `taskset -c CPUS command`, wait until it answers HTTP, stop it on exit; on a failure, print the
    end of its log first (the log is in a temp directory that is about to go)."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            ["taskset", "-c", cpus, *command], env=env, stdout=log, stderr=log, start_new_session=True
        )
    server = Server(process, base_url, log_path, cpus)
    try:
        wait_ready(server)
        yield server
    except Exception:
        tail = log_path.read_text(errors="replace")[-3000:]
        print(f"server log {log_path} ends with:\n{tail}", file=sys.stderr)
        raise
    finally:
        server.stop()


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    """Poll GET /healthz until the server answers; raise if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            status, _ = request(server.base_url, "GET", "/healthz")
            if status in (200, 404):  # jwtauth's /healthz, or the bare app's 404: both are up
                return
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server did not start within {timeout:.0f} s")


def serve_arguments(workers: int, port: int) -> list[str]:
    return ["serve", "--host", HOST, "--port", str(port), "--workers", str(workers)]


def bare_serve(workers: int, port: int) -> list[str]:
    """The same `serve` command, through bench_bare.py, which swaps in the bare application."""
    return [sys.executable, str(SCRIPTS / "bench_bare.py"), *serve_arguments(workers, port)]


# HTTP from Python, before the runs: logins that give tokens


def request(base_url: str, method: str, path: str, body: object = None) -> tuple[int, object]:
    """One request on a new connection; return status and the decoded JSON body (None if not JSON)."""
    connection = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=30)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        connection.request(method, path, payload, headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, None


def login_many(base_url: str, emails: Sequence[str], count: int) -> list[dict[str, object]]:
    """Log in `count` times, round robin over the accounts, 4 at a time; return the token pairs."""

    def login(number: int) -> dict[str, object]:
        status, pair = request(
            base_url, "POST", "/login", {"email": emails[number % len(emails)], "password": PASSWORD}
        )
        if status != 200 or not isinstance(pair, dict):
            raise RuntimeError(f"login before the run failed: {status} {pair}")
        return pair

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(login, range(count)))

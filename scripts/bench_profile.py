"""Where a jwtauth worker's CPU goes under one load: py-spy samples the server while wrk drives it.

    python scripts/bench_profile.py refresh --py-spy /tmp/pyspy/bin/py-spy [--seconds 10] [--all-threads]

py-spy is not a dependency of the project: install it anywhere (`pip install --target /tmp/pyspy py-spy`)
and name its binary. The server runs as in the bench (one worker on CPU 0, wrk and py-spy on CPU 1);
the raw stacks go to results/profile-<load>.txt, and a summary (share of samples per category and the
functions with the most samples, inclusive and on their own) is printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import bench_wrk
from bench import ROUNDS, login_load, plan_for, refresh_pool
from bench_noise import CLOCK_TICKS
from bench_server import (
    CHEAP_ARGON2,
    DEFAULT_ARGON2,
    Installation,
    Server,
    account_emails,
    add_users,
    cpu_seconds,
    free_port,
    login_many,
    serving,
)
from bench_wrk import Load

REPO = Path(__file__).resolve().parent.parent
RATE = 250  # samples per second
# Logins are profiled at the default Argon2 parameters (the CPU-saturating case), the rest at cheap ones.
PROFILE_ACCOUNTS = {
    "login": "default",
    "login-cheap": "cheap",
    "refresh": "cheap",
    "jwks": "cheap",
    "userinfo": "cheap",
}
CATEGORIES = (  # first match wins; matched against "function (file:line)" frames, innermost first
    ("RS256 (PyJWT + cryptography)", ("jwt/algorithms.py", "cryptography/")),
    ("PyJWT outside the RSA operation", ("jwt/",)),
    ("Argon2", ("argon2/",)),
    ("SQLite (jwtauth/store/, sqlite3)", ("jwtauth/store/", "sqlite3/")),
    ("logging", ("logging/",)),
    ("anyio threads (to_thread hand-off)", ("anyio/", "concurrent/futures", "threading.py", "queue.py")),
    ("Starlette routing, requests, responses", ("starlette/",)),
    ("uvicorn + httptools (HTTP protocol)", ("uvicorn/", "httptools/")),
    ("asyncio event loop", ("asyncio/", "uvloop/")),
    ("JSON", ("json/",)),
    ("jwtauth (other)", ("jwtauth/",)),
)


def category(stack: Sequence[str]) -> str:
    for frame in reversed(stack):  # innermost first: the code that was running
        for name, markers in CATEGORIES:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw (folded) format: `frame;frame;... count` per line, outermost frame first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks[tuple(frames.split(";"))] += int(count)
    return stacks


def short(frame: str) -> str:
    """`fn (/long/path/site-packages/pkg/mod.py:12)` → `fn (pkg/mod.py)`."""
    function, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    for marker in ("site-packages/", f"{sysconfig.get_path('stdlib')}/", f"{REPO}/"):
        path = path.rpartition(marker)[2] if marker in path else path
    return f"{function} ({path})"


def summary(stacks: Counter[tuple[str, ...]], top: int = 25) -> str:
    total = sum(stacks.values()) or 1
    categories: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for stack, count in stacks.items():
        categories[category(stack)] += count
        own[short(stack[-1])] += count
        for frame in {short(frame) for frame in stack}:
            inclusive[frame] += count
    lines = [f"{total} samples", "", "by category (innermost matching frame):"]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in categories.most_common()]
    lines += ["", f"top {top} functions, inclusive:"]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in inclusive.most_common(top)]
    lines += ["", f"top {top} functions, own samples:"]
    lines += [f"  {count / total:6.1%}  {name}" for name, count in own.most_common(top)]
    return "\n".join(lines)


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of a process (/proc/<pid>/task/<tid>/stat), and under key 0 of the
    whole process, which also counts threads that have exited (Argon2 starts threads for each pass)."""
    seconds = {0: cpu_seconds([pid])}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rpartition(")")[2].split()
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def thread_usage(pid: int, before: dict[int, float], after: dict[int, float], seconds: float) -> str:
    """The CPU of the event-loop thread, of the other threads alive throughout, and in all, in cores."""
    total = after.pop(0) - before.pop(0)
    used = {tid: after[tid] - before[tid] for tid in after if tid in before}
    main = used.pop(pid, 0.0)
    busy = sum(1 for value in used.values() if value > 0)
    return (
        f"CPU: event loop thread {main / seconds:.2f} cores, {busy} other lasting threads"
        f" {sum(used.values()) / seconds:.2f} cores; the process in all {total / seconds:.2f}"
    )


def load_for(kind: str, server: Server, directory: Path, seconds: int) -> Load:
    """The wrk load of the bench for kind, with the tokens it needs obtained now."""
    url, emails = server.base_url, account_emails(PROFILE_ACCOUNTS[kind], 8)
    plan = plan_for(1, seconds, ROUNDS)  # the bench's connections for one worker
    if kind == "refresh":
        pool = refresh_pool(server, emails, 3 * plan.connections, directory / "refresh.tokens")
        return Load(f"{url}/refresh", "refresh.lua", (str(pool), "1"), seconds, plan.connections)
    if kind == "userinfo":
        token = str(login_many(url, emails, 1)[0]["access_token"])
        return Load(f"{url}/userinfo", "get.lua", (token,), seconds, plan.connections)
    if kind in ("login", "login-cheap"):
        emails_file = directory / "accounts.emails"
        emails_file.write_text("".join(f"{email}\n" for email in emails))
        return login_load(plan, url, emails_file, seconds)
    return Load(f"{url}/.well-known/jwks.json", "get.lua", (), seconds, plan.connections)


def profile(kind: str, py_spy: str, seconds: int, out: Path, all_threads: bool) -> Path:
    """Serve (one worker, CPU 0), start wrk, record py-spy for the same time; return the stacks."""
    with tempfile.TemporaryDirectory(prefix="jwtauth-profile-") as directory:
        installation = Installation(Path(directory), free_port())
        parameters = DEFAULT_ARGON2 if PROFILE_ACCOUNTS[kind] == "default" else CHEAP_ARGON2
        add_users(installation, account_emails(PROFILE_ACCOUNTS[kind], 8), parameters)
        env = installation.env(parameters)
        log = Path(directory) / "server.log"
        with serving(installation.serve(1), env, "0", installation.base_url, log) as server:
            load = load_for(kind, server, Path(directory), seconds + 2)
            wrk = bench_wrk.start(load)
            # --gil: only the thread holding the GIL, i.e. the Python work of the process; C code that
            # releases the GIL (RSA in cryptography, SQLite's stepping, Argon2) is not sampled. Without it
            # (--all-threads), every thread that is not idle, in the Python frame that called the C code, which
            # shows where the CPU goes. --nonblocking keeps py-spy from pausing the server (--native would need
            # pauses, which slow it 5-fold).
            record = ["taskset", "-c", "1", py_spy, "record", "--pid", str(server.process.pid), "--rate", str(RATE)]
            record += [] if all_threads else ["--gil"]
            record += ["--nonblocking", "--duration", str(seconds), "--format", "raw", "--output", str(out)]
            before = thread_seconds(server.process.pid)
            subprocess.run(record, check=True, capture_output=True, timeout=seconds + 60)
            after = thread_seconds(server.process.pid)
            result = bench_wrk.finish(wrk, load)
            print(f"{kind}: {result.requests_per_s:,.0f} req/s, p99 {result.p99_ms:.1f} ms, non-2xx {result.non2xx}")
            print(thread_usage(server.process.pid, before, after, seconds))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=tuple(PROFILE_ACCOUNTS))
    parser.add_argument("--py-spy", required=True, help="the py-spy binary")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--all-threads", action="store_true", help="sample busy threads, not only the GIL holder")
    args = parser.parse_args(argv)
    (REPO / "results").mkdir(exist_ok=True)
    stacks = profile(
        args.load, args.py_spy, args.seconds, REPO / "results" / f"profile-{args.load}.txt", args.all_threads
    )
    samples = read_stacks(stacks)
    sampled = "a thread was busy" if args.all_threads else "the GIL was held"
    print(f"{sampled} in {sum(samples.values()) / (RATE * args.seconds):.0%} of the samples' instants")
    print(summary(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())

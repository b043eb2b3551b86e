"""`make bench`: jwtauth's throughput and latency next to the limits its cryptography allows.

Starts `jwtauth serve` in a temp directory (fresh database and keys, accounts made with `jwtauth users
add`), drives it over loopback with wrk (scripts/wrk/*.lua), and measures on the same cores the limits:
RS256 signatures and verifications, Argon2 verifications, and bare Starlette endpoints under the same
uvicorn set-up. The server gets the first --workers CPUs, wrk the next (on 2 CPUs, --workers 2 shares CPU 1).
The cheap loads, their baselines and limits are taken in rounds and reported as medians; login at default
Argon2 runs once, between two measurements of its limit. Every run is bounded in time.
Writes results/<time>.{md,json} and results/latest.{md,json}, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bench_report
import bench_wrk
from bench_limits import measure_limit
from bench_noise import bench_seconds, other_load, parse_cpus
from bench_postgres import pin, postgres_cluster
from bench_server import (
    CHEAP_ARGON2,
    DEFAULT_ARGON2,
    PASSWORD,
    Installation,
    RssSampler,
    Server,
    account_emails,
    add_users,
    bare_serve,
    cpu_seconds,
    free_port,
    jwtauth_serve,
    login_many,
    rss_bytes,
    serving,
)
from bench_wrk import Load

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """How one worker count is run: durations, connections, and which CPUs each side gets."""

    workers: int
    seconds: int
    server_cpus: str
    wrk_cpus: str
    limit_cpus: tuple[int, ...]  # one limit process per server core
    shared: bool  # wrk runs on a core the server also has

    @property
    def limit_seconds(self) -> float:
        return min(3.0, max(1.0, self.seconds / 2))

    @property
    def connections(self) -> int:
        return 16 * self.workers

    @property
    def login_connections(self) -> int:
        """Enough to keep every worker's Argon2 slots (one per core) busy, few enough for useful latencies."""
        return 4 * self.workers


def plan_for(workers: int, seconds: int) -> Plan:
    """The server on the first `workers` CPUs, wrk on the next one; on 2 CPUs, `--workers 2` shares CPU 1."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("the bench needs 2 CPUs: one for the server, one for wrk")
    server = cpus[: min(workers, len(cpus))]
    wrk = cpus[len(server)] if len(server) < len(cpus) else cpus[-1]
    return Plan(
        workers=workers,
        seconds=seconds,
        server_cpus=",".join(map(str, server)),
        wrk_cpus=str(wrk),
        limit_cpus=tuple(server),
        shared=wrk in server,
    )


# Measuring one load, with how busy the rest of the machine was meanwhile


def measure(
    server: Server, load: Load, warmup: Load | None = None, warm: bool = True, database: Sequence[int] = ()
) -> dict[str, Any]:
    """A 1 s warm-up if `warm` (the same load unless another is given), then the measured run. `database`:
    the pids of a database server beside jwtauth, whose CPU is reported apart and not taken for noise."""
    log(f"{load.url.partition('//')[2].partition('/')[2] or '/'}: {load.seconds} s, {load.connections} connections")
    if warm:
        bench_wrk.run(warmup or dataclasses.replace(load, seconds=1))
    server.wait_idle()
    cpus = sorted(set(parse_cpus(server.cpus)) | set(parse_cpus(load.cpus)))  # wrk's core counts too
    server_pids = server.pids

    def ours() -> float:
        return cpu_seconds(server_pids) + cpu_seconds(database) + bench_seconds(with_children=True)

    result: dict[str, Any] = {}
    wrk_before, started = bench_seconds(with_children=True) - bench_seconds(with_children=False), time.monotonic()
    server_before, database_before = cpu_seconds(server_pids), cpu_seconds(database)
    with other_load(cpus, ours, result):
        result.update(bench_wrk.run(load).as_dict())
    wrk_seconds = bench_seconds(with_children=True) - bench_seconds(with_children=False) - wrk_before
    result["wrk_cpu_cores"] = round(wrk_seconds / (time.monotonic() - started), 3)  # near 1: wrk was the limit
    requests = max(1, result["requests"])
    result["server_cpu_us"] = round(1e6 * (cpu_seconds(server_pids) - server_before) / requests, 1)
    result["database_cpu_us"] = round(1e6 * (cpu_seconds(database) - database_before) / requests, 1)
    return result


# The phases of one worker count


LIMITS = {  # name in the results: (bench_limits kind, Argon2 parameters)
    "rs256_sign": ("rs256-sign", DEFAULT_ARGON2),
    "rs256_verify": ("rs256-verify", DEFAULT_ARGON2),
    "argon2_default": ("argon2-verify", DEFAULT_ARGON2),
    "argon2_cheap": ("argon2-verify", CHEAP_ARGON2),
}
ROUND_LIMITS = ("rs256_sign", "rs256_verify", "argon2_cheap")  # measured again in every round
# The cheap endpoints, their baselines and limits are measured in turn, in rounds, so that a slow spell of
# the machine (these cores are virtual and shared) falls on both sides of a ratio rather than on one.
ROUNDS = 5


def measure_limits(plan: Plan, names: Sequence[str], seconds: float) -> dict[str, Any]:
    """Each named limit on the server's cores, and the other load the machine had meanwhile."""
    limits: dict[str, Any] = {"other_load_cores": {}}
    for name in names:
        kind, argon2_parameters = LIMITS[name]
        noise: dict[str, Any] = {}
        with other_load(plan.limit_cpus, lambda: bench_seconds(with_children=True), noise):
            limits[name] = measure_limit(kind, plan.limit_cpus, seconds, argon2_parameters)
        limits["other_load_cores"][name] = noise["other_load_cores"]
    return limits


def combine_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One load's rounds as one result: the median rate and p50 (a round that met a slow spell does not
    move them), the worst p99, maximum and other load, counts added up; `rounds` keeps each round's rate."""
    requests, seconds = sum(run["requests"] for run in runs), sum(run["seconds"] for run in runs)
    return {
        **runs[0],
        "requests": requests,
        "seconds": round(seconds, 3),
        "requests_per_s": statistics.median(run["requests_per_s"] for run in runs),
        "p50_ms": statistics.median(run["p50_ms"] for run in runs),
        "p99_ms": max(run["p99_ms"] for run in runs),
        "max_ms": max(run["max_ms"] for run in runs),
        "non2xx": sum(run["non2xx"] for run in runs),
        "first_non2xx_status": next((run["first_non2xx_status"] for run in runs if run["non2xx"]), 0),
        "socket_errors": sum(run["socket_errors"] for run in runs),
        "other_load_cores": max(run["other_load_cores"] for run in runs),
        "wrk_cpu_cores": round(statistics.mean(run["wrk_cpu_cores"] for run in runs), 3),
        "server_cpu_us": statistics.median(run["server_cpu_us"] for run in runs),
        "database_cpu_us": statistics.median(run["database_cpu_us"] for run in runs),
        "rounds": [round(run["requests_per_s"], 1) for run in runs],
    }


def combine_limits(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' limits: each the median of its rounds, with the worst other load; `rounds` keeps each."""
    names = [name for name in rounds[0] if name != "other_load_cores"]
    combined: dict[str, Any] = {name: statistics.median(limits[name] for limits in rounds) for name in names}
    combined["other_load_cores"] = {name: max(limits["other_load_cores"][name] for limits in rounds) for name in names}
    combined["rounds"] = {name: [round(limits[name], 1) for limits in rounds] for name in names}
    return combined


def login_load(plan: Plan, url: str, emails_file: Path, seconds: int) -> Load:
    args = (str(emails_file), PASSWORD, "1")  # "1": wrk's thread count (Load's default), to share the file out
    return Load(f"{url}/login", "login.lua", args, seconds, plan.login_connections, cpus=plan.wrk_cpus)


def refresh_pool(server: Server, emails: Sequence[str], count: int, path: Path) -> Path:
    """Log in `count` times and write the refresh tokens to path, one a line (a pool for refresh.lua)."""
    pairs = login_many(server.base_url, emails, count)
    path.write_text("".join(f"{pair['refresh_token']}\n" for pair in pairs))
    return path


def cheap_phase(plan: Plan, installation: Installation, emails: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bare Starlette app and jwtauth (cheap Argon2) served side by side on the same cores; in each of
    ROUNDS rounds, one after another: the limits other than default Argon2, bare POST, refresh, login at
    cheap Argon2, bare GET, JWKS and userinfo. Returns (limits with the baselines, endpoints)."""
    url, directory = installation.base_url, installation.directory
    bare_port = free_port()
    bare_url = f"http://127.0.0.1:{bare_port}"
    seconds = max(1, round(plan.seconds / ROUNDS))  # --seconds is the measured time of each load, in all
    limit_seconds = max(1.0, plan.limit_seconds / 2)  # tight loops: their rate settles within a second
    body = '{"refresh_token":"' + "r" * 43 + '"}'
    runs: dict[str, list[dict[str, Any]]] = {}
    round_limits: list[dict[str, Any]] = []
    env = installation.env(CHEAP_ARGON2)
    with (
        serving(bare_serve(plan.workers, bare_port), env, plan.server_cpus, bare_url,
                directory / f"bare-{plan.workers}.log") as bare,
        serving(jwtauth_serve(plan.workers, installation.port), env, plan.server_cpus, url,
                directory / f"cheap-{plan.workers}.log") as server,
    ):  # fmt: skip
        pool_size = 3 * plan.connections  # each connection has a token out; the queue never runs dry
        for number in range(1, ROUNDS + 1):
            log(f"round {number} of {ROUNDS}: limits on CPU {plan.server_cpus}, {limit_seconds} s each")
            round_limits.append(measure_limits(plan, ROUND_LIMITS, limit_seconds))
            warm = number == 1  # a server's first requests are slower: a 1 s warm-up in the first round
            # Each endpoint right after the baseline it is compared with, so that both meet the same machine.
            post = Load(f"{bare_url}/post", "post_json.lua", (body,), seconds, plan.connections, cpus=plan.wrk_cpus)
            runs.setdefault("bare_post", []).append(measure(bare, post, warm=warm))
            pool = refresh_pool(server, emails, pool_size, directory / f"refresh-{number}.tokens")
            refresh = Load(f"{url}/refresh", "refresh.lua", (str(pool), "1"), seconds, plan.connections,  # 1 thread
                           cpus=plan.wrk_cpus)  # fmt: skip
            warmup = None
            if warm:
                warm_pool = refresh_pool(server, emails, pool_size, directory / "refresh-warmup.tokens")
                warmup = dataclasses.replace(refresh, args=(str(warm_pool), "1"), seconds=1)
            database = installation.database_pids()
            runs.setdefault("refresh", []).append(measure(server, refresh, warmup, warm=warm, database=database))
            login = login_load(plan, url, directory / "cheap.emails", seconds)
            runs.setdefault("login_cheap", []).append(measure(server, login, warm=warm, database=database))
            get = Load(f"{bare_url}/get", "get.lua", (), seconds, plan.connections, cpus=plan.wrk_cpus)
            runs.setdefault("bare_get", []).append(measure(bare, get, warm=warm))
            # A session of its own each round: the login loads above end an account's oldest sessions beyond
            # JWTAUTH_MAX_SESSIONS_PER_USER, and with them an access token taken at the start.
            access_token = str(login_many(url, emails, 1)[0]["access_token"])
            for name, path, args in (
                ("jwks", "/.well-known/jwks.json", ()),
                ("userinfo", "/userinfo", (access_token,)),
            ):
                load = Load(f"{url}{path}", "get.lua", args, seconds, plan.connections, cpus=plan.wrk_cpus)
                runs.setdefault(name, []).append(measure(server, load, warm=warm, database=database))
    endpoints = {name: combine_runs(results) for name, results in runs.items()}
    limits = combine_limits(round_limits)
    limits["bare_get"], limits["bare_post"] = endpoints.pop("bare_get"), endpoints.pop("bare_post")
    return limits, endpoints


def loaded_phase(plan: Plan, server: Server, emails_file: Path, access_token: str) -> dict[str, Any]:
    """JWKS and userinfo latency from low-rate probes (2 connections, 20 ms apart) during a login flood."""
    url = server.base_url
    server.wait_idle()
    flood = login_load(plan, url, emails_file, plan.seconds + 2)
    flood_process = bench_wrk.start(flood)
    time.sleep(1)  # let the flood fill the Argon2 slots first
    probes = {
        "jwks": Load(f"{url}/.well-known/jwks.json", "probe.lua", ("20",), plan.seconds, 2, cpus=plan.wrk_cpus),
        "userinfo": Load(f"{url}/userinfo", "probe.lua", ("20", access_token), plan.seconds, 2, cpus=plan.wrk_cpus),
    }
    noise: dict[str, Any] = {}
    cpus = sorted(set(parse_cpus(server.cpus)) | set(parse_cpus(plan.wrk_cpus)))
    with other_load(cpus, lambda: cpu_seconds(server.pids) + bench_seconds(with_children=True), noise):
        started = {name: bench_wrk.start(load) for name, load in probes.items()}
        results: dict[str, Any] = {
            name: bench_wrk.finish(started[name], load).as_dict() for name, load in probes.items()
        }
    results["flood"] = bench_wrk.finish(flood_process, flood).as_dict()
    results["other_load_cores"] = noise["other_load_cores"]
    return results


def default_phase(plan: Plan, installation: Installation, emails: Sequence[str]) -> dict[str, Any]:
    """Login at default Argon2 between two measurements of its Argon2 limit, with the server's memory
    sampled, then the latency probes during a flood."""
    url, directory = installation.base_url, installation.directory
    log_path = directory / f"default-{plan.workers}.log"
    with serving(jwtauth_serve(plan.workers, installation.port), installation.env(DEFAULT_ARGON2),
                 plan.server_cpus, url, log_path) as server:  # fmt: skip
        idle = rss_bytes(server.pids)
        access_token = str(login_many(url, emails, 1)[0]["access_token"])
        with RssSampler(server.process.pid).running() as sampler:
            # Its limit right before and right after it: Argon2 at 64 MiB is the most sensitive to a
            # slow spell of the machine, and a run of it takes long enough to meet one.
            log(f"limit at default Argon2 on CPU {plan.server_cpus}: {plan.limit_seconds} s, before and after")
            limits = [measure_limits(plan, ["argon2_default"], plan.limit_seconds)]
            login = measure(server, login_load(plan, url, directory / "default.emails", plan.seconds),
                            database=installation.database_pids())  # fmt: skip
            limits.append(measure_limits(plan, ["argon2_default"], plan.limit_seconds))
            loaded = loaded_phase(plan, server, directory / "default.emails", access_token)
        memory = {"idle_mib": idle / MIB, "peak_mib": sampler.peak / MIB}
        return {"login_default": login, "loaded": loaded, "memory": memory, "limits": combine_limits(limits)}


def run_workers(plan: Plan, installation: Installation, accounts: dict[str, list[str]]) -> dict[str, Any]:
    """Everything measured for one worker count, with the database's server (if any) on the server's cores."""
    if installation.postmaster is not None:
        pin(installation.postmaster, plan.server_cpus)
    limits, endpoints = cheap_phase(plan, installation, accounts["cheap"])
    default = default_phase(plan, installation, accounts["default"])
    endpoints["login_default"] = default["login_default"]
    for key in ("other_load_cores", "rounds"):
        limits[key]["argon2_default"] = default["limits"][key]["argon2_default"]
    limits["argon2_default"] = default["limits"]["argon2_default"]
    cpus = {"server": plan.server_cpus, "wrk": plan.wrk_cpus, "shared": plan.shared}
    return {"database": installation.database, "workers": plan.workers, "cpus": cpus, "limits": limits,
            "endpoints": endpoints, "loaded": default["loaded"], "memory": default["memory"]}  # fmt: skip


# Offline verification, and the set-up


def verify_phase(seconds: float) -> dict[str, Any]:
    """jwtauth's verifiers against PyJWT's decode, on CPU 0."""
    return {
        "pyjwt_decode": measure_limit("rs256-verify", (0,), seconds),
        "verify_access_token": measure_limit("verify-access-token", (0,), seconds),
        "jwtauth_verify": measure_limit("jwtauth-verify", (0,), seconds),
    }


def create_accounts(installation: Installation, users: int) -> dict[str, list[str]]:
    """`users` accounts hashed at each Argon2 setting (so no login re-hashes), and their email files."""
    accounts = {"default": account_emails("default", users), "cheap": account_emails("cheap", users)}
    add_users(installation, accounts["cheap"], CHEAP_ARGON2)
    add_users(installation, accounts["default"], DEFAULT_ARGON2)
    for name, emails in accounts.items():
        (installation.directory / f"{name}.emails").write_text("".join(f"{email}\n" for email in emails))
    return accounts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seconds", type=int, default=10, help="measured seconds of each load, over all rounds (default 10)"
    )
    parser.add_argument("--users", type=int, default=32, help="accounts per Argon2 setting (default 32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--database", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"],
                        help="storage backends (default both; PostgreSQL: a cluster of the bench's own)")  # fmt: skip
    parser.add_argument("--results", type=Path, default=REPO / "results", help="where to write the report")
    parser.add_argument("--update-readme", action="store_true", help="put the table in README.md's Performance")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench_wrk.check_wrk()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    results: dict[str, Any] = {"started_at": started, "machine": bench_report.machine(), "runs": {}}
    results["settings"] = {"seconds": args.seconds, "users": args.users, "workers": args.workers, "rounds": ROUNDS,
                           "databases": args.database}  # fmt: skip
    for database in args.database:
        with (
            tempfile.TemporaryDirectory(prefix="jwtauth-bench-") as directory,
            installed(database, Path(directory), args.workers) as installation,
        ):
            log(f"{database}: creating {2 * args.users} accounts with `jwtauth users add`")
            accounts = create_accounts(installation, args.users)
            for workers in args.workers:
                log(f"{database}, --workers {workers}")
                run = run_workers(plan_for(workers, args.seconds), installation, accounts)
                results["runs"][f"{database}/{workers}"] = run
    results["verify"] = verify_phase(min(3.0, max(1.0, args.seconds / 2)))
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    latest_md, _ = bench_report.write(results, args.results)
    print(latest_md.read_text())
    if args.update_readme:
        bench_report.update_readme(
            REPO / "README.md", latest_md.read_text(), f"make bench BENCH_SECONDS={args.seconds}"
        )
    return 0


@contextmanager
def installed(database: str, directory: Path, workers: Sequence[int]) -> Iterator[Installation]:
    """A fresh installation in `directory`; for PostgreSQL with a cluster of its own, first on the cores of
    the first worker count's server (each run pins it anew)."""
    if database == "sqlite":
        yield Installation(directory, free_port())
        return
    with postgres_cluster(plan_for(workers[0], 1).server_cpus) as (url, postmaster):
        yield Installation(directory, free_port(), url, postmaster)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

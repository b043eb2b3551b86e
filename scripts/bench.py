"""`make bench`: jwtauth's throughput and latency next to the limits its cryptography allows.

Starts `jwtauth serve` in a temp directory (fresh database and keys, accounts made with `jwtauth users
add`), drives it over loopback with wrk (scripts/wrk/*.lua), and measures on the same cores the limits:
RS256 signatures and verifications, Argon2 verifications, and bare Starlette endpoints under the same
uvicorn set-up. The server gets the first --workers CPUs, wrk the next (on 2 CPUs, --workers 2 shares CPU 1).
The cheap loads, their baselines and limits are taken in rounds and reported as medians; login at default
Argon2 runs once, between two measurements of its limit. Every run is bounded in time.
With --before COMMIT, that commit's jwtauth is served beside this one and every endpoint is measured on both,
one right after the other, in more rounds (login at default Argon2 too); see bench_before.py.
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bench_before
import bench_report
import bench_wrk
from bench_limits import measure_limit
from bench_noise import bench_seconds, other_load, parse_cpus
from bench_postgres import create_database, pin, postgres_cluster
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
    rounds: int
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

    def round_seconds(self, least: int = 1) -> int:
        """Each round's share of a load's measured seconds, at least `least`."""
        return max(least, round(self.seconds / self.rounds))

    @property
    def login_connections(self) -> int:
        """Enough to keep every worker's Argon2 slots (one per core) busy, few enough for useful latencies."""
        return 4 * self.workers


def plan_for(workers: int, seconds: int, rounds: int) -> Plan:
    """The server on the first `workers` CPUs, wrk on the next one; on 2 CPUs, `--workers 2` shares CPU 1."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("the bench needs 2 CPUs: one for the server, one for wrk")
    server = cpus[: min(workers, len(cpus))]
    wrk = cpus[len(server)] if len(server) < len(cpus) else cpus[-1]
    return Plan(
        workers=workers,
        seconds=seconds,
        rounds=rounds,
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
ROUNDS_BEFORE = 8  # with --before: each round gives one change per endpoint, and the noise is their spread;
# an even number, so that each version is measured first in half of them
BEFORE_SECONDS = 2  # with --before, the least measured time of a load in a round (1 s runs are too uneven)
BEFORE_LOGIN_SECONDS = 6  # the same for login at default Argon2, a few logins per second per core


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


def measure_in_turn(
    servers: Sequence[Server],
    installations: Sequence[Installation],
    loads: Sequence[Load],
    number: int,
    warmups: Sequence[Load | None] = (),
) -> list[dict[str, Any]]:
    """Each installation's load (loads[i] on servers[i]), one after another in round `number`'s order, with a
    warm-up in the first round; the results in the installations' order."""
    results: dict[int, dict[str, Any]] = {}
    for index in in_turn(len(installations), number):
        warmup = warmups[index] if warmups else None
        database = installations[index].database_pids()
        results[index] = measure(servers[index], loads[index], warmup, warm=number == 1, database=database)
    return [results[index] for index in range(len(installations))]


def in_turn(count: int, number: int) -> list[int]:
    """The order of `count` installations in round `number` (from 1): first to last in odd rounds, last to first
    in even ones, so that none is always measured first."""
    return list(range(count))[:: 1 if number % 2 else -1]


def login_load(plan: Plan, url: str, emails_file: Path, seconds: int) -> Load:
    args = (str(emails_file), PASSWORD, "1")  # "1": wrk's thread count (Load's default), to share the file out
    return Load(f"{url}/login", "login.lua", args, seconds, plan.login_connections, cpus=plan.wrk_cpus)


def refresh_pool(server: Server, emails: Sequence[str], count: int, path: Path) -> Path:
    """Log in `count` times and write the refresh tokens to path, one a line (a pool for refresh.lua)."""
    pairs = login_many(server.base_url, emails, count)
    path.write_text("".join(f"{pair['refresh_token']}\n" for pair in pairs))
    return path


def cheap_phase(
    plan: Plan, installations: Sequence[Installation], emails: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The bare Starlette app and jwtauth (cheap Argon2) served side by side on the same cores, jwtauth once
    per installation (this version, and the one before with --before); in each of the plan's rounds, one after
    another: the limits other than default Argon2, bare POST, refresh, login at cheap Argon2, bare GET, JWKS
    and userinfo, each jwtauth load on every installation in turn, in an order that alternates from round to
    round. Returns (limits with the baselines, each installation's endpoints)."""
    first = installations[0]
    bare_port = free_port()
    bare_url = f"http://127.0.0.1:{bare_port}"
    # --seconds is the measured time of each load, in all
    seconds = plan.round_seconds(BEFORE_SECONDS if len(installations) > 1 else 1)
    limit_seconds = max(1.0, plan.limit_seconds / 2)  # tight loops: their rate settles within a second
    body = '{"refresh_token":"' + "r" * 43 + '"}'
    runs: list[dict[str, list[dict[str, Any]]]] = [{} for _ in installations]
    bare_runs: dict[str, list[dict[str, Any]]] = {}
    round_limits: list[dict[str, Any]] = []
    pool_size = 3 * plan.connections  # each connection has a token out; the queue never runs dry
    with ExitStack() as stack:
        bare = stack.enter_context(
            serving(
                bare_serve(plan.workers, bare_port),
                first.env(CHEAP_ARGON2),
                plan.server_cpus,
                bare_url,
                first.directory / f"bare-{plan.workers}.log",
            )
        )
        servers = [stack.enter_context(serving(installation.serve(plan.workers), installation.env(CHEAP_ARGON2),
                                               plan.server_cpus, installation.base_url,
                                               installation.directory / f"cheap-{plan.workers}.log"))
                   for installation in installations]  # fmt: skip

        def on_each(name: str, number: int, loads: Sequence[Load], warmups: Sequence[Load | None] = ()) -> None:
            results = measure_in_turn(servers, installations, loads, number, warmups)
            for each, result in zip(runs, results, strict=True):
                each.setdefault(name, []).append(result)

        for number in range(1, plan.rounds + 1):
            log(f"round {number} of {plan.rounds}: limits on CPU {plan.server_cpus}, {limit_seconds} s each")
            round_limits.append(measure_limits(plan, ROUND_LIMITS, limit_seconds))
            warm = number == 1  # a server's first requests are slower: a 1 s warm-up in the first round

            # Each endpoint right after the baseline it is compared with, so that both meet the same machine.
            post = Load(f"{bare_url}/post", "post_json.lua", (body,), seconds, plan.connections, cpus=plan.wrk_cpus)
            bare_runs.setdefault("bare_post", []).append(measure(bare, post, warm=warm))
            refreshes, warmups = [], []
            for installation, server in zip(installations, servers, strict=True):
                pool = refresh_pool(server, emails, pool_size, installation.directory / f"refresh-{number}.tokens")
                refresh = Load(f"{server.base_url}/refresh", "refresh.lua", (str(pool), "1"), seconds,  # 1 thread
                               plan.connections, cpus=plan.wrk_cpus)  # fmt: skip
                refreshes.append(refresh)
                if warm:
                    warm_path = installation.directory / "refresh-warmup.tokens"
                    warm_pool = refresh_pool(server, emails, pool_size, warm_path)
                    warmups.append(dataclasses.replace(refresh, args=(str(warm_pool), "1"), seconds=1))
            on_each("refresh", number, refreshes, warmups)
            logins = [login_load(plan, installation.base_url, installation.directory / "cheap.emails", seconds)
                      for installation in installations]  # fmt: skip
            on_each("login_cheap", number, logins)
            get = Load(f"{bare_url}/get", "get.lua", (), seconds, plan.connections, cpus=plan.wrk_cpus)
            bare_runs.setdefault("bare_get", []).append(measure(bare, get, warm=warm))
            # A session of its own each round: the login loads above end an account's oldest sessions beyond
            # JWTAUTH_MAX_SESSIONS_PER_USER, and with them an access token taken at the start.
            tokens = [str(login_many(server.base_url, emails, 1)[0]["access_token"]) for server in servers]
            for name, path, token in (("jwks", "/.well-known/jwks.json", False), ("userinfo", "/userinfo", True)):
                args = [(access_token,) if token else () for access_token in tokens]
                loads = [Load(f"{server.base_url}{path}", "get.lua", each, seconds, plan.connections,
                              cpus=plan.wrk_cpus) for server, each in zip(servers, args, strict=True)]  # fmt: skip
                on_each(name, number, loads)
    endpoints = [{name: combine_runs(results) for name, results in each.items()} for each in runs]
    limits = combine_limits(round_limits)
    limits["bare_get"], limits["bare_post"] = (combine_runs(bare_runs[name]) for name in ("bare_get", "bare_post"))
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


def default_phase(plan: Plan, installations: Sequence[Installation], emails: Sequence[str]) -> dict[str, Any]:
    """Login at default Argon2 between two measurements of its Argon2 limit, with the server's memory
    sampled, then the latency probes during a flood. With the installation before, both are served, and
    login runs in the plan's rounds, on each in turn; memory and latency are this version's only."""
    first = installations[0]
    with ExitStack() as stack:
        servers = [stack.enter_context(serving(installation.serve(plan.workers), installation.env(DEFAULT_ARGON2),
                                               plan.server_cpus, installation.base_url,
                                               installation.directory / f"default-{plan.workers}.log"))
                   for installation in installations]  # fmt: skip
        server = servers[0]
        idle = rss_bytes(server.pids)
        access_token = str(login_many(first.base_url, emails, 1)[0]["access_token"])
        logins: list[list[dict[str, Any]]] = [[] for _ in installations]
        with RssSampler(server.process.pid).running() as sampler:
            # Its limit right before and right after it: Argon2 at 64 MiB is the most sensitive to a
            # slow spell of the machine, and a run of it takes long enough to meet one.
            log(f"limit at default Argon2 on CPU {plan.server_cpus}: {plan.limit_seconds} s, before and after")
            limits = [measure_limits(plan, ["argon2_default"], plan.limit_seconds)]
            if len(installations) == 1:
                load = login_load(plan, first.base_url, first.directory / "default.emails", plan.seconds)
                logins[0].append(measure(server, load, database=first.database_pids()))
            else:
                for number in range(1, plan.rounds + 1):
                    for index in in_turn(len(installations), number):
                        installation = installations[index]
                        load = login_load(plan, installation.base_url, installation.directory / "default.emails",
                                          plan.round_seconds(BEFORE_LOGIN_SECONDS))  # fmt: skip
                        logins[index].append(measure(servers[index], load, warm=number == 1,
                                                     database=installation.database_pids()))  # fmt: skip
            limits.append(measure_limits(plan, ["argon2_default"], plan.limit_seconds))
            for other in servers[1:]:
                other.stop()  # the probes measure this version alone
            loaded = loaded_phase(plan, server, first.directory / "default.emails", access_token)
        memory = {"idle_mib": idle / MIB, "peak_mib": sampler.peak / MIB}
        login_default = [each[0] if len(each) == 1 else combine_runs(each) for each in logins]
        return {"login_default": login_default, "loaded": loaded, "memory": memory, "limits": combine_limits(limits)}


def run_workers(plan: Plan, installations: Sequence[Installation], accounts: dict[str, list[str]]) -> dict[str, Any]:
    """Everything measured for one worker count, with the database's server (if any) on the server's cores.
    With an installation before this one, its endpoints are under "before"."""
    first = installations[0]
    if first.postmaster is not None:
        pin(first.postmaster, plan.server_cpus)
    limits, endpoints = cheap_phase(plan, installations, accounts["cheap"])
    default = default_phase(plan, installations, accounts["default"])
    for each, login in zip(endpoints, default["login_default"], strict=True):
        each["login_default"] = login
    for key in ("other_load_cores", "rounds"):
        limits[key]["argon2_default"] = default["limits"][key]["argon2_default"]
    limits["argon2_default"] = default["limits"]["argon2_default"]
    cpus = {"server": plan.server_cpus, "wrk": plan.wrk_cpus, "shared": plan.shared}
    run = {"database": first.database, "workers": plan.workers, "cpus": cpus, "limits": limits,
           "endpoints": endpoints[0], "loaded": default["loaded"], "memory": default["memory"]}  # fmt: skip
    if len(installations) > 1:
        run["before"] = {"endpoints": endpoints[1]}
    return run


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
    parser.add_argument("--before", metavar="COMMIT",
                        help="also serve COMMIT's jwtauth and tell which endpoints are slower than on it")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench_wrk.check_wrk()
    before = bench_before.commit_of(args.before) if args.before else None
    before_command = bench_before.install(before) if before else ()
    rounds = ROUNDS_BEFORE if before else ROUNDS
    started = datetime.now(UTC).isoformat(timespec="seconds")
    results: dict[str, Any] = {"started_at": started, "machine": bench_report.machine(), "runs": {}}
    results["settings"] = {"seconds": args.seconds, "users": args.users, "workers": args.workers, "rounds": rounds,
                           "databases": args.database, "before": before}  # fmt: skip
    for database in args.database:
        with (
            tempfile.TemporaryDirectory(prefix="jwtauth-bench-") as directory,
            installed(database, Path(directory), args.workers, before_command) as installations,
        ):
            log(f"{database}: creating {2 * args.users} accounts with `jwtauth users add`")
            accounts = create_accounts(installations[0], args.users)
            for installation in installations[1:]:
                create_accounts(installation, args.users)
            for workers in args.workers:
                log(f"{database}, --workers {workers}")
                run = run_workers(plan_for(workers, args.seconds, rounds), installations, accounts)
                if before:
                    run["before"]["commit"] = before
                results["runs"][f"{database}/{workers}"] = run
    results["verify"] = verify_phase(min(3.0, max(1.0, args.seconds / 2)))
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    latest_md, _ = bench_report.write(results, args.results)
    print(latest_md.read_text())
    if args.update_readme:
        bench_report.update_readme(
            REPO / "README.md", latest_md.read_text(), f"make bench BENCH_SECONDS={args.seconds}"
        )
    return 1 if bench_report.slower_than_before(results) else 0


@contextmanager
def installed(
    database: str, directory: Path, workers: Sequence[int], before: tuple[str, ...] = ()
) -> Iterator[list[Installation]]:
    """A fresh installation in `directory`, and with the `jwtauth` command of a version before, one of that
    version in directory/before (PostgreSQL: a database of its own in the same cluster). For PostgreSQL, a
    cluster of its own, first on the cores of the first worker count's server (each run pins it anew)."""
    if before:
        (directory / "before").mkdir()
    if database == "sqlite":
        yield [Installation(directory, free_port()),
               *([Installation(directory / "before", free_port(), command=before)] if before else [])]  # fmt: skip
        return
    with postgres_cluster(plan_for(workers[0], 1, ROUNDS).server_cpus) as (url, postmaster):
        installations = [Installation(directory, free_port(), url, postmaster)]
        if before:
            url_before = create_database(url, "before")
            installations.append(Installation(directory / "before", free_port(), url_before, postmaster, before))
        yield installations


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

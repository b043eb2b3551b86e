"""The bench's report: each endpoint against its limit, the targets, and the machine, as Markdown and JSON."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_before

Results = dict[str, Any]  # the JSON document bench.py builds (see the keys read below)
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown",
    )  # fmt: skip
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def series(*rates: float) -> float:
    """The rate of steps done one after another on the same cores: 1 / (1/a + 1/b + ...)."""
    return 1 / sum(1 / rate for rate in rates) if all(rate > 0 for rate in rates) else 0.0


Rates = Mapping[str, float]  # limits and baselines by name (rs256_sign, argon2_cheap, bare_post, ...)


@dataclass(frozen=True, slots=True)
class Row:
    """One endpoint against its limit."""

    name: str
    result: dict[str, Any]  # a LoadResult as a dict
    names: Sequence[str]  # the rates its limit is made of, one after another (series); none: a baseline
    limit_text: str
    target: float | None  # the least ratio wanted
    rates: Rates  # the run's: each the median of its rounds
    rounds: Mapping[str, Sequence[float]]  # each rate's rounds

    @property
    def limit(self) -> float | None:
        return series(*(self.rates[name] for name in self.names)) if self.names else None

    @property
    def ratio(self) -> float:
        """req/s over the limit; 0 for a baseline, or a limit that could not be measured."""
        limit = self.limit
        return float(self.result["requests_per_s"] / limit) if limit else 0.0

    def round_ratios(self) -> list[float]:
        """The ratio in each round: the endpoint's rate in that round over the limit from the rates measured
        in that round. An endpoint measured once (login at default Argon2, between two measurements of its
        Argon2 limit) gets a ratio for each measurement of its least measured rate. A rate measured in another
        number of rounds counts at its median."""
        rounds = {name: self.rounds.get(name, []) for name in self.names}
        own = self.result.get("rounds", [])
        count = len(own) if len(own) > 1 else min((len(v) for v in rounds.values() if len(v) > 1), default=0)
        if count < 2:
            return []
        ratios = []
        for number in range(count):
            limit = series(*(values[number] if len(values) == count else self.rates[name]
                             for name, values in rounds.items()))  # fmt: skip
            rate = own[number] if len(own) == count else self.result["requests_per_s"]
            ratios.append(rate / limit if limit else 0.0)
        return ratios


def rates_of(limits: Results) -> tuple[Rates, dict[str, Sequence[float]]]:
    """The limits and baselines of a run as rates by name: their medians, and each one's rounds."""
    baselines = {name: limits[name] for name in ("bare_get", "bare_post")}
    medians = {name: value for name, value in limits.items() if isinstance(value, int | float)}
    medians |= {name: baseline["requests_per_s"] for name, baseline in baselines.items()}
    rounds = dict(limits.get("rounds", {}))
    rounds |= {name: baseline.get("rounds", []) for name, baseline in baselines.items()}
    return medians, rounds


def rows_of(run: Results) -> list[Row]:
    """The endpoints of one worker count, each with the limit formula of the issue."""
    endpoints = run["endpoints"]
    rates, rounds = rates_of(run["limits"])

    def row(name: str, result: dict[str, Any], names: Sequence[str], text: str, target: float | None) -> Row:
        return Row(name, result, names, text, target, rates, rounds)

    login = "1/(1/Argon2 + 1/RS256-sign + 1/bare-POST)"
    return [
        row("POST /login (Argon2 default: t=3, 64 MiB, p=4)", endpoints["login_default"],
            ("argon2_default", "rs256_sign", "bare_post"), login, 0.90),
        row("POST /login (Argon2 cheap: t=1, 8 MiB, p=1)", endpoints["login_cheap"],
            ("argon2_cheap", "rs256_sign", "bare_post"), login, 0.80),
        row("POST /refresh", endpoints["refresh"], ("rs256_sign", "bare_post"), "1/(1/RS256-sign + 1/bare-POST)", 0.75),
        row("GET /.well-known/jwks.json", endpoints["jwks"], ("bare_get",), "bare GET", 0.85),
        row("GET /userinfo", endpoints["userinfo"], ("rs256_verify", "bare_get"), "1/(1/RS256-verify + 1/bare-GET)",
            None),
        row("bare Starlette GET (baseline)", run["limits"]["bare_get"], (), "", None),
        row("bare Starlette POST (baseline)", run["limits"]["bare_post"], (), "", None),
    ]  # fmt: skip


def noise(ratios: Sequence[float]) -> float:
    """The run-to-run noise of a ratio, from its rounds: half their interquartile range (for 5 rounds, half
    the distance between the second and the fourth), which one round that met a slow spell does not widen."""
    if len(ratios) < 2:
        return 0.0
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return (third - first) / 2


def verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def endpoint_line(row: Row) -> str:
    result = row.result
    cells = [row.name, f"{result['requests_per_s']:,.1f}", f"{result['p50_ms']:.2f}", f"{result['p99_ms']:.2f}"]
    errors = result["non2xx"] + result["socket_errors"]
    cells.append(str(errors))
    if row.limit is None:
        cells += ["", "", "", "", ""]
    else:
        ratio = row.ratio
        target = f"≥ {row.target:.0%}" if row.target is not None else "-"
        met = "" if row.target is None else verdict(ratio >= row.target and errors == 0)
        rounds = row.round_ratios()
        each = "-"
        if rounds:
            each = " / ".join(f"{100 * value:.0f}" for value in rounds) + f" (±{100 * noise(rounds):.1f})"
        cells += [f"{row.limit:,.1f} ({row.limit_text})", f"{ratio:.0%}", each, target, met]
    cells.append(f"{result['other_load_cores']:.2f}")
    wrk = result.get("wrk_cpu_cores", 0.0)
    cells.append(f"{wrk:.2f}" + (" (wrk-bound)" if wrk >= WRK_BOUND else ""))
    return "| " + " | ".join(cells) + " |"


WRK_BOUND = 0.9  # wrk runs one thread: near a whole core, it and not the server set the pace
ENDPOINT_HEADER = (
    "| endpoint | req/s | p50 ms | p99 ms | non-2xx + socket errors | limit req/s | ratio"
    " | ratio in each round (± noise) | target | met | other load (cores) | wrk CPU (cores) |"
    "\n|---|--:|--:|--:|--:|---|--:|--:|--:|---|--:|--:|"
)


def run_section(run: Results) -> list[str]:
    """The tables of one backend and worker count: endpoints, then loaded latency, memory and the raw limits."""
    cpus, database = run["cpus"], DATABASES[run.get("database", "sqlite")]
    lines = [
        f"### {database}, `--workers {run['workers']}`: server on CPU {cpus['server']}, wrk on CPU {cpus['wrk']}",
        "",
    ]
    if run.get("database") == "postgresql":
        lines += ["PostgreSQL runs on the server's CPUs too; its CPU is counted with the server's.", ""]
    if cpus["shared"]:
        lines += [
            "wrk shares a core with the server here, so every ratio is lower than the server alone would get.",
            "",
        ]
    lines += [ENDPOINT_HEADER, *(endpoint_line(row) for row in rows_of(run)), ""]
    lines += [*loaded_lines(run["loaded"]), ""]
    memory = run["memory"]
    lines.append(
        f"Server RSS (all its processes): {memory['idle_mib']:.0f} MiB idle, peak {memory['peak_mib']:.0f} MiB"
        " during the login flood at default Argon2."
    )
    lines += ["", *limit_lines(run["limits"]), ""]
    return [*lines, *bench_before.lines_of(run), ""] if "before" in run else lines


DATABASES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def refresh_ratio(run: Results) -> float:
    """Refresh req/s against its limit, as the endpoint table gives it."""
    row = next(row for row in rows_of(run) if row.name == "POST /refresh")
    return row.ratio


def summary_lines(runs: Results) -> list[str]:
    """Refresh across the runs of this bench: its CPU per request, PostgreSQL against SQLite, and how a second
    worker scales it (each ratio from figures measured in this run)."""
    lines = [
        "### Refresh across backends and workers",
        "",
        "| run | req/s | ratio to its limit | server CPU µs/request | database CPU µs/request |",
        "|---|--:|--:|--:|--:|",
    ]
    for run in runs.values():
        refresh = run["endpoints"]["refresh"]
        lines.append(
            f"| {DATABASES[run['database']]}, `--workers {run['workers']}` | {refresh['requests_per_s']:,.1f}"
            f" | {refresh_ratio(run):.0%} | {refresh.get('server_cpu_us', 0):,.0f}"
            f" | {refresh.get('database_cpu_us', 0):,.0f} |"
        )
    targets = []
    sqlite_1, postgres_1 = runs.get("sqlite/1"), runs.get("postgresql/1")
    if sqlite_1 and postgres_1:
        ratio = (
            postgres_1["endpoints"]["refresh"]["requests_per_s"] / sqlite_1["endpoints"]["refresh"]["requests_per_s"]
        )
        targets.append(("refresh on PostgreSQL / on SQLite, `--workers 1`", ratio, 0.70))
    for database, label in DATABASES.items():
        one, two = runs.get(f"{database}/1"), runs.get(f"{database}/2")
        if one and two:
            ratio = refresh_ratio(two) / refresh_ratio(one) if refresh_ratio(one) else 0.0
            targets.append((f"{label}: refresh ratio with `--workers 2` / with `--workers 1`", ratio, 0.90))
    if targets:
        lines += ["", "| target | measured | wanted | met |", "|---|--:|--:|---|"]
        lines += [f"| {name} | {value:.1%} | ≥ {wanted:.0%} | {verdict(value >= wanted)} |"
                  for name, value, wanted in targets]  # fmt: skip
    return [*lines, ""]


def limit_lines(limits: Results) -> list[str]:
    """The limits measured alone, on the server's cores (one process per core, rates added up)."""
    noise = limits["other_load_cores"]
    names = {
        "rs256_sign": "RS256 sign (PyJWT encode, preloaded key)",
        "rs256_verify": "RS256 verify (PyJWT decode, preloaded key)",
        "argon2_default": "Argon2 verify, default (t=3, 64 MiB, p=4)",
        "argon2_cheap": "Argon2 verify, cheap (t=1, 8 MiB, p=1)",
    }
    rounds = limits.get("rounds", {})
    lines = ["| limit, on the server's cores | per s | each round | other load (cores) |", "|---|--:|--:|--:|"]
    lines += [
        f"| {label} | {limits[name]:,.1f} | {' / '.join(map(_figure, rounds.get(name, [])))} | {noise[name]:.2f} |"
        for name, label in names.items()
    ]
    return lines


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def loaded_lines(loaded: Results) -> list[str]:
    flood = loaded["flood"]
    lines = [
        f"While a login flood (default Argon2, {flood['requests_per_s']:.1f} logins/s) saturates the server"
        f" (other load {loaded.get('other_load_cores', 0.0):.2f} cores):",
        "",
        "| probe | req/s | p50 ms | p99 ms | max ms | non-2xx | target p99 | met |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name in ("jwks", "userinfo"):
        probe = loaded[name]
        met = verdict(probe["p99_ms"] < 20 and probe["non2xx"] == 0 and probe["requests"] > 0)
        lines.append(
            f"| {name} | {probe['requests_per_s']:.1f} | {probe['p50_ms']:.2f} | {probe['p99_ms']:.2f}"
            f" | {probe['max_ms']:.2f} | {probe['non2xx'] + probe['socket_errors']} | < 20 ms | {met} |"
        )
    return lines


def verify_lines(verify: Results) -> list[str]:
    decode = verify["pyjwt_decode"]
    lines = [
        "### Offline verification (one core, CPU 0)",
        "",
        "| verifier | tokens/s | vs PyJWT decode | target | met |",
        "|---|--:|--:|--:|---|",
        f"| PyJWT `jwt.decode`, preloaded key | {decode:,.0f} | 100% | | |",
    ]
    for name, label in (("verify_access_token", "`jwtauth.tokens.verify_access_token`"),
                        ("jwtauth_verify", "`jwtauth.verify`")):  # fmt: skip
        rate = verify[name]
        lines.append(f"| {label} | {rate:,.0f} | {rate / decode:.0%} | ≥ 80% | {verdict(rate / decode >= 0.8)} |")
    return lines


def markdown(results: Results) -> str:
    """The whole report as Markdown."""
    info = results["machine"]
    settings = results["settings"]
    login = "login at default Argon2 in one run between two measurements of its Argon2 limit"
    if settings.get("before"):
        login = f"login at default Argon2 in {settings['rounds']} rounds between two measurements of its Argon2 limit"
    lines = [
        f"Measured on {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, Linux {info['kernel']};"
        f" load average {info['load_average']} at the start; {settings['seconds']} s per load:"
        f" {login}, the other loads,"
        f" their baselines and limits in {settings.get('rounds', 1)} rounds taken in turn, each figure"
        " the median of its rounds (a 1 s warm-up before each load's first);"
        f" {settings['users']} accounts per Argon2 setting.",
        "",
    ]
    if settings.get("before"):
        slower = slower_than_before(results)
        lines += [
            f"Against {settings['before'][:12]}, served beside it and measured in the same rounds (each run's"
            " last table): " + (f"**slower beyond the noise: {', '.join(slower)}**." if slower
                                else "no endpoint slower beyond the noise."),
            "",
        ]  # fmt: skip
    lines += summary_lines(results["runs"])
    for run in results["runs"].values():
        lines += run_section(run)
    lines += verify_lines(results["verify"])
    lines += [
        "",
        "_other load_: CPU time that other processes (not the server, wrk or the bench) used on the cores of"
        " that run (server and wrk; for a limit, its processes'), in cores (from /proc/stat); above ~0.1"
        " the figures of that row are disturbed. _wrk CPU_: the load generator's own CPU (one thread); near 1,"
        " wrk rather than the server set the pace, and that row's ratio says little.",
    ]
    return "\n".join(lines) + "\n"


def slower_than_before(results: Results) -> list[str]:
    """The endpoints slower than on the version before beyond the noise, with their runs; none without one."""
    runs = [(f"{DATABASES[run['database']]}, `--workers {run['workers']}`", run) for run in results["runs"].values()]
    return bench_before.slower(runs)


def write(results: Results, directory: Path) -> tuple[Path, Path]:
    """Write results/<stamp>.json and .md, and copies as latest.json and latest.md; return the latest pair."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = results["started_at"].replace(":", "").replace("-", "")
    text, document = markdown(results), json.dumps(results, indent=2) + "\n"
    for name in (stamp, "latest"):
        (directory / f"{name}.md").write_text(text)
        (directory / f"{name}.json").write_text(document)
    return directory / "latest.md", directory / "latest.json"


def update_readme(readme: Path, table: str, command: str) -> None:
    """Replace what is between the bench markers of README.md (the Performance section) by this run."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise RuntimeError(f"{readme} has no {README_START} … {README_END} markers")
    body = f"{README_START}\nLatest run: `{command}`.\n\n{table}{README_END}"
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.DOTALL)
    readme.write_text(pattern.sub(lambda _: body, text, count=1))

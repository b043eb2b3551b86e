"""Running wrk (the load generator) with the Lua scripts of scripts/wrk, and reading its summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

WRK_SCRIPTS = Path(__file__).resolve().parent / "wrk"
SUMMARY_PREFIX = "BENCH_JSON "


@dataclass(frozen=True, slots=True)
class Load:
    """One wrk run: what to hit, with which script and arguments, how hard, for how long, on which CPUs."""

    url: str
    script: str  # a file of scripts/wrk
    args: tuple[str, ...] = ()
    seconds: int = 10
    connections: int = 16
    threads: int = 1
    cpus: str = "1"
    timeout_s: int = 10  # a login queued behind Argon2 may take seconds; a timeout would count as an error

    def command(self) -> list[str]:
        wrk = [
            "wrk", f"-t{self.threads}", f"-c{max(self.connections, self.threads)}", f"-d{self.seconds}s",
            f"--timeout={self.timeout_s}s", "-s", str(WRK_SCRIPTS / self.script), self.url,
        ]  # fmt: skip
        return ["taskset", "-c", self.cpus, *wrk, "--", *self.args]


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What wrk measured; latencies in milliseconds."""

    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non2xx: int
    first_non2xx_status: int
    socket_errors: int
    connections: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_wrk() -> str:
    """Return wrk's path, or raise with how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: `make bench` installs it (apt-get install -y wrk)")
    return path


def start(load: Load) -> subprocess.Popen[str]:
    """Start wrk in the background; LUA_PATH lets the scripts `require("common")`."""
    env = {**os.environ, "LUA_PATH": f"{WRK_SCRIPTS}/?.lua;;"}
    return subprocess.Popen(load.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen[str], load: Load) -> LoadResult:
    """Wait for a started wrk (bounded: its duration plus a margin) and parse its summary line."""
    try:
        stdout, stderr = process.communicate(timeout=load.seconds + load.timeout_s + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise RuntimeError(f"wrk did not stop: {load.command()}") from None
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {stderr.strip() or stdout.strip()}")
    return parse_summary(stdout, load.connections)


def run(load: Load) -> LoadResult:
    return finish(start(load), load)


def parse_summary(stdout: str, connections: int) -> LoadResult:
    """Read the `BENCH_JSON {...}` line that scripts/wrk/common.lua prints in done()."""
    lines = [line for line in stdout.splitlines() if line.startswith(SUMMARY_PREFIX)]
    if not lines:
        raise RuntimeError(f"no summary in wrk's output:\n{stdout}")
    raw = json.loads(lines[-1].removeprefix(SUMMARY_PREFIX))
    seconds = raw["duration_us"] / 1e6
    return LoadResult(
        requests=raw["requests"],
        seconds=round(seconds, 3),
        requests_per_s=raw["requests"] / seconds if seconds else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        non2xx=raw["non2xx"],
        first_non2xx_status=raw["first_non2xx_status"],
        socket_errors=raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        connections=connections,
    )

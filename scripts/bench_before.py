"""`make bench BENCH_BEFORE=<commit>`: another version of jwtauth to measure beside this checkout's, and the
comparison of the two.

The version is the commit's tree (`git archive`), installed with pip (editable, as `make` installs a checkout)
into a virtual environment of its own under .bench/<commit>/ (git-ignored; made once per commit, with the
dependencies that commit asked for).
The bench serves both versions side by side and measures each load on one right after the other, in an order
that alternates from round to round, so that a slow spell of the machine falls on both. Each round then
gives one change, the after's rate over the before's; an endpoint is slower when the median of its changes
is below minus the noise: half the spread of those changes (their range), the run-to-run noise of that
comparison measured in the same run.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import venv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".bench"
ENDPOINTS = {  # as the results name them: as the report names them
    "login_default": "POST /login (Argon2 default)",
    "login_cheap": "POST /login (Argon2 cheap)",
    "refresh": "POST /refresh",
    "jwks": "GET /.well-known/jwks.json",
    "userinfo": "GET /userinfo",
}


def commit_of(ref: str) -> str:
    """The full hash of the commit `ref` names.

    Raises:
        RuntimeError: `ref` names no commit of this repository.
    """
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"--before {ref}: not a commit of {REPO}")
    return done.stdout.strip()


def install(commit: str) -> tuple[str, ...]:
    """The `jwtauth` command of `commit`, installed under .bench/<commit>/ unless it already is."""
    home = CACHE / commit
    command = home / "venv" / "bin" / "jwtauth"
    if (home / "installed").exists():
        return (str(command),)
    shutil.rmtree(home, ignore_errors=True)
    (home / "src").mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit],
                             capture_output=True, check=True)  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(home / "src")], input=archive.stdout, check=True)
    venv.create(home / "venv", with_pip=True)
    print(f"bench: installing {commit[:12]} into {home / 'venv'}", file=sys.stderr, flush=True)
    subprocess.run([str(home / "venv" / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                    "--editable", str(home / "src")], check=True)  # fmt: skip
    (home / "installed").touch()
    return (str(command),)


@dataclass(frozen=True, slots=True)
class Change:
    """One endpoint, after against before: each round's change (after / before - 1) and what they say."""

    name: str
    before: dict[str, Any]  # the combined results (bench.combine_runs), with `rounds`
    after: dict[str, Any]

    @property
    def changes(self) -> list[float]:
        return [new / old - 1 for old, new in zip(self.before["rounds"], self.after["rounds"], strict=True) if old]

    @property
    def median(self) -> float:
        return statistics.median(self.changes) if self.changes else 0.0

    @property
    def noise(self) -> float:
        """Half the range of the rounds' changes: how far apart two measurements of the same comparison fell."""
        changes = self.changes
        return (max(changes) - min(changes)) / 2 if len(changes) > 1 else 0.0

    @property
    def slower(self) -> bool:
        return self.median < -self.noise


def changes_of(run: dict[str, Any]) -> list[Change]:
    """The endpoints of one run that were also measured on the version before."""
    before = run.get("before", {}).get("endpoints", {})
    return [Change(name, before[name], run["endpoints"][name]) for name in ENDPOINTS if name in before]


def lines_of(run: dict[str, Any]) -> list[str]:
    """The Markdown table of one run's endpoints against the version before."""
    lines = [
        f"Against {run['before']['commit'][:12]} (before), measured in the same rounds, one right after the other:",
        "",
        "| endpoint | req/s before | req/s after | change in each round (%) | median change | noise (±) | slower |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for change in changes_of(run):
        each = " / ".join(f"{100 * value:+.1f}" for value in change.changes)
        before, after = change.before["requests_per_s"], change.after["requests_per_s"]
        lines.append(
            f"| {ENDPOINTS[change.name]} | {before:,.1f} | {after:,.1f} | {each}"
            f" | {100 * change.median:+.1f} % | {100 * change.noise:.1f} |"
            f" {'**yes**' if change.slower else 'no'} |"
        )
    return lines


def slower(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Each endpoint slower than before beyond the noise, named with its run's label."""
    return [f"{label}: {ENDPOINTS[change.name]}" for label, run in runs for change in changes_of(run) if change.slower]

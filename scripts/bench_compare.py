"""Compare two bench runs: is any endpoint slower after a change than before it, beyond the noise?

`python scripts/bench_compare.py BEFORE.json AFTER.json` reads two results of `make bench` (results/*.json),
taken on the same machine one after the other, and prints a Markdown table: for each backend and worker count
in both, each endpoint's ratio to its limit before and after, the change in points, and the run-to-run noise
(bench_report.noise, the larger of the two runs'). An endpoint is slower only if its ratio fell by more than
that noise. Ratios, not req/s, are compared: each run measures its limits on the machine as it was then.
Exit status 1 if an endpoint is slower.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench_report import DATABASES, Results, noise, rows_of


def comparison(before: Results, after: Results) -> tuple[list[str], list[str]]:
    """The table's lines, and the endpoints (run and name) that are slower beyond the noise."""
    lines = [
        "| run | endpoint | req/s before | req/s after | ratio before | ratio after | change (points) | noise (±)"
        " | slower |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    slower = []
    for key, run_after in after["runs"].items():
        run_before = before["runs"].get(key)
        if run_before is None:
            continue
        label = f"{DATABASES[run_after['database']]}, `--workers {run_after['workers']}`"
        for old, new in zip(rows_of(run_before), rows_of(run_after), strict=True):
            if not old.limit or not new.limit:  # a baseline, or a limit that could not be measured
                continue
            ratio_before, ratio_after = old.ratio, new.ratio
            change = 100 * (ratio_after - ratio_before)
            margin = 100 * max(noise(old.round_ratios()), noise(new.round_ratios()))
            is_slower = change < -margin
            if is_slower:
                slower.append(f"{label}: {new.name}")
            lines.append(
                f"| {label} | {new.name} | {old.result['requests_per_s']:,.1f} | {new.result['requests_per_s']:,.1f}"
                f" | {ratio_before:.1%} | {ratio_after:.1%} | {change:+.1f} | {margin:.1f}"
                f" | {'**yes**' if is_slower else 'no'} |"
            )
    return lines, slower


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    lines, slower = comparison(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    print("\n".join(lines))
    print()
    print(f"slower beyond the noise: {', '.join(slower)}" if slower else "no endpoint slower beyond the noise")
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())

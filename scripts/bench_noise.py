"""How busy the rest of the machine was during a measurement: the noise each figure was taken under.

Other engineers' test suites share this machine. The server, wrk and the limit processes are pinned, so
the CPU time that others used on the measured cores is: the busy time of those cores (/proc/stat)
less the CPU time of our processes that ran there (/proc/<pid>/stat, getrusage).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_cpus(text: str) -> list[int]:
    """The CPUs of a taskset list such as `0`, `0,1` or `0-1`."""
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def busy_and_steal(cpus: Sequence[int]) -> tuple[float, float]:
    """CPU seconds since boot that these CPUs spent busy, and that the hypervisor stole from them."""
    busy = steal = 0
    wanted = {f"cpu{cpu}" for cpu in cpus}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, stolen = (int(value) for value in fields[:8])
            busy += user + nice + system + irq + softirq
            steal += stolen
    return busy / CLOCK_TICKS, steal / CLOCK_TICKS


def bench_seconds(with_children: bool) -> float:
    """CPU seconds of this process and, if asked, of its children waited for (wrk, limit processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    seconds = own.ru_utime + own.ru_stime
    if with_children:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds += children.ru_utime + children.ru_stime
    return seconds


@contextmanager
def other_load(cpus: Sequence[int], ours: Callable[[], float], into: dict[str, Any]) -> Iterator[None]:
    """Put into `into` the CPU others used on `cpus` meanwhile, in cores (0.5 = half a core all along);
    `ours` gives the CPU seconds of our processes that may have run there. Also the steal, in cores."""
    busy, steal = busy_and_steal(cpus)
    our_start, started = ours(), time.monotonic()
    yield
    elapsed = time.monotonic() - started
    busy_after, steal_after = busy_and_steal(cpus)
    others = (busy_after - busy) - (ours() - our_start)
    into["other_load_cores"] = round(max(0.0, others) / elapsed, 3)
    into["steal_cores"] = round((steal_after - steal) / elapsed, 3)

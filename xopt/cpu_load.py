"""How much CPU other work took while this process timed something: a timing taken while other
processes competed for the cores says more about them than about the models timed.

Linux's /proc/stat counts, since boot, the time all CPUs spent busy (user, nice, system, irq,
softirq and steal, in clock ticks); `getrusage(RUSAGE_SELF)` this process's CPU time, all its
threads. Over a span of wall time T,

    other = (Δbusy − Δself) / T    cores

is what other work took: other processes, the kernel on their behalf, and steal (the time a
hypervisor gave the CPU to another guest, which a VM's timings lose just the same). Timed runs
on `threads` threads of a machine with C cores are undisturbed while the others keep to the
C − threads cores left over, so the span counts as contended when other > C − threads + SLACK
(SLACK: the bit of background work a quiet machine has anyway). A span too short to tell
(under MIN_SPAN_S) or a system without /proc/stat is reported as not contended.

`wait_until_quiet` polls in spans of QUIET_POLL_S until one is not contended, for a timing worth
taking again once a passing job (a build, a test run) has finished.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

SLACK = 0.25  # cores of background work a quiet machine has anyway
MIN_SPAN_S = 0.2  # a shorter span's tick counts are too coarse to tell
QUIET_POLL_S = 1.0  # the span `wait_until_quiet` measures at a time
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (idle and iowait left out)


@dataclass(frozen=True)
class CpuCounters:
    """One reading: the machine's busy CPU seconds, this process's CPU seconds, the wall clock."""

    busy_s: float
    self_s: float
    wall_s: float
    cpus: int


def read_counters(stat_path: Path = Path("/proc/stat")) -> CpuCounters | None:
    """The counters now, or None where the system does not keep them."""
    try:
        lines = stat_path.read_text().splitlines()
    except OSError:
        return None
    totals = lines[0].split() if lines else []
    if not totals or totals[0] != "cpu":
        return None
    ticks = [int(value) for value in totals[1:]]
    busy = sum(ticks[i] for i in BUSY_FIELDS if i < len(ticks)) / os.sysconf("SC_CLK_TCK")
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return CpuCounters(busy, usage.ru_utime + usage.ru_stime, time.perf_counter(), max(cpus, 1))


def other_cores(before: CpuCounters | None, after: CpuCounters | None) -> float | None:
    """Cores' worth of CPU time other work took between two readings (None: cannot tell)."""
    if before is None or after is None:
        return None
    span = after.wall_s - before.wall_s
    if span < MIN_SPAN_S:
        return None
    return max(0.0, ((after.busy_s - before.busy_s) - (after.self_s - before.self_s)) / span)


def contended(other: float | None, cpus: int, threads: int) -> bool:
    """Whether other work of `other` cores competed with timed runs on `threads` of `cpus` cores."""
    return other is not None and other > max(cpus - threads, 0) + SLACK


class OtherLoad:
    """A context that measures the CPU other work takes while it is open:

    with OtherLoad(threads) as load:
        ... timed runs ...
    if load.contended: ...
    """

    def __init__(self, threads: int = 0, reader=read_counters):  # threads: the timed runs', for `contended`
        self.threads = threads
        self._reader = reader
        self._before: CpuCounters | None = None
        self.cores: float | None = None  # other work's cores over the span, once closed
        self.cpus = 1

    def __enter__(self) -> OtherLoad:
        self._before = self._reader()
        return self

    def __exit__(self, *exc) -> None:
        after = self._reader()
        self.cores = other_cores(self._before, after)
        self.cpus = after.cpus if after is not None else 1

    @property
    def contended(self) -> bool:
        return contended(self.cores, self.cpus, self.threads)

    def describe(self) -> str:
        return f"other processes took {self.cores:.1f} of {self.cpus} CPUs"


def wait_until_quiet(threads: int, patience_s: float, reader=read_counters, sleep=time.sleep) -> tuple[bool, float]:
    """Waits until a span of QUIET_POLL_S in which other work leaves `threads` cores free, or until
    `patience_s` has passed; returns whether the machine went quiet and the seconds waited. A
    system that keeps no counters counts as quiet at once."""
    waited = 0.0
    while waited < patience_s:
        before = reader()
        sleep(QUIET_POLL_S)
        after = reader()
        if before is None or after is None:
            return True, waited
        waited += after.wall_s - before.wall_s
        if not contended(other_cores(before, after), after.cpus, threads):
            return True, waited
    return False, waited

"""Other work's CPU time over a timed span (`xopt.cpu_load`)."""

import os
import sys
import time

import pytest
from helpers import spin, spinning_process

from xopt.cpu_load import CpuCounters, OtherLoad, contended, other_cores, read_counters, wait_until_quiet


def test_other_work_is_the_machines_busy_time_less_this_process():
    before = CpuCounters(busy_s=100.0, self_s=10.0, wall_s=0.0, cpus=2)
    after = CpuCounters(busy_s=104.0, self_s=12.0, wall_s=2.0, cpus=2)  # 4 s busy, 2 of them ours, in 2 s
    assert other_cores(before, after) == pytest.approx(1.0)
    assert contended(1.0, cpus=2, threads=2) and not contended(1.0, cpus=8, threads=2)
    assert not contended(0.2, cpus=2, threads=2)  # a quiet machine's background work
    assert other_cores(before, CpuCounters(100.0, 10.0, 0.1, 2)) is None  # too short a span to tell
    assert other_cores(None, after) is None and not contended(None, cpus=2, threads=2)


def test_counters_are_read_from_proc_stat_text(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  300 20 100 5000 40 5 5 70 0 0\ncpu0 1 2 3 4\ncpu1 1 2 3 4\nintr 123\nctxt 9\n")
    counters = read_counters(stat)
    ticks = os.sysconf("SC_CLK_TCK")
    assert counters.cpus == 2 and counters.busy_s == pytest.approx((300 + 20 + 100 + 5 + 5 + 70) / ticks)
    assert read_counters(tmp_path / "missing") is None
    stat.write_text("not a stat file\n")
    assert read_counters(stat) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_a_competing_process_counts_and_this_ones_own_work_does_not():
    with OtherLoad(threads=1) as own:
        spin(1.0)
    child = spinning_process(1.5)
    time.sleep(0.3)  # the child is up and spinning
    with OtherLoad(threads=1) as other:
        time.sleep(1.0)
    child.join()
    assert own.cores is not None and other.cores is not None
    assert other.cores - own.cores > 0.5, (own.cores, other.cores)  # one core spinning, against ambient load
    assert other.describe().startswith(f"other processes took {other.cores:.1f} of ")


def test_waiting_for_quiet_polls_until_other_work_leaves_the_cores_free_or_patience_runs_out():
    """Readings 1 s apart: other work takes 1.5 of 2 cores for two spans, then 0.1."""

    def machine(others):
        clock = {"busy": 0.0, "wall": 0.0, "spans": iter(others)}

        def reader():
            return CpuCounters(clock["busy"], 0.0, clock["wall"], 2)

        def sleep(seconds):
            clock["busy"] += next(clock["spans"]) * seconds
            clock["wall"] += seconds

        return reader, sleep

    reader, sleep = machine([1.5, 1.5, 0.1])
    assert wait_until_quiet(2, patience_s=10, reader=reader, sleep=sleep) == (True, 3.0)
    reader, sleep = machine([1.5] * 10)
    assert wait_until_quiet(2, patience_s=2.5, reader=reader, sleep=sleep) == (False, 3.0)
    assert wait_until_quiet(2, patience_s=5, reader=lambda: None, sleep=lambda s: None) == (True, 0.0)

"""`xopt bench`: interleaved timing, ratios, size, memory, JSON and plot."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
from helpers import spinning_process

from xopt import bench
from xopt.cli import main


def test_interleaved_timing_orders_and_ratios():
    import time

    calls = []

    def sleeper(label, seconds):
        def call():
            calls.append(label)
            time.sleep(seconds)

        return call

    timings = bench.time_interleaved(
        {"slow": sleeper("slow", 0.004), "fast": sleeper("fast", 0.001)}, rounds=8, warmup=1
    )
    assert calls[:4] == ["slow", "fast", "slow", "fast"]  # interleaved, not one model after the other

    slow, fast = timings
    assert (slow.label, slow.runs, slow.ratio) == ("slow", 8, 1.0)
    assert slow.p10_ms <= slow.median_ms <= slow.p90_ms
    assert fast.ratio < 0.6 and slow.median_ms >= 4.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_timings_say_what_cpu_other_processes_took_meanwhile():
    child = spinning_process(1.5)
    time.sleep(0.3)  # the child is up and spinning
    timings = bench.time_interleaved({"sleeper": lambda: time.sleep(0.05)}, rounds=16, warmup=0)
    child.join()
    other = timings[0].other_cores
    assert other is not None and other > 0.5  # one core spinning in another process
    assert f"other processes took {other:.1f} CPUs meanwhile" in bench.format_table(timings, 1, 16, 1)


def test_bench_cli_json_plot_size_and_memory(tiny_folder, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["optimize", str(tiny_folder("gpt2")), "-o", str(output)]) == 0
    capsys.readouterr()
    plot = tmp_path / "latency.png"
    argv = [
        "bench",
        str(tiny_folder("gpt2")),
        str(output),
        "--rounds",
        "5",
        "--seq",
        "16",
        "--threads",
        "1",
        "--json",
        "--plot",
        str(plot),
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["batch"], result["sequence"], result["threads"]) == (1, 16, 1)
    first, second = result["models"]
    assert first["ratio"] == 1.0 and second["ratio"] == pytest.approx(second["median_ms"] / first["median_ms"])
    assert all(m["runs"] == 5 and m["size_mb"] > 0 and m["peak_memory_mb"] > 10 for m in result["models"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_bad_options(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "absent.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--batch", "0"]) == 2
    assert np.char.startswith(capsys.readouterr().err, "xopt: error:")

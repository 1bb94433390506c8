"""Latency, size and memory of models side by side: what `xopt bench` measures.

Method: every model gets an ONNX Runtime session with the same fixed thread count and the same
inputs (batch B × sequence S, no padding). After warm-up runs, the models are run in interleaved
rounds — model 1, model 2, …, then again — so that drift in the machine's speed hits all of them
alike. Reported per model: median, p10 and p90 latency, the median's ratio to the first model's,
size on disk, and peak resident memory of a separate process that loads the model and runs it
once (so one model's allocations do not count against another's); per run, the CPU other
processes took while the models were timed (`xopt.cpu_load`), which a shared machine's figures
should be read with. With `--backend cuda` the
models run on xopt's CUDA backend instead, each timed call ending when the GPU is done, and
the peak-memory column (a CPU process's resident memory) is left empty.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xopt.backends.onnxruntime import create_session, run
from xopt.cpu_load import OtherLoad
from xopt.inputs import sample_inputs

DEFAULT_ROUNDS, DEFAULT_WARMUP = 30, 3


@dataclass
class Timing:
    label: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    ratio: float = 1.0  # median relative to the first model's (below 1: faster)
    size_mb: float | None = None
    peak_memory_mb: float | None = None
    other_cores: float | None = None  # CPU other processes took while the runs were timed (None: unknown)


def time_interleaved(
    runners: dict[str, Callable[[], object]],
    *,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    progress=lambda items, total: items,
) -> list[Timing]:
    """Median/p10/p90 of `rounds` interleaved calls of each runner after `warmup` rounds."""
    samples: dict[str, list[float]] = {label: [] for label in runners}
    with OtherLoad() as load:
        for index in progress(range(warmup + rounds), warmup + rounds):
            for label, runner in runners.items():
                start = time.perf_counter()
                runner()
                if index >= warmup:
                    samples[label].append(1000 * (time.perf_counter() - start))
    timings = []
    for label, values in samples.items():
        p10, median, p90 = np.percentile(values, [10, 50, 90])
        timings.append(Timing(label, float(median), float(p10), float(p90), len(values), other_cores=load.cores))
    for timing in timings:
        timing.ratio = timing.median_ms / timings[0].median_ms
    return timings


def session_runner(session, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """A no-argument call that runs `session` on `feeds` (for `time_interleaved`)."""
    return lambda: run(session, feeds)


def executor_runner(executor, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """A no-argument call that runs xopt's CUDA `GraphExecutor` on `feeds` and waits for the GPU
    to finish (kernels launch asynchronously; the time is the whole forward pass)."""
    import torch

    device_feeds = {name: executor.to_device(array) for name, array in feeds.items()}

    def run_once() -> None:
        executor.run(device_feeds)
        if executor.device.type == "cuda":
            torch.cuda.synchronize(executor.device)

    return run_once


def size_on_disk_mb(onnx_file: Path) -> float:
    """The .onnx file plus the external data files it references."""
    import onnx_ir as ir

    model = ir.load(onnx_file)
    files = {onnx_file.resolve()}
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            files.add(Path(value.const_value.path).resolve())
    return sum(f.stat().st_size for f in files) / 1e6


def peak_memory_mb(onnx_file: Path, batch: int, sequence: int, threads: int) -> float:
    """Peak RSS of a fresh process that loads `onnx_file` in ORT and runs it once."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_load_and_run_once, (str(onnx_file), batch, sequence, threads))


def _load_and_run_once(onnx_file: str, batch: int, sequence: int, threads: int) -> float:
    import onnx_ir as ir

    session = create_session(onnx_file, threads=threads)
    run(session, sample_inputs(ir.load(onnx_file), batch=batch, sequence=sequence))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def format_table(timings: list[Timing], batch: int, sequence: int, threads: int) -> str:
    header = f"{'model':<40}{'median ms':>11}{'p10':>9}{'p90':>9}{'ratio':>8}{'MB disk':>9}{'peak MB':>9}"
    other = timings[0].other_cores
    meanwhile = "" if other is None else f"; other processes took {other:.1f} CPUs meanwhile"
    runs = f"median of {timings[0].runs} interleaved runs{meanwhile}"
    lines = [
        f"batch {batch} × sequence {sequence}, {threads} threads, {runs}",
        header,
        "-" * len(header),
    ]
    for t in timings:
        size = f"{t.size_mb:.1f}" if t.size_mb is not None else "-"
        memory = f"{t.peak_memory_mb:.0f}" if t.peak_memory_mb is not None else "-"
        lines.append(
            f"{t.label[-40:]:<40}{t.median_ms:>11.2f}{t.p10_ms:>9.2f}{t.p90_ms:>9.2f}{t.ratio:>8.2f}{size:>9}{memory:>9}"
        )
    return "\n".join(lines)


def to_json(timings: list[Timing], batch: int, sequence: int, threads: int) -> str:
    return json.dumps(
        {"batch": batch, "sequence": sequence, "threads": threads, "models": [asdict(t) for t in timings]}, indent=2
    )


def plot_latency(timings: list[Timing], path: Path, title: str) -> None:
    """A bar chart of median latency with p10–p90 whiskers."""
    from xopt.plots import pyplot

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(5, 1.4 * len(timings)), 4))
    medians = [t.median_ms for t in timings]
    errors = [[t.median_ms - t.p10_ms for t in timings], [t.p90_ms - t.median_ms for t in timings]]
    axis.bar(range(len(timings)), medians, yerr=errors, capsize=4, color="#4c72b0")
    axis.set_xticks(range(len(timings)), [Path(t.label).name or t.label for t in timings], rotation=20, ha="right")
    axis.set_ylabel("latency ms (median, p10–p90)")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

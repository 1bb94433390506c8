"""Low-rank factorisation: quality against parameters removed, per method, and latency.

    python tools/benchmark_low_rank.py                      # writes benchmarks/LOW_RANK.md
    python tools/benchmark_low_rank.py --models minilm --ratios 0.1 --output DIR

SmolLM2-135M and MiniLM-L6, after `cleanup`: `low-rank(ratio=R, method=M, objective=size)` for
R = 5, 10, 20, 30% of the blocks' linear parameters and M = svd, asvd, svdllm (calibrated on the
bundled calibration text), and svdllm with `allocation=sensitivity`, measured with
`xopt.evaluate` on the bundled evaluation text (perplexity, KL and top-1 against the unfactored
model; sentence-embedding cosine for MiniLM).
Then `objective=speed` (factored only where ONNX Runtime runs the pair faster, timed on this
machine) and `low-rank` followed by dynamic int8 (`quantize(scheme=dynamic,bits=8)`); latency of
batch 1 × 128 tokens against the unfactored model, interleaved rounds after warm-up, for those and
for svdllm at every ratio with `objective=size` and `objective=speed` (`--latency-only` skips the
quality rows).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import xopt
from xopt.bench import session_runner
from xopt.evaluate import evaluate
from xopt.inputs import sample_inputs
from xopt.pipeline import PassManager, parse_spec
from xopt.runnable import open_runnable
from xopt.text import read_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchmark import machine_description, run_length, versions  # noqa: E402
from benchmark_pruning import first_windows, measured, parameters, quality_table  # noqa: E402
from benchmark_quantization import source_folder  # noqa: E402

VARIANTS = (("svd", "energy"), ("asvd", "energy"), ("svdllm", "energy"), ("svdllm", "sensitivity"))
logger = logging.getLogger("benchmark_low_rank")


def rows_for(
    name: str, ratios: list[float], scratch: Path, threads: int, windows: int, sensitivity: bool
) -> tuple[list, dict]:
    captured, _ = PassManager(parse_spec("cleanup"), verify=False)(xopt.load(source_folder(name)))
    xopt.save(captured, scratch / f"{name}-fp32")
    reference = open_runnable(scratch / f"{name}-fp32", threads=threads)
    text = read_text(None, "evaluation")
    if windows and name == "smollm2":
        text = first_windows(reference, text, windows)
    rows = [("unfactored", "—", parameters(captured), evaluate(reference, text, reference))]
    specs = {}
    for ratio in ratios:
        for method, allocation in VARIANTS if sensitivity else VARIANTS[:-1]:
            spec = f"low-rank(ratio={ratio},method={method},allocation={allocation},objective=size)"
            allocated = " + sensitivity" if allocation == "sensitivity" else ""
            label = f"{method}{allocated}, −{100 * ratio:.0f}% of block parameters"
            rows.append(measured(captured, spec, label, "—", scratch, reference, text, threads))
    best = max(ratios)
    for label, spec in (
        (f"svdllm −{100 * best:.0f}%, objective=speed", f"low-rank(ratio={best},method=svdllm)"),
        (
            f"svdllm −{100 * best:.0f}% (size), then int8",
            f"low-rank(ratio={best},method=svdllm,objective=size),quantize(scheme=dynamic,bits=8)",
        ),
        ("int8 alone", "quantize(scheme=dynamic,bits=8)"),
    ):
        specs[label] = spec
        rows.append(measured(captured, spec, label, "—", scratch, reference, text, threads))
    return rows, {"unfactored": "cleanup", **{k: f"cleanup,{v}" for k, v in specs.items()}}


def ratio_latency_specs(ratios: list[float]) -> dict[str, str]:
    """svdllm at every ratio, factored everywhere it saves parameters and only where it measures faster."""
    specs = {}
    for ratio in ratios:
        for objective in ("size", "speed"):
            label = f"svdllm −{100 * ratio:.0f}%, objective={objective}"
            specs[label] = f"cleanup,low-rank(ratio={ratio},method=svdllm,objective={objective})"
    return specs


def latency_rows(name: str, specs: dict[str, str], scratch: Path, threads: int, rounds: int) -> list[tuple]:
    """(label, median ms, speedup over the unfactored model) at batch 1 × 128 tokens."""
    from xopt.bench import time_interleaved

    captured = xopt.load(source_folder(name))
    runners = {}
    for label, spec in specs.items():
        model, _ = PassManager(parse_spec(spec), verify=False)(captured)
        folder = scratch / f"latency-{len(runners)}"
        xopt.save(model, folder)
        runnable = open_runnable(folder, threads=threads, spinning=False)
        runners[label] = session_runner(runnable.session, sample_inputs(runnable.model, batch=1, sequence=128))
    timings = time_interleaved(runners, rounds=rounds, warmup=3)  # the first runner is the unfactored model
    return [(t.label, t.median_ms, 1 / t.ratio) for t in timings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=30, help="timed latency rounds")
    parser.add_argument(
        "--sensitivity",
        nargs="*",
        default=["smollm2", "minilm"],
        help="the models that get svdllm + sensitivity rows (one model run per matrix: ~12 min per ratio on SmolLM2)",
    )
    parser.add_argument(
        "--windows", type=int, default=0, help="SmolLM2: evaluate on the first N windows of 512 tokens (0: all)"
    )
    parser.add_argument("--latency-only", action="store_true", help="latency rows only (no quality)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("benchmark_pruning").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lines = [
        "# Low-rank factorisation: SmolLM2-135M and MiniLM-L6",
        "",
        f"Machine: {machine_description()}. Threads: {args.threads}. Versions: {versions()}.",
        "",
        "Method: `python tools/benchmark_low_rank.py`. The ratio is the share of the blocks' linear parameters "
        "removed (embeddings and LM head untouched); asvd and svdllm calibrate on the bundled calibration text, "
        "every variant is measured by `xopt eval` on the bundled evaluation text (a different novel"
        + (f"; SmolLM2 on its first {args.windows} windows of 512 tokens" if args.windows else "")
        + "). Latency: "
        "batch 1 × 128 tokens, interleaved rounds after warm-up, ratio of the medians to the unfactored model's.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="xopt-low-rank-") as scratch:
        scratch = Path(scratch)
        for name in args.models:
            title = "SmolLM2-135M" if name == "smollm2" else "MiniLM-L6"
            specs = {"unfactored": "cleanup"}
            if not args.latency_only:
                sensitivity = name in args.sensitivity
                rows, specs = rows_for(name, args.ratios, scratch, args.threads, args.windows, sensitivity)
                lines += [f"## {title}: quality", "", *quality_table(rows, name == "smollm2", "note"), ""]
            specs |= {k: v for k, v in ratio_latency_specs(args.ratios).items() if k not in specs}
            lines += [f"## {title}: latency (batch 1 × 128 tokens)", "", "| variant | median ms | speed-up |"]
            lines.append("|---|---|---|")
            for label, ms, speedup in latency_rows(name, specs, scratch, args.threads, args.rounds):
                lines.append(f"| {label} | {ms:.2f} | {speedup:.2f}× |")
            lines.append("")
    lines.append(run_length(time.perf_counter() - started))
    (args.output / "LOW_RANK.md").write_text("\n".join(lines) + "\n")
    print((args.output / "LOW_RANK.md").read_text())


if __name__ == "__main__":
    main()

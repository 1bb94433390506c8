"""xopt's CUDA backend against PyTorch on the GPU: SmolLM2-135M decode and MiniLM 8×128 latency.

    python tools/benchmark_cuda.py                     # on a CUDA GPU; writes benchmarks/CUDA.md
    python tools/benchmark_cuda.py --device cpu --tiny --no-compile --output /tmp/x.md   # smoke run

The models are random-initialised at the real models' shapes (SmolLM2-135M: 30 layers, d=576,
9/3 heads, vocab 49,152; all-MiniLM-L6-v2: 6 layers, d=384, 12 heads): speed does not depend on
the weights' values, and the GPU machines cannot hold the real checkpoints. Each model is
captured and optimized by xopt (`fuse(lowering=all)`: the fused operators the CUDA backend runs;
the decoder also with `positions=contiguous`, RoPE inside GroupQueryAttention; int4 by
round-to-nearest, symmetric, groups of 32, the LM head too, the token table at 8 bits).

Decode (batch 1, 128-token prompt, 128 new tokens, greedy): prefill ms and decode tokens/s,
median of the repeats, for PyTorch eager (transformers `generate`), torch.compile (static cache,
`reduce-overhead`), xopt's executor with torch operators only (no xopt kernels), with the
kernels, and with the kernels on the fixed-buffer KV cache whose decode step is replayed as a
CUDA graph (captured in the warm-up generation), fp32 and int4. Achieved memory bandwidth of a
decode step = (bytes of every weight read + the KV cache at the mean length) × tokens/s, against
the device-to-device copy rate measured here (bytes read + written) and the card's nominal peak.

MiniLM: batch 8 × 128, padded (real lengths 128 down to 16) and unpadded, median of interleaved
runs ending on a GPU synchronize; PyTorch eager, torch.compile, xopt executor (packed attention
on padded batches).

Parity at these shapes: each xopt variant's greedy tokens against ONNX Runtime's on the CPU
(same model; int4 at accuracy level 0, so ORT multiplies in float too), and the encoder's hidden
states against ORT's at the real tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
TINY_DECODER = dict(
    SMOLLM2,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_ENCODER = dict(
    MINILM, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
)
DECODER_PASSES = "cleanup,fold-norms,fuse(lowering=all,positions=contiguous)"
INT4_PASS = "quantize(method=rtn,head_bits=4,embedding_bits=8,symmetric=true,accuracy=0)"  # ORT reference in float
NOMINAL_PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a smoke run of the tool)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="generations per decode variant")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved MiniLM rounds")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "CUDA.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmark_cuda: needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    lines = [f"# CUDA backend benchmark ({_device_name(device)}, torch {torch.__version__})", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xopt-cuda-bench-") as scratch:
        for section in (decode_section, encoder_section):  # the file is rewritten after each section
            lines += section(Path(scratch), device, args)
            args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _folder(scratch: Path, name: str, config_class: str, config: dict, model_class: str) -> Path:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    model.save_pretrained(scratch / name)
    return scratch / name


def _optimized(folder: Path, *specs: str) -> list:
    """The model of `folder` captured once, then optimized by each pass spec."""
    import xopt

    captured = xopt.load(folder)
    return [xopt.optimize(captured, passes=spec, verify=False)[0] for spec in specs]


def _weight_bytes(model) -> int:
    """Bytes a decode step reads: every initializer but the token table (one row of it is read)."""
    tables = {node.inputs[0].name for node in model.graph if node.op_type in ("Gather", "GatherBlockQuantized")}
    return sum(
        value.const_value.nbytes
        for name, value in model.graph.initializers.items()
        if value.const_value is not None and name not in tables
    )


def decode_section(scratch: Path, device: torch.device, args) -> list[str]:
    import transformers

    from xopt.backends.cuda import GraphExecutor
    from xopt.backends.onnxruntime import create_session
    from xopt.generate import Decoder
    from xopt.runnable import Runnable

    config = TINY_DECODER if args.tiny else SMOLLM2
    folder = _folder(scratch, "decoder", "LlamaConfig", config, "LlamaForCausalLM")
    prompt = list(np.random.default_rng(0).integers(10, config["vocab_size"], args.prompt))
    results: dict[str, tuple[float, float] | str] = {}
    fp32, int4 = _optimized(folder, DECODER_PASSES, f"{DECODER_PASSES},{INT4_PASS}")
    bandwidth_rows = []
    agreement: dict[str, str] = {}
    for label, model in (("fp32", fp32), ("int4", int4)):
        session = create_session(model)
        expected = Decoder(Runnable("ort", model, session, "causal-lm", tokenizer_source=None)).generate(
            prompt, args.new_tokens
        )
        for kernels, static in ((False, False), (True, False), (True, True)):
            form = (
                "xopt kernels, static cache + CUDA graph" if static else "xopt kernels" if kernels else "torch ops only"
            )
            name = f"xopt executor, {label}, {form}"
            executor = GraphExecutor(model, device, use_kernels=kernels, static_cache=static)
            decoder = Decoder(Runnable(name, model, executor, "causal-lm", tokenizer_source=None))
            runs = [decoder.generate(prompt, args.new_tokens) for _ in range(args.repeats + 1)][1:]
            prefill = statistics.median(run.prefill_ms for run in runs)
            speed = statistics.median(run.decode_tokens_per_s for run in runs)
            results[name] = (prefill, speed)
            same = sum(a == b for a, b in zip(runs[0].tokens, expected.tokens, strict=True))
            agreement[name] = f"{same}/{len(expected.tokens)}"
            if static:
                bandwidth_rows.append((label, _weight_bytes(model), speed))
    # PyTorch last: a torch.compile that takes long or fails leaves xopt's rows standing
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    results["PyTorch eager (transformers generate), fp32"] = _hf_decode(reference, prompt, device, args)
    if not args.no_compile:
        try:
            reference.generation_config.cache_implementation = "static"
            reference.forward = torch.compile(reference.forward, mode="reduce-overhead", fullgraph=True)
            results["torch.compile (static cache, reduce-overhead), fp32"] = _hf_decode(reference, prompt, device, args)
        except Exception as error:  # reported, not fatal: the other rows still stand
            results["torch.compile (static cache, reduce-overhead), fp32"] = f"failed: {str(error).splitlines()[0]}"
    del reference
    lines = [
        f"## Decode: batch 1, {args.prompt}-token prompt, {args.new_tokens} new tokens, greedy "
        f"({'tiny config' if args.tiny else 'SmolLM2-135M shapes'}, median of {args.repeats})",
        "",
        "| variant | prefill ms | decode tokens/s | greedy tokens equal to ORT on the CPU |",
        "|---|---:|---:|---:|",
    ]
    for name, value in results.items():
        equal = agreement.get(name, "-")
        if isinstance(value, str):
            lines.append(f"| {name} | {value} | | {equal} |")
        else:
            lines.append(f"| {name} | {value[0]:.1f} | {value[1]:.1f} | {equal} |")
    copy_gbs = _copy_bandwidth_gbs(device)
    nominal = next((peak for key, peak in NOMINAL_PEAK_GBS.items() if key in _device_name(device)), None)
    kv_bytes = _kv_bytes_per_token(config) * (args.prompt + args.new_tokens / 2)
    lines += [
        "",
        f"Memory bandwidth of a decode step (weights + KV cache at the mean length); device-to-device "
        f"copy measured here: {copy_gbs:.0f} GB/s" + (f", nominal peak {nominal:.0f} GB/s" if nominal else ""),
        "",
        "| model | bytes per step (MB) | achieved GB/s | of measured copy | of nominal peak |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, weights, speed in bandwidth_rows:
        achieved = (weights + kv_bytes) * speed / 1e9
        of_nominal = f"{achieved / nominal:.1%}" if nominal else "-"
        megabytes = (weights + kv_bytes) / 1e6
        lines.append(f"| {label} | {megabytes:.1f} | {achieved:.0f} | {achieved / copy_gbs:.1%} | {of_nominal} |")
    return [*lines, ""]


def _hf_decode(model, prompt: list[int], device: torch.device, args) -> tuple[float, float]:
    ids = torch.tensor([prompt], device=device)

    def generate(new_tokens: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        _synchronize(device)
        return time.perf_counter() - start

    generate(args.new_tokens)  # warm-up (and compilation)
    prefill = statistics.median(generate(1) for _ in range(args.repeats))
    whole = statistics.median(generate(args.new_tokens) for _ in range(args.repeats))
    return 1000 * prefill, (args.new_tokens - 1) / max(whole - prefill, 1e-9)


def _kv_bytes_per_token(config: dict) -> int:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4


def _copy_bandwidth_gbs(device: torch.device) -> float:
    source = torch.empty(2**28 if device.type == "cuda" else 2**24, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    _synchronize(device)
    return 2 * source.nbytes * 10 / (time.perf_counter() - start) / 1e9


def encoder_section(scratch: Path, device: torch.device, args) -> list[str]:
    import transformers

    from xopt.backends.cuda import GraphExecutor
    from xopt.backends.onnxruntime import create_session, run

    config = TINY_ENCODER if args.tiny else MINILM
    folder = _folder(scratch, "encoder", "BertConfig", config, "BertModel")
    reference = transformers.AutoModel.from_pretrained(folder).to(device).eval()
    compiled = None if args.no_compile else torch.compile(reference)
    (model,) = _optimized(folder, "cleanup,fold-norms,fuse(lowering=all)")
    executor = GraphExecutor(model, device)
    session = create_session(model)
    rng = np.random.default_rng(0)
    differences = []
    lines = [
        f"## Encoder: batch 8 × 128 ({'tiny config' if args.tiny else 'all-MiniLM-L6-v2 shapes'}), "
        f"median ms of {args.rounds} interleaved rounds",
        "",
        "| variant | unpadded | padded (lengths 128 … 16) |",
        "|---|---:|---:|",
    ]
    columns: dict[str, list[str]] = {}
    for padded in (False, True):
        ids = rng.integers(1000 % config["vocab_size"], config["vocab_size"], (8, 128))
        mask = np.ones((8, 128), np.int64)
        if padded:
            for row, length in enumerate(np.linspace(128, 16, 8).astype(int)):
                mask[row, length:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        torch_feeds = {name: torch.from_numpy(array).to(device) for name, array in feeds.items()}
        executor_feeds = {
            name: executor.to_device(array) for name, array in feeds.items() if name in executor.input_names
        }
        runners: dict[str, Callable[[], object]] = {
            "PyTorch eager": partial(_call_keywords, reference, torch_feeds),
            "xopt executor (xopt kernels)": partial(executor.run, executor_feeds),
        }
        if compiled is not None:
            runners["torch.compile"] = partial(_call_keywords, compiled, torch_feeds)
        for name, median in _interleaved(runners, device, args.rounds).items():
            columns.setdefault(name, []).append(f"{median:.2f}")
        output = executor.output_names[0]
        expected = run(session, feeds, [output])[output]
        got = executor.run(executor_feeds)[output].float().cpu().numpy()
        differences.append(float(np.abs((got - expected) * mask[..., None]).max()))
    lines += [f"| {name} | {' | '.join(values)} |" for name, values in columns.items()]
    lines += [
        "",
        "xopt executor against ONNX Runtime on the CPU, same model, max abs difference of the hidden "
        f"states at real tokens: unpadded {differences[0]:.2e}, padded {differences[1]:.2e}",
    ]
    return [*lines, ""]


def _call_keywords(function: Callable[..., object], keywords: dict) -> object:
    return function(**keywords)


def _interleaved(runners: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for index in range(rounds + 3):
            for name, runner in runners.items():
                _synchronize(device)
                start = time.perf_counter()
                runner()
                _synchronize(device)
                if index >= 3:
                    samples[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


if __name__ == "__main__":
    sys.exit(main())

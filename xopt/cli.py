"""The `xopt` command: a thin layer over the Python API.

    xopt optimize INPUT -o OUTPUT [--recipe NAME] [--passes SPEC] [--calibration TEXT]
                  [--report FILE.json] [--no-verify] [--explain]
    xopt inspect INPUT [--json]
    xopt blocks INPUT [--greedy N] [--calibration TEXT] [--plot FILE.png] [--json]
    xopt passes
    xopt eval MODEL [--reference MODEL] [--text FILE] [--window N] [--max-windows N] [--json]
    xopt bench MODEL [MODEL ...] [--batch B] [--seq S] [--threads N] [--backend onnxruntime|cuda]
    xopt generate MODEL --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S] [--backend onnxruntime|cuda]
    xopt demo [--output FOLDER]

User errors print one line on stderr and exit 2; nothing is written and the input is untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from xopt.errors import XoptError, counted
from xopt.progress import showing_progress

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("xopt").setLevel(logging.INFO if args.verbose else logging.WARNING)  # -v: xopt's steps only
    _quiet_third_party()
    try:
        return args.run(args)
    except XoptError as error:
        print(f"xopt: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("xopt: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout stopped early (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


def _parser() -> argparse.ArgumentParser:
    from xopt import __version__
    from xopt.pipeline import DEFAULT_RECIPE, RECIPES
    from xopt.runnable import BACKENDS

    parser = argparse.ArgumentParser(prog="xopt", description="Graph optimizer for transformer models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    parser.add_argument("--version", action="version", version=f"xopt {__version__}")
    verbose = argparse.ArgumentParser(add_help=False)  # -v also after the command (kept if given before)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log each step")
    commands = parser.add_subparsers(dest="command", required=True)

    optimize = commands.add_parser("optimize", parents=[verbose], help="optimize a model and write deployable ONNX")
    optimize.add_argument("input", type=Path, help=".onnx file, .pt2 ExportedProgram, or Hugging Face folder")
    optimize.add_argument("-o", "--output", required=True, help=".onnx file or folder")
    recipes = ", ".join(RECIPES)
    optimize.add_argument("--recipe", default=None, help=f"named pass list: {recipes} (default: {DEFAULT_RECIPE})")
    optimize.add_argument("--passes", default=None, help="pass spec replacing the recipe, e.g. 'cleanup'")
    optimize.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="text for lossy passes that calibrate (default: the bundled opening of Emma; exact ones need none)",
    )

    optimize.add_argument("--report", type=Path, default=None, help="write the per-pass report as JSON")
    optimize.add_argument("--no-verify", action="store_true", help="skip checks and parity after each pass")
    optimize.add_argument("--explain", action="store_true", help="list what each pass matched and why not")
    optimize.set_defaults(run=_optimize)

    inspect = commands.add_parser(
        "inspect", parents=[verbose], help="show a model's transformer structure (read after cleanup)"
    )
    inspect.add_argument("input", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=_inspect)

    blocks = commands.add_parser(
        "blocks", parents=[verbose], help="score every transformer block on calibration text (for pruning)"
    )
    blocks.add_argument("input", type=Path)
    blocks.add_argument("--greedy", type=int, default=0, help="also rank the first N blocks greedy removal picks")
    blocks.add_argument("--calibration", type=Path, default=None, help="text to score on (default: bundled)")
    blocks.add_argument("--plot", type=Path, default=None, help="write a PNG of the scores")
    blocks.add_argument("--json", action="store_true", help="print JSON")
    blocks.set_defaults(run=_blocks)

    passes = commands.add_parser("passes", parents=[verbose], help="list every pass with its options")
    passes.set_defaults(run=_passes)

    evaluate = commands.add_parser("eval", parents=[verbose], help="perplexity / KL / embedding cosine on text")
    evaluate.add_argument("model", type=Path, help="xopt output folder, .onnx file, or Hugging Face folder")
    evaluate.add_argument("--reference", type=Path, default=None, help="model to compare with (KL, top-1, cosine)")
    evaluate.add_argument("--text", type=Path, default=None, help="UTF-8 text (default: bundled evaluation text)")
    evaluate.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for a bare .onnx file")
    evaluate.add_argument(
        "--window", type=int, default=512, help="causal LM: tokens per window, non-overlapping (default: %(default)s)"
    )
    evaluate.add_argument(
        "--max-windows", type=int, default=None, help="causal LM: measure the first N windows (default: all)"
    )
    evaluate.add_argument(
        "--max-sentences", type=int, default=256, help="encoder: sentences to embed (default: %(default)s)"
    )
    evaluate.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(run=_eval)

    bench = commands.add_parser("bench", parents=[verbose], help="latency, size and memory of models side by side")
    bench.add_argument("models", type=Path, nargs="+", help="xopt output folders, .onnx files, HF folders")
    bench.add_argument("--batch", type=int, default=1, help="sequences per run (default: %(default)s)")
    bench.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    bench.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds (default: %(default)s)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: %(default)s)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="runtime (cuda: xopt's CUDA backend)")
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart")
    bench.set_defaults(run=_bench)

    generate = commands.add_parser(
        "generate", parents=[verbose], help="generate text with a KV-cache decoder in ONNX Runtime"
    )
    generate.add_argument("model", type=Path, help="xopt output folder, .onnx file, or Hugging Face folder")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); >0: sampling")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed (default: 0)")
    generate.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for a bare .onnx file")
    generate.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    generate.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens tokens")
    generate.add_argument(
        "--backend", choices=BACKENDS, default="onnxruntime", help="runtime (cuda: xopt's CUDA backend)"
    )
    generate.add_argument("--json", action="store_true", help="print the timings as JSON after the text")
    generate.set_defaults(run=_generate)

    demo = commands.add_parser(
        "demo", parents=[verbose], help="optimize MiniLM (bundled, offline) and show before/after"
    )
    demo.add_argument(
        "--output", type=Path, default=Path("xopt-demo"), help="folder for the results (default: %(default)s)"
    )
    demo.set_defaults(run=_demo)
    return parser


def _optimize(args: argparse.Namespace) -> int:
    import xopt
    from xopt.pipeline import PassManager, resolve_passes
    from xopt.saving import write_text_atomically
    from xopt.text import read_text

    output = _output_path(args.output)
    _check_output(args.input, output)
    if args.calibration is not None:
        read_text(args.calibration, "calibration")  # a missing or empty file is refused before any work
    if args.recipe is not None and args.passes is not None:
        raise XoptError("give --recipe or --passes, not both")
    if args.report is not None:
        _check_report(args.report, args.input, output)
    passes = resolve_passes(args.recipe, args.passes)
    if args.calibration is not None:  # passes that calibrate read the user's text unless told otherwise
        calibrating = [step for step in passes if hasattr(step, "calibration")]
        for step in calibrating:
            if step.calibration == "":
                step.calibration = str(args.calibration)
        if not calibrating:
            note = f"no pass here calibrates, so --calibration {args.calibration} is not read"
            print(f"xopt: note: {note}", file=sys.stderr)
    with _step(f"capturing {args.input}") as capture:
        model = xopt.load(args.input)
    with _progress_bar(len(passes), "pass") as advance, showing_progress(_iterate):
        optimized, report = PassManager(passes, verify=not args.no_verify, on_pass=advance)(model)
    with _step(f"saving {output}") as saving:
        written = xopt.save(optimized, output)
    report.add_capture_and_save(capture.seconds, saving.seconds)
    print(report.format_table())
    if args.explain:
        _print_explain(report, model)
    if args.report is not None:
        write_text_atomically(args.report, json.dumps(report.to_dict(), indent=2) + "\n")
    print(f"wrote {written}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import xopt
    from xopt.passes import CleanupPass
    from xopt.verify import fused_operators

    with _step(f"capturing {args.input}"):
        model = xopt.load(args.input)
    with _step("cleanup (exact), so that constants such as Gemma's 1 + γ are folded before the analysis"):
        model = CleanupPass()(model).model
    summary = xopt.analyze(model).summary()
    fused = fused_operators(model.graph)
    if fused:  # the analysis reads unfused graphs: what it finds in these can be partial
        note = f"fused or quantized operators ({', '.join(fused)}): the structure below may be partial"
        summary = {"note": note, **summary}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    blocks = summary.pop("blocks")
    ops = summary.pop("ops")
    for key, value in summary.items():
        print(f"{key:<18} {value}")
    print(f"{'ops':<18} " + ", ".join(f"{op} {count}" for op, count in ops.items()))
    for block in blocks:
        print(f"block {block['index']:<3} {block.get('module') or ''}")
        for part in ("attention", "mlp"):
            if part in block:
                print(f"    {part:<10} " + "  ".join(f"{k}={v}" for k, v in block[part].items()))
    return 0


def _blocks(args: argparse.Namespace) -> int:
    import xopt
    from xopt.calibration import calibration_feeds
    from xopt.capture.huggingface import TASK_CAUSAL_LM
    from xopt.passes import CleanupPass
    from xopt.passes.block_scores import greedy_removal, measure_distances, plot_block_scores
    from xopt.runnable import model_task

    if args.calibration is not None and not args.calibration.is_file():
        raise XoptError(f"{args.calibration}: no such file")
    if args.plot is not None:
        _check_plot(args.plot)
    with _step(f"capturing {args.input}"):
        model = CleanupPass()(xopt.load(args.input)).model
    feeds = calibration_feeds(model, args.calibration)
    with _step("scoring blocks"):
        scores = measure_distances(model, feeds)
    if not 0 <= args.greedy <= scores.blocks:
        raise XoptError(f"--greedy {args.greedy}: between 0 and {scores.blocks}, the model's blocks")
    if args.greedy:
        causal_lm = model_task(model) == TASK_CAUSAL_LM
        with _step(f"greedy removal of {args.greedy} blocks"):
            scores.greedy_order, scores.greedy_loss, scores.base_loss = greedy_removal(
                model, feeds, args.greedy, causal_lm
            )
        scores.loss_unit = "nats/token" if causal_lm else "1 − min cosine"
    if args.plot is not None:
        plot_block_scores(scores, args.plot, str(args.input))
    print(json.dumps(scores.to_dict(), indent=2) if args.json else "\n".join(scores.table()))
    return 0


def _passes(args: argparse.Namespace) -> int:
    from xopt.pipeline import RECIPES, registered_passes

    registered = registered_passes()
    width = max(map(len, registered))
    for name, cls in registered.items():
        kind = "exact" if cls.exact else "lossy"
        print(f"{name:<{width}} {kind:<6} {cls.summary}")
        for option, type_name, default in cls.options():
            print(f"{'':<{width + 8}}{option}: {type_name} = {default!r}")
    print()
    for recipe, names in RECIPES.items():
        print(f"recipe {recipe:<9} {' → '.join(names)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from xopt.evaluate import evaluate
    from xopt.runnable import open_runnable
    from xopt.text import calibration_overlap, read_text

    if args.window < 2:
        raise XoptError(f"--window {args.window}: must be at least 2")
    if args.max_windows is not None and args.max_windows < 1:
        raise XoptError(f"--max-windows {args.max_windows}: must be at least 1")
    if args.max_sentences < 1:
        raise XoptError(f"--max-sentences {args.max_sentences}: must be at least 1")
    _check_threads(args.threads)
    text = read_text(args.text, "evaluation")
    with _step(f"loading {args.model}"):
        model = open_runnable(args.model, tokenizer=args.tokenizer, threads=args.threads)
    overlap = calibration_overlap(model.model.metadata_props, text)
    if overlap is not None:
        raise XoptError(f"{args.model} {overlap}; evaluate on text it was not tuned on")
    reference = None
    if args.reference is not None:
        with _step(f"loading {args.reference}"):
            reference = open_runnable(args.reference, tokenizer=args.tokenizer, threads=args.threads)
    with _run_failures(f"evaluating {args.model}"):
        quality = evaluate(
            model,
            text,
            reference,
            window=args.window,
            max_windows=args.max_windows,
            max_sentences=args.max_sentences,
            progress=_iterate,
        )
    if args.json:
        print(json.dumps(quality.to_dict(), indent=2))
    else:
        for key, value in quality.to_dict().items():
            if value is not None:
                print(f"{key:<16} {value:.6g}" if isinstance(value, float) else f"{key:<16} {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import tempfile

    import xopt
    from xopt import bench
    from xopt.backends.onnxruntime import RUN_ERRORS
    from xopt.errors import first_line
    from xopt.inputs import sample_inputs
    from xopt.kv_cache import context_limit
    from xopt.runnable import open_runnable

    if args.batch < 1 or args.seq < 1 or args.rounds < 1 or args.warmup < 0:
        raise XoptError("--batch, --seq and --rounds must be positive, --warmup not negative")
    _check_threads(args.threads)
    if args.plot is not None:
        _check_plot(args.plot)
    threads = args.threads or len(os.sched_getaffinity(0))
    labels = [str(path) for path in args.models]
    if len(set(labels)) != len(labels):
        raise XoptError("the same model is given twice")
    runnables = {}
    for path in args.models:
        with _step(f"loading {path}"):
            runnables[str(path)] = open_runnable(path, threads=threads, spinning=False, backend=args.backend)
        limit, source = context_limit(runnables[str(path)].model)
        if limit is not None and args.seq > limit:
            raise XoptError(f"--seq {args.seq}: {path}: {source} {limit} positions")
    make_runner = bench.executor_runner if args.backend == "cuda" else bench.session_runner
    try:
        runners = {
            label: make_runner(r.session, sample_inputs(r.model, batch=args.batch, sequence=args.seq))
            for label, r in runnables.items()
        }
        timings = bench.time_interleaved(runners, rounds=args.rounds, warmup=args.warmup, progress=_iterate)
    except RUN_ERRORS as error:
        raise XoptError(f"batch {args.batch} × sequence {args.seq}: the run failed ({first_line(error)})") from None
    with tempfile.TemporaryDirectory(prefix="xopt-bench-") as scratch:
        for timing, (label, runnable) in zip(timings, runnables.items(), strict=True):
            onnx_file = runnable.onnx_file
            if onnx_file is None:  # captured from a Hugging Face folder: measure the export
                onnx_file = xopt.save(runnable.model, Path(scratch) / f"{len(os.listdir(scratch))}.onnx")
            timing.size_mb = bench.size_on_disk_mb(onnx_file)
            if not args.no_memory and args.backend == "onnxruntime":
                with _step(f"peak memory of {label}"):
                    timing.peak_memory_mb = bench.peak_memory_mb(onnx_file, args.batch, args.seq, threads)
    if args.plot is not None:
        bench.plot_latency(timings, args.plot, f"batch {args.batch} × sequence {args.seq}, {threads} threads")
    print(
        bench.to_json(timings, args.batch, args.seq, threads)
        if args.json
        else bench.format_table(timings, args.batch, args.seq, threads)
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from xopt.generate import Decoder
    from xopt.runnable import open_runnable

    _check_threads(args.threads)
    if args.seed is not None and args.temperature == 0:
        print(
            f"xopt: note: greedy decoding (--temperature 0) draws nothing, so --seed {args.seed} is unused",
            file=sys.stderr,
        )
    with _step(f"loading {args.model}"):
        runnable = open_runnable(args.model, tokenizer=args.tokenizer, threads=args.threads, backend=args.backend)
    decoder = Decoder(runnable)
    tokenizer = runnable.tokenizer()
    prompt_ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    generated: list[int] = []
    shown = ""

    def stream(token: int) -> None:  # decode the whole continuation: tokens may merge into one word
        nonlocal shown
        if not generated:
            print(args.prompt, end="")
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        print(text[len(shown) :], end="", flush=True)
        shown = text

    try:
        with _run_failures(f"generating with {args.model}"):
            result = decoder.generate(
                prompt_ids,
                args.max_new_tokens,
                temperature=args.temperature,
                seed=0 if args.seed is None else args.seed,
                eos_token_id=None if args.ignore_eos else tokenizer.eos_token_id,
                on_token=stream,
            )
    finally:
        if generated:  # end the streamed line before anything else is printed
            print()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        speed = result.decode_tokens_per_s
        decode = f"{speed:.1f} tokens/s" if speed is not None else "n/a"
        print(
            f"prefill {result.prefill_ms:.1f} ms ({counted(result.prompt_tokens, 'prompt token')}), "
            f"decode {decode} ({counted(len(result.tokens), 'new token')})",
            file=sys.stderr,
        )
    return 0


@contextlib.contextmanager
def _run_failures(what: str) -> Iterator[None]:
    """A run that fails inside ONNX Runtime (an input the graph cannot take) is the user's error."""
    from xopt.backends.onnxruntime import RUN_ERRORS
    from xopt.errors import first_line

    try:
        yield
    except RUN_ERRORS as error:
        raise XoptError(f"{what}: the run failed ({first_line(error)})") from None


def _demo(args: argparse.Namespace) -> int:
    from xopt.demo import run_demo

    with showing_progress(_iterate):
        print(run_demo(args.output, step=_step, progress_bar=_progress_bar))
    return 0


def _output_path(text: str) -> Path:
    """`-o`: an .onnx name is a file, so a trailing slash after one is a contradiction, not a folder."""
    if not text.strip():
        raise XoptError("-o: the output path is empty")
    from xopt.saving import is_folder_output

    path = Path(text)
    if text.endswith("/") and not is_folder_output(path):
        raise XoptError(f"-o {text}: an .onnx name is written as a file; drop the slash, or name a folder")
    return path


def _check_output(source: Path, output: Path) -> None:
    from xopt.saving import check_output

    if not source.exists():
        raise XoptError(f"{source}: no such file or folder")
    if output.resolve() == source.resolve():
        raise XoptError(f"{output}: output is the input; choose another path")
    if source.is_dir() and source.resolve() in output.resolve().parents:
        raise XoptError(f"{output}: output lies inside the input folder; choose another path")
    if output.resolve() in source.resolve().parents:
        raise XoptError(f"{output}: the input lies inside this output folder, which is replaced whole")
    check_output(output)


def _check_report(report: Path, source: Path, output: Path) -> None:
    """The report is a new file beside the model, never the input, the output or inside them."""
    _check_writable_parent(report)
    if report.is_dir():
        raise XoptError(f"--report {report}: is a folder; give a .json file")
    target = report.resolve()
    for path, what in ((source, "the input"), (output, "the output")):
        if target == path.resolve() or path.resolve() in target.parents:
            raise XoptError(f"--report {report}: would overwrite {what}; give another path")
        if path.suffix.lower() == ".onnx" and target == Path(f"{path.resolve()}.data"):
            raise XoptError(f"--report {report}: would overwrite {what}'s weights; give another path")


def _check_plot(path: Path) -> None:
    from xopt.plots import check_plot_path

    check_plot_path(path)
    _check_writable_parent(path)


def _check_threads(threads: int | None) -> None:

    most = 8 * (os.cpu_count() or 1)
    if threads is not None and not 1 <= threads <= most:
        raise XoptError(f"--threads {threads}: give 1 to {most} (this machine has {os.cpu_count()} CPUs)")


def _check_writable_parent(path: Path) -> None:
    from xopt.saving import check_writable

    check_writable(path)


def _print_explain(report, model) -> None:
    """Each pass's facts and explain lines, then the transformer structure found in the input
    `model` and its near-misses (what the passes had to work on; fused operators hide it after)."""
    import xopt

    for record in report.passes:
        print(f"{record.name}: {'changed the model' if record.modified else 'no change'}")
        for key, value in record.stats.items():
            print(f"    {key}: {value}")
        for line in record.explain:
            print(f"    {line}")
    structure = xopt.analyze(model)
    print(f"input structure: {counted(len(structure.blocks), 'block')} found")
    for line in structure.near_misses:
        print(f"    not matched: {line}")


@contextlib.contextmanager
def _step(label: str) -> Iterator[SimpleNamespace]:
    """Show `label … done (s)` on a terminal around a step with no natural progress count; yields
    a namespace whose `seconds` holds the step's time once it is done.

    On failure the line is erased, so the error is the only line left on stderr."""
    from xopt.report import stopwatch

    interactive = sys.stderr.isatty()
    if interactive:
        print(f"{label} …", file=sys.stderr, end="", flush=True)
    try:
        with stopwatch() as elapsed:
            yield elapsed
    except BaseException:
        if interactive:
            print("\r\033[K", file=sys.stderr, end="", flush=True)
        raise
    if interactive:
        print(f" done ({elapsed.seconds:.1f} s)", file=sys.stderr)


def _iterate(items, total: int, unit: str = "it", description: str | None = None):
    """`items` with a progress bar on a terminal (under the passes' bar for a pass's own loop:
    the `xopt.progress` display)."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(items, total=total, unit=unit, desc=description, file=sys.stderr, leave=False, disable=not interactive)


@contextlib.contextmanager
def _progress_bar(total: int, unit: str):
    """A tqdm bar on stderr; yields a callback that advances it and names the current item."""
    from tqdm import tqdm

    with tqdm(total=total, unit=unit, file=sys.stderr, leave=False, disable=not sys.stderr.isatty()) as bar:
        state = {"started": False}

        def advance(item) -> None:
            if state["started"]:
                bar.update(1)
            state["started"] = True
            bar.set_description(getattr(item, "name", str(item)))

        yield advance
        if state["started"]:
            bar.update(1)


def _quiet_third_party() -> None:
    """torch and transformers log and print progress for their own steps; xopt reports its own."""
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


if __name__ == "__main__":
    sys.exit(main())

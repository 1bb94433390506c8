"""Depth and width pruning: quality and speed on real weights.

    python tools/benchmark_pruning.py                       # writes benchmarks/PRUNING.md
    python tools/benchmark_pruning.py --ratios 0.25 --no-speed --output DIR

SmolLM2-135M (30 blocks), after `cleanup`:
- depth: for each fraction of the blocks (10, 20, 25, 30% → round(r·30) blocks), each score (Block
  Influence, angular distance of a window, greedy calibration loss) and each method (drop,
  replaceme) — `prune-layers(blocks=…, method=…)` with the blocks that score ranks least important;
  the scores are computed once on the bundled calibration text (`xopt.passes.block_scores`);
- width: `prune-width(ratio=r)` for r = 10, 20, 30% of every MLP's neurons, `prune-width(heads=h)`
  (h = 34%: 9 → 6 query heads per attention, 2 per KV head) and both together;
- quality with `xopt.evaluate` on the bundled evaluation text (a different novel): perplexity, and
  against the unpruned model the next-token KL and top-1 agreement;
- speed: the exact recipe applied after pruning against the exact recipe alone, as `xopt generate`
  runs them (batch 1, 128-token prompt, 128 new tokens), interleaved rounds after a warm-up; the
  ratio is the median over rounds of the per-round ratio (paired, so load that slows a round cancels).
MiniLM-L6 (6 post-norm blocks): drop 1 and 2 blocks per score, and 25 or 50% of its 12 heads;
sentence-embedding cosine to fp32. `--no-depth` leaves the block rows out (width and heads only).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import xopt
from xopt.calibration import calibration_feeds
from xopt.evaluate import Quality, evaluate
from xopt.passes.block_scores import BlockScores, greedy_removal, measure_distances
from xopt.passes.prune_layers import choose_blocks
from xopt.pipeline import PassManager, parse_spec
from xopt.runnable import open_runnable
from xopt.text import read_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchmark import machine_description, run_length, versions  # noqa: E402
from benchmark_decode import xopt_variant  # noqa: E402
from benchmark_quantization import quality_cells, quality_columns, source_folder  # noqa: E402

SCORES = ("bi", "angular", "greedy")
METHODS = ("drop", "replaceme")
SPEED_BLOCKS, SPEED_SCORE = 8, "angular"  # the depth variant timed: 25% of SmolLM2's 30 blocks, replaceme
SPEED_LABEL = f"{SPEED_BLOCKS} blocks ({100 * SPEED_BLOCKS / 30:.0f}%), {SPEED_SCORE}, replaceme"
logger = logging.getLogger("benchmark_pruning")


def scores_for(model, causal_lm: bool, most: int) -> dict[str, BlockScores]:
    """Scores for drop (every block a candidate) and replaceme (block 0 kept): greedy differs only
    when it would pick block 0."""
    feeds = calibration_feeds(model)
    scores = measure_distances(model, feeds)
    scores.greedy_order, scores.greedy_loss, scores.base_loss = greedy_removal(model, feeds, most, causal_lm)
    both = {"drop": scores, "replaceme": scores}
    if 0 in scores.greedy_order:
        kept_first = dataclasses.replace(scores)  # the same distances; only greedy's candidates differ
        kept_first.greedy_order, kept_first.greedy_loss, kept_first.base_loss = greedy_removal(
            model, feeds, most, causal_lm, first=1
        )
        both["replaceme"] = kept_first
    return both


def quality_rows(
    name: str,
    ratios: list[float],
    heads: list[float],
    scratch: Path,
    threads: int,
    windows: int = 0,
    depth: bool = True,
) -> tuple[list, dict, BlockScores | None]:
    """(label, blocks removed, params, quality) rows; the spec of each variant; the scores."""
    captured, _ = PassManager(parse_spec("cleanup"), verify=False)(xopt.load(source_folder(name)))
    xopt.save(captured, scratch / f"{name}-fp32")
    reference = open_runnable(scratch / f"{name}-fp32", threads=threads)
    text = read_text(None, "evaluation")
    if windows:
        text = first_windows(reference, text, windows)
    causal_lm = name == "smollm2"
    total = len(xopt.analyze(captured).blocks)
    counts = (sorted({max(1, round(r * total)) for r in ratios}) if causal_lm else [1, 2]) if depth else []
    scores = scores_for(captured, causal_lm, max(counts)) if counts else None
    rows = [("unpruned", "—", parameters(captured), evaluate(reference, text, reference))]
    specs = {}
    methods = METHODS if causal_lm else ("drop",)
    for count in counts:
        for score in SCORES:
            for method in methods:
                blocks = choose_blocks(scores[method], score, count, first=1 if method == "replaceme" else 0)
                spec = f"prune-layers(blocks={'+'.join(map(str, blocks))},method={method})"
                label = f"{count} blocks ({100 * count / total:.0f}%), {score}, {method}"
                specs[label] = spec
                rows.append(
                    measured(captured, spec, label, ",".join(map(str, blocks)), scratch, reference, text, threads)
                )
    for label, spec in width_specs(ratios if causal_lm else [], heads, both=causal_lm).items():
        specs[label] = spec
        rows.append(measured(captured, spec, label, "—", scratch, reference, text, threads))
    return rows, specs, scores["drop"] if scores else None


def width_specs(ratios: list[float], heads: list[float], both: bool) -> dict[str, str]:
    """`prune-width` variants by label: MLP neurons, attention heads, and (`both`) the smallest
    MLP ratio above 10% with each head fraction."""
    specs = {f"width −{100 * r:.0f}% (MLP neurons)": f"prune-width(ratio={r})" for r in ratios}
    specs |= {f"heads −{100 * h:.0f}% (attention heads)": f"prune-width(heads={h})" for h in heads}
    paired = [r for r in ratios if r > 0.1][:1] if both else []
    for r in paired:
        for h in heads:
            specs[f"width −{100 * r:.0f}% and heads −{100 * h:.0f}%"] = f"prune-width(ratio={r},heads={h})"
    return specs


def first_windows(reference, text: str, windows: int) -> str:
    """About the first `windows` windows of 512 tokens of `text` (cut in proportion to its tokens)."""
    tokens = len(reference.tokenizer()(text, add_special_tokens=False)["input_ids"])
    return text[: len(text) * (windows * 512 + 64) // tokens]


def speed_specs(ratios: list[float], heads: list[float], scratch: Path, depth: bool) -> dict[str, str]:
    """The timed variants' specs without the quality sweep: blocks by angular distance alone."""
    captured, _ = PassManager(parse_spec("cleanup"), verify=False)(xopt.load(source_folder("smollm2")))
    xopt.save(captured, scratch / "smollm2-fp32")  # the tokenizer speed_rows reads
    specs = {}
    if depth:
        scores = measure_distances(captured, calibration_feeds(captured))
        blocks = choose_blocks(scores, SPEED_SCORE, SPEED_BLOCKS, first=1)
        specs[SPEED_LABEL] = f"prune-layers(blocks={'+'.join(map(str, blocks))},method=replaceme)"
    return specs | width_specs(ratios, heads, both=True)


def measured(captured, spec: str, label: str, removed: str, scratch: Path, reference, text: str, threads: int):
    start = time.perf_counter()
    pruned, report = PassManager(parse_spec(spec), verify=False)(captured)
    stats = report.passes[-1].stats
    if "maps_kept" in stats and stats["maps_kept"] < len(stats["fit_error"]):  # ReplaceMe's guard
        label += f" (guard kept {stats['maps_kept']} of {len(stats['fit_error'])} maps)"
    folder = scratch / "variant"
    xopt.save(pruned, folder)
    quality = evaluate(open_runnable(folder, threads=threads), text, reference)
    logger.info("%s: %s in %.0f s", label, _metric(quality), time.perf_counter() - start)
    return label, removed, parameters(pruned), quality


def parameters(model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)


def _metric(q: Quality) -> str:
    if q.perplexity is not None:
        return f"perplexity {q.perplexity:.3f}, KL {q.kl:.4f}, top-1 {100 * q.top1_agreement:.1f}%"
    return f"cosine min {q.cosine_min:.4f}, mean {q.cosine_mean:.4f}"


def speed_rows(specs: dict[str, str], scratch: Path, threads: int, repeats: int, last_token: bool) -> list[tuple]:
    """(label, prefill ms, decode tokens/s, prefill speed-up, decode speed-up) against the exact
    recipe; with `last_token` every build computes the LM head for the last position only, and the
    exact recipe with every position's logits is timed beside them."""
    import transformers

    folder = source_folder("smollm2")
    captured = xopt.load(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(scratch / "smollm2-fp32")
    prompt = tokenizer(read_text(None, "evaluation"), add_special_tokens=False)["input_ids"][:128]
    head = ["last-token-logits"] if last_token else []
    builds = {"exact recipe": ["cleanup", "fold-norms", *head, "fuse"]}
    if last_token:
        builds["exact recipe, every position's logits"] = ["cleanup", "fold-norms", "fuse"]
    for label, spec in specs.items():
        builds[f"{label} + exact"] = ["cleanup", spec, "fold-norms", *head, "fuse"]
    variants = {}
    for label, steps in builds.items():
        model, _ = PassManager(parse_spec(",".join(steps)), verify=False)(captured)
        out = scratch / f"speed-{len(variants)}"
        xopt.save(model, out)
        variants[label] = xopt_variant(out, prompt, 128, threads)
        logger.info("built %s", label)
    samples = {label: ([], []) for label in variants}
    for round_index in range(repeats + 1):
        for label, generate in variants.items():
            _, prefill_ms, tokens_per_s = generate()
            if round_index:
                samples[label][0].append(prefill_ms)
                samples[label][1].append(tokens_per_s)
    base_prefill, base_decode = samples["exact recipe"]
    rows = []
    for label, (prefill, decode) in samples.items():
        prefill_ratio = float(np.median(np.divide(base_prefill, prefill)))
        decode_ratio = float(np.median(np.divide(decode, base_decode)))
        rows.append((label, float(np.median(prefill)), float(np.median(decode)), prefill_ratio, decode_ratio))
    return rows


def quality_table(rows, causal_lm: bool, column: str = "blocks removed") -> list[str]:
    """Markdown rows; the perplexity increase is over the first row's."""
    header = f"| variant | {column} | params (M) | {quality_columns(causal_lm, 'first row')} |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, removed, params, q in rows:
        lines.append(f"| {label} | {removed} | {params / 1e6:.1f} | {quality_cells(q, rows[0][3], causal_lm)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.1, 0.2, 0.25, 0.3])
    parser.add_argument("--heads", nargs="*", type=float, default=[0.34], help="fractions of attention heads")
    parser.add_argument("--no-depth", action="store_true", help="width and head rows only")
    parser.add_argument(
        "--last-token-logits", action="store_true", help="speed: every build computes the last position's logits only"
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=7, help="timed generation rounds")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-quality", action="store_true", help="speed only (blocks chosen by angular distance)")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument(
        "--windows", type=int, default=0, help="SmolLM2: evaluate on the first N windows of 512 tokens (0: all)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    lines = [
        "# Pruning: SmolLM2-135M and MiniLM-L6",
        "",
        f"Machine: {machine_description()}. Threads: {args.threads}. Versions: {versions()}.",
        "",
        "Method: `python tools/benchmark_pruning.py`. Blocks are scored once on the bundled calibration text "
        "(8 windows of 512 tokens; greedy on the first 2) and chosen per score; each variant is measured by "
        "`xopt eval` on the bundled evaluation text (a different novel"
        + (f"; SmolLM2 on its first {args.windows} windows of 512 tokens" if args.windows else "")
        + "), KL and top-1 against the unpruned model. Block numbers count from 0.",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="xopt-pruning-") as scratch:
        scratch = Path(scratch)
        if args.no_quality:
            specs = speed_specs(args.ratios, args.heads, scratch, depth=not args.no_depth)
        else:
            rows, specs, scores = quality_rows(
                "smollm2", args.ratios, args.heads, scratch, args.threads, args.windows, depth=not args.no_depth
            )
            lines += ["## SmolLM2-135M: quality", "", *quality_table(rows, True), ""]
            if scores is not None:
                lines += ["Block scores (greedy: rank of removal, calibration loss in nats/token):", "", "```"]
                lines += [*scores.table(), "```", ""]
        if not args.no_speed:
            widths = width_specs(args.ratios, args.heads, both=True)
            wanted = {label: spec for label, spec in specs.items() if label == SPEED_LABEL or label in widths}
            lines += [
                "## SmolLM2-135M: speed (`xopt generate`, batch 1, 128-token prompt, 128 new tokens)",
                "",
                *(
                    ["Every build with `last-token-logits` (the LM head on the last position only).", ""]
                    if args.last_token_logits
                    else []
                ),
                "| variant | prefill ms | decode tokens/s | prefill speed-up | decode speed-up |",
                "|---|---|---|---|---|",
            ]
            for label, prefill, decode, prefill_ratio, decode_ratio in speed_rows(
                wanted, scratch, args.threads, args.repeats, args.last_token_logits
            ):
                lines.append(f"| {label} | {prefill:.0f} | {decode:.1f} | {prefill_ratio:.2f}× | {decode_ratio:.2f}× |")
            lines.append("")
        if not args.no_minilm and not args.no_quality:
            minilm_heads = [0.25, 0.5] if args.heads else []
            rows, _, _ = quality_rows("minilm", [], minilm_heads, scratch, args.threads, depth=not args.no_depth)
            lines += ["## MiniLM-L6: quality (post-norm: drop only)", "", *quality_table(rows, False), ""]
    lines.append(run_length(time.perf_counter() - started))
    (args.output / "PRUNING.md").write_text("\n".join(lines) + "\n")
    print((args.output / "PRUNING.md").read_text())


if __name__ == "__main__":
    main()

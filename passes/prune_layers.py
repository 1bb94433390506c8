"""`prune-layers`: remove whole transformer blocks chosen on calibration text (lossy, training-free).

Which blocks (`block_scores.py`): the n with the smallest Block Influence (`score=bi`), the
contiguous window of n with the smallest angular distance between the stream before and after
it (`score=angular`), or the first n that greedy removal of the least-loss block picks
(`score=greedy`). n = `n`, or round(`ratio` · L) of the L blocks.

`method=drop` removes blocks l..m (each maximal run of chosen blocks) by wiring the stream that
enters block l to every reader of the stream leaving block m: the run's residual contributions
are gone, its nodes fall out as dead code.

`method=replaceme` (Shopkhoev et al., 2025) also folds a linear map into the last kept block
before each run. With M the MLP output of block l−1, Y its residual part (h_l = Y + M) and L the
stream leaving block m, over all calibration tokens (rows), in float64:

    T = argmin_T ‖M·T + Y − L‖²  =  (MᵀM + λI)⁻¹ Mᵀ(L − Y),   λ = 1e-6 · tr(MᵀM)/d

and the down projection becomes W' = W·T, b' = b·T (M = x·W + b, so M·T = x·W' + b'): block
l−1 then writes Y + M·T ≈ L, with no new parameters. Every run's T is fitted in one pass over the
full model's activations (with several runs, a later run's M and Y are those of the unpruned model).
T minimises the stream error, not the loss, and can raise the loss (angular's windows of 9 of
SmolLM2's 30 blocks: perplexity 240 dropped, 603 with T). So with `guard=true` (the default) each
map is kept only when it lowers the task loss (`block_gates.CalibrationLoss`) on `GUARD_WINDOWS`
further calibration windows, held out from the fit: all maps are tried, then each run's map is
left out in turn and stays out when that lowers the held-out loss; the fewest-loss set is folded.
A run starting at block 0 has no MLP before it, so with replaceme block 0 is never chosen. Post-norm
models (BERT) put a norm after the residual add, where no linear map folds: replaceme refuses them.

A decoder's KV cache loses the removed layers' past inputs and present outputs, and the kept
layers are renumbered 0…L−n−1 (`xopt.kv_cache`'s convention), so the model still generates.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from xopt.analysis.block_boundaries import block_input, block_output, cache_layers
from xopt.analysis.structure import TransformerStructure, residual_skip, sublayer_output
from xopt.backends.onnxruntime import create_session
from xopt.calibration import calibration_feeds, probe_values
from xopt.capture.huggingface import TASK_CAUSAL_LM
from xopt.errors import XoptError
from xopt.kv_cache import PAST_PATTERN, PRESENT_PATTERN, past_inputs, past_name, present_name
from xopt.passes.block_gates import CalibrationLoss, gate_name, gated_model, switch_name
from xopt.passes.block_scores import BlockScores, greedy_removal, measure_distances, scorable_structure
from xopt.pipeline import Pass, PassResult, register
from xopt.rewrite import bias_or_zeros, owns_weight, replace_value, set_bias, set_weight, weight_in_out
from xopt.runnable import model_task

logger = logging.getLogger(__name__)

RIDGE = 1e-6
GUARD_WINDOWS = 2


@register
@dataclass
class PruneLayersPass(Pass):
    name = "prune-layers"
    exact = False
    summary = "remove the transformer blocks that matter least on calibration text (drop or ReplaceMe)"

    n: int = 0  # blocks to remove
    ratio: float = 0.0  # or this fraction of the blocks, rounded
    method: Literal["drop", "replaceme"] = "replaceme"
    score: Literal["bi", "angular", "greedy"] = "angular"
    blocks: str = ""  # or exactly these blocks, e.g. blocks=20+21+22 (then nothing is scored)
    calibration: str = ""  # text file; empty: the bundled calibration text
    windows: int = 8  # calibration windows of 512 tokens (greedy uses the first 2)
    guard: bool = True  # keep a ReplaceMe map only where it lowers the held-out calibration loss
    threads: int = 2

    def __call__(self, model: ir.Model) -> PassResult:
        self._check_options()
        structure = scorable_structure(model, "run prune-layers before fuse, quantize")
        total = len(structure.blocks)
        if self.method == "replaceme" and structure.norm_position == "post":
            raise XoptError(
                "replaceme folds its map before a residual add, and this post-norm model has a norm there; "
                "use method=drop"
            )
        if self.method == "replaceme" and any(b.mlp is not None and b.mlp.output_norm for b in structure.blocks):
            raise XoptError(
                "replaceme folds its map into a down projection, and a norm sits between it and the residual add "
                "(OLMo-2, Gemma-2/3); use method=drop"
            )
        first = 1 if self.method == "replaceme" else 0
        explicit = self._explicit_blocks(total, first)
        count = len(explicit) or self._count(total)
        if count > total - first:
            raise XoptError(f"cannot remove {count} of {total} blocks with method={self.method}")
        causal_lm = model_task(model) == TASK_CAUSAL_LM
        guarded = self.method == "replaceme" and self.guard
        feeds = calibration_feeds(
            model, self.calibration or None, windows=self.windows + (GUARD_WINDOWS if guarded else 0)
        )
        feeds, held_out = feeds[: self.windows], feeds[self.windows :]
        if guarded and not held_out:
            raise XoptError(
                f"the calibration text has no window left after {len(feeds)} to check the ReplaceMe maps on; "
                "give fewer windows= or guard=false"
            )
        stats: dict = {"blocks_removed": count}
        if explicit:  # no scoring: `xopt blocks` shows the scores
            chosen, explain = explicit, []
        else:
            scores = measure_distances(model, feeds, threads=self.threads)
            if self.score == "greedy":
                scores.greedy_order, scores.greedy_loss, scores.base_loss = greedy_removal(
                    model, feeds, count, causal_lm, threads=self.threads, first=first
                )
                scores.loss_unit = "nats/token" if causal_lm else "1 − min cosine"
            chosen = choose_blocks(scores, self.score, count, first)
            explain = [f"block scores on {len(feeds)} calibration runs:", *scores.table()]
            stats["scores"] = scores.to_dict()
        chooser = "blocks=" if explicit else self.score
        explain.append(f"removing {count} of {total} blocks chosen by {chooser}: {chosen} ({self.method})")
        runs = _runs(chosen)
        stats["removed"] = chosen
        if self.method == "replaceme":
            fits = _fit_replaceme(model, structure, runs, feeds, self.threads)
            keep = [True] * len(runs)
            if guarded:
                keep, guard_stats, guard_line = _guard(model, chosen, runs, fits, held_out, causal_lm, self.threads)
                stats["guard"] = guard_stats
            for (start, end), fit, kept in zip(runs, fits, keep, strict=True):
                if kept:
                    _fold_into_down(model.graph, structure.blocks[start - 1], fit.transform)
                explain.append(
                    f"replaceme: blocks {start}–{end} → a map {'folded' if kept else 'fitted (not kept)'} into "
                    f"block {start - 1}'s down projection; relative stream error after block {end} on "
                    f"calibration: {fit.error_drop:.4f} (drop) → {fit.error_fit:.4f}"
                )
            if guarded:
                explain.append(guard_line)
            stats["fit_error"] = [[round(f.error_drop, 6), round(f.error_fit, 6)] for f in fits]
            stats["maps_kept"] = sum(keep)
        layers = cache_layers(model, structure)
        for start, end in reversed(runs):
            replace_value(block_output(structure.blocks[end], structure), block_input(structure.blocks[start]))
        removed_layers = [layers[b] for b in chosen if b in layers]
        _drop_cache_layers(model, removed_layers)
        stats["cache_layers_removed"] = len(removed_layers)
        return PassResult(model, True, stats, explain)

    def _check_options(self) -> None:
        """The options that are wrong whatever the model (checked before the model is)."""
        if self.blocks and (self.n or self.ratio):
            raise XoptError("give blocks= or n=/ratio=, not both")
        if not self.blocks and (self.n > 0) == (self.ratio > 0):
            raise XoptError("give exactly one of n=K (blocks) or ratio=R (0 < R < 1)")
        if self.ratio >= 1:
            raise XoptError(f"ratio={self.ratio:g} must be below 1")

    def _explicit_blocks(self, total: int, first: int) -> list[int]:
        """The blocks given by `blocks=20+21+22` (sorted), checked; empty when not given."""
        if not self.blocks:
            return []
        try:
            chosen = sorted({int(b) for b in self.blocks.split("+")})
        except ValueError:
            raise XoptError(f"blocks={self.blocks!r}: write block indices joined by '+', e.g. blocks=20+21") from None
        if chosen[0] < first or chosen[-1] >= total:
            raise XoptError(
                f"blocks={self.blocks!r}: indices must lie in {first}…{total - 1} with method={self.method}"
            )
        return chosen

    def _count(self, total: int) -> int:
        count = self.n or round(self.ratio * total)
        if count < 1:
            raise XoptError(f"ratio={self.ratio:g} of {total} blocks removes none")
        return count


def choose_blocks(scores: BlockScores, score: str, count: int, first: int = 0) -> list[int]:
    """The `count` blocks (from block `first` on) that `score` ranks least important, sorted."""
    candidates = range(first, scores.blocks)
    if score == "bi":
        return sorted(sorted(candidates, key=lambda b: scores.influence[b])[:count])
    if score == "greedy":
        return sorted(scores.greedy_order[:count])
    start = min(range(first, scores.blocks - count + 1), key=lambda s: scores.window(s, count))
    return list(range(start, start + count))


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive block indices, as (first, last)."""
    runs: list[tuple[int, int]] = []
    for block in blocks:
        if runs and runs[-1][1] == block - 1:
            runs[-1] = (runs[-1][0], block)
        else:
            runs.append((block, block))
    return runs


@dataclass
class ReplaceMeFit:
    transform: np.ndarray  # T [d, d]
    error_drop: float  # ‖M + Y − L‖² / ‖L − Y‖² on the calibration tokens (T = I: plain drop)
    error_fit: float  # ‖M·T + Y − L‖² / ‖L − Y‖²


def _fit_replaceme(
    model: ir.Model, structure: TransformerStructure, runs: list[tuple[int, int]], feeds, threads: int
) -> list[ReplaceMeFit]:
    """T for each run (first, last), fitted on the full model: M·T + Y ≈ L (see the module doc)."""
    blocks = structure.blocks
    wanted = []
    for start, end in runs:
        mlp = blocks[start - 1].mlp
        if mlp is None or not owns_weight(mlp.down):
            raise XoptError(f"block {start - 1} has no down projection of its own to fold a map into")
        wanted.append((sublayer_output(mlp), residual_skip(mlp), block_output(blocks[end], structure)))
    width = blocks[0].mlp.down.out_features
    gram = [np.zeros((width, width)) for _ in runs]  # MᵀM
    cross = [np.zeros((width, width)) for _ in runs]  # Mᵀ(L − Y)
    energy = [0.0 for _ in runs]  # ‖L − Y‖²
    values = [v for triple in wanted for v in triple]
    for outputs in probe_values(model, values, feeds, threads=threads):
        for k, (m, y, target) in enumerate(wanted):
            rows_m, rows_d = _rows(outputs[m.name]), _rows(outputs[target.name]) - _rows(outputs[y.name])
            gram[k] += rows_m.T @ rows_m
            cross[k] += rows_m.T @ rows_d
            energy[k] += float(np.sum(rows_d**2))
    fits = []
    for g, c, e in zip(gram, cross, energy, strict=True):
        transform = np.linalg.solve(g + RIDGE * np.trace(g) / width * np.eye(width), c)

        def error(t: np.ndarray, g=g, c=c, e=e) -> float:  # ‖M·T − (L − Y)‖² / ‖L − Y‖²
            return float((np.sum(t * (g @ t)) - 2 * np.sum(t * c) + e) / e)

        fits.append(ReplaceMeFit(transform, error(np.eye(width)), error(transform)))
    return fits


def _guard(
    model: ir.Model,
    chosen: list[int],
    runs: list[tuple[int, int]],
    fits: list[ReplaceMeFit],
    held_out: list[dict[str, np.ndarray]],
    causal_lm: bool,
    threads: int,
) -> tuple[list[bool], dict, str]:
    """Which runs keep their map (the set of least held-out loss found by leaving maps out in turn),
    the losses, and a line for the explanation."""
    gated = gated_model(model, {start - 1: fit.transform for (start, _), fit in zip(runs, fits, strict=True)})
    loss = CalibrationLoss(create_session(gated, threads=threads), held_out, causal_lm)
    removed = {gate_name(block): 0.0 for block in chosen}

    def with_maps(keep: list[bool]) -> float:
        return loss({**removed, **{switch_name(start - 1): 1.0 for (start, _), k in zip(runs, keep, strict=True) if k}})

    drop = with_maps([False] * len(runs))
    keep = [True] * len(runs)
    best = all_maps = with_maps(keep)
    for k in range(len(runs)):
        trial = [kept and j != k for j, kept in enumerate(keep)]
        value = with_maps(trial) if any(trial) else drop
        if value < best:
            keep, best = trial, value
    unit = "nats/token" if causal_lm else "1 − min cosine"
    kept = [f"{start}–{end}" for (start, end), k in zip(runs, keep, strict=True) if k]
    line = (
        f"replaceme guard, loss on {len(held_out)} held-out calibration runs ({unit}): drop {drop:.4f}, "
        f"every map {all_maps:.4f}, kept the maps of {', '.join(kept) or 'no run'}: {best:.4f}"
    )
    stats = {"drop": round(drop, 6), "all_maps": round(all_maps, 6), "kept": round(best, 6), "unit": unit}
    return keep, stats, line


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, array.shape[-1]).astype(np.float64)


def _fold_into_down(graph: ir.Graph, block, transform: np.ndarray) -> None:
    down = block.mlp.down
    set_weight(graph, down, weight_in_out(down) @ transform)
    if down.bias is not None:
        set_bias(graph, down, bias_or_zeros(down) @ transform)


def _drop_cache_layers(model: ir.Model, layers: list[int]) -> None:
    """Remove the layers' present outputs, the nodes only they needed, and their past inputs;
    renumber the kept layers 0, 1, …"""
    graph = model.graph
    removed = set(layers)
    graph.outputs[:] = [v for v in graph.outputs if _cache_layer(v.name, PRESENT_PATTERN) not in removed]
    common_passes.RemoveUnusedNodesPass()(model)
    if not removed:
        return
    pasts = {(int(m.group(1)), m.group(2)): v for v in past_inputs(model) if (m := PAST_PATTERN.match(v.name))}
    kept = sorted({layer for layer, _ in pasts} - removed)
    for (layer, kind), value in pasts.items():
        if layer in removed and value.uses():  # read outside its block (e.g. for the past length)
            replace_value(value, pasts[(kept[0], kind)])
    graph.inputs[:] = [v for v in graph.inputs if _cache_layer(v.name, PAST_PATTERN) not in removed]
    outputs = {v.name: v for v in graph.outputs}
    for new, old in enumerate(kept):
        for kind in ("key", "value"):
            pasts[(old, kind)].name = past_name(new, kind)
            outputs[present_name(old, kind)].name = present_name(new, kind)


def _cache_layer(name: str | None, pattern: re.Pattern) -> int | None:
    match = pattern.match(name or "")
    return int(match.group(1)) if match else None

"""How much each transformer block matters, measured on calibration text: what `prune-layers` and
`xopt blocks` rank blocks by.

With h_0 the stream entering block 0 and h_{l+1} the stream leaving block l (`block_boundaries`),
over every calibration token t (padding excluded):

- Block Influence (ShortGPT; Men et al., 2024): BI_l = 1 − mean_t cos(h_l,t, h_{l+1},t); a block
  that hardly turns the stream matters little.
- angular distance (Gromov et al., 2024) of a window of n blocks starting at l:
  d(l, n) = mean_t arccos(cos(h_l,t, h_{l+n},t)) / π; the window with the smallest d is removed.
  Reported per block as d(l, 1).
- greedy: remove the block whose removal raises the calibration loss least, and repeat. The loss
  is the next-token cross-entropy (nats/token) of a causal LM, or 1 − the smallest cosine between
  an encoder's sentence embeddings and the full model's. Every candidate runs in one ONNX Runtime
  session of the gated model of `block_gates.py` (gate g_l = 0: block l removed); it costs
  Σ_k (L − k) runs over the first `GREEDY_WINDOWS` calibration windows.

One pass over the calibration feeds gives every h_l; all pairs (l, m) are accumulated, so every
window of every length is scored from that pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from xopt.analysis import find_transformer_structure
from xopt.analysis.block_boundaries import block_input, block_output, boundaries_known
from xopt.analysis.structure import TransformerStructure
from xopt.backends.onnxruntime import create_session
from xopt.calibration import probe_values
from xopt.errors import XoptError
from xopt.passes.block_gates import CalibrationLoss, gate_name, gated_model
from xopt.verify import require_no_opaque_operators

logger = logging.getLogger(__name__)

GREEDY_WINDOWS = 2


@dataclass
class BlockScores:
    blocks: int
    influence: np.ndarray  # [L] Block Influence
    angular: np.ndarray  # [L+1, L+1] mean angular distance between stream states l and m (l < m)
    greedy_order: list[int] = field(default_factory=list)  # blocks in the order greedy removes them
    greedy_loss: list[float] = field(default_factory=list)  # the calibration loss after each removal
    base_loss: float | None = None
    loss_unit: str = ""

    def window(self, start: int, count: int) -> float:
        return float(self.angular[start, start + count])

    def table(self) -> list[str]:
        """One line per block: its Block Influence, its one-block angular distance and its greedy rank."""
        rank = {block: k + 1 for k, block in enumerate(self.greedy_order)}
        lines = [f"{'block':>5} {'influence':>10} {'angular':>8} {'greedy':>7}"]
        for block in range(self.blocks):
            greedy = f"{rank[block]:>7}" if block in rank else f"{'—':>7}"
            lines.append(f"{block:>5} {self.influence[block]:>10.4f} {self.window(block, 1):>8.4f} {greedy}")
        return lines

    def to_dict(self) -> dict:
        return {
            "influence": [round(float(x), 6) for x in self.influence],
            "angular": [round(self.window(b, 1), 6) for b in range(self.blocks)],
            "greedy_order": self.greedy_order,
            "greedy_loss": [round(x, 6) for x in self.greedy_loss],
            "base_loss": self.base_loss,
            "loss_unit": self.loss_unit,
        }


def plot_block_scores(scores: BlockScores, path, title: str) -> None:
    """A PNG: Block Influence and one-block angular distance per block; greedy's loss per removal."""
    from xopt.plots import pyplot

    plt = pyplot()
    panels = 2 if scores.greedy_order else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.6), squeeze=False)
    blocks = np.arange(scores.blocks)
    axes[0, 0].plot(blocks, scores.influence, "o-", label="Block Influence (1 − cos)")
    axes[0, 0].plot(blocks, [scores.window(b, 1) for b in blocks], "s-", label="angular distance / π")
    axes[0, 0].set(xlabel="block", ylabel="score (low: removable)", title=title)
    axes[0, 0].legend()
    if scores.greedy_order:
        steps = np.arange(len(scores.greedy_order) + 1)
        axes[0, 1].plot(steps, [scores.base_loss, *scores.greedy_loss], "o-")
        for step, block in zip(steps[1:], scores.greedy_order, strict=True):
            axes[0, 1].annotate(
                str(block), (step, scores.greedy_loss[step - 1]), textcoords="offset points", xytext=(0, 6)
            )
        axes[0, 1].set(xlabel="blocks removed (greedy; labels: block)", ylabel=f"calibration loss ({scores.loss_unit})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def scorable_structure(model: ir.Model, advice: str) -> TransformerStructure:
    """The model's transformer blocks, or a one-line error: fused or quantized operators hide them
    (`advice`: what to run before those passes), or their boundaries are unknown."""
    require_no_opaque_operators(model.graph, advice)
    structure = find_transformer_structure(model)
    reason = boundaries_known(structure)
    if reason:
        raise XoptError(reason)
    return structure


def stream_states(structure: TransformerStructure) -> list[ir.Value]:
    """h_0 … h_L: the stream entering block 0, then the stream leaving each block."""
    return [block_input(structure.blocks[0]), *(block_output(b, structure) for b in structure.blocks)]


def measure_distances(
    model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], threads: int | None = None
) -> BlockScores:
    """Block Influence and angular distances of every pair of stream states, from one calibration pass."""
    structure = scorable_structure(model, "score the blocks of the model before fuse, quantize")
    states = stream_states(structure)
    count = len(states)
    cos_sum, angle_sum, tokens = np.zeros((count, count)), np.zeros((count, count)), 0
    for feed, outputs in zip(feeds, probe_values(model, states, feeds, threads=threads), strict=True):
        keep = _real_tokens(feed)
        rows = [_unit_rows(outputs[v.name], keep) for v in states]
        for first in range(count):
            for second in range(first + 1, count):
                cos = np.clip(np.sum(rows[first] * rows[second], axis=1), -1.0, 1.0)
                cos_sum[first, second] += cos.sum()
                angle_sum[first, second] += (np.arccos(cos) / np.pi).sum()
        tokens += len(rows[0])
    influence = 1.0 - np.array([cos_sum[b, b + 1] for b in range(count - 1)]) / tokens
    return BlockScores(blocks=count - 1, influence=influence, angular=angle_sum / tokens)


def greedy_removal(
    model: ir.Model,
    feeds: Sequence[dict[str, np.ndarray]],
    steps: int,
    causal_lm: bool,
    *,
    first: int = 0,
    threads: int | None = None,
) -> tuple[list[int], list[float], float]:
    """The blocks greedy removes in turn (`steps` of them, from block `first` on), the loss after
    each, and the full model's loss."""
    blocks = len(find_transformer_structure(model).blocks)
    session = create_session(gated_model(model), threads=threads)
    loss = CalibrationLoss(session, feeds[:GREEDY_WINDOWS], causal_lm)
    base = loss({})
    order, losses = [], []
    for step in range(steps):
        closed = {gate_name(b): 0.0 for b in order}
        trials = {b: loss({**closed, gate_name(b): 0.0}) for b in range(first, blocks) if b not in order}
        chosen = min(trials, key=trials.get)
        order.append(chosen)
        losses.append(trials[chosen])
        logger.info("greedy %d/%d: block %d removed, loss %.4f", step + 1, steps, chosen, trials[chosen])
    return order, losses, base


def _real_tokens(feed: dict[str, np.ndarray]) -> np.ndarray:
    """Which (batch, position) rows are tokens, not padding, flattened."""
    mask = feed.get("attention_mask")
    ids = feed["input_ids"]
    if mask is None or mask.shape != ids.shape:  # a decoder's mask spans past + new tokens; no padding here
        return np.ones(ids.size, bool)
    return mask.reshape(-1).astype(bool)


def _unit_rows(array: np.ndarray, keep: np.ndarray) -> np.ndarray:
    rows = array.reshape(-1, array.shape[-1])[keep].astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)

"""Attention-head pruning for `prune-width(heads=R)`: choose the heads to keep from calibration
activations and fold the correction for the removed ones into the output projection (STAT's
scheme for heads, with heads chosen by their contribution to the attention's output).

An attention's output is y = C·W_o + b, where C = [C_1 … C_H] holds the H heads' contexts
(softmax(QKᵀ)·V, d_h columns each) over the calibration tokens. Keeping a set S of heads and
writing the removed columns as combinations of the kept ones, C ≈ C_S·T, gives

    y ≈ C_S·(T·W_o) + b,   T·W_o = G_SS⁻¹·G_S·W_o   (least squares for the whole output),

with G = CᵀC accumulated in float64 (`xopt.calibration.second_moments`). The relative output
error is 1 − tr(W_oᵀ G_Sᵀ G_SS⁻¹ G_S W_o) / tr(W_oᵀ G W_o). Heads are chosen greedily, each step
adding the head that lowers that error most — the grouped form of the column-pivoted QR that
STAT runs on neurons, weighted by W_o so that a head counts by what it writes to the stream.

With grouped-query attention (H query heads sharing KV heads in groups of r), every group keeps
the same r' query heads so the KV heads and the cache stay; with one query head per KV head
(r = 1) a head goes with its key and value columns, and the KV cache narrows with it.

The head count lives in the graph's shape constants between the projections and W_o: a head
axis (axis 1 or 2 of a 4-D shape), the repeat of a GQA expand (axis 2 of a 5-D shape) and merged
widths (the last axis equal to H·d_h, or the fused QKV width). Those are rewritten; a shape
whose head axis cannot be told, or whose constants feed nodes outside the attention, is refused,
and so is a norm over a whole projection (OLMo-2's q_norm and k_norm: cutting heads would change
every kept head's normalization; Qwen3's per-head norms are fine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from xopt.analysis.graph_view import const_array, skip_back
from xopt.analysis.patterns import Linear
from xopt.analysis.structure import Attention
from xopt.rewrite import (
    ShapeRewrite,
    bias_or_zeros,
    region_after,
    set_bias,
    set_weight,
    shape_owner,
    weight_in_out,
)

JITTER = 1e-10  # added to G's diagonal, relative to its mean, so that a silent head does not stop the solve
REGION_LIMIT = 400
# ops that reduce over the last axis: over a whole projection's width they mix its heads
_NORMALIZING = frozenset({"ReduceMean", "ReduceSumSquare", "ReduceL2"}) | {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
}


@dataclass
class HeadCounts:
    """What the shape constants of one attention say before and after pruning."""

    heads: int
    repeat: int  # query heads per KV head
    head_size: int
    fused_width: int  # the fused QKV projection's width (0: separate projections)
    kept_heads: int

    @property
    def kept_repeat(self) -> int:
        return self.kept_heads // (self.heads // self.repeat)

    def new_element(self, value: int, axis: int, rank: int) -> int | None:
        """The pruned value of a shape element `value` at `axis` of a rank-`rank` shape, or None
        where it does not count heads."""
        if axis == rank - 1 and rank <= 4:  # [B, S, width], or [B, 1, S, width] (GPT-BigCode's unsqueezed QKV)
            widths = {self.heads * self.head_size: self.kept_heads * self.head_size}
            if self.fused_width:  # [Q | K | V]: K and V narrow with Q when r = 1
                kv_width = self.fused_width - self.heads * self.head_size
                kept_kv = 2 * self.kept_heads * self.head_size if self.repeat == 1 else kv_width
                widths[self.fused_width] = self.kept_heads * self.head_size + kept_kv
            return widths.get(value)
        if rank == 4 and axis in (1, 2) and value == self.heads:
            return self.kept_heads
        if rank == 5 and axis == 2 and self.repeat > 1 and value == self.repeat:
            return self.kept_repeat
        return None


@dataclass
class HeadPlan:
    """One attention's pruning, checked before anything changes."""

    attention: Attention
    counts: HeadCounts
    keep_per_group: int
    region: list[ir.Node]
    rewrites: list[ShapeRewrite]


def head_groups(attention: Attention) -> list[list[int]]:
    """The query heads that must keep equal numbers: one group per KV head, or all heads (r = 1)."""
    heads, kv_heads = attention.num_heads, attention.num_kv_heads
    repeat = heads // kv_heads
    if repeat == 1:
        return [list(range(heads))]
    return [list(range(g * repeat, (g + 1) * repeat)) for g in range(kv_heads)]


def select_heads(
    gram: np.ndarray, weight: np.ndarray, head_size: int, groups: list[list[int]], keep_per_group: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Greedily the heads S (sorted) whose contexts best reproduce C·W_o, the corrected W_o rows
    for them (|S|·d_h × d) and the relative output error left, from G = CᵀC (float64)."""
    jitter = JITTER * max(np.trace(gram) / len(gram), 1e-30)
    target = gram @ weight  # G·W_o: row block h is G_h·W_o
    total = max(float(np.sum(weight * target)), 1e-30)

    def columns(heads: list[int]) -> np.ndarray:
        return np.concatenate([np.arange(h * head_size, (h + 1) * head_size) for h in sorted(heads)])

    def explained(heads: list[int]) -> float:
        cols = columns(heads)
        solved = np.linalg.solve(gram[np.ix_(cols, cols)] + jitter * np.eye(len(cols)), target[cols])
        return float(np.sum(target[cols] * solved))

    chosen: list[int] = []
    for _ in range(keep_per_group * len(groups)):
        open_heads = [h for g in groups if sum(x in chosen for x in g) < keep_per_group for h in g if h not in chosen]
        chosen.append(max(open_heads, key=lambda h: explained([*chosen, h])))
    cols = columns(chosen)
    corrected = np.linalg.solve(gram[np.ix_(cols, cols)] + jitter * np.eye(len(cols)), target[cols])
    return np.array(sorted(chosen)), corrected, 1.0 - explained(chosen) / total


def attention_region(attention: Attention) -> list[ir.Node] | str:
    """The nodes from the Q/K/V projections up to W_o's input, or why heads cannot be cut there."""
    starts = list(dict.fromkeys([attention.q, attention.k, attention.v]))
    region = region_after(starts, attention.o.node, REGION_LIMIT)
    if region is None:
        return "the heads' activations reach beyond the output projection"
    if attention.fused_qkv and not any(_splits_fused(n, attention) or _slices_fused(n, attention) for n in region):
        return "the fused QKV is not split by a Split or by Slices of its whole last axis (CodeGen: groups of heads)"
    inside = set(region)
    for node in region:
        for value in node.inputs if node.op_type == "Add" else ():
            if value is not None and value.producer() not in inside and _per_head(value, attention.num_heads):
                return f"Add {node.name} adds a per-head bias from outside the attention (relative positions, ALiBi)"
    widths = {linear.out_features for linear in starts if linear.out_features > attention.head_size}
    for node in region:
        shape = node.inputs[0].shape if node.op_type in _NORMALIZING and node.inputs else None
        if shape and shape[-1] in widths:
            return f"{node.op_type} {node.name} normalizes a whole projection across its heads (OLMo-2's q_norm)"
    return region


def _per_head(value: ir.Value, heads: int) -> bool:
    """Whether `value`, added to the scores [B, heads, S, S'], has one row per head there (axis
    -3 of [B, heads, S, S'] or MPT's ALiBi [heads, 1, S']; a mask is [B, 1, S, S'])."""
    shape = value.shape
    return heads > 1 and shape is not None and len(shape) >= 3 and shape[-3] == heads


def _splits_fused(node: ir.Node, attention: Attention) -> bool:
    """Whether `node` is a Split of a last axis as wide as the fused QKV projection (CodeGen reshapes
    [Q | V | K] into 4 groups of heads first and splits each group's 3·H·d/4)."""
    shape = node.inputs[0].shape if node.op_type == "Split" else None
    return shape is not None and len(shape) > 0 and shape[-1] == attention.q.out_features


def _slices_fused(node: ir.Node, attention: Attention) -> bool:
    """Whether `node` is a Slice of the fused QKV projection's output (Phi-3's q, k, v)."""
    return node.op_type == "Slice" and attention.fused_qkv and skip_back(node.inputs[0]) is attention.q.output


def plan_shape_rewrites(region: list[ir.Node], counts: HeadCounts, attention: Attention) -> list[ShapeRewrite] | str:
    """For every shape in the region that counts heads, its new constants; or why it cannot be read."""
    rewrites = []
    for node in region:
        if node.op_type in ("Reshape", "Expand"):
            sources = _shape_element_sources(node)
            if sources is None:
                return f"{node.op_type} {node.name}: its shape is computed in a way heads cannot be read from"
            owner = shape_owner(node)
            changes = []
            for axis, source in enumerate(sources):
                if source is None:
                    continue
                index, offset = source
                new = counts.new_element(int(const_array(owner.inputs[index]).reshape(-1)[offset]), axis, len(sources))
                if new is not None:
                    changes.append((axis, owner, index, offset, new))
            if len(sources) == 4 and sum(axis in (1, 2) for axis, *_ in changes) > 1:
                return f"{node.op_type} {node.name}: both axes 1 and 2 equal the head count"
        elif node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = const_array(node.inputs[1])
            if sizes is None:
                return f"Split {node.name}: computed split sizes"
            width, kept = counts.heads * counts.head_size, counts.kept_heads * counts.head_size
            changes = [(None, node, 1, i, kept) for i, size in enumerate(sizes.reshape(-1)) if size == width]
        elif _slices_fused(node, attention):
            changes = _slice_bound_changes(node, counts)
            if isinstance(changes, str):
                return changes
        else:
            continue
        if changes:
            rewrite = ShapeRewrite(node, changes[0][1], {})
            for _, owner, index, offset, new in changes:
                array = rewrite.constants.setdefault(index, const_array(owner.inputs[index]).copy())
                array.reshape(-1)[offset] = new
            rewrites.append(rewrite)
    return rewrites


def _slice_bound_changes(node: ir.Node, counts: HeadCounts) -> list[tuple] | str:
    """The new starts and ends of a Slice of the fused [Q | K | V] on its last axis: each bound at
    the edge of Q, K or V moves with the kept heads; one past the width stays."""
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, (rank or 0) - 1):
        return f"Slice {node.name}: not a constant slice of the fused QKV's last axis"
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
    if steps is None or np.any(steps != 1):
        return f"Slice {node.name}: a stepped slice of the fused QKV"
    width, kept = counts.heads * counts.head_size, counts.kept_heads * counts.head_size
    kv_width = (counts.fused_width - width) // 2
    kept_kv = kept if counts.repeat == 1 else kv_width
    edges = {0: 0, width: kept, width + kv_width: kept + kept_kv, counts.fused_width: kept + 2 * kept_kv}  # old → new
    changes = []
    for index in (1, 2):
        bound = const_array(node.inputs[index])
        if bound is None or bound.size != 1:
            return f"Slice {node.name}: computed bounds on the fused QKV"
        value = int(bound.reshape(-1)[0])
        if value in edges:
            if edges[value] != value:
                changes.append((None, node, index, 0, edges[value]))
        elif value < counts.fused_width:
            return f"Slice {node.name}: a bound {value} that is no edge of Q, K or V"
    return changes


def _shape_element_sources(node: ir.Node) -> list[tuple[int, int] | None] | None:
    """Per element of a Reshape/Expand shape, the (input index, offset) of the constant it comes
    from in the node itself or in the Concat making the shape (None for a computed element); None
    when the element positions cannot be told."""
    shape = node.inputs[1]
    array = const_array(shape)
    if array is not None:
        return [(1, i) for i in range(array.size)]
    producer = shape.producer()
    if producer is None or producer.op_type != "Concat":
        return None
    sources: list[tuple[int, int] | None] = []
    for index, value in enumerate(producer.inputs):
        array = const_array(value)
        if array is not None:
            sources.extend((index, i) for i in range(array.size))
        elif value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int):
            sources.extend([None] * value.shape[0])
        else:
            return None
    return sources


def narrow_attention(
    graph: ir.Graph,
    attention: Attention,
    kept: np.ndarray,
    output_rows: np.ndarray,
    region: list[ir.Node],
    rewrites: list[ShapeRewrite],
    counts: HeadCounts,
) -> None:
    """Keep heads `kept` in Q (and K, V when r = 1), store W_o's corrected rows, rewrite the
    shape constants and the static shapes (the KV cache's included) to the new head count."""
    size = counts.head_size
    query_cols = np.concatenate([np.arange(h * size, (h + 1) * size) for h in kept])
    width = counts.heads * size
    if attention.fused_qkv:
        kv_width = (attention.q.out_features - width) // 2
        if counts.repeat == 1:
            cols = np.concatenate([query_cols, width + query_cols, 2 * width + query_cols])
        else:
            cols = np.concatenate([query_cols, np.arange(width, width + 2 * kv_width)])
        _keep_columns(graph, attention.q, cols)
    else:
        _keep_columns(graph, attention.q, query_cols)
        if counts.repeat == 1:
            _keep_columns(graph, attention.k, query_cols)
            _keep_columns(graph, attention.v, query_cols)
    set_weight(graph, attention.o, output_rows)
    attention.o.in_features = len(query_cols)
    for rewrite in rewrites:
        rewrite.apply(graph)
    for node in region:
        for value in node.outputs:
            _narrow_shape(value, counts)
        for value in node.inputs:
            if value is not None and value.is_graph_input():
                _narrow_shape(value, counts)  # a KV-cache input
    attention.num_heads = counts.kept_heads
    if counts.repeat == 1:
        attention.num_kv_heads = counts.kept_heads


def _keep_columns(graph: ir.Graph, linear: Linear, cols: np.ndarray) -> None:
    bias = bias_or_zeros(linear)
    set_weight(graph, linear, weight_in_out(linear)[:, cols])
    if linear.bias is not None:
        set_bias(graph, linear, bias[cols])
    linear.out_features = len(cols)


def _narrow_shape(value: ir.Value, counts: HeadCounts) -> None:
    if value.shape is None:
        return
    dims = list(value.shape)
    new = [counts.new_element(d, axis, len(dims)) if isinstance(d, int) else None for axis, d in enumerate(dims)]
    if len(dims) == 4 and new[1] is not None and new[2] is not None:
        value.shape = None  # which axis counts heads cannot be told; shape inference can
        return
    if len(dims) > 4 and any(n is None and d == counts.heads for n, d in zip(new, dims, strict=True)):
        value.shape = None  # heads on an axis of a wider shape (GPT-J's rotary pairs [B, S, H, d/2, 1])
        return
    value.shape = ir.Shape([n if n is not None else d for n, d in zip(new, dims, strict=True)])

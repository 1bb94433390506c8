"""Lower rotary position embeddings to ONNX's `RotaryEmbedding` operator (opset 23), for `fuse`.

Hugging Face models rotate each head of Q and K (x of shape [B, H, S, d], h = d/2) as

    y = x·cos + rotate_half(x)·sin,   rotate_half(x) = Concat(−x[..., h:], x[..., :h])

with cos = Cos(Concat(θ, θ)) of shape [B, S, d] broadcast over heads (Unsqueeze on axis 1), so
cos[..., :h] = cos[..., h:] (and the same for sin). ONNX `RotaryEmbedding` with cos and sin
caches of shape [B, S, h] and no position ids computes
y[..., :h] = x₁·cos − x₂·sin, y[..., h:] = x₂·cos + x₁·sin: the same values. The rewrite feeds
it the first halves of the graph's own cos and sin (one Slice each, shared by all layers), so it
holds for any positions, padding included; the halves' equality is the precondition, and the
`fuse` check on sample inputs confirms it before the rewrite is kept.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from xopt.analysis.graph_view import const_array, sole_reader
from xopt.rewrite import new_initializer, replace_value, require_opset

ROTARY_OPSET = 23


def lower_rotary(model: ir.Model) -> tuple[int, list[str]]:
    """Rewrite every rotate-half rotary embedding; returns the count and the near-misses."""
    matches, notes = [], []
    for node in model.graph:
        if node.op_type == "Neg" and node.domain == "":
            match = _match(node)
            if isinstance(match, str):
                notes.append(f"{node.name}: {match}")
            else:
                matches.append(match)
    if not matches:
        return 0, notes
    require_opset(model, ROTARY_OPSET)
    halves: dict[ir.Value, ir.Value] = {}
    for match in matches:
        _rewrite(model.graph, match, halves)
    common_passes.RemoveUnusedNodesPass()(model)
    return len(matches), notes


def _match(neg: ir.Node) -> dict | str:
    upper = neg.inputs[0].producer()
    x, half = _last_axis_slice(upper, start_is_zero=False)
    if x is None:
        return "Neg does not read x[..., h:]"
    concats = [n for n, _ in neg.outputs[0].uses() if n.op_type == "Concat"]
    if len(concats) != 1 or concats[0].attributes.get_int("axis", 0) not in (-1, 3):
        return "−x[..., h:] is not concatenated on the last axis"
    concat = concats[0]
    if len(concat.inputs) != 2 or concat.inputs[0] is not neg.outputs[0]:
        return "rotate_half is not Concat(−x[..., h:], x[..., :h])"
    lower_source, lower_end = _last_axis_slice(concat.inputs[1].producer(), start_is_zero=True)
    if lower_source is not x or lower_end != half:
        return "rotate_half's halves do not come from the same x"
    sin_mul = sole_reader(concat.outputs[0], "Mul")
    if sin_mul is None:
        return "rotate_half(x) is not multiplied by sin"
    sin = _other_input(sin_mul, concat.outputs[0])
    add = sole_reader(sin_mul.outputs[0], "Add")
    if add is None:
        return "rotate_half(x)·sin is not added to x·cos"
    cos_mul = _other_input(add, sin_mul.outputs[0]).producer()
    if cos_mul is None or cos_mul.op_type != "Mul" or x not in cos_mul.inputs:
        return "the other term is not x·cos"
    cos = _other_input(cos_mul, x)
    cos3, sin3 = _heads_unsqueezed(cos), _heads_unsqueezed(sin)
    if cos3 is None or sin3 is None:
        return "cos and sin are not [B, S, d] tables unsqueezed on the head axis"
    return {"x": x, "cos": cos3, "sin": sin3, "half": half, "output": add.outputs[0], "after": add}


def _last_axis_slice(node: ir.Node | None, *, start_is_zero: bool) -> tuple[ir.Value | None, int | None]:
    """(x, h) when `node` is x[..., h:] (or x[..., :h] with `start_is_zero`) with constant bounds."""
    if node is None or node.op_type != "Slice" or len(node.inputs) < 4:
        return None, None
    starts, ends, axes = (const_array(v) for v in node.inputs[1:4])
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
    if any(a is None or a.size != 1 for a in (starts, ends, axes, steps)) or int(steps.item()) != 1:
        return None, None
    if int(axes.item()) not in (-1, 3):
        return None, None
    if start_is_zero:
        return (node.inputs[0], int(ends.item())) if int(starts.item()) == 0 else (None, None)
    return (node.inputs[0], int(starts.item())) if int(ends.item()) >= 2**31 - 1 else (None, None)


def _other_input(node: ir.Node, known: ir.Value) -> ir.Value:
    return node.inputs[1] if node.inputs[0] is known else node.inputs[0]


def _heads_unsqueezed(value: ir.Value) -> ir.Value | None:
    """The [B, S, d] table that `value` unsqueezes on axis 1."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze":
        return None
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return node.inputs[0] if axes is not None and axes.size == 1 and int(axes.item()) == 1 else None


def _rewrite(graph: ir.Graph, match: dict, halves: dict[ir.Value, ir.Value]) -> None:
    caches = []
    for table in (match["cos"], match["sin"]):
        if table not in halves:  # one Slice per table, right after the node that computes it
            bounds = [new_initializer(graph, "rotary_half", np.array([v]), np.int64) for v in (0, match["half"], -1)]
            half = ir.node("Slice", [table, *bounds])
            producer = table.producer()
            if producer is None:
                graph.insert_before(next(iter(graph)), half)
            else:
                graph.insert_after(producer, half)
            halves[table] = half.outputs[0]
        caches.append(halves[table])
    rotary = ir.node("RotaryEmbedding", [match["x"], *caches])
    graph.insert_after(match["after"], rotary)
    rotary.outputs[0].dtype, rotary.outputs[0].shape = match["output"].dtype, match["output"].shape
    replace_value(match["output"], rotary.outputs[0])

"""Lower rotary position embeddings to ONNX's `RotaryEmbedding` operator (opset 23), for `fuse`.

Hugging Face models rotate each head of Q and K (x of shape [B, H, S, d], h = d/2) as

    y = x·cos + rotate_half(x)·sin,   rotate_half(x) = Concat(−x[..., h:], x[..., :h])

with cos = Cos(Concat(θ, θ)) of shape [B, S, d] broadcast over heads (Unsqueeze on axis 1), so
cos[..., :h] = cos[..., h:] (and the same for sin). ONNX `RotaryEmbedding` with cos and sin
caches of shape [B, S, h] and no position ids computes
y[..., :h] = x₁·cos − x₂·sin, y[..., h:] = x₂·cos + x₁·sin: the same values. The rewrite feeds
it the first halves of the graph's own cos and sin (one Slice each, shared by all layers), so it
holds for any positions, padding included; the halves' equality is the precondition, and the
`fuse` check on sample inputs confirms it before the rewrite is kept. A table of one row for the
whole batch, [1, S, d] (Optimum's Gemma export computes the positions past..past+S−1 inside;
ModernBERT), is broadcast to the operator's [B, S, h] by an Expand on the cache, B read from a
graph input with x's batch dim.

Cohere, GLM, Helium, GPT-J and CodeGen rotate interleaved pairs instead:

    y = x·cos + r·sin,   r = flatten(stack(−x[..., 1::2], x[..., ::2]))   (r[2i] = −x[2i+1], r[2i+1] = x[2i])

with cos = repeat_interleave(cos(θ), 2), so cos[..., 2i] = cos[..., 2i+1]. `RotaryEmbedding`
with `interleaved=1` computes y[2i] = x[2i]·c − x[2i+1]·s, y[2i+1] = x[2i+1]·c + x[2i]·s with
c, s the caches' entry i: fed the even entries of the graph's tables, the same values. A table
already broadcast to [B, 1, S, d] is squeezed to [B, S, d] first.

GPT-NeoX, Phi-2, StableLM, GPT-J and CodeGen rotate only the first r entries of each head,
Concat(rotation of x[..., :r], x[..., r:]) on the last axis: `RotaryEmbedding` with
`rotary_embedding_dim` = r rotates x's first r entries and passes the rest through, the same
values, so it takes the whole x and the Slices and the Concat go.

GPT-J and CodeGen keep their heads on axis 2 (x of shape [B, S, H, d], tables [B, S, 1, d]), a
layout the operator's 4-D form ([B, H, S, d]) does not take; its 3-D form does: x is read as
[B, S, H·d] (a Reshape that moves no data) with `num_heads` = H, and the result is shaped back.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from xopt.analysis.graph_view import const_array, sole_reader
from xopt.rewrite import new_initializer, replace_value, require_opset

ROTARY_OPSET = 23


def lower_rotary(model: ir.Model) -> tuple[int, list[str]]:
    """Rewrite every rotary embedding (rotate-half or interleaved); returns the count and the near-misses."""
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
    caches: dict[tuple, ir.Value] = {}
    for match in matches:
        _rewrite(model.graph, match, caches)
    common_passes.RemoveUnusedNodesPass()(model)
    return len(matches), notes


def _match(neg: ir.Node) -> dict | str:
    x, start, step = _last_axis_slice(neg.inputs[0].producer())
    halves, pairs = step == 1 and start > 0, (start, step) == (1, 2)
    if x is None or not (halves or pairs):
        return "Neg does not read x[..., h:] or x[..., 1::2]"
    rotated = _rotate_every_two(neg, x) if pairs else _rotate_half(neg, x, start)
    if isinstance(rotated, str):
        return rotated
    half, interleaved, rotation = rotated
    sin_mul = sole_reader(rotation, "Mul")
    if sin_mul is None:
        return "the rotated x is not multiplied by sin"
    sin = _other_input(sin_mul, rotation)
    add = sole_reader(sin_mul.outputs[0], "Add")
    if add is None:
        return "the rotated x·sin is not added to x·cos"
    cos_mul = _other_input(add, sin_mul.outputs[0]).producer()
    if cos_mul is None or cos_mul.op_type != "Mul" or x not in cos_mul.inputs:
        return "the other term is not x·cos"
    cos = _other_input(cos_mul, x)
    (cos_table, heads_axis), (sin_table, sin_heads_axis) = _per_position_table(cos), _per_position_table(sin)
    if cos_table is None or sin_table is None or heads_axis != sin_heads_axis:
        return "cos and sin are not [B, S, d] tables broadcast over the head axis (1, or 2 in [B, S, H, d])"
    rows = None
    if any(_one_row_for_all(table, x) for table in (cos_table, sin_table)):
        rows = _batch_size(x)
        if rows is None:
            return "cos and sin are one [1, S, d] table for every row and x's batch size is read from no graph input"
    match = {
        "x": x,
        "cos": cos_table,
        "sin": sin_table,
        "heads_axis": heads_axis,
        "half": half,
        "interleaved": interleaved,
        "rotary_dim": None,
        "output": add.outputs[0],
        "after": add,
        "rows": rows,
    }
    if (partial := _partial_rotation(x, add.outputs[0])) is not None:
        match["x"], match["rotary_dim"], match["output"] = partial
        match["after"] = match["output"].producer()
    shape = match["x"].shape
    if heads_axis == 2 and not (shape is not None and all(isinstance(n, int) for n in shape[2:])):
        return "x is [B, S, H, d] without a known number of heads and head size"
    return match


def _partial_rotation(x: ir.Value, rotated: ir.Value) -> tuple[ir.Value, int, ir.Value] | None:
    """(x_full, r, y) when x = x_full[..., :r] and y = Concat(rotated, x_full[..., r:]) on the last
    axis: the rotation of the first r entries of each head, the rest passed through."""
    full, end, step = _last_axis_slice(x.producer(), lower=True)
    concat = sole_reader(rotated, "Concat")
    if full is None or step != 1 or concat is None or concat.attributes.get_int("axis", 0) not in (-1, 3):
        return None
    if len(concat.inputs) != 2 or concat.inputs[0] is not rotated:
        return None
    rest, start, rest_step = _last_axis_slice(concat.inputs[1].producer())
    return (full, end, concat.outputs[0]) if rest is full and (start, rest_step) == (end, 1) else None


def _rotate_half(neg: ir.Node, x: ir.Value, half: int) -> tuple[int, bool, ir.Value] | str:
    """(h, False, rotate_half(x)) when `neg`, −x[..., h:], is the first of Concat(−x[..., h:], x[..., :h])."""
    concats = [n for n, _ in neg.outputs[0].uses() if n.op_type == "Concat"]
    if len(concats) != 1 or concats[0].attributes.get_int("axis", 0) not in (-1, 3):
        return "−x[..., h:] is not concatenated on the last axis"
    concat = concats[0]
    if len(concat.inputs) != 2 or concat.inputs[0] is not neg.outputs[0]:
        return "rotate_half is not Concat(−x[..., h:], x[..., :h])"
    lower_source, lower_end, lower_step = _last_axis_slice(concat.inputs[1].producer(), lower=True)
    if lower_source is not x or lower_end != half or lower_step != 1:
        return "rotate_half's halves do not come from the same x"
    return half, False, concat.outputs[0]


def _rotate_every_two(neg: ir.Node, x: ir.Value) -> tuple[int, bool, ir.Value] | str:
    """(0, True, r) when `neg`, −x[..., 1::2], is the first of r = flatten(stack(−x[..., 1::2],
    x[..., ::2])) on a new last axis: r[2i] = −x[2i+1], r[2i+1] = x[2i]."""
    concat = _stacked_on_new_last_axis(neg.outputs[0])
    if concat is None or len(concat.inputs) != 2:
        return "−x[..., 1::2] is not stacked on a new last axis"
    even = _unsqueezed_last(concat.inputs[1])
    even_source, even_start, even_step = _last_axis_slice(even.producer() if even is not None else None)
    if even_source is not x or (even_start, even_step) != (0, 2):
        return "rotate_every_two is not stack(−x[..., 1::2], x[..., ::2])"
    flatten = sole_reader(concat.outputs[0], "Reshape")
    rank = len(x.shape) if x.shape is not None else None
    if flatten is None or flatten.outputs[0].shape is None or len(flatten.outputs[0].shape) != rank:
        return "the stacked pairs are not flattened back to x's rank"
    return 0, True, flatten.outputs[0]


def _stacked_on_new_last_axis(value: ir.Value) -> ir.Node | None:
    """The Concat on the last axis of Unsqueeze(value, -1), `value` first."""
    unsqueeze = sole_reader(value, "Unsqueeze")
    if unsqueeze is None or _unsqueezed_last(unsqueeze.outputs[0]) is not value:
        return None
    concat = sole_reader(unsqueeze.outputs[0], "Concat")
    if concat is None or concat.inputs[0] is not unsqueeze.outputs[0] or concat.attributes.get_int("axis", 0) != -1:
        return None
    return concat


def _unsqueezed_last(value: ir.Value) -> ir.Value | None:
    """x where `value` is Unsqueeze(x, [-1])."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze" or len(node.inputs) < 2:
        return None
    axes = const_array(node.inputs[1])
    return node.inputs[0] if axes is not None and axes.size == 1 and int(axes.item()) == -1 else None


def _last_axis_slice(node: ir.Node | None, *, lower: bool = False) -> tuple[ir.Value | None, int, int]:
    """(x, start, step) when `node` is x[..., start::step] with constant bounds; with `lower`,
    (x, end, step) when it is x[..., :end:step]."""
    if node is None or node.op_type != "Slice" or len(node.inputs) < 4:
        return None, 0, 0
    starts, ends, axes = (const_array(v) for v in node.inputs[1:4])
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(1)
    if any(a is None or a.size != 1 for a in (starts, ends, axes, steps)) or int(axes.item()) not in (-1, 3):
        return None, 0, 0
    start, end, step = int(starts.item()), int(ends.item()), int(steps.item())
    if lower:
        return (node.inputs[0], end, step) if start == 0 else (None, 0, 0)
    return (node.inputs[0], start, step) if end >= 2**31 - 1 else (None, 0, 0)


def _other_input(node: ir.Node, known: ir.Value) -> ir.Value:
    return node.inputs[1] if node.inputs[0] is known else node.inputs[0]


def _per_position_table(value: ir.Value) -> tuple[ir.Value | None, int]:
    """(table, head axis): the [B, S, d] table that `value` broadcasts over the head axis 1 (the
    input of its Unsqueeze on axis 1), or `value` itself when it is [B, 1, S, d], or [B, S, 1, d]
    for heads on axis 2 (squeezed in the rewrite)."""
    node = value.producer()
    if node is not None and node.op_type == "Unsqueeze":
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return (node.inputs[0] if axes is not None and axes.size == 1 and int(axes.item()) == 1 else None), 1
    shape = value.shape
    if shape is None or len(shape) != 4 or shape[-1] == 1:
        return None, 0
    if shape[1] == 1:
        return value, 1
    return (value, 2) if shape[2] == 1 else (None, 0)


def _one_row_for_all(table: ir.Value, x: ir.Value) -> bool:
    """Whether the table has a batch axis of 1 that x's batch axis may not match."""
    return table.shape is not None and table.shape[0] == 1 and (x.shape is None or x.shape[0] != 1)


def _batch_size(x: ir.Value) -> tuple[ir.Value, int] | int | None:
    """x's batch size B, to broadcast a one-row table to: a number, or (graph input, axis) for a
    symbolic B that an input of the graph has on that axis; None when neither."""
    if x.shape is None:
        return None
    batch = x.shape[0]
    if isinstance(batch, int):
        return batch
    graph = x.graph
    for value in graph.inputs if graph is not None and batch.value is not None else ():
        for axis, dim in enumerate(value.shape or ()):
            if dim == batch:
                return value, axis
    return None


def _rewrite(graph: ir.Graph, match: dict, caches: dict[tuple, ir.Value]) -> None:
    x, attributes, nodes = match["x"], {"interleaved": int(match["interleaved"])}, []
    if match["rotary_dim"] is not None:
        attributes["rotary_embedding_dim"] = match["rotary_dim"]
    if match["heads_axis"] == 2:  # [B, S, H, d] read as [B, S, H·d]
        heads, size = x.shape[2], x.shape[3]
        nodes.append(ir.node("Reshape", [x, new_initializer(graph, "rotary_shape", np.array([0, 0, -1]), np.int64)]))
        x, attributes["num_heads"] = nodes[-1].outputs[0], heads
    caches_in = [_cache(graph, match, table, caches) for table in (match["cos"], match["sin"])]
    nodes.append(ir.node("RotaryEmbedding", [x, *caches_in], attributes=attributes))
    if match["heads_axis"] == 2:
        shape = new_initializer(graph, "rotary_shape", np.array([0, 0, heads, size]), np.int64)
        nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], shape]))
    graph.insert_after(match["after"], nodes)
    output = nodes[-1].outputs[0]
    output.dtype, output.shape = match["output"].dtype, match["output"].shape
    replace_value(match["output"], output)


def _broadcast_rows(graph: ir.Graph, cache: ir.Value, rows: tuple[ir.Value, int] | int) -> list[ir.Node]:
    """Expand(cache, [B, 1, 1]): one row for each of B, read from a graph input where symbolic."""
    if isinstance(rows, int):
        return [ir.node("Expand", [cache, new_initializer(graph, "rotary_rows", np.array([rows, 1, 1]), np.int64)])]
    value, axis = rows
    batch = ir.node("Shape", [value], attributes={"start": axis, "end": axis + 1})
    ones = new_initializer(graph, "rotary_rows", np.array([1, 1]), np.int64)
    shape = ir.node("Concat", [batch.outputs[0], ones], attributes={"axis": 0})
    return [batch, shape, ir.node("Expand", [cache, shape.outputs[0]])]


def _cache(graph: ir.Graph, match: dict, table: ir.Value, caches: dict[tuple, ir.Value]) -> ir.Value:
    """RotaryEmbedding's [B, S, d/2] cache from the graph's table: its first half, or its even
    entries when interleaved; computed once per table, right after the node that computes it."""
    key = (table, match["interleaved"], match["half"])
    if key not in caches:
        start, end, step = (0, np.iinfo(np.int64).max, 2) if match["interleaved"] else (0, match["half"], 1)
        bounds = [new_initializer(graph, "rotary_cache", np.array([v]), np.int64) for v in (start, end, -1, step)]
        nodes = [ir.node("Slice", [table, *bounds])]
        if len(table.shape or ()) == 4:  # [B, 1, S, d] or [B, S, 1, d]
            axis = new_initializer(graph, "rotary_cache", np.array([match["heads_axis"]]), np.int64)
            nodes.append(ir.node("Squeeze", [nodes[0].outputs[0], axis]))
        if match["rows"] is not None:  # [1, S, h] → [B, S, h]
            nodes += _broadcast_rows(graph, nodes[-1].outputs[0], match["rows"])
        producer = table.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), nodes)
        else:
            graph.insert_after(producer, nodes)
        caches[key] = nodes[-1].outputs[0]
    return caches[key]

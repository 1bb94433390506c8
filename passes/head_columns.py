"""Q, K and V of one projection whose columns interleave the heads (Bloom, GPT-NeoX, Falcon), as
the merged [B, S, n·d] slices of a projection with its columns reordered, for `cached-attention`.

Such a model computes X = x·W + b, [B, S, C], and reaches each of Q, K and V, [B, n, S, d], by
data movement alone: Bloom reshapes X to [B, S, H, 3, d] and gathers on axis 3, GPT-NeoX reshapes
it to [B, S, H, 3d] and splits the last axis, Falcon reshapes it to [B, S, H + 2, d] and slices or
gathers heads (its new architecture also expands each KV head to its group of query heads). Those
operators (ONNX's reference implementation, each Reshape and Expand to its output's annotated
shape) run on an array of positions, X[b, s, c] = c + C·(s + S·b) with B = 2 and S = 3, give for
every element of Q, K and V the (b, s, c) it is copied from. Where each reads X at its own (b, s)
and at a column c(h, e) that does not depend on them, Q[b, h, s, e] = X[b, s, c_Q(h, e)]. Then
π = [c_Q | c_K | c_V] (each in (h, e) order) gives X' = x·W[:, π] + b[π], whose first n_Q·d
columns are Q in the merged layout, Q[b, h, s, e] = X'[b, s, h·d + e], then K's and V's: the same
products and sums, the columns moved (a column that several heads copy is computed for each, as
the model copies it). A new linear and a Split give the three (where π is 0, 1, …, C − 1, a Split
of X itself); the old projection and its selection are left to dead-code removal.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from xopt.analysis.graph_view import const_array
from xopt.analysis.patterns import Linear
from xopt.rewrite import bias_or_zeros, new_initializer, owns_weight, split_linear, weight_dtype, weight_in_out

MOVEMENT_OPS = frozenset(
    {"Reshape", "Expand", "Transpose", "Split", "Slice", "Gather", "GatherND", "Squeeze", "Unsqueeze", "Identity"}
)
_SHAPED_OPS = frozenset({"Reshape", "Expand"})  # their shape operand is computed: read off the annotation
_BATCH, _SEQUENCE = 2, 3  # the sizes the positions are laid out in: distinct, neither 1


def head_columns(projection: Linear, heads: list[tuple[ir.Value, int]]) -> list[np.ndarray] | str:
    """For each given [B, n, S, d] value (with its n), the projection's columns c(h, e) it holds in
    (h, e) order; else why there are none."""
    if not owns_weight(projection):
        return "the QKV projection's weight is shared with another node"
    source = projection.output
    if source.shape is None or len(source.shape) != 3 or not isinstance(source.shape[2], int):
        return "the QKV projection's output is not [B, S, C] with C known"
    if any(isinstance(dim, int) for dim in list(source.shape)[:2]):
        return "the QKV projection's output has a fixed batch or sequence size"
    positions = np.arange(_BATCH * _SEQUENCE * source.shape[2]).reshape(_BATCH, _SEQUENCE, -1)
    arrays: dict[ir.Value, np.ndarray] = {source: positions}
    columns = []
    for value, count in heads:
        array = _moved(value, arrays, source)
        if isinstance(array, str):
            return array
        taken = _columns_of(array, count, source.shape[2])
        if taken is None:
            return f"{value.name} is not [B, {count}, S, d] read from the columns at its own (b, s)"
        columns.append(taken)
    return columns


def reordered_projection(graph: ir.Graph, projection: Linear, columns: list[np.ndarray]) -> list[ir.Value]:
    """The values x·W[:, c] + b[c] for each list of columns c, as the slices of one linear with its
    columns reordered (the projection's own output where they are in order), computed after it."""
    permutation, sizes = np.concatenate(columns), [len(c) for c in columns]
    base = (projection.weight.name or "qkv") + "_by_head"
    if np.array_equal(permutation, np.arange(len(permutation))):
        widths = new_initializer(graph, base + "_split", np.array(sizes), np.int64)
        nodes = [ir.node("Split", [projection.output, widths], attributes={"axis": -1}, num_outputs=len(sizes))]
    else:
        weight = weight_in_out(projection)[:, permutation]
        bias = bias_or_zeros(projection)[permutation] if projection.bias is not None else None
        nodes = split_linear(graph, projection.input, weight, bias, sizes, weight_dtype(projection.weight), base)
    graph.insert_after(projection.output.producer(), nodes)
    parts = list(nodes[-1].outputs)
    for part, size in zip(parts, sizes, strict=True):
        part.dtype, part.shape = projection.output.dtype, ir.Shape([*list(projection.output.shape)[:2], size])
    return parts


def _moved(value: ir.Value, arrays: dict[ir.Value, np.ndarray], source: ir.Value) -> np.ndarray | str:
    """The positions `value` holds, computed back to `source` through movement operators only."""
    if value in arrays:
        return arrays[value]
    node = value.producer()
    if node is None or node.op_type not in MOVEMENT_OPS or node.domain != "":
        return f"{value.name} is not moved out of the QKV projection by reshapes, transposes and selections"
    data = _moved(node.inputs[0], arrays, source)
    if isinstance(data, str):
        return data
    feeds = {node.inputs[0].name: data}
    for operand in node.inputs[1:]:
        if operand is None:
            continue
        array = _shape_of(node.outputs[0], source) if node.op_type in _SHAPED_OPS else const_array(operand)
        if array is None:
            return f"{node.op_type} {node.name} has an operand that is not constant"
        feeds[operand.name] = array
    try:
        results = ReferenceEvaluator(ir.serde.serialize_node(node)).run(None, feeds)
    except (ValueError, IndexError, RuntimeError) as error:  # an annotated shape the data does not have
        return f"{node.op_type} {node.name} does not run on the projection's positions: {error}"
    arrays.update(zip(node.outputs, results, strict=True))
    return arrays[value]


def _shape_of(value: ir.Value, source: ir.Value) -> np.ndarray | None:
    """A value's annotated shape with the source's batch and sequence at the sizes laid out."""
    if value.shape is None:
        return None
    sizes = {source.shape[0]: _BATCH, source.shape[1]: _SEQUENCE}
    dims = [dim if isinstance(dim, int) else sizes.get(dim) for dim in value.shape]
    return None if None in dims else np.array(dims, dtype=np.int64)


def _columns_of(array: np.ndarray, heads: int, width: int) -> np.ndarray | None:
    """c(h, e) in (h, e) order when `array` [B, heads, S, d] holds X[b, s, c(h, e)] at [b, h, s, e]."""
    if array.ndim != 4 or array.shape[:3] != (_BATCH, heads, _SEQUENCE):
        return None
    batch, rest = np.divmod(array, _SEQUENCE * width)
    sequence, column = np.divmod(rest, width)
    if not (batch == np.arange(_BATCH)[:, None, None, None]).all():
        return None
    if not (sequence == np.arange(_SEQUENCE)[None, None, :, None]).all():
        return None
    if not (column == column[:1, :, :1, :]).all():
        return None
    return column[0, :, 0, :].reshape(-1)

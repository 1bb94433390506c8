"""The shape of a Concat read from its inputs' shapes, for `cached-attention`.

A Concat on axis k has its first input's shape with entry k the sum of both inputs':

    Shape(Concat(a, b; k)) = Shape(a) + Shape(b)·e_k        (e_k: 1 at k, 0 elsewhere)

TorchScript's exports of GPT-Neo's and MPT's attention (Hugging Face Optimum's) slice the causal
mask to the key length they read from the cache, Shape(Concat(past, K))[2]. Once `Attention`
computes the present cache, that read would depend on the Attention's own output through the
mask it is fed, a cycle; read from the inputs' shapes it depends on the past and K only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from xopt.analysis.graph_view import consumers
from xopt.rewrite import new_initializer, replace_value


def read_shapes_from_inputs(graph: ir.Graph, concats: list[ir.Node], before: ir.Value) -> int:
    """Every `Shape` of a Concat's output that `before` is computed from reads the shapes of the
    Concat's two inputs instead; returns the count."""
    upstream = _computed_from(before)
    count = 0
    for concat in concats:
        if len(concat.inputs) != 2 or concat.inputs[0].shape is None:
            continue
        readers = [node for node in consumers(concat.outputs[0]) if node.op_type == "Shape" and node in upstream]
        for shape in readers:
            _read_from_inputs(graph, concat, shape)
        count += len(readers)
    return count


def _read_from_inputs(graph: ir.Graph, concat: ir.Node, shape: ir.Node) -> None:
    first, second = concat.inputs
    rank = len(first.shape)
    axis = concat.attributes.get_int("axis", 0) % rank
    start, end = shape.attributes.get_int("start", 0), shape.attributes.get_int("end", rank)
    one_hot = (np.arange(rank) == axis).astype(np.int64)[start:end]
    sizes = [ir.node("Shape", [value], attributes={"start": start, "end": end}) for value in (first, second)]
    axis_only = ir.node("Mul", [sizes[1].outputs[0], new_initializer(graph, "concat_axis", one_hot, np.int64)])
    total = ir.node("Add", [sizes[0].outputs[0], axis_only.outputs[0]])
    graph.insert_before(shape, [*sizes, axis_only, total])
    for node in (*sizes, axis_only, total):
        node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.INT64, ir.Shape([one_hot.size])
    replace_value(shape.outputs[0], total.outputs[0])
    graph.remove(shape, safe=True)


def _computed_from(value: ir.Value) -> set[ir.Node]:
    """The nodes `value` is computed from, its producer included."""
    found: set[ir.Node] = set()
    pending = [value]
    while pending:
        node = pending.pop().producer()
        if node is not None and node not in found:
            found.add(node)
            pending.extend(v for v in node.inputs if v is not None)
    return found

"""Shared rewrite math for passes: reading and replacing linear weights and shape constants, inserting nodes.

A linear is y = x·W + b with W stored [in, out] (MatMul) or [out, in] (Gemm with transB, or a
MatMul behind a Transpose). Helpers compute in float64 and store in the weight's dtype. Weights
are never mutated in place: a changed weight becomes a new initializer wired to this node only,
so a tensor shared with the input model (or with another node) stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from xopt.analysis.graph_view import const_array, consumers
from xopt.analysis.patterns import Linear


def weight_in_out(linear: Linear) -> np.ndarray:
    """W as a float64 [in, out] array, whatever layout the graph stores it in."""
    array = const_array(linear.weight)
    if array is None:  # a Transpose of an initializer
        array = const_array(linear.weight.producer().inputs[0]).T
    elif linear.node.op_type == "Gemm" and linear.node.attributes.get_int("transB", 0):
        array = array.T
    return array.astype(np.float64)


def bias_or_zeros(linear: Linear) -> np.ndarray:
    array = const_array(linear.bias) if linear.bias is not None else None
    return np.zeros(linear.out_features) if array is None else array.astype(np.float64).reshape(-1)


def owns_weight(linear: Linear) -> bool:
    """Whether this linear is the only reader of its weight (and bias)."""
    values = [linear.weight] + ([linear.bias] if linear.bias is not None else [])
    producer = linear.weight.producer()
    if producer is not None and producer.op_type in ("Transpose", "Identity"):  # W = Transpose(table)
        values.append(producer.inputs[0])
    return all(len(consumers(v)) == 1 for v in values)


def set_weight(graph: ir.Graph, linear: Linear, w_in_out: np.ndarray) -> None:
    """Store W ([in, out], float64) as a new initializer in the layout this node reads."""
    dtype = weight_dtype(linear.weight)
    transpose = linear.weight.producer() if const_array(linear.weight) is None else None
    gemm_transposed = linear.node.op_type == "Gemm" and linear.node.attributes.get_int("transB", 0)
    stored = w_in_out.T if gemm_transposed else w_in_out
    linear.node.replace_input_with(1, new_initializer(graph, linear.weight.name or "weight", stored, dtype))
    if transpose is not None and not transpose.outputs[0].uses():
        graph.remove(transpose, safe=True)
    linear.weight = linear.node.inputs[1]


def set_bias(graph: ir.Graph, linear: Linear, bias: np.ndarray) -> None:
    """Store b (float64) as this linear's bias, adding an Add after the MatMul if it had none
    (a zero bias on a linear without one adds nothing: folding an RMSNorm has no β)."""
    if linear.bias is None and not np.any(bias):
        return
    dtype = weight_dtype(linear.weight)
    name = (linear.weight.name or "linear") + "_bias"
    if linear.bias is not None:
        node = linear.bias_node or linear.node
        index = next(i for i, v in enumerate(node.inputs) if v is linear.bias)
        node.replace_input_with(index, new_initializer(graph, linear.bias.name or name, bias, dtype))
        linear.bias = node.inputs[index]
        return
    output = linear.node.outputs[0]
    bias_value = new_initializer(graph, name, bias, dtype)
    add = ir.node("Add", inputs=[output, bias_value])
    replace_value(output, add.outputs[0])
    add.replace_input_with(0, output)  # the Add reads the product it replaces
    graph.insert_after(linear.node, add)
    add.outputs[0].dtype, add.outputs[0].shape = output.dtype, output.shape
    linear.bias, linear.bias_node = bias_value, add


def region_after(starts: list[Linear], end: ir.Node, limit: int) -> list[ir.Node] | None:
    """The linears' nodes (and bias adds) and every node their outputs reach before `end`; None
    when that is more than `limit` nodes (the values escape the sublayer)."""
    region = [n for x in starts for n in (x.node, x.bias_node) if n is not None]
    frontier = [x.output for x in starts]
    stop = {end, *region}
    while frontier:
        value = frontier.pop()
        for node, _ in value.uses():
            if node in stop or node in region:
                continue
            region.append(node)
            frontier.extend(node.outputs)
            if len(region) > limit:
                return None
    return region


def shape_owner(reader: ir.Node) -> ir.Node | None:
    """The node whose constant inputs make the shape a Reshape/Expand reads: itself, or the Concat
    producing it (None: the shape is computed some other way)."""
    if const_array(reader.inputs[1]) is not None:
        return reader
    producer = reader.inputs[1].producer()
    return producer if producer is not None and producer.op_type == "Concat" else None


@dataclass
class ShapeRewrite:
    """New constants for the shape a node reads: its own input 1, or inputs of the Concat making it
    (that Concat is copied for this reader, since exporters and cleanup share shapes across layers)."""

    reader: ir.Node
    owner: ir.Node
    constants: dict[int, np.ndarray]  # owner's input index → new array

    def apply(self, graph: ir.Graph) -> None:
        inputs = list(self.owner.inputs)
        for index, array in self.constants.items():
            name = (inputs[index].name or "shape") + "_pruned"
            inputs[index] = new_initializer(graph, name, array, array.dtype)
        if self.owner is self.reader:
            for index in self.constants:
                self.reader.replace_input_with(index, inputs[index])
            return
        concat = ir.node("Concat", inputs=inputs, attributes={"axis": 0})
        concat.outputs[0].dtype, concat.outputs[0].shape = self.owner.outputs[0].dtype, self.owner.outputs[0].shape
        graph.insert_before(self.reader, concat)
        self.reader.replace_input_with(1, concat.outputs[0])


def remove_node_keeping_input(graph: ir.Graph, node: ir.Node, keep: ir.Value) -> None:
    """Remove a single-output node, redirecting its readers to `keep` (one of its inputs)."""
    replace_value(node.outputs[0], keep)
    graph.remove(node, safe=True)


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of `old` read `new`; a graph output keeps its name (the user's contract)."""
    if old.is_graph_output():
        new.name, old.name = old.name, f"{old.name}_replaced"
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray, dtype: np.dtype) -> ir.Value:
    """A new initializer named `base`, or `base_k` with the first k that names no value of the
    graph (an exporter's `permute_1` may be an activation while `permute` is a weight)."""
    name = base
    suffix = 0
    while _named(graph, name):
        suffix += 1
        name = f"{base}_{suffix}"
    contiguous = np.array(array, dtype=dtype, order="C")  # (np.ascontiguousarray turns a scalar into [1])
    value = ir.Value(name=name, const_value=ir.tensor(contiguous, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(np.dtype(dtype))
    graph.register_initializer(value)
    return value


def split_linear(
    graph: ir.Graph,
    x: ir.Value,
    w_in_out: np.ndarray,
    bias: np.ndarray | None,
    sizes: list[int],
    dtype: np.dtype,
    base: str,
) -> list[ir.Node]:
    """The nodes of Split(x·W (+ b), `sizes`) on the last axis, W and b stored in `dtype` as new
    initializers named after `base`; the caller inserts them."""
    weight = new_initializer(graph, base, w_in_out, dtype)
    nodes = [ir.node("MatMul", [x, weight])]
    if bias is not None:
        nodes.append(ir.node("Add", [nodes[0].outputs[0], new_initializer(graph, weight.name + "_bias", bias, dtype)]))
    widths = new_initializer(graph, weight.name + "_split", np.array(sizes), np.int64)
    nodes.append(ir.node("Split", [nodes[-1].outputs[0], widths], attributes={"axis": -1}, num_outputs=len(sizes)))
    return nodes


def _named(graph: ir.Graph, name: str) -> bool:
    """Whether an initializer, a graph input or a node's output of `graph` is called `name`."""
    if name in graph.initializers or any(value.name == name for value in graph.inputs):
        return True
    return any(value.name == name for node in graph for value in node.outputs)


class WrittenOnce:
    """Initializers written into one graph once per key (a linear's quantized form), so that the
    linears reading one weight read one copy of its new form: `get` builds them the first time and
    reports their bytes then only. Keys are held, so that their ids cannot come to name another."""

    def __init__(self):
        self._written: dict[int, tuple[object, list[ir.Value]]] = {}

    def get(self, key: object, build: Callable[[], list[ir.Value]]) -> tuple[list[ir.Value], int]:
        """The initializers for `key`, and the bytes they added (0 when they were written before)."""
        if id(key) in self._written:
            return self._written[id(key)][1], 0
        values = build()
        self._written[id(key)] = (key, values)
        return values, sum(v.const_value.nbytes for v in values)

    def find(self, key: object) -> list[ir.Value] | None:
        """The initializers written for `key`, or None."""
        return self._written[id(key)][1] if id(key) in self._written else None


def weight_dtype(value: ir.Value) -> np.dtype:
    """The stored dtype of a weight (read through the Transpose that may sit on it)."""
    array = const_array(value)
    if array is None:
        array = const_array(value.producer().inputs[0])
    return array.dtype


def require_opset(model: ir.Model, version: int) -> None:
    """Raise the model's default-domain opset to at least `version` (onnxscript's converter
    adapts the existing nodes), so a rewrite can emit an operator introduced there."""
    if model.opset_imports.get("", 1) < version:
        from onnxscript import version_converter

        version_converter.convert_version(model, version)


def replace_node(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` in `old`'s place: its output 0 takes the old output's name, type and readers."""
    before, after = old.outputs[0], new.outputs[0]
    after.name, before.name = before.name, f"{before.name}_float"
    if before.type is not None:
        after.type, after.shape = before.type, before.shape
    graph.insert_after(old, new)
    before.replace_all_uses_with(after, replace_graph_outputs=True)
    graph.remove(old, safe=True)


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an initializer that nothing reads any more."""
    if value.is_initializer() and not value.uses() and not value.is_graph_input():
        graph.initializers.pop(value.name)


def replace_linear(graph: ir.Graph, linear: Linear, node: ir.Node) -> None:
    """Put `node` (computing the linear's MatMul, bias excluded) in the MatMul's place; the float
    weight, and the Transpose it may sit behind, go with their last reader."""
    transpose = linear.weight.producer()
    replace_node(graph, linear.node, node)
    weight = linear.weight
    if transpose is not None and not transpose.outputs[0].uses():
        weight = transpose.inputs[0]
        graph.remove(transpose, safe=True)
    drop_if_unused(graph, weight)

"""Matchers for the building blocks of a transformer, whatever the exporter wrote.

- Linear: `y = x·W (+ b)` as `MatMul(x, W)` with a constant 2-D W (stored [in, out], or
  [out, in] behind a `Transpose`), optionally followed by `Add(·, b)` with a constant 1-D b;
  or `Gemm(x, W, b)` with transB.
- Norm: LayerNorm `γ·(x − μ)/√(σ² + ε) + β` and RMSNorm `γ·x/√(mean(x²) + ε)`, either as one
  op (LayerNormalization, SimplifiedLayerNormalization, RMSNormalization) or decomposed into
  ReduceMean / Sub / Pow (or Mul) / Add ε / Sqrt / Reciprocal (or Div(1, ·), or Div) / Mul γ / Add β.
- Embedding: `Gather(E, ids)` on axis 0 of a constant 2-D table E.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from xopt.analysis.graph_view import TRANSPARENT_OPS, const_array, consumers, is_constant, skip_back


@dataclass(eq=False)
class Linear:
    """A dense layer y = x·W + b."""

    node: ir.Node  # the MatMul or Gemm
    weight: ir.Value  # the node's weight input (an initializer, or a Transpose of one)
    bias: ir.Value | None
    bias_node: ir.Node | None  # the Add that applies the bias (None for Gemm or no bias)
    in_features: int
    out_features: int

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        """The value after the bias, if any."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def name(self) -> str:
        return self.weight.name or self.node.name or "?"

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)


@dataclass(eq=False)
class Norm:
    """A LayerNorm or RMSNorm over the last axis."""

    kind: str  # "LayerNorm" or "RMSNorm"
    input: ir.Value
    output: ir.Value
    scale: ir.Value | None
    shift: ir.Value | None
    epsilon: float
    nodes: list[ir.Node] = field(default_factory=list)


@dataclass(eq=False)
class Embedding:
    """A lookup table E[ids]."""

    node: ir.Node
    table: ir.Value

    @property
    def rows(self) -> int:
        return int(self.table.shape[0])

    @property
    def width(self) -> int:
        return int(self.table.shape[1])


# Node metadata naming the quantized linear a node computes part of (a Q4_1 grid's offset term,
# `grid_offsets.py`): such a MatMul on a constant is not a linear of the model to rewrite again.
PART_OF_QUANTIZED = "xopt.part_of_quantized_linear"


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every linear of the graph, in graph order."""
    return [linear for linear in map(match_linear, graph) if linear is not None]


def match_linear(node: ir.Node) -> Linear | None:
    """The dense layer computed by `node`, or None (also for a MatMul that is part of a quantized
    linear's form, marked `PART_OF_QUANTIZED`)."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[0] is None:
        return None
    if PART_OF_QUANTIZED in node.metadata_props:
        return None
    if node.op_type == "MatMul":
        weight = node.inputs[1]
        shape = _weight_shape(weight)
        if shape is None or is_constant(node.inputs[0]):
            return None
        in_features, out_features = shape
        bias, bias_node = _bias_after(node.outputs[0], out_features)
        return Linear(node, weight, bias, bias_node, in_features, out_features)
    if node.op_type == "Gemm":
        weight = node.inputs[1]
        array = const_array(weight)
        if array is None or array.ndim != 2 or node.attributes.get_int("transA", 0):
            return None
        if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
            return None
        out_features, in_features = array.shape if node.attributes.get_int("transB", 0) else array.shape[::-1]
        bias = node.inputs[2] if len(node.inputs) > 2 and is_constant(node.inputs[2]) else None
        return Linear(node, weight, bias, None, int(in_features), int(out_features))
    return None


def _weight_shape(weight: ir.Value | None) -> tuple[int, int] | None:
    """(in, out) of a constant MatMul weight, seen through a Transpose of an initializer."""
    if weight is None:
        return None
    if is_constant(weight):
        array_shape = weight.shape if weight.shape is not None else const_array(weight).shape
        return (int(array_shape[0]), int(array_shape[1])) if len(array_shape) == 2 else None
    producer = weight.producer()
    if producer is not None and producer.op_type == "Transpose" and is_constant(producer.inputs[0]):
        source = producer.inputs[0].shape or const_array(producer.inputs[0]).shape
        if len(source) == 2:
            return int(source[1]), int(source[0])
    return None


def _bias_after(value: ir.Value, width: int) -> tuple[ir.Value | None, ir.Node | None]:
    users = consumers(value)
    if len(users) != 1 or users[0].op_type != "Add":
        return None, None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    array = const_array(other)
    if array is not None and array.size == width and array.shape[-1] == width:
        return other, add
    return None, None


def match_norm(node: ir.Node) -> Norm | None:
    """A norm that `node` anchors: a fused norm op, or the ReduceMean(x²) of a decomposed one."""
    if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
        if node.attributes.get_int("axis", -1) not in (-1, _last_axis(node.inputs[0])):
            return None
        shift = node.inputs[2] if len(node.inputs) > 2 else None
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        return Norm("LayerNorm", node.inputs[0], node.outputs[0], node.inputs[1], shift, epsilon, [node])
    if node.op_type in ("SimplifiedLayerNormalization", "RMSNormalization"):
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        return Norm("RMSNorm", node.inputs[0], node.outputs[0], node.inputs[1], None, epsilon, [node])
    if node.op_type == "ReduceMean":
        return _match_decomposed_norm(node)
    return None


def read_outside(norm: Norm) -> ir.Value | None:
    """A value the norm computes on the way (a decomposed norm's mean) that something other than
    the norm's own nodes reads, if any: replacing the norm would leave that reader without it."""
    inside = set(norm.nodes)
    for node in norm.nodes:
        for value in node.outputs:
            if value is not norm.output and (value.is_graph_output() or any(u not in inside for u in consumers(value))):
                return value
    return None


def _last_axis(value: ir.Value) -> int:
    return len(value.shape) - 1 if value.shape is not None else -1


def _match_decomposed_norm(reduce: ir.Node) -> Norm | None:
    square = reduce.inputs[0].producer() if reduce.inputs[0] is not None else None
    if square is None or not _is_square(square):
        return None
    centred = skip_back(square.inputs[0])
    nodes = [square, reduce]
    kind, source = "RMSNorm", centred
    sub = centred.producer()
    if sub is not None and sub.op_type == "Sub":
        mean = sub.inputs[1].producer()
        if mean is not None and mean.op_type == "ReduceMean" and skip_back(mean.inputs[0]) is skip_back(sub.inputs[0]):
            kind, source = "LayerNorm", skip_back(sub.inputs[0])
            nodes = [mean, sub, *nodes]
    # ReduceMean → Add ε → Sqrt → (Reciprocal → Mul with x | Div of x)
    epsilon, value = None, reduce.outputs[0]
    normalized = None
    for _ in range(6):
        users = consumers(value)
        if len(users) != 1:
            return None
        user = users[0]
        nodes.append(user)
        if user.op_type == "Add" and epsilon is None:
            constant = const_array(user.inputs[1] if user.inputs[0] is value else user.inputs[0])
            if constant is None or constant.size != 1:
                return None
            epsilon = float(constant.reshape(()))
        elif user.op_type in ("Mul", "Div") and any(skip_back(v) is centred for v in user.inputs if v is not value):
            normalized = user.outputs[0]
            break
        elif user.op_type not in ("Sqrt", "Reciprocal", *TRANSPARENT_OPS) and not _is_one_over(user, value):
            return None
        value = user.outputs[0]
    if normalized is None or epsilon is None:
        return None
    output, scale, shift = _affine_after(normalized, nodes)
    return Norm(kind, source, output, scale, shift, epsilon, nodes)


def _is_one_over(node: ir.Node, value: ir.Value) -> bool:
    """`Div(1, value)`: how TorchScript exports `torch.rsqrt` after its Sqrt."""
    if node.op_type != "Div" or node.inputs[1] is not value:
        return False
    one = const_array(node.inputs[0])
    return one is not None and one.size == 1 and float(one.reshape(())) == 1.0


def _is_square(node: ir.Node) -> bool:
    if node.op_type == "Pow":
        exponent = const_array(node.inputs[1])
        return exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0
    return node.op_type == "Mul" and node.inputs[0] is node.inputs[1]


def _affine_after(value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value | None, ir.Value | None]:
    """Follow `normalized → (Cast) → Mul γ → Add β` and return (output, γ, β)."""
    scale = shift = None
    for op, slot in (("Mul", "scale"), ("Add", "shift")):
        users = consumers(value)
        while len(users) == 1 and users[0].op_type in TRANSPARENT_OPS:
            nodes.append(users[0])
            value = users[0].outputs[0]
            users = consumers(value)
        if len(users) != 1 or users[0].op_type != op:
            break
        other = users[0].inputs[1] if users[0].inputs[0] is value else users[0].inputs[0]
        if const_array(other) is None or const_array(other).ndim > 1:
            break
        nodes.append(users[0])
        value = users[0].outputs[0]
        if slot == "scale":
            scale = other
        else:
            shift = other
    return value, scale, shift


def match_embedding(node: ir.Node) -> Embedding | None:
    """`Gather(E, ids)` on axis 0 of a constant 2-D table."""
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
        return None
    table = node.inputs[0]
    array_shape = table.shape if table is not None and table.const_value is not None else None
    if array_shape is None or len(array_shape) != 2 or is_constant(node.inputs[1]):
        return None
    return Embedding(node, table)


def table_equals_transposed(table: ir.Value, weight: ir.Value) -> bool:
    """Whether an LM head weight [d, vocab] is the embedding table [vocab, d] transposed (tied)."""
    producer = weight.producer()
    if table is weight or (producer is not None and producer.op_type == "Transpose" and producer.inputs[0] is table):
        return True
    a, b = const_array(table), const_array(weight)
    return a is not None and b is not None and a.shape == b.shape[::-1] and bool(np.array_equal(a, b.T))

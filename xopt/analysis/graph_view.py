"""Read-only views of an onnx-ir graph: constants, producers/consumers, and a networkx DiGraph.

The networkx view has one vertex per node and an edge producer → consumer per value; region
queries (what lies between two points of the residual stream) are `nx.descendants` ∩
`nx.ancestors` on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
import numpy as np
import onnx_ir as ir

# Ops that pass a value through unchanged for structure purposes (dtype casts in fp32 models,
# dropout at inference, view-style reshapes between a linear and its consumer).
TRANSPARENT_OPS = frozenset({"Cast", "Identity", "Dropout"})


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant node, seen through Identity)."""
    if value is None:
        return None
    value = skip_back(value, ("Identity",))
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value.numpy()
    return None


def is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    value = skip_back(value, ("Identity",))
    node = value.producer()
    return value.const_value is not None or (node is not None and node.op_type == "Constant")


def scalar_factor(node: ir.Node | None) -> tuple[ir.Value, float] | None:
    """(x, c) when `node` computes x·c with c a constant scalar: Mul(x, c), Mul(c, x) or Div(x, 1/c)."""
    if node is None or node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.inputs) != 2:
        return None
    orders = (node.inputs, node.inputs[::-1]) if node.op_type == "Mul" else (node.inputs,)
    for value, other in orders:
        constant = const_array(other)
        if constant is not None and constant.size == 1 and not is_constant(value):
            c = float(constant.reshape(()))
            if node.op_type == "Mul":
                return value, c
            return (value, 1.0 / c) if c else None
    return None


def consumers(value: ir.Value) -> list[ir.Node]:
    return list(dict.fromkeys(node for node, _ in value.uses()))


def sole_reader(value: ir.Value, op_type: str | None = None) -> ir.Node | None:
    """The one node that reads `value` (of `op_type`, if given), when nothing else does: no other
    reader and not a graph output, so a rewrite may consume `value` without keeping it."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0][0]
    return node if op_type is None or node.op_type == op_type else None


def keeps_last_axis(reshape: ir.Node) -> bool:
    """Whether a Reshape's output has its input's (static) last axis: it regroups the rows only."""
    source, target = reshape.inputs[0].shape, reshape.outputs[0].shape
    if source is None or target is None or len(source) == 0 or len(target) == 0:
        return False
    return isinstance(source[-1], int) and target[-1] == source[-1]


def skip_back(value: ir.Value, ops: Iterable[str] = TRANSPARENT_OPS) -> ir.Value:
    """Follow `value` back through single-input pass-through ops."""
    ops = frozenset(ops)
    while (node := value.producer()) is not None and node.op_type in ops and node.inputs:
        value = node.inputs[0]
    return value


def skip_forward(value: ir.Value, ops: Iterable[str] = TRANSPARENT_OPS) -> ir.Value:
    """Follow `value` forward while its only consumer is a pass-through op."""
    ops = frozenset(ops)
    while len(users := consumers(value)) == 1 and users[0].op_type in ops and users[0].inputs[0] is value:
        value = users[0].outputs[0]
    return value


def past_nan_guard(value: ir.Value) -> ir.Value:
    """The output of `Where(IsNaN(p), 0, p)` when that guard is all that reads `p = value`
    (TorchScript's export of scaled_dot_product_attention zeroes its softmax's NaN rows), else
    `value`."""
    users = consumers(value)
    guard = next((u for u in users if u.op_type == "Where"), None)
    check = next((u for u in users if u.op_type == "IsNaN"), None)
    if len(users) != 2 or guard is None or check is None:
        return value
    zero = const_array(guard.inputs[1])
    if guard.inputs[0] is not check.outputs[0] or guard.inputs[2] is not value or zero is None or zero.size != 1:
        return value
    return guard.outputs[0] if float(zero.reshape(())) == 0.0 else value


def to_networkx(graph: ir.Graph) -> nx.DiGraph:
    """A DiGraph over the graph's nodes with an edge from each producer to each consumer."""
    view = nx.DiGraph()
    view.add_nodes_from(graph)
    for node in graph:
        for value in node.inputs:
            if value is not None and (producer := value.producer()) is not None and producer.graph is graph:
                view.add_edge(producer, node)
    return view


def nodes_between(view: nx.DiGraph, start: ir.Node, end: ir.Node) -> set[ir.Node]:
    """Nodes on some path from `start` to `end`, both included."""
    return ({start} | nx.descendants(view, start)) & ({end} | nx.ancestors(view, end))


def module_path(node: ir.Node) -> str | None:
    """The torch module a node was exported from (`model.layers.3.mlp.down_proj`), if recorded."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:  # TorchScript exports name nodes by scope instead: /encoder/layer.0/attention/Op
        parts = node.name.strip("/").split("/") if node.name.startswith("/") else []
        return ".".join(parts[:-1]) or None
    names = [s.strip().strip("'\"") for s in scopes.strip("[]").split(",")]
    modules = [n for n in names[:-1] if n]  # the last scope is the op itself
    return modules[-1] if modules else None

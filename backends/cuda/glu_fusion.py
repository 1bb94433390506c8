"""Gated MLP activations found in an optimized graph, for the CUDA executor to run as one kernel.

The merged gate/up projection leaves, per block,
    g, u = Split(h, axis=−1)        (two equal halves, gate first)
    y = Mul(act(g), u)              act(g) = Mul(g, Sigmoid(g)) (SwiGLU) or Gelu(g) (GeGLU)
and y = act(g)·u is one elementwise pass over h (kernels/activations.cu, `xopt_glu`) instead of a
split, the activation and a product, each writing a tensor. A match needs every intermediate
value read inside the pattern only (and none a graph output); an odd width (halves of unequal
size, as Split makes them) is run by the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir


@dataclass(frozen=True)
class GatedActivation:
    split: ir.Node
    product: ir.Node  # the final Mul: its output is the pattern's
    activation: str  # silu, gelu or gelu_tanh
    inner: tuple[ir.Node, ...]  # the nodes between split and product


def find_gated_activations(graph: ir.Graph) -> list[GatedActivation]:
    return [match for node in graph if node.op_type == "Split" and (match := _match(node)) is not None]


def _readers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def _default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _match(split: ir.Node) -> GatedActivation | None:
    if not _default_domain(split) or len(split.outputs) != 2 or split.attributes.get_int("axis", 0) != -1:
        return None
    if "split" in split.attributes:  # sizes as an attribute (before opset 13): not known to be halves
        return None
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = split.inputs[1].const_value
        if sizes is None or len(set(sizes.numpy().tolist())) != 1:
            return None
    gate, up = split.outputs
    up_readers = _readers(up)
    if len(up_readers) != 1 or up_readers[0].op_type != "Mul" or not _default_domain(up_readers[0]):
        return None
    product = up_readers[0]
    activated = product.inputs[0] if product.inputs[1] is up else product.inputs[1]
    source = activated.producer()
    if source is None or len(_readers(activated)) != 1 or not _default_domain(source):
        return None
    gate_readers = _readers(gate)
    match = None
    if source.op_type == "Gelu" and gate_readers == [source]:
        approximate = source.attributes.get_string("approximate", "none")
        match = GatedActivation(split, product, "gelu_tanh" if approximate == "tanh" else "gelu", (source,))
    elif source.op_type == "Mul" and len(gate_readers) == 2 and source in gate_readers:
        sigmoid = next((node for node in gate_readers if node is not source), None)
        if (
            sigmoid is not None
            and sigmoid.op_type == "Sigmoid"
            and _default_domain(sigmoid)
            and _readers(sigmoid.outputs[0]) == [source]
            and gate in source.inputs
        ):
            match = GatedActivation(split, product, "silu", (sigmoid, source))
    if match is None:
        return None
    inside = [gate, up, activated, *(value for node in match.inner for value in node.outputs)]
    return None if any(value.is_graph_output() for value in inside) else match

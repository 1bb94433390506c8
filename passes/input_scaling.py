"""A linear's input divided per channel, x·diag(1/s), folded into the op that produces x.

Smoothing (`int8_dynamic`) and AWQ scales (`awq`) compute (x·diag(1/s))·(diag(s)·W) = x·W. The
division is folded, exactly, when x feeds only this linear and its producer scales each output
channel by constants:
- a norm: y = γ⊙n + β, so y/s = (γ/s)⊙n + β/s (γ and β divided by s);
- com.microsoft Attention: each head's output softmax(QKᵀ)·V is linear in V's channels, so the V
  columns of its packed weight and bias are divided by s.
Otherwise a Mul by 1/s is inserted before the linear.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from xopt.analysis.graph_view import const_array
from xopt.analysis.patterns import Linear
from xopt.rewrite import drop_if_unused, new_initializer

CONTRIB = "com.microsoft"
NORM_SCALE_SHIFT = {  # norm op → indices of its γ and β inputs (None: it has no β)
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1, None),
    "RMSNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}


def divide_input(graph: ir.Graph, linear: Linear, smoothing: np.ndarray) -> ir.Value:
    """x·diag(1/s): folded into the op that produces x when x feeds only this linear, else a Mul."""
    x = linear.input
    producer = x.producer()
    if producer is not None and x is producer.outputs[0] and len(x.uses()) == 1 and not x.is_graph_output():
        targets = _foldable_inputs(producer)
        arrays = [const_array(producer.inputs[index]) for index, _ in targets]
        if targets and all(
            a is not None and a[..., part].shape[-1] == len(smoothing)
            for a, (_, part) in zip(arrays, targets, strict=True)
        ):
            for array, (index, part) in zip(arrays, targets, strict=True):
                old = producer.inputs[index]
                scaled = np.array(array, dtype=np.float64)
                scaled[..., part] /= smoothing
                producer.replace_input_with(
                    index, new_initializer(graph, f"{linear.name}_smoothed", scaled, array.dtype)
                )
                drop_if_unused(graph, old)
            return x
    inverse = new_initializer(graph, f"{linear.name}_smoothing", 1.0 / smoothing, np.float32)
    mul = ir.node("Mul", [x, inverse], name=f"{linear.node.name or linear.name}_smoothing")
    mul.outputs[0].name = f"{linear.name}_smoothed_input"
    mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
    graph.insert_before(linear.node, mul)
    return mul.outputs[0]


def _foldable_inputs(producer: ir.Node) -> list[tuple[int, slice]]:
    """The constant inputs (index, slice of the last axis) that scale the producer's output 0
    channel by channel: a norm's γ and β; com.microsoft Attention's V weight columns and bias."""
    if producer.op_type in NORM_SCALE_SHIFT:
        indices = [i for i in NORM_SCALE_SHIFT[producer.op_type] if i is not None and i < len(producer.inputs)]
        return [(i, slice(None)) for i in indices if producer.inputs[i] is not None]
    inputs = producer.inputs
    if (
        producer.op_type == "Attention"
        and producer.domain == CONTRIB
        and "qkv_hidden_sizes" not in producer.attributes
        and len(inputs) > 2
        and inputs[2] is not None
        and inputs[1].shape is not None
    ):
        width = inputs[1].shape[-1] // 3  # packed [Q | K | V] columns
        return [(1, slice(2 * width, 3 * width)), (2, slice(2 * width, 3 * width))]
    return []

"""The tanh approximation of GELU written in standard ops → com.microsoft `FastGelu`, for `fuse`.

    gelu(x) ≈ ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))

`FastGelu` computes this formula. onnxscript's rule reads one way of writing it: Pow(x, 3), and ½
multiplied into the bracket before x. TorchScript's export of torch's `gelu(approximate="tanh")`
(Gemma's activation, through Hugging Face Optimum) writes x³ as x·(x·x) and multiplies by ½
last. Here each product is read as the multiset of its factors, whatever the order and nesting
of its Muls (each inner one read by nothing else), with its constant factors multiplied
together and compared to the formula's within float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx_ir as ir

from xopt.analysis.graph_view import const_array, sole_reader
from xopt.rewrite import replace_value

_SQRT_TWO_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715
_RELATIVE_TOLERANCE = 1e-6
_MAX_OUTER_MULS = 2  # x and ½ join the bracket in at most two Muls


@dataclass
class _Product:
    """A value read as c·f₁·f₂·…: its constant factor and its other factors."""

    constant: float = 1.0
    factors: list[ir.Value] = field(default_factory=list)

    def is_(self, constant: float, factors: list[ir.Value]) -> bool:
        return _close(self.constant, constant) and _same(self.factors, factors)


def lower_tanh_gelu(model: ir.Model) -> int:
    """Replace every tanh-GELU expansion by `FastGelu(x)`; returns the count."""
    graph, count = model.graph, 0
    for tanh in [node for node in graph if node.op_type == "Tanh" and node.domain == ""]:
        match = _match(tanh)
        if match is None:
            continue
        x, output = match
        gelu = ir.node("FastGelu", [x], domain="com.microsoft")
        graph.insert_after(output.producer(), gelu)
        gelu.outputs[0].dtype, gelu.outputs[0].shape = output.dtype, output.shape
        replace_value(output, gelu.outputs[0])
        count += 1
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    return count


def _match(tanh: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(x, the expansion's output) when `tanh` is the one inside a tanh-GELU expansion."""
    argument = _product(tanh.inputs[0])
    if len(argument.factors) != 1 or not _close(argument.constant, _SQRT_TWO_OVER_PI):
        return None
    inner = argument.factors[0].producer()  # x + 0.044715·x³
    if inner is None or inner.op_type != "Add" or sole_reader(inner.outputs[0]) is None:
        return None
    x = next((a for a, b in (inner.inputs, inner.inputs[::-1]) if _is_cubic_term(b, a)), None)
    bracket = sole_reader(tanh.outputs[0], "Add")  # 1 + tanh(…)
    if x is None or bracket is None or not _adds_one(bracket, tanh.outputs[0]):
        return None
    value = bracket.outputs[0]
    for _ in range(_MAX_OUTER_MULS):
        mul = sole_reader(value, "Mul")
        if mul is None:
            return None
        value = mul.outputs[0]
        if _product(value).is_(0.5, [x, bracket.outputs[0]]):
            return x, value
    return None


def _is_cubic_term(value: ir.Value, x: ir.Value) -> bool:
    """Whether `value` is 0.044715·x³, x³ written Pow(x, 3) or as a product of x three times."""
    product = _product(value)
    if product.is_(_CUBIC, [x, x, x]):
        return True
    if len(product.factors) != 1 or not _close(product.constant, _CUBIC):
        return False
    power = product.factors[0].producer()
    exponent = const_array(power.inputs[1]) if power is not None and power.op_type == "Pow" else None
    return exponent is not None and exponent.size == 1 and float(exponent.item()) == 3.0 and power.inputs[0] is x


def _adds_one(add: ir.Node, value: ir.Value) -> bool:
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    constant = const_array(other)
    return constant is not None and constant.size == 1 and float(constant.item()) == 1.0


def _product(value: ir.Value) -> _Product:
    """`value` as a product, through the Muls that compute it; an inner Mul only where nothing else
    reads its output (the top one is `value`'s own producer)."""
    product = _Product()
    pending = [(value, True)]
    while pending:
        current, top = pending.pop()
        constant = const_array(current)
        node = current.producer()
        if constant is not None and constant.size == 1:
            product.constant *= float(constant.item())
        elif node is not None and node.op_type == "Mul" and node.domain == "" and (top or sole_reader(current)):
            pending += [(operand, False) for operand in node.inputs]
        else:
            product.factors.append(current)
    return product


def _close(constant: float, expected: float) -> bool:
    return math.isclose(constant, expected, rel_tol=_RELATIVE_TOLERANCE)


def _same(values: list[ir.Value], expected: list[ir.Value]) -> bool:
    """Whether two lists hold the same values as many times each (values hash by identity)."""
    return len(values) == len(expected) and all(values.count(v) == expected.count(v) for v in expected)

"""Constants as the second operand of commutative binary ops, for `cleanup`.

An `Add` or `Mul` whose first operand is a constant and whose second is not is written with its
operands swapped: c + x → x + c, c·x → x·c. Exact: IEEE addition and multiplication commute, and
broadcasting is symmetric, so the output (values, shape and type) is the same. Pattern rules
match one order: onnxscript's MultiHeadAttention bias fusion reads Add(Q·W, b), while
TorchScript's export writes a linear's bias first, Add(b, x·W) (Hugging Face Optimum's BERT), and
with the biases outside, the Q, K and V projections could not be packed into one `Attention`.
"""

from __future__ import annotations

import onnx_ir as ir

from xopt.analysis.graph_view import is_constant

_COMMUTATIVE = frozenset({"Add", "Mul"})


def put_constants_second(graph: ir.Graph) -> int:
    """Swap the operands of every Add/Mul of (constant, non-constant); the count swapped."""
    swapped = 0
    for node in graph:
        if node.op_type not in _COMMUTATIVE or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        first, second = node.inputs
        if is_constant(first) and second is not None and not is_constant(second):
            node.replace_input_with(0, second)
            node.replace_input_with(1, first)
            swapped += 1
    return swapped

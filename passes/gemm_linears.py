"""Gemm linears in MatMul form (part of `cleanup`): the one form of a dense layer every pass reads.

A Gemm with a constant weight and no scaling, Y = A·op(B) + C (transA = 0, alpha = beta = 1, op
the transpose where transB = 1, C a bias broadcast over rows), is the linear

    Y = MatMul(A, op(B)) + C,

with op(B) a Transpose of the initializer (folded into it by `cleanup` unless the table is shared,
as a tied LM head's is). Exporters emit it for `torch.addmm`, so GPT-2's Conv1D layers arrive as

    Reshape(x [.., K] → [M, K]) → Gemm → Reshape(→ [.., N]),

and where the second Reshape's output has x's leading dimensions (the same integers and symbols,
none unknown) the pair is dropped: MatMul broadcasts over them, Y = MatMul(x, op(B)) + C, the
same products (Gemm starts its sums from C, MatMul + Add adds it last: the last bit may differ).
`quantize`, `low-rank` and `keep-grids` lower MatMul linears only, and `rotate` needs a norm read
by linears directly: GPT-2's int4 recipe quantized its LM head alone before.
"""

from __future__ import annotations

import onnx_ir as ir

from xopt.analysis.graph_view import const_array, sole_reader
from xopt.rewrite import replace_value


def gemm_linears_to_matmul(graph: ir.Graph) -> int:
    """Rewrite every Gemm linear of `graph` as MatMul (+ Add); the number rewritten."""
    rewritten = 0
    for gemm in [n for n in graph if n.op_type == "Gemm" and n.domain in ("", "ai.onnx")]:
        if not _is_linear(gemm):
            continue
        weight, bias = gemm.inputs[1], _bias(gemm)
        source, output = gemm.inputs[0], gemm.outputs[0]
        restore = _restoring_reshape(source, output)
        if restore is not None:
            source = source.producer().inputs[0]
        nodes = []
        if gemm.attributes.get_int("transB", 0):
            nodes.append(ir.node("Transpose", [weight], attributes={"perm": [1, 0]}))
            weight = nodes[-1].outputs[0]
        nodes.append(ir.node("MatMul", [source, weight], name=f"{gemm.name}_matmul"))
        if bias is not None:
            nodes.append(ir.node("Add", [nodes[-1].outputs[0], bias], name=f"{gemm.name}_bias"))
        for node in nodes:  # the module path the exporter recorded names the linear's layer
            node.metadata_props.update(gemm.metadata_props)
        result = nodes[-1].outputs[0]
        kept = restore.outputs[0] if restore is not None else output
        result.dtype, result.shape = kept.dtype, kept.shape
        graph.insert_before(gemm, nodes)
        replace_value(kept, result)
        for node in (restore, gemm):
            if node is not None:
                graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def _bias(gemm: ir.Node) -> ir.Value | None:
    return gemm.inputs[2] if len(gemm.inputs) > 2 else None


def _is_linear(gemm: ir.Node) -> bool:
    """Gemm(A, B, C) with B a constant matrix, C absent or a constant bias, no transA, alpha, beta."""
    weight = const_array(gemm.inputs[1])
    if weight is None or weight.ndim != 2 or gemm.attributes.get_int("transA", 0):
        return False
    if any(gemm.attributes.get_float(name, 1.0) != 1.0 for name in ("alpha", "beta")):
        return False
    width = weight.shape[0] if gemm.attributes.get_int("transB", 0) else weight.shape[1]
    bias = _bias(gemm)
    return bias is None or (const_array(bias) is not None and const_array(bias).shape in ((), (width,), (1, width)))


def _restoring_reshape(source: ir.Value, output: ir.Value) -> ir.Node | None:
    """The Reshape after a Gemm that gives back the leading dimensions its input Reshape flattened,
    or None."""
    flatten = source.producer()
    restore = sole_reader(output, "Reshape")
    if flatten is None or flatten.op_type != "Reshape" or restore is None:
        return None
    original, restored = flatten.inputs[0].shape, restore.outputs[0].shape
    if original is None or restored is None or len(original) < 2 or len(original) != len(restored):
        return None
    known = all(isinstance(d, int) or d.value is not None for d in original[:-1])
    return restore if known and list(original[:-1]) == list(restored[:-1]) else None

"""head_columns: the columns of one projection that each head of Q, K and V copies, and the
projection reordered so that they are its merged slices."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from xopt.analysis.patterns import find_linears
from xopt.backends.onnxruntime import create_session
from xopt.passes.head_columns import head_columns, reordered_projection

BATCH, SEQUENCE = ir.SymbolicDim("batch"), ir.SymbolicDim("sequence")


def _neox_like() -> tuple[ir.Model, list[ir.Value]]:
    """X = x·W + b [B, S, 12] as 2 heads of [q | k | v] (2 wide each): Reshape to [B, S, 2, 6],
    Transpose to [B, 2, S, 6], Split the last axis into Q, K, V [B, 2, S, 2] (GPT-NeoX's layout)."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape([BATCH, SEQUENCE, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal((4, 12)).astype(np.float32), name="w"))
    bias = ir.Value(name="b", const_value=ir.tensor(rng.standard_normal(12).astype(np.float32), name="b"))
    dims = ir.Value(name="dims", const_value=ir.tensor(np.array([0, 0, 2, 6]), name="dims"))
    widths = ir.Value(name="widths", const_value=ir.tensor(np.array([2, 2, 2]), name="widths"))
    matmul = ir.node("MatMul", [x, weight])
    add = ir.node("Add", [matmul.outputs[0], bias])
    reshape = ir.node("Reshape", [add.outputs[0], dims])
    transpose = ir.node("Transpose", [reshape.outputs[0]], attributes={"perm": [0, 2, 1, 3]})
    split = ir.node("Split", [transpose.outputs[0], widths], attributes={"axis": 3}, num_outputs=3)
    shapes = {
        matmul: [BATCH, SEQUENCE, 12],
        add: [BATCH, SEQUENCE, 12],
        reshape: [BATCH, SEQUENCE, 2, 6],
        transpose: [BATCH, 2, SEQUENCE, 6],
        split: [BATCH, 2, SEQUENCE, 2],
    }
    for node, shape in shapes.items():
        for output in node.outputs:
            output.shape, output.dtype = ir.Shape(shape), ir.DataType.FLOAT
    graph = ir.Graph(
        [x],
        list(split.outputs),
        nodes=[matmul, add, reshape, transpose, split],
        initializers=[weight, bias, dims, widths],
        opset_imports={"": 21},
    )
    return ir.Model(graph, ir_version=10), list(split.outputs)


@pytest.mark.parametrize(
    "picked, expected",
    [
        ((0, 1, 2), [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]),
        # a column several heads copy (Falcon's new architecture expands its KV heads) is computed for each
        ((0, 0, 2), [[0, 1, 6, 7], [0, 1, 6, 7], [4, 5, 10, 11]]),
    ],
)
def test_each_head_reads_its_columns_and_the_reordered_projection_gives_them_merged(picked, expected):
    model, heads = _neox_like()
    (projection,) = find_linears(model.graph)
    columns = head_columns(projection, [(heads[i], 2) for i in picked])
    assert [c.tolist() for c in columns] == expected
    model.graph.outputs.extend(reordered_projection(model.graph, projection, columns))
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    outputs = create_session(model, threads=1).run(None, {"x": x})
    for i, part in zip(picked, outputs[3:], strict=True):
        assert part.shape == (2, 3, 4)
        np.testing.assert_array_equal(part.reshape(2, 3, 2, 2).transpose(0, 2, 1, 3), outputs[i])


def test_a_value_computed_from_the_projection_has_no_columns():
    model, (q, k, v) = _neox_like()
    (projection,) = find_linears(model.graph)
    negated = ir.node("Neg", [k])
    negated.outputs[0].shape, negated.outputs[0].dtype = k.shape, k.dtype
    model.graph.append(negated)
    refusal = head_columns(projection, [(q, 2), (negated.outputs[0], 2), (v, 2)])
    assert (
        refusal
        == f"{negated.outputs[0].name} is not moved out of the QKV projection by reshapes, transposes and selections"
    )

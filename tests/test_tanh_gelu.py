"""The tanh GELU, ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), however its products are written."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from xopt.passes.tanh_gelu import lower_tanh_gelu
from xopt.verify import reference_outputs

K = math.sqrt(2 / math.pi)


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def _gelu_model(nodes: list[tuple[str, list[str], str]], cubic: float = 0.044715, outputs=("y",)) -> ir.Model:
    constants = [
        _scalar("half", 0.5),
        _scalar("one", 1.0),
        _scalar("cubic", cubic),
        _scalar("k", K),
        _scalar("three", 3.0),
    ]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, [output]) for op, inputs, output in nodes],
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 8]) for name in outputs],
        constants,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


_INNER_TORCH = [  # TorchScript's: x·(x·x), constants on the right
    ("Mul", ["x", "x"], "x2"),
    ("Mul", ["x", "x2"], "x3"),
    ("Mul", ["x3", "cubic"], "cx3"),
    ("Add", ["x", "cx3"], "inner"),
    ("Mul", ["inner", "k"], "arg"),
    ("Tanh", ["arg"], "t"),
    ("Add", ["t", "one"], "bracket"),
]
FORMS = {
    "torch: ½ last": [*_INNER_TORCH, ("Mul", ["x", "bracket"], "xb"), ("Mul", ["xb", "half"], "y")],
    "onnxscript: Pow, ½ into the bracket": [
        ("Pow", ["x", "three"], "x3"),
        ("Mul", ["cubic", "x3"], "cx3"),
        ("Add", ["x", "cx3"], "inner"),
        ("Mul", ["k", "inner"], "arg"),
        ("Tanh", ["arg"], "t"),
        ("Add", ["t", "one"], "bracket"),
        ("Mul", ["half", "bracket"], "hb"),
        ("Mul", ["x", "hb"], "y"),
    ],
    "(x·x)·x, ½·x first": [
        ("Mul", ["x", "x"], "x2"),
        ("Mul", ["x2", "x"], "x3"),
        *_INNER_TORCH[2:],
        ("Mul", ["half", "x"], "hx"),
        ("Mul", ["hx", "bracket"], "y"),
    ],
}


@pytest.mark.parametrize("form", FORMS)
def test_every_writing_of_the_tanh_gelu_becomes_one_fast_gelu(form):
    model = _gelu_model(FORMS[form])
    x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
    expected = reference_outputs(model, {"x": x})["y"]
    assert lower_tanh_gelu(model) == 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    assert [node.op_type for node in model.graph] == ["FastGelu"]
    assert model.opset_imports["com.microsoft"] == 1
    np.testing.assert_allclose(reference_outputs(model, {"x": x})["y"], expected, rtol=1e-6, atol=1e-6)


def test_another_constant_or_a_shared_square_is_not_the_gelu():
    assert lower_tanh_gelu(_gelu_model(FORMS["torch: ½ last"], cubic=0.05)) == 0
    # x² also read as an output: x·(x·x) is then the product of x and another value
    shared = _gelu_model(FORMS["torch: ½ last"], outputs=("y", "x2"))
    assert lower_tanh_gelu(shared) == 0

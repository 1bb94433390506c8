"""The gated-activation matcher of the CUDA executor fuses Split → SiLU/GELU → Mul only when every
intermediate value stays inside the pattern, and the fused step computes what the graph did."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from xopt.backends.cuda import GraphExecutor
from xopt.backends.cuda.glu_fusion import find_gated_activations


def gated_model(width: int = 8, extra_outputs=(), square=False, gelu=False, split_sizes=None) -> ir.Model:
    """h [2, width] → g, u = Split(h) → y = act(g)·u, with optional twists that must block the match."""
    h = ir.Value(name="h", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, width]))
    g, u, a, y = (ir.Value(name=name) for name in "guay")
    attributes = {"axis": -1, **({"split": split_sizes} if split_sizes else {"num_outputs": 2})}
    nodes = [ir.node("Split", [h], attributes=attributes, outputs=[g, u])]
    if gelu:
        nodes.append(ir.node("Gelu", [g], attributes={"approximate": "tanh"}, outputs=[a]))
    elif square:
        nodes.append(ir.node("Mul", [g, g], outputs=[a]))
    else:
        s = ir.Value(name="s")
        nodes += [ir.node("Sigmoid", [g], outputs=[s]), ir.node("Mul", [g, s], outputs=[a])]
    nodes.append(ir.node("Mul", [a, u], outputs=[y]))
    produced = {value.name: value for node in nodes for value in node.outputs}
    graph = ir.Graph([h], [y, *(produced[name] for name in extra_outputs)], nodes=nodes, opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("kwargs", "activation"), [({}, "silu"), ({"gelu": True}, "gelu_tanh")])
def test_a_gated_activation_is_one_step_with_the_graphs_result(kwargs, activation):
    model = gated_model(**kwargs)
    (match,) = find_gated_activations(model.graph)
    assert match.activation == activation
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    g, u = torch.from_numpy(x).chunk(2, dim=-1)
    act = torch.nn.functional.silu(g) if activation == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    executor = GraphExecutor(model, "cpu")
    assert len(executor.steps) == 1
    torch.testing.assert_close(executor.run({"h": x})["y"], act * u)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"extra_outputs": ["u"]},  # a half read outside the pattern
        {"extra_outputs": ["a"]},  # the activation read outside
        {"extra_outputs": ["s"]},  # the sigmoid read outside
        {"square": True},  # g·g is not SiLU
        {"split_sizes": [3, 1], "width": 4},  # sizes as an attribute, not halves
    ],
)
def test_no_match_when_a_value_leaves_the_pattern_or_it_is_not_a_glu(kwargs):
    model = gated_model(**kwargs)
    assert find_gated_activations(model.graph) == []
    outputs = GraphExecutor(model, "cpu").run({"h": np.ones((2, kwargs.get("width", 8)), np.float32)})
    assert set(outputs) == {"y", *kwargs.get("extra_outputs", [])}

"""Small models written in ONNX text, a deliberately wrong pass, transformers' greedy generation and
a causal LM's loss, for unit tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from xopt.passes.fuse import FAMILIES
from xopt.pipeline import Pass, PassResult

# y = ((x + 0) · 1) through an Identity, a constant subexpression computed twice, a dead branch.
REDUNDANT_MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
redundant (float[N, 8] x) => (float[N, 8] y) {
    zero = Constant <value = float {0.0}> ()
    one = Constant <value = float {1.0}> ()
    two = Constant <value = float[1] {2.0}> ()
    a = Add (x, zero)
    b = Mul (a, one)
    c = Identity (b)
    s1 = Mul (two, two)
    s2 = Mul (two, two)
    d = Mul (c, s1)
    e = Mul (c, s2)
    dead = Sub (x, x)
    y = Add (d, e)
}
"""

# A linear layer y = x·W + b followed by Relu, with W as an initializer.
LINEAR_MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
linear (float[N, 4] x) => (float[N, 3] y)
<float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[3] b = {0.5, -0.5, 0.25}>
{
    m = MatMul (x, w)
    z = Add (m, b)
    y = Relu (z)
}
"""


def model_from_text(text: str) -> ir.Model:
    return ir.from_onnx_text(text)


def fuse_only(*families: str) -> str:
    """`fuse`'s `skip` option that leaves just `families` on."""
    return ",".join(f for f in FAMILIES if f not in families)


@dataclass
class AddToSubPass(Pass):
    """A wrong 'exact' pass: turns every Add into a Sub (for verification and bisection tests)."""

    name = "add-to-sub"
    exact = True
    summary = "test only: breaks the model"

    def __call__(self, model: ir.Model) -> PassResult:
        changed = False
        for node in model.graph:
            if node.op_type == "Add":
                node.op_type = "Sub"
                changed = True
        return PassResult(model, changed)


@dataclass
class DoubleWeightsPass(Pass):
    """A lossy pass: doubles every weight (an exact pass after it keeps its outputs)."""

    name = "double-weights"
    exact = False
    summary = "test only: changes the outputs"

    def __call__(self, model: ir.Model) -> PassResult:
        for value in model.graph.initializers.values():
            value.const_value = ir.tensor(2 * value.const_value.numpy(), name=value.name)
        return PassResult(model, True)


def wide_linear_model(width: int = 64) -> ir.Model:
    """y = x·W with a random [width, width] weight (big enough to go to external data)."""
    import numpy as np
    import onnx

    weight = np.random.default_rng(0).standard_normal((width, width)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "wide",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", width])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", width])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]))


def transformers_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The `new_tokens` tokens a transformers causal LM generates greedily after `prompt`."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    return output[0, len(prompt) :].tolist()


def next_token_nll(model: ir.Model, feeds) -> float:
    """Mean next-token negative log-likelihood (nats/token) of a causal LM over calibration feeds."""
    import numpy as np

    from xopt.backends.onnxruntime import create_session, run
    from xopt.evaluate import log_softmax

    session = create_session(model)
    total, count = 0.0, 0
    for feed in feeds:
        logp = log_softmax(run(session, feed, ["logits"])["logits"])[:, :-1]
        total -= np.take_along_axis(logp, feed["input_ids"][:, 1:, None], axis=-1).sum()
        count += feed["input_ids"].size - 1
    return total / count


def single_matmul(weight: np.ndarray, leading: tuple[str, ...] = ("batch",)) -> ir.Model:
    """y = x·W, x [*leading, K], W a constant [K, N]."""
    x = ir.Value(name="x", shape=ir.Shape([*leading, weight.shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"))
    w.shape, w.dtype = ir.Shape(weight.shape), ir.DataType.FLOAT
    node = ir.node("MatMul", inputs=[x, w], name="linear")
    node.outputs[0].name = "y"
    node.outputs[0].shape, node.outputs[0].dtype = ir.Shape([*leading, weight.shape[1]]), ir.DataType.FLOAT
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 21}, name="single_matmul")
    return ir.Model(graph, ir_version=10)


def weight_chain(weight: np.ndarray, shared: bool = True) -> ir.Model:
    """y = (x·W)·W: two MatMuls reading one constant W [K, K] (as a model that shares layers does),
    or with `shared=False` each its own copy."""
    x = ir.Value(name="x", shape=ir.Shape(["batch", weight.shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    copies = []
    for name in ("w",) if shared else ("w", "w_copy"):
        copies.append(ir.Value(name=name, const_value=ir.tensor(weight.copy(), name=name)))
        copies[-1].shape, copies[-1].dtype = ir.Shape(weight.shape), ir.DataType.FLOAT
    first = ir.node("MatMul", inputs=[x, copies[0]], name="first")
    second = ir.node("MatMul", inputs=[first.outputs[0], copies[-1]], name="second")
    for node, name in ((first, "h"), (second, "y")):
        node.outputs[0].name, node.outputs[0].dtype = name, ir.DataType.FLOAT
        node.outputs[0].shape = ir.Shape(["batch", weight.shape[1]])
    graph = ir.Graph([x], second.outputs, nodes=[first, second], initializers=copies, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def single_gather(table: np.ndarray) -> ir.Model:
    """hidden = E[ids], E a constant [V, d]."""
    ids = ir.Value(name="ids", shape=ir.Shape(["batch", "sequence"]), type=ir.TensorType(ir.DataType.INT64))
    e = ir.Value(name="table", const_value=ir.tensor(table, name="table"))
    e.shape, e.dtype = ir.Shape(table.shape), ir.DataType.FLOAT
    node = ir.node("Gather", inputs=[e, ids], attributes={"axis": 0}, name="embed")
    node.outputs[0].name = "hidden"
    node.outputs[0].shape = ir.Shape(["batch", "sequence", table.shape[1]])
    node.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([ids], node.outputs, nodes=[node], initializers=[e], opset_imports={"": 21}, name="gather")
    model = ir.Model(graph, ir_version=10)
    model.opset_imports["com.microsoft"] = 1
    return model


def tied_embedding_lm(table: np.ndarray) -> ir.Model:
    """logits = E[ids]·Eᵀ: a table E [V, d] that is also the LM head (tied), read through a Transpose."""
    ids = ir.Value(name="ids", shape=ir.Shape(["batch", "sequence"]), type=ir.TensorType(ir.DataType.INT64))
    e = ir.Value(name="table", const_value=ir.tensor(table, name="table"))
    e.shape, e.dtype = ir.Shape(table.shape), ir.DataType.FLOAT
    gather = ir.node("Gather", inputs=[e, ids], attributes={"axis": 0}, name="embed")
    transpose = ir.node("Transpose", inputs=[e], attributes={"perm": [1, 0]}, name="tie")
    head = ir.node("MatMul", inputs=[gather.outputs[0], transpose.outputs[0]], name="lm_head")
    head.outputs[0].name, head.outputs[0].dtype = "logits", ir.DataType.FLOAT
    head.outputs[0].shape = ir.Shape(["batch", "sequence", table.shape[0]])
    opsets = {"": 21, "com.microsoft": 1}
    graph = ir.Graph([ids], head.outputs, nodes=[gather, transpose, head], initializers=[e], opset_imports=opsets)
    return ir.Model(graph, ir_version=10)


def _as_stored(values: np.ndarray) -> np.ndarray:
    """GGUF stores each block's scale and minimum as float16."""
    return values.astype(np.float16).astype(np.float32)


def gguf_like(w_in_out: np.ndarray, kind: str) -> np.ndarray:
    """W [K, N] quantized and dequantized as llama.cpp does: Q4_1 (d·q + m), Q4_0 (d·(q − 8), the
    value of largest magnitude at −8) or Q8_0 (d·q, |q| ≤ 127), blocks of 32 input rows."""
    k, n = w_in_out.shape
    x = w_in_out.T.reshape(n, k // 32, 32).astype(np.float64)
    if kind == "Q4_1":
        low, high = x.min(-1), x.max(-1)
        d, m = _as_stored((high - low) / 15), _as_stored(low)
        restored = d[..., None] * np.clip(np.rint((x - m[..., None]) / d[..., None]), 0, 15) + m[..., None]
    elif kind == "Q4_0":
        largest = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
        d = _as_stored(largest / -8)
        restored = d[..., None] * np.clip(np.rint(x / d[..., None]), -8, 7)
    else:
        d = _as_stored(np.abs(x).max(-1) / 127)
        restored = d[..., None] * np.clip(np.rint(x / d[..., None]), -127, 127)
    return restored.astype(np.float32).reshape(n, k).T


def as_if_from_gguf(model: ir.Model, head_features: int, seed: int = 3) -> list:
    """Puts every linear of `model` on the grid a GGUF conversion leaves (perturbed by N(0, 0.01)
    first): Q4_1, the LM head (`head_features` outputs) Q8_0; returns the linears."""
    from xopt.analysis.patterns import find_linears
    from xopt.rewrite import set_weight, weight_in_out

    rng = np.random.default_rng(seed)
    linears = find_linears(model.graph)
    for linear in linears:
        head = linear.out_features == head_features
        w = weight_in_out(linear) + rng.standard_normal((linear.in_features, linear.out_features)) * 0.01
        set_weight(model.graph, linear, gguf_like(w.astype(np.float32), "Q8_0" if head else "Q4_1"))
    return linears


def spinning_process(seconds: float):
    """A started process that keeps one core busy for `seconds` (join it when done)."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=spin, args=(seconds,))
    process.start()
    return process


def spin(seconds: float) -> None:
    """Keep this thread busy for `seconds`."""
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def torchscript_export(folder, path, causal: bool):
    """A TorchScript export (torch.onnx.export, dynamo=False) of a Hugging Face folder without its
    KV cache, as other tools write them: no shapes inside, Constant nodes, dims read by Shape."""
    import torch
    import transformers

    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(folder, attn_implementation="eager").eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    ids = torch.randint(0, 200, (2, 9))
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        Wrapper().eval(),
        (ids, torch.ones_like(ids)),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input_ids", "attention_mask"],
        output_names=["out"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes},
    )
    return path

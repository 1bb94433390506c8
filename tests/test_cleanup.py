"""The cleanup pass: what it removes, and that outputs do not change."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from helpers import REDUNDANT_MODEL, model_from_text

from xopt.analysis.patterns import match_linear
from xopt.backends.onnxruntime import create_session, run
from xopt.inputs import sample_inputs
from xopt.passes import CleanupPass
from xopt.verify import check_structure, compare


def test_cleanup_removes_noops_constants_duplicates_and_dead_code():
    model = model_from_text(REDUNDANT_MODEL)
    inputs = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    before = run(create_session(model.clone()), inputs)
    result = CleanupPass()(model)
    ops = [n.op_type for n in result.model.graph]
    assert result.modified
    assert "Identity" not in ops and "Sub" not in ops and "Constant" not in ops
    # x+0 and x·1 vanish, the two equal products collapse into one: y = d + d with d = x·4.
    assert ops == ["Mul", "Add"]
    assert result.stats["nodes_removed"] == 10
    check_structure(result.model)
    after = run(create_session(result.model), inputs)
    assert compare(before, after).max_abs == 0.0


# x / √(mean(x²) + ε) with Helium's ε = 1e-8, then a scale of 1 + 2⁻²⁰ and an exact x + 0.
_TINY_CONSTANTS_MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
tiny_constants (float[N, 8] x) => (float[N, 8] y) {
    eps = Constant <value = float {1e-8}> ()
    near_one = Constant <value = float {1.00000095}> ()
    zero = Constant <value = float {0.0}> ()
    last = Constant <value = int64[1] {-1}> ()
    square = Mul (x, x)
    mean = ReduceMean (square, last)
    shifted = Add (mean, eps)
    root = Sqrt (shifted)
    normed = Div (x, root)
    scaled = Mul (near_one, normed)
    y = Add (zero, scaled)
}
"""


def test_cleanup_keeps_a_tiny_epsilon_and_a_scale_near_one():
    """onnxscript's no-op rules match 0 and 1 with a tolerance; cleanup removes exact no-ops only."""
    model = model_from_text(_TINY_CONSTANTS_MODEL)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    x[1] = 0.0  # a zero row (Helium's padding embedding): 0 / √(0 + ε) = 0, NaN without ε
    before = run(create_session(model.clone()), {"x": x})
    CleanupPass()(model)
    assert [n.op_type for n in model.graph] == ["Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    after = run(create_session(model), {"x": x})
    assert np.isfinite(after["y"]).all()
    assert compare(before, after).max_abs == 0.0


def test_cleanup_folds_weight_transposes_whatever_their_size(tiny_model):
    model = tiny_model("llama").clone()
    transposed_weights = [n for n in model.graph if n.op_type == "Transpose" and n.inputs[0].const_value is not None]
    assert transposed_weights, "the dynamo export stores linear weights as [out, in] behind a Transpose"
    inputs = sample_inputs(model, padded=True)
    before = run(create_session(model.clone()), inputs)
    CleanupPass(fold_input_limit=16)(model)
    left = [n for n in model.graph if n.op_type == "Transpose" and n.inputs[0].const_value is not None]
    # Only the tied LM head's Transpose(E) stays: folding it would store the embedding table twice.
    assert [n.inputs[0].name for n in left] == ["inner.lm_head.weight"]
    assert [n.op_type for n, _ in left[0].inputs[0].uses()] == ["Gather", "Transpose"]
    parity = compare(before, run(create_session(model), inputs))
    assert parity.within(1e-5), parity.describe()


def test_gpt2_conv1d_gemms_become_matmuls_without_their_reshapes(tiny_model):
    """GPT-2's Conv1D exports as Reshape → Gemm → Reshape: each becomes MatMul + Add on the 3-D
    input, the same products (Gemm adds its bias first, so the last bit may differ), and every pass
    reads it as a linear."""
    model = tiny_model("gpt2").clone()
    gemms = sum(n.op_type == "Gemm" for n in model.graph)
    reshapes = sum(n.op_type == "Reshape" for n in model.graph)
    inputs = sample_inputs(model, batch=2, sequence=5, padded=True)
    before = run(create_session(model.clone()), inputs)
    result = CleanupPass()(model)
    assert gemms == 8 and result.stats["gemm_linears_to_matmul"] == gemms
    assert "Gemm" not in {n.op_type for n in model.graph}
    assert reshapes - sum(n.op_type == "Reshape" for n in model.graph) >= 2 * gemms
    linears = [linear for n in model.graph if (linear := match_linear(n)) is not None]
    assert sum(len(linear.input.shape) == 3 and linear.bias is not None for linear in linears) == gemms
    assert compare(before, run(create_session(model), inputs)).within(1e-6)


GEMMS = """
<ir_version: 10, opset_import: ["" : 20]>
gemms (float[N, 4] x) => (float[N, 3] y, float[N, 3] z, float[N, 3] s)
<float[3, 4] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, float[3] b = {0.5, -0.5, 0.25},
 float[4, 3] v = {1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0}>
{
    y = Gemm <transB = 1> (x, w, b)
    z = Gemm (x, v)
    s = Gemm <transB = 1, alpha = 2.0> (x, w, b)
}
"""


def test_a_gemm_linear_becomes_matmul_and_a_scaled_one_stays():
    model = model_from_text(GEMMS)
    inputs = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    before = run(create_session(model.clone()), inputs)
    result = CleanupPass()(model)
    assert result.stats["gemm_linears_to_matmul"] == 2
    assert sorted(n.op_type for n in model.graph) == ["Add", "Gemm", "MatMul", "MatMul"]
    assert compare(before, run(create_session(model), inputs)).within(1e-6)


def test_a_weight_stored_again_transposed_is_read_as_a_transpose():
    """A tied head written out as its own Eᵀ beside the table E (TorchScript); another weight of
    the same shape that is not Eᵀ is kept."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((256, 8)).astype(np.float32)
    other = rng.standard_normal((8, 256)).astype(np.float32)
    other[0] = table[:, 0]  # a column of the table as its first row: only the full comparison tells
    weights = {"table": table, "head": np.ascontiguousarray(table.T), "other": other}
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 20]>
        tied (int64[N] ids, float[256, 8] table, float[8, 256] head, float[8, 256] other)
            => (float[N, 256] logits, float[N, 256] scores) {
            x = Gather (table, ids)
            logits = MatMul (x, head)
            scores = MatMul (x, other)
        }
        """
    )
    for value in list(model.graph.inputs):
        if value.name in weights:
            model.graph.inputs.remove(value)
            value.const_value = ir.tensor(weights[value.name], name=value.name)
            model.graph.register_initializer(value)
    inputs = {"ids": np.array([3, 0, 255], dtype=np.int64)}
    before = run(create_session(model.clone()), inputs)
    result = CleanupPass()(model)
    assert result.stats["transposed_duplicates_shared"] == 1
    assert sorted(result.model.graph.initializers) == ["other", "table"]
    transpose = next(n for n in result.model.graph if n.op_type == "Transpose")
    assert transpose.inputs[0].name == "table"
    assert compare(before, run(create_session(result.model), inputs)).max_abs == 0.0

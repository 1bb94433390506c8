"""Weights that came on a quantization grid (a model converted from a GGUF file) keep it exactly."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import single_gather, single_matmul

from xopt.analysis.patterns import find_linears
from xopt.backends.onnxruntime import create_session
from xopt.passes import QuantizeWeightsPass
from xopt.passes.source_grid import lies_on_grid, source_grid
from xopt.pipeline import PassManager, resolve_passes
from xopt.rewrite import set_weight, weight_in_out


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


@pytest.mark.parametrize(
    ("kind", "bits", "form"), [("Q4_1", 4, "offset"), ("Q4_0", 4, "symmetric"), ("Q8_0", 8, "restricted symmetric")]
)
def test_a_gguf_grid_is_found_and_reproduced_exactly(kind, bits, form):
    rng = np.random.default_rng(0)
    w = gguf_like(rng.standard_normal((96, 40)).astype(np.float32) * 0.05, kind)
    grid = source_grid(w, bits)
    assert grid is not None and grid.form == form
    assert (grid.offset is not None) == (form == "offset")
    np.testing.assert_allclose(grid.restored(), w, rtol=0, atol=1e-7 * np.abs(w).max())
    assert lies_on_grid(w)


def test_weights_off_any_grid_are_not_taken_for_one():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    assert not lies_on_grid(w)
    assert source_grid(gguf_like(w, "Q8_0"), 4) is None  # an 8-bit grid is not a 4-bit one
    nearly = gguf_like(w, "Q4_1")
    nearly[5, 7] += 0.1 * np.abs(nearly).max() / 15  # one value a tenth of a step off its grid
    assert source_grid(nearly, 4) is None
    assert source_grid(w[:80], 4) is None  # K not a multiple of the block


def test_a_q8_0_embedding_table_keeps_its_grid():
    from xopt.analysis.patterns import match_embedding
    from xopt.passes.gather_quantized import lower_gather

    table = gguf_like(np.random.default_rng(5).standard_normal((64, 50)).astype(np.float32), "Q8_0").T  # [V, d]
    model = single_gather(table)
    embedding = match_embedding(next(iter(model.graph)))
    _, _, error, origin = lower_gather(model.graph, embedding, 8, 32, "hqq")
    assert origin == "its own restricted symmetric grid" and error < 1e-7
    ids = np.array([[3, 49, 0, 3]], dtype=np.int64)
    (actual,) = create_session(model).run(None, {"ids": ids})
    np.testing.assert_allclose(actual, table[ids], rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_a_q4_1_weight_is_lowered_with_its_offsets_and_computes_x_times_w(method):
    """MatMulNBits on the codes plus the input's block sums times the offsets equals x·W to float
    rounding (accuracy level 0), whatever the method; without source_grid it is re-quantized."""
    rng = np.random.default_rng(2)
    weight = gguf_like(rng.standard_normal((96, 24)).astype(np.float32) * 0.05, "Q4_1")
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    model = single_matmul(weight, leading=("batch", "sequence"))
    result = QuantizeWeightsPass(method=method, accuracy="0", head_bits=4)(model.clone())
    assert sorted(n.op_type for n in result.model.graph) == ["Add", "MatMul", "MatMulNBits", "ReduceSum", "Reshape"]
    assert result.stats["mean_relative_error"] < 1e-6
    assert "1 linear → 4-bit on its own offset grid (a quantized source), relative error ≤ 0.0000" in result.explain
    (actual,) = create_session(result.model).run(None, {"x": x})
    expected = x.astype(np.float64) @ weight
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())

    unknown_rank = single_matmul(weight, leading=("batch", "sequence"))
    unknown_rank.graph.inputs[0].shape = None  # the block sums then come from x·B, B the block indicator
    result = QuantizeWeightsPass(method=method, accuracy="0", head_bits=4)(unknown_rank)
    assert sorted(n.op_type for n in result.model.graph) == ["Add", "MatMul", "MatMul", "MatMulNBits"]
    (actual,) = create_session(result.model).run(None, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())

    requantized = QuantizeWeightsPass(method=method, accuracy="0", head_bits=4, source_grid=False)
    result = requantized(model)
    assert [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    assert result.stats["mean_relative_error"] > 1e-3


def test_a_model_converted_from_gguf_keeps_its_grids_through_the_int4_passes(tiny_model):
    """A Qwen2 whose linears carry Q4_1 grids (the LM head Q8_0), as a GGUF conversion leaves them:
    fold-norms keeps γ in the norms, the recipe's optional rotation steps aside, and quantize keeps
    every grid, so the int4 model computes what the float one does."""
    model = tiny_model("qwen2").clone()
    rng = np.random.default_rng(3)
    linears = find_linears(model.graph)
    for linear in linears:
        head = linear.out_features == 211
        w = weight_in_out(linear) + rng.standard_normal((linear.in_features, linear.out_features)) * 0.01
        set_weight(model.graph, linear, gguf_like(w.astype(np.float32), "Q8_0" if head else "Q4_1"))
    passes = ["cleanup", "fold-norms", "rotate(optional=true)", "quantize(head_bits=8,symmetric=measure,accuracy=0)"]
    _, report = PassManager(resolve_passes(passes=passes))(model)
    _, fold, rotate, quantize = report.passes
    assert fold.stats.get("norms_folded", 0) == 0
    assert any("lies on a quantization grid" in line for line in fold.explain)
    assert rotate.explain[0].startswith("not rotated:") and "quantization grid" in rotate.explain[0]
    assert quantize.stats["linears_quantized"] == len(linears)
    assert quantize.stats["mean_relative_error"] < 1e-6
    kept = [line for line in quantize.explain if "on its own" in line]  # one line per grid form
    assert kept == [
        f"{len(linears) - 1} linears → 4-bit on its own offset grid (a quantized source), relative error ≤ 0.0000",
        "1 linear → 8-bit on its own restricted symmetric grid (a quantized source), relative error ≤ 0.0000",
    ]
    assert quantize.parity.max_rel <= 1e-4, quantize.parity.describe()


def test_gptq_calibrates_the_linears_off_a_grid_before_the_others_are_lowered(tiny_model):
    """Only the LM head is off a grid: GPTQ's calibration run reads the float model, whose other
    linears are lowered to their grids after it (not before, when their inputs are gone)."""
    model = tiny_model("qwen2").clone()
    linears = find_linears(model.graph)
    for linear in linears:
        if linear.out_features != 211:
            set_weight(model.graph, linear, gguf_like(weight_in_out(linear).astype(np.float32), "Q4_1"))
    result = QuantizeWeightsPass(method="gptq", windows=1, head_bits=4, accuracy="0")(model)
    assert result.stats["linears_quantized"] == len(linears)
    kept = f"{len(linears) - 1} linears → 4-bit on its own offset grid (a quantized source), relative error ≤ 0.0000"
    assert kept in result.explain

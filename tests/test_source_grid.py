"""Weights that came on a quantization grid (a model converted from a GGUF file) keep it: their codes
and scales exactly, a Q4_1 grid's offsets exactly or folded into zero points (`grid_offsets`)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from helpers import as_if_from_gguf, gguf_like, single_gather, single_matmul, tied_embedding_lm

import xopt.passes.quantize as quantize_module
from xopt.analysis.patterns import find_linears
from xopt.backends.onnxruntime import create_session
from xopt.passes import QuantizeWeightsPass
from xopt.passes.grid_offsets import fold_offsets
from xopt.passes.source_grid import lies_on_grid, source_grid
from xopt.pipeline import PassManager, resolve_passes
from xopt.rewrite import set_weight, weight_in_out


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
    from xopt.passes.gather_quantized import lower_gather, quantize_table

    table = gguf_like(np.random.default_rng(5).standard_normal((64, 50)).astype(np.float32), "Q8_0").T  # [V, d]
    model = single_gather(table)
    embedding = match_embedding(next(iter(model.graph)))
    quantized = quantize_table(table, 8, 32, "hqq")
    lower_gather(model.graph, embedding, quantized)
    assert quantized.origin == "its own restricted symmetric grid" and quantized.error < 1e-7
    assert [n.op_type for n in model.graph] == ["Gather", "Cast", "Gather", "Mul", "Reshape"]  # no zero points
    assert model.graph.node(0).inputs[0].const_value.dtype == ir.DataType.INT8
    ids = np.array([[3, 49, 0, 3]], dtype=np.int64)
    (actual,) = create_session(model).run(None, {"ids": ids})
    np.testing.assert_allclose(actual, table[ids], rtol=0, atol=1e-7)


def test_a_tied_q8_0_table_is_stored_once_with_its_8_bit_head():
    """SmolLM2's tied table came as Q8_0: the 8-bit head and the table both keep that grid, and the
    gather reads the head's codes and scales, so the table is stored once, a byte a weight (plus a
    float scale per 32), and the rows it gathers are the table's own to the bit."""
    table = gguf_like(np.random.default_rng(6).standard_normal((64, 50)).astype(np.float32), "Q8_0").T  # [V, d]
    results = [
        QuantizeWeightsPass(method="hqq", embedding_bits=bits, accuracy="0")(tied_embedding_lm(table))
        for bits in (8, 0)
    ]
    graph, stats = results[0].model.graph, results[0].stats
    (head,) = [n for n in graph if n.op_type == "MatMulNBits"]
    codes_gathered = next(n.inputs[0] for n in graph if n.op_type == "Gather")
    assert codes_gathered is head.inputs[1]  # one initializer, read by both
    assert stats["bytes_before"] == table.nbytes  # one float tensor, counted once
    stored = sum(v.const_value.nbytes for v in graph.initializers.values())
    assert stats["bytes_after"] == stored <= table.size + table.size // 32 * 4 + 64
    assert any(line.endswith("read from the tied LM head's codes (stored once)") for line in results[0].explain)
    ids = np.array([[3, 49, 0, 3], [7, 7, 12, 1]], dtype=np.int64)
    logits = [create_session(result.model).run(None, {"ids": ids})[0] for result in results]
    np.testing.assert_array_equal(logits[0], logits[1])  # the gathered rows: the float table's exactly
    expected = table.astype(np.float64)[ids] @ table.T.astype(np.float64)
    np.testing.assert_allclose(logits[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_tied_table_gathered_by_ids_of_unknown_rank_keeps_codes_of_its_own():
    """Ids of unknown rank take GatherBlockQuantized, which cannot read the head's layout: the table
    is stored on its own (no error), and still returns its rows."""
    table = gguf_like(np.random.default_rng(6).standard_normal((64, 50)).astype(np.float32), "Q8_0").T
    model = tied_embedding_lm(table)
    model.graph.inputs[0].shape = None
    result = QuantizeWeightsPass(method="hqq", embedding_bits=8, accuracy="0")(model)
    assert [n.op_type for n in result.model.graph if n.domain == "com.microsoft"] == [
        "GatherBlockQuantized",
        "MatMulNBits",
    ]
    assert not any("read from the tied LM head's codes" in line for line in result.explain)
    ids = np.array([[3, 49, 0, 3]], dtype=np.int64)
    (logits,) = create_session(result.model).run(None, {"ids": ids})
    expected = table.astype(np.float64)[ids] @ table.T.astype(np.float64)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_folded_offsets_are_integer_zero_points_and_a_residual_within_a_fraction_of_a_step():
    """c = s·(8 − z) + ρ with z an integer code and |ρ| ≤ s/2; ρ kept on a 4-bit grid of its own per
    column (range(ρ) ≤ max s, so within max s/30) and what that leaves on another, so each computed
    offset is within max s/(2·15²) of the exact one; every row set but the last is padded to whole
    blocks, and the weight codes are the grid's own."""
    rng = np.random.default_rng(4)
    grid = source_grid(gguf_like(rng.standard_normal((1536, 40)).astype(np.float32) * 0.05, "Q4_1"), 4)
    codes, scale, zero, computed = fold_offsets(grid)
    blocks = 1536 // 32  # 48 block sums: 2 blocks of rows per set, the first set padded to 64 rows
    assert codes.shape == (40, 1536 + 64 + blocks) and scale.shape == zero.shape == (40, blocks + 2 + 2)
    np.testing.assert_array_equal(codes[:, :1536], grid.codes)
    np.testing.assert_array_equal(scale[:, :blocks], grid.scale)
    assert np.all(zero == np.rint(zero)) and zero.min() >= 0 and zero.max() <= 15
    residual = grid.offset - grid.scale * (8 - zero[:, :blocks])
    assert np.all(np.abs(residual) <= grid.scale / 2 * (1 + 1e-12))
    error = np.abs(computed.offset - grid.offset)
    assert np.all(error <= grid.scale.max(axis=1, keepdims=True) / 450 * (1 + 1e-9))
    assert error.max() > 0  # the residual is rounded: folded is near-exact, not exact


@pytest.mark.parametrize("method", ["rtn", "hqq"])
@pytest.mark.parametrize(
    ("source", "ops", "ops_of_unknown_rank"),
    [
        (True, ["Concat", "MatMulNBits", "Pad", "ReduceSum", "Reshape"], ["Concat", "MatMul", "MatMulNBits"]),
        ("exact", ["Add", "MatMul", "MatMulNBits", "ReduceSum", "Reshape"], ["Add", "MatMul", "MatMul", "MatMulNBits"]),
    ],
)
def test_a_q4_1_weight_keeps_its_grid_and_computes_what_the_grid_does(method, source, ops, ops_of_unknown_rank):
    """Whatever the method, the grid's codes and scales are kept and the offsets lowered: folded
    (zero points + the block sums' rows) computes x·Ŵ with Ŵ the folded grid's weight, exact x·W,
    to float rounding (accuracy level 0), also where the block sums come from x·B (input rank
    unknown); without source_grid the weight is re-quantized."""
    rng = np.random.default_rng(2)
    weight = gguf_like(rng.standard_normal((96, 24)).astype(np.float32) * 0.05, "Q4_1")
    computes = weight.astype(np.float64) if source == "exact" else fold_offsets(source_grid(weight, 4))[3].restored()
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    expected = x.astype(np.float64) @ computes
    relative = np.linalg.norm(computes - weight) / np.linalg.norm(weight)
    assert relative < (1e-7 if source == "exact" else 1e-3)  # one set of rows: 5e-3; re-quantizing: > 5e-2
    quantize = QuantizeWeightsPass(method=method, accuracy="0", head_bits=4, source_grid=source)
    for model, want in (
        (single_matmul(weight, leading=("batch", "sequence")), ops),
        (single_matmul(weight, leading=("batch", "sequence")), ops_of_unknown_rank),
    ):
        if want is ops_of_unknown_rank:
            model.graph.inputs[0].shape = None
        result = quantize(model)
        assert sorted(n.op_type for n in result.model.graph) == want
        assert result.stats["mean_relative_error"] == pytest.approx(relative, rel=1e-6, abs=1e-12)
        (actual,) = create_session(result.model).run(None, {"x": x})
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    offsets = "offsets exact" if source == "exact" else "offsets folded into zero points"
    line = f"1 linear → 4-bit on its own offset grid (a quantized source), {offsets}, relative error ≤ {relative:.4f}"
    assert line in result.explain

    requantized = QuantizeWeightsPass(method=method, accuracy="0", head_bits=4, source_grid=False)
    result = requantized(single_matmul(weight, leading=("batch", "sequence")))
    assert [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    assert result.stats["mean_relative_error"] > 1e-3


def test_block_sums_that_fill_whole_blocks_are_read_without_padding():
    """K/g a multiple of g (1024 inputs: 32 block sums): each set of rows starts on a block
    boundary without a Pad, and the model computes the folded grid's x·Ŵ."""
    rng = np.random.default_rng(5)
    weight = gguf_like(rng.standard_normal((1024, 8)).astype(np.float32) * 0.05, "Q4_1")
    x = rng.standard_normal((2, 3, 1024)).astype(np.float32)
    expected = x.astype(np.float64) @ fold_offsets(source_grid(weight, 4))[3].restored()
    quantize = QuantizeWeightsPass(method="rtn", accuracy="0", head_bits=4)
    result = quantize(single_matmul(weight, leading=("batch", "sequence")))
    assert sorted(n.op_type for n in result.model.graph) == ["Concat", "MatMulNBits", "ReduceSum", "Reshape"]
    (actual,) = create_session(result.model).run(None, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_model_converted_from_gguf_keeps_its_grids_through_the_int4_passes(tiny_model):
    """A Qwen2 whose linears carry Q4_1 grids (the LM head Q8_0), as a GGUF conversion leaves them:
    fold-norms keeps γ in the norms, the recipe's optional rotation steps aside, and quantize keeps
    every grid, so the int4 model computes what the float one does."""
    model = tiny_model("qwen2").clone()
    linears = as_if_from_gguf(model, head_features=211)
    passes = ["cleanup", "fold-norms", "rotate(optional=true)", "quantize(head_bits=8,symmetric=measure,accuracy=0)"]
    _, report = PassManager(resolve_passes(passes=passes))(model.clone())
    _, fold, rotate, quantize = report.passes
    assert fold.stats.get("norms_folded", 0) == 0
    assert any("lies on a quantization grid" in line for line in fold.explain)
    assert rotate.explain[0].startswith("not rotated:") and "quantization grid" in rotate.explain[0]
    assert quantize.stats["linears_quantized"] == len(linears)
    kept = [line for line in quantize.explain if "on its own" in line]  # one line per grid form
    q4_1 = f"{len(linears) - 1} linears → 4-bit on its own offset grid (a quantized source), offsets"
    q8_0 = "1 linear → 8-bit on its own restricted symmetric grid (a quantized source)"
    assert kept[1] == f"{q8_0}, relative error ≤ 0.0000"
    assert kept[0].startswith(f"{q4_1} folded into zero points") and quantize.stats["mean_relative_error"] < 1e-2
    assert quantize.parity.max_rel <= 2e-2, quantize.parity.describe()

    passes[-1] = passes[-1].replace(")", ",source_grid=exact)")
    _, report = PassManager(resolve_passes(passes=passes))(model)
    quantize = report.passes[-1]
    assert quantize.stats["mean_relative_error"] < 1e-6
    assert f"{q4_1} exact, relative error ≤ 0.0000" in quantize.explain
    assert quantize.parity.max_rel <= 1e-4, quantize.parity.describe()


def test_gptq_calibrates_the_linears_off_a_grid_before_the_others_are_lowered(tiny_model, monkeypatch):
    """Only the LM head is off a grid: GPTQ's calibration run reads the float model, whose other
    linears are lowered to their grids after it (not before, when their inputs are gone), and
    probes the head's input alone. The forms on a grid are computed once, for the symmetry's two
    timed copies and the model alike."""
    model = tiny_model("qwen2").clone()
    linears = find_linears(model.graph)
    for linear in linears:
        if linear.out_features != 211:
            set_weight(model.graph, linear, gguf_like(weight_in_out(linear).astype(np.float32), "Q4_1"))
    (head_input,) = [linear.input.name for linear in linears if linear.out_features == 211]
    probed, kept_forms = [], Counter()
    second_moments, source_grid_form = quantize_module.second_moments, quantize_module._source_grid_form

    def probing(model, values, *args, **kwargs):
        probed.append([value.name for value in values])
        return second_moments(model, values, *args, **kwargs)

    def counting(grid, exact):
        kept_forms[grid.codes.tobytes()] += 1
        return source_grid_form(grid, exact)

    monkeypatch.setattr(quantize_module, "second_moments", probing)
    monkeypatch.setattr(quantize_module, "_source_grid_form", counting)
    result = QuantizeWeightsPass(method="gptq", windows=1, head_bits=4, symmetric="measure")(model)
    assert result.stats["linears_quantized"] == len(linears)
    kept = f"{len(linears) - 1} linears → 4-bit on its own offset grid (a quantized source), offsets folded"
    assert any(line.startswith(kept) for line in result.explain)
    assert probed == [[head_input]]
    assert any(line.startswith("zero points kept") or line.startswith("symmetric grids") for line in result.explain)
    assert len(kept_forms) == len(linears) - 1 and set(kept_forms.values()) == {1}

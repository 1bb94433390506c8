"""`keep-grids`: linears whose weights lie on a 4-bit grid (a model converted from a GGUF file) are
stored on it and computed in float, to float rounding of the float model."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import as_if_from_gguf, gguf_like, single_matmul, weight_chain

from xopt.analysis.patterns import find_linears
from xopt.backends.onnxruntime import create_session
from xopt.errors import XoptError
from xopt.inputs import sample_inputs
from xopt.passes import KeepGridsPass
from xopt.passes.source_grid import source_grid
from xopt.pipeline import PassManager, resolve_passes


@pytest.mark.parametrize(
    ("kind", "ops"), [("Q4_1", ["Add", "MatMul", "MatMulNBits", "ReduceSum", "Reshape"]), ("Q4_0", ["MatMulNBits"])]
)
def test_a_weight_on_a_4_bit_grid_is_stored_on_it_and_computes_the_float_product(kind, ops):
    rng = np.random.default_rng(0)
    weight = gguf_like(rng.standard_normal((128, 48)).astype(np.float32) * 0.05, kind)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    expected = x.astype(np.float64) @ weight.astype(np.float64)
    result = KeepGridsPass()(single_matmul(weight, leading=("batch", "sequence")))
    graph = result.model.graph
    assert sorted(n.op_type for n in graph) == ops
    matmul = next(n for n in graph if n.op_type == "MatMulNBits")
    assert matmul.attributes.get_int("accuracy_level") == 0 and matmul.attributes.get_int("bits") == 4
    assert result.stats["linears_kept"] == 1 and result.stats["bytes_after"] < result.stats["bytes_before"] / 4
    (actual,) = create_session(result.model).run(None, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_q4_1_zero_points_are_integers_and_leave_the_float_term_under_half_a_step():
    """The offset grid's float offsets c go into integer zero points z and a float residual ρ with
    c = s·(8 − z) + ρ exactly and |ρ| ≤ s/2: the float term stays small."""
    from xopt.passes.grid_offsets import integer_zero_points

    grid = source_grid(gguf_like(np.random.default_rng(1).standard_normal((256, 40)) * 0.05, "Q4_1"), 4)
    zero, residual = integer_zero_points(grid)
    assert np.all(zero == np.rint(zero)) and zero.min() >= 0 and zero.max() <= 15
    np.testing.assert_array_equal(grid.scale * (8 - zero) + residual, grid.offset)
    assert np.all(np.abs(residual) <= grid.scale / 2 * (1 + 1e-12))


def test_a_model_converted_from_gguf_keeps_its_grids_after_the_exact_recipe(tiny_model):
    """A Qwen2 whose linears carry Q4_1 grids and whose LM head a Q8_0 one: after the exact recipe
    (fold-norms leaves γ where the grids are), every 4-bit linear is stored on its grid, the head
    stays float, and the outputs are the float model's to float rounding."""
    model = tiny_model("qwen2").clone()
    as_if_from_gguf(model, head_features=211)
    feeds = sample_inputs(model, batch=2, sequence=7)
    (expected, *_) = create_session(model).run(None, feeds)

    optimized, report = PassManager(resolve_passes(passes="cleanup,fold-norms,fuse,keep-grids"))(model)
    keep = report.passes[-1]
    nbits = [n for n in optimized.graph if n.op_type == "MatMulNBits"]
    assert keep.stats["linears_kept"] == len(nbits) > 0
    assert [line for line in keep.explain if "offset grid" in line] == [
        f"{len(nbits)} linears → 4-bit on their own offset grid, MatMulNBits at accuracy level 0, offsets exact"
    ]
    heads = [linear for linear in find_linears(optimized.graph) if linear.out_features == 211]
    assert len(heads) == 1 and heads[0].node.op_type == "MatMul"  # the Q8_0 head stays float
    assert keep.parity.max_rel <= 1e-5 and keep.parity.top1_agreement == 1.0, keep.parity.describe()
    (actual, *_) = create_session(optimized).run(None, feeds)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_model_with_no_weight_on_a_grid_is_refused(tiny_model):
    with pytest.raises(XoptError, match="keep-grids: no linear's weight lies on a 4-bit grid"):
        KeepGridsPass()(tiny_model("llama").clone())


def test_a_weight_read_by_two_matmuls_is_stored_once():
    """Both MatMuls read one copy of the codes, scales, zero points and offsets; the bytes before
    and after count each weight once."""
    weight = gguf_like(np.random.default_rng(4).standard_normal((64, 64)).astype(np.float32) * 0.05, "Q4_1")
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ weight @ weight
    result = KeepGridsPass()(weight_chain(weight))
    nbits = [n for n in result.model.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and [v.name for v in nbits[0].inputs[1:]] == [v.name for v in nbits[1].inputs[1:]]
    offsets = {n.inputs[1].name for n in result.model.graph if n.op_type == "MatMul"}
    assert offsets == {"w_offsets"} and "w" not in result.model.graph.initializers
    stored = sum(v.const_value.nbytes for v in result.model.graph.initializers.values())
    assert result.stats["bytes_before"] == weight.nbytes and result.stats["bytes_after"] == stored
    assert result.stats["linears_kept"] == 2
    (actual,) = create_session(result.model).run(None, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_quantize_after_keep_grids_takes_only_the_float_linears_and_leaves_the_kept_ones_exact(tiny_model, tmp_path):
    """Saved and loaded between the passes: `quantize` takes the Q8_0 head (on its own grid) and
    neither re-quantizes the offset terms' float MatMuls nor moves the kept linears off level 0."""
    import xopt

    model = tiny_model("qwen2").clone()
    as_if_from_gguf(model, head_features=211)
    kept, _ = PassManager(resolve_passes(passes="cleanup,keep-grids"))(model)
    xopt.save(kept, tmp_path / "kept.onnx")
    offsets = sorted(n.inputs[1].name for n in kept.graph if n.op_type == "MatMul" and n.name.endswith("offset_term"))
    assert offsets and [linear.out_features for linear in find_linears(kept.graph)] == [211]

    quantized, report = PassManager(resolve_passes(passes="quantize(method=rtn,accuracy=4)"))(
        xopt.load(tmp_path / "kept.onnx")
    )
    assert report.passes[-1].stats["linears_quantized"] == 1
    levels = {n.name: n.attributes.get_int("accuracy_level") for n in quantized.graph if n.op_type == "MatMulNBits"}
    head = [name for name, level in levels.items() if level == 4]
    assert (
        len(head) == 1
        and len(levels) == len(offsets) + 1
        and all(level == 0 for name, level in levels.items() if name not in head)
    )
    assert offsets == sorted(
        n.inputs[1].name for n in quantized.graph if n.op_type == "MatMul" and n.name.endswith("offset_term")
    )

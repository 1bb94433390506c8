"""Shapes a TorchScript export leaves to be computed: inferred, folded where static, copied where
a Reshape keeps its input's dims; and the norm it writes with `Div(1, Sqrt)`."""

from __future__ import annotations

import logging

import numpy as np
from helpers import model_from_text

import xopt.passes.missing_shapes as missing_shapes
from xopt.analysis.patterns import match_norm
from xopt.backends.onnxruntime import create_session, run
from xopt.passes import CleanupPass
from xopt.verify import compare

# x.view(x.size(0), x.size(1), 4, 12).transpose(1, 2), a rotary-style half of the head size, and
# GPT-2's 1/√d from Shape(q)[-1:]; no value inside has a shape, as TorchScript writes it.
_TORCHSCRIPT_HEADS = """
<ir_version: 10, opset_import: ["" : 18]>
heads (float[batch, sequence, 48] x) => (float[batch, 4, sequence, 6] half, float[batch, 4, sequence, 12] scaled) {
    zero = Constant <value = int64 {0}> ()
    one = Constant <value = int64 {1}> ()
    three = Constant <value = int64 {3}> ()
    two = Constant <value = int64 {2}> ()
    axis0 = Constant <value = int64[1] {0}> ()
    axis3 = Constant <value = int64[1] {3}> ()
    last = Constant <value = int64[1] {-1}> ()
    end = Constant <value = int64[1] {9223372036854775807}> ()
    split = Constant <value = int64[2] {4, 12}> ()
    shape = Shape (x)
    b = Gather (shape, zero)
    s = Gather (shape, one)
    b1 = Unsqueeze (b, axis0)
    s1 = Unsqueeze (s, axis0)
    target = Concat <axis = 0> (b1, s1, split)
    heads = Reshape (x, target)
    q = Transpose <perm = [0, 2, 1, 3]> (heads)
    q_shape = Shape (q)
    d = Gather (q_shape, three)
    h = Div (d, two)
    h1 = Unsqueeze (h, axis0)
    half = Slice (q, axis0, h1, axis3)
    d_last = Slice (q_shape, last, end)
    d_float = Cast <to = 1> (d_last)
    root = Sqrt (d_float)
    scaled = Div (q, root)
}
"""


def test_a_torchscript_head_split_loses_its_shape_computations():
    model = model_from_text(_TORCHSCRIPT_HEADS)
    inputs = {"x": np.random.default_rng(0).standard_normal((2, 5, 48)).astype(np.float32)}
    before = run(create_session(model.clone()), inputs)
    result = CleanupPass()(model)
    assert result.stats["shapes_inferred"] > 0
    assert result.stats["static_shape_dims_folded"] == 2  # the head size, and Shape(q)[-1:]
    assert result.stats["reshape_dims_copied"] == 1
    ops = [n.op_type for n in result.model.graph]
    assert "Shape" not in ops and "Gather" not in ops
    reshape = next(n for n in result.model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, 0, 4, 12]
    after = run(create_session(result.model), inputs)
    assert compare(before, after).max_abs == 0.0


def test_a_dim_of_another_size_is_not_copied():
    """The target reads y's dims, and y is [batch, 48, 48]: its axis 1 is not x's."""
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    other (float[batch, sequence, 48] x, float[batch, 48, 48] y) => (float[batch, 48, 4, 12] z) {
        zero = Constant <value = int64 {0}> ()
        one = Constant <value = int64 {1}> ()
        axis0 = Constant <value = int64[1] {0}> ()
        split = Constant <value = int64[2] {4, 12}> ()
        shape = Shape (y)
        b = Gather (shape, zero)
        s = Gather (shape, one)
        b1 = Unsqueeze (b, axis0)
        s1 = Unsqueeze (s, axis0)
        target = Concat <axis = 0> (b1, s1, split)
        z = Reshape (x, target)
    }
    """
    result = CleanupPass()(model_from_text(text))
    reshape = next(n for n in result.model.graph if n.op_type == "Reshape")
    assert result.stats["reshape_dims_copied"] == 1  # the batch only
    assert reshape.inputs[1].const_value.numpy().tolist() == [0, 48, 4, 12]


def test_a_flatten_of_the_last_two_axes_copies_the_leading_dims():
    """`x.flatten(-2)` as TorchScript writes it, Reshape(x, Concat(Shape(x)[:-2], [-1])): the
    leading dims are x's own, so the target is [0, 0, 0, -1] (GPT-J's interleaved rotary pairs);
    a slice with a dim that is neither x's nor a number is kept."""
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    flat (float[batch, sequence, 4, 3, 2] x, float[batch, other, 4, 3, 2] y)
        => (float[batch, sequence, 4, 6] z, float[batch, sequence, 4, 6] w) {
        start = Constant <value = int64[1] {0}> ()
        end = Constant <value = int64[1] {-2}> ()
        last = Constant <value = int64[1] {-1}> ()
        x_shape = Shape (x)
        leading = Slice (x_shape, start, end)
        target = Concat <axis = 0> (leading, last)
        z = Reshape (x, target)
        y_shape = Shape (y)
        others = Slice (y_shape, start, end)
        other_target = Concat <axis = 0> (others, last)
        w = Reshape (x, other_target)
    }
    """
    model = model_from_text(text)
    inputs = {name: np.random.default_rng(0).standard_normal((2, 5, 4, 3, 2)).astype(np.float32) for name in "xy"}
    before = run(create_session(model.clone()), inputs)
    result = CleanupPass()(model)
    assert result.stats["reshape_dims_copied"] == 1
    targets = [n.inputs[1] for n in result.model.graph if n.op_type == "Reshape"]
    assert [t.const_value.numpy().tolist() for t in targets if t.const_value is not None] == [[0, 0, 0, -1]]
    assert compare(before, run(create_session(result.model), inputs)).max_abs == 0.0


def test_shapes_stay_unknown_where_the_inference_fails(monkeypatch, caplog):
    def failing(*args, **kwargs):
        raise RuntimeError("Incomplete symbolic shape inference")

    monkeypatch.setattr(missing_shapes.SymbolicShapeInference, "infer_shapes", failing)
    model = model_from_text(_TORCHSCRIPT_HEADS)
    inputs = {"x": np.random.default_rng(0).standard_normal((2, 5, 48)).astype(np.float32)}
    before = run(create_session(model.clone()), inputs)
    with caplog.at_level(logging.INFO, logger="xopt.passes.missing_shapes"):
        result = CleanupPass()(model)
    assert "shapes_inferred" not in result.stats
    assert "Incomplete symbolic shape inference" in caplog.text
    assert compare(before, run(create_session(result.model), inputs)).max_abs == 0.0


def test_an_rms_norm_written_with_one_over_its_root_is_a_norm():
    """TorchScript exports `x · torch.rsqrt(mean(x²) + ε)` as Mul(x, Div(1, Sqrt(·)))."""
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    rms (float[N, 8] x) => (float[N, 8] y) {
        two = Constant <value = float {2.0}> ()
        last = Constant <value = int64[1] {-1}> ()
        eps = Constant <value = float {1e-6}> ()
        unit = Constant <value = float {1.0}> ()
        gamma = Constant <value = float[8] {1, 2, 3, 4, 5, 6, 7, 8}> ()
        square = Pow (x, two)
        mean = ReduceMean (square, last)
        shifted = Add (mean, eps)
        root = Sqrt (shifted)
        inverse = Div (unit, root)
        normed = Mul (x, inverse)
        y = Mul (gamma, normed)
    }
    """
    model = model_from_text(text)
    norm = match_norm(next(n for n in model.graph if n.op_type == "ReduceMean"))
    assert norm is not None and norm.kind == "RMSNorm"
    assert norm.epsilon == np.float32(1e-6) and norm.output.name == "y"

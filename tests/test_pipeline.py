"""Pass registry, spec parsing, PassManager verification and bisection on small ONNX-text models."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest
from helpers import LINEAR_MODEL, REDUNDANT_MODEL, AddToSubPass, DoubleWeightsPass, model_from_text

import xopt
from xopt.backends.onnxruntime import EXTERNAL_DATA_THRESHOLD_BYTES
from xopt.errors import XoptError
from xopt.inputs import sample_inputs
from xopt.passes import CleanupPass
from xopt.pipeline import PassManager, make_pass, parse_spec, registered_passes, resolve_passes
from xopt.progress import progress, showing_progress
from xopt.report import ModelStats
from xopt.verify import (
    VerificationError,
    bisect_passes,
    check_structure,
    compare,
    parity_over,
    reference_outputs,
)


def test_registry_lists_cleanup_with_its_options():
    passes = registered_passes()
    assert passes["cleanup"] is CleanupPass
    names = [name for name, _, _ in CleanupPass.options()]
    assert names == ["iterations", "fold_input_limit"]


def test_parse_spec_converts_option_types():
    (cleanup,) = parse_spec("cleanup(iterations=3, fold_input_limit=100)")
    assert isinstance(cleanup, CleanupPass)
    assert (cleanup.iterations, cleanup.fold_input_limit) == (3, 100)
    assert [p.name for p in parse_spec("cleanup, cleanup")] == ["cleanup", "cleanup"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown pass 'nope'"),
        ("cleanup(bogus=1)", "has no option 'bogus'"),
        ("cleanup(iterations=many)", "is not a valid int"),
        ("cleanup(iterations)", "write key=value"),
        ("cleanup(iterations=2", "unbalanced parentheses"),
        ("", "empty pass list"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(XoptError, match=message.replace("(", r"\(")):
        parse_spec(spec)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (CleanupPass(iterations="3"), "option iterations='3' is not a valid int"),
        (CleanupPass(iterations=2.7), "option iterations=2.7 is not a valid int"),
        (CleanupPass(iterations=True), "option iterations=True is not a valid int"),
    ],
)
def test_options_of_passes_built_in_python_are_checked_before_any_work(step, message):
    with pytest.raises(XoptError, match=message):
        xopt.optimize(model_from_text(LINEAR_MODEL), passes=[step])


def test_a_boolean_option_given_a_string_is_refused():
    from xopt.passes import FoldNormsPass

    with pytest.raises(XoptError, match="option to_rmsnorm='no' is not a valid bool"):
        PassManager([FoldNormsPass(to_rmsnorm="no")])


def test_the_api_names_arguments_of_the_wrong_kind():
    model = model_from_text(LINEAR_MODEL)
    _, report = xopt.optimize(model, passes=CleanupPass())  # one pass, not in a list
    assert [record.name for record in report.passes] == ["cleanup"]
    with pytest.raises(XoptError, match="give a recipe or passes, not both"):
        xopt.optimize(model, recipe="int4", passes="cleanup")
    with pytest.raises(XoptError, match="runs Pass objects, not a str"):
        PassManager(["cleanup"])
    with pytest.raises(XoptError, match="not a str"):
        PassManager([CleanupPass()])("model.onnx")
    with pytest.raises(XoptError, match="at least one set of feeds"):
        PassManager([CleanupPass()], inputs=[])
    with pytest.raises(XoptError, match="save takes an onnx_ir Model"):
        xopt.save("model", "out.onnx")
    with pytest.raises(XoptError, match="analyze takes an onnx_ir Model"):
        xopt.analyze(None)
    with pytest.raises(XoptError, match="empty path"):
        xopt.load("")
    with pytest.raises(XoptError, match="optimize: the model's graph has no outputs"):
        xopt.optimize(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10))
    with pytest.raises(TypeError, match="register takes a Pass subclass"):
        xopt.register(int)


def test_resolve_passes_recipe_and_replacement():
    assert [p.name for p in resolve_passes("exact")] == xopt.RECIPES["exact"]
    assert [p.name for p in resolve_passes("exact", ["cleanup"])] == ["cleanup"]
    assert [p.name for p in resolve_passes(None, [CleanupPass(iterations=1)])] == ["cleanup"]
    with pytest.raises(XoptError, match="unknown recipe"):
        resolve_passes("fastest")
    with pytest.raises(XoptError, match="a list of passes goes in passes="):
        resolve_passes(["cleanup"])
    with pytest.raises(XoptError, match="not a valid int"):
        make_pass("cleanup", {"iterations": "x"})


def test_pass_manager_records_stats_and_leaves_input_untouched():
    model = model_from_text(REDUNDANT_MODEL)
    nodes_before = [n.op_type for n in model.graph]
    _, report = PassManager([CleanupPass()])(model)
    assert [n.op_type for n in model.graph] == nodes_before
    (record,) = report.passes
    assert record.name == "cleanup" and record.modified
    assert record.before.nodes == 12 and record.after.nodes < 6
    assert record.op_changes()["Identity"] == -1
    assert record.parity is not None and record.parity.max_abs <= 1e-6
    assert report.to_dict()["passes"][0]["op_changes"] == record.op_changes()
    assert "cleanup" in report.format_table()


def test_the_report_times_the_steps_around_the_passes(monkeypatch):
    """Where a run's time went: each pass and its check apart, the input's reference outputs; the
    line sums them. Time is a counter that steps 1 s per reading, so every span is known (the
    report's stopwatch reads it; the process's clock is left alone)."""
    clock = iter(range(1000))
    monkeypatch.setattr("xopt.report.time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    _, report = PassManager([CleanupPass(), CleanupPass()])(model_from_text(REDUNDANT_MODEL))
    assert report.seconds == {"reference outputs": 1.0}
    assert [(r.seconds, r.check_seconds) for r in report.passes] == [(1.0, 1.0), (1.0, 1.0)]
    report.seconds = {"capture": 5.0, **report.seconds, "save": 0.5}
    line = "time s: capture 5.0, reference outputs 1.0, passes 2.0, their checks 2.0, save 0.5; 10.5 in all"
    assert report.describe_time() == line and line in report.format_table().splitlines()
    assert report.to_dict()["passes"][1]["check_seconds"] == 1.0
    _, unchecked = PassManager([CleanupPass()], verify=False)(model_from_text(REDUNDANT_MODEL))
    assert unchecked.seconds == {} and unchecked.passes[0].check_seconds == 0.0


def test_parameters_are_weights_and_codes_not_shapes():
    model = model_from_text(
        """
<ir_version: 10, opset_import: ["" : 20]>
g (float[2, 4] x) => (float[2, 3] y)
<float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, uint8[2] codes = {1, 2}, int64[2] shape = {2, 3},
 float half = {0.5}>
{
    m = MatMul (x, w)
    c = Cast <to = 1> (codes)
    s = ReduceSum (c)
    t = Add (m, s)
    h = Mul (t, half)
    y = Reshape (h, shape)
}
"""
    )
    stats = ModelStats.of(model)
    # The float weight and the 8-bit codes; the int64 shape is structure, the scalar arithmetic.
    assert stats.params == 12 + 2
    assert stats.bytes == 12 * 4 + 2 + 2 * 8 + 4


def test_exact_pass_that_changes_outputs_is_stopped_with_its_name():
    model = model_from_text(LINEAR_MODEL)
    with pytest.raises(VerificationError, match="exact pass 'add-to-sub' changed the model's outputs"):
        PassManager([CleanupPass(), AddToSubPass()])(model)


def test_an_exact_pass_after_a_lossy_one_is_held_to_the_lossy_output():
    """Parity is reported against the input model; an exact pass must keep the outputs of the
    model before it, not the input model's (which a lossy pass has already changed)."""
    model = model_from_text(LINEAR_MODEL)
    _, report = PassManager([DoubleWeightsPass(), CleanupPass()])(model)
    lossy, exact = report.passes
    assert lossy.parity.max_abs > 1 and exact.parity == lossy.parity
    with pytest.raises(VerificationError, match="exact pass 'add-to-sub' changed the model's outputs"):
        PassManager([DoubleWeightsPass(), AddToSubPass()])(model)


def test_without_verification_the_broken_model_comes_back_unchecked():
    model = model_from_text(LINEAR_MODEL)
    broken, report = PassManager([AddToSubPass()], verify=False)(model)
    assert report.passes[0].parity is None and not report.verified
    assert [n.op_type for n in broken.graph] == ["MatMul", "Sub", "Relu"]


def _model_reading(weight: np.ndarray, op: str = "MatMul") -> ir.Model:
    """x [N, 4] → op(x, weight) → Reshape to [N, -1] (its target a small constant)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["N", 4]))
    w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"))
    target = ir.Value(name="target", const_value=ir.tensor(np.array([0, -1], np.int64), name="target"))
    product = ir.node(op, [x, w])
    flat = ir.node("Reshape", [product.outputs[0], target])
    flat.outputs[0].name, flat.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    flat.outputs[0].shape = ir.Shape(["N", 300])
    graph = ir.Graph(
        [x], flat.outputs, nodes=[product, flat], initializers=[w, target], opset_imports={"": 20}, name="g"
    )
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(
    ("weight", "op", "message"),
    [
        (np.ones((5, 300), np.float32), "MatMul", "invalid ONNX graph: .*Incompatible dimensions"),
        (np.ones((4, 300), np.int64), "MatMul", "invalid ONNX graph: .*inconsistent type"),
    ],
)
def test_the_structure_check_reads_the_type_and_shape_of_weights_it_does_not_carry(weight, op, message):
    """Weights of EXTERNAL_DATA_THRESHOLD_BYTES or more reach the checker as inputs of their type and
    shape: a shape clash or a type clash with one is still found, and the model is left as it was."""
    assert weight.nbytes >= EXTERNAL_DATA_THRESHOLD_BYTES
    good = _model_reading(np.ones((4, 300), np.float32))
    check_structure(good)
    model = _model_reading(weight, op)
    with pytest.raises(VerificationError, match=message):
        check_structure(model)
    assert [v.name for v in model.graph.inputs] == ["x"] and set(model.graph.initializers) == {"w", "target"}
    assert np.array_equal(model.graph.initializers["w"].const_value.numpy(), weight)


def test_the_structure_check_reads_the_values_of_small_shape_constants():
    model = _model_reading(np.ones((4, 300), np.float32))
    model.graph.initializers["target"].const_value = ir.tensor(np.array([0, 7], np.int64), name="target")
    with pytest.raises(VerificationError, match=r"invalid ONNX graph: .*differ in dimension 1: \(7\) vs \(300\)"):
        check_structure(model)


def test_bisect_finds_the_first_pass_at_fault():
    model = model_from_text(LINEAR_MODEL)
    inputs = sample_inputs(model)
    passes = [CleanupPass(), CleanupPass(), AddToSubPass(), CleanupPass(), CleanupPass()]
    assert bisect_passes(model, passes, inputs) == 2
    assert bisect_passes(model, [CleanupPass(), CleanupPass()], inputs) is None


def test_compare_reports_relative_error_and_top1():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 2000)).astype(np.float32)
    shifted = logits.copy()
    shifted[0, 0] += 10 * (np.arange(2000) == logits[0, 0].argmin())
    result = compare({"logits": logits}, {"logits": shifted})
    assert compare({"hidden": logits}, {"hidden": shifted}).top1_agreement is None

    assert result.max_abs == pytest.approx(10, rel=1e-5)
    assert result.top1_agreement == pytest.approx(9 / 10)
    assert not result.within(1e-4)
    assert compare({"y": logits}, {"y": logits[:1]}).max_abs == float("inf")


def test_top1_agreement_is_pooled_over_the_positions_of_every_input_set():
    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[b, s, 50] x) => (float[b, s, 50] logits) {
            logits = Identity (x)
        }
        """
    )
    rng = np.random.default_rng(2)
    prompt, step = (
        rng.standard_normal((2, 10, 50)).astype(np.float32),
        rng.standard_normal((2, 1, 50)).astype(np.float32),
    )
    flipped = step.copy()
    flipped[..., 0] = step.max() + 1  # every argmax of the 2-position set moves
    result = parity_over(model, [{"x": prompt}, {"x": step}], [{"logits": prompt}, {"logits": flipped}])
    assert (result.top1_agreed, result.top1_positions, result.top1_agreement) == (20, 22, pytest.approx(20 / 22))
    assert "top-1 agreement 90.91% of 22 positions" in result.describe()


def test_compare_leaves_out_padded_positions_only():
    rng = np.random.default_rng(1)
    logits, present = rng.standard_normal((2, 3, 50)), rng.standard_normal((2, 2, 5, 4))  # past 2 + 3 new
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # row 1: its last two positions are padding
    padded_changed = {"logits": logits.copy(), "present.0.key": present.copy()}
    padded_changed["logits"][1, 1:] += 7  # the new tokens at mask positions 3 and 4
    padded_changed["present.0.key"][1, :, 3:] += 7
    reference = {"logits": logits, "present.0.key": present}
    assert compare(reference, padded_changed, mask).max_abs == 0
    assert compare(reference, padded_changed).max_abs == pytest.approx(7)  # without the mask: compared
    real_changed = {"logits": logits.copy(), "present.0.key": present.copy()}
    real_changed["present.0.key"][1, :, 2] += 7  # a real position
    assert compare(reference, real_changed, mask).max_abs == pytest.approx(7)
    real_changed = {"logits": logits.copy(), "present.0.key": present}
    real_changed["logits"][1, 0] += 7
    assert compare(reference, real_changed, mask).max_abs == pytest.approx(7)


def test_reference_outputs_match_numpy():
    model = model_from_text(LINEAR_MODEL)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (y,) = reference_outputs(model, {"x": x}).values()
    w = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(y, np.maximum(x @ w + [0.5, -0.5, 0.25], 0), rtol=1e-6)


def test_progress_shows_items_only_inside_a_display_and_passes_them_through():
    seen = []

    def display(items, total, unit, description):
        seen.append((list(items), total, unit, description))
        return iter(items)

    assert list(progress(iter("ab"), unit="x", description="outside")) == ["a", "b"]
    with showing_progress(display):
        assert list(progress((n for n in range(3)), unit="linear", description="quantize")) == [0, 1, 2]
    assert list(progress([4], unit="x", description="after")) == [4]
    assert seen == [([0, 1, 2], 3, "linear", "quantize")]

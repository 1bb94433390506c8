"""Dynamic int8 (`quantize(scheme=dynamic)`): ONNX Runtime computes exactly what the simulation
that chooses the smoothing predicts, smoothing folds into a norm or a Mul without changing the
float function, and mixed precision keeps the task error within its budget."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from xopt.analysis.patterns import find_linears
from xopt.backends.integer_gemm import u8s8_saturates
from xopt.backends.onnxruntime import create_session
from xopt.calibration import ActivationSample
from xopt.errors import XoptError
from xopt.passes import QuantizeWeightsPass
from xopt.passes.int8_dynamic import lower_dynamic, quantize_dynamic
from xopt.passes.mixed_precision import protect_by_sensitivity
from xopt.pipeline import PassManager
from xopt.verify import check_structure

K, N = 64, 24


def _inputs_with_outliers(rows: int, seed: int = 0) -> np.ndarray:
    """Activations whose channels 3 and 40 are 30× the others, as after a transformer's norms."""
    x = np.random.default_rng(seed).standard_normal((rows, K)).astype(np.float32)
    x[:, [3, 40]] *= 30
    return x


def _model(weight: np.ndarray, *, norm: bool, bias: bool, second_reader: bool = False) -> ir.Model:
    """x → [LayerNormalization] → MatMul(W) → [Add b]; optionally the norm's output is an output too."""
    rng = np.random.default_rng(1)
    values = {}

    def constant(name, array):
        value = ir.Value(name=name, const_value=ir.tensor(array.astype(np.float32), name=name))
        value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.FLOAT
        values[name] = value
        return value

    x = ir.Value(name="x", shape=ir.Shape(["rows", K]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, outputs, current = [], [], x
    if norm:
        gamma, beta = rng.uniform(0.5, 30, K), rng.standard_normal(K)
        layer_norm = ir.node("LayerNormalization", [x, constant("gamma", gamma), constant("beta", beta)], {"axis": -1})
        nodes.append(layer_norm)
        current = layer_norm.outputs[0]
        current.name, current.dtype, current.shape = "normed", ir.DataType.FLOAT, ir.Shape(["rows", K])
        if second_reader:
            outputs.append(current)
    matmul = ir.node("MatMul", [current, constant("w", weight)], name="linear")
    nodes.append(matmul)
    current = matmul.outputs[0]
    if bias:
        add = ir.node("Add", [current, constant("b", rng.standard_normal(N))])
        nodes.append(add)
        current.dtype, current.shape = ir.DataType.FLOAT, ir.Shape(["rows", N])
        current = add.outputs[0]
    current.name, current.dtype, current.shape = "y", ir.DataType.FLOAT, ir.Shape(["rows", N])
    graph = ir.Graph(
        [x], [current, *outputs], nodes=nodes, initializers=list(values.values()), opset_imports={"": 21}, name="m"
    )
    model = ir.Model(graph, ir_version=10)
    model.opset_imports["com.microsoft"] = 1
    return model


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return create_session(model).run(["y"], {"x": x})[0]


def _linear_input(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The activations the linear reads (the norm's output when there is one)."""
    if not any(node.op_type == "LayerNormalization" for node in model.graph):
        return x
    probe = model.clone()
    normed = next(v for node in probe.graph for v in node.outputs if v.name == "normed")
    if normed not in probe.graph.outputs:
        probe.graph.outputs.append(normed)
    return create_session(probe).run(["normed"], {"x": x})[0]


@pytest.mark.parametrize(("norm", "second_reader"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("smoothing", ["none", "0.5", "outliers"])
@pytest.mark.parametrize("bias", [False, True])
def test_onnxruntime_computes_the_simulated_int8_linear(norm, second_reader, smoothing, bias):
    """The output error ONNX Runtime shows is the one the simulation predicts (so the α search
    optimises the real thing), the bias is absorbed, and 1/s lands in the norm when it can."""
    weight = np.random.default_rng(2).standard_normal((K, N)).astype(np.float32)
    model = _model(weight, norm=norm, bias=bias, second_reader=second_reader)
    x = _inputs_with_outliers(256)
    reference = _run(model, x)
    activations = _linear_input(model, x)
    sample = ActivationSample([activations.min(0)], [activations.max(0)], [activations])
    form = quantize_dynamic(weight.astype(np.float64), sample, smoothing)
    assert (form.smoothing is None) == (form.label == "none") and (smoothing != "none") == (form.label != "none")
    quantized = model.clone()
    (linear,) = find_linears(quantized.graph)
    lower_dynamic(quantized.graph, linear, form, unsigned=u8s8_saturates())  # as the pass does
    check_structure(quantized)
    ops = Counter(node.op_type for node in quantized.graph)
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["MatMul"] == 0 and ops["Add"] == 0
    assert ops["Mul"] == (1 if form.smoothing is not None and (not norm or second_reader) else 0)
    actual = _run(quantized, x)
    exact = (activations.astype(np.float64) @ weight).astype(np.float32)
    measured = np.sum((actual - reference) ** 2) / np.sum(exact**2)
    # ORT quantizes in float32: with `outliers` a few values round across a step (0.15–0.3% here)
    assert measured == pytest.approx(form.simulated_error, rel=0.01)
    assert 0 < measured < 0.01


@pytest.mark.parametrize("unsigned", [False, True])
def test_uint8_codes_are_exact_where_the_int8_kernel_clips_pairs(unsigned):
    """Full-range codes on full-range activations: the uint8 form computes the exact integer sum
    on every CPU; the int8 form does only where `u8s8_saturates` says the kernel does not clip."""
    rng = np.random.default_rng(3)
    weight = np.where(rng.random((K, N)) < 0.5, -1.0, 1.0) * rng.uniform(0.9, 1.0, (K, N))
    model = _model(weight.astype(np.float32), norm=False, bias=False)
    x = (rng.integers(0, 256, (32, K)) / 255).astype(np.float32)  # on the grid: no rounding ties
    x[:, 0] = 1.0  # every row spans [0, 1]: step 1/255, zero point 0
    form = quantize_dynamic(weight, None, "none")
    quantized = model.clone()
    (linear,) = find_linears(quantized.graph)
    lower_dynamic(quantized.graph, linear, form, unsigned=unsigned)
    check_structure(quantized)
    codes = np.rint(x * 255)
    integer_sums = codes @ form.codes
    expected = integer_sums * form.scale / 255
    actual = _run(quantized, x)
    exact = np.allclose(actual, expected, rtol=1e-5, atol=1e-4)
    assert exact == (unsigned or not u8s8_saturates())


@pytest.mark.parametrize(("smoothing", "chosen", "ratio"), [("outliers", "outliers 2", 0.2), ("alpha", "α 0.5", 0.2)])
def test_smoothing_lowers_the_error_of_inputs_with_outlier_channels(smoothing, chosen, ratio):
    """Both smoothings tame the two wide channels: `outliers` scales only them (measured error
    ratio to no smoothing 0.117), SmoothQuant's α every channel (0.071)."""
    weight = np.random.default_rng(3).standard_normal((K, N))
    x = _inputs_with_outliers(512)
    sample = ActivationSample([x.min(0)], [x.max(0)], [x])
    plain = quantize_dynamic(weight, sample, "none")
    form = quantize_dynamic(weight, sample, smoothing)
    assert form.label == chosen
    assert form.simulated_error < ratio * plain.simulated_error


def _dynamic_linears(model: ir.Model) -> int:
    return sum(node.op_type == "DynamicQuantizeMatMul" for node in model.graph)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_every_linear_becomes_dynamic_int8_and_the_model_still_runs(tiny_model, name):
    model = tiny_model(name)
    linears = len(find_linears(model.graph))
    optimized, report = PassManager([QuantizeWeightsPass(scheme="dynamic", bits=8, windows=2)])(model)
    record = report.passes[-1]
    assert record.stats["linears_quantized"] == _dynamic_linears(optimized) == linears > 0
    assert not find_linears(optimized.graph)
    assert record.stats["bytes_after"] < 0.3 * record.stats["bytes_before"]
    assert any(line.startswith("smoothing chosen") for line in record.explain)
    assert record.parity.max_rel < 0.5, record.parity.describe()


def test_no_smoothing_runs_no_calibration(tiny_model, monkeypatch):
    import xopt.passes.quantize as quantize

    def refuse(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(quantize, "calibration_feeds", refuse)
    optimized = QuantizeWeightsPass(scheme="dynamic", bits=8, smoothing="none")(tiny_model("llama").clone()).model
    assert _dynamic_linears(optimized) > 0 and not find_linears(optimized.graph)


@pytest.mark.parametrize("codes", ["int8", "uint8", "auto"])
def test_weight_codes_are_stored_as_asked_or_where_this_cpu_computes_them_exactly(tiny_model, codes):
    optimized, report = PassManager([QuantizeWeightsPass(scheme="dynamic", bits=8, windows=2, codes=codes)])(
        tiny_model("llama")
    )
    unsigned = codes == "uint8" or (codes == "auto" and u8s8_saturates())
    stored = {node.inputs[1].dtype for node in optimized.graph if node.op_type == "DynamicQuantizeMatMul"}
    assert stored == {ir.DataType.UINT8 if unsigned else ir.DataType.INT8}
    assert any("stored as uint8" in line for line in report.passes[-1].explain) == unsigned
    assert report.passes[-1].parity.max_rel < 0.5, report.passes[-1].parity.describe()


def test_mixed_precision_keeps_the_task_error_within_the_budget(tiny_model):
    """On the tiny random BERT, int8 everywhere costs more than the budget; protecting the most
    sensitive linears brings it within, with fewer linears in float than all of them."""
    from xopt.task_error import TaskError

    model = tiny_model("bert")
    everywhere = QuantizeWeightsPass(scheme="dynamic", bits=8, windows=2)(model.clone()).model
    error = TaskError(model)(everywhere)
    budget = error / 3
    result = QuantizeWeightsPass(scheme="dynamic", bits=8, windows=2, budget=budget)(model.clone())
    protected = result.stats["linears_protected"]
    assert 0 < protected < len(find_linears(model.graph))
    assert (
        result.stats["linears_quantized"]
        == _dynamic_linears(result.model)
        == len(find_linears(model.graph)) - protected
    )
    assert TaskError(model)(result.model) <= budget
    assert sum("kept at higher precision" in line for line in result.explain) == protected


def test_protection_takes_the_most_sensitive_linears_first():
    """With an additive task error the search protects exactly the largest contributions."""
    contribution = {"a": 0.5, "b": 3.0, "c": 0.1, "d": 1.0}

    def task_error(plan):
        return sum(contribution[name] for name, form in plan.items() if form == "q")

    forms = {name: ["q"] for name in contribution}
    fallback = {name: "float" for name in contribution}
    explain: list[str] = []
    plan = protect_by_sensitivity(forms, fallback, lambda p: p, task_error, 0.7, explain, "units")
    assert plan == {"a": "q", "b": "float", "c": "q", "d": "float"}
    assert protect_by_sensitivity(forms, fallback, lambda p: p, task_error, 5.0, [], "units") == dict.fromkeys(
        contribution, "q"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(scheme="dynamic", bits=4), "bits=4"),
        (dict(scheme="dynamic", bits=8, head_bits=4), "head_bits=4"),
        (dict(scheme="qdq"), "unknown scheme"),
        (dict(scheme="dynamic", bits=8, smoothing="1.5"), "smoothing="),
        (dict(budget=-1.0), "budget="),
        (dict(scheme="dynamic", bits=8, codes="int7"), "codes="),
    ],
)
def test_bad_dynamic_options_are_refused_with_the_reason(tiny_model, options, message):
    with pytest.raises(XoptError, match=message):
        QuantizeWeightsPass(**options)(tiny_model("llama").clone())


def test_smoothing_folds_into_the_v_columns_of_a_fused_attention():
    """com.microsoft Attention's output channels are V's: 1/s goes into V's weight columns and
    bias, no Mul, and ONNX Runtime still computes the simulated int8 linear."""
    rng = np.random.default_rng(5)
    x = ir.Value(name="x", shape=ir.Shape(["batch", "sequence", K]), type=ir.TensorType(ir.DataType.FLOAT))
    initializers = []

    def constant(name, array):
        value = ir.Value(name=name, const_value=ir.tensor(array.astype(np.float32), name=name))
        value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.FLOAT
        initializers.append(value)
        return value

    qkv = rng.standard_normal((K, 3 * K)) / 8
    qkv[:, 2 * K + 3] *= 30  # one wide output channel of V
    attention = ir.node(
        "Attention",
        [x, constant("qkv", qkv), constant("qkv_bias", rng.standard_normal(3 * K))],
        {"num_heads": 4},
        domain="com.microsoft",
    )
    attended = attention.outputs[0]
    attended.name, attended.dtype, attended.shape = "attended", ir.DataType.FLOAT, ir.Shape(["batch", "sequence", K])
    weight = rng.standard_normal((K, N)).astype(np.float32)
    matmul = ir.node("MatMul", [attended, constant("w", weight)], name="linear")
    y = matmul.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape(["batch", "sequence", N])
    graph = ir.Graph([x], [y], nodes=[attention, matmul], initializers=initializers, opset_imports={"": 21}, name="g")
    model = ir.Model(graph, ir_version=10)
    model.opset_imports["com.microsoft"] = 1

    inputs = rng.standard_normal((2, 16, K)).astype(np.float32)
    probe = model.clone()
    probe.graph.outputs.append(next(v for n in probe.graph for v in n.outputs if v.name == "attended"))
    reference, activations = create_session(probe).run(["y", "attended"], {"x": inputs})
    rows = activations.reshape(-1, K)
    form = quantize_dynamic(
        weight.astype(np.float64), ActivationSample([rows.min(0)], [rows.max(0)], [rows]), "outliers"
    )
    assert form.smoothing is not None
    quantized = model.clone()
    (linear,) = find_linears(quantized.graph)
    lower_dynamic(quantized.graph, linear, form, unsigned=u8s8_saturates())
    check_structure(quantized)
    assert [n.op_type for n in quantized.graph] == ["Attention", "DynamicQuantizeMatMul"]
    (actual,) = create_session(quantized).run(["y"], {"x": inputs})
    exact = rows.astype(np.float64) @ weight
    measured = np.sum((actual.reshape(-1, N) - reference.reshape(-1, N)) ** 2) / np.sum(exact**2)
    assert measured == pytest.approx(form.simulated_error, rel=0.01)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_static_qdq_quantizes_every_linear_and_stays_close(tiny_model, name):
    """ONNX Runtime's static quantizer on xopt's calibration runs: every linear in QDQ form with
    int8 weights. On the calibration inputs (inside the fixed ranges) the outputs stay within int8
    noise; the pass verification's random token ids fall partly outside those ranges and are
    clipped, so its bound is loose (measured 0.30 on llama)."""
    from xopt.backends.onnxruntime import run
    from xopt.calibration import calibration_feeds

    model = tiny_model(name)
    optimized, report = PassManager([QuantizeWeightsPass(scheme="static", bits=8, windows=2)])(model)
    record = report.passes[-1]
    linears = len(find_linears(model.graph))
    assert record.stats["linears_quantized"] == linears
    assert sum(n.op_type == "DequantizeLinear" for n in optimized.graph) >= 2 * linears  # weight and input
    assert 0 < record.stats["bytes_after"] < 0.3 * record.stats["bytes_before"]
    assert record.parity.max_rel < 0.5, record.parity.describe()
    feeds = calibration_feeds(model, windows=2)[0]
    expected = next(iter(run(create_session(model), feeds).values()))
    actual = next(iter(run(create_session(optimized), feeds).values()))
    relative = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert relative < 0.05, relative  # measured 0.010 (llama), 0.0005 (bert)

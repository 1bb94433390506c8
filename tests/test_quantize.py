"""The `quantize` pass: the MatMulNBits layout ONNX Runtime reads, the grid fits, GPTQ's objective,
and whole tiny models quantized and still running (decoders with their KV cache)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from helpers import single_gather, single_matmul

import xopt.passes.quantize as quantize_module
from xopt.analysis.patterns import find_linears
from xopt.backends.onnxruntime import create_session
from xopt.calibration import second_moments
from xopt.errors import XoptError
from xopt.passes import QuantizeWeightsPass, weight_grid
from xopt.passes.awq import awq, output_error
from xopt.passes.gptq import gptq, inverse_factor
from xopt.passes.weight_grid import as_blocks, codes_of, dequantize, fit_blocks
from xopt.pipeline import PassManager, parse_spec
from xopt.verify import check_structure


def _restored(weight: np.ndarray, bits: int, group: int, fit: str, symmetric: bool = False) -> np.ndarray:
    """Ŵ [K, N] as the grid defines it, computed without the packing."""
    blocks = as_blocks(weight.T.astype(np.float64), group)
    scale, zero = fit_blocks(blocks, bits, fit, symmetric)
    restored = dequantize(codes_of(blocks, scale, zero, bits), scale, zero)
    return restored.reshape(weight.shape[1], -1)[:, : weight.shape[0]].T


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("in_features", "group"), [(96, 32), (80, 32), (200, 128), (64, 16)])
def test_matmulnbits_computes_x_times_the_dequantized_weight(bits, in_features, group, symmetric):
    """ONNX Runtime reads the packed codes, scales and zero points as the grid defines them
    (K not a multiple of the group included): a wrong nibble order or zero-point layout fails.
    The symmetric grid stores no zero points: MatMulNBits' default 2^(bits−1) is the grid's."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((in_features, 24)).astype(np.float32)
    model = single_matmul(weight)
    quantize = QuantizeWeightsPass(
        bits=bits, group=group, method="rtn", accuracy="0", head_bits=bits, symmetric=symmetric
    )
    result = quantize(model)
    assert [(n.op_type, len(n.inputs)) for n in result.model.graph] == [("MatMulNBits", 3 if symmetric else 4)]
    check_structure(result.model)
    x = rng.standard_normal((5, in_features)).astype(np.float32)
    (actual,) = create_session(result.model).run(None, {"x": x})
    expected = x.astype(np.float64) @ _restored(weight, bits, group, "minmax", symmetric)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert not np.allclose(actual, x @ weight, atol=1e-6)  # it did quantize


def test_round_to_nearest_holds_blocks_of_one_sign_within_half_a_step():
    """A block whose values share a sign still gets an integer zero point in 0…L: its range is
    widened to hold 0, and every value lands within half a grid step."""
    rng = np.random.default_rng(6)
    blocks = np.concatenate([rng.uniform(2, 3, (4, 2, 32)), -rng.uniform(2, 3, (4, 2, 32))], axis=1)
    scale, zero = fit_blocks(blocks, 4, "minmax")
    error = np.abs(blocks - dequantize(codes_of(blocks, scale, zero, 4), scale, zero))
    assert zero.min() >= 0 and zero.max() <= 15 and np.all(error <= scale[..., None] / 2 * (1 + 1e-9))


def test_hqq_fit_is_never_worse_than_round_to_nearest():
    rng = np.random.default_rng(1)
    blocks = rng.standard_t(df=3, size=(64, 8, 32))  # heavy tails: outliers stretch the min/max range
    errors = {}
    for fit in ("minmax", "hqq"):
        scale, zero = fit_blocks(blocks, 4, fit)
        assert np.all(zero == np.rint(zero)) and zero.min() >= 0 and zero.max() <= 15
        errors[fit] = np.square(blocks - dequantize(codes_of(blocks, scale, zero, 4), scale, zero)).sum(-1)
    assert np.all(errors["hqq"] <= errors["minmax"] * (1 + 1e-12))
    assert errors["hqq"].mean() < 0.97 * errors["minmax"].mean()  # measured 0.95


@pytest.mark.parametrize("symmetric", [False, True])
def test_hqq_fits_each_block_alone_whatever_the_chunk(monkeypatch, symmetric):
    """The fit runs in chunks of blocks; a block's grid does not depend on which chunk holds it."""
    blocks = np.random.default_rng(6).standard_t(df=3, size=(50, 7, 32))
    whole = fit_blocks(blocks, 4, "hqq", symmetric)
    monkeypatch.setattr(weight_grid, "HQQ_CHUNK_BLOCKS", 33)  # chunks that split rows, and a short last one
    chunked = fit_blocks(blocks, 4, "hqq", symmetric)
    for expected, actual in zip(whole, chunked, strict=True):
        assert actual.shape == (50, 7)
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_grid_keeps_each_blocks_largest_value_and_hqq_only_improves_it(bits):
    """z = 2^(bits−1) everywhere; the value of largest magnitude is on the grid (code 0) whatever
    its sign; HQQ's scale-only fit is never worse than that grid and better on heavy tails."""
    blocks = np.random.default_rng(4).standard_t(df=3, size=(64, 8, 32))
    errors = {}
    for fit in ("minmax", "hqq"):
        scale, zero = fit_blocks(blocks, bits, fit, symmetric=True)
        assert np.all(zero == 1 << (bits - 1))
        codes = codes_of(blocks, scale, zero, bits)
        assert codes.min() >= 0 and codes.max() <= (1 << bits) - 1
        restored = dequantize(codes, scale, zero)
        errors[fit] = np.square(blocks - restored).sum(-1)
        if fit == "minmax":
            largest = np.abs(blocks).argmax(-1)[..., None]
            np.testing.assert_allclose(
                np.take_along_axis(restored, largest, -1), np.take_along_axis(blocks, largest, -1)
            )
            assert (scale < 0).any() and (scale > 0).any()  # the sign follows the largest value
    assert np.all(errors["hqq"] <= errors["minmax"] * (1 + 1e-12))
    bar = 0.97 if bits == 4 else 0.98  # measured 0.957 (4-bit), 0.972 (8-bit)
    assert errors["hqq"].mean() < bar * errors["minmax"].mean()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fit", ["minmax", "hqq"])
def test_gptq_lowers_the_layer_output_error_on_correlated_inputs(fit, act_order, symmetric):
    """GPTQ's objective ‖X·(W − Ŵ)‖ is lower than the same grid rounded to nearest."""
    rng = np.random.default_rng(2)
    inputs = rng.standard_normal((2048, 96)) @ rng.standard_normal((96, 96))  # correlated channels
    inputs *= rng.uniform(0.2, 3.0, size=96)  # uneven channel energy, which act-order exploits
    weight = rng.standard_normal((96, 40))
    moment = inputs.T @ inputs
    factor = inverse_factor(moment, act_order=act_order)
    codes, scale, zero = gptq(weight.T, factor, bits=4, group=32, fit=fit, symmetric=symmetric)
    assert not symmetric or np.all(zero == 8)
    ours = dequantize(as_blocks(codes, 32), scale, zero).reshape(40, -1)[:, :96].T
    nearest = _restored(weight, 4, 32, fit, symmetric)
    error = np.linalg.norm(inputs @ (weight - ours))
    ratio = error / np.linalg.norm(inputs @ (weight - nearest))
    assert ratio < (0.7 if act_order else 0.85)  # measured 0.58–0.60 with act-order, 0.75–0.76 without


def _gptq_column_by_column(w_nk, hessian, *, bits, group, fit, act_order):
    """The loop of gptq.py's docstring, one column at a time with no deferred update."""
    n, k = w_nk.shape
    weight, h = w_nk.astype(np.float64), hessian + 0.01 * np.mean(np.diag(hessian)) * np.eye(k)
    scale, zero = np.zeros((n, -(-k // group))), np.zeros((n, -(-k // group)))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    if act_order:  # static groups, fitted on the unquantized weight
        for g in range(scale.shape[1]):
            scale[:, g], zero[:, g] = (
                a[:, 0] for a in fit_blocks(weight[:, None, g * group : (g + 1) * group], bits, fit)
            )
    weight, upper = weight[:, order], np.linalg.cholesky(np.linalg.inv(h[np.ix_(order, order)])).T
    codes = np.zeros((n, k))
    for i in range(k):
        g = order[i] // group
        if not act_order and i % group == 0:
            scale[:, g], zero[:, g] = (a[:, 0] for a in fit_blocks(weight[:, None, i : i + group], bits, fit))
        codes[:, order[i]] = codes_of(weight[:, i : i + 1], scale[:, g], zero[:, g], bits)[:, 0]
        error = (weight[:, i] - scale[:, g] * (codes[:, order[i]] - zero[:, g])) / upper[i, i]
        weight[:, i:] -= np.outer(error, upper[i, i:])
    return codes, scale, zero


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_factor_is_the_upper_cholesky_factor_of_the_dampened_inverse(act_order):
    """Uᵀ·U = (H + λ·mean(diag H)·I)⁻¹ in the order quantized, U upper triangular with a positive
    diagonal (the Cholesky factor, unique); a dead input gets H_kk = 1 first."""
    rng = np.random.default_rng(8)
    inputs = rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40)) * rng.uniform(0.1, 4.0, 40)
    inputs[:, 7] = 0.0
    moment = inputs.T @ inputs
    factor = inverse_factor(moment, damp=0.01, act_order=act_order)
    dampened = moment.copy()
    dampened[7, 7] = 1.0
    dampened += 0.01 * np.mean(np.diag(dampened)) * np.eye(40)
    order = factor.order
    assert list(np.flatnonzero(factor.dead)) == [7]
    assert list(order) == (list(np.argsort(-np.diag(dampened), kind="stable")) if act_order else list(range(40)))
    np.testing.assert_array_equal(factor.upper, np.triu(factor.upper))
    assert np.all(np.diag(factor.upper) > 0)
    expected = np.linalg.inv(dampened[np.ix_(order, order)])
    np.testing.assert_allclose(factor.upper.T @ factor.upper, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("in_features", "group"), [(200, 32), (300, 128), (96, 16), (200, 48)])
def test_gptq_deferred_updates_compute_the_column_by_column_loop(in_features, group, act_order):
    """Updates grouped in steps and blocks (a partial last block and group included) are the same
    sums as the plain loop: the same codes, grids equal to float rounding."""
    rng = np.random.default_rng(5)
    inputs = rng.standard_normal((1024, in_features)) @ rng.standard_normal((in_features, in_features))
    weight = rng.standard_normal((48, in_features))
    moment = inputs.T @ inputs
    codes, scale, zero = gptq(weight, inverse_factor(moment, act_order=act_order), bits=4, group=group, fit="hqq")
    expected = _gptq_column_by_column(weight, moment, bits=4, group=group, fit="hqq", act_order=act_order)
    expected_codes, expected_scale, expected_zero = expected
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_array_equal(zero, expected_zero)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-9)


def test_second_moments_sum_each_tokens_outer_product_over_the_feeds():
    """Σ x xᵀ (both triangles) and Σ |x| over every token of every feed, in float64."""
    rng = np.random.default_rng(7)
    model = single_matmul(rng.standard_normal((24, 5)).astype(np.float32), leading=("batch", "sequence"))
    feeds = [{"x": rng.standard_normal((2, 7, 24)).astype(np.float32)} for _ in range(3)]
    (x_value,) = model.graph.inputs
    (moment,) = second_moments(model, [x_value], feeds).values()
    tokens = np.concatenate([feed["x"].reshape(-1, 24) for feed in feeds]).astype(np.float64)
    np.testing.assert_allclose(moment.matrix, tokens.T @ tokens, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moment.absolute, np.abs(tokens).sum(0), rtol=1e-12)
    assert moment.tokens == 42


def test_gptq_on_uncorrelated_inputs_is_round_to_nearest():
    """With H = I no error is propagated: every column rounds to nearest on the same grid."""
    weight = np.random.default_rng(3).standard_normal((64, 24))
    codes, scale, zero = gptq(weight.T, inverse_factor(np.eye(64), damp=0.0), bits=4, group=32, fit="minmax")
    blocks = as_blocks(weight.T, 32)
    expected_scale, expected_zero = fit_blocks(blocks, 4, "minmax")
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-12)
    np.testing.assert_array_equal(zero, expected_zero)
    np.testing.assert_array_equal(codes, codes_of(blocks, expected_scale, expected_zero, 4).reshape(24, 64))


def test_awq_scales_protect_the_high_energy_input_channels():
    """A few input channels carry most of the activation energy (LLM outliers): AWQ's scaled grid
    gives a much lower output error tr(ΔᵀHΔ) than round to nearest; with flat channels it chooses
    (near) no scaling and is no worse than RTN."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((128, 48))
    for energy, bound in ((np.where(np.arange(128) % 16 == 0, 40.0, 1.0), 0.6), (np.ones(128), 1.0)):
        inputs = rng.standard_normal((4096, 128)) * energy
        hessian = inputs.T @ inputs
        form = awq(weight, hessian, bits=4, group=32)
        ratio = output_error(weight, form.restored(32), hessian) / output_error(
            weight, _restored(weight, 4, 32, "minmax"), hessian
        )
        assert ratio < bound * (1 + 1e-9), ratio  # measured 0.29 with outliers, 0.91 flat (clipping)
        assert form.codes.min() >= 0 and form.codes.max() <= 15


def test_awq_divides_each_scaled_input_and_the_model_still_runs(tiny_model):
    """Every linear with α > 0 reads x·diag(1/s) (here a Mul: the cleaned llama's norms are
    decomposed, so no norm op can absorb it); outputs stay within 4-bit noise."""
    model = tiny_model("llama")
    optimized, report = PassManager([QuantizeWeightsPass(method="awq", group=16, windows=2, accuracy="0")])(model)
    record = report.passes[-1]
    assert record.stats["linears_quantized"] == _linear_count(model)
    alphas = [float(line.split("AWQ α ")[1].split(",")[0]) for line in record.explain if "AWQ α" in line]
    assert len(alphas) == _linear_count(model) and any(alphas)
    divisions = [n for n in optimized.graph if n.op_type == "Mul" and n.name.endswith("_smoothing")]
    assert len(divisions) == sum(a > 0 for a in alphas)
    assert record.parity.max_rel < 0.5, record.parity.describe()


def test_a_mixture_of_experts_keeps_its_experts_float_and_says_so(tiny_model):
    """Mixtral's experts are 3-D weights gathered per token: the linears around them are quantized,
    the experts counted in the report (2 layers × 4 experts × (2·80·48 + 80·48) parameters)."""
    model = tiny_model("mixtral")
    _, report = PassManager([QuantizeWeightsPass(method="rtn", group=16, accuracy="0")])(model)
    record = report.passes[-1]
    assert record.stats["linears_quantized"] == _linear_count(model)
    assert record.stats["gathered_weights_left"] == 2 * 4 * 3 * 80 * 48
    assert "not quantized: 4 weights a MatMul reads through a Gather (92,160 parameters" in "\n".join(record.explain)


def _linear_count(model: ir.Model) -> int:
    from xopt.analysis.patterns import match_linear

    return sum(match_linear(node) is not None for node in model.graph if node.op_type == "MatMul")


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "bert"])
@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_every_linear_becomes_matmulnbits_and_the_model_still_runs(tiny_model, name, method):
    """Verified like every pass (checker, and outputs on a padded batch with a KV cache for the
    decoders); 8-bit keeps the outputs close, 4-bit within its noise."""
    model = tiny_model(name)
    for bits, tolerance in ((8, 0.05), (4, 0.5)):
        optimized, report = PassManager(
            [QuantizeWeightsPass(bits=bits, group=16, method=method, accuracy="0", head_bits=bits)]
        )(model)
        record = report.passes[-1]
        assert record.stats["linears_quantized"] == _linear_count(model) > 0
        assert _linear_count(optimized) == 0
        assert record.stats["bytes_after"] < record.stats["bytes_before"] * (0.3 if bits == 4 else 0.55)
        assert all(value.uses() for value in optimized.graph.initializers.values())  # no float copy left behind
        assert record.parity.max_rel <= tolerance, (bits, record.parity.describe())


@pytest.mark.parametrize("weights", ["float", "int8"])
def test_attention_weights_packed_by_fuse_are_named_as_left_in_float(tiny_model, weights, caplog):
    """A plain `fuse` packs BERT's Q/K/V into ORT's Attention, whose weight no linear holds:
    `quantize` says so, with the size and the way out; after `fuse(weights=int8)` there is none."""
    cleanup, fuse = parse_spec(f"cleanup,fuse(lowering=all,weights={weights})")
    fused = fuse(cleanup(tiny_model("bert").clone()).model).model
    packed = [n for n in fused.graph if n.op_type == "Attention" and n.domain == "com.microsoft"]
    assert bool(packed) == (weights == "float")
    result = QuantizeWeightsPass(scheme="dynamic", bits=8, accuracy="0")(fused)
    notes = [line for line in result.explain if "packed by `fuse` stay in float" in line]
    if weights == "int8":
        assert not notes and "stay in float" not in caplog.text
        return
    megabytes = sum(n.inputs[1].const_value.nbytes for n in packed) / 1e6
    assert notes == [
        f"{len(packed)} Attention weights packed by `fuse` stay in float ({megabytes:.1f} MB), out of quantize's "
        "reach: `fuse(weights=int8)` before `quantize` keeps Q/K/V as linears (the int4 and int8 recipes do)"
    ]
    assert notes[0] in caplog.text


def test_head_bits_sets_the_lm_head_apart(tiny_model):
    model = tiny_model("qwen2")
    linears = _linear_count(model)
    kept = QuantizeWeightsPass(method="rtn", group=16, accuracy="0", head_bits=0)(model.clone())
    assert kept.stats["linears_quantized"] == linears - 1
    assert _linear_count(kept.model) == 1
    assert any("LM head" in line for line in kept.explain)
    for head_bits in (4, 8):
        result = QuantizeWeightsPass(method="rtn", group=16, accuracy="0", head_bits=head_bits)(model.clone())
        bits = Counter(n.attributes.get_int("bits") for n in result.model.graph if n.op_type == "MatMulNBits")
        assert bits == ({4: linears} if head_bits == 4 else {4: linears - 1, 8: 1})


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_calibrates_on_text_with_the_models_tokenizer(tiny_model, symmetric, monkeypatch):
    """Every linear quantized, its input moment's factor computed once per input (Q, K and V share one)."""
    model = tiny_model("llama")
    factored = Counter()

    def counting(hessian, **options):
        factored[hessian.tobytes()] += 1
        return inverse_factor(hessian, **options)

    monkeypatch.setattr(quantize_module, "inverse_factor", counting)
    quantize = QuantizeWeightsPass(method="gptq", group=16, windows=2, accuracy="0", symmetric=symmetric)
    optimized, report = PassManager([quantize])(model)
    assert report.passes[-1].stats["linears_quantized"] == _linear_count(model)
    input_names = {linear.input.name for linear in find_linears(model.graph)}
    assert len(factored) == len(input_names) < _linear_count(model) and set(factored.values()) == {1}
    assert _linear_count(optimized) == 0
    inputs = {len(n.inputs) for n in optimized.graph if n.op_type == "MatMulNBits"}
    assert inputs == {3 if symmetric else 4}
    assert report.passes[-1].parity.max_rel < 0.5


def test_symmetric_measure_times_both_grids_and_lowers_the_one_chosen(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("XOPT_CACHE_DIR", str(tmp_path))
    (quantize,) = parse_spec("quantize(method=rtn,group=16,accuracy=0,symmetric=measure)")
    assert quantize.symmetric == "measure"
    result = quantize(tiny_model("llama").clone())
    (line,) = [line for line in result.explain if "against zero points" in line]
    symmetric = result.stats["symmetric"]
    assert line.startswith("symmetric grids" if symmetric else "zero points kept") and " measured " in line
    inputs = {len(n.inputs) for n in result.model.graph if n.op_type == "MatMulNBits"}
    assert inputs == {3 if symmetric else 4}
    again = quantize(tiny_model("llama").clone())
    (line,) = [line for line in again.explain if "against zero points" in line]
    assert " cached " in line and again.stats["symmetric"] == symmetric


def test_symmetric_measure_compares_each_grid_at_its_own_accuracy_level(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("XOPT_CACHE_DIR", str(tmp_path))
    result = QuantizeWeightsPass(method="rtn", group=16, symmetric="measure")(tiny_model("llama").clone())
    (line,) = [line for line in result.explain if "against zero points" in line]
    symmetric_level, zero_point_level = map(int, re.findall(r"accuracy_level (\d)", line))
    level = result.stats["accuracy_level"]
    assert level == (symmetric_level if result.stats["symmetric"] else zero_point_level)
    notes = [line for line in result.explain if "accuracy_level" in line and "against level 0" in line]
    assert [note.split(":")[0] for note in notes] == ["zero points", "symmetric"]  # each grid timed once
    assert not any(line.startswith("accuracy_level") for line in result.explain)  # not a second time


def test_measured_accuracy_level_is_applied_to_every_matmulnbits(tiny_model):
    result = QuantizeWeightsPass(method="rtn", group=16)(tiny_model("llama").clone())
    levels = {n.attributes.get_int("accuracy_level") for n in result.model.graph if n.op_type == "MatMulNBits"}
    assert levels == {result.stats["accuracy_level"]} and levels <= {0, 4}
    assert any("accuracy_level" in line and "×" in line for line in result.explain)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(bits=3), "bits=3"),
        (dict(head_bits=2), "head_bits=2"),
        (dict(group=48), "group=48"),
        (dict(method="spqr"), "unknown method"),
        (dict(accuracy="2"), "accuracy="),
        (dict(scheme="dynamic", bits=8, symmetric=True), "symmetric=true"),
        (dict(scheme="dynamic", bits=8, symmetric="measure"), "symmetric=measure"),
        (dict(scheme="static", bits=4), "the static scheme 8"),
        (dict(scheme="static", bits=8, budget=0.1), "the static scheme takes no budget"),
        (dict(scheme="static", bits=8, activation_range="entropy"), "activation_range="),
    ],
)
def test_bad_options_are_refused_with_the_reason(tiny_model, options, message):
    with pytest.raises(XoptError, match=message):
        QuantizeWeightsPass(**options)(tiny_model("llama").clone())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_int4_recipe_output_still_generates_with_its_kv_cache(tiny_model, tmp_path, name):
    """The recipe's output (calibrated with the model's own tokenizer; rotated where the model
    allows) decodes token by token; 8-bit weights keep the greedy tokens of the float model."""
    import xopt
    from xopt.generate import Decoder
    from xopt.runnable import open_runnable

    prompt = [5, 17, 42, 9, 3]
    xopt.save(tiny_model(name), tmp_path / "float")
    expected = Decoder(open_runnable(tmp_path / "float")).generate(prompt, 12).tokens
    int4, report = xopt.optimize(tiny_model(name), recipe="int4")
    assert [p.name for p in report.passes] == ["cleanup", "fold-norms", "rotate", "fuse", "quantize"]
    assert report.passes[2].modified  # GPT-2 too: LayerNorm → RMSNorm, Conv1D's Gemm read as MatMul
    assert report.passes[-1].stats["linears_quantized"] == sum(n.op_type == "MatMulNBits" for n in int4.graph)
    assert _linear_count(int4) == 0 and "Gemm" not in {n.op_type for n in int4.graph}  # every linear is int4
    assert {n.attributes.get_int("bits") for n in int4.graph if n.op_type == "MatMulNBits"} == {4}  # the head too
    assert sum(n.op_type == "Gather" and n.inputs[0].name.endswith("_q8") for n in int4.graph) == 1  # 8-bit table
    int8, _ = xopt.optimize(tiny_model(name), passes=[QuantizeWeightsPass(bits=8, group=16, windows=2)])
    for label, model in (("int4", int4), ("int8", int8)):
        xopt.save(model, tmp_path / label)
        tokens = Decoder(open_runnable(tmp_path / label)).generate(prompt, 12).tokens
        assert len(tokens) == 12
        if label == "int8":
            assert tokens == expected


DEQUANTIZING_GATHER = ["Gather", "Cast", "Gather", "Cast", "Sub", "Gather", "Mul", "Reshape"]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [16, 32])
def test_a_quantized_table_returns_the_dequantized_rows(bits, group):
    """ONNX Runtime reads the table's codes, scales and zero points as the grid defines them:
    8-bit through standard operators, 4-bit packed for GatherBlockQuantized."""
    from xopt.analysis.patterns import match_embedding
    from xopt.passes.gather_quantized import lower_gather, quantize_table

    table = np.random.default_rng(4).standard_normal((50, 64)).astype(np.float32)
    model = single_gather(table)
    embedding = match_embedding(next(iter(model.graph)))
    quantized = quantize_table(table, bits, group, "minmax")
    before, after = lower_gather(model.graph, embedding, quantized)
    error = quantized.error
    assert quantized.origin == "minmax fit"
    lowered = DEQUANTIZING_GATHER if bits == 8 else ["GatherBlockQuantized"]
    assert [n.op_type for n in model.graph] == lowered and "table" not in model.graph.initializers
    check_structure(model)
    ids = np.array([[3, 49, 0, 3], [7, 7, 12, 1]], dtype=np.int64)
    (actual,) = create_session(model).run(None, {"ids": ids})
    restored = _restored(table.T, bits, group, "minmax").T  # rows of E are the output channels of Eᵀ
    np.testing.assert_allclose(actual, restored[ids], rtol=1e-5, atol=1e-6)
    assert after < before * (0.2 if bits == 4 else 0.35) and 0 < error < (0.1 if bits == 4 else 0.01)


@pytest.mark.parametrize("ids_shape", [["sequence"], ["batch", "sequence", "choice"]])
def test_the_8_bit_lowering_restores_the_ids_shape_and_falls_back_where_the_rank_is_unknown(ids_shape):
    from xopt.analysis.patterns import match_embedding
    from xopt.passes.gather_quantized import lower_gather, quantize_table

    table = np.random.default_rng(5).standard_normal((40, 32)).astype(np.float32)
    quantized = quantize_table(table, 8, 16, "minmax")
    ids = np.arange(np.prod([3] * len(ids_shape))).reshape([3] * len(ids_shape)) % 40
    restored = _restored(table.T, 8, 16, "minmax").T
    for shape, lowered in ((ids_shape, DEQUANTIZING_GATHER), (None, ["GatherBlockQuantized"])):
        model = single_gather(table)
        model.graph.inputs[0].shape = None if shape is None else ir.Shape(shape)
        lower_gather(model.graph, match_embedding(next(iter(model.graph))), quantized)
        assert [n.op_type for n in model.graph] == lowered
        (actual,) = create_session(model).run(None, {"ids": ids})
        np.testing.assert_allclose(actual, restored[ids], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_bits", [8, 4])
def test_embedding_bits_quantizes_the_tables_of_a_tiny_model(tiny_model, head_bits):
    """The tiny Llama's table is tied to its head. With an 8-bit head on the same grid (both rounded
    to nearest, groups of 16) the gather reads the head's codes, scales and zero points: one copy,
    counted once; a 4-bit head leaves the table its own 8-bit codes."""
    model = tiny_model("llama")
    quantizer = QuantizeWeightsPass(method="rtn", group=16, accuracy="0", embedding_bits=8, head_bits=head_bits, bits=8)
    optimized, report = PassManager([quantizer])(model)
    record, graph = report.passes[-1], optimized.graph
    assert record.stats["embeddings_quantized"] == 1 and record.parity.max_rel <= 0.05, record.parity.describe()
    table = model.graph.initializers[next(n for n in model.graph if n.op_type == "Gather").inputs[0].name]
    gathered = [n.inputs[0] for n in graph if n.op_type == "Gather"]
    assert table.name not in graph.initializers and table.name not in {v.name for v in gathered}
    (head,) = [n for n in graph if n.op_type == "MatMulNBits" and n.attributes.get_int("N") == table.shape[0]]
    assert head.attributes.get_int("bits") == head_bits
    codes_read = [v for v in gathered if v.const_value is not None and v.const_value.dtype == ir.DataType.UINT8]
    if head_bits == 8:
        assert [v.name for v in codes_read] == [head.inputs[1].name]
        producers = {v.producer().inputs[0].name for v in gathered if v.const_value is None}
        assert producers == {head.inputs[2].name, head.inputs[3].name}  # scales, zero points reshaped
    else:
        assert len(codes_read) == 2 and head.inputs[1] not in codes_read  # codes and zero points of its own
    new_bytes = sum(v.const_value.nbytes for v in graph.initializers.values() if v.name not in model.graph.initializers)
    float_bytes = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.name not in graph.initializers
    )
    assert record.stats["bytes_after"] == new_bytes and record.stats["bytes_before"] == float_bytes
    if head_bits == 8:
        assert head.inputs[1].const_value.nbytes == table.const_value.nbytes // 4  # one byte a weight, once


def test_shared_forms_quantize_each_weight_tensor_once(tiny_model, monkeypatch):
    """Copies of a model share their weight tensors: quantized with one `SharedForms`, each tensor
    is quantized once and every copy gets the same model; a rewritten weight is a new tensor."""
    from xopt.analysis.patterns import find_linears
    from xopt.inputs import sample_inputs
    from xopt.passes import quantize
    from xopt.rewrite import set_weight, weight_in_out
    from xopt.verify import reference_outputs

    computed, form = [], quantize._Forms._form

    def counted(self, linear, *key):
        computed.append(linear.name)
        return form(self, linear, *key)

    monkeypatch.setattr(quantize._Forms, "_form", counted)
    model, shared = tiny_model("llama"), quantize.SharedForms()
    quantizer = QuantizeWeightsPass(method="rtn", accuracy="0", embedding_bits=8)
    first = quantizer.quantize(model.clone(), shared).model
    once = len(computed)
    second = quantizer.quantize(model.clone(), shared).model
    assert once == len(find_linears(model.graph)) and len(computed) == once and len(shared.tables) == 1
    feeds = sample_inputs(model, batch=1, sequence=6)
    for name, array in reference_outputs(first, feeds).items():
        np.testing.assert_array_equal(reference_outputs(second, feeds)[name], array)
    changed = model.clone()
    linear = find_linears(changed.graph)[0]
    set_weight(changed.graph, linear, 2 * weight_in_out(linear))
    third = quantizer.quantize(changed, shared).model
    assert len(computed) == once + 1  # the doubled weight only

    def scales(quantized):
        return {n.name: n.inputs[2].const_value.numpy() for n in quantized.graph if n.op_type == "MatMulNBits"}

    before, after = scales(first), scales(third)
    doubled = [name for name in before if not np.allclose(after[name], before[name])]
    assert len(doubled) == 1 and np.allclose(after[doubled[0]], 2 * before[doubled[0]], rtol=1e-6)


@pytest.mark.parametrize(
    ("options", "op", "codes"),
    [
        ({"method": "rtn", "head_bits": 4, "accuracy": "0"}, "MatMulNBits", "w_q4"),
        ({"scheme": "dynamic", "bits": 8, "smoothing": "none"}, "DynamicQuantizeMatMul", "w_int8"),
    ],
)
def test_a_weight_read_by_two_matmuls_is_quantized_and_stored_once(options, op, codes):
    """Both linears read one copy of the codes and scales, and compute what two copies of the
    weight quantized apart compute; the bytes count each weight once."""
    from helpers import weight_chain

    weight = np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32) * 0.1
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    result = QuantizeWeightsPass(**options)(weight_chain(weight))
    nodes = [n for n in result.model.graph if n.op_type == op]
    assert len(nodes) == 2 and [v.name for v in nodes[0].inputs[1:]] == [v.name for v in nodes[1].inputs[1:]]
    assert nodes[0].inputs[1].name == codes and result.stats["linears_quantized"] == 2
    stored = sum(v.const_value.nbytes for v in result.model.graph.initializers.values())
    assert result.stats["bytes_before"] == weight.nbytes and result.stats["bytes_after"] == stored
    apart = QuantizeWeightsPass(**options)(weight_chain(weight, shared=False))
    assert apart.stats["bytes_before"] == 2 * weight.nbytes and apart.stats["bytes_after"] == 2 * stored
    (actual,) = create_session(result.model).run(None, {"x": x})
    np.testing.assert_array_equal(actual, create_session(apart.model).run(None, {"x": x})[0])

"""low-rank: the factorisations' math (SVD-LLM's truncation error is the calibration output error),
rank budgets, the speed objective, and the rewrite on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_folder
from helpers import fuse_only, next_token_nll

import xopt
from xopt.calibration import SecondMoment, calibration_feeds
from xopt.errors import XoptError
from xopt.generate import Decoder
from xopt.passes import CleanupPass, FusePass, LowRankPass
from xopt.passes.low_rank import SENSITIVITY_WINDOWS, Factors, _factor_linear, factor_weight
from xopt.pipeline import PassManager
from xopt.rewrite import weight_in_out
from xopt.runnable import open_runnable


def _activations(tokens=2000, width=48, seed=0):
    """Inputs with a few large channels, as transformer activations have."""
    generator = np.random.default_rng(seed)
    x = generator.standard_normal((tokens, width)) @ generator.standard_normal((width, width)) * 0.3
    x[:, :3] *= 20
    return x


def _statistics(x):
    return SecondMoment(x.T @ x, np.abs(x).sum(axis=0), len(x))


def test_svdllm_truncation_error_is_the_output_error_and_beats_the_others():
    x = _activations()
    weight = np.random.default_rng(1).standard_normal((48, 80))
    errors = {}
    for method in ("svd", "asvd", "svdllm"):
        left, right, energy = factor_weight(weight, method, _statistics(x), damp=0.0)
        np.testing.assert_allclose(left @ right, weight, atol=1e-8)  # full rank: exact
        errors[method] = [np.sum((x @ weight - x @ left[:, :k] @ right[:k]) ** 2) for k in (8, 16, 32)]
        if method == "svdllm":
            predicted = [energy[k:].sum() for k in (8, 16, 32)]
            np.testing.assert_allclose(errors[method], predicted, rtol=1e-9)
    for k in range(3):
        assert errors["svdllm"][k] < errors["asvd"][k] < errors["svd"][k]


@pytest.fixture(scope="module")
def cleaned(tiny_model):
    return CleanupPass()(tiny_model("qwen2").clone()).model


def test_a_parameter_budget_is_met_and_the_model_still_generates(cleaned, tmp_path):
    model, report = PassManager([LowRankPass(ratio=0.3, objective="size")])(cleaned)
    stats = report.passes[0].stats
    assert stats["params_saved"] / stats["target_params"] == pytest.approx(0.3, abs=0.02)
    assert report.input.params - report.output.params == stats["params_saved"]
    assert stats["factored"] > 0
    xopt.save(model, tmp_path / "m")
    assert len(Decoder(open_runnable(tmp_path / "m")).generate([3, 5, 7], 5).tokens) == 5


def test_more_budget_costs_more_accuracy(cleaned):
    diffs = []
    for ratio in (0.1, 0.3, 0.5):
        _, report = PassManager([LowRankPass(ratio=ratio, objective="size")])(cleaned)
        diffs.append(report.passes[0].parity.max_abs)
    assert diffs[0] < diffs[1] < diffs[2]


def test_an_energy_of_one_keeps_every_matrix_dense(cleaned):
    result = LowRankPass(energy=1.0, objective="size")(cleaned.clone())
    assert not result.modified and result.stats["factored"] == 0
    assert all("saves no parameters" in line for line in result.explain[1:])


def test_sensitivity_is_the_loss_rise_of_each_matrix_truncated_alone(cleaned):
    """The switched copy's runs are the truncated models exactly: w_j·ε_j = ΔL_j (a ΔL_j ≤ 0 counts
    as the smallest positive one)."""
    low_rank = LowRankPass(ratio=0.6, allocation="sensitivity")
    linears, _ = low_rank._targets(cleaned)
    factors = [Factors(label, x, *factor_weight(weight_in_out(x), "svd", None)) for label, x in linears]
    feeds = calibration_feeds(cleaned, windows=SENSITIVITY_WINDOWS)
    weights = low_rank._sensitivities(cleaned, factors, feeds)
    base = next_token_nll(cleaned, feeds)
    rises, shares = [], []
    for f in factors:
        n, m = f.shape
        rank = int(0.4 * n * m / (n + m))
        truncated = cleaned.clone()
        own = dict(low_rank._targets(truncated)[0])[f.label]
        _factor_linear(truncated.graph, Factors(f.label, own, f.left, f.right, f.energy, rank))
        rises.append(next_token_nll(truncated, feeds) - base)
        shares.append(f.energy[rank:].sum() / f.energy.sum())
    rises = np.array(rises)
    assert np.count_nonzero(rises > 1e-4) >= 3  # random weights: truncation lowers the loss as often
    expected = np.maximum(rises, rises[rises > 0].min())
    np.testing.assert_allclose(weights * np.array(shares), expected, rtol=1e-3, atol=1e-6)


def test_sensitivity_allocation_meets_the_budget(cleaned):
    result = LowRankPass(ratio=0.3, allocation="sensitivity", objective="size")(cleaned.clone())
    assert result.stats["params_saved"] / result.stats["target_params"] == pytest.approx(0.3, abs=0.02)
    assert any(line.startswith("sensitivity") for line in result.explain)
    with pytest.raises(XoptError, match="spends a ratio"):
        LowRankPass(energy=0.9, allocation="sensitivity")(cleaned.clone())


def test_the_speed_objective_times_every_candidate(cleaned):
    result = LowRankPass(ratio=0.3, targets="up+down")(cleaned.clone())
    lines = result.explain[1:]
    assert lines and all("ms dense →" in line or "saves no parameters" in line for line in lines)
    assert all(("kept dense" in line) != ("parameters saved" in line) for line in lines)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(), "exactly one of"),
        (dict(ratio=0.2, energy=0.9), "exactly one of"),
        (dict(ratio=1.2), "must lie in"),
        (dict(ratio=0.2, targets="up+ffn"), "unknown"),
    ],
)
def test_bad_options_are_one_line_errors(cleaned, options, message):
    with pytest.raises(XoptError, match=message):
        LowRankPass(**options)(cleaned.clone())


def test_a_fused_model_is_refused(cleaned):
    fused = FusePass(lowering="all")(cleaned.clone()).model
    with pytest.raises(XoptError, match="before fuse"):
        LowRankPass(ratio=0.2)(fused)


def test_a_model_with_onnx_attention_is_refused_with_the_same_advice(tiny_model):
    fused = FusePass(lowering="all", skip=fuse_only("cached-attention"))(
        CleanupPass()(tiny_model("phi").clone()).model
    ).model
    with pytest.raises(XoptError, match=r"the graph has Attention nodes .*before fuse"):
        LowRankPass(ratio=0.2)(fused)


def test_composes_with_int8(cleaned, tmp_path):
    """The factors are linears like any other: dynamic int8 quantizes both MatMuls of a pair."""
    from xopt.passes import QuantizeWeightsPass

    model, report = PassManager(
        [LowRankPass(ratio=0.3, objective="size", targets="up+down"), QuantizeWeightsPass(scheme="dynamic", bits=8)]
    )(cleaned)
    factored = report.passes[0].stats["factored"]
    assert factored > 0
    quantized = [n for n in model.graph if n.op_type == "DynamicQuantizeMatMul"]
    assert len(quantized) >= 2 * factored
    xopt.save(model, tmp_path / "m")


def test_layers_that_share_their_weights_are_named_when_nothing_can_be_factored(tmp_path):
    config = dict(vocab_size=211, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    model = CleanupPass()(xopt.load(build_folder("AlbertConfig", config, "AlbertModel", tmp_path))).model
    with pytest.raises(XoptError, match=r"the 12 that match are Gemms or share their weights \(as ALBERT's"):
        LowRankPass(ratio=0.5)(model)

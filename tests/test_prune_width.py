"""prune-width: the interpolative decomposition's math, its predicted error against the pruned
model's, narrowed shapes on every architecture, and generation after it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import xopt
from xopt.analysis import find_transformer_structure
from xopt.calibration import calibration_feeds, probe_values
from xopt.errors import XoptError
from xopt.generate import Decoder
from xopt.passes import CleanupPass, FusePass, PruneWidthPass
from xopt.passes.prune_width import interpolative_decomposition
from xopt.pipeline import PassManager
from xopt.runnable import open_runnable


def test_interpolation_is_exact_at_the_rank_and_picks_the_pivoted_qr_columns():
    generator = np.random.default_rng(0)
    z = generator.standard_normal((500, 6)) @ generator.standard_normal((6, 20))  # rank 6, width 20
    kept, interpolation = interpolative_decomposition(z.T @ z, 6)
    np.testing.assert_allclose(z[:, kept] @ interpolation, z, atol=1e-8 * np.abs(z).max())
    np.testing.assert_allclose(interpolation[:, kept], np.eye(6), atol=1e-8)
    z = generator.standard_normal((300, 12)) * np.linspace(3, 0.1, 12)
    kept, _ = interpolative_decomposition(z.T @ z, 5)
    _, _, pivots = scipy.linalg.qr(z, mode="economic", pivoting=True)
    assert kept.tolist() == sorted(pivots[:5].tolist())


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "qwen2", "gemma"])
def test_narrowed_mlps_keep_the_model_valid_and_the_first_error_is_as_predicted(tiny_model, name):
    """Block 0's MLP sees unchanged inputs, so its output error is exactly the reported one."""
    model = CleanupPass()(tiny_model(name).clone()).model
    pruned, report = PassManager([PruneWidthPass(ratio=0.25)])(model)  # checker + strict shape inference
    record = report.passes[0]
    width = find_transformer_structure(model).blocks[0].mlp.up.out_features
    narrowed = find_transformer_structure(pruned)
    assert all(b.mlp.up.out_features == round(0.75 * width) for b in narrowed.blocks)
    assert all(b.mlp.down.in_features == round(0.75 * width) for b in narrowed.blocks)
    assert report.output.params < report.input.params
    before = find_transformer_structure(model).blocks[0].mlp.down.output
    after = narrowed.blocks[0].mlp.down.output
    feeds = calibration_feeds(model)
    full = [o[before.name] for o in probe_values(model, [before], feeds)]
    cut = [o[after.name] for o in probe_values(pruned, [after], feeds)]
    error = sum(np.sum((a - b).astype(np.float64) ** 2) for a, b in zip(full, cut, strict=True))
    energy = sum(np.sum(a.astype(np.float64) ** 2) for a in full)
    bias = find_transformer_structure(model).blocks[0].mlp.down.bias
    if bias is None:  # the reported error is relative to the output without its bias
        assert error / energy == pytest.approx(record.stats["output_error"][0], rel=1e-2, abs=1e-6)
    assert error / energy < 0.2


def test_a_width_pruned_decoder_generates(tiny_model, tmp_path):
    model = CleanupPass()(tiny_model("qwen2").clone()).model
    pruned, _ = PassManager([PruneWidthPass(ratio=0.5)], verify=False)(model)
    xopt.save(pruned, tmp_path / "m")
    assert len(Decoder(open_runnable(tmp_path / "m")).generate([3, 5, 7], 6).tokens) == 6


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2])
def test_a_ratio_outside_zero_one_is_refused(tiny_model, ratio):
    with pytest.raises(XoptError, match="between 0 and 1"):
        PruneWidthPass(ratio=ratio)(tiny_model("llama").clone())


def test_a_fused_model_is_refused(tiny_model):
    fused = FusePass(lowering="all")(CleanupPass()(tiny_model("llama").clone()).model).model
    with pytest.raises(XoptError, match="before fuse"):
        PruneWidthPass(ratio=0.5)(fused)

"""prune-width: the interpolative decomposition's math, its predicted error against the pruned
model's, narrowed shapes on every architecture, and generation after it; the same for heads."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from conftest import build_folder
from helpers import fuse_only

import xopt
from xopt.analysis import find_transformer_structure
from xopt.calibration import calibration_feeds, probe_values
from xopt.errors import XoptError
from xopt.generate import Decoder
from xopt.passes import CleanupPass, FusePass, PruneWidthPass
from xopt.passes.attention_heads import select_heads
from xopt.passes.prune_width import interpolative_decomposition, output_error
from xopt.pipeline import PassManager
from xopt.rewrite import bias_or_zeros
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


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "qwen2", "gemma", "phi3"])
def test_narrowed_mlps_keep_the_model_valid_and_the_first_error_is_as_predicted(tiny_model, name):
    """Block 0's MLP sees unchanged inputs, so its output error is exactly the reported one
    (Phi-3: one [gate | up] projection, both halves narrowed alike)."""
    model = CleanupPass()(tiny_model(name).clone()).model
    pruned, report = PassManager([PruneWidthPass(ratio=0.25)])(model)  # checker + strict shape inference
    record = report.passes[0]
    width = find_transformer_structure(model).blocks[0].mlp.down.in_features
    halves = 2 if name == "phi3" else 1
    narrowed = find_transformer_structure(pruned)
    assert all(b.mlp.up.out_features == halves * round(0.75 * width) for b in narrowed.blocks)
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


@pytest.mark.parametrize("skip", ["", fuse_only("cached-attention")])
def test_a_fused_model_is_refused(tiny_model, skip):
    fused = FusePass(lowering="all", skip=skip)(CleanupPass()(tiny_model("llama").clone()).model).model
    with pytest.raises(XoptError, match="before fuse"):
        PruneWidthPass(ratio=0.5)(fused)


def test_head_selection_keeps_what_explains_the_output_and_corrects_for_the_rest():
    """Head 1 is a linear mix of heads 0 and 2, so any three heads with head 3 reproduce the
    output exactly once W_o is corrected; every KV group keeps the same number of heads."""
    generator = np.random.default_rng(1)
    size, tokens = 4, 400
    heads = [generator.standard_normal((tokens, size)) for _ in range(4)]
    heads[1] = heads[0] @ generator.standard_normal((size, size)) + heads[2] @ generator.standard_normal((size, size))
    context = np.concatenate(heads, axis=1)
    weight = generator.standard_normal((4 * size, 6))
    kept, rows, error = select_heads(context.T @ context, weight, size, [[0, 1], [2, 3]], 1)
    assert kept[0] in (0, 1) and kept[1] in (2, 3) and error > 0.05
    kept, rows, error = select_heads(context.T @ context, weight, size, [[0, 1, 2, 3]], 3)
    assert 3 in kept.tolist()
    columns = np.concatenate([np.arange(h * size, (h + 1) * size) for h in kept])
    np.testing.assert_allclose(context[:, columns] @ rows, context @ weight, atol=1e-6 * np.abs(context @ weight).max())
    assert error < 1e-9


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "qwen2", "gemma", "gptj", "phi3", "gpt_bigcode"])
def test_pruned_heads_keep_the_model_valid_and_the_first_error_is_as_predicted(tiny_model, name):
    """GQA keeps every KV head and the same query heads per group; MHA (BERT, GPT-2's fused QKV
    and its cache) loses keys and values with the queries. Block 0's attention sees unchanged
    inputs, so its output error (bias excluded) is exactly the reported one."""
    model = CleanupPass()(tiny_model(name).clone()).model
    pruned, report = PassManager([PruneWidthPass(heads=0.5)])(model)  # checker + strict shape inference
    before, after = find_transformer_structure(model).blocks[0].attention, find_transformer_structure(pruned)
    kept = report.passes[0].stats["heads_kept"]
    assert kept < before.num_heads and all(b.attention.num_heads == kept for b in after.blocks)
    kv_heads = kept if before.num_kv_heads == before.num_heads else before.num_kv_heads
    assert all(b.attention.num_kv_heads == kv_heads for b in after.blocks)
    assert report.output.params < report.input.params
    bias = bias_or_zeros(before.o) if before.o.bias_node is None else 0.0  # a Gemm adds its bias itself
    start = before.o.node.outputs[0]
    full = [o[start.name] - bias for o in probe_values(model, [start], calibration_feeds(model))]
    first = after.blocks[0].attention.o.node.outputs[0]
    cut = [o[first.name] - bias for o in probe_values(pruned, [first], calibration_feeds(pruned))]
    error = sum(np.sum((a - b).astype(np.float64) ** 2) for a, b in zip(full, cut, strict=True))
    energy = sum(np.sum(a.astype(np.float64) ** 2) for a in full)
    assert error / energy == pytest.approx(report.passes[0].stats["head_error"][0], rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_head_pruned_decoder_generates(tiny_model, tmp_path, name):
    """With GQA the cache keeps its KV heads; GPT-2's cache narrows with its heads."""
    model = CleanupPass()(tiny_model(name).clone()).model
    pruned, _ = PassManager([PruneWidthPass(ratio=0.25, heads=0.5)], verify=False)(model)
    xopt.save(pruned, tmp_path / "m")
    assert len(Decoder(open_runnable(tmp_path / "m")).generate([3, 5, 7], 6).tokens) == 6


def test_heads_that_remove_no_head_are_refused(tiny_model):
    with pytest.raises(XoptError, match="removes no head"):
        PruneWidthPass(heads=0.1)(CleanupPass()(tiny_model("qwen2").clone()).model)  # 2 query heads per KV head


def test_neurons_silent_on_the_calibration_text_do_not_stop_the_error_estimate():
    """ReLU MLPs (OPT) have neurons that never fire on the calibration text: G has zero rows, and
    keeping more neurons than fire made the error estimate's G[S,S] singular (a traceback)."""
    rng = np.random.default_rng(0)
    activations = rng.standard_normal((64, 8))
    activations[:, [2, 5]] = 0.0
    gram = activations.T @ activations
    kept, interpolation = interpolative_decomposition(gram, 7)  # 6 neurons fire: one silent one is kept
    assert {0, 1, 3, 4, 6, 7} <= set(kept.tolist())
    assert 0.0 <= output_error(gram, kept, interpolation, rng.standard_normal((8, 4))) < 1e-9


def test_a_norm_over_a_whole_query_projection_keeps_its_heads(tiny_model):
    """OLMo-2 normalizes all of Q (and K) at once: cutting heads would change every kept head's
    normalization, so heads are refused with the reason; its MLPs still narrow."""
    model = CleanupPass()(tiny_model("olmo2").clone()).model
    with pytest.raises(XoptError, match="normalizes a whole projection across its heads"):
        PruneWidthPass(heads=0.5, windows=2)(model.clone())
    _, report = PassManager([PruneWidthPass(ratio=0.25, windows=2)])(model)
    assert report.passes[0].stats["neurons_kept"] == 60 and report.output.params < report.input.params


@pytest.mark.parametrize("name", ["mpnet", "mpt"])
def test_a_per_head_bias_on_the_scores_keeps_the_heads(name, tiny_model, tmp_path):
    """MPNet adds a relative-position bias [B, heads, S, S'] to its scores, MPT its ALiBi table
    [heads, 1, S']: cutting heads would leave that bias with the old head count, so heads are
    refused with the reason (the pass used to write a graph that failed shape inference)."""
    if name == "mpt":
        model = CleanupPass()(tiny_model("mpt").clone()).model
    else:
        config = dict(vocab_size=211, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
        model = CleanupPass()(xopt.load(build_folder("MPNetConfig", config, "MPNetModel", tmp_path))).model
    with pytest.raises(XoptError, match="adds a per-head bias from outside the attention"):
        PruneWidthPass(heads=0.5, windows=2)(model)


def test_a_fused_qkv_split_in_groups_of_heads_keeps_the_heads(tiny_model):
    """CodeGen reshapes its fused projection into 4 groups and splits each into [Q | V | K]: the
    columns of a head are not where a split of [Q | K | V] puts them, so heads are refused (the
    pass used to write a graph ONNX Runtime could not run)."""
    model = CleanupPass()(tiny_model("codegen").clone()).model
    with pytest.raises(XoptError, match="not split by a Split or by Slices of its whole last axis"):
        PruneWidthPass(heads=0.5, windows=2)(model)

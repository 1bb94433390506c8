"""fuse: merged linears and fused ORT operators at float-rounding parity; lowering by measurement."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import fuse_only, torchscript_export

from xopt.analysis import find_transformer_structure
from xopt.analysis.patterns import find_linears
from xopt.backends.lowering import LoweringChooser, cpu_identity, timed_sequence
from xopt.backends.onnxruntime import create_session, inline_proto, session_options
from xopt.errors import XoptError
from xopt.generate import CopiedCache, InPlaceCache
from xopt.inputs import sample_inputs
from xopt.kv_cache import shares_buffers
from xopt.passes import CleanupPass, FoldNormsPass, FusePass
from xopt.passes import fuse as fuse_module
from xopt.pipeline import PassManager, parse_spec
from xopt.verify import compare, reference_outputs

MS = "com.microsoft"
GQA = (MS, "GroupQueryAttention")
EXPECTED_OPS = {  # (domain, op); GPT-2's attention stays split-head, so ONNX Attention, not GQA
    "bert": {(MS, "Attention"), (MS, "BiasGelu"), (MS, "SkipLayerNormalization")},
    "gpt2": {("", "Attention"), ("", "SimplifiedLayerNormalization"), (MS, "SkipSimplifiedLayerNormalization")},
    "llama": {GQA, ("", "RotaryEmbedding"), (MS, "SkipSimplifiedLayerNormalization"), ("", "Split")},
    "qwen2": {GQA, ("", "RotaryEmbedding"), (MS, "SkipSimplifiedLayerNormalization"), ("", "Split")},
    "gemma2": {GQA, ("", "RotaryEmbedding"), (MS, "SkipSimplifiedLayerNormalization")},  # soft-capped scores
}
LAYERS = {"gpt2": 2, "llama": 2, "qwen2": 3, "gemma2": 2}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XOPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", sorted(EXPECTED_OPS))
def test_all_lowerings_keep_outputs_at_several_shapes(tiny_model, name):
    model = tiny_model(name)
    optimized, report = PassManager([CleanupPass(), FoldNormsPass(), FusePass(lowering="all")])(model)
    ops = Counter((node.domain, node.op_type) for node in optimized.graph)
    assert EXPECTED_OPS[name] <= set(ops), ops
    assert report.passes[2].parity.max_rel <= 1e-5
    for batch, sequence, past, padded in ((1, 1, 0, False), (1, 23, 0, False), (3, 9, 0, True), (2, 1, 7, True)):
        feeds = sample_inputs(model, batch=batch, sequence=sequence, past=past, padded=padded, seed=batch)
        parity = compare(reference_outputs(model, feeds), reference_outputs(optimized, feeds))
        assert parity.max_rel <= 1e-5, (batch, sequence, padded, parity)


def test_a_rule_that_breaks_the_model_is_reverted(tiny_model, monkeypatch):
    # a library rule can misfire on a graph form it was not written for (onnxscript's
    # MultiHeadAttention rule once dropped the 2-D reshape GPT-2's Conv1D Gemm reads)
    def misfire(model):
        matmul = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None)
        weight = matmul.inputs[1].const_value.numpy()
        matmul.replace_input_with(1, ir.Value(name="scaled", const_value=ir.tensor(weight * 1.5)))
        model.graph.register_initializer(matmul.inputs[1])
        return 1, []

    monkeypatch.setitem(fuse_module._APPLY, "gelu", misfire)
    cleaned = CleanupPass()(tiny_model("llama").clone()).model
    result = FusePass(lowering="all", skip=fuse_only("gelu"))(cleaned)
    assert any(line.startswith("gelu: 1 matched, reverted: ") for line in result.explain), result.explain
    assert not result.modified and not result.stats


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_cached_attention_becomes_one_onnx_attention_per_layer(tiny_model, name):
    cleaned = CleanupPass()(tiny_model(name).clone()).model
    result = FusePass(lowering="all", skip=fuse_only("cached-attention"))(cleaned)
    ops = Counter((node.domain, node.op_type) for node in result.model.graph)
    assert result.stats == {"cached-attention": LAYERS[name]} and ops[("", "Attention")] == LAYERS[name]
    matmuls_before = Counter(n.op_type for n in cleaned.graph)["MatMul"]
    assert ops[("", "Softmax")] == 0 and ops[("", "MatMul")] == matmuls_before - 2 * LAYERS[name]  # Q·Kᵀ, P·V
    assert result.model.opset_imports[""] == 23
    assert [v.name for v in result.model.graph.outputs] == [v.name for v in cleaned.graph.outputs]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "gemma2"])
def test_cached_attention_after_rotary_reads_merged_heads(tiny_model, name):
    # Q, K, V and Y stay [B, S, H·d]: the head-splitting Reshape/Transpose pairs go, RoPE included
    cleaned = CleanupPass()(tiny_model(name).clone()).model
    before = Counter(n.op_type for n in cleaned.graph)
    result = FusePass(lowering="all", skip=fuse_only("rotary", "cached-attention"))(cleaned)
    ops = Counter(n.op_type for n in result.model.graph)
    attentions = [n for n in result.model.graph if n.op_type == "Attention"]
    layers = len(attentions)
    assert layers and all(len(n.inputs[0].shape) == 3 and n.attributes.get_int("q_num_heads") for n in attentions)
    assert all(n.attributes.get_int("num_heads") for n in result.model.graph if n.op_type == "RotaryEmbedding")
    assert ops["Transpose"] == before["Transpose"] - 5 * layers  # 4 head splits/merges + Kᵀ per layer
    _assert_same_decoder_outputs(cleaned, result.model)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_group_query_attention_steps_alike_with_a_copied_and_an_in_place_cache(tiny_model, name):
    cleaned = CleanupPass()(tiny_model(name).clone()).model
    attention = FusePass(lowering="all", skip=fuse_only("rotary", "cached-attention"))(cleaned).model  # merged heads
    result = FusePass(lowering="all", skip=fuse_only("group-query-attention"))(attention.clone())
    ops = Counter((node.domain, node.op_type) for node in result.model.graph)
    assert result.stats == {"group-query-attention": LAYERS[name]} and ops[GQA] == LAYERS[name]
    assert not shares_buffers(attention) and shares_buffers(result.model)  # the past's Shape readers are gone too
    session = create_session(result.model, threads=1)
    copied, in_place = CopiedCache(session, result.model), InPlaceCache(session, result.model, capacity=16)
    ids = [[3, 1, 4, 1, 5, 9]]
    for length in range(6, 16):  # prefill, then a token a step, the argmax of the last one
        feeds = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.ones((1, length), np.int64)}
        expected, actual = copied.run(feeds), in_place.run(feeds)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
        ids = [[int(expected[0, -1].argmax())]]


def test_rotary_embeddings_of_q_and_k_become_onnx_rotary_embedding(tiny_model):
    cleaned = CleanupPass()(tiny_model("qwen2").clone()).model
    result = FusePass(lowering="all", skip=fuse_only("rotary"))(cleaned)
    ops = Counter((node.domain, node.op_type) for node in result.model.graph)
    assert result.stats == {"rotary": 6} and ops[("", "RotaryEmbedding")] == 6 and ops[("", "Neg")] == 0
    assert ops[("", "Slice")] < Counter(n.op_type for n in cleaned.graph)["Slice"]  # halves of cos/sin: 2 Slices


@pytest.mark.parametrize(
    ("name", "families", "heads"),
    [
        # Cohere rotates pairs (x[2i], x[2i+1]) of x [B, H, S, d]: RotaryEmbedding(interleaved=1) on
        # the even entries of its tables; cached-attention merges the heads (4 for Q, 2 for K)
        ("cohere", {"rotary": 4, "cached-attention": 2}, {4, 2}),
        # GPT-J rotates the first 6 dims of x [B, S, H, d] in pairs: RotaryEmbedding takes it as [B, S, H·d]
        ("gptj", {"rotary": 4}, {4}),
    ],
)
def test_interleaved_rotary_embeddings_lower(tiny_model, name, families, heads):
    cleaned = CleanupPass()(tiny_model(name).clone()).model
    result = FusePass(lowering="all", skip=fuse_only(*families))(cleaned.clone())
    rotations = [n for n in result.model.graph if n.op_type == "RotaryEmbedding"]
    assert result.stats == families and len(rotations) == 4
    assert all(n.attributes.get_int("interleaved") == 1 for n in rotations)
    assert {n.attributes.get_int("num_heads") for n in rotations} == heads
    _assert_same_decoder_outputs(cleaned, result.model)


@pytest.mark.parametrize("name", ["gpt_neox", "phi", "gptj"])
def test_a_rotation_of_part_of_each_head_takes_the_whole_head(tiny_model, name):
    """Concat(rotation of x[..., :r], x[..., r:]) → RotaryEmbedding(x, rotary_embedding_dim=r):
    the Slices and the Concat go (GPT-NeoX and Phi rotate half of each 12-wide head, GPT-J 6 dims)."""
    cleaned = CleanupPass()(tiny_model(name).clone()).model
    result = FusePass(lowering="all", skip=fuse_only("rotary"))(cleaned.clone())
    rotations = [n for n in result.model.graph if n.op_type == "RotaryEmbedding"]
    assert result.stats == {"rotary": 4} and len(rotations) == 4
    assert {n.attributes.get_int("rotary_embedding_dim") for n in rotations} == {6}
    for node in rotations:  # reads the whole head, and nothing appends the unrotated rest to it
        assert node.inputs[0].producer().op_type != "Slice"
        readers = [reader for reader, _ in node.outputs[0].uses()]
        assert not any(r.op_type == "Concat" and r.attributes.get_int("axis") in (-1, 3) for r in readers)
    _assert_same_decoder_outputs(cleaned, result.model)


def test_a_mask_added_before_the_scale_is_scaled_with_the_scores(tiny_model):
    """CodeGen computes softmax((Q·Kᵀ + M) / √d): `Attention` gets scale 1/√d and the mask M/√d."""
    cleaned = CleanupPass()(tiny_model("codegen").clone()).model
    result = FusePass(lowering="all", skip=fuse_only("cached-attention"))(cleaned.clone())
    attentions = [n for n in result.model.graph if n.op_type == "Attention"]
    assert result.stats == {"cached-attention": 2} and len(attentions) == 2
    for node in attentions:
        assert node.attributes.get_float("scale") == pytest.approx(12**-0.5)
        assert node.inputs[3].producer().op_type == "Mul"
    _assert_same_decoder_outputs(cleaned, result.model)


def test_a_masked_fill_and_an_alibi_bias_become_the_attention_mask(tiny_model):
    """MPT fills masked scores with float32's lowest value, Where(c, m, s·Q·Kᵀ + ALiBi): `Attention`
    gets the mask Where(c, m, 0) + ALiBi, per head."""
    cleaned = CleanupPass()(tiny_model("mpt").clone()).model
    result = FusePass(lowering="all", skip=fuse_only("cached-attention"))(cleaned.clone())
    attentions = [n for n in result.model.graph if n.op_type == "Attention"]
    assert result.stats == {"cached-attention": 2} and len(attentions) == 2
    for node in attentions:
        mask = node.inputs[3]
        assert mask.producer().op_type == "Add" and mask.shape[1] == 4  # the heads of the ALiBi bias
        assert "Where" in {v.producer().op_type for v in mask.producer().inputs}
    _assert_same_decoder_outputs(cleaned, result.model)


def test_attention_with_the_heads_in_the_batch_axis_is_read_through_the_folds(tiny_model):
    """Bloom folds the heads into the batch axis, [B·H, S, d], for β·Q·Kᵀ + ALiBi and P·V: the
    folds go, `Attention` reads Q, K, V as [B, H, S, d], and the ALiBi bias [B·H, 1, T] is unfolded
    once into the per-head mask [B, H, S, T] for every block."""
    cleaned = CleanupPass()(tiny_model("bloom").clone()).model
    result = FusePass(lowering="all", skip=fuse_only("cached-attention"))(cleaned.clone())
    attentions = [n for n in result.model.graph if n.op_type == "Attention"]
    assert result.stats == {"cached-attention": 2} and len(attentions) == 2
    masks = [node.inputs[3].producer() for node in attentions]
    assert all(mask.op_type == "Add" and mask.outputs[0].shape[1] == 4 for mask in masks)
    unfolded = {v for mask in masks for v in mask.inputs if v.producer().op_type == "Reshape"}
    assert len(unfolded) == 1  # one ALiBi bias, unfolded once
    ops = Counter(n.op_type for n in result.model.graph)
    assert ops["MatMul"] == Counter(n.op_type for n in cleaned.graph)["MatMul"] - 4 and ops["Softmax"] == 0
    _assert_same_decoder_outputs(cleaned, result.model)


@pytest.mark.parametrize("name", ["bloom", "gpt_neox", "falcon", "falcon_new"])
def test_a_projection_that_interleaves_the_heads_feeds_the_merged_attention(tiny_model, name):
    """Bloom ([B, S, H, 3, d], Gather), GPT-NeoX ([B, S, H, 3d], Split) and Falcon ([B, S, H + 2, d],
    Slice and GatherND; the new architecture [B, S, KV, H/KV + 2, d], each KV head expanded to its
    group) pick each head of Q, K and V out of one projection: its columns reordered to [Q | K | V],
    `Attention` reads the three in the merged [B, S, n·d] layout (GPT-NeoX and Falcon through their
    RotaryEmbedding)."""
    cleaned = CleanupPass()(tiny_model(name).clone()).model
    result = FusePass(lowering="all", skip=fuse_only("rotary", "cached-attention"))(cleaned.clone())
    attentions = [n for n in result.model.graph if n.op_type == "Attention"]
    assert result.stats["cached-attention"] == 2 and len(attentions) == 2
    for node in attentions:
        assert node.attributes.get_int("q_num_heads") == 4
        assert all(len(v.shape) == 3 for v in node.inputs[:3]) and len(node.outputs[0].shape) == 3
        sources = {v.producer().op_type for v in node.inputs[:3]} - {"RotaryEmbedding"}
        assert sources == {"Split"}, sources
    assert Counter(n.op_type for n in result.model.graph)["Transpose"] <= 1  # at most the tied head's weight
    _assert_same_decoder_outputs(cleaned, result.model)


@pytest.mark.parametrize("name, families", [("qwen3", ("norm", "rotary")), ("gptj", ("rotary",))])
def test_heads_transposed_after_per_head_work_are_merged_by_a_reshape(tiny_model, name, families):
    """Qwen-3 norms each head of Q and K, GPT-J rotates them in the 3-D form, before the transpose
    to [B, H, S, d]: `Attention` reads that [B, S, H, d] value reshaped to [B, S, H·d], no Transpose."""
    cleaned = CleanupPass()(tiny_model(name).clone()).model
    result = FusePass(lowering="all", skip=fuse_only(*families, "cached-attention"))(cleaned.clone())
    attentions = [n for n in result.model.graph if n.op_type == "Attention"]
    assert result.stats["cached-attention"] == 2 and len(attentions) == 2
    for node in attentions:
        assert node.attributes.get_int("q_num_heads") == 4 and all(len(v.shape) == 3 for v in node.inputs[:3])
    assert Counter(n.op_type for n in result.model.graph)["Transpose"] <= 1  # at most the tied head's weight
    _assert_same_decoder_outputs(cleaned, result.model)


def test_kv_heads_expanded_before_the_cache_reach_group_query_attention(tiny_model):
    """Falcon's new architecture caches each KV head once per query head of its group: the merged
    projection computes those copies, GroupQueryAttention reads as many KV heads as the cache holds."""
    cleaned = CleanupPass()(tiny_model("falcon_new").clone()).model
    families = fuse_only("rotary", "cached-attention", "group-query-attention")
    result = FusePass(lowering="all", skip=families)(cleaned.clone())
    nodes = [n for n in result.model.graph if n.op_type == "GroupQueryAttention"]
    assert result.stats["group-query-attention"] == 2 and len(nodes) == 2
    assert all(n.attributes.get_int("num_heads") == n.attributes.get_int("kv_num_heads") == 4 for n in nodes)
    for batch, sequence, past in [(1, 5, 4), (2, 7, 0), (2, 1, 6)]:  # the shapes its CPU kernel runs
        feeds = sample_inputs(cleaned, batch=batch, sequence=sequence, past=past, padded=batch > 1, seed=3)
        parity = compare(reference_outputs(cleaned, feeds), reference_outputs(result.model, feeds))
        assert parity.max_rel <= 1e-5, parity


def test_a_masked_fill_that_adding_would_change_is_left_alone(tiny_model):
    """Where(c, −10⁴, x) is not x + Where(c, −10⁴, 0) where every key is masked: no rewrite."""
    cleaned = CleanupPass()(tiny_model("mpt").clone()).model
    for node in cleaned.graph:
        if node.op_type == "Where" and node.outputs[0].uses()[0].node.op_type == "Softmax":
            node.replace_input_with(1, ir.Value(name=f"{node.name}_fill", const_value=ir.tensor(np.float32(-1e4))))
            cleaned.graph.register_initializer(node.inputs[1])
    result = FusePass(lowering="all", skip=fuse_only("cached-attention"))(cleaned)
    assert "cached-attention" not in result.stats
    assert "cached-attention: block 0: the masked fill's value is not a constant −∞" in "\n".join(result.explain)


def test_cached_attention_leaves_an_encoder_alone(tiny_model):
    result = FusePass(lowering="all", skip="norm,attention,gelu")(CleanupPass()(tiny_model("bert").clone()).model)
    assert "cached-attention: no match" in result.explain and "cached-attention" not in result.stats


@pytest.mark.parametrize("name, pinned", [("llama", False), ("gpt2", False), ("llama", True)])
def test_norms_of_residual_sums_absorb_the_add(tiny_model, name, pinned):
    """skip-norm fuses the residual Add, or the Sum that residual-sum made of it (`pinned`)."""
    folded = FoldNormsPass()(CleanupPass()(tiny_model(name).clone()).model).model
    lowered = FusePass(lowering="all", skip=fuse_only("norm", *(["residual-sum"] if pinned else [])))
    normed = lowered(folded.clone()).model
    result = FusePass(lowering="all", skip=fuse_only("skip-norm"))(normed)
    ops = Counter(n.op_type for n in result.model.graph)
    residual_sums = 2 * LAYERS[name]  # before each block's second norm, the next block's first, the final norm
    assert result.stats == {"skip-norm": residual_sums} and ops["SkipSimplifiedLayerNormalization"] == residual_sums
    before = Counter(n.op_type for n in normed.graph)
    assert before["Sum"] == (residual_sums if pinned else 0) and ops["Sum"] == 0
    assert ops["Add"] == before["Add"] - (0 if pinned else residual_sums)
    _assert_same_decoder_outputs(folded, result.model, seed=4)


def _assert_same_decoder_outputs(before: ir.Model, after: ir.Model, seed: int = 3) -> None:
    """Padded rows of 5 tokens on a 4-token past give the same outputs, within 1e-5 relative."""
    feeds = sample_inputs(before, batch=2, sequence=5, past=4, padded=True, seed=seed)
    parity = compare(reference_outputs(before, feeds), reference_outputs(after, feeds))
    assert parity.max_rel <= 1e-5, parity


def _session_ops(model: ir.Model, tmp_path) -> Counter:
    """The operators of the graph ONNX Runtime runs once its session optimizer has rewritten it."""
    path = tmp_path / "session-optimized.onnx"
    options = session_options(threads=1)
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(inline_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in ir.load(path).graph)


def test_residual_sums_keep_onnx_runtime_from_fusing_the_norms(tiny_model, tmp_path):
    cleaned = CleanupPass()(tiny_model("bert").clone()).model
    under_norms = sum(
        n.op_type == "LayerNormalization" and n.inputs[0].producer().op_type == "Add" for n in cleaned.graph
    )
    result = FusePass(lowering="all", skip=fuse_only("residual-sum"))(cleaned.clone())
    ops = Counter(n.op_type for n in result.model.graph)
    assert result.stats == {"residual-sum": under_norms} and ops["Sum"] == under_norms == 5  # embeddings, 2 per block
    feeds = sample_inputs(cleaned, batch=2, sequence=7, padded=True, seed=3)
    parity = compare(reference_outputs(cleaned, feeds), reference_outputs(result.model, feeds))
    assert parity.max_rel <= 1e-5, parity
    assert _session_ops(cleaned, tmp_path)["SkipLayerNormalization"] > 0  # what the Sum is there to prevent
    pinned = _session_ops(result.model, tmp_path)
    assert pinned["SkipLayerNormalization"] == 0 and pinned["LayerNormalization"] == under_norms


def test_skip_norm_that_lost_to_residual_sums_is_not_tried_with_them(tiny_model, monkeypatch):
    def speedup(self, current, candidate):  # only the pinned Sums are faster than what they replace
        gains = "Sum" in {n.op_type for n in candidate.graph} - {n.op_type for n in current.graph}
        return (1.2, 1.0) if gains else (1.0, 1.0)

    monkeypatch.setattr(LoweringChooser, "_measure", speedup)
    result = FusePass()(CleanupPass()(tiny_model("bert").clone()).model)
    assert result.stats["residual-sum"] == 5 and "skip-norm" not in result.stats
    together = [line for line in result.explain if " together: " in line]
    assert together and together[0].startswith("attention+gelu+residual-sum together"), together


def test_a_token_type_table_does_not_bound_the_timed_sequence(tiny_model):
    model = tiny_model("bert")
    structure = find_transformer_structure(model)
    positions = [e.rows for e in structure.embeddings if e is not structure.token_embedding and e.rows > 2]
    assert len(structure.embeddings) == 3 and len(positions) == 1  # tokens, token types (2 rows), positions
    assert timed_sequence(model, structure, 10_000) == positions[0] - 1
    assert timed_sequence(model, structure, 16) == 16


def test_merges_stack_the_projections(tiny_model):
    result = FusePass(lowering="all", skip=fuse_only("merge-qkv", "merge-gate-up"))(tiny_model("llama").clone())
    assert result.stats == {"merge-qkv": 2, "merge-gate-up": 2}
    splits = [n for n in result.model.graph if n.op_type == "Split"]
    widths = sorted(tuple(int(x) for x in n.inputs[1].const_value.numpy()) for n in splits)
    assert widths == [(48, 16, 16)] * 2 + [(80, 80)] * 2  # 6 heads × 8, 2 KV heads × 8; gate, up


def test_measured_lowering_is_cached_and_a_slower_form_is_reverted(tiny_model, monkeypatch, tmp_path):
    timed = []

    def slower(self, current, candidate):
        timed.append(1)
        return 2.0, 4.0  # ms: the candidate takes twice as long

    monkeypatch.setattr(LoweringChooser, "_measure", slower)
    model = tiny_model("llama").clone()
    result = FusePass()(model)
    assert not result.modified and result.stats["norm speedup"] == 0.5
    assert any("reverted (not faster)" in line for line in result.explain)
    assert (tmp_path / "cache" / "lowering.json").is_file()
    first = len(timed)
    assert first == sum("measured speedup 0.500" in line for line in result.explain) >= 3
    again = FusePass()(model)
    assert len(timed) == first and any("cached speedup 0.500" in line for line in again.explain)


@pytest.mark.parametrize("faster", [False, True])
def test_faithfulness_is_checked_before_a_family_is_timed_and_once_in_the_output_where_verdicts_are_cached(
    tiny_model, monkeypatch, faster
):
    checked = []
    check = fuse_module._Faithfulness.breakage
    monkeypatch.setattr(fuse_module._Faithfulness, "breakage", lambda self, c: checked.append(1) or check(self, c))
    monkeypatch.setattr(
        LoweringChooser, "_measure", lambda self, current, candidate: (3.0, 2.0) if faster else (2.0, 4.0)
    )
    model = tiny_model("llama").clone()
    first = FusePass()(model)
    timed_first = sum("measured speedup" in line for line in first.explain)
    assert timed_first >= 3 and len(checked) == timed_first
    checked.clear()
    again = FusePass()(model)
    assert again.explain == [line.replace("measured", "cached") for line in first.explain]
    assert len(checked) == (1 if faster else 0)  # the output, where cached verdicts kept forms


def test_a_form_kept_by_a_cached_verdict_that_breaks_the_outputs_is_found_and_reverted(tiny_model, monkeypatch):
    """The forms a cached verdict keeps are checked in the pass's output, not one by one; where that
    output breaks, the pass runs again checking each, and the broken form is reverted."""
    monkeypatch.setattr(LoweringChooser, "_measure", lambda self, current, candidate: (3.0, 2.0))
    model = tiny_model("llama").clone()
    first = FusePass()(model)
    assert first.stats["norm"] > 0 and first.stats["merge-qkv"] > 0

    def norm_then_doubled_weights(candidate):
        count, notes = fuse_module._APPLY["norm"](candidate)
        for value in candidate.graph.initializers.values():
            if value.const_value.dtype == ir.DataType.FLOAT and len(value.shape) == 2:
                value.const_value = ir.tensor(value.const_value.numpy() * 2)
        return count, notes

    broken_appliers = {**fuse_module._appliers("float"), "norm": norm_then_doubled_weights}
    monkeypatch.setattr(fuse_module, "_appliers", lambda weights: broken_appliers)
    again = FusePass()(model)
    assert again.explain[0].startswith("the forms kept by cached verdicts, checked once together: outputs differ")
    assert any(line.startswith("norm: ") and "reverted: outputs differ" in line for line in again.explain)
    assert "norm" not in again.stats and again.stats["merge-qkv"] == first.stats["merge-qkv"]
    feeds = sample_inputs(model, batch=2, sequence=5, padded=True, seed=1)
    assert compare(reference_outputs(model, feeds), reference_outputs(again.model, feeds)).max_rel <= 1e-5


@pytest.mark.parametrize("damage", ["[1, 2]", "not json", "entries"])
def test_a_damaged_lowering_cache_is_measured_again_and_rewritten(tiny_model, monkeypatch, tmp_path, damage):
    """A cache file that is not a JSON object, or entries that are not two timings, count as not
    cached: the families are timed (not reverted by an error) and the file is written over."""
    monkeypatch.setattr(LoweringChooser, "_measure", lambda self, current, candidate: (3.0, 2.0))
    model = tiny_model("llama").clone()
    cache = tmp_path / "cache" / "lowering.json"
    FusePass()(model)
    if damage == "entries":
        cache.write_text(json.dumps({key: "fast" for key in json.loads(cache.read_text())}))
    else:
        cache.write_text(damage)
    result = FusePass()(model)
    assert result.modified and not any("timing failed" in line for line in result.explain), result.explain
    assert any("measured speedup 1.500" in line for line in result.explain)
    assert all(times == [3.0, 2.0] for times in json.loads(cache.read_text()).values())


def test_cached_verdicts_tell_apart_chips_sold_under_one_name():
    """A VM's generic CPU name covers several chip generations; their verdicts are kept apart."""
    xeon = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\ncpu family\t: 6\nmodel\t\t: {}\n"
    xeon += "stepping\t: 4\ncache size\t: 16384 KB\nflags\t\t: fpu avx avx2 avx512f avx512_vnni fma sse4_2\n"
    older, newer = cpu_identity(xeon.format(106)), cpu_identity(xeon.format(143))
    assert older != newer and older.startswith("Intel(R) Xeon(R) Processor 6/106/4/16384 KB")
    assert older.endswith("avx avx2 avx512_vnni avx512f fma")  # the vector flags, sorted; not sse4_2


def test_the_attention_operator_reads_its_qkv_bias_as_one_initializer(tiny_model):
    """onnxscript's fusion concatenates the Q, K, V biases with a Concat of constants; fuse stores
    the result (ONNX Runtime would fold it at every session start, and the file held both)."""
    result = FusePass(lowering="all")(CleanupPass()(tiny_model("bert").clone()).model)
    attentions = [n for n in result.model.graph if n.op_type == "Attention"]
    assert len(attentions) == 2 and all(n.inputs[2].const_value is not None for n in attentions)
    constant_concats = [
        n for n in result.model.graph if n.op_type == "Concat" and all(v.const_value is not None for v in n.inputs)
    ]
    assert not constant_concats


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_a_quantizing_recipe_keeps_the_encoder_projections_as_linears(tiny_model, weights):
    """An `Attention` holds Q, K and V's weights itself, where no quantization reaches them (on a CI
    machine MiniLM's int8 model kept them in float: 33.3 MB, not 25.4): with quantized weights the
    attention becomes a MultiHeadAttention after the linears, Q, K and V merged into one or not."""
    cleaned = CleanupPass()(tiny_model("bert").clone()).model
    linears = len(find_linears(cleaned.graph))
    feeds = sample_inputs(cleaned, batch=2, sequence=9, padded=True, seed=3)
    for skip, merged in (("", 2), ("merge-qkv", 0)):
        result = FusePass(lowering="all", weights=weights, skip=skip)(cleaned.clone())
        ops = Counter(n.op_type for n in result.model.graph)
        assert ops["MultiHeadAttention"] == 2 and not ops["Attention"] and result.stats["attention"] == 2
        assert result.stats.get("merge-qkv", 0) == merged
        assert len(find_linears(result.model.graph)) == linears - 2 * merged  # three linears become one
        assert compare(reference_outputs(cleaned, feeds), reference_outputs(result.model, feeds)).max_rel <= 1e-5


def test_measured_faster_form_is_kept(tiny_model, monkeypatch):
    monkeypatch.setattr(LoweringChooser, "_measure", lambda self, current, candidate: (3.0, 2.0))
    result = FusePass()(CleanupPass()(tiny_model("bert").clone()).model)
    assert result.modified and result.stats["attention"] == 2 and result.stats["attention speedup"] == 1.5


def test_real_timing_runs_both_forms(tiny_model):
    # Each half of the timing takes the median of its rounds: 3 per half, so one run slowed by
    # another process cannot decide it.
    chooser = LoweringChooser(threads=1, batch=1, sequence=8, rounds=6, warmup=1)
    model = tiny_model("bert")
    current_ms, candidate_ms = chooser._measure(model, model.clone())
    assert current_ms > 0 and candidate_ms > 0 and 0.2 < current_ms / candidate_ms < 5


def _scripted_timings(monkeypatch, speedups):
    """`time_interleaved` replaced: each call (one half of a measurement) reads the next speedup,
    the current form taking that many ms to the candidate's 1."""
    import xopt.bench as bench

    def timings(runners, rounds, warmup):
        speedup = speedups.pop(0)
        return [bench.Timing(label, speedup if label.startswith("current") else 1.0, 0, 0, rounds) for label in runners]

    monkeypatch.setattr(bench, "time_interleaved", timings)


@pytest.mark.parametrize(
    ("lossy", "speedups", "expected"),
    [
        (False, [1.07, 1.07, 1.045, 1.045], (1.07 + 2 * 1.045) / 3),  # near 1.05: again, averaged by rounds
        (True, [1.07, 1.07, 1.045, 1.045], 1.045),  # lossy: the lower of the two measurements
        (True, [1.045, 1.045, 1.07, 1.07], 1.045),
        (True, [1.09, 1.09], 1.09),  # clear of the threshold: measured once
        (False, [1.0, 1.0], 1.0),
    ],
)
def test_a_verdict_near_the_threshold_is_measured_again(tiny_model, monkeypatch, tmp_path, lossy, speedups, expected):
    _scripted_timings(monkeypatch, speedups)
    options = {"min_speedup": 1.05, "lossy": lossy, "cache_dir": tmp_path}
    chooser = LoweringChooser(threads=1, sequence=8, rounds=4, warmup=0, **options)
    model = tiny_model("bert")
    verdict = chooser.choose("family", {}, model, model.clone())
    assert not speedups  # every scripted half was measured
    assert verdict.speedup == pytest.approx(expected) and verdict.keep == (expected >= 1.05)
    assert chooser.cached("family", {}, model, model.clone()).speedup == pytest.approx(expected)


def test_lossy_verdicts_are_cached_apart(tiny_model, monkeypatch, tmp_path):
    """A verdict held to both measurements is not the one a plain chooser made for the same forms."""
    _scripted_timings(monkeypatch, [1.2, 1.2])
    model = tiny_model("bert")
    LoweringChooser(threads=1, sequence=8, rounds=4, warmup=0, cache_dir=tmp_path).choose("family", {}, model, model)
    lossy = LoweringChooser(threads=1, sequence=8, rounds=4, warmup=0, lossy=True, cache_dir=tmp_path)
    assert lossy.cached("family", {}, model, model) is None


def test_a_form_timed_again_reuses_its_session_and_each_form_is_timed_as_the_newer(tiny_model, monkeypatch):
    """fuse times each family against the previous verdict's form: that form's session is kept,
    the other one released. Of two sessions of one model the one created first runs slower, so
    the second half of each measurement times a new session of the form whose session is older."""
    import xopt.backends.lowering as lowering

    loaded = []
    create = lowering.create_session
    monkeypatch.setattr(
        lowering, "create_session", lambda model, **options: loaded.append(model) or create(model, **options)
    )
    chooser = LoweringChooser(threads=1, batch=1, sequence=8, rounds=2, warmup=0, min_speedup=100)  # no near tie
    first, second, third = (tiny_model("bert").clone() for _ in range(3))
    chooser._measure(first, second)
    assert loaded == [first, second, first]
    chooser._measure(second, third)
    assert loaded[3:] == [third, second]
    chooser._measure(first, third)
    assert loaded[5:] == [first, third]
    assert [kept.model for kept in chooser._sessions.values()] == [first, third]


@pytest.mark.parametrize(("weights", "kernel"), [("int4", "MatMulNBits"), ("int8", "DynamicQuantizeMatMul")])
def test_quantized_weights_time_each_family_next_to_quantized_linears(tiny_model, monkeypatch, weights, kernel):
    """fuse(weights=int4|int8) times copies of both forms with their linears quantized (the models
    it keeps stay float), and its verdicts are cached apart from the float ones."""
    timed = []
    measure = LoweringChooser._measure

    def spy(self, current, candidate):
        timed.append((self.context_name, current, self.context(current.clone())))
        return measure(self, current, candidate)

    monkeypatch.setattr(LoweringChooser, "_measure", spy)
    monkeypatch.setattr(LoweringChooser, "rounds", 1)
    monkeypatch.setattr(LoweringChooser, "warmup", 0)
    model = tiny_model("llama").clone()
    result = FusePass(weights=weights, sequence=8)(model.clone())
    assert timed and all(name.startswith(weights) for name, _, _ in timed)

    def linears(graph):
        from xopt.analysis.patterns import find_linears

        return len(find_linears(graph))

    for _, current, as_timed in timed:
        assert linears(current.graph) > 0 and not any(n.op_type == kernel for n in current.graph)
        assert linears(as_timed.graph) == 0 and any(n.op_type == kernel for n in as_timed.graph)
    assert not any(n.op_type == kernel for n in result.model.graph)
    inside = []
    monkeypatch.setattr(
        LoweringChooser, "_measure", lambda self, current, candidate: inside.append(self.context_name) or (1.0, 1.0)
    )
    FusePass(sequence=8)(model.clone())
    assert inside and set(inside) == {""}  # float verdicts are not the quantized ones


def test_a_context_is_timed_on_copies(tiny_model):
    seen = []

    def quantized(model):
        from xopt.passes.fuse import WEIGHTS, _Quantized

        seen.append(sum(n.op_type == "MatMul" for n in model.graph))
        return _Quantized(WEIGHTS["int4"][0])(model)

    chooser = LoweringChooser(threads=1, batch=1, sequence=8, rounds=2, warmup=1, context=quantized)
    model = tiny_model("llama")
    before = [n.op_type for n in model.graph]
    current_ms, candidate_ms = chooser._measure(model, model.clone())
    assert current_ms > 0 and candidate_ms > 0 and len(seen) == 2 and seen[0] > 0
    assert [n.op_type for n in model.graph] == before


def test_bad_options_are_named(tiny_model):
    with pytest.raises(XoptError, match="unknown family 'bogus'"):
        FusePass(skip="bogus")(tiny_model("bert").clone())
    with pytest.raises(XoptError, match="unknown family 'bogus'"):  # "+" separates families in a pass spec
        parse_spec("fuse(lowering=all,skip=norm+bogus)")[0](tiny_model("bert").clone())
    with pytest.raises(XoptError, match="unknown lowering 'sometimes'"):
        FusePass(lowering="sometimes")(tiny_model("bert").clone())
    for option in ({"batch": -1}, {"sequence": 0}, {"threads": 0}):
        with pytest.raises(XoptError, match="threads, batch and sequence"):
            FusePass(**option)(tiny_model("bert").clone())


@pytest.mark.parametrize("name", ["gpt2", "mpt"])
def test_the_context_bounds_the_timed_sequence(tiny_model, name):
    # tiny GPT-2 has 64 learned positions, tiny MPT an ALiBi table of 64: a prefill of 128, or a
    # decode step at position 64, cannot run
    result = FusePass()(CleanupPass()(tiny_model(name).clone()).model)
    timed = [line for line in result.explain if "speedup" in line]
    assert timed and not any("timing failed" in line for line in result.explain), result.explain


def test_input_model_is_not_modified(tiny_model):
    model = tiny_model("qwen2")
    feeds = sample_inputs(model)
    before = reference_outputs(model, feeds)
    ops_before = Counter(n.op_type for n in model.graph)
    PassManager([FusePass(lowering="all")])(model)
    assert Counter(n.op_type for n in model.graph) == ops_before
    after = reference_outputs(model, feeds)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_families_too_small_alone_are_kept_together(tiny_model, monkeypatch):
    def speedup(self, current, candidate):
        ops = {n.op_type for n in candidate.graph}
        return (1.5, 1.0) if {"SimplifiedLayerNormalization", "GroupQueryAttention", "Split"} <= ops else (1.0, 1.0)

    monkeypatch.setattr(LoweringChooser, "_measure", speedup)
    result = FusePass()(CleanupPass()(tiny_model("qwen2").clone()).model)
    together = [line for line in result.explain if " together: " in line]
    families = "norm+rotary+merge-qkv+merge-gate-up+cached-attention+group-query-attention+residual-sum+skip-norm"
    assert together and together[0].startswith(families + " together") and together[0].endswith(": kept")
    assert result.modified and result.stats["norm"] == 7 and result.stats["merge-gate-up"] == 3


def test_a_family_chained_after_its_prerequisites_says_why_it_was_not_timed(tiny_model, monkeypatch):
    monkeypatch.setattr(LoweringChooser, "_measure", lambda self, current, candidate: (1.0, 1.0))
    gpt2 = FusePass(positions="contiguous")(CleanupPass()(tiny_model("gpt2").clone()).model)
    chain = "rotary-attention after rotary, cached-attention, group-query-attention"
    assert f"{chain}: rotary matched nothing there, not timed" in gpt2.explain
    llama = FusePass(positions="contiguous", skip="rotary")(CleanupPass()(tiny_model("llama").clone()).model)
    assert "rotary-attention: needs rotary, skipped (option)" in llama.explain
    assert "rotary-attention" not in llama.stats and "rotary" not in llama.stats


def _fake_load(contended, cores: str):
    """An `OtherLoad` stand-in whose successive spans are contended as `contended` says."""

    class FakeLoad:
        def __init__(self, threads):
            self.contended = next(contended)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def describe(self):
            return f"other processes took {cores} of 2 CPUs"

    return FakeLoad


def test_a_verdict_measured_under_load_is_used_but_not_cached(tiny_model, monkeypatch, caplog):
    """Timings taken while other processes compete for the cores hold for this run only."""
    from xopt.backends import lowering

    timed, waits = [], []
    monkeypatch.setattr(lowering, "OtherLoad", _fake_load(itertools.repeat(True), "1.6"))
    monkeypatch.setattr(lowering, "WAIT_BUDGET", lowering.WaitBudget(seconds=60.0))
    monkeypatch.setattr(lowering, "wait_until_quiet", lambda threads, patience: waits.append(patience) or (True, 25.0))
    monkeypatch.setattr(LoweringChooser, "_measure", lambda self, current, candidate: timed.append(1) or (2.0, 4.0))
    model = tiny_model("llama").clone()
    with caplog.at_level("WARNING", logger="xopt.backends.lowering"):
        first = FusePass()(model)
    assert not first.modified
    busy = [
        line for line in first.explain if "measured under load (other processes took 1.6 of 2 CPUs; not cached)" in line
    ]
    assert len(busy) >= 3 and waits == [60.0, 35.0, 10.0]  # the process's 60 s, spent
    assert len(timed) == len(busy) + len(waits)  # timed again after each wait, then as it was
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("not cached" in w for w in warnings) == 1
    assert sum("waiting up to" in w for w in warnings) == len(waits)
    FusePass()(model)
    assert len(timed) == 2 * len(busy) + 3  # measured again, nothing cached; no wait left


def test_a_measurement_under_load_is_taken_again_once_the_machine_is_quiet(tiny_model, monkeypatch):
    """Other work that finishes while the chooser waits: the second measurement is the verdict,
    cached like any quiet one."""
    from xopt.backends import lowering

    times = iter([(4.0, 2.0)] + [(2.0, 4.0)] * 100)  # under load the candidate looked faster
    monkeypatch.setattr(lowering, "OtherLoad", _fake_load(itertools.chain([True], itertools.repeat(False)), "1.2"))
    monkeypatch.setattr(lowering, "WAIT_BUDGET", lowering.WaitBudget(seconds=60.0))
    monkeypatch.setattr(lowering, "wait_until_quiet", lambda threads, patience: (True, 3.0))
    monkeypatch.setattr(LoweringChooser, "_measure", lambda self, current, candidate: next(times))
    chooser = LoweringChooser()
    model = tiny_model("llama")
    verdict = chooser.choose("family", {}, model, model.clone())
    assert (verdict.keep, verdict.current_ms, verdict.source) == (False, 2.0, "measured")
    assert chooser.choose("family", {}, model, model.clone()).source == "cached"


def test_an_rmsnorm_keeps_the_shift_fold_norms_could_not_fold(tiny_folder, tmp_path):
    """A norm whose output is also a model output keeps its γ and β in `fold-norms` (folding them
    would change that output), here after LayerNorm → RMSNorm: the lowered norm adds β after
    SimplifiedLayerNormalization (dropping it changed the outputs by 5% in Optimum's GPT-BigCode
    export, where the check caught it and reverted the family)."""
    path = torchscript_export(tiny_folder("gpt_bigcode"), tmp_path / "gpt_bigcode.onnx", causal=True)
    proto = onnx.load(path)
    norm = next(node for node in proto.graph.node if node.op_type == "LayerNormalization")
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(norm.output[0]))
    passes = [CleanupPass(), FoldNormsPass(), FusePass(lowering="all", skip=fuse_only("norm"))]
    fused, report = PassManager(passes)(ir.from_proto(proto))
    assert report.passes[1].stats["layernorms_to_rmsnorm"] == 5 and report.passes[1].stats["norms_folded"] == 4
    assert report.passes[2].explain[0] == "norm: 5 matched, kept"
    assert Counter(node.op_type for node in fused.graph)["SimplifiedLayerNormalization"] == 5
    assert report.passes[2].parity.max_rel <= 1e-5


def test_group_query_attention_refuses_a_head_size_its_kernel_does_not_take(tiny_model):
    """GPT-NeoX's tiny config has heads of 12: ONNX Runtime's kernel fails on it at run time
    ("head_size must be a multiple of 8"), so the family does not match, with that reason."""
    cleaned = CleanupPass()(tiny_model("gpt_neox").clone()).model
    result = FusePass(lowering="all", skip=fuse_only("rotary", "cached-attention", "group-query-attention"))(cleaned)
    assert "group-query-attention" not in result.stats and result.stats["cached-attention"] == 2
    reason = "group-query-attention: 2 Attention: head size 12: ONNX Runtime's kernel takes a multiple of 8"
    assert reason in result.explain

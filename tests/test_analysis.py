"""Structure analysis on tiny BERT, GPT-2, Llama (GQA, RoPE) and Qwen2 (biased QKV) models,
exported by xopt (dynamo), before and after cleanup, and by the TorchScript exporter."""

from __future__ import annotations

import pytest
from helpers import torchscript_export

import xopt
from xopt.analysis import find_transformer_structure, to_networkx
from xopt.analysis import structure as structure_module
from xopt.analysis.graph_view import nodes_between
from xopt.passes import CleanupPass

EXPECTED = {
    "bert": dict(
        num_blocks=2,
        hidden_size=48,
        num_heads=4,
        num_kv_heads=4,
        head_size=12,
        intermediate_size=96,
        norm="LayerNorm",
        norm_position="post",
        activation="gelu",
        gated_mlp=False,
        rope=False,
        qkv_bias=True,
        embedding_norm=True,
        final_norm=False,
        lm_head=False,
    ),
    "gpt2": dict(
        num_blocks=2,
        hidden_size=48,
        num_heads=4,
        num_kv_heads=4,
        head_size=12,
        intermediate_size=192,
        norm="LayerNorm",
        norm_position="pre",
        activation="gelu_tanh",
        gated_mlp=False,
        rope=False,
        fused_qkv=True,
        qkv_bias=True,
        final_norm=True,
        lm_head=True,
        tied_embeddings=True,
    ),
    "llama": dict(
        num_blocks=2,
        hidden_size=48,
        num_heads=6,
        num_kv_heads=2,
        head_size=8,
        intermediate_size=80,
        norm="RMSNorm",
        norm_position="pre",
        activation="silu",
        gated_mlp=True,
        rope=True,
        qkv_bias=False,
        final_norm=True,
        lm_head=True,
        tied_embeddings=True,
        vocab_size=211,
    ),
    "qwen2": dict(
        num_blocks=3,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_size=16,
        intermediate_size=96,
        norm="RMSNorm",
        norm_position="pre",
        activation="silu",
        gated_mlp=True,
        rope=True,
        qkv_bias=True,
        final_norm=True,
        lm_head=True,
        tied_embeddings=False,
    ),
}


SANDWICH = {  # a norm between each sublayer's output and its residual add
    "olmo2": dict(num_blocks=2, num_heads=4, num_kv_heads=2, head_size=12, intermediate_size=80, norm_position=None),
    "gemma2": dict(num_blocks=2, num_heads=4, num_kv_heads=2, head_size=16, intermediate_size=80, norm_position="pre"),
}


@pytest.mark.parametrize("name", sorted(SANDWICH))
def test_structure_of_models_with_norms_after_their_sublayers(tiny_model, name):
    """OLMo-2 (norms after the sublayers only) and Gemma-2 (before and after, and its attention's
    soft cap c·tanh(S/c)): every block has its attention and MLP, each with the norm of its output
    (after `cleanup`, which removes the export's CastLike nodes between a norm and its Add)."""
    structure = find_transformer_structure(CleanupPass()(tiny_model(name).clone()).model)
    summary = structure.summary()
    _assert_matches(summary, {**SANDWICH[name], "output_norms": True, "gated_mlp": True, "rope": True})
    assert (summary["final_norm"], summary["lm_head"], structure.near_misses) == (True, True, [])
    for block in structure.blocks:
        assert block.attention is not None and block.mlp is not None
        assert len(block.output_norms) == 2 and len(block.norms) == (2 if name == "gemma2" else 0)
    assert len(structure.residual_stream) == 2 * SANDWICH[name]["num_blocks"]


@pytest.mark.parametrize("name", ["gpt_neox", "phi"])
def test_structure_of_parallel_blocks(tiny_model, name):
    """GPT-NeoX (a norm for each sublayer) and Phi (one norm for both) add the attention's and the
    MLP's outputs to the stream at once, (a + m) + h; `cleanup` writes it (h + a) + m, the same sum
    as two residual adds, and the structure reads the blocks as pre-norm and parallel."""
    model = tiny_model(name).clone()
    assert CleanupPass()(model).stats["parallel_residuals_reassociated"] == 2
    structure = find_transformer_structure(model)
    summary = structure.summary()
    expected = dict(num_blocks=2, num_heads=4, head_size=12, intermediate_size=80, norm_position="pre")
    _assert_matches(summary, {**expected, "parallel_residual": True, "embedding_norm": False, "final_norm": True})
    for block in structure.blocks:
        assert block.parallel and block.attention.residual is not block.mlp.residual
        assert block.attention_norm.input is block.mlp_norm.input  # both read the block's input
        assert len(block.norms) == (1 if name == "phi" else 2)
    assert not any(block.parallel for block in find_transformer_structure(tiny_model("llama")).blocks)


def _assert_matches(summary, expected):
    mismatches = {k: (summary[k], v) for k, v in expected.items() if summary[k] != v}
    assert not mismatches, f"(found, expected): {mismatches}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("cleaned", [False, True], ids=["raw", "cleaned"])
def test_structure_of_xopt_exports(tiny_model, name, cleaned):
    model = tiny_model(name).clone()
    if cleaned:
        CleanupPass()(model)
    structure = find_transformer_structure(model)
    _assert_matches(structure.summary(), EXPECTED[name])
    assert structure.near_misses == []
    for block in structure.blocks:
        assert block.attention is not None and block.mlp is not None
        assert len(block.norms) == 2
        assert block.module is not None and block.module.endswith(str(block.index))
    assert len(structure.residual_stream) == 2 * EXPECTED[name]["num_blocks"]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_structure_of_a_file_xopt_did_not_export(tiny_folder, tmp_path, name):
    """TorchScript export: no module-path metadata, Constant/Identity nodes, shapes left unknown."""
    path = torchscript_export(tiny_folder(name), tmp_path / f"{name}.onnx", causal=name == "gpt2")
    model = xopt.load(path)
    assert not any(n.metadata_props.get("pkg.torch.onnx.name_scopes") for n in model.graph)
    expected = dict(EXPECTED[name])
    structure = find_transformer_structure(model)
    _assert_matches(structure.summary(), expected)


def test_structure_without_the_head_probe(tiny_folder, tmp_path):
    """heads=False finds the same structure without running the model: the head counts, which
    this export's unknown shapes leave to a probe run, stay unset."""
    model = xopt.load(torchscript_export(tiny_folder("gpt2"), tmp_path / "gpt2.onnx", causal=True))
    probed = find_transformer_structure(model).summary()
    unprobed = find_transformer_structure(model, heads=False).summary()
    head_facts = ("num_heads", "num_kv_heads", "head_size")
    assert [probed[k] for k in head_facts] == [EXPECTED["gpt2"][k] for k in head_facts]
    assert [unprobed[k] for k in head_facts] == [0, 0, 0]
    differing = {k for k in probed if probed[k] != unprobed[k]} - set(head_facts)
    assert not differing


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_head_counts_from_symbolic_shapes_without_a_probe(tiny_model, monkeypatch, name):
    """xopt's export annotates the query as [batch, heads, sequence, head size]: the head counts
    are read from the known dims, with no probe run of the model."""

    def no_probe(model, values):
        raise AssertionError(f"probed {[v.name for v in values]}")

    monkeypatch.setattr(structure_module, "probe_shapes", no_probe)
    summary = find_transformer_structure(tiny_model(name)).summary()
    head_facts = ("num_heads", "num_kv_heads", "head_size")
    assert [summary[k] for k in head_facts] == [EXPECTED[name][k] for k in head_facts]


def test_block_regions_from_the_networkx_view(tiny_model):
    model = tiny_model("llama")
    structure = find_transformer_structure(model)
    view = to_networkx(model.graph)
    first, second = structure.blocks
    region = nodes_between(view, first.attention.q.node, first.mlp.residual)
    assert first.mlp.down.node in region and first.attention.o.node in region
    assert second.attention.q.node not in region

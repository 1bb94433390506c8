"""fold-norms: γ/β into linears, Pre-LN LayerNorm → RMSNorm, attention scale into W_q.

Parity in float32 on tiny random models, and float64 equivalence of the rewrites within 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import torchscript_export

import xopt
from xopt.analysis import find_transformer_structure
from xopt.backends.onnxruntime import create_session, run
from xopt.passes import CleanupPass, FoldNormsPass, RotatePass
from xopt.pipeline import PassManager


def _fold(model):
    return PassManager([CleanupPass(), FoldNormsPass()])(model)


def test_llama_folds_rmsnorm_scales_and_score_scale(tiny_model):
    optimized, report = _fold(tiny_model("llama"))
    stats = report.passes[1].stats
    assert stats == {"norms_folded": 4, "score_scales_folded": 2}  # final norm: LM head tied to embeddings
    assert any("shared" in line for line in report.passes[1].explain)
    assert report.passes[1].parity.max_rel <= 1e-6
    structure = find_transformer_structure(optimized)
    assert all(n.scale is None for b in structure.blocks for n in b.norms)
    assert structure.final_norm.scale is not None
    cleaned = CleanupPass()(tiny_model("llama").clone()).model
    adds = [sum(n.op_type == "Add" for n in m.graph) for m in (cleaned, optimized)]
    assert adds[0] == adds[1]  # an RMSNorm has no β: folding adds no zero biases


def test_affine_false_keeps_every_norm_scale(tiny_model):
    optimized, report = PassManager([CleanupPass(), FoldNormsPass(affine=False)])(tiny_model("qwen2"))
    assert report.passes[1].stats == {"score_scales_folded": 3}
    structure = find_transformer_structure(optimized)
    assert all(n.scale is not None for b in structure.blocks for n in b.norms)
    assert report.passes[1].parity.max_rel <= 1e-6


def test_qwen2_untied_head_takes_the_final_norm_too(tiny_model):
    _, report = _fold(tiny_model("qwen2"))
    assert report.passes[1].stats == {"norms_folded": 7, "score_scales_folded": 3}
    assert report.passes[1].parity.max_rel <= 1e-6


def test_gpt2_pre_layernorm_becomes_rmsnorm(tiny_model):
    optimized, report = _fold(tiny_model("gpt2"))
    stats = report.passes[1].stats
    assert stats["layernorms_to_rmsnorm"] == 5 and stats["writers_recentred"] == 4
    assert stats["embeddings_recentred"] == 2 and stats["lm_head_untied"] == 1
    assert "LayerNormalization" not in {n.op_type for n in optimized.graph}
    summary = find_transformer_structure(optimized).summary()
    assert (summary["norm"], summary["norm_position"], summary["tied_embeddings"]) == ("RMSNorm", "pre", False)
    assert report.passes[1].parity.max_rel <= 1e-6


def test_cohere_s_decomposed_layernorms_become_rmsnorms(tiny_model):
    """Cohere computes its LayerNorm (no β, one per parallel block) in standard ops."""
    optimized, report = _fold(tiny_model("cohere"))
    stats = report.passes[1].stats
    assert stats["layernorms_to_rmsnorm"] == 3 and stats["writers_recentred"] == 4
    summary = find_transformer_structure(optimized).summary()
    assert (summary["norm"], summary["norm_position"], summary["parallel_residual"]) == ("RMSNorm", "pre", True)
    assert report.passes[1].parity.max_rel <= 1e-6


def test_post_ln_bert_is_refused_with_reasons_but_scales_fold(tiny_model):
    _, report = _fold(tiny_model("bert"))
    record = report.passes[1]
    assert record.stats == {"score_scales_folded": 2}
    assert any("post-LN" in line for line in record.explain)
    assert any("not only by linears" in line for line in record.explain)
    assert record.parity.max_rel <= 1e-6


def test_a_gather_of_sin_cos_rows_writes_no_stream(tiny_folder, tmp_path):
    """CodeGen's TorchScript export gathers its sin/cos rows from a table by position: the table
    rotates Q and K and writes no residual stream, so LayerNorm → RMSNorm does not recentre it
    (doing so changed the outputs by 2.6e-4 here, 0.44 in Optimum's export) nor rotate rotate it."""
    model = xopt.load(torchscript_export(tiny_folder("codegen"), tmp_path / "codegen.onnx", causal=True))
    _, report = PassManager([CleanupPass(), FoldNormsPass(), RotatePass()])(model)
    assert report.passes[1].stats["embeddings_recentred"] == 1
    assert report.passes[2].stats["tables_rotated"] == 1
    assert all(record.parity.max_rel <= 1e-5 for record in report.passes)


def test_a_shape_read_of_a_norm_leaves_its_affine_foldable(tiny_folder, tmp_path):
    """GPT-BigCode's TorchScript export reads the shape of two norms' outputs: folding γ and β
    into the linears keeps that shape, so every norm folds (3 of 5 did before)."""
    model = xopt.load(torchscript_export(tiny_folder("gpt_bigcode"), tmp_path / "gpt_bigcode.onnx", causal=True))
    _, report = _fold(model)
    assert report.passes[1].stats["norms_folded"] == 5
    assert report.passes[1].parity.max_rel <= 1e-5


@pytest.mark.parametrize("name", ["qwen3", "olmo2"])
def test_a_norm_on_the_query_keeps_the_score_scale(tiny_model, name):
    """Qwen3 normalizes each query head, OLMo-2 the whole query projection: c·W_q would be divided
    out again, so the scale on Q·Kᵀ stays (folding it changed the logits by ~100%)."""
    _, report = _fold(tiny_model(name))
    record = report.passes[1]
    assert "score_scales_folded" not in record.stats
    assert sum("on its way to Q·Kᵀ, which is not linear in it" in line for line in record.explain) == 2
    assert record.parity.max_rel <= 1e-6


class _Logits(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.mark.parametrize(("name", "layernorms"), [("gpt2", 5), ("llama", 0)])
def test_float64_equivalence_within_1e_10(tiny_folder, name, layernorms):
    """GPT-2's LayerNorms become RMSNorms after recentring (the sequence axis is dynamic: with
    static shapes the position rows fold into a constant the recentring does not take), Llama's
    RMSNorms fold."""
    import transformers

    module = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder(name), attn_implementation="eager")
    module = module.double().eval()
    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    sequence = torch.export.Dim("sequence", min=2, max=32)
    model = xopt.load(_Logits(module), (ids, mask), dynamic_shapes=({1: sequence}, {1: sequence}))
    feeds = {v.name: a for v, a in zip(model.graph.inputs, (ids.numpy(), mask.numpy()), strict=True)}
    # against the cleaned model: cleanup may fold float32 RoPE-table ops (HF computes them in
    # float32 even in a float64 model), which moves outputs at float32 rounding, not the norm math
    cleaned, _ = PassManager([CleanupPass()], verify=False)(model)
    expected = next(iter(run(create_session(cleaned), feeds).values()))
    folded, report = PassManager([FoldNormsPass()], verify=False)(cleaned)
    assert report.passes[0].modified and report.passes[0].stats.get("layernorms_to_rmsnorm", 0) == layernorms
    actual = next(iter(run(create_session(folded), feeds).values()))
    assert actual.dtype == np.float64
    relative = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert relative <= 1e-10, relative


class _LinearThenScales(torch.nn.Module):
    """Linear → BatchNorm over its features; Linear → constant per-feature scale; Linear / σ."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = (torch.nn.Linear(12, 12) for _ in range(3))
        self.norm = torch.nn.BatchNorm1d(12)
        self.register_buffer("gain", torch.linspace(0.5, 2.0, 12))
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = torch.relu(self.norm(self.first(x)))
        return self.third(torch.relu(self.second(y) * self.gain)) / 3.0


def test_batchnorm_and_constant_output_scales_fold_into_linears():
    module = _LinearThenScales().double().eval()
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = module(x).detach().numpy()
    model = xopt.load(module, (x,))
    assert "BatchNormalization" in {n.op_type for n in model.graph}
    alone, report = PassManager([FoldNormsPass()], verify=False)(model)  # the Div's divisor is Cast(Constant)
    assert report.passes[0].stats == {"batchnorm_folded": 1, "output_scale_folded": 1}
    recipe, report = PassManager([CleanupPass(), FoldNormsPass()], verify=False)(model)  # a constant divisor now
    assert report.passes[1].stats == {"batchnorm_folded": 1, "output_scale_folded": 2}
    for folded in (alone, recipe):
        assert not {"BatchNormalization", "Mul"} & {n.op_type for n in folded.graph}
        actual = next(iter(run(create_session(folded), {folded.graph.inputs[0].name: x.numpy()}).values()))
        assert np.max(np.abs(actual - expected)) / np.max(np.abs(expected)) <= 1e-10


def test_fold_norms_rotate_and_the_merges_run_no_probe(tiny_model, monkeypatch):
    """Head counts take a run of the model where the queries' shapes are unknown (here stripped, as a
    TorchScript export leaves them); the passes that do not read them skip it."""
    from xopt.analysis import structure as analysis
    from xopt.passes import RotatePass
    from xopt.passes.fuse import _lower_norms, _merge_gate_up, _merge_qkv

    probes, probe = [], analysis.probe_shapes
    monkeypatch.setattr(analysis, "probe_shapes", lambda *args: probes.append(1) or probe(*args))
    model = CleanupPass()(tiny_model("llama").clone()).model
    for block in find_transformer_structure(model, heads=False).blocks:
        block.attention.scores.inputs[0].shape = None
    assert find_transformer_structure(model).blocks[0].attention.num_heads > 0 and len(probes) == 1
    model = FoldNormsPass()(model).model
    model = RotatePass()(model).model
    for family in (_lower_norms, _merge_qkv, _merge_gate_up):
        assert family(model)[0] > 0
    assert len(probes) == 1

"""rotate: Hadamard matrices, and the residual-stream rotation's parity and refusals on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import fuse_only, wide_linear_model

from xopt.analysis import find_transformer_structure
from xopt.errors import XoptError
from xopt.passes import CleanupPass, FoldNormsPass, RotatePass
from xopt.passes.hadamard import hadamard, random_rotation
from xopt.pipeline import PassManager


@pytest.mark.parametrize("order", [1, 2, 4, 12, 48, 64, 72, 384, 576, 768, 896, 960])
def test_hadamard_matrices_are_hadamard(order):
    matrix = hadamard(order)
    assert set(np.unique(matrix)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(matrix @ matrix.T, order * np.eye(order))


@pytest.mark.parametrize("order", [48, 80, 36])  # 80 = 20·4 (Paley 19); 36 has no construction here
def test_rotations_are_orthogonal_and_flat_when_hadamard(order):
    rotation, kind = random_rotation(order, seed=3)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(order), atol=1e-12)
    if hadamard(order) is not None:
        assert kind == "randomised Hadamard"
        np.testing.assert_allclose(np.abs(rotation), 1 / np.sqrt(order))
    else:
        assert kind.startswith("random orthogonal")


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "gemma", "gpt_neox", "phi", "opt"])
def test_rotation_keeps_outputs(tiny_model, name):
    """Tied (llama) and untied (qwen2, q/k/v biases) heads, GPT-2 (LayerNorm turned RMSNorm by
    fold-norms; Conv1D's Gemm linears read by cleanup as MatMul), Gemma (embeddings scaled by
    √d on their way into the stream), parallel blocks (GPT-NeoX, Phi: attention and MLP read the
    same stream) and OPT (its stream reshaped to [B·S, d] and back in each layer): logits at
    float32 rounding."""
    rotated, report = PassManager([CleanupPass(), FoldNormsPass(), RotatePass()])(tiny_model(name))
    record = report.passes[2]
    blocks = len(find_transformer_structure(rotated).blocks)
    assert record.stats["writers_rotated"] == 2 * blocks
    assert record.parity.max_rel <= 1e-5, record.parity
    assert any("randomised Hadamard" in line for line in record.explain)


def test_rotation_changes_every_stream_weight(tiny_model):
    """The stream really is rotated: tables, writers and readers all differ from the folded model."""
    folded, _ = PassManager([CleanupPass(), FoldNormsPass()], verify=False)(tiny_model("qwen2"))
    rotated, _ = PassManager([RotatePass(seed=1)], verify=False)(folded)
    before = {v.name: v.const_value.numpy() for v in folded.graph.initializers.values()}
    after = {v.name: v.const_value.numpy() for v in rotated.graph.initializers.values()}
    changed = [n for n in before if n not in after or not np.array_equal(before[n], after[n])]
    structure = find_transformer_structure(folded)
    stream_weights = 1 + sum(len(b.attention.linears) + len(b.mlp.linears) for b in structure.blocks) + 1
    assert len([n for n in changed if before[n].ndim == 2]) == stream_weights


def test_a_tied_head_is_untied_for_the_final_norm_scale(tiny_model):
    """fold-norms leaves llama's final γ (its head is tied to the table); rotate must fold it, so it
    unties the head first."""
    _, report = PassManager([CleanupPass(), FoldNormsPass(), RotatePass()])(tiny_model("llama"))
    stats = report.passes[2].stats
    assert stats["lm_head_untied"] == 1 and stats["norms_folded"] == 1


@pytest.mark.parametrize(
    ("name", "passes", "reason"),
    [
        ("bert", [CleanupPass()], "not a pre-norm model"),
        ("gpt2", [CleanupPass()], "LayerNorm does not commute"),
        ("olmo2", [CleanupPass(), FoldNormsPass()], "residual adds write the stream"),
        ("bloom", [CleanupPass(), FoldNormsPass()], "a norm on the embeddings writes the residual stream"),
    ],
)
def test_refusals_name_the_reason(tiny_model, name, passes, reason):
    model, _ = PassManager(passes, verify=False)(tiny_model(name))
    with pytest.raises(XoptError, match=reason):
        RotatePass()(model.clone())
    skipped = RotatePass(optional=True)(model)  # as in a recipe: unchanged, with the reason
    assert not skipped.modified and reason in skipped.explain[0]


def test_a_model_without_blocks_is_refused():
    with pytest.raises(XoptError, match="no transformer blocks"):
        RotatePass()(wide_linear_model())


@pytest.mark.parametrize("family", ["norm", "rotary"])
def test_rotate_after_fuse_names_the_order(tiny_model, family):
    """Fused ONNX-domain operators hide the norms and the attention from the structure analysis."""
    from xopt.passes import FusePass

    fused = FusePass(lowering="all", skip=fuse_only(family))(CleanupPass()(tiny_model("llama").clone()).model).model
    with pytest.raises(XoptError, match="rotate runs before `fuse` and `quantize`"):
        RotatePass()(fused)

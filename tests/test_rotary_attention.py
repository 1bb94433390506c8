"""fuse(positions=contiguous): RoPE moved into GroupQueryAttention, at parity wherever positions
are contiguous (unpadded and right-padded rows), and the contract's limits stated by tests."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

import xopt
from xopt.backends.lowering import LoweringChooser
from xopt.backends.onnxruntime import create_session
from xopt.cli import EXIT_USER_ERROR, main
from xopt.errors import XoptError
from xopt.generate import Decoder
from xopt.inputs import sample_inputs
from xopt.kv_cache import position_limit
from xopt.passes import CleanupPass, FusePass
from xopt.passes.rotary_attention import lower_rotary_attention
from xopt.runnable import Runnable
from xopt.verify import compare, reference_outputs


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XOPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama16(tiny_folder):
    return CleanupPass()(xopt.load(tiny_folder("llama-head16"))).model


@pytest.fixture(scope="module")
def rotating(llama16):
    return FusePass(lowering="all", positions="contiguous")(llama16.clone())


def test_rotation_moves_into_group_query_attention_on_packed_qkv(rotating):
    ops = Counter(node.op_type for node in rotating.model.graph)
    attentions = [node for node in rotating.model.graph if node.op_type == "GroupQueryAttention"]
    assert rotating.stats["rotary-attention"] == 2 and len(attentions) == 2
    assert ops["RotaryEmbedding"] == 0 and ops["Split"] == 2  # the gate/up Splits stay, Q/K/V's go
    for node in attentions:
        assert node.attributes.get_int("do_rotary") == 1
        assert node.inputs[1] is None and node.inputs[2] is None  # packed QKV
        assert node.inputs[7].shape == node.inputs[8].shape == (256, 8)  # [context length, head size / 2]
        assert len(node.inputs) <= 10 or node.inputs[10] is None  # the causal/padding bias is the kernel's own
    assert ops["Where"] == 0  # nor is the bias computed any more


def test_a_bias_that_is_more_than_a_visibility_mask_stays(llama16):
    model = FusePass(lowering="all")(llama16.clone()).model  # RoPE before GroupQueryAttention, bias in
    attentions = [node for node in model.graph if node.op_type == "GroupQueryAttention"]
    (bias,) = {node.inputs[10] for node in attentions}
    shifted = ir.node("Add", [bias, ir.Value(name="shift", const_value=ir.tensor(np.float32(0.25)))])
    model.graph.register_initializer(shifted.inputs[1])
    model.graph.insert_after(bias.producer(), shifted)
    for node in attentions:
        node.replace_input_with(10, shifted.outputs[0])
    count, notes = lower_rotary_attention(model)
    assert count == 2
    assert "2 GroupQueryAttention keep their attention bias: it is not only the causal and padding mask" in notes
    assert all(node.inputs[10] is shifted.outputs[0] for node in model.graph if node.op_type == "GroupQueryAttention")


@pytest.mark.parametrize(
    ("batch", "sequence", "past", "padded"),
    [(1, 23, 0, False), (3, 9, 0, True), (2, 1, 7, True), (1, 4, 6, False)],
)
def test_parity_wherever_positions_are_contiguous(llama16, rotating, batch, sequence, past, padded):
    feeds = sample_inputs(llama16, batch=batch, sequence=sequence, past=past, padded=padded, seed=batch)
    parity = compare(
        reference_outputs(llama16, feeds), reference_outputs(rotating.model, feeds), feeds["attention_mask"]
    )
    assert parity.max_rel <= 1e-5, parity


def test_left_padding_is_outside_the_contract(llama16, rotating):
    # the kernel rotates the token at column s at position s, the graph at s − (padding before it)
    feeds = sample_inputs(llama16, batch=2, sequence=8, seed=5)
    feeds["attention_mask"][1, :3] = 0
    parity = compare(
        reference_outputs(llama16, feeds), reference_outputs(rotating.model, feeds), feeds["attention_mask"]
    )
    assert parity.max_rel > 1e-3


def test_generation_past_the_rotary_tables_is_refused(rotating):
    session = create_session(rotating.model, threads=1)
    decoder = Decoder(Runnable("tiny", rotating.model, session, "causal-lm", tokenizer_source=None))
    assert position_limit(rotating.model) == 256
    assert len(decoder.generate([3, 1, 4], 253).tokens) == 253
    with pytest.raises(XoptError, match="rotary tables hold 256 positions"):
        decoder.generate([3, 1, 4], 254)


def test_bench_past_the_rotary_tables_is_refused(rotating, tmp_path, capfd):
    model = tmp_path / "rotating.onnx"
    xopt.save(rotating.model, model)
    assert main(["bench", str(model), "--seq", "257", "--no-memory"]) == EXIT_USER_ERROR
    expected = f"xopt: error: --seq 257: {model}: the model's rotary tables hold 256 positions"
    assert capfd.readouterr().err.strip() == expected


def test_bench_past_the_configured_positions_is_refused(tiny_folder, capfd):
    """An encoder with learned positions (BERT) allows its config's max_position_embeddings."""
    assert main(["bench", str(tiny_folder("bert")), "--seq", "100000", "--no-memory"]) == EXIT_USER_ERROR
    assert capfd.readouterr().err.strip().endswith("the model's config allows 512 positions")


def test_off_unless_positions_are_declared_contiguous(llama16):
    result = FusePass(lowering="all")(llama16.clone())
    assert "rotary-attention" not in result.stats
    assert any(line.startswith("rotary-attention: off (positions=mask") for line in result.explain)
    with pytest.raises(XoptError, match="unknown positions 'left'"):
        FusePass(positions="left")(llama16.clone())


def test_a_head_size_the_kernel_cannot_rotate_is_named(tiny_model):
    result = FusePass(lowering="all", positions="contiguous")(CleanupPass()(tiny_model("llama").clone()).model)
    assert "rotary-attention" not in result.stats
    assert any("head size 8: the rotating kernel needs a multiple of 16" in line for line in result.explain)


def _rotates_inside(model: ir.Model) -> bool:
    return any(n.op_type == "GroupQueryAttention" and n.attributes.get_int("do_rotary", 0) for n in model.graph)


def test_timed_with_group_query_attention_when_that_was_not_faster_alone(llama16, monkeypatch):
    def time(model):  # only GroupQueryAttention with the rotation inside pays
        return 1.0 if _rotates_inside(model) else 1.5

    monkeypatch.setattr(LoweringChooser, "_measure", lambda self, current, candidate: (time(current), time(candidate)))
    result = FusePass(positions="contiguous")(llama16.clone())
    assert "cached-attention: 2 matched, measured speedup 1.000×: reverted (not faster)" in result.explain
    chained = "rotary-attention with rotary, cached-attention, group-query-attention: measured speedup 1.500×: kept"
    assert chained in result.explain
    assert result.stats["group-query-attention"] == result.stats["rotary-attention"] == 2
    assert result.stats["rotary"] == 4 and "merge-qkv" not in result.stats  # Q and K rotated; unpacked


def test_a_family_kept_after_its_prerequisites_is_in_the_families_tried_together(llama16, monkeypatch):
    def time(model):  # the rotation inside pays alone; the lowered norms only next to it
        norms = any(n.op_type == "SimplifiedLayerNormalization" for n in model.graph)
        return 1.0 - 0.3 * _rotates_inside(model) - 0.05 * (_rotates_inside(model) and norms)

    monkeypatch.setattr(LoweringChooser, "_measure", lambda self, current, candidate: (time(current), time(candidate)))
    result = FusePass(positions="contiguous")(llama16.clone())
    together = [line for line in result.explain if " together: " in line]
    assert together and "+rotary-attention+" in together[0] and together[0].endswith(": kept"), together
    assert result.stats["rotary-attention"] == result.stats["group-query-attention"] == 2
    assert time(result.model) == pytest.approx(0.65)

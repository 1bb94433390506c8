"""ONNX files xopt did not export: Hugging Face Optimum's decoder with a KV cache and encoder.

tests/data/optimum-llama.onnx is `optimum-cli export onnx --task text-generation-with-past` of the
tiny "llama" folder of tests/conftest.py (`build_tiny_folder`, seed 0), made with optimum-onnx
0.1.0, transformers 4.57.6 and torch 2.13.0 (a TorchScript export: opset 18, no shapes inside).
Its inputs are Optimum's: `input_ids`, `attention_mask [batch_size, past_sequence_length +
sequence_length]`, `position_ids` and `past_key_values.*`. Its dims are read with `Shape` ops,
its RMSNorm divides 1 by the root, and its attention is torch's SDPA export: Q and Kᵀ each scaled
by √s, the softmax's NaN rows zeroed.

tests/data/optimum-gemma.onnx is the same export of the tiny "gemma" folder: it declares no
`position_ids` (its positions are past..past+S−1, one cos/sin table for every row) and writes the
tanh GELU's x³ as x·(x·x).

tests/data/optimum-mpt.onnx is the same export of the tiny "mpt" folder (ALiBi, no rotary): its
causal mask is sliced to the key length it reads from the cache, Shape(Concat(past, K))[2].

tests/data/optimum-bert.onnx is `optimum-cli export onnx --task feature-extraction` of the tiny
"bert" folder, made the same way: its linears add the bias first, Add(b, x·W), and its attention
is the same SDPA export.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

import xopt
from xopt.cli import main
from xopt.generate import Decoder
from xopt.inputs import sample_inputs
from xopt.passes import CleanupPass, FoldNormsPass, FusePass, RotatePass
from xopt.pipeline import PassManager
from xopt.runnable import open_runnable
from xopt.verify import reference_outputs

OPTIMUM_LLAMA = Path(__file__).parent / "data" / "optimum-llama.onnx"
OPTIMUM_BERT = Path(__file__).parent / "data" / "optimum-bert.onnx"
OPTIMUM_GEMMA = Path(__file__).parent / "data" / "optimum-gemma.onnx"
OPTIMUM_MPT = Path(__file__).parent / "data" / "optimum-mpt.onnx"


def test_an_axis_named_by_a_sum_is_bound_to_the_sum():
    feeds = sample_inputs(xopt.load(OPTIMUM_LLAMA), batch=2, sequence=5, past=3)
    assert feeds["attention_mask"].shape == (2, 8)
    assert feeds["past_key_values.0.key"].shape == (2, 2, 3, 8)
    assert feeds["position_ids"].tolist() == [[3, 4, 5, 6, 7]] * 2


def test_an_optimum_decoder_goes_through_the_exact_recipe(tmp_path, capsys):
    """Verified on prefill, a decode step and several tokens on a past, as xopt's own captures."""
    assert main(["optimize", str(OPTIMUM_LLAMA), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in out
    assert (tmp_path / "out" / "model.onnx").is_file()


@pytest.mark.parametrize("path", [OPTIMUM_LLAMA, None], ids=["optimum", "optimized"])
def test_an_optimum_decoder_generates_what_its_weights_generate(tiny_folder, tmp_path, path):
    """Sampled at temperature 1 with one seed, so the tokens follow the whole distribution."""
    if path is None:
        assert main(["optimize", str(OPTIMUM_LLAMA), "-o", str(tmp_path / "out")]) == 0
        path = tmp_path / "out"
    prompt = list(range(5, 25))
    theirs = Decoder(open_runnable(path, threads=1)).generate(prompt, 24, temperature=1.0, seed=3)
    ours = Decoder(open_runnable(tiny_folder("llama"), threads=1)).generate(prompt, 24, temperature=1.0, seed=3)
    assert theirs.tokens == ours.tokens
    assert len(set(ours.tokens)) > 5


def test_an_optimum_decoder_fuses_as_xopt_capture_of_its_weights_does(tiny_folder):
    """Every layer's norms, rotations and attention reach ONNX Runtime's fused operators, and the
    tied head is read from the embedding table (xopt's own capture of the same folder: 87 nodes,
    45,700 weights)."""
    passes = [CleanupPass(), FoldNormsPass(), FusePass(lowering="all")]
    fused, report = PassManager(passes)(xopt.load(OPTIMUM_LLAMA))
    ops = Counter(n.op_type for n in fused.graph)
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 4
    assert ops["SkipSimplifiedLayerNormalization"] + ops["SimplifiedLayerNormalization"] == 5
    assert not {"Softmax", "IsNaN", "Pow"} & set(ops)
    assert len(fused.graph) <= 110
    assert report.output.params == 45700  # the head is the table
    assert all(record.parity.max_abs < 1e-5 for record in report.passes)


def test_an_optimum_gemma_fuses_its_one_row_rotary_and_tanh_gelu(tiny_folder, tmp_path):
    """The one-row cos/sin tables are broadcast to the batch for RotaryEmbedding and the GELU
    becomes one FastGelu; the fused model generates what the weights generate."""
    passes = [CleanupPass(), FoldNormsPass(), FusePass(lowering="all")]
    fused, report = PassManager(passes)(xopt.load(OPTIMUM_GEMMA))
    ops = Counter(n.op_type for n in fused.graph)
    assert ops["RotaryEmbedding"] == 4 and ops["GroupQueryAttention"] == 2 and ops["FastGelu"] == 2
    assert not {"Tanh", "Neg", "Softmax"} & set(ops)
    assert all(record.parity.max_abs < 1e-5 for record in report.passes)
    xopt.save(fused, tmp_path / "fused.onnx")
    prompt = list(range(5, 25))
    theirs = Decoder(open_runnable(tmp_path / "fused.onnx", threads=1)).generate(prompt, 24, temperature=1.0, seed=3)
    ours = Decoder(open_runnable(tiny_folder("gemma"), threads=1)).generate(prompt, 24, temperature=1.0, seed=3)
    assert theirs.tokens == ours.tokens


def test_an_optimum_mpt_s_attention_reads_the_cache_length_before_it(tiny_folder, tmp_path):
    """The mask's slice reads the present cache's length from the past's and the new keys'
    shapes, so the cached attention is one operator (before: a cycle, and the family reverted)."""
    passes = [CleanupPass(), FoldNormsPass(), FusePass(lowering="all", skip="group-query-attention")]
    fused, _ = PassManager(passes)(xopt.load(OPTIMUM_MPT))
    ops = Counter(n.op_type for n in fused.graph)
    assert ops["Attention"] == 2 and "Softmax" not in ops
    xopt.save(fused, tmp_path / "fused.onnx")
    prompt = list(range(5, 25))
    theirs = Decoder(open_runnable(tmp_path / "fused.onnx", threads=1)).generate(prompt, 24, temperature=1.0, seed=3)
    ours = Decoder(open_runnable(tiny_folder("mpt"), threads=1)).generate(prompt, 24, temperature=1.0, seed=3)
    assert theirs.tokens == ours.tokens


def test_an_optimum_folder_lends_its_tokenizer_and_config(tiny_folder, tmp_path, capsys):
    """Optimum writes model.onnx beside the model's config and tokenizer: a lossy recipe calibrates
    and measures its cost with that tokenizer, and the output folder keeps both."""
    folder = tmp_path / "optimum"
    folder.mkdir()
    shutil.copy(OPTIMUM_LLAMA, folder / "model.onnx")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_folder("llama") / name, folder / name)
    out = tmp_path / "out"
    assert main(["optimize", str(folder / "model.onnx"), "-o", str(out), "--recipe", "int4"]) == 0
    assert "quality on" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_the_stream_a_shape_reads_is_rotated():
    """TorchScript reads the embeddings' shape for the mask; a rotation keeps that shape."""
    _, report = PassManager([CleanupPass(), FoldNormsPass(), RotatePass()])(xopt.load(OPTIMUM_LLAMA))
    assert report.passes[-1].stats["writers_rotated"] == 4
    assert report.passes[-1].parity.max_abs < 1e-5


def test_an_optimum_encoder_packs_its_attention_as_xopt_capture_of_its_weights_does(tiny_folder):
    """With the biases put second and √s·Q, √s·Kᵀ folded into W_q, onnxscript's rules pack each
    layer's Q, K and V projections into one `Attention` (before: a `MultiHeadAttention` after three
    linears); the output is the weights' own (xopt's capture of the same folder)."""
    passes = [CleanupPass(), FoldNormsPass(), FusePass(lowering="all")]
    fused, report = PassManager(passes)(xopt.load(OPTIMUM_BERT))
    assert report.passes[0].stats["constant_operands_put_second"] == 12  # 2 layers × 6 linears
    assert report.passes[1].stats["score_scales_folded"] == 2
    ops = Counter(n.op_type for n in fused.graph)
    assert ops["Attention"] == 2 and "MultiHeadAttention" not in ops and "Softmax" not in ops
    assert all(record.parity.max_abs < 1e-5 for record in report.passes)
    capture = xopt.load(tiny_folder("bert"))
    feeds = sample_inputs(fused, batch=2, sequence=7)
    theirs = reference_outputs(fused, feeds)["last_hidden_state"]
    ours = reference_outputs(capture, {v.name: feeds[v.name] for v in capture.graph.inputs})
    assert abs(theirs - next(iter(ours.values()))).max() < 1e-5

"""End to end on real pretrained weights: MiniLM (BERT encoder) and SmolLM2-135M (Llama decoder).

Each model is captured and optimized once per session through the CLI; the tests then check the
written artifacts: structure, parity with the captured model (verified after every pass), and
agreement with the original PyTorch model on real text.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from helpers import transformers_greedy

from xopt.backends.onnxruntime import create_session, run
from xopt.cli import main
from xopt.kv_cache import empty_cache

pytestmark = pytest.mark.slow

TEXT = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Emma Woodhouse, handsome, clever, and rich, seemed to unite some of the best blessings of existence.",
]


def _optimize(source, folder, *options):
    report = folder.parent / f"{folder.name}-report.json"
    assert main(["optimize", str(source), "-o", str(folder), "--report", str(report), *options]) == 0
    return folder, json.loads(report.read_text())


@pytest.fixture(scope="session")
def minilm_optimized(minilm_folder, tmp_path_factory):
    return _optimize(minilm_folder, tmp_path_factory.mktemp("minilm") / "out")


@pytest.fixture(scope="session")
def smollm2_optimized(smollm2_folder, tmp_path_factory):
    return _optimize(smollm2_folder, tmp_path_factory.mktemp("smollm2") / "out")


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_folder):
    """transformers' SmolLM2 in float32 (from its GGUF file: ~20 s, so once)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def smollm2_greedy(smollm2_optimized, smollm2_reference):
    """The first text's token ids and transformers' 64 greedy tokens after them."""
    prompt = [int(t) for t in _tokenize(smollm2_optimized[0], TEXT[:1])["input_ids"][0]]
    return prompt, transformers_greedy(smollm2_reference, prompt, 64)


def _tokenize(folder, texts):
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="np")
    return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def test_minilm_structure_parity_and_agreement_with_pytorch(minilm_folder, minilm_optimized):
    import torch
    from transformers import AutoModel

    folder, report = minilm_optimized
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold-norms", "fuse"]
    assert all(p["parity"]["max_abs"] <= 1e-4 for p in report["passes"])
    assert report["output"]["nodes"] < report["input"]["nodes"]
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    summary = report["structure"]  # of the captured model: fused operators hide heads afterwards
    expected = dict(
        num_blocks=6,
        hidden_size=384,
        num_heads=12,
        num_kv_heads=12,
        head_size=32,
        intermediate_size=1536,
        vocab_size=30522,
        norm="LayerNorm",
        norm_position="post",
        activation="gelu",
        embedding_norm=True,
        lm_head=False,
    )
    assert {k: summary[k] for k in expected} == expected

    feeds = _tokenize(folder, TEXT)
    hidden = run(create_session(folder / "model.onnx"), feeds)["last_hidden_state"]
    reference = AutoModel.from_pretrained(str(minilm_folder)).eval()
    with torch.no_grad():
        expected_hidden = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    valid = feeds["attention_mask"].astype(bool)
    assert np.max(np.abs(hidden[valid] - expected_hidden[valid])) <= 1e-4


def test_smollm2_structure_parity_and_agreement_with_pytorch(smollm2_optimized, smollm2_reference):
    folder, report = smollm2_optimized
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold-norms", "fuse"]
    # verification inputs carry a random past cache, which inflates logits: relative error here,
    # the absolute bound against PyTorch on real text below
    assert all(p["parity"]["max_rel"] <= 1e-4 and p["parity"]["top1_agreement"] == 1.0 for p in report["passes"])
    assert report["output"]["nodes"] < report["input"]["nodes"] / 2
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    summary = report["structure"]  # of the captured model: fused operators hide heads afterwards
    expected = dict(
        num_blocks=30,
        hidden_size=576,
        num_heads=9,
        num_kv_heads=3,
        head_size=64,
        intermediate_size=1536,
        vocab_size=49152,
        norm="RMSNorm",
        norm_position="pre",
        activation="silu",
        gated_mlp=True,
        rope=True,
        final_norm=True,
        lm_head=True,
        tied_embeddings=True,
    )
    assert {k: summary[k] for k in expected} == expected

    _assert_logits_agree(folder, smollm2_reference)


def test_smollm2_greedy_generation_matches_transformers(smollm2_optimized, smollm2_greedy):
    """64 greedy tokens from the optimized KV-cache model equal transformers' greedy output."""
    _assert_greedy_tokens(smollm2_optimized[0], *smollm2_greedy)


def test_smollm2_kept_on_its_grids_computes_and_generates_what_pytorch_does(
    smollm2_optimized, smollm2_reference, smollm2_greedy, tmp_path
):
    """keep-grids on the exact recipe's output: every linear but the Q8_0 head stored on its Q4_1
    grid (a file under 40% of the float one), logits within 1e-3 of PyTorch's, the same 64 greedy tokens."""
    source, _ = smollm2_optimized
    folder, report = _optimize(source, tmp_path / "kept", "--passes", "keep-grids")
    (keep,) = report["passes"]
    nbits = [n for n in ir.load(folder / "model.onnx").graph if n.op_type == "MatMulNBits"]
    assert keep["stats"]["linears_kept"] == len(nbits) >= 4 * 30
    assert (folder / "model.onnx").stat().st_size < 0.4 * (source / "model.onnx").stat().st_size
    _assert_logits_agree(folder, smollm2_reference)
    _assert_greedy_tokens(folder, *smollm2_greedy)


def _assert_logits_agree(folder, reference):
    """The first text's logits within 1e-3 of PyTorch's, the same top-1 at every position."""
    import torch

    feeds = _tokenize(folder, TEXT[:1])
    session = create_session(folder / "model.onnx")
    logits = run(session, {**feeds, **empty_cache(ir.load(folder / "model.onnx"), batch=1)})["logits"]
    with torch.no_grad():
        expected_logits = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.max(np.abs(logits - expected_logits)) <= 1e-3
    assert np.mean(logits.argmax(-1) == expected_logits.argmax(-1)) == 1.0


def _assert_greedy_tokens(folder, prompt, expected):
    from xopt.generate import Decoder
    from xopt.runnable import open_runnable

    assert Decoder(open_runnable(folder)).generate(prompt, 64).tokens == expected


def test_demo_runs_offline_and_writes_results(tmp_path, capsys):
    output = tmp_path / "xopt-demo"
    assert main(["demo", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "embedding cosine min 1.0000" in out and "ORT latency 1×128 ms" in out
    assert {"model", "report.json"} == {p.name for p in output.iterdir()}
    assert (output / "model" / "tokenizer.json").is_file()

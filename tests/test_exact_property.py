"""Property: for random small transformer configs, the `exact` recipe keeps the outputs.

Hypothesis draws the architecture (BERT post-LN, GPT-2 pre-LN, Llama and Qwen2 with GQA and
RoPE), hidden size, heads, KV heads, layers, biases and tied embeddings; every lowering the fuse
pass can match is forced on (`lowering=all`), so parity covers the fused forms, not only what
happened to measure faster here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from conftest import build_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xopt
from xopt.inputs import sample_inputs
from xopt.passes import CleanupPass, FoldNormsPass, FusePass
from xopt.pipeline import RECIPES, PassManager
from xopt.verify import compare, reference_outputs


@st.composite
def configs(draw):
    family = draw(st.sampled_from(["bert", "gpt2", "llama", "qwen2"]))
    head_size = draw(st.sampled_from([4, 8]))
    heads = draw(st.sampled_from([2, 4]))
    hidden = heads * head_size
    layers = draw(st.integers(1, 2))
    intermediate = draw(st.sampled_from([16, 40]))
    vocab = 97
    if family == "bert":
        kwargs = dict(num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate)
        return "BertConfig", dict(vocab_size=vocab, hidden_size=hidden, **kwargs), "BertModel"
    if family == "gpt2":
        kwargs = dict(n_layer=layers, n_head=heads, n_positions=64, tie_word_embeddings=draw(st.booleans()))
        return "GPT2Config", dict(vocab_size=vocab, n_embd=hidden, **kwargs), "GPT2LMHeadModel"
    kv_heads = draw(st.sampled_from([h for h in (1, 2, heads) if heads % h == 0]))
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=draw(st.booleans()),
    )
    if family == "llama":
        biases = dict(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))
        return "LlamaConfig", {**kwargs, **biases}, "LlamaForCausalLM"
    return "Qwen2Config", kwargs, "Qwen2ForCausalLM"


def test_exact_recipe_is_cleanup_fold_norms_fuse():
    assert RECIPES["exact"] == ["cleanup", "fold-norms", "fuse"]


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs())
def test_exact_recipe_keeps_outputs_of_random_configs(config):
    with tempfile.TemporaryDirectory() as folder:
        model = xopt.load(build_folder(*config, Path(folder)))
    optimized, report = PassManager([CleanupPass(), FoldNormsPass(), FusePass(lowering="all")])(model)
    assert all(record.parity.max_rel <= 1e-5 for record in report.passes), report.passes
    feeds = sample_inputs(model, batch=3, sequence=11, padded=True, seed=7)
    parity = compare(reference_outputs(model, feeds), reference_outputs(optimized, feeds))
    assert parity.max_rel <= 1e-5, (config, parity)

"""Capture by stamping: a model of alike layers traced with one period of its layer kinds and the
next layer, the others copied from those, gives the graph that tracing every layer gives, to the bit
on padded inputs with a cache past the sliding window; a model whose layers differ, in kinds that
do not repeat or in what its code does with a layer's index, is traced whole."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIGS, build_folder

import xopt
from xopt import kv_cache
from xopt.capture import huggingface, layer_stamping
from xopt.inputs import sample_inputs
from xopt.verify import reference_outputs

STAMPED = "stamped from the trace of layer"
TRACED_WHOLE = "every layer traced"

_SIZES = dict(
    vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16
)
_KINDS_OF_3 = ["sliding_attention", "sliding_attention", "full_attention"]
DEEP_CONFIGS = {
    "llama": (*TINY_CONFIGS["llama"][:1], {**TINY_CONFIGS["llama"][1], "num_hidden_layers": 4}, "LlamaForCausalLM"),
    "qwen2": TINY_CONFIGS["qwen2"],  # 3 layers, untied head, q/k/v biases
    "gpt2": ("GPT2Config", dict(vocab_size=211, n_embd=48, n_layer=3, n_head=4, n_positions=64), "GPT2LMHeadModel"),
    "bert": (*TINY_CONFIGS["bert"][:1], {**TINY_CONFIGS["bert"][1], "num_hidden_layers": 3}, "BertModel"),
    # kinds repeating every 2 layers (sliding, full); every 3 (sliding, sliding, full), window 4
    "gemma2": ("Gemma2Config", {**_SIZES, "num_hidden_layers": 5, "sliding_window": 4}, "Gemma2ForCausalLM"),
    "gemma3": (
        "Gemma3TextConfig",
        {**_SIZES, "num_hidden_layers": 7, "sliding_window": 4, "layer_types": _KINDS_OF_3 * 2 + _KINDS_OF_3[:1]},
        "Gemma3ForCausalLM",
    ),
}
PERIODS = {"gemma2": 2, "gemma3": 3}


def _traced_whole(folder: Path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(layer_stamping, "_alike_layers", lambda model: None)
        return xopt.load(folder, capture_cache=False)


@pytest.mark.parametrize("name", sorted(DEEP_CONFIGS))
def test_stamped_layers_give_the_graph_every_layer_traced_gives(name, tmp_path, monkeypatch, caplog):
    folder = build_folder(*DEEP_CONFIGS[name], tmp_path / name)
    with caplog.at_level(logging.INFO, logger=layer_stamping.__name__):
        stamped = xopt.load(folder, capture_cache=False)
    period = PERIODS.get(name, 1)
    traced = "layer 1" if period == 1 else f"layers 1-{period}"
    assert f"stamped from the trace of {traced} (" in caplog.text
    whole = _traced_whole(folder, monkeypatch)
    graph = stamped.graph
    assert [v.name for v in graph.inputs] == [v.name for v in whole.graph.inputs]
    assert [v.name for v in graph.outputs] == [v.name for v in whole.graph.outputs]
    assert [v.shape for v in graph.outputs] == [v.shape for v in whole.graph.outputs]
    assert set(graph.initializers) == set(whole.graph.initializers)
    last = DEEP_CONFIGS[name][1].get("num_hidden_layers", DEEP_CONFIGS[name][1].get("n_layer")) - 1
    last_layer = re.compile(rf"\.(layers|layer|h)\.{last}'")  # its module path, in the nodes' metadata
    assert any(last_layer.search(node.metadata_props.get("pkg.torch.onnx.name_scopes", "")) for node in graph)
    past = 5 if kv_cache.has_kv_cache(whole) else 0  # with 7 new tokens, past the sliding windows of 4
    feeds = sample_inputs(whole, batch=2, sequence=7, past=past, padded=True)
    expected, actual = reference_outputs(whole, feeds), reference_outputs(stamped, feeds)
    assert set(actual) == set(expected)
    for output, want in expected.items():
        np.testing.assert_array_equal(actual[output], want, err_msg=output)


def test_a_layer_whose_code_reads_its_index_is_traced_whole(tmp_path, caplog):
    """GPT-2 scaling its attention scores by 1/(layer index + 1): the copies of layer 1 would scale
    layer 2's by 1/2; the check against the module finds it, and every layer is traced."""
    config_class, kwargs, model_class = DEEP_CONFIGS["gpt2"]
    folder = build_folder(config_class, {**kwargs, "scale_attn_by_inverse_layer_idx": True}, model_class, tmp_path)
    with caplog.at_level(logging.INFO, logger=layer_stamping.__name__):
        captured = xopt.load(folder, capture_cache=False)
    assert TRACED_WHOLE in caplog.text and "logits differs from the module's" in caplog.text
    assert STAMPED not in caplog.text
    _assert_computes_what_the_module_does(captured, folder)


def test_layers_of_kinds_that_do_not_repeat_are_not_stamped_and_a_cut_model_is_restored(tmp_path):
    config_class, kwargs, model_class = DEEP_CONFIGS["qwen2"]
    sliding = {**kwargs, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    model = huggingface.load_hf_model(build_folder(config_class, sliding, model_class, tmp_path / "sliding"))
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert layer_stamping._alike_layers(model) is None
    model = huggingface.load_hf_model(build_folder(*DEEP_CONFIGS["qwen2"], tmp_path / "alike"))
    layers = layer_stamping._alike_layers(model)
    assert layers is not None and layers.path == "model.layers" and layers.period == 1
    with layer_stamping._cut_to(model, layers, 2):
        assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert model.model.layers is layers.modules and len(layers.modules) == 3 and model.config.num_hidden_layers == 3
    assert len(model.config.layer_types) == 3


def test_a_stamping_that_fails_falls_back_to_tracing_every_layer(tmp_path, monkeypatch, caplog):
    def unforeseen(graph, path, layer):
        raise ValueError("a graph the stamping does not foresee")

    monkeypatch.setattr(layer_stamping, "_layer_part", unforeseen)
    folder = build_folder(*DEEP_CONFIGS["qwen2"], tmp_path / "qwen2")
    with caplog.at_level(logging.INFO, logger=layer_stamping.__name__):
        captured = xopt.load(folder, capture_cache=False)
    assert "stamping failed (ValueError: a graph the stamping does not foresee)" in caplog.text
    _assert_computes_what_the_module_does(captured, folder)


def _assert_computes_what_the_module_does(captured, folder: Path) -> None:
    """The captured causal LM's outputs on the capture's example inputs are the module's."""
    call = huggingface._causal_lm_call(huggingface.load_hf_model(folder))
    assert [v.name for v in captured.graph.outputs] == call.output_names
    expected, actual = call.outputs(), reference_outputs(captured, call.feeds())
    for name, want in expected.items():
        np.testing.assert_allclose(actual[name], want, atol=1e-4, err_msg=name)

"""prune-layers: block scores against transformers' hidden states, dropped blocks against transformers
with those layers deleted (greedy generation token for token), ReplaceMe's fit, refusals."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import build_folder
from helpers import fuse_only, next_token_nll, transformers_greedy

import xopt
from xopt.analysis import find_transformer_structure
from xopt.analysis.block_boundaries import block_output
from xopt.calibration import calibration_feeds, probe_values
from xopt.errors import XoptError
from xopt.generate import Decoder
from xopt.inputs import sample_inputs
from xopt.kv_cache import past_inputs
from xopt.passes import CleanupPass, FusePass, PruneLayersPass
from xopt.passes.block_scores import GREEDY_WINDOWS, measure_distances
from xopt.passes.prune_layers import GUARD_WINDOWS, ReplaceMeFit, _guard
from xopt.pipeline import PassManager
from xopt.runnable import open_runnable
from xopt.verify import reference_outputs

PROMPT = [5, 17, 42, 9, 3, 11]

_SMALL = dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=5, num_attention_heads=4)
DEEP_CONFIGS = {
    "llama": (
        "LlamaConfig",
        dict(
            vocab_size=211,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=2,
        ),
        "LlamaForCausalLM",
    ),
    "gpt2": ("GPT2Config", dict(vocab_size=211, n_embd=48, n_layer=5, n_head=4, n_positions=64), "GPT2LMHeadModel"),
    "olmo2": ("Olmo2Config", dict(_SMALL, num_key_value_heads=2), "Olmo2ForCausalLM"),
    "gemma2": ("Gemma2Config", dict(_SMALL, num_key_value_heads=2, head_dim=16, sliding_window=4), "Gemma2ForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", dict(_SMALL, rotary_pct=0.5), "GPTNeoXForCausalLM"),
    "phi": ("PhiConfig", dict(_SMALL, partial_rotary_factor=0.5), "PhiForCausalLM"),
    "granite": (  # constant scales: h + r·sublayer(h), embeddings ·e, logits / l, scores ·a
        "GraniteConfig",
        dict(
            _SMALL,
            num_key_value_heads=2,
            residual_multiplier=0.5,
            embedding_multiplier=4.0,
            logits_scaling=0.5,
            attention_multiplier=0.3,
        ),
        "GraniteForCausalLM",
    ),
    "bloom": ("BloomConfig", dict(vocab_size=211, hidden_size=48, n_layer=5, n_head=4), "BloomForCausalLM"),
}


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """name → (folder, cleaned-up captured model) of a 5–6 block random model."""
    cache = {}

    def get(name: str):
        if name not in cache:
            folder = build_folder(*DEEP_CONFIGS[name], tmp_path_factory.mktemp(f"deep-{name}"))
            cache[name] = folder, CleanupPass()(xopt.load(folder)).model
        return cache[name]

    return get


def _without_layers(folder, removed: list[int]):
    """The transformers model with decoder layers `removed` deleted (and the others renumbered)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    stacks = (("transformer", "h"), ("gpt_neox", "layers"), ("model", "layers"))
    owner, attribute = next((getattr(model, name), layers) for name, layers in stacks if hasattr(model, name))
    kept = [layer for index, layer in enumerate(getattr(owner, attribute)) if index not in removed]
    for index, layer in enumerate(kept):
        names = ("attn", "self_attn", "attention", "self_attention")
        attention = next(getattr(layer, name) for name in names if hasattr(layer, name))
        attention.layer_idx = index
    setattr(owner, attribute, torch.nn.ModuleList(kept))
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in removed]
    return model


@pytest.mark.parametrize(("name", "score"), [("llama", "bi"), ("llama", "angular"), ("gpt2", "greedy")])
def test_dropped_blocks_generate_what_transformers_generates_without_them(deep, tmp_path, name, score):
    folder, model = deep(name)
    pruned, report = PassManager([PruneLayersPass(n=2, method="drop", score=score)])(model)
    removed = report.passes[0].stats["removed"]
    assert len(removed) == 2 and report.passes[0].stats["cache_layers_removed"] == 2
    assert [v.name for v in past_inputs(pruned)] == [
        f"past_key_values.{i}.{k}" for i in range(4 if name == "llama" else 3) for k in ("key", "value")
    ]
    xopt.save(pruned, tmp_path / "pruned")
    generated = Decoder(open_runnable(tmp_path / "pruned")).generate(PROMPT, 16).tokens
    assert generated == transformers_greedy(_without_layers(folder, removed), PROMPT, 16)


def test_scores_match_transformers_hidden_states(deep):
    """Block Influence from xopt's stream states equals 1 − cos of transformers' hidden states."""
    folder, model = deep("llama")
    feeds = calibration_feeds(model, windows=2, window=64)
    scores = measure_distances(model, feeds)
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    cosines = []
    for feed in feeds:
        with torch.no_grad():
            states = reference(torch.tensor(feed["input_ids"]), output_hidden_states=True).hidden_states
        rows = [s[0].double().numpy() for s in states[:-1]]  # the last one is after the final norm
        rows = [r / np.linalg.norm(r, axis=1, keepdims=True) for r in rows]
        cosines.append([np.sum(a * b, axis=1) for a, b in itertools.pairwise(rows)])
    expected = 1 - np.mean(np.concatenate([np.stack(c) for c in cosines], axis=1), axis=1)
    np.testing.assert_allclose(scores.influence[: len(expected)], expected, atol=1e-5)
    assert scores.angular.shape == (7, 7) and np.all(scores.angular[np.triu_indices(7, 1)] > 0)


def test_greedy_removal_predicts_the_pruned_models_calibration_loss(deep):
    """A gate of 0 is the block removed exactly: the pruned model's loss is greedy's last figure."""
    _, model = deep("llama")
    pruned, report = PassManager([PruneLayersPass(n=2, method="drop", score="greedy")], verify=False)(model)
    scores = report.passes[0].stats["scores"]
    assert len(scores["greedy_order"]) == len(scores["greedy_loss"]) == 2
    loss = next_token_nll(pruned, calibration_feeds(pruned)[:GREEDY_WINDOWS])
    assert loss == pytest.approx(scores["greedy_loss"][1], rel=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_replaceme_lowers_the_stream_error_and_still_generates(deep, tmp_path, name):
    _, model = deep(name)
    pruned, report = PassManager([PruneLayersPass(n=2, score="angular")])(model)
    stats = report.passes[0].stats
    assert 0 not in stats["removed"]
    for error_drop, error_fit in stats["fit_error"]:
        assert error_fit < error_drop
    xopt.save(pruned, tmp_path / "pruned")
    generation = Decoder(open_runnable(tmp_path / "pruned")).generate(PROMPT, 8)
    assert len(generation.tokens) == 8


@pytest.mark.parametrize("name", ["olmo2", "gemma2"])
def test_blocks_with_norms_after_their_sublayers_drop_and_refuse_replaceme(deep, tmp_path, name):
    """OLMo-2 and Gemma-2 add a norm of each sublayer's output into the stream: dropping blocks
    generates what transformers generates without those layers; ReplaceMe, whose map goes into the
    down projection, is refused."""
    folder, model = deep(name)
    with pytest.raises(XoptError, match="a norm sits between it and the residual add"):
        PruneLayersPass(n=1)(model.clone())
    pruned, report = PassManager([PruneLayersPass(n=2, method="drop")])(model)
    removed = report.passes[0].stats["removed"]
    assert len(removed) == 2 and report.passes[0].stats["cache_layers_removed"] == 2
    xopt.save(pruned, tmp_path / "pruned")
    generated = Decoder(open_runnable(tmp_path / "pruned")).generate(PROMPT, 16).tokens
    assert generated == transformers_greedy(_without_layers(folder, removed), PROMPT, 16)


@pytest.mark.parametrize("name", ["gpt_neox", "phi", "granite", "bloom"])
def test_blocks_drop_to_what_transformers_computes_without_them(deep, name):
    """GPT-NeoX and Phi add attention and MLP to the stream at once, (a + m) + h: dropping blocks
    gives transformers' logits without those layers (before `cleanup` wrote that sum as two
    residual adds, the blocks' inputs were read as a sublayer's output and the drop was wrong).
    Granite scales each sublayer's output by a constant before its residual add, h + r·o (before
    the structure read past that scale, it found no MLPs and no LM head and refused). Bloom folds
    its heads into the batch axis between the softmax and P·V (before, its attention was not
    found, its QKV and output projections were read as an MLP, and half a layer was dropped)."""
    folder, model = deep(name)
    pruned, report = PassManager([PruneLayersPass(n=2, method="drop")])(model)
    removed = report.passes[0].stats["removed"]
    feeds = sample_inputs(pruned, batch=1, sequence=len(PROMPT), past=0, seed=0)
    feeds["input_ids"] = np.array([PROMPT], np.int64)
    with torch.no_grad():
        expected = _without_layers(folder, removed)(torch.tensor(feeds["input_ids"])).logits.numpy()
    np.testing.assert_allclose(reference_outputs(pruned, feeds)["logits"], expected, atol=2e-5, rtol=1e-4)


def test_post_norm_encoder_drops_blocks_and_refuses_replaceme(tiny_model):
    model = CleanupPass()(tiny_model("bert").clone()).model
    _, report = PassManager([PruneLayersPass(n=1, method="drop")])(model)
    assert report.passes[0].parity.max_abs < float("inf")
    assert report.output.params < report.input.params
    with pytest.raises(XoptError, match=r"post-norm.*method=drop"):
        PassManager([PruneLayersPass(n=1)], verify=False)(model)


def test_blocks_whose_attention_went_unread_are_not_removed(tmp_path):
    """XGLM's attention is not read (its scores pass a clamp to the dtype's minimum), so its blocks
    were MLPs alone: removing one removed half a layer, without a word."""
    config = dict(vocab_size=211, d_model=48, num_layers=2, attention_heads=4, ffn_dim=96, max_position_embeddings=64)
    model = CleanupPass()(xopt.load(build_folder("XGLMConfig", config, "XGLMForCausalLM", tmp_path))).model
    with pytest.raises(XoptError, match="block 0 has no attention, and the structure could not read the attention at"):
        PruneLayersPass(n=1, method="drop")(model)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(), "exactly one of n"),
        (dict(n=1, ratio=0.5), "exactly one of n"),
        (dict(ratio=1.5), "below 1"),
        (dict(ratio=0.01), "removes none"),
        (dict(n=6), "cannot remove 6 of 6"),
    ],
)
def test_bad_options_are_one_line_errors(deep, options, message):
    _, model = deep("llama")
    with pytest.raises(XoptError, match=message):
        PruneLayersPass(**options)(model.clone())


@pytest.mark.parametrize("skip", ["", fuse_only("cached-attention")])
def test_a_fused_model_is_refused(tiny_model, skip):
    """Also with ONNX `Attention` alone, around which the structure would read a layer as two blocks."""
    fused = FusePass(lowering="all", skip=skip)(CleanupPass()(tiny_model("llama").clone()).model).model
    with pytest.raises(XoptError, match="before fuse"):
        PruneLayersPass(n=1)(fused)


def test_replaceme_predicts_the_pruned_models_stream_error(deep):
    """The fit's reported error is what the pruned model shows: its stream after the kept block,
    against the full model's stream after the removed one, on the calibration tokens."""
    _, model = deep("llama")
    result = PruneLayersPass(n=1, score="bi", guard=False)(model.clone())
    (start,) = result.stats["removed"]
    ((error_drop, error_fit),) = result.stats["fit_error"]
    before, after = find_transformer_structure(model), find_transformer_structure(result.model)
    feeds = calibration_feeds(model)
    target = block_output(before.blocks[start], before)
    kept = block_output(before.blocks[start - 1], before)
    replaced = block_output(after.blocks[start - 1], after)
    full = list(probe_values(model, [target, kept], feeds))
    pruned = [o[replaced.name] for o in probe_values(result.model, [replaced], feeds)]
    fit = sum(np.sum((o[target.name] - p).astype(np.float64) ** 2) for o, p in zip(full, pruned, strict=True))
    drop = sum(np.sum((o[target.name] - o[kept.name]).astype(np.float64) ** 2) for o in full)
    assert fit / drop == pytest.approx(error_fit / error_drop, rel=1e-3)
    assert error_fit < 0.5 * error_drop


def test_replaceme_guard_predicts_the_pruned_models_held_out_loss(deep):
    """The gated model with switched maps is the pruned model exactly: its held-out loss is the guard's
    figure, and the guard never does worse than drop."""
    _, model = deep("llama")
    result = PruneLayersPass(blocks="2+4", windows=3)(model.clone())
    guard = result.stats["guard"]
    held_out = calibration_feeds(model, windows=3 + GUARD_WINDOWS)[3:]
    assert len(held_out) == GUARD_WINDOWS
    assert next_token_nll(result.model, held_out) == pytest.approx(guard["kept"], rel=1e-5)
    assert guard["kept"] <= min(guard["drop"], guard["all_maps"])
    dropped = PruneLayersPass(blocks="2+4", method="drop")(model.clone()).model
    assert next_token_nll(dropped, held_out) == pytest.approx(guard["drop"], rel=1e-5)


def test_replaceme_guard_leaves_out_a_map_that_raises_the_loss(deep):
    """Two runs: an identity map (the same loss as drop: kept) and a wild one (left out)."""
    _, model = deep("llama")
    width = find_transformer_structure(model).blocks[0].mlp.down.out_features
    wild = np.random.default_rng(0).standard_normal((width, width)) * 10
    fits = [ReplaceMeFit(np.eye(width), 1.0, 1.0), ReplaceMeFit(wild, 1.0, 1.0)]
    held_out = calibration_feeds(model, windows=2)
    keep, stats, line = _guard(model, [2, 4], [(2, 2), (4, 4)], fits, held_out, True, 2)
    assert keep == [True, False]
    assert stats["kept"] == stats["drop"] < stats["all_maps"]
    assert "kept the maps of 2–2" in line


def test_explicit_blocks_are_removed_and_checked(deep):
    _, model = deep("llama")
    result = PruneLayersPass(blocks="4+2", method="drop")(model.clone())
    assert result.stats["removed"] == [2, 4]
    for options, message in (
        (dict(blocks="2+x"), "joined by"),
        (dict(blocks="0"), "indices must lie in 1"),
        (dict(blocks="2", n=1), "not both"),
    ):
        with pytest.raises(XoptError, match=message):
            PruneLayersPass(**options)(model.clone())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(n=1, ratio=0.5), "exactly one of n=K"),
        (dict(), "exactly one of n=K"),
        (dict(ratio=1.5), "must be below 1"),
        (dict(blocks="1", ratio=0.5), "not both"),
    ],
)
def test_options_are_checked_before_the_model(tiny_model, options, message):
    """A post-norm BERT would be refused for replaceme; the options' own fault is named first."""
    with pytest.raises(XoptError, match=message):
        PruneLayersPass(**options)(tiny_model("bert").clone())


def test_blocks_command_prints_and_plots_the_scores(deep, tmp_path, capsys):
    from xopt.cli import main

    folder, _ = deep("llama")
    assert main(["blocks", str(folder), "--greedy", "2", "--plot", str(tmp_path / "s.png"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert len(scores["influence"]) == 6 and len(scores["greedy_order"]) == 2
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert main(["blocks", str(folder), "--greedy", "9"]) == 2
    assert "between 0 and 6, the model's blocks" in capsys.readouterr().err

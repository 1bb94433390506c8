"""last-token-logits: the last position's logits are unchanged, generation gives transformers'
tokens after the exact recipe with it, and what cannot use it says so in one line."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import model_from_text, transformers_greedy

import xopt
from xopt.cli import main
from xopt.errors import XoptError
from xopt.generate import Decoder
from xopt.inputs import sample_inputs
from xopt.passes import LastTokenLogitsPass
from xopt.pipeline import PassManager, parse_spec
from xopt.runnable import open_runnable
from xopt.verify import reference_outputs

PROMPT = [5, 17, 42, 9, 3]
RECIPE = "cleanup,fold-norms,last-token-logits,fuse"


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "gemma"])
def test_the_last_positions_logits_are_unchanged(tiny_model, name):
    model = tiny_model(name)
    cut, report = PassManager([LastTokenLogitsPass()])(model)  # exact: verified at tight tolerance
    assert report.passes[0].modified
    feeds = sample_inputs(model, batch=2, sequence=9)
    full, last = reference_outputs(model, feeds)["logits"], reference_outputs(cut, feeds)["logits"]
    assert last.shape == (2, 1, full.shape[2])
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    assert not LastTokenLogitsPass()(cut.clone()).modified  # applied once


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generation_after_the_exact_recipe_with_it_gives_the_transformers_tokens(tiny_folder, tmp_path, name):
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder(name), attn_implementation="eager")
    expected = transformers_greedy(reference.eval(), PROMPT, 16)
    model, _ = PassManager(parse_spec(RECIPE))(xopt.load(tiny_folder(name)))
    xopt.save(model, tmp_path / "m")
    assert Decoder(open_runnable(tmp_path / "m")).generate(PROMPT, 16).tokens == expected


def test_perplexity_of_a_last_token_model_is_refused_in_one_line(tiny_model, tmp_path, capsys):
    cut, _ = PassManager([LastTokenLogitsPass()], verify=False)(tiny_model("llama"))
    xopt.save(cut, tmp_path / "m")
    capsys.readouterr()  # what building the fixture printed
    assert main(["eval", str(tmp_path / "m")]) == 2
    error = capsys.readouterr().err.strip()
    assert "perplexity needs every position" in error and "\n" not in error


def test_an_encoder_has_no_lm_head_to_cut(tiny_model):
    with pytest.raises(XoptError, match="no LM head"):
        LastTokenLogitsPass()(tiny_model("bert").clone())


def test_perplexity_of_a_sequence_classifier_is_refused_in_one_line(tiny_folder, tmp_path, capsys):
    """Optimum's `--task text-classification` exports name their [batch, labels] output `logits`."""
    classifier = model_from_text(
        """
    <ir_version: 10, opset_import: ["" : 18]>
    classify (int64[batch, sequence] input_ids, int64[batch, sequence] attention_mask) => (float[batch, 2] logits) {
        table = Constant <value = float[211, 2] {"""
        + ", ".join(["0.5"] * 422)
        + """}> ()
        rows = Gather (table, input_ids)
        axis = Constant <value = int64[1] {1}> ()
        logits = ReduceMean <keepdims = 0> (rows, axis)
    }
    """
    )
    xopt.save(classifier, tmp_path / "classifier.onnx")
    tokenizer = tiny_folder("bert")
    capsys.readouterr()  # what building the fixture printed
    assert main(["eval", str(tmp_path / "classifier.onnx"), "--tokenizer", str(tokenizer)]) == 2
    error = capsys.readouterr().err.strip()
    assert "one row per sequence (a classifier)" in error and "\n" not in error

"""`xopt generate`: KV-cache decoding in ONNX Runtime matches transformers' greedy generate."""

from __future__ import annotations

import json

import pytest
from helpers import transformers_greedy

import xopt
from xopt.cli import main
from xopt.errors import XoptError
from xopt.generate import Decoder, logits_row
from xopt.kv_cache import shares_buffers
from xopt.passes import CleanupPass, FusePass
from xopt.runnable import open_runnable

PROMPT = [5, 17, 42, 9, 3]


def _transformers_greedy(folder, prompt, new_tokens):
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return transformers_greedy(reference, prompt, new_tokens)


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "gemma"])
def test_greedy_generation_matches_transformers_before_and_after_the_exact_recipe(
    tiny_folder, tiny_model, tmp_path, name
):
    expected = _transformers_greedy(tiny_folder(name), PROMPT, 24)
    optimized, _ = xopt.optimize(tiny_model(name))
    for label, model in (("captured", tiny_model(name)), ("exact", optimized)):
        assert [v.name for v in model.graph.outputs] == [v.name for v in tiny_model(name).graph.outputs]
        xopt.save(model, tmp_path / label)
        generation = Decoder(open_runnable(tmp_path / label)).generate(PROMPT, 24)
        assert generation.tokens == expected, label
        assert generation.prefill_ms > 0 and generation.decode_tokens_per_s > 0


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
def test_a_cache_updated_in_place_generates_the_transformers_tokens(tiny_folder, tiny_model, tmp_path, name):
    expected = _transformers_greedy(tiny_folder(name), PROMPT, 24)
    lowered = FusePass(lowering="all")(CleanupPass()(tiny_model(name).clone()).model).model
    assert shares_buffers(lowered) and not shares_buffers(tiny_model(name))
    xopt.save(lowered, tmp_path / "m")
    decoder = Decoder(open_runnable(tmp_path / "m"))
    assert decoder.in_place and decoder.generate(PROMPT, 24).tokens == expected


def test_sampling_is_reproducible_and_stops_at_eos(tiny_model, tmp_path):
    xopt.save(tiny_model("llama"), tmp_path / "m")
    decoder = Decoder(open_runnable(tmp_path / "m"))
    first = decoder.generate(PROMPT, 16, temperature=1.5, seed=3)
    assert decoder.generate(PROMPT, 16, temperature=1.5, seed=3).tokens == first.tokens
    assert decoder.generate(PROMPT, 16, temperature=1.5, seed=4).tokens != first.tokens
    stopped = decoder.generate(PROMPT, 16, temperature=1.5, seed=3, eos_token_id=first.tokens[2])
    assert stopped.tokens == first.tokens[: first.tokens.index(first.tokens[2]) + 1] and stopped.stopped_at_eos


def test_cli_streams_text_and_reports_speed(tiny_model, tmp_path, capsys):
    xopt.save(tiny_model("llama"), tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "she was", "--max-new-tokens", "6", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("she was")
    timings = json.loads(out[out.index("{") :])
    assert timings["prompt_tokens"] == 2 and 1 <= timings["new_tokens"] <= 6 and timings["prefill_ms"] > 0
    assert main(["generate", str(tmp_path / "m"), "--prompt", "she was", "--max-new-tokens", "2", "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "greedy decoding (--temperature 0) draws nothing, so --seed 3 is unused" in err
    assert "(2 prompt tokens)" in err and ("(2 new tokens)" in err or "(1 new token)" in err)
    assert main(["generate", str(tmp_path / "m"), "--prompt", "she was", "--max-new-tokens", "1"]) == 0
    assert "(2 prompt tokens), decode n/a (1 new token)" in capsys.readouterr().err


def test_generate_errors_are_one_line(tiny_model, tmp_path, capsys):
    xopt.save(tiny_model("bert"), tmp_path / "encoder")
    assert main(["generate", str(tmp_path / "encoder"), "--prompt", "she was"]) == 2
    assert "not a decoder with a KV cache" in capsys.readouterr().err
    xopt.save(tiny_model("llama"), tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "she", "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip() == "xopt: error: --max-new-tokens 0: need at least 1"
    cases = {
        ("--max-new-tokens", "1000000000000"): "the model's config allows",
        ("--temperature", "nan"): "must be a finite number",
        ("--temperature", "inf"): "must be a finite number",
        ("--seed", "-1", "--temperature", "1"): "--seed -1: must not be negative",
        ("--threads", "0"): "--threads 0",
    }
    for options, message in cases.items():
        assert main(["generate", str(tmp_path / "m"), "--prompt", "she", *options]) == 2
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and message in errors[0], (options, errors)
    with pytest.raises(XoptError, match="prompt is empty"):
        Decoder(open_runnable(tmp_path / "m")).generate([], 4)
    with pytest.raises(XoptError, match=r"prompt token id 211 is outside .*'s vocabulary of 211"):
        Decoder(open_runnable(tmp_path / "m")).generate([5, 211], 4)


def test_in_place_decoding_reads_logits_whose_vocabulary_is_symbolic(tiny_folder, tiny_model, tmp_path):
    """Decode steps write logits into a bound buffer sized from the model's stated vocabulary;
    a model that leaves it symbolic is read through ONNX Runtime's own output instead."""
    import onnx_ir as ir

    expected = _transformers_greedy(tiny_folder("llama"), PROMPT, 8)
    lowered = FusePass(lowering="all")(CleanupPass()(tiny_model("llama").clone()).model).model
    logits = next(v for v in lowered.graph.outputs if v.name == "logits")
    logits.shape = ir.Shape([*logits.shape[:-1], "vocab"])
    xopt.save(lowered, tmp_path / "m")
    decoder = Decoder(open_runnable(tmp_path / "m"))
    assert logits_row(decoder.runnable.model) is None
    assert decoder.in_place and decoder.generate(PROMPT, 8).tokens == expected

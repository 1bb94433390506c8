"""`xopt eval`: perplexity, KL and top-1 for causal LMs, embedding cosine for encoders."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

import xopt
from xopt.backends.onnxruntime import create_session
from xopt.cli import main
from xopt.evaluate import COST_WINDOWS, ROWS_AT_ONCE, WindowScores, evaluate, kl_sum, log_softmax
from xopt.runnable import open_runnable
from xopt.text import (
    CALIBRATION_FINGERPRINT_KEY,
    bundled_text,
    passage_fingerprints,
    read_text,
    split_sentences,
    text_digest,
)


@pytest.fixture(scope="module")
def optimized_llama(tiny_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("llama-out") / "out"
    assert main(["optimize", str(tiny_folder("llama")), "-o", str(output)]) == 0
    return output


def test_perplexity_matches_pytorch_on_the_same_windows(tiny_folder, optimized_llama):
    from transformers import AutoModelForCausalLM

    text = read_text(None, "evaluation")
    quality = evaluate(open_runnable(optimized_llama), text, window=64)
    runnable = open_runnable(optimized_llama)
    ids = runnable.tokenizer()(text, add_special_tokens=False)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder("llama")).eval()
    windows = torch.tensor(ids[: len(ids) // 64 * 64]).reshape(-1, 64)
    with torch.no_grad():
        logits = reference(input_ids=windows).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert quality.tokens == windows.shape[0] * 63 and quality.windows == windows.shape[0]
    assert quality.perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert quality.kl is None and quality.cosine_min is None
    first = evaluate(open_runnable(optimized_llama), text, window=64, max_windows=3)
    nll = torch.nn.functional.cross_entropy(logits[:3, :-1].reshape(-1, logits.shape[-1]), windows[:3, 1:].reshape(-1))
    assert first.windows == 3 and first.tokens == 3 * 63
    assert first.perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-5)


def test_kl_and_top1_against_the_captured_model(tiny_folder, optimized_llama):
    quality = evaluate(
        open_runnable(optimized_llama), read_text(None, "evaluation"), open_runnable(tiny_folder("llama")), window=32
    )
    assert 0 <= quality.kl < 1e-9
    assert quality.top1_agreement == 1.0


def test_log_softmax_and_kl_over_batches_in_blocks_of_positions_match_torch():
    """[batch, positions, vocabulary] float32 logits, more rows than one block: float64 results."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, ROWS_AT_ONCE + 5, 40, generator=generator) * 4
    reference = logits + torch.randn(logits.shape, generator=generator)
    log_p, log_ref = log_softmax(logits.numpy()), log_softmax(reference.numpy())
    assert log_p.dtype == np.float64 and log_p.shape == tuple(logits.shape)
    expected = torch.log_softmax(logits.double(), -1)
    np.testing.assert_allclose(log_p, expected.numpy(), rtol=1e-13, atol=1e-13)
    reference_log_probs = torch.log_softmax(reference.double(), -1)
    expected_kl = torch.nn.functional.kl_div(expected, reference_log_probs, log_target=True, reduction="sum")
    assert kl_sum(log_ref, log_p) == pytest.approx(float(expected_kl), rel=1e-12)


def test_window_scores_match_torch_on_drawn_distributions():
    """KL is taken from the reference (Σ p_ref·(log p_ref − log p)), averaged over every predicted
    token of every window; perplexity over the same tokens; top-1 compares the two argmaxes. The
    windows are longer than the positions scored at once, so the blocks' sums are checked."""
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 50, (2 * ROWS_AT_ONCE + 3,), generator=generator) for _ in range(3)]
    logits = [torch.randn(len(w) - 1, 50, generator=generator, dtype=torch.float64) * 3 for w in windows]
    ref_logits = [x + torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in logits]
    scores, from_log_probs = WindowScores(), WindowScores()
    for tokens, x, ref in zip(windows, logits, ref_logits, strict=True):
        scores.add(tokens.numpy(), x.numpy(), ref.numpy())
        from_log_probs.add(tokens.numpy(), log_softmax(x.numpy()), log_softmax(ref.numpy()))
    quality = scores.quality()
    for name, value in from_log_probs.quality().to_dict().items():
        assert value == pytest.approx(getattr(quality, name), rel=1e-12), name
    log_p, log_ref = torch.log_softmax(torch.cat(logits), -1), torch.log_softmax(torch.cat(ref_logits), -1)
    targets = torch.cat([tokens[1:] for tokens in windows])
    kl = torch.nn.functional.kl_div(log_p, log_ref, log_target=True, reduction="batchmean")
    nll = torch.nn.functional.nll_loss(log_p, targets)
    assert quality.windows == 3 and quality.tokens == 3 * (2 * ROWS_AT_ONCE + 2)
    assert quality.kl == pytest.approx(float(kl), rel=1e-12)
    assert quality.perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-12)
    reference_nll = torch.nn.functional.nll_loss(log_ref, targets)
    assert quality.reference_perplexity == pytest.approx(float(torch.exp(reference_nll)), rel=1e-12)
    assert quality.top1_agreement == pytest.approx(float((log_p.argmax(-1) == log_ref.argmax(-1)).double().mean()))
    assert 0.05 < quality.top1_agreement < 1 and quality.kl > 0.01  # the drawn pairs do differ
    alone = WindowScores()
    alone.add(windows[0].numpy(), logits[0].numpy())
    assert alone.quality().kl is None and alone.quality().top1_agreement is None
    assert alone.quality().reference_perplexity is None


def test_a_lossy_pipeline_reports_its_cost_on_the_evaluation_text(tiny_folder, tiny_model):
    """The report carries what `xopt eval` gives for the output against the input on the bundled
    evaluation text's first windows; exact or unverified pipelines carry nothing, a model with no
    tokenizer a reason."""
    model = tiny_model("llama")
    lossy = "cleanup,quantize(method=rtn,accuracy=0)"
    optimized, report = xopt.optimize(model, passes=lossy)
    text = read_text(None, "evaluation")
    before = open_runnable(tiny_folder("llama"))
    after = dataclasses.replace(before, model=optimized, session=create_session(optimized))
    expected = evaluate(after, text, before, max_windows=COST_WINDOWS)
    assert report.quality == expected.to_dict()
    assert report.quality["windows"] == COST_WINDOWS and report.quality["kl"] > 0
    assert report.quality["reference_perplexity"] == evaluate(before, text, max_windows=COST_WINDOWS).perplexity
    assert report.describe_quality() in report.format_table().splitlines()
    assert report.describe_quality().startswith(f"quality on {COST_WINDOWS} windows of the bundled evaluation text")
    assert xopt.optimize(model, passes="cleanup")[1].quality == {}
    assert xopt.optimize(model, passes=lossy, verify=False)[1].quality == {}
    bare = tiny_model("llama").clone()
    bare.metadata_props.pop("xopt.hf_folder")
    (reason,) = xopt.optimize(bare, passes=lossy)[1].quality.values()
    assert reason.startswith("no tokenizer")
    calibrated = f"cleanup,quantize(method=gptq,windows=1,accuracy=0,calibration={bundled_text('evaluation')})"
    (reason,) = xopt.optimize(model, passes=calibrated)[1].quality.values()
    assert reason == "the output was calibrated on this text"


def test_encoder_cosine_and_cli_json(tiny_folder, tmp_path, capsys):
    output = tmp_path / "bert-out"
    assert main(["optimize", str(tiny_folder("bert")), "-o", str(output)]) == 0
    capsys.readouterr()
    assert main(["eval", str(output), "--reference", str(tiny_folder("bert")), "--json", "--max-sentences", "40"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"perplexity", "kl", "top1_agreement", "cosine_min", "cosine_mean", "tokens"} <= set(result)
    assert result["sentences"] == 40 and result["tokens"] > 40
    assert 0.99999 < result["cosine_min"] <= result["cosine_mean"] <= 1.0 + 1e-12
    assert result["perplexity"] is None
    assert main(["eval", str(output), "--max-sentences", "40"]) == 2  # no reference: nothing to measure
    assert "measured against a reference model" in capsys.readouterr().err


def test_eval_errors_are_one_line(tiny_folder, optimized_llama, tmp_path, capsys):
    assert main(["eval", str(optimized_llama), "--reference", str(tiny_folder("bert"))]) == 2
    assert "but the reference is a feature-extraction model" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["eval", str(optimized_llama), "--text", str(short)]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    bare = tmp_path / "bare.onnx"
    bare.write_bytes((optimized_llama / "model.onnx").read_bytes())
    assert main(["eval", str(bare)]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
    assert main(["eval", str(bare), "--tokenizer", str(optimized_llama), "--window", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert main(["eval", str(optimized_llama), "--max-windows", "0"]) == 2
    assert "--max-windows 0: must be at least 1" in capsys.readouterr().err
    assert main(["eval", str(optimized_llama), "--window", "64", "--max-windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 2


def test_eval_checks_positions_vocabulary_and_reference_before_running(tiny_folder, tmp_path, capfd):
    from conftest import build_folder

    def error(argv):
        assert main(argv) == 2
        lines = capfd.readouterr().err.splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    gpt2 = tmp_path / "gpt2"  # n_positions 64; its model file alone still finds its config beside it
    assert main(["optimize", str(tiny_folder("gpt2")), "-o", str(gpt2), "--passes", "cleanup"]) == 0
    capfd.readouterr()
    assert "the model's config allows 64 positions" in error(["eval", str(gpt2)])
    assert "the model's config allows 64 positions" in error(["eval", str(gpt2 / "model.onnx"), "--window", "65"])
    small = build_folder(  # a vocabulary of 150 against the other tiny models' 211
        "GPT2Config",
        dict(vocab_size=150, n_embd=48, n_layer=1, n_head=4, n_positions=64),
        "GPT2LMHeadModel",
        tmp_path / "small",
    )
    llama = str(tiny_folder("llama"))
    message = error(["eval", str(small), "--tokenizer", llama, "--window", "32"])
    assert message.startswith("xopt: error: the tokenizer gives id ") and message.endswith("vocabulary of 150")
    message = error(["eval", str(small), "--reference", llama, "--window", "32"])
    assert message.endswith(f"the reference {llama}'s vocabulary (211) differs from {small}'s (150)")
    narrow = build_folder(
        "BertConfig",
        dict(vocab_size=211, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64),
        "BertModel",
        tmp_path / "narrow",
    )
    message = error(["eval", str(tiny_folder("bert")), "--reference", str(narrow), "--max-sentences", "8"])
    assert message.endswith(f"hidden size (32) differs from {tiny_folder('bert')}'s (48)")


def test_eval_refuses_the_texts_the_model_was_calibrated_on(tiny_folder, tmp_path, capsys):
    """What the passes read is recorded: a text given but never read is fair to measure on, the
    bundled calibration text read by default is not."""
    text = tmp_path / "calibration.txt"
    evaluation = read_text(None, "evaluation")
    text.write_text(evaluation[: len(evaluation) // 2])
    llama, gptq = str(tiny_folder("llama")), "cleanup,quantize(method=gptq,windows=1)"
    given = tmp_path / "given"
    assert main(["optimize", llama, "-o", str(given), "--calibration", str(text), "--passes", gptq]) == 0
    capsys.readouterr()
    assert main(["eval", str(given), "--text", str(text)]) == 2
    assert "was calibrated on this text" in capsys.readouterr().err
    rewrapped = tmp_path / "rewrapped.txt"  # the same words, other whitespace
    rewrapped.write_text("  " + "\n".join(text.read_text().split(" ")) + "\n\n")
    assert main(["eval", str(given), "--text", str(rewrapped)]) == 2
    assert "was calibrated on this text" in capsys.readouterr().err
    # The bundled evaluation text holds the calibration text: a superset is refused, so is a part.
    assert main(["eval", str(given), "--window", "64"]) == 2
    assert "was calibrated on text sharing passages with this one" in capsys.readouterr().err
    part = tmp_path / "part.txt"
    part.write_text(" ".join(text.read_text().split()[100:160]))
    assert main(["eval", str(given), "--text", str(part), "--window", "8"]) == 2
    assert "sharing passages" in capsys.readouterr().err
    assert main(["eval", str(given), "--text", str(bundled_text("calibration")), "--window", "64"]) == 0
    metadata = {entry.key: entry.value for entry in onnx.load(given / "model.onnx").metadata_props}
    recorded = metadata[CALIBRATION_FINGERPRINT_KEY].split()
    assert 0 < len(recorded) < len(passage_fingerprints(text.read_text())) / 2  # the window read, not the file
    bundled = tmp_path / "bundled"
    assert main(["optimize", llama, "-o", str(bundled), "--passes", gptq]) == 0
    emma = tmp_path / "emma.txt"
    emma.write_text(read_text(None, "calibration"))
    capsys.readouterr()
    assert main(["eval", str(bundled), "--text", str(emma), "--window", "64"]) == 2
    assert "was calibrated on this text" in capsys.readouterr().err
    exact = tmp_path / "exact"  # the exact recipe calibrates nothing
    assert main(["optimize", llama, "-o", str(exact), "--calibration", str(text)]) == 0
    assert f"no pass here calibrates, so --calibration {text} is not read" in capsys.readouterr().err
    assert main(["eval", str(exact), "--text", str(text), "--window", "64"]) == 0


def test_bundled_texts_are_disjoint_and_split_into_sentences():
    calibration, evaluation = read_text(None, "calibration"), read_text(None, "evaluation")
    assert text_digest(calibration) != text_digest(evaluation)
    assert not set(split_sentences(calibration)) & set(split_sentences(evaluation))
    assert bundled_text("evaluation").name == "evaluation.txt"
    sentences = split_sentences(evaluation)
    assert len(sentences) > 150
    assert all(len(s.split()) >= 4 for s in sentences)
    assert split_sentences('He said "Stop it now." Then she left the room quietly. Yes.') == [
        'He said "Stop it now."',
        "Then she left the room quietly.",
    ]

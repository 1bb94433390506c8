"""The exact recipe on tiny random BERT, GPT-2, Llama, Qwen2, Qwen3, OLMo-2, Gemma-2, Falcon,
Cohere and Mixtral models at several input shapes."""

from __future__ import annotations

import pytest

import xopt
from xopt.errors import XoptError
from xopt.inputs import sample_inputs
from xopt.pipeline import PassManager, resolve_passes
from xopt.verify import parity, reference_outputs

SHAPES = [(1, 7), (2, 16), (4, 33)]  # (batch, sequence); batches above 1 are right-padded


@pytest.mark.parametrize(
    "name", ["bert", "gpt2", "llama", "qwen2", "qwen3", "olmo2", "gemma2", "falcon", "cohere", "mixtral"]
)
def test_exact_recipe_keeps_outputs_at_every_shape(tiny_model, name):
    model = tiny_model(name)
    optimized, report = xopt.optimize(model)
    assert report.output.nodes < report.input.nodes
    for batch, sequence in SHAPES:
        inputs = sample_inputs(model, batch=batch, sequence=sequence, padded=True, seed=batch)
        result = parity(optimized, inputs, reference_outputs(model, inputs))
        assert result.max_rel <= 1e-5, f"{batch}×{sequence}: {result.describe()}"


def test_pass_manager_verifies_on_the_inputs_it_is_given(tiny_model):
    model = tiny_model("gpt2")
    inputs = sample_inputs(model, batch=3, sequence=5, padded=True)
    _, report = PassManager(resolve_passes("exact"), inputs=inputs)(model)
    assert report.passes[0].parity.top1_agreement == 1.0
    with pytest.raises(XoptError, match="missing model inputs: attention_mask"):
        PassManager(resolve_passes("exact"), inputs={"input_ids": inputs["input_ids"]})(model)

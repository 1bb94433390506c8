"""The cleanup pass: what it removes, and that outputs do not change."""

from __future__ import annotations

import numpy as np
from helpers import REDUNDANT_MODEL, model_from_text

from xopt.backends.onnxruntime import create_session, run
from xopt.inputs import sample_inputs
from xopt.passes import CleanupPass
from xopt.verify import check_structure, compare


def test_cleanup_removes_noops_constants_duplicates_and_dead_code():
    model = model_from_text(REDUNDANT_MODEL)
    inputs = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    before = run(create_session(model.clone()), inputs)
    result = CleanupPass()(model)
    ops = [n.op_type for n in result.model.graph]
    assert result.modified
    assert "Identity" not in ops and "Sub" not in ops and "Constant" not in ops
    # x+0 and x·1 vanish, the two equal products collapse into one: y = d + d with d = x·4.
    assert ops == ["Mul", "Add"]
    assert result.stats["nodes_removed"] == 10
    check_structure(result.model)
    after = run(create_session(result.model), inputs)
    assert compare(before, after).max_abs == 0.0


def test_cleanup_folds_weight_transposes_whatever_their_size(tiny_model):
    model = tiny_model("llama").clone()
    transposed_weights = [n for n in model.graph if n.op_type == "Transpose" and n.inputs[0].const_value is not None]
    assert transposed_weights, "the dynamo export stores linear weights as [out, in] behind a Transpose"
    inputs = sample_inputs(model, padded=True)
    before = run(create_session(model.clone()), inputs)
    CleanupPass(fold_input_limit=16)(model)
    left = [n for n in model.graph if n.op_type == "Transpose" and n.inputs[0].const_value is not None]
    # Only the tied LM head's Transpose(E) stays: folding it would store the embedding table twice.
    assert [n.inputs[0].name for n in left] == ["inner.lm_head.weight"]
    assert [n.op_type for n, _ in left[0].inputs[0].uses()] == ["Gather", "Transpose"]
    parity = compare(before, run(create_session(model), inputs))
    assert parity.within(1e-5), parity.describe()

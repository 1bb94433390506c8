"""Shape(Concat(past, K)) read from the inputs' shapes where a mask is sliced to it (MPT, GPT-Neo)."""

from __future__ import annotations

import numpy as np
from helpers import model_from_text

from xopt.passes.concat_shape import read_shapes_from_inputs
from xopt.verify import compare, reference_outputs

# MPT's TorchScript export: the causal mask sliced to the last `key length` columns, the key
# length read from the cache it concatenates; the slice end also read as a whole shape
_SLICED_MASK = """
<ir_version: 10, opset_import: ["" : 18]>
sliced (float[batch, 2, past, 4] past_key, float[batch, 2, sequence, 4] key, float[64, 64] causal)
    => (float[batch, 2, total, 4] present, float[sequence, total] mask, int64[4] whole) {
    present = Concat <axis = 2> (past_key, key)
    shape = Shape (present)
    two = Constant <value = int64 {2}> ()
    total = Gather (shape, two)
    zero = Constant <value = int64[1] {0}> ()
    one = Constant <value = int64[1] {1}> ()
    total_1 = Unsqueeze (total, zero)
    rows = Slice (causal, zero, total_1, zero)
    mask = Slice (rows, zero, total_1, one)
    whole = Shape (present)
}
"""


def test_the_mask_reads_the_cache_length_from_the_inputs():
    model = model_from_text(_SLICED_MASK)
    rng = np.random.default_rng(0)
    feeds = {
        "past_key": rng.standard_normal((2, 2, 3, 4)).astype(np.float32),
        "key": rng.standard_normal((2, 2, 5, 4)).astype(np.float32),
        "causal": rng.standard_normal((64, 64)).astype(np.float32),
    }
    expected = reference_outputs(model, feeds)
    graph = model.graph
    concat = next(node for node in graph if node.op_type == "Concat")
    mask = next(value for value in graph.outputs if value.name == "mask")
    assert read_shapes_from_inputs(graph, [concat], mask) == 1  # not the Shape the mask does not read
    shape_reads = [node.inputs[0].name for node in graph if node.op_type == "Shape"]
    assert sorted(shape_reads) == ["key", "past_key", "present"]
    assert compare(expected, reference_outputs(model, feeds)).max_abs == 0.0

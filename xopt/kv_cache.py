"""The input/output convention of a decoder with a KV cache, shared by capture, runners and passes.

A causal LM captured by xopt takes `input_ids [batch, sequence]`, `attention_mask [batch,
total_sequence]` (past and new tokens) and, for every layer i, `past_key_values.i.key` and
`past_key_values.i.value` of shape `[batch, kv_heads, past_sequence, head_size]`; it returns
`logits [batch, sequence, vocab]` and `present.i.key` / `present.i.value` holding past and new
keys and values (`total_sequence = past_sequence + sequence`). With grouped-query attention the
cache keeps only the KV heads. Prefill feeds an empty cache (`past_sequence = 0`); each decode
step feeds the previous step's presents back. This is the convention of Hugging Face Optimum and
onnxruntime-genai, so their models run in xopt's runners too; Optimum's also take
`position_ids [batch, sequence]` (past_sequence..total_sequence − 1 on an unpadded row).

A model whose every past input is read only by a com.microsoft `GroupQueryAttention` (as its
past, with the matching present its output and read by nothing else) can also run with one
buffer per layer of any length L ≥ total_sequence bound as both past and present: the operator
writes the new keys and values at past_sequence..total_sequence−1 in place, taking the lengths
from `attention_mask`, so nothing is copied between steps (`shares_buffers`).
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

POSITION_IDS = "position_ids"
PAST_PATTERN = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT_PATTERN = re.compile(r"^present\.(\d+)\.(key|value)$")
BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE = "batch", "sequence", "past_sequence", "total_sequence"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def past_inputs(model: ir.Model) -> list[ir.Value]:
    """The graph's past key/value inputs, in layer order (empty for a model without a cache)."""
    return [v for v in model.graph.inputs if PAST_PATTERN.match(v.name or "")]


def has_kv_cache(model: ir.Model) -> bool:
    return bool(past_inputs(model))


def present_for(past: str) -> str:
    """The output that becomes input `past` at the next step."""
    layer, kind = PAST_PATTERN.match(past).groups()
    return present_name(int(layer), kind)


def shares_buffers(model: ir.Model) -> bool:
    """Whether past and present can be one preallocated buffer per layer, updated in place."""
    pasts = past_inputs(model)
    outputs = {v.name for v in model.graph.outputs}
    for past in pasts:
        uses = list(past.uses())
        if len(uses) != 1:
            return False
        node, index = uses[0]
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or index not in (3, 4):
            return False
        present = node.outputs[index - 2]
        if present.name != present_for(past.name) or present.name not in outputs or list(present.uses()):
            return False
    return bool(pasts)


def empty_cache(model: ir.Model, batch: int) -> dict[str, np.ndarray]:
    """Past inputs of length zero: what prefill feeds."""
    return {v.name: np.zeros(cache_shape(v, batch, 0), v.dtype.numpy()) for v in past_inputs(model)}


def cache_shape(value: ir.Value, batch: int, past: int) -> tuple[int, ...]:
    """[batch, kv_heads, past, head_size] with the fixed dims read from the graph input."""
    _, heads, _, head_size = value.shape
    return batch, int(heads), past, int(head_size)


def position_limit(model: ir.Model) -> int | None:
    """How many positions the graph can rotate, where it fixes it: the rows of the tables a
    `GroupQueryAttention` rotates Q and K with (`do_rotary`); None where no node does."""
    rows = [
        node.inputs[7].shape[0]
        for node in model.graph
        if node.op_type == "GroupQueryAttention"
        and node.attributes.get_int("do_rotary", 0)
        and node.inputs[7] is not None
        and node.inputs[7].shape is not None
        and isinstance(node.inputs[7].shape[0], int)
    ]
    return min(rows, default=None)


def context_limit(model: ir.Model) -> tuple[int | None, str]:
    """The most positions the model can run, and what fixes it: the rows of the rotary tables
    inside its GroupQueryAttention, else the source config's (`config_context_length`)."""
    from xopt.capture.huggingface import source_context_length

    rows = position_limit(model)
    if rows is not None:
        return rows, "the model's rotary tables hold"
    return source_context_length(model), "the model's config allows"

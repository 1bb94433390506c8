"""Lower ONNX `Attention` with a KV cache to ONNX Runtime's `GroupQueryAttention`, for `fuse`, so
that a decoder's past and present can be one preallocated buffer updated in place.

`cached-attention` leaves per layer Y, K_all, V_all = Attention(Q, K, V, M, past_key, past_value)
on merged heads ([B, S, H·d] in, [B, KV, P, d] cache), with M the additive mask [B, 1, S, T] the
graph builds from `attention_mask` (T = P + S). com.microsoft `GroupQueryAttention` computes

    Y = softmax(s · Q·repeat(K_all)ᵀ + C + M) · repeat(V_all),   K_all = past_key ⊕ K at P..T−1

from the same Q, K, V, cache, scale s and `attention_bias` M, where C is its causal mask for
query i at position P + i (key j visible iff j ≤ P + i). M already holds that causal mask (and any
padding), so adding C changes no visible logit and the values are the same, any padding
included. Its length inputs are the same for every batch row: `seqlens_k` = T − 1 and
`total_sequence_length` = T, read off M's last axis once for all layers that share M.

What it buys: when the caller binds one [B, KV, L, d] buffer (L ≥ T) as both past and present,
`GroupQueryAttention` writes the new keys and values at P..T−1 in place instead of copying the
whole past into a new present every step (`xopt.kv_cache.shares_buffers`). For that the graph
must not read the cache's length from the past input: the exporter's Shape(past_key) readers
(batch, past length) are rewritten from the inputs, with past_sequence = total_sequence − sequence
= Shape(attention_mask)[1] − Shape(input_ids)[1], and the head count and size as constants. In the
ordinary convention (a past of exactly P) the model computes what it computed before. What it
costs: ONNX Runtime's CPU kernel runs several rows at once only for a prompt (P = 0) or one new
token a row (S = 1); a batch of rows extending a cache by several tokens stops with "batch_size
must be 1 when sequence_length > 1 and past context is given".

Preconditions, each checked with a reason: the Attention is in the merged-head layout (it has
`q_num_heads`), reads a cache with a head size ONNX Runtime's kernel takes (a multiple of 8), has
a 4-D float mask of Q's type, and uses none of the options `GroupQueryAttention` lacks
(is_causal, the QK output); a `softcap` carries over, both operators capping the scores before
they add the mask.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from xopt.kv_cache import PAST_PATTERN, past_inputs
from xopt.rewrite import new_initializer, replace_value

MICROSOFT = "com.microsoft"
_UNSUPPORTED = ("is_causal", "qk_matmul_output_mode")


def lower_group_query_attention(model: ir.Model) -> tuple[int, list[str]]:
    """Rewrite every cached `Attention`; returns the count and the near-misses."""
    matches, refusals = [], Counter()
    for node in model.graph:
        if node.op_type == "Attention" and node.domain == "":
            refusal = _refusal(node)
            if refusal:
                refusals[refusal] += 1
            else:
                matches.append(node)
    notes = [f"{count} Attention: {refusal}" for refusal, count in refusals.items()]
    if not matches:
        return 0, notes
    model.opset_imports.setdefault(MICROSOFT, 1)
    lengths: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}  # mask → (seqlens_k, total length)
    for node in matches:
        if node.inputs[3] not in lengths:
            lengths[node.inputs[3]] = _lengths(model.graph, node)
        _rewrite(model.graph, node, *lengths[node.inputs[3]])
    notes += _cache_dims_from_inputs(model)
    return len(matches), notes


def _refusal(node: ir.Node) -> str | None:
    if "q_num_heads" not in node.attributes or len(node.inputs) != 6 or len(node.outputs) != 3:
        return "not a merged-head Attention with past and present"
    if any(name in node.attributes for name in _UNSUPPORTED):
        return "uses an option GroupQueryAttention lacks"
    query, mask = node.inputs[0], node.inputs[3]
    if mask is None or mask.shape is None or len(mask.shape) != 4 or mask.dtype != query.dtype:
        return "its mask is not a 4-D additive mask of the query's type"
    if any(past is None or not PAST_PATTERN.match(past.name or "") for past in node.inputs[4:]):
        return "its past is not a past_key_values.* input"
    head_size = node.inputs[4].shape[-1] if node.inputs[4].shape is not None else None
    if isinstance(head_size, int) and head_size % 8:
        return f"head size {head_size}: ONNX Runtime's kernel takes a multiple of 8"
    return None


def _add(graph: ir.Graph, before: ir.Node, op: str, inputs: list, **attributes) -> ir.Value:
    node = ir.node(op, inputs, attributes=attributes)
    graph.insert_before(before, node)
    return node.outputs[0]


def _lengths(graph: ir.Graph, first: ir.Node) -> tuple[ir.Value, ir.Value]:
    """seqlens_k [B] = T − 1 and total_sequence_length = T (int32), T being the mask's last dim."""
    mask = first.inputs[3]  # [B, 1, S, T]
    one = new_initializer(graph, "gqa_one", np.array(1), np.int32)
    last = _add(graph, first, "Shape", [mask], start=3, end=4)
    total = _add(graph, first, "Cast", [_add(graph, first, "Squeeze", [last])], to=ir.DataType.INT32)
    batch = _add(graph, first, "Shape", [mask], start=0, end=1)
    seqlens = _add(graph, first, "Expand", [_add(graph, first, "Sub", [total, one]), batch])
    return seqlens, total


def _rewrite(graph: ir.Graph, node: ir.Node, seqlens: ir.Value, total: ir.Value) -> None:
    query, key, value, mask, past_key, past_value = node.inputs
    attributes = {
        "num_heads": node.attributes.get_int("q_num_heads"),
        "kv_num_heads": node.attributes.get_int("kv_num_heads"),
    }
    for name in ("scale", "softcap"):  # both cap the scores before the mask (Gemma-2's soft cap)
        if name in node.attributes:
            attributes[name] = node.attributes.get_float(name)
    inputs = [query, key, value, past_key, past_value, seqlens, total, None, None, None, mask]
    gqa = ir.node("GroupQueryAttention", inputs, attributes=attributes, domain=MICROSOFT, num_outputs=3)
    graph.insert_before(node, gqa)
    for new, old in zip(gqa.outputs, node.outputs, strict=True):
        new.dtype, new.shape = old.dtype, old.shape
        replace_value(old, new)
    graph.remove(node, safe=True)


def _cache_dims_from_inputs(model: ir.Model) -> list[str]:
    """Make Shape(past) readers compute the same dims from the inputs; returns why not, if not."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    readers = [(past, node) for past in past_inputs(model) for node, _ in past.uses() if node.op_type == "Shape"]
    if not readers:
        return []
    if "attention_mask" not in inputs or "input_ids" not in inputs:
        return ["the cache length is read from the past and there is no attention_mask and input_ids to read it from"]
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    for past, shape in readers:
        start, end = shape.attributes.get_int("start", 0), shape.attributes.get_int("end", None)
        dims = range(len(past.shape))[start:end]
        if any(not isinstance(past.shape[dim], int) for dim in dims if dim in (1, 3)):
            return [f"{shape.name}: reads a symbolic head dim of {past.name}"]
        pieces = []
        for dim in dims:
            if dim == 0:
                pieces.append(_add(graph, shape, "Shape", [mask], start=0, end=1))
            elif dim == 2:
                total = _add(graph, shape, "Shape", [mask], start=1, end=2)
                sequence = _add(graph, shape, "Shape", [ids], start=1, end=2)
                pieces.append(_add(graph, shape, "Sub", [total, sequence]))
            else:
                pieces.append(new_initializer(graph, "cache_dim", np.array([past.shape[dim]]), np.int64))
        value = pieces[0] if len(pieces) == 1 else _add(graph, shape, "Concat", pieces, axis=0)
        replace_value(shape.outputs[0], value)
        graph.remove(shape, safe=True)
    return []

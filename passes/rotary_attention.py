"""Move a decoder's rotary embedding into ONNX Runtime's `GroupQueryAttention`, for `fuse` with
`positions=contiguous`.

After the `rotary` and `group-query-attention` families a layer computes

    Q', K' = RotaryEmbedding(Q, cos, sin), RotaryEmbedding(K, cos, sin)
    Y = GroupQueryAttention(Q', K', V, past, …, attention_bias)

where the tables cos, sin [B, S, h] (h = d/2) are computed by the graph from a position tensor
P [B, S] (int64; clip(cumsum(attention_mask) − 1, 0) in xopt's exports) by position-wise
operators only: cos[b, s] = c(P[b, s]), sin[b, s] = s(P[b, s]). `GroupQueryAttention` with
`do_rotary = 1` rotates Q and K itself with tables C, S [L, h]:

    y[..., :h] = x₁·C[p] − x₂·S[p],   y[..., h:] = x₂·C[p] + x₁·S[p],

RotaryEmbedding's formula with cos[b, s] = C[p]. ONNX Runtime's CPU kernel takes p from its own
lengths, not from a position input: p = P₀ + s for a past of P₀ (its `seqlens_k` is the total
length − 1 for every row, see `group_query_attention.py`). So the rewrite computes the same values
wherever the graph's positions are P₀ + s: every token of an unpadded or right-padded row; only
padded positions (whose outputs nothing reads) and the real tokens of a left-padded row differ.
That is the contract `positions=contiguous` states (the one onnxruntime-genai's models have), which
is why `fuse` applies this family only when asked.

The tables C[p] = c(p), S[p] = s(p) for p < L are made by running the graph's own table subgraph,
alone, once on positions 0..L−1, with L the source model's context length
(`max_position_embeddings`). When Q, K and V are the three outputs of one Split of the merged
projection X, X goes in whole as the packed query (key and value omitted). Per layer that is one
Split and two rotary nodes less, which matters in decode, where each node's fixed cost is a
sizeable part of a step. The kernel needs a head size that is a multiple of 16.

Within the same contract the attention bias M goes too, where it is only a visibility mask: the
kernel's own causal mask C shows key j to query i iff j ≤ P₀ + i, and M adds 0 where
j ≤ P₀ + i and attention_mask[j] = 1, and at most −10⁴ elsewhere (checked by running M's subgraph
alone on unpadded and right-padded masks, with and without a past). With no left padding, every
key a real query's C shows is a real token, so softmax(s·QKᵀ + C + M) = softmax(s·QKᵀ + C) on
every real token. An M that carries anything else (ALiBi, a relative position bias) stays.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnx_ir.convenience
import onnx_ir.passes.common as common_passes

from xopt.analysis.graph_view import is_constant
from xopt.backends.onnxruntime import create_session
from xopt.capture.huggingface import source_context_length
from xopt.rewrite import new_initializer, replace_value

MICROSOFT = "com.microsoft"
# position-wise operators a table may be computed through, from the positions to cos and sin
_TABLE_OPS = frozenset({"Slice", "Cos", "Sin", "Concat", "Mul", "Div", "Cast", "Unsqueeze", "Transpose", "MatMul"})


def lower_rotary_attention(model: ir.Model) -> tuple[int, list[str]]:
    """Rotate inside every GroupQueryAttention whose Q and K are rotated just before it; returns
    the count and the near-misses."""
    matches, refusals = [], Counter()
    for node in model.graph:
        if node.op_type == "GroupQueryAttention" and node.domain == MICROSOFT:
            match = _match(node)
            if isinstance(match, str):
                refusals[match] += 1
            elif match is not None:
                matches.append(match)
    notes = [f"{count} GroupQueryAttention: {refusal}" for refusal, count in refusals.items()]
    if not matches:
        return 0, notes
    length = source_context_length(model)
    if length is None:
        return 0, [*notes, "the context length, which sizes the rotary tables, is unknown (no source config here)"]
    tables: dict[tuple[ir.Value, ir.Value], tuple[ir.Value, ir.Value] | str] = {}
    count = 0
    for node, cos, sin in matches:
        if (cos, sin) not in tables:
            tables[cos, sin] = _position_tables(model, cos, sin, length)
        found = tables[cos, sin]
        if isinstance(found, str):
            notes.append(f"{node.name}: {found}")
            continue
        _rewrite(model.graph, node, *found)
        count += 1
    notes += _drop_visibility_masks(model)
    common_passes.RemoveUnusedNodesPass()(model)
    return count, notes


# (batch, new tokens S, past P₀, right-padded rows) on which a bias is checked to be a visibility mask
_MASK_CASES = ((1, 3, 0, False), (2, 4, 0, True), (2, 1, 5, False), (3, 2, 4, True))
MASKED = -1e4  # a masked logit at or below this weighs < e⁻⁹⁰⁰⁰ against a visible one


def _drop_visibility_masks(model: ir.Model) -> list[str]:
    """Remove the attention bias of each rotating GroupQueryAttention whose bias is a visibility
    mask (see the module docstring); returns why a bias stays."""
    readers: dict[ir.Value, list[ir.Node]] = {}
    for node in model.graph:
        if node.op_type == "GroupQueryAttention" and node.attributes.get_int("do_rotary", 0):
            bias = node.inputs[10] if len(node.inputs) > 10 else None
            if bias is not None:
                readers.setdefault(bias, []).append(node)
    notes = []
    for bias, nodes in readers.items():
        refusal = _visibility_refusal(model, bias)
        if refusal:
            notes.append(f"{len(nodes)} GroupQueryAttention keep their attention bias: {refusal}")
            continue
        for node in nodes:
            node.replace_input_with(10, None)
        _shapes_from_attention_mask(model.graph, bias)
    return notes


def _shapes_from_attention_mask(graph: ir.Graph, bias: ir.Value) -> None:
    """Make the Shape readers of the bias [B, 1, S, T] (the kernel's lengths: B and T) read
    attention_mask [B, T] instead, so nothing computes the bias any more."""
    mask = next(value for value in graph.inputs if value.name == "attention_mask")
    for node, _ in list(bias.uses()):
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
        if node.op_type == "Shape" and (start, end) in ((0, 1), (3, 4), (-1, None)):
            dim = 0 if start == 0 else 1  # the batch, or the total length T
            node.replace_input_with(0, mask)
            node.attributes["start"], node.attributes["end"] = ir.AttrInt64("start", dim), ir.AttrInt64("end", dim + 1)


def _visibility_refusal(model: ir.Model, bias: ir.Value) -> str | None:
    """Why `bias` [B, 1, S, P₀ + S] is not causal ∧ attention_mask as 0 / ≤ −10⁴ on real queries."""
    inputs = {value.name: value for value in model.graph.inputs}
    if "attention_mask" not in inputs or "input_ids" not in inputs:
        return "there is no attention_mask and input_ids to compute it from"
    sources = [inputs["input_ids"], inputs["attention_mask"]]
    try:
        graph = ir.convenience.extract(model.graph, inputs=sources, outputs=[bias])
    except ValueError:
        return "it is computed from more than input_ids and attention_mask"
    session = create_session(ir.Model(graph, ir_version=model.ir_version), threads=1)
    ids_type, mask_type = (inputs[name].dtype.numpy() for name in ("input_ids", "attention_mask"))
    for batch, sequence, past, padded in _MASK_CASES:
        mask = np.ones((batch, past + sequence), np.int64)
        if padded:
            mask[1:, -1] = 0
        feeds = {"input_ids": np.zeros((batch, sequence), ids_type), "attention_mask": mask.astype(mask_type)}
        (values,) = session.run(None, feeds)
        causal = np.arange(past + sequence)[None, :] <= past + np.arange(sequence)[:, None]  # [S, T]
        visible = causal[None] & mask[:, None, :].astype(bool)  # [B, S, T]
        real = mask[:, past:].astype(bool)  # the queries whose outputs are read
        try:
            values = np.broadcast_to(values, (batch, 1, sequence, past + sequence))[:, 0]
        except ValueError:
            return f"its shape {values.shape} is not [batch, 1, new tokens, total tokens]"
        shown, hidden = (visible & real[..., None]), (~visible & real[..., None])
        if np.any(values[shown] != 0) or np.any(values[hidden] > MASKED):
            return "it is not only the causal and padding mask"
    return None


def _match(node: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | str | None:
    """(node, cos, sin) when Q and K are rotated right before it; None when neither is rotated."""
    rotations = [value.producer() if value is not None else None for value in node.inputs[:2]]
    if not any(r is not None and r.op_type == "RotaryEmbedding" for r in rotations):
        return None
    if node.attributes.get_int("do_rotary", 0) or any(v is not None for v in node.inputs[7:10]):
        return "rotates already"
    for rotation in rotations:
        if rotation is None or rotation.op_type != "RotaryEmbedding" or rotation.domain != "":
            return "only one of Q and K is rotated before it"
        if len(rotation.inputs) > 3 and rotation.inputs[3] is not None:
            return "the rotary embedding takes position ids"
        if rotation.attributes.get_int("interleaved", 0) or rotation.attributes.get_int("rotary_embedding_dim", 0):
            return "the rotary embedding is interleaved or partial"
        if len(list(rotation.outputs[0].uses())) != 1:
            return "the rotated Q or K has other readers"
    if rotations[0].inputs[1:3] != rotations[1].inputs[1:3]:
        return "Q and K are rotated by different tables"
    query, heads = node.inputs[0], node.attributes.get_int("num_heads", 0)
    if query.shape is None or not isinstance(query.shape[-1], int) or not heads:
        return "the head size is unknown"
    if (query.shape[-1] // heads) % 16:
        return f"head size {query.shape[-1] // heads}: the rotating kernel needs a multiple of 16"
    return node, rotations[0].inputs[1], rotations[0].inputs[2]


def _position_tables(model: ir.Model, cos: ir.Value, sin: ir.Value, length: int) -> tuple[ir.Value, ir.Value] | str:
    """(cos cache [L, h], sin cache [L, h]) as initializers, or why not."""
    walks = [_walk_to_positions(table) for table in (cos, sin)]
    for walk in walks:
        if isinstance(walk, str):
            return walk
    if walks[0] is not walks[1]:
        return "cos and sin are computed from different positions"
    cos_cache, sin_cache = _evaluate(model, walks[0], [cos, sin], length)
    if cos_cache.shape != sin_cache.shape or cos_cache.shape[:2] != (1, length):
        return f"the tables are not [1, positions, h] on one row of positions (got {cos_cache.shape})"
    graph = model.graph
    return (
        new_initializer(graph, "rotary_cos_cache", cos_cache[0], cos_cache.dtype),
        new_initializer(graph, "rotary_sin_cache", sin_cache[0], sin_cache.dtype),
    )


def _walk_to_positions(table: ir.Value) -> ir.Value | str:
    """The position tensor (int64, [batch, sequence]) `table` is computed from by nodes with one
    non-constant input each."""
    value = table
    while not (value.dtype == ir.DataType.INT64 and value.shape is not None and len(value.shape) == 2):
        node = value.producer()
        if node is None or node.op_type not in _TABLE_OPS or node.domain != "":
            return f"the rotary table is not computed from positions by position-wise operators ({value.name})"
        sources = {v for v in node.inputs if v is not None and not is_constant(v)}
        if len(sources) != 1:
            return f"{node.name} computes the rotary table from more than the positions"
        value = sources.pop()
    return value


def _evaluate(model: ir.Model, positions: ir.Value, tables: list[ir.Value], length: int) -> list[np.ndarray]:
    """The tables, computed by the subgraph between `positions` and them alone, on positions
    [[0, 1, …, length − 1]]."""
    graph = ir.convenience.extract(model.graph, inputs=[positions], outputs=tables)
    session = create_session(ir.Model(graph, ir_version=model.ir_version), threads=1)
    return session.run(None, {graph.inputs[0].name: np.arange(length, dtype=np.int64)[None]})


def _rewrite(graph: ir.Graph, node: ir.Node, cos_cache: ir.Value, sin_cache: ir.Value) -> None:
    query, key = (rotated.producer().inputs[0] for rotated in node.inputs[:2])
    value = node.inputs[2]
    split = query.producer()
    packed = (
        split is not None
        and split.op_type == "Split"
        and list(split.outputs) == [query, key, value]
        and split.attributes.get_int("axis", 0) in (-1, 2)
        and len(list(value.uses())) == 1
    )
    qkv = [split.inputs[0], None, None] if packed else [query, key, value]
    rest = list(node.inputs[3:7])
    bias_and_sink = list(node.inputs[10:])
    attributes = [a for name, a in node.attributes.items() if name != "do_rotary"]
    rotating = ir.Node(
        MICROSOFT,
        "GroupQueryAttention",
        [*qkv, *rest, cos_cache, sin_cache, None, *bias_and_sink],
        attributes=[*attributes, ir.AttrInt64("do_rotary", 1)],
        num_outputs=len(node.outputs),
        name=node.name,
    )
    graph.insert_before(node, rotating)
    for new, old in zip(rotating.outputs, node.outputs, strict=True):
        new.dtype, new.shape = old.dtype, old.shape
        replace_value(old, new)
    graph.remove(node, safe=True)

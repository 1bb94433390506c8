"""Lower a KV-cache decoder's attention to ONNX's `Attention` operator (opset 23), for `fuse`.

What the exported graph computes per layer, with K, V of the new tokens after RoPE:

    K_all = Concat(past_key, K)        (→ present_key)       V_all = Concat(past_value, V)
    Y     = softmax(s · Q·repeat(K_all)ᵀ + M) · repeat(V_all)

where `repeat` copies each KV head to its group of query heads (grouped-query attention), s is
the product of the constant scalars on the way from Q·Kᵀ to the softmax (1 when `fold-norms` has
moved 1/√d into W_q) and M the additive mask the graph built from `attention_mask`. Gemma-2
soft-caps the scores before the mask, c·tanh(f·Q·Kᵀ) + M: that is `Attention`'s `softcap`
|c| with s = f·c, since c·tanh(f·z) = |c|·tanh(f·c·z/|c|), and `Attention` caps before it adds
the mask too (ONNX's reference and ONNX Runtime alike). CodeGen scales after it adds the mask,
softmax((Q·Kᵀ + M)·t) = softmax(t·Q·Kᵀ + t·M): s takes t and the mask fed is t·M. M may come
in several terms, each added or a masked fill: MPT computes Where(c, m, s·Q·Kᵀ + A) with A its
ALiBi bias [H, 1, T] and m float32's lowest value, which is s·Q·Kᵀ + (Where(c, m, 0) + A) since
m + x rounds to m for any |x| < 10³¹; the mask fed is then [B, H, S, T], one per head. A fill
such as −10⁴ is not: where every key of a query is masked the fill gives uniform weights and the
sum softmax(x). Bloom folds the heads into the batch axis for its batched MatMuls: Q [B·H, S, d],
Kᵀ [B·H, d, T] and V [B·H, T, d] are Reshapes of the [B, H, ·, d] values, the scores
Reshape(β·Q·Kᵀ + A, [B, H, S, T]) + M with its ALiBi bias A [B·H, 1, T], and P·V [B·H, S, d] is
reshaped back to [B, H, S, d]. A Reshape that only moves the heads between the batch axis and
their own is the identity on the values of each (b, h), so the rewrite reads the [B, H, ·, d]
values on both sides and A unfolded to [B, H, 1, T] (once for all the blocks that add it). ONNX
`Attention` (opset 23) computes exactly this from Q [B,H,S,d], K/V [B,KV,S,d], the mask, past key
and value, returning Y and both presents, so the rewrite is exact for any mask, padding included.
The head repeats, the transpose of K, the two MatMuls, the scale and the softmax go away.
TorchScript's export of torch's scaled_dot_product_attention (Hugging Face Optimum's) scales Q and
Kᵀ by √s each, so s is the product of both sides' constant scalars, and zeroes the softmax's NaN
rows, Where(IsNaN(P), 0, P): a row is NaN where every key of its query is masked, and there
ONNX Runtime's `Attention` returns zeros too (checked with a −∞ row), so the guard goes as well.

Head layout: the exporter splits heads as Transpose₀₂₁₃(Reshape(X, [B, S, H, d])) before RoPE and
the attention, and merges them back as Reshape(Transpose₀₂₁₃(Y), [B, S, H·d]) after. `Attention`
and `RotaryEmbedding` also take the merged [B, S, H·d] layout (with `q_num_heads`/`kv_num_heads`
and `num_heads`), and compute the same values there, so when all three inputs and the output
have that form the lowering feeds X directly and returns the merged Y: per layer four Reshapes
and four Transposes (each a copy in ONNX Runtime) go too. Bloom, GPT-NeoX and Falcon instead pick
each head of Q, K and V out of one projection whose columns interleave the heads; that projection
with its columns reordered gives the three merged as its slices (`head_columns.py`). The past and
present stay [B, KV, P, d].

Preconditions, each checked with a reason: the block's Q·Kᵀ reads K through a transpose of the
last two axes and head repeats (Unsqueeze/Expand/Reshape) of a Concat on axis 2 of a graph input
`past_key_values.i.key` and the new keys (the same for V); the softmax is on the last axis and its
output is what multiplies V. The model's default opset is raised to 23 by onnxscript's version
converter when it is lower.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import const_array, past_nan_guard, scalar_factor, sole_reader
from xopt.analysis.structure import Attention
from xopt.kv_cache import PAST_PATTERN, has_kv_cache
from xopt.passes.concat_shape import read_shapes_from_inputs
from xopt.passes.head_columns import head_columns, reordered_projection
from xopt.rewrite import new_initializer, replace_value, require_opset

ATTENTION_OPSET = 23
_REPEAT_OPS = frozenset({"Unsqueeze", "Expand", "Reshape", "Identity"})


class MaskTerm(NamedTuple):
    """One additive term of the attention mask."""

    value: ir.Value  # the value added to the scores, or the output of a masked fill
    filled: int | None = None  # the masked fill's input that the mask reads as 0
    folded: bool = False  # added with the heads in the batch axis, [B·H, S, T]


def lower_cached_attention(model: ir.Model) -> tuple[int, list[str]]:
    """Rewrite every matching attention block; returns the count and the near-misses."""
    if not has_kv_cache(model):
        return 0, []
    structure = find_transformer_structure(model)
    matches, notes = [], []
    for block in structure.blocks:
        if block.attention is None:
            continue
        match = _match(block.attention)
        if isinstance(match, str):
            notes.append(f"block {block.index}: {match}")
        else:
            matches.append(match)
    if not matches:
        return 0, notes
    require_opset(model, ATTENTION_OPSET)
    shared: dict[ir.DataType | ir.Value, ir.Value] = {}  # mask parts every block may read (`_mask`)
    for match in matches:
        _rewrite(model.graph, match, shared)
    common_passes.RemoveUnusedNodesPass()(model)  # the repeats, MatMuls and softmax are dead now
    return len(matches), notes


def _match(attention: Attention) -> dict | str:
    """The operands of one block's cached attention, or why it does not match."""
    query, key_t = attention.scores.inputs
    scale = 1.0
    query, factor = _strip_scales(query)
    scale *= factor
    key_t, factor = _strip_scales(key_t)  # TorchScript's SDPA scales Q and Kᵀ by √s each
    scale *= factor
    query, folded = _unfolded(query, attention.num_heads)
    transpose = key_t.producer()
    is_transpose = transpose is not None and transpose.op_type == "Transpose"
    last_two = (0, 2, 1) if folded else (0, 1, 3, 2)
    if not is_transpose or tuple(transpose.attributes.get_ints("perm", ())) != last_two:
        return "K is not read through a transpose of its last two axes"
    key, factor = _strip_scales(transpose.inputs[0])
    scale *= factor
    probabilities, value = attention.context.inputs
    if folded:
        unfolded = [_unfolded(v, attention.num_heads) for v in (key, probabilities, value)]
        if not all(was_folded for _, was_folded in unfolded):
            return "Q has its heads in the batch axis, K, V or the softmax output does not"
        key, probabilities, value = (v for v, _ in unfolded)
    key_concat = _cache_concat(key, "key")
    if isinstance(key_concat, str):
        return key_concat
    value_concat = _cache_concat(value, "value")
    if isinstance(value_concat, str):
        return value_concat
    if probabilities is not past_nan_guard(attention.softmax.outputs[0]):
        return "the softmax output is not what multiplies V"
    if attention.softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return "softmax is not on the last axis"
    output = attention.context.outputs[0]
    if folded and (output := _unfolding(output, attention.num_heads)) is None:
        return "P·V with the heads in the batch axis is not unfolded into [B, H, S, d]"
    logits = _logits(attention)
    if isinstance(logits, str):
        return logits
    mask_terms, mask_scale, factor, softcap = logits
    scale *= factor
    match = {
        "query": query,
        "key": key_concat.inputs[1],
        "value": value_concat.inputs[1],
        "mask_terms": mask_terms,
        "mask_scale": mask_scale,
        "past_key": key_concat.inputs[0],
        "past_value": value_concat.inputs[0],
        "present_key": key_concat.outputs[0],
        "present_value": value_concat.outputs[0],
        "output": output,
        "scale": scale,
        "softcap": softcap,
        "scores": attention.softmax.outputs[0].shape,
        "heads": attention.num_heads,
        "after": output.producer(),
    }
    match["merged"] = _merged_heads(match, attention)
    return match


def _logits(attention: Attention) -> tuple[list[MaskTerm], float, float, float | None] | str:
    """What lies between Q·Kᵀ and the softmax: the mask's terms, the factor t that scales the mask
    (CodeGen's (Q·Kᵀ + M)·t), the scores' scale s and soft cap; or why something else does."""
    logits, mask_scale, scale = attention.softmax.inputs[0], 1.0, 1.0
    masked, outer = _strip_scales(logits)  # (Q·Kᵀ + M)·t when the mask is added before a scale
    peeled = _mask_terms(masked, attention)
    if isinstance(peeled, str):
        return peeled
    mask_terms, unmasked = peeled
    if mask_terms:
        logits, mask_scale, scale = unmasked, outer, outer
    logits, factor, softcap = _strip_soft_cap(logits)
    if logits is not attention.scores.outputs[0]:
        return "something other than constant scales, a soft cap and a mask lies between Q·Kᵀ and the softmax"
    return mask_terms, mask_scale, scale * factor, softcap


def _strip_scales(value: ir.Value) -> tuple[ir.Value, float]:
    """Follow Mul/Div by a constant scalar back; returns the source and the product of factors."""
    factor = 1.0
    while (scaled := scalar_factor(value.producer())) is not None:
        value, factor = scaled[0], factor * scaled[1]
    return value, factor


def _strip_soft_cap(value: ir.Value) -> tuple[ir.Value, float, float | None]:
    """`value` = c·tanh(f·x) (Gemma-2's soft cap) or c·x, followed back through constant scalars;
    returns x, the scale and the cap: c·tanh(f·x) = |c|·tanh(s·x/|c|) with s = f·c."""
    value, outer = _strip_scales(value)
    tanh = value.producer()
    if tanh is None or tanh.op_type != "Tanh" or outer == 0.0:
        return value, outer, None
    source, inner = _strip_scales(tanh.inputs[0])
    return source, inner * outer, abs(outer)


def _cache_concat(value: ir.Value, kind: str) -> ir.Node | str:
    """The Concat(past, new) on axis 2 that `value` repeats, with past a cache input of `kind`."""
    while (node := value.producer()) is not None and node.op_type in _REPEAT_OPS:
        value = node.inputs[0]
    node = value.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return f"{kind}: no Concat with the cache before the attention"
    if node.attributes.get_int("axis", 0) not in (2, -2):
        return f"{kind}: the cache Concat is not on the sequence axis"
    past = node.inputs[0]
    match = PAST_PATTERN.match(past.name or "") if past.is_graph_input() else None
    if match is None or match.group(2) != kind:
        return f"{kind}: the Concat does not start from a past_key_values.*.{kind} input"
    return node


def _mask_terms(value: ir.Value, attention: Attention) -> tuple[list[MaskTerm], ir.Value] | str:
    """The additive terms of the mask on the way from Q·Kᵀ to `value`, and what they are added to:
    Add(x, M) gives M (a causal or padding mask, an ALiBi bias), a masked fill Where(c, m, x) gives
    its output and the index of x, which the mask reads as 0 (`_mask`). Past a Reshape that takes
    the heads out of the batch axis (Bloom's [B·H, S, T] → [B, H, S, T]) the terms are folded."""
    terms: list[MaskTerm] = []
    folded = False
    while (node := value.producer()) is not None:
        if node.op_type == "Add":
            sides = [v for v in node.inputs if _from_scores(v, attention)]
            if len(sides) != 1:
                return "the mask Add does not have exactly one side from Q·Kᵀ"
            terms.append(MaskTerm(node.inputs[1] if sides[0] is node.inputs[0] else node.inputs[0], folded=folded))
        elif node.op_type == "Where" and len(node.inputs) == 3 and not folded:
            sides = [i for i in (1, 2) if _from_scores(node.inputs[i], attention)]
            if len(sides) != 1:
                return "the masked fill does not have exactly one branch from Q·Kᵀ"
            fill = node.inputs[3 - sides[0]]
            if not _is_lowest(const_array(fill), fill.dtype):
                return "the masked fill's value is not a constant −∞ or float32's lowest (adding it is not the same)"
            terms.append(MaskTerm(node.outputs[0], filled=sides[0]))
            sides = [node.inputs[sides[0]]]
        elif node.op_type == "Reshape" and not folded and _unfolding(node.inputs[0], attention.num_heads) is value:
            folded, sides = True, [node.inputs[0]]
        else:
            break
        value = sides[0]
    return terms, value


def _is_lowest(fill: np.ndarray | None, dtype: ir.DataType | None) -> bool:
    """Whether a masked fill m gives Where(c, m, x) = x + Where(c, m, 0): m = −∞, or float32's
    lowest value, onto which m + x rounds for any |x| < 10³¹ (half a unit in its last place)."""
    if fill is None or fill.size != 1:
        return False
    m = float(fill.reshape(()))
    return m == -np.inf or (dtype == ir.DataType.FLOAT and m == float(np.finfo(np.float32).min))


def _from_scores(value: ir.Value, attention: Attention) -> bool:
    """Whether `value` is computed from the attention's Q·Kᵀ through constant scalings, a soft cap,
    additions and masked fills of anything else, and the heads' unfolding out of the batch axis."""
    source, _, _ = _strip_soft_cap(value)
    node = source.producer()
    if node is attention.scores:
        return True
    if node is not None and node.op_type == "Reshape" and _unfolding(node.inputs[0], attention.num_heads) is source:
        return _from_scores(node.inputs[0], attention)
    return (
        node is not None
        and node.op_type in ("Add", "Where")
        and any(_from_scores(v, attention) for v in node.inputs if v is not None)
    )


def _unfolded(value: ir.Value, heads: int) -> tuple[ir.Value, bool]:
    """X and True when `value` [B·heads, n, d] is Reshape(X) with X [B, heads, n, d] (Bloom folds
    the heads into the batch axis for its batched MatMuls), else `value` and False."""
    node = value.producer()
    if node is not None and node.op_type == "Reshape" and _heads_folded(value, node.inputs[0], heads):
        return node.inputs[0], True
    return value, False


def _unfolding(folded: ir.Value, heads: int) -> ir.Value | None:
    """The [B, heads, n, d] value that the sole reader of `folded` [B·heads, n, d], a Reshape, gives."""
    reshape = sole_reader(folded, "Reshape")
    return reshape.outputs[0] if reshape is not None and _heads_folded(folded, reshape.outputs[0], heads) else None


def _heads_folded(folded: ir.Value, unfolded: ir.Value, heads: int) -> bool:
    """Whether a Reshape between `folded` [B·heads, n, d] and `unfolded` [B, heads, n, d] only moves
    the heads between the batch axis and their own (the last axis the same, one size fewer)."""
    short, full = folded.shape, unfolded.shape
    if short is None or full is None or len(short) != 3 or len(full) != 4:
        return False
    return full[1] == heads and full[3] == short[2]


def _merged_heads(match: dict, attention: Attention) -> dict | None:
    """Q, K, V as [B, S, H·d] (each with the RotaryEmbedding on its way, if any) and the merged
    output that Y is reshaped into, when the block merges its heads by the book after the attention.
    Before it, in order of preference: each split by the book (X itself); all three from one
    projection whose columns interleave the heads (then `columns` holds that projection and each
    one's columns, and Q, K, V come from it); each a head transpose of some [B, S, H, d] value V
    (Qwen-3's per-head norms, GPT-J's rotation in its 3-D form), merged by a Reshape of V."""
    output = _merged_output(match["output"])
    if output is None:
        return None
    heads = {name: _head_count(match[name]) for name in ("query", "key", "value")}  # as the cache holds them
    if None in heads.values():
        return None
    sources = {name: _rotated(match[name]) for name in heads}
    if any(source is None for source in sources.values()):
        return None
    split = {name: _split_heads(sources[name][0], count) for name, count in heads.items()}
    merged: dict = {"output": output}
    if not all(x is not None and len(x.shape) == 3 for x in split.values()) and attention.fused_qkv:
        columns = head_columns(attention.q, [(sources[name][0], count) for name, count in heads.items()])
        if not isinstance(columns, str):
            merged["columns"] = (attention.q, columns)
            split = dict.fromkeys(heads)  # the slices of the reordered projection, made by `_rewrite`
    if "columns" not in merged and None in split.values():
        return None
    merged.update({name: (split[name], sources[name][1], count) for name, count in heads.items()})
    return merged


def _head_count(value: ir.Value) -> int | None:
    """n of a [B, n, S, d] value, when known."""
    shape = value.shape
    return shape[1] if shape is not None and len(shape) == 4 and isinstance(shape[1], int) else None


def _rotated(value: ir.Value) -> tuple[ir.Value, ir.Node | None] | None:
    """(x, rotary) when `value` = RotaryEmbedding(x) read by nothing else, else (`value`, None);
    None when the rotation takes position ids (they would index the caches by position)."""
    node = value.producer()
    if node is None or node.op_type != "RotaryEmbedding" or node.domain != "" or not sole_reader(node.outputs[0]):
        return value, None
    return (node.inputs[0], node) if len(node.inputs) == 3 else None


def _split_heads(value: ir.Value, heads: int) -> ir.Value | None:
    """X when `value` = Transpose₀₂₁₃(Reshape(X, [B, S, heads, d])), each read by nothing else; else
    V when `value` = Transpose₀₂₁₃(V) with V [B, S, heads, d] (`_rewrite` merges it by a Reshape)."""
    node = value.producer()
    if not _is_head_transpose(node) or sole_reader(node.outputs[0]) is None:
        return None
    split = node.inputs[0]
    if split.shape is None or len(split.shape) != 4 or split.shape[2] != heads or not isinstance(split.shape[3], int):
        return None
    reshape = split.producer()
    if reshape is None or reshape.op_type != "Reshape" or sole_reader(split) is None:
        return split
    x = reshape.inputs[0]
    if x.shape is None or len(x.shape) != 3 or list(x.shape)[:2] != list(split.shape)[:2]:
        return split
    return x if x.shape[2] == heads * split.shape[3] else split


def _merged_output(value: ir.Value) -> ir.Value | None:
    """The [B, S, H·d] value that Reshape(Transpose₀₂₁₃(`value`)) produces, if that is all `value` feeds."""
    transpose = sole_reader(value)
    if not _is_head_transpose(transpose):
        return None
    reshape = sole_reader(transpose.outputs[0], "Reshape")
    if reshape is None:
        return None
    split, merged = value.shape, reshape.outputs[0].shape
    if split is None or merged is None or len(split) != 4 or len(merged) != 3:
        return None
    if [split[0], split[2]] != list(merged)[:2] or not all(isinstance(d, int) for d in (split[1], split[3])):
        return None
    return reshape.outputs[0] if merged[2] == split[1] * split[3] else None


def _is_head_transpose(node: ir.Node | None) -> bool:
    if node is None or node.op_type != "Transpose":
        return False
    return tuple(node.attributes.get_ints("perm", ())) == (0, 2, 1, 3)


def _rewrite(graph: ir.Graph, match: dict, shared: dict[ir.DataType | ir.Value, ir.Value]) -> None:
    attributes: dict = {"scale": match["scale"]}
    if match["softcap"] is not None:
        attributes["softcap"] = match["softcap"]
    operands = {name: match[name] for name in ("query", "key", "value")}
    outputs = {name: match[name] for name in ("output", "present_key", "present_value")}
    merged = match["merged"]
    if merged is not None:
        heads = {"query": "q_num_heads", "key": "kv_num_heads", "value": "kv_num_heads"}
        if "columns" in merged:
            parts = iter(reordered_projection(graph, *merged["columns"]))
            merged.update({name: (next(parts), *merged[name][1:]) for name in heads})
        for name, attribute in heads.items():
            x, rotary, heads_count = merged[name]
            if len(x.shape) == 4:
                x = _heads_merged(graph, x)
            attributes[attribute] = heads_count
            operands[name] = x if rotary is None else _merged_rotary(graph, rotary, x, heads_count)
        outputs["output"] = merged["output"]
    nodes, mask = _mask(graph, match, shared)
    if match["mask_scale"] != 1.0:
        nodes.append(
            ir.node(
                "Mul", [mask, new_initializer(graph, "mask_scale", np.array(match["mask_scale"]), mask.dtype.numpy())]
            )
        )
        mask = nodes[-1].outputs[0]
    if mask is not None:  # a mask sliced to the cache's length must not read the present
        read_shapes_from_inputs(graph, [match[name].producer() for name in ("present_key", "present_value")], mask)
    inputs = [*operands.values(), mask, match["past_key"], match["past_value"]]
    node = ir.node("Attention", inputs, attributes=attributes, num_outputs=3)
    graph.insert_after(match["after"], [*nodes, node])
    for new, old in zip(node.outputs, outputs.values(), strict=True):
        new.dtype, new.shape = old.dtype, old.shape
        replace_value(old, new)


def _mask(graph: ir.Graph, match: dict, shared: dict) -> tuple[list[ir.Node], ir.Value | None]:
    """The nodes adding up the mask's terms, a masked fill Where(c, m, x) as Where(c, m, 0) and a
    folded term unfolded to [B, H, …], and the mask (None without terms; no nodes for one added
    value). `shared` holds what every block may read: the fills' zeros, the unfolded terms."""
    nodes: list[ir.Node] = []
    values: list[ir.Value] = []
    for term in match["mask_terms"]:
        if term.filled is not None:
            nodes.append(_fill_with_zero(graph, term, shared))
            values.append(nodes[-1].outputs[0])
            operands = [v.shape for i, v in enumerate(nodes[-1].inputs) if i != term.filled]
            values[-1].dtype, values[-1].shape = term.value.dtype, _broadcast(operands, match["scores"])
        elif term.folded:
            values.append(_unfolded_term(graph, term.value, match["heads"], shared))
        else:
            values.append(term.value)
    while len(values) > 1:
        nodes.append(ir.node("Add", values[:2]))
        total = nodes[-1].outputs[0]
        total.dtype, total.shape = values[0].dtype, _broadcast([v.shape for v in values[:2]], match["scores"])
        values[:2] = [total]
    return nodes, (values or [None])[0]


def _fill_with_zero(graph: ir.Graph, term: MaskTerm, shared: dict) -> ir.Node:
    """Where(c, m, 0) for the masked fill Where(c, m, x), with one 0 per dtype for all blocks."""
    where, dtype = term.value.producer(), term.value.dtype
    if dtype not in shared:
        shared[dtype] = new_initializer(graph, "masked_fill_zero", np.array(0), dtype.numpy())
    inputs = list(where.inputs)
    inputs[term.filled] = shared[dtype]
    return ir.node("Where", inputs)


def _unfolded_term(graph: ir.Graph, term: ir.Value, heads: int, shared: dict) -> ir.Value:
    """A mask term added with the heads in the batch axis, [B·H, n, T], as [B, H, n, T]: computed
    once after the term's producer, for every block that adds it (Bloom's ALiBi bias)."""
    if term not in shared:
        shape = ir.node("Shape", [term], attributes={"start": 1})
        heads_first = new_initializer(graph, "unfolded_heads", np.array([-1, heads]), np.int64)
        dims = ir.node("Concat", [heads_first, shape.outputs[0]], attributes={"axis": 0})
        reshape = ir.node("Reshape", [term, dims.outputs[0]])
        unfolded = reshape.outputs[0]
        unfolded.dtype = term.dtype
        if term.shape is not None and len(term.shape) == 3:
            batch = term.shape[0] // heads if isinstance(term.shape[0], int) else None
            unfolded.shape = ir.Shape([batch, heads, *list(term.shape)[1:]])
        _insert_after_producer(graph, term, [shape, dims, reshape])
        shared[term] = unfolded
    return shared[term]


def _broadcast(shapes: list[ir.Shape | None], scores: ir.Shape | None) -> ir.Shape | None:
    """The shape of terms added to the scores [B, H, S, T]: on each axis the dim the terms other
    than 1 agree on, else (two symbols that may be one size) the scores' dim there."""
    if scores is None or any(shape is None for shape in shapes):
        return None
    rank = max(len(shape) for shape in shapes)
    dims = []
    for axis in range(-rank, 0):
        sizes = {shape[axis] for shape in shapes if len(shape) >= -axis} - {1}
        dims.append(sizes.pop() if len(sizes) == 1 else 1 if not sizes else scores[axis])
    return ir.Shape(dims)


def _heads_merged(graph: ir.Graph, split: ir.Value) -> ir.Value:
    """V [B, S, H, d] as [B, S, H·d], by a Reshape after V's producer."""
    batch, sequence, heads, size = split.shape
    dims = new_initializer(graph, "merged_heads", np.array([0, 0, heads * size]), np.int64)
    node = ir.node("Reshape", [split, dims])
    node.outputs[0].dtype, node.outputs[0].shape = split.dtype, ir.Shape([batch, sequence, heads * size])
    _insert_after_producer(graph, split, [node])
    return node.outputs[0]


def _insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert `nodes` right after the node computing `value` (first in the graph for an input)."""
    if value.producer() is None:
        graph.insert_before(graph.node(0), nodes)
    else:
        graph.insert_after(value.producer(), nodes)


def _merged_rotary(graph: ir.Graph, rotary: ir.Node, x: ir.Value, heads: int) -> ir.Value:
    """The same RotaryEmbedding applied to X in the [B, S, H·d] layout."""
    attributes = {**{name: attr.value for name, attr in rotary.attributes.items()}, "num_heads": heads}
    node = ir.node("RotaryEmbedding", [x, *rotary.inputs[1:]], attributes=attributes)
    graph.insert_after(rotary, node)
    node.outputs[0].dtype, node.outputs[0].shape = x.dtype, x.shape
    return node.outputs[0]

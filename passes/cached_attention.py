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
sum softmax(x). ONNX
`Attention` (opset 23) computes exactly this from Q [B,H,S,d], K/V [B,KV,S,d], the mask, past key
and value, returning Y and both presents, so the rewrite is exact for any mask, padding included.
The head repeats, the transpose of K, the two MatMuls, the scale and the softmax go away.

Head layout: the exporter splits heads as Transpose₀₂₁₃(Reshape(X, [B, S, H, d])) before RoPE and
the attention, and merges them back as Reshape(Transpose₀₂₁₃(Y), [B, S, H·d]) after. `Attention`
and `RotaryEmbedding` also take the merged [B, S, H·d] layout (with `q_num_heads`/`kv_num_heads`
and `num_heads`), and compute the same values there, so when all three inputs and the output
have that form the lowering feeds X directly and returns the merged Y: per layer four Reshapes
and four Transposes (each a copy in ONNX Runtime) go too. The past and present stay
[B, KV, P, d].

Preconditions, each checked with a reason: the block's Q·Kᵀ reads K through a transpose of the
last two axes and head repeats (Unsqueeze/Expand/Reshape) of a Concat on axis 2 of a graph input
`past_key_values.i.key` and the new keys (the same for V); the softmax is on the last axis and its
output is what multiplies V. The model's default opset is raised to 23 by onnxscript's version
converter when it is lower.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import const_array, scalar_factor, sole_reader
from xopt.analysis.structure import Attention
from xopt.kv_cache import PAST_PATTERN, has_kv_cache
from xopt.rewrite import new_initializer, replace_value, require_opset

ATTENTION_OPSET = 23
MaskTerm = ir.Value | tuple[ir.Node, int]  # an added mask, or a masked fill and the index of what it fills
_REPEAT_OPS = frozenset({"Unsqueeze", "Expand", "Reshape", "Identity"})


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
    zeros: dict[ir.DataType, ir.Value] = {}  # the masked fills' 0, one per dtype for every block
    for match in matches:
        _rewrite(model.graph, match, zeros)
    common_passes.RemoveUnusedNodesPass()(model)  # the repeats, MatMuls and softmax are dead now
    return len(matches), notes


def _match(attention: Attention) -> dict | str:
    """The operands of one block's cached attention, or why it does not match."""
    query, key_t = attention.scores.inputs
    scale = 1.0
    query, factor = _strip_scales(query)
    scale *= factor
    transpose = key_t.producer()
    is_transpose = transpose is not None and transpose.op_type == "Transpose"
    if not is_transpose or tuple(transpose.attributes.get_ints("perm", ())) != (0, 1, 3, 2):
        return "K is not read through a transpose of its last two axes"
    key, factor = _strip_scales(transpose.inputs[0])
    scale *= factor
    key_concat = _cache_concat(key, "key")
    if isinstance(key_concat, str):
        return key_concat
    value_concat = _cache_concat(attention.context.inputs[1], "value")
    if isinstance(value_concat, str):
        return value_concat
    if attention.context.inputs[0] is not attention.softmax.outputs[0]:
        return "the softmax output is not what multiplies V"
    if attention.softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return "softmax is not on the last axis"
    mask_scale, logits = 1.0, attention.softmax.inputs[0]
    masked, outer = _strip_scales(logits)  # (Q·Kᵀ + M)·t when the mask is added before a scale
    peeled = _mask_terms(masked, attention.scores)
    if isinstance(peeled, str):
        return peeled
    mask_terms, unmasked = peeled
    if mask_terms:
        logits, mask_scale = unmasked, outer
        scale *= outer
    logits, factor, softcap = _strip_soft_cap(logits)
    scale *= factor
    if logits is not attention.scores.outputs[0]:
        return "something other than constant scales, a soft cap and a mask lies between Q·Kᵀ and the softmax"
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
        "output": attention.context.outputs[0],
        "scale": scale,
        "softcap": softcap,
        "scores": attention.scores.outputs[0].shape,
        "after": attention.context,
    }
    match["merged"] = _merged_heads(match, attention)
    return match


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


def _mask_terms(value: ir.Value, scores: ir.Node) -> tuple[list[MaskTerm], ir.Value] | str:
    """The additive terms of the mask on the way from Q·Kᵀ to `value`, and what they are added to:
    Add(x, M) gives M (a causal or padding mask, MPT's ALiBi bias), a masked fill Where(c, m, x)
    gives its node and the index of x, which the mask reads as 0 (`_mask`)."""
    terms: list[MaskTerm] = []
    while (node := value.producer()) is not None:
        if node.op_type == "Add":
            sides = [v for v in node.inputs if _from_scores(v, scores)]
            if len(sides) != 1:
                return "the mask Add does not have exactly one side from Q·Kᵀ"
            terms.append(node.inputs[1] if sides[0] is node.inputs[0] else node.inputs[0])
        elif node.op_type == "Where" and len(node.inputs) == 3:
            sides = [i for i in (1, 2) if _from_scores(node.inputs[i], scores)]
            if len(sides) != 1:
                return "the masked fill does not have exactly one branch from Q·Kᵀ"
            fill = node.inputs[3 - sides[0]]
            if not _is_lowest(const_array(fill), fill.dtype):
                return "the masked fill's value is not a constant −∞ or float32's lowest (adding it is not the same)"
            terms.append((node, sides[0]))
            sides = [node.inputs[sides[0]]]
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


def _from_scores(value: ir.Value, scores: ir.Node) -> bool:
    """Whether `value` is computed from `scores` through constant scalings, a soft cap, and
    additions and masked fills of anything else."""
    source, _, _ = _strip_soft_cap(value)
    node = source.producer()
    if node is scores:
        return True
    return (
        node is not None
        and node.op_type in ("Add", "Where")
        and any(_from_scores(v, scores) for v in node.inputs if v is not None)
    )


def _merged_heads(match: dict, attention: Attention) -> dict | None:
    """Q, K, V as [B, S, H·d] (each with the RotaryEmbedding on its way, if any) and the merged
    output that Y is reshaped into, when the whole block splits and merges heads by the book."""
    heads = {"query": attention.num_heads, "key": attention.num_kv_heads, "value": attention.num_kv_heads}
    merged: dict = {}
    for name, count in heads.items():
        split = _split_heads(match[name], count)
        if split is None:
            return None
        merged[name] = (*split, count)
    output = _merged_output(match["output"])
    if output is None:
        return None
    merged["output"] = output
    return merged


def _split_heads(value: ir.Value, heads: int) -> tuple[ir.Value, ir.Node | None] | None:
    """(X, rotary) when `value` = [RotaryEmbedding](Transpose₀₂₁₃(Reshape(X, [B, S, heads, d])))."""
    node, rotary = value.producer(), None
    if node is not None and node.op_type == "RotaryEmbedding" and node.domain == "" and sole_reader(node.outputs[0]):
        if len(node.inputs) != 3:  # position ids would index the caches by position: not merged here
            return None
        rotary, node = node, node.inputs[0].producer()
    if not _is_head_transpose(node) or sole_reader(node.outputs[0]) is None:
        return None
    reshape = node.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape" or sole_reader(reshape.outputs[0]) is None:
        return None
    x, split = reshape.inputs[0], reshape.outputs[0].shape
    if x.shape is None or split is None or len(x.shape) != 3 or len(split) != 4:
        return None
    if list(x.shape)[:2] != list(split)[:2] or split[2] != heads or not isinstance(split[3], int):
        return None
    return (x, rotary) if x.shape[2] == heads * split[3] else None


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


def _rewrite(graph: ir.Graph, match: dict, zeros: dict[ir.DataType, ir.Value]) -> None:
    attributes: dict = {"scale": match["scale"]}
    if match["softcap"] is not None:
        attributes["softcap"] = match["softcap"]
    operands = {name: match[name] for name in ("query", "key", "value")}
    outputs = {name: match[name] for name in ("output", "present_key", "present_value")}
    merged = match["merged"]
    if merged is not None:
        heads = {"query": "q_num_heads", "key": "kv_num_heads", "value": "kv_num_heads"}
        for name, attribute in heads.items():
            x, rotary, heads_count = merged[name]
            attributes[attribute] = heads_count
            operands[name] = x if rotary is None else _merged_rotary(graph, rotary, x, heads_count)
        outputs["output"] = merged["output"]
    nodes, mask = _mask(graph, match, zeros)
    if match["mask_scale"] != 1.0:
        nodes.append(
            ir.node(
                "Mul", [mask, new_initializer(graph, "mask_scale", np.array(match["mask_scale"]), mask.dtype.numpy())]
            )
        )
        mask = nodes[-1].outputs[0]
    inputs = [*operands.values(), mask, match["past_key"], match["past_value"]]
    node = ir.node("Attention", inputs, attributes=attributes, num_outputs=3)
    graph.insert_after(match["after"], [*nodes, node])
    for new, old in zip(node.outputs, outputs.values(), strict=True):
        new.dtype, new.shape = old.dtype, old.shape
        replace_value(old, new)


def _mask(graph: ir.Graph, match: dict, zeros: dict[ir.DataType, ir.Value]) -> tuple[list[ir.Node], ir.Value | None]:
    """The nodes adding up the mask's terms, a masked fill Where(c, m, x) as Where(c, m, 0), and
    the mask (None without terms; no nodes for one added value)."""
    nodes: list[ir.Node] = []
    values: list[ir.Value] = []
    for term in match["mask_terms"]:
        if isinstance(term, ir.Value):
            values.append(term)
            continue
        where, filled = term
        dtype = where.outputs[0].dtype
        inputs = list(where.inputs)
        if dtype not in zeros:
            zeros[dtype] = new_initializer(graph, "masked_fill_zero", np.array(0), dtype.numpy())
        inputs[filled] = zeros[dtype]
        nodes.append(ir.node("Where", inputs))
        values.append(nodes[-1].outputs[0])
        values[-1].dtype = dtype
        values[-1].shape = _broadcast([where.inputs[i].shape for i in range(3) if i != filled], match["scores"])
    while len(values) > 1:
        nodes.append(ir.node("Add", values[:2]))
        total = nodes[-1].outputs[0]
        total.dtype, total.shape = values[0].dtype, _broadcast([v.shape for v in values[:2]], match["scores"])
        values[:2] = [total]
    return nodes, (values or [None])[0]


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


def _merged_rotary(graph: ir.Graph, rotary: ir.Node, x: ir.Value, heads: int) -> ir.Value:
    """The same RotaryEmbedding applied to X in the [B, S, H·d] layout."""
    attributes = {**{name: attr.value for name, attr in rotary.attributes.items()}, "num_heads": heads}
    node = ir.node("RotaryEmbedding", [x, *rotary.inputs[1:]], attributes=attributes)
    graph.insert_after(rotary, node)
    node.outputs[0].dtype, node.outputs[0].shape = x.dtype, x.shape
    return node.outputs[0]

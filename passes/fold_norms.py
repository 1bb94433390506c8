"""`fold-norms`: move norm affine parameters and constant scales into linears; Pre-LN → RMSNorm.

1. Affine fold. A norm computes y = γ⊙n + β (n the normalized input). When every reader of y is a
   linear z = y·W + b (possibly through a Reshape that keeps the last axis; a Shape read of y
   aside, which the fold keeps) and y is no model output, then
       z = n·W' + b',   W' = diag(γ)·W,   b' = b + β·W,
   and the norm keeps γ = 1, β = 0 (its Mul γ / Add β nodes are removed when decomposed).
   Preconditions: all readers are linears that own their weights (a weight tied to the embedding
   table, or shared with another node, is left alone, with the reason), none of them on a block
   quantization grid (a model converted from a quantized file: `source_grid`; diag(γ)·W is off it,
   and `quantize` would round it again).

2. Pre-LN LayerNorm → RMSNorm ("Pre-RMSNorm and Pre-CRMSNorm Transformers", Jiang et al. 2023).
   If every write into the residual stream has zero mean over the hidden axis, then
   LayerNorm(x) = γ⊙(x − μ)/√(σ² + ε) + β = γ⊙x/√(mean(x²) + ε) + β = RMSNorm(x). Writers are
   recentred exactly: embedding rows E' = E − mean_j(E), and each sublayer's output projection
   W' = W·(I − 11ᵀ/d), b' = b − mean(b) (tied LM heads are untied first, since the LM head reads
   the original table). Post-LN models (BERT) are refused: their norms sit on the stream itself.
   A LayerNorm written in standard ops (Cohere's, without β) is replaced like the operator.

3. Linear outputs scaled by constants. When a linear's only reader is an inference BatchNorm over
   its output features, y = (x·W + b − μ)·s + β with s = γ/√(σ² + ε), the BatchNorm goes into the
   linear: W' = W·diag(s), b' = (b − μ)·s + β. Likewise a constant per-feature or scalar Mul / Div
   (a σ-reparameterised weight's 1/σ, a fixed output scale): W' = W·diag(c), b' = b·c.

4. Constant scales. A scalar c applied to attention scores S = (Q·Kᵀ)·c, or to their inputs,
   (c_q·Q)·(c_k·Kᵀ) with c = c_q·c_k (TorchScript's export of torch's SDPA), is folded into the query
   projection, W_q' = c·W_q, b_q' = c·b_q: rotary embedding, head reshapes and transposes are
   linear in Q, so S is unchanged and one elementwise Mul over B×H×S×S per layer disappears.
   Only where every op from the projection to Q·Kᵀ is so (f(c·q) = c·f(q)): a norm on the query
   (Qwen3's, Gemma-3's, OLMo-2's q_norm) divides c out again, and the scale stays.

Arithmetic is float64; results are stored in the model's dtype.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import (
    const_array,
    consumers,
    keeps_last_axis,
    scalar_factor,
    sole_reader,
)
from xopt.analysis.patterns import Embedding, Linear, Norm, match_linear, read_outside
from xopt.analysis.structure import Attention, TransformerStructure, residual_skip
from xopt.passes.source_grid import ON_GRID, lies_on_grid
from xopt.pipeline import Pass, PassResult, register
from xopt.rewrite import (
    bias_or_zeros,
    owns_weight,
    remove_node_keeping_input,
    replace_value,
    set_bias,
    set_weight,
    weight_in_out,
)


@register
@dataclass
class FoldNormsPass(Pass):
    name = "fold-norms"
    exact = True
    summary = "fold norm γ/β and attention scales into linears; Pre-LN LayerNorm → RMSNorm"

    to_rmsnorm: bool = True
    affine: bool = True  # fold γ/β into the readers (false keeps them in the norm, see the docstring)
    fold_scales: bool = True

    def __call__(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        explain: list[str] = []
        graph = model.graph
        if self.to_rmsnorm:
            _layernorm_to_rmsnorm(model, find_transformer_structure(model, heads=False), stats, explain)
        structure = find_transformer_structure(model, heads=False)  # head counts unused: no probe run
        norms = [n for b in structure.blocks for n in b.norms]
        if not structure.blocks:
            explain.append("no transformer blocks found: nothing to fold")
        norms += [n for n in (structure.final_norm, structure.embedding_norm) if n is not None]
        kept: dict[str, list[str]] = {}  # reason → the norms kept for it
        for norm in norms if self.affine else []:
            reason = fold_affine(graph, norm)
            if reason is None:
                stats["norms_folded"] += 1
                explain.append(f"folded γ/β of {norm.kind} {norm.output.name} into its readers")
            elif reason:
                kept.setdefault(reason, []).append(f"{norm.kind} {norm.output.name}")
        for reason, names in kept.items():
            which = names[0] if len(names) == 1 else f"{len(names)} norms ({names[0]}, …)"
            explain.append(f"kept γ/β of {which}: {reason}")
        if self.fold_scales:
            for block in find_transformer_structure(model, heads=False).blocks:  # the linears changed above
                if block.attention is not None:
                    reason = _fold_score_scale(graph, block.attention)
                    if reason is None:
                        stats["score_scales_folded"] += 1
                    else:
                        explain.append(f"block {block.index}: score scale not folded: {reason}")
        for node in list(graph):
            if node.op_type in ("BatchNormalization", "Mul", "Div") and node.domain in ("", "ai.onnx"):
                folded = _fold_output_scale(graph, node)
                if folded:
                    stats[f"{folded}_folded"] += 1
                    explain.append(f"folded {node.op_type} {node.name} into the linear before it")
        common_passes.RemoveUnusedNodesPass()(model)  # drops the replaced weights too
        return PassResult(model, bool(stats), dict(stats), explain)


def fold_affine(graph: ir.Graph, norm: Norm, keep_grids: bool = True) -> str | None:
    """Fold γ, β of `norm` into the linears reading it; a reason when it cannot ('' if nothing to do).
    `keep_grids`: not into weights that lie on a quantization grid (`source_grid`)."""
    if not has_affine(norm):
        return ""
    gamma = const_array(norm.scale) if norm.scale is not None else None
    beta = const_array(norm.shift) if norm.shift is not None else None
    readers = linear_readers(norm.output)
    if isinstance(readers, str):
        return readers
    if not all(owns_weight(linear) for linear in readers):
        return "a reader's weight is shared (tied to the embedding table or another node)"
    if keep_grids and any(lies_on_grid(weight_in_out(linear)) for linear in readers):
        return f"a reader's weight {ON_GRID}: γ·W would not be, and `quantize` keeps the grid"
    width = readers[0].in_features
    gamma64 = np.ones(width) if gamma is None else np.broadcast_to(gamma.astype(np.float64).reshape(-1), (width,))
    beta64 = np.zeros(width) if beta is None else np.broadcast_to(beta.astype(np.float64).reshape(-1), (width,))
    for linear in readers:
        weight = weight_in_out(linear)
        set_bias(graph, linear, bias_or_zeros(linear) + beta64 @ weight)
        set_weight(graph, linear, gamma64[:, None] * weight)
    _drop_affine(graph, norm)
    return None


def has_affine(norm: Norm) -> bool:
    """Whether the norm has a γ other than 1 or a β other than 0."""
    gamma = const_array(norm.scale) if norm.scale is not None else None
    beta = const_array(norm.shift) if norm.shift is not None else None
    return (gamma is not None and not np.all(gamma == 1)) or (beta is not None and bool(np.any(beta)))


# readers a fresh export can put between a norm and its linears that change nothing (a full-range Slice)
_NO_OP_KINDS = frozenset({"Slice", "Identity"})


def linear_readers(value: ir.Value) -> list[Linear] | str:
    if value.is_graph_output():
        return "a model output"
    readers = []
    for user in consumers(value):
        if user.op_type == "Shape":  # reads dims only, which folding γ/β into the linears keeps
            continue
        if user.op_type == "Reshape" and keeps_last_axis(user):
            inner = linear_readers(user.outputs[0])
            if isinstance(inner, str):
                return inner
            readers += inner
            continue
        linear = match_linear(user)
        if linear is None or user.inputs[0] is not value:
            hint = " (if it changes nothing, `cleanup` removes it)" if user.op_type in _NO_OP_KINDS else ""
            return f"read by a {user.op_type} ({user.name}), not only by linears{hint}"
        readers.append(linear)
    return readers or "no readers"


def _drop_affine(graph: ir.Graph, norm: Norm) -> None:
    """Make the norm's γ = 1 and β = 0 (remove the Mul/Add of a decomposed norm)."""
    fused = norm.nodes[0] if len(norm.nodes) == 1 else None
    if fused is not None:
        width = const_array(norm.scale).size
        ones = ir.tensor(np.ones(width, const_array(norm.scale).dtype))
        fused.replace_input_with(1, _constant(graph, f"{fused.name}_ones", ones))
        if len(fused.inputs) > 2 and fused.inputs[2] is not None:
            fused.replace_input_with(2, None)
        return
    for node in reversed(norm.nodes):
        if node.op_type in ("Mul", "Add") and any(v is norm.scale or v is norm.shift for v in node.inputs):
            kept = next(v for v in node.inputs if v is not norm.scale and v is not norm.shift)
            remove_node_keeping_input(graph, node, kept)


def _constant(graph: ir.Graph, name: str, tensor: ir.Tensor) -> ir.Value:
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, const_value=tensor)
    value.shape, value.dtype = ir.Shape(tensor.shape), tensor.dtype
    graph.register_initializer(value)
    return value


def _fold_score_scale(graph: ir.Graph, attention: Attention) -> str | None:
    scales = _score_scales(attention.scores)
    if not scales:
        return "no constant scalar scale on Q·Kᵀ or its inputs"
    if attention.fused_qkv:
        return "Q is part of a fused QKV projection"
    if not owns_weight(attention.q):
        return "the query weight is shared"
    reason = _not_linear_in_query(graph, attention.q.output, attention.scores)
    if reason:
        return reason
    factor = float(np.prod([factor for _, _, factor in scales]))
    set_weight(graph, attention.q, factor * weight_in_out(attention.q))
    if attention.q.bias is not None:
        set_bias(graph, attention.q, factor * bias_or_zeros(attention.q))
    for node, scaled, _ in scales:
        remove_node_keeping_input(graph, node, scaled)
    return None


def _score_scales(scores: ir.Node) -> list[tuple[ir.Node, ir.Value, float]]:
    """The Mul/Div nodes by a constant scalar that scale the scores S = Q·Kᵀ: the one right after it,
    and those on its inputs (TorchScript's export of torch's SDPA scales Q and Kᵀ by √s each), each
    with the value it scales and its factor; only those whose output nothing else reads, a node
    nearer Q·Kᵀ before the one it reads (the order they can be removed in)."""
    found = []
    after = sole_reader(scores.outputs[0])
    if (scaled := scalar_factor(after)) is not None:
        found.append((after, *scaled))
    for value in scores.inputs:
        reader = scores
        while sole_reader(value) is reader and (scaled := scalar_factor(value.producer())) is not None:
            found.append((value.producer(), *scaled))
            reader, value = value.producer(), scaled[0]
    return found


# ops linear in their first input (f(c·x) = c·f(x)) while no other input depends on x
_LINEAR_IN_FIRST_INPUT = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Flatten", "Expand", "Gather", "Tile"}
    | {"Identity", "Cast", "Neg", "Div", "RotaryEmbedding"}
)


def _not_linear_in_query(graph: ir.Graph, query: ir.Value, scores: ir.Node) -> str | None:
    """None when scaling `query` by a constant scales one input of `scores` by it and changes no
    other value (a shape read of it aside); else what stands in the way. The nodes downstream of
    the query are judged in the graph's (topological) order, each after every node it reads from."""
    downstream = _downstream_of(query, scores)
    scaled = {query}
    for node in (node for node in graph if node in downstream):
        reads = [value is not None and value in scaled for value in node.inputs]
        if not any(reads):
            continue
        if node is scores:
            if all(reads):
                return "both Q and K depend on the query projection"
            continue
        op = node.op_type
        linear = (
            (op in _LINEAR_IN_FIRST_INPUT and reads[0] and not any(reads[1:]))
            or (op == "Mul" and sum(reads) == 1)
            or (op in ("Add", "Sub", "Concat") and all(reads))
        )
        if not linear:
            return f"the query passes through {op} ({node.name}) on its way to Q·Kᵀ, which is not linear in it"
        scaled.update(node.outputs)
    if any(value in scaled for value in graph.outputs):
        return "the query (or a value scaled with it) is a graph output"
    return None


def _downstream_of(value: ir.Value, stop: ir.Node) -> set[ir.Node]:
    """The nodes that read `value` or what is computed from it, not past `stop` nor a shape read."""
    found: set[ir.Node] = set()
    pending = [value]
    while pending:
        for node in consumers(pending.pop()):
            if node not in found and node.op_type not in ("Shape", "Size"):
                found.add(node)
                if node is not stop:
                    pending.extend(node.outputs)
    return found


def _fold_output_scale(graph: ir.Graph, node: ir.Node) -> str | None:
    """Fold an inference BatchNorm or a constant Mul/Div on a linear's output into the linear.
    Returns what was folded ("batchnorm" or "output_scale"), None when the pattern is absent."""
    source = node.inputs[0]
    linear = _linear_producing(source)
    if linear is None or sole_reader(source) is None or not owns_weight(linear):
        return None
    width = linear.out_features
    if node.op_type == "BatchNormalization":
        params = [const_array(v) for v in node.inputs[1:5]]
        rank = len(source.shape) if source.shape is not None else 0
        if len(node.outputs) != 1 or any(p is None or p.size != width for p in params) or rank != 2:
            return None  # training mode, non-constant statistics, or channels not the features axis
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        scale = gamma / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
        shift = beta - mean * scale
        kind = "batchnorm"
    else:
        other = node.inputs[1] if node.inputs[0] is source else node.inputs[0]
        constant = const_array(other)
        if constant is None or constant.size not in (1, width) or (node.op_type == "Div" and other is node.inputs[0]):
            return None
        if constant.size == width and constant.shape[-1] != width:
            return None
        factor = np.broadcast_to(constant.astype(np.float64).reshape(-1), (width,))
        scale, shift = (1.0 / factor if node.op_type == "Div" else factor), np.zeros(width)
        kind = "output_scale"
    set_weight(graph, linear, weight_in_out(linear) * scale[None, :])
    set_bias(graph, linear, bias_or_zeros(linear) * scale + shift)
    remove_node_keeping_input(graph, node, linear.output)
    return kind


def _linear_producing(value: ir.Value | None) -> Linear | None:
    """The linear whose output (after its bias) is `value`, if any."""
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if node.op_type == "Add":
        for candidate in node.inputs:
            inner = candidate.producer() if candidate is not None else None
            linear = match_linear(inner) if inner is not None else None
            if linear is not None and linear.output is value:
                return linear
        return None
    linear = match_linear(node)
    return linear if linear is not None and linear.output is value else None


def _layernorm_to_rmsnorm(model: ir.Model, structure: TransformerStructure, stats: Counter, explain: list) -> None:
    graph = model.graph
    norms = [n for b in structure.blocks for n in b.norms] + [n for n in (structure.final_norm,) if n]
    if not norms or any(n.kind != "LayerNorm" for n in norms):
        return
    if structure.norm_position != "pre":
        explain.append("LayerNorm → RMSNorm refused: post-LN model (the norms sit on the residual stream itself)")
        return
    embeddings = stream_embeddings(structure)
    if isinstance(embeddings, str):
        explain.append(f"LayerNorm → RMSNorm refused: {embeddings}")
        return
    if shared := next((v for v in map(read_outside, norms) if v is not None), None):
        explain.append(f"LayerNorm → RMSNorm refused: an intermediate of a norm ({shared.name}) is read outside it")
        return
    if structure.tied_embeddings and structure.lm_head is not None:
        untie_lm_head(graph, structure)
        stats["lm_head_untied"] += 1
    for embedding in embeddings:
        table = const_array(embedding.table).astype(np.float64)
        replace_constant(graph, embedding.node, 0, table - table.mean(axis=1, keepdims=True))
        stats["embeddings_recentred"] += 1
    for block in structure.blocks:
        for linear in (block.attention.o, block.mlp.down):
            weight = weight_in_out(linear)
            set_weight(graph, linear, weight - weight.mean(axis=1, keepdims=True))
            bias = bias_or_zeros(linear)
            if linear.bias is not None or np.any(bias):
                set_bias(graph, linear, bias - bias.mean())
            stats["writers_recentred"] += 1
    opset = model.opset_imports.get("", 17)
    for norm in norms:
        _replace_with_rmsnorm(graph, norm, opset)
        stats["layernorms_to_rmsnorm"] += 1
    explain.append(f"LayerNorm → RMSNorm on {len(norms)} norms after recentring the residual stream")


def stream_embeddings(structure: TransformerStructure) -> list[Embedding] | str:
    """The embeddings that write the residual stream, when every write into it is one of them or
    a sublayer's output projection; else why not. A Gather of another table (CodeGen's and
    GPT-J's sin/cos rows, which rotate Q and K) writes no stream."""
    for block in structure.blocks:
        if any(s is None or s.residual is None for s in (block.attention, block.mlp)):
            return f"block {block.index} is not attention + MLP with residual adds"
        if block.output_norms:
            return f"block {block.index}: a norm between a sublayer's output and its residual add writes the stream"
    first = structure.blocks[0].attention
    gathers = {e.node for e in structure.embeddings}
    skip = residual_skip(first)
    pending, seen = [skip], set()
    while pending:
        value = pending.pop()
        node = value.producer()
        if node in gathers:
            seen.add(node)
            continue
        if (scaled := scalar_factor(node)) is not None:
            # Gemma's √d on its embeddings: it keeps a zero mean (and commutes with rotations)
            pending.append(scaled[0])
            continue
        if node is None or node.op_type not in ("Add", "Cast", "Identity"):
            return f"the residual stream starts with {node.op_type if node else 'a graph input'}, not embeddings"
        pending.extend(v for v in node.inputs[: 2 if node.op_type == "Add" else 1])
    return [e for e in structure.embeddings if e.node in seen] or "no embedding writes into the residual stream"


def untie_lm_head(graph: ir.Graph, structure: TransformerStructure) -> None:
    table = const_array(structure.token_embedding.table).astype(np.float64)
    set_weight(graph, structure.lm_head, table.T)


def replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    dtype = const_array(old).dtype
    node.replace_input_with(index, _constant(graph, f"{old.name}_recentred", ir.tensor(array.astype(dtype))))


def _replace_with_rmsnorm(graph: ir.Graph, norm: Norm, opset: int) -> None:
    """x / √(mean(x²) + ε) · γ + β in standard ops, in place of the norm's nodes (one
    LayerNormalization, or Cohere's decomposed LayerNorm without β)."""
    first, last = norm.nodes[0], norm.nodes[-1]
    x = norm.input
    dtype = const_array(norm.scale).dtype if norm.scale is not None else x.dtype.numpy()
    square = ir.node("Mul", [x, x])
    if opset >= 18:
        axes = _constant(graph, f"{last.name}_axes", ir.tensor(np.array([-1], np.int64)))
        mean = ir.node("ReduceMean", [square.outputs[0], axes], attributes={"keepdims": 1})
    else:
        mean = ir.node("ReduceMean", [square.outputs[0]], attributes={"axes": [-1], "keepdims": 1})
    epsilon = _constant(graph, f"{last.name}_epsilon", ir.tensor(np.array(norm.epsilon, dtype)))
    shifted = ir.node("Add", [mean.outputs[0], epsilon])
    root = ir.node("Sqrt", [shifted.outputs[0]])
    inverse = ir.node("Reciprocal", [root.outputs[0]])
    normalized = ir.node("Mul", [x, inverse.outputs[0]])
    nodes = [square, mean, shifted, root, inverse, normalized]
    for parameter, op in ((norm.scale, "Mul"), (norm.shift, "Add")):
        if parameter is not None:
            nodes.append(ir.node(op, [nodes[-1].outputs[0], parameter]))
    graph.insert_before(first, nodes)
    reduced = {mean, shifted, root, inverse}  # [.., 1]; the others have x's shape (a Reshape reading one needs it)
    for node in nodes:
        if node not in reduced:
            node.outputs[0].dtype, node.outputs[0].shape = norm.output.dtype, norm.output.shape
    replace_value(norm.output, nodes[-1].outputs[0])
    for node in reversed(norm.nodes):
        graph.remove(node, safe=True)

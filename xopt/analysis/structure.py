"""Transformer structure from the graph alone: embeddings, blocks, attention, MLP, norms, head.

How it is found (no config, no names needed; module-path metadata only labels what is found):
1. Linears, norms and embedding tables are matched node by node (`patterns`).
2. Attention: each Softmax whose input comes (through mask adds, scaling and Gemma-2's soft cap
   c·tanh(S/c)) from a MatMul of two activations S = Q·Kᵀ and whose output feeds P·V. Walking
   back from Q, K and V through reshapes, transposes and rotary arithmetic reaches their
   projections; walking forward from P·V reaches the output projection. The head size is the last
   axis of Q at the S MatMul, read from static shapes or one probe run; heads = width(Q proj) /
   head size, KV heads = width(K proj) / head size.
3. MLP: a linear outside attention whose output is added back into an activation (the residual
   add) is a down projection; walking back from its input reaches up (and gate, for a gated MLP:
   down(act(gate(x)) · up(x))). The activation is read from the ops on that path. A sublayer's
   output may pass through a norm of its own on the way to the residual add, h + norm(sublayer(…))
   (OLMo-2's and Gemma-2/3's post-sublayer norms): its `output_norm`.
4. Sublayers sorted in graph order are paired into blocks (attention, then MLP). A norm whose
   output feeds a sublayer and whose input is the residual add's skip input is a pre-norm; a norm
   right after a residual add, whose output is the next skip, is a post-norm.
5. The LM head is the linear that writes a graph output (through Gemma-2's soft cap on the
   logits, if any); the final norm feeds it (or, for an encoder, writes the output itself).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from xopt.analysis.graph_view import (
    TRANSPARENT_OPS,
    consumers,
    is_constant,
    module_path,
    past_nan_guard,
    scalar_factor,
    skip_back,
    skip_forward,
)
from xopt.analysis.patterns import (
    Embedding,
    Linear,
    Norm,
    find_linears,
    match_embedding,
    match_norm,
    table_equals_transposed,
)
from xopt.analysis.probe import probe_shapes

logger = logging.getLogger(__name__)

# Ops between a projection and the attention MatMuls (head split, rotary embedding, GQA repeat).
_HEAD_LAYOUT_OPS = TRANSPARENT_OPS | {"Reshape", "Transpose"}
_SCORE_OPS = TRANSPARENT_OPS | {"Add", "Mul", "Div", "Where", "Reshape", "Slice", "Sub", "Tanh"}  # Tanh: a soft cap
_SEARCH_LIMIT = 400


@dataclass(eq=False)
class Attention:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    scores: ir.Node  # Q·Kᵀ
    softmax: ir.Node
    context: ir.Node  # P·V
    rope: bool
    num_heads: int = 0
    num_kv_heads: int = 0
    head_size: int = 0
    residual: ir.Node | None = None
    output_norm: Norm | None = None  # between the output projection and the residual add

    @property
    def fused_qkv(self) -> bool:
        return self.q is self.k

    @property
    def linears(self) -> list[Linear]:
        return list(dict.fromkeys([self.q, self.k, self.v, self.o]))


@dataclass(eq=False)
class MLP:
    up: Linear
    gate: Linear | None
    down: Linear
    activation: str
    residual: ir.Node | None = None
    output_norm: Norm | None = None  # between the down projection and the residual add

    @property
    def linears(self) -> list[Linear]:
        return [x for x in (self.gate, self.up, self.down) if x is not None]


@dataclass(eq=False)
class Block:
    index: int
    attention: Attention | None
    mlp: MLP | None
    attention_norm: Norm | None = None
    mlp_norm: Norm | None = None
    module: str | None = None
    parallel: bool = False  # the MLP reads the block's input, not the attention's sum (GPT-NeoX)

    @property
    def norms(self) -> list[Norm]:
        """The norms on the stream's side of the sublayers (pre- or post-norms); a parallel block's
        two sublayers may share one (GPT-J, Phi-2)."""
        norms = [n for n in (self.attention_norm, self.mlp_norm) if n is not None]
        return norms[:1] if len(norms) == 2 and norms[0] is norms[1] else norms

    @property
    def output_norms(self) -> list[Norm]:
        """The norms between a sublayer's output projection and its residual add."""
        return [s.output_norm for s in (self.attention, self.mlp) if s is not None and s.output_norm is not None]


@dataclass(eq=False)
class TransformerStructure:
    embeddings: list[Embedding]
    blocks: list[Block]
    embedding_norm: Norm | None = None
    final_norm: Norm | None = None
    lm_head: Linear | None = None
    tied_embeddings: bool = False
    norm_position: str | None = None
    params: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    near_misses: list[str] = field(default_factory=list)

    @property
    def token_embedding(self) -> Embedding | None:
        """The table indexed by a graph input (the token ids); the largest such if several."""
        direct = [e for e in self.embeddings if skip_back(e.node.inputs[1]).producer() is None]
        return max(direct or self.embeddings, key=lambda e: e.rows, default=None)

    @property
    def residual_stream(self) -> list[ir.Node]:
        """The residual adds in graph order."""
        return [x.residual for b in self.blocks for x in (b.attention, b.mlp) if x is not None and x.residual]

    def summary(self) -> dict[str, Any]:
        """The facts `xopt inspect --json` prints."""
        first = self.blocks[0] if self.blocks else None
        attention = first.attention if first else None
        mlp = first.mlp if first else None
        norms = [n for b in self.blocks for n in b.norms] + [n for n in (self.final_norm,) if n]
        token = self.token_embedding
        return {
            "num_blocks": len(self.blocks),
            "hidden_size": token.width if token else (attention.q.in_features if attention else None),
            "num_heads": attention.num_heads if attention else None,
            "num_kv_heads": attention.num_kv_heads if attention else None,
            "head_size": attention.head_size if attention else None,
            "intermediate_size": mlp.up.out_features if mlp else None,
            "vocab_size": token.rows if token else None,
            "norm": norms[0].kind if norms else None,
            "norm_position": self.norm_position,
            "output_norms": bool(first and first.output_norms),
            "parallel_residual": bool(first and first.parallel),
            "activation": mlp.activation if mlp else None,
            "gated_mlp": bool(mlp and mlp.gate is not None),
            "rope": bool(attention and attention.rope),
            "fused_qkv": bool(attention and attention.fused_qkv),
            "qkv_bias": bool(attention and attention.q.bias is not None),
            "embedding_norm": self.embedding_norm is not None,
            "final_norm": self.final_norm is not None,
            "lm_head": self.lm_head is not None,
            "tied_embeddings": self.tied_embeddings,
            "params": self.params,
            "ops": self.ops,
            "blocks": [_block_summary(b) for b in self.blocks],
        }


def find_transformer_structure(model: ir.Model, *, heads: bool = True) -> TransformerStructure:
    """Find embeddings, blocks (attention, MLP, norms), final norm and LM head in `model`;
    `heads=False` leaves the attentions' head counts at 0 (finding them where the graph's shapes
    are unknown takes a probe run of the model, seconds for a 100M-parameter one)."""
    graph = model.graph
    order = {node: i for i, node in enumerate(graph)}
    linears = find_linears(graph)
    by_output = {}
    for linear in linears:
        by_output[linear.output] = linear
        by_output[linear.node.outputs[0]] = linear
    norms = [x for x in map(match_norm, graph) if x is not None]
    norm_by_input = {n.input: n for n in norms}  # a sublayer's output may be its output norm's input
    embeddings = [x for x in map(match_embedding, graph) if x is not None]
    near_misses: list[str] = []

    attentions = []
    for node in graph:
        if node.op_type == "Softmax":
            found = _match_attention(node, by_output)
            if isinstance(found, str):
                near_misses.append(f"attention at {node.name}: {found}")
            else:
                attentions.append(found)
    if heads:
        _measure_heads(model, attentions)
    in_attention = {id(x) for a in attentions for x in a.linears}
    mlps = [
        m for x in linears if id(x) not in in_attention and (m := _match_mlp(x, by_output, in_attention, norm_by_input))
    ]

    for sublayer in [*attentions, *mlps]:
        linear = sublayer.o if isinstance(sublayer, Attention) else sublayer.down
        sublayer.residual, sublayer.output_norm = _residual_add(linear, norm_by_input)
    blocks = _pair_into_blocks(attentions, mlps, order)
    norm_position = _attach_norms(blocks, norms)
    structure = TransformerStructure(
        embeddings=embeddings,
        blocks=blocks,
        norm_position=norm_position,
        params=sum(v.const_value.size for v in graph.initializers.values() if v.const_value is not None),
        ops=dict(Counter(n.op_type for n in graph).most_common()),
        near_misses=near_misses,
    )
    _attach_head_and_outer_norms(structure, graph, linears, norms, order)
    return structure


def _match_attention(softmax: ir.Node, by_output: dict[ir.Value, Linear]) -> Attention | str:
    scores = _find_back(softmax.inputs[0], _SCORE_OPS, lambda n: n.op_type == "MatMul" and _two_activations(n))
    if scores is None:
        return "no Q·Kᵀ MatMul of two activations before the Softmax"
    context = None
    value = skip_forward(softmax.outputs[0], TRANSPARENT_OPS | {"Reshape"})  # Bloom: heads folded into the batch
    value = past_nan_guard(value)
    for user in consumers(value):
        if user.op_type == "MatMul" and user.inputs[0] is value:
            context = user
    if context is None:
        return "the Softmax output does not feed a P·V MatMul"
    q_found, q_ops = _linears_before(scores.inputs[0], by_output)
    k_found, _ = _linears_before(scores.inputs[1], by_output)
    v_found, _ = _linears_before(context.inputs[1], by_output)
    if len(q_found) != 1 or len(k_found) != 1 or len(v_found) != 1:
        return f"Q/K/V do not each come from one projection ({len(q_found)}/{len(k_found)}/{len(v_found)} found)"
    o = _linear_after(context.outputs[0], by_output)
    if o is None:
        return "no output projection after P·V"
    rope = bool(q_ops & {"Sin", "Cos", "Neg", "RotaryEmbedding"})
    return Attention(q_found[0], k_found[0], v_found[0], o, scores, softmax, context, rope)


def _two_activations(node: ir.Node) -> bool:
    return all(v is not None and not is_constant(v) for v in node.inputs[:2])


def _find_back(value: ir.Value, through: frozenset[str] | set[str], wanted) -> ir.Node | None:
    """Breadth-first search back from `value` through `through` ops for a node `wanted(node)`."""
    frontier, seen = [value], set()
    while frontier and len(seen) < _SEARCH_LIMIT:
        current = frontier.pop(0)
        node = current.producer() if current is not None else None
        if node is None or node in seen:
            continue
        seen.add(node)
        if wanted(node):
            return node
        if node.op_type in through:
            frontier.extend(v for v in node.inputs if v is not None and not is_constant(v))
    return None


def _linears_before(value: ir.Value, by_output: dict[ir.Value, Linear]) -> tuple[list[Linear], set[str]]:
    """The projections that `value` is computed from, and the ops passed on the way."""
    frontier, seen, found, ops = [value], set(), [], set()
    while frontier and len(seen) < _SEARCH_LIMIT:
        current = frontier.pop(0)
        if current in by_output:
            if by_output[current] not in found:
                found.append(by_output[current])
            continue
        node = current.producer()
        if node is None or node in seen or node.op_type in ("Shape", "Size", "Softmax"):
            continue
        seen.add(node)
        ops.add(node.op_type)
        frontier.extend(v for v in node.inputs if v is not None and not is_constant(v))
    return found, ops


def _linear_after(value: ir.Value, by_output: dict[ir.Value, Linear]) -> Linear | None:
    """The first projection reading `value` after head-merging reshapes and transposes."""
    frontier = [value]
    for _ in range(_SEARCH_LIMIT):
        if not frontier:
            return None
        current = frontier.pop(0)
        for user in consumers(current):
            linear = by_output.get(user.outputs[0])
            if linear is not None and linear.node is user and user.inputs[0] is current:
                return linear
            if user.op_type in _HEAD_LAYOUT_OPS:
                frontier.append(user.outputs[0])
    return None


def _measure_heads(model: ir.Model, attentions: list[Attention]) -> None:
    queries = [a.scores.inputs[0] for a in attentions]
    shapes = {id(q): _head_dims_known(q, a.fused_qkv) for q, a in zip(queries, attentions, strict=True)}
    unknown = [q for q in queries if shapes[id(q)] is None]
    if unknown:
        probed = probe_shapes(model, unknown)
        for q in unknown:
            shapes[id(q)] = probed.get(q.name)
    for attention, query in zip(attentions, queries, strict=True):
        shape = shapes[id(query)]
        if not shape:
            continue
        head_size = int(shape[-1])
        attention.head_size = head_size
        if attention.fused_qkv:
            heads = int(shape[-3]) if len(shape) == 4 else attention.q.out_features // (3 * head_size)
            attention.num_heads = heads
            attention.num_kv_heads = (attention.q.out_features // head_size - heads) // 2
        else:
            attention.num_heads = attention.q.out_features // head_size
            attention.num_kv_heads = attention.k.out_features // head_size


def _head_dims_known(query: ir.Value, fused_qkv: bool) -> tuple | None:
    """The query's annotated shape when the dimensions the head counts are read from are integers
    (the head size, last; the heads, third from last, where a fused QKV's rank-4 query gives them),
    whatever the batch and sequence dims are: an exporter's symbolic [batch, 9, sequence, 64]
    needs no probe run."""
    shape = query.shape
    if shape is None or len(shape) < 3 or not isinstance(shape[-1], int):
        return None
    if fused_qkv and len(shape) == 4 and not isinstance(shape[-3], int):
        return None
    return tuple(shape)


def _match_mlp(
    down: Linear, by_output: dict[ir.Value, Linear], in_attention: set[int], norm_by_input: dict[ir.Value, Norm]
) -> MLP | None:
    if _residual_add(down, norm_by_input)[0] is None:
        return None
    found, ops = _linears_before(down.input, by_output)
    found = [x for x in found if id(x) not in in_attention]
    if len(found) not in (1, 2):
        return None
    gate = None
    up = found[0]
    if len(found) == 2:
        product = skip_back(down.input)
        producer = product.producer()
        if producer is None or producer.op_type != "Mul":
            return None
        direct = [by_output.get(skip_back(v)) for v in producer.inputs]
        up = next((x for x in direct if x is not None), None)
        if up is None:
            return None
        gate = next(x for x in found if x is not up)
    return MLP(up, gate, down, _activation_name(ops))


def _activation_name(ops: set[str]) -> str:
    if "Gelu" in ops or "Erf" in ops or "BiasGelu" in ops:
        return "gelu"
    if "FastGelu" in ops or ("Tanh" in ops and "Pow" in ops):
        return "gelu_tanh"
    if "Sigmoid" in ops:
        return "silu"
    if "Relu" in ops:
        return "relu"
    return "unknown"


def _residual_add(linear: Linear, norm_by_input: dict[ir.Value, Norm]) -> tuple[ir.Node | None, Norm | None]:
    """The Add after `linear` (or after a norm of its output) whose other operand is an activation
    (the skip connection), and that norm; a constant scalar scale on the way (Granite's residual
    multiplier, h + r·o) is part of the sublayer's output."""
    value = _as_added(linear.output)
    norm = norm_by_input.get(value)
    if norm is not None:
        value = _as_added(norm.output)
    users = consumers(value)
    if len(users) == 1 and users[0].op_type == "Add":
        other = users[0].inputs[1] if users[0].inputs[0] is value else users[0].inputs[0]
        if other is not None and not is_constant(other):
            return users[0], norm
    return None, None


def _pair_into_blocks(attentions: list[Attention], mlps: list[MLP], order: dict[ir.Node, int]) -> list[Block]:
    sublayers = sorted([*attentions, *mlps], key=lambda s: order[(s.o if isinstance(s, Attention) else s.down).node])
    blocks: list[Block] = []
    for sublayer in sublayers:
        if isinstance(sublayer, Attention) or not blocks or blocks[-1].mlp is not None:
            blocks.append(Block(len(blocks), None, None))
        if isinstance(sublayer, Attention):
            blocks[-1].attention = sublayer
        else:
            blocks[-1].mlp = sublayer
    for block in blocks:
        paths = [module_path(x.node) for s in (block.attention, block.mlp) if s for x in s.linears]
        block.module = _common_module([p for p in paths if p])
    return blocks


def _common_module(paths: list[str]) -> str | None:
    if not paths:
        return None
    parts = [p.split(".") for p in paths]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common) or None


def _attach_norms(blocks: list[Block], norms: list[Norm]) -> str | None:
    """Attach each sublayer's norm; returns "pre" or "post" (or None without norms)."""
    by_output = {n.output: n for n in norms}
    by_input: dict[ir.Value, list[Norm]] = {}
    for norm in norms:
        by_input.setdefault(norm.input, []).append(norm)
    positions = []
    for block in blocks:
        for sublayer, slot in ((block.attention, "attention_norm"), (block.mlp, "mlp_norm")):
            if sublayer is None or sublayer.residual is None:
                continue
            first = sublayer.q if isinstance(sublayer, Attention) else (sublayer.gate or sublayer.up)
            before = by_output.get(skip_back(first.input, TRANSPARENT_OPS | {"Reshape"}))

            if before is not None and skip_back(before.input) is skip_back(residual_skip(sublayer)):
                setattr(block, slot, before)
                positions.append("pre")
                continue
            attention = block.attention if slot == "mlp_norm" and block.attention is not None else None
            block_input = skip_back(residual_skip(attention)) if attention and attention.residual else None
            if before is not None and skip_back(before.input) is block_input:  # the MLP reads it, as attention does
                block.mlp_norm, block.parallel = before, True
                positions.append("pre")
                continue
            after = by_input.get(sublayer.residual.outputs[0], [])
            if after and sublayer.output_norm is None:  # OLMo-2's last block: that norm is the final one
                setattr(block, slot, after[0])
                positions.append("post")
    if not positions:
        return None
    return Counter(positions).most_common(1)[0][0]


def sublayer_output(sublayer: Attention | MLP) -> ir.Value:
    """The value a sublayer adds into the residual stream (its output projection, reshaped back, or
    its output norm's output)."""
    linear = sublayer.o if isinstance(sublayer, Attention) else sublayer.down
    start = sublayer.output_norm.output if sublayer.output_norm is not None else linear.output
    return _as_added(start)


def _as_added(value: ir.Value) -> ir.Value:
    """`value` as a sublayer adds it into the stream: through dtype casts, reshapes and one
    constant scalar scale that only it reads."""
    value = skip_forward(value, TRANSPARENT_OPS | {"Reshape"})
    users = consumers(value)
    if len(users) == 1 and (scaled := scalar_factor(users[0])) is not None and scaled[0] is value:
        value = skip_forward(users[0].outputs[0], TRANSPARENT_OPS | {"Reshape"})
    return value


def residual_skip(sublayer: Attention | MLP) -> ir.Value:
    """The other operand of the sublayer's residual add: the stream it adds into (read live)."""
    added = sublayer_output(sublayer)
    return next(v for v in sublayer.residual.inputs if v is not added)


def _attach_head_and_outer_norms(
    structure: TransformerStructure,
    graph: ir.Graph,
    linears: list[Linear],
    norms: list[Norm],
    order: dict[ir.Node, int],
) -> None:
    outputs = set(graph.outputs)
    used = {id(x) for b in structure.blocks for s in (b.attention, b.mlp) if s for x in s.linears}
    heads = [
        x
        for x in linears
        if id(x) not in used and _past_output_scaling(skip_forward(x.output, TRANSPARENT_OPS | {"Reshape"})) in outputs
    ]
    if heads:
        structure.lm_head = heads[-1]
        token = structure.token_embedding
        structure.tied_embeddings = bool(token and table_equals_transposed(token.table, structure.lm_head.weight))
    attached = {id(n) for b in structure.blocks for n in (*b.norms, *b.output_norms)}
    free = [n for n in norms if id(n) not in attached]
    if structure.lm_head is not None:
        head_input = skip_back(structure.lm_head.input, TRANSPARENT_OPS | {"Slice", "Reshape"})
        structure.final_norm = next((n for n in free if n.output is head_input), None)
    elif structure.norm_position == "pre":
        structure.final_norm = next((n for n in free if skip_forward(n.output) in outputs), None)
    if structure.blocks and free:
        first_block = min(
            order[x.node] for s in (structure.blocks[0].attention, structure.blocks[0].mlp) if s for x in s.linears
        )
        early = [n for n in free if n is not structure.final_norm and order[n.nodes[-1]] < first_block]
        structure.embedding_norm = early[-1] if early else None


def _past_output_scaling(value: ir.Value) -> ir.Value:
    """What constant scalar scales and a soft cap c·tanh(x/c) on `value` give (Granite's logits
    divided by a constant, Gemma-2's capped): the value they end at."""
    tanh_seen = False
    while len(users := consumers(value)) == 1:
        scaled = scalar_factor(users[0])
        if scaled is not None and scaled[0] is value:
            value = users[0].outputs[0]
        elif users[0].op_type == "Tanh" and not tanh_seen:
            value, tanh_seen = users[0].outputs[0], True
        else:
            break
    return value


def _block_summary(block: Block) -> dict[str, Any]:
    summary: dict[str, Any] = {"index": block.index, "module": block.module}
    if block.attention is not None:
        a = block.attention
        summary["attention"] = {"q": _label(a.q), "k": _label(a.k), "v": _label(a.v), "o": _label(a.o)}
    if block.mlp is not None:
        m = block.mlp
        summary["mlp"] = {"up": _label(m.up), "gate": _label(m.gate) if m.gate else None, "down": _label(m.down)}
    summary["norms"] = [n.kind for n in block.norms]
    return summary


def _label(linear: Linear) -> str:
    """The module path of a linear when the exporter recorded it, else its weight's name."""
    return module_path(linear.node) or linear.name

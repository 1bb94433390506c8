"""Where each transformer block meets the residual stream, and which KV-cache layer it owns.

A block maps the stream h_in to h_out:

    pre-norm:   h_out = h_in + attn(norm₁(h_in)) + mlp(norm₂(h_in + attn(…)))   (h_out: the MLP's residual add)
    post-norm:  h_out = norm₂(a + mlp(a)),  a = norm₁(h_in + attn(h_in))        (h_out: the last norm's output)
    norms after the sublayers (OLMo-2; Gemma-2/3 have pre-norms too):
                h_out = a + norm₄(mlp(…)),  a = h_in + norm₃(attn(…))          (h_out: the MLP's residual add)

h_in is the skip operand of the attention's residual add (the previous block's h_out, or the
embeddings). Removing blocks i..j is `h_out(j) := h_in(i)` for every reader of h_out(j).

A decoder with a KV cache (`xopt.kv_cache`) has one past/present pair per layer; the layer a
block owns is the one whose past input reaches its attention's Q·Kᵀ or P·V MatMul.
"""

from __future__ import annotations

import onnx_ir as ir

from xopt.analysis.graph_view import consumers
from xopt.analysis.structure import Block, TransformerStructure, residual_skip
from xopt.kv_cache import PAST_PATTERN, past_inputs

_CACHE_SEARCH_LIMIT = 64  # nodes visited forward from a past input (Concat, GQA repeat, transposes)


def block_input(block: Block) -> ir.Value:
    """h_in: the skip operand of the block's first residual add (read live from the graph)."""
    return residual_skip(block.attention or block.mlp)


def block_output(block: Block, structure: TransformerStructure) -> ir.Value:
    """h_out: the last residual add's output, or the norm after it in a post-norm model."""
    sublayer = block.mlp or block.attention
    if structure.norm_position == "post":
        norm = block.mlp_norm if block.mlp is not None else block.attention_norm
        return norm.output
    return sublayer.residual.outputs[0]


def boundaries_known(structure: TransformerStructure) -> str | None:
    """None when every block has residual adds (and post-norms where the model has them). A block
    without attention in a graph with a Softmax the structure could not read as attention is an
    MLP whose attention went unread (GPT-OSS's sinks, DeepSeek's latent attention): removing it
    would remove half a layer."""
    if not structure.blocks:
        return "no transformer blocks found"
    unread = next((line for line in structure.near_misses if line.startswith("attention at ")), None)
    headless = next((block for block in structure.blocks if block.attention is None), None)
    if unread is not None and headless is not None:
        return f"block {headless.index} has no attention, and the structure could not read the {unread}"
    for block in structure.blocks:
        for sublayer in (block.attention, block.mlp):
            if sublayer is not None and sublayer.residual is None:
                return f"block {block.index}: a sublayer whose output is not added to the residual stream"
        if structure.norm_position == "post" and (block.mlp_norm if block.mlp else block.attention_norm) is None:
            return f"block {block.index}: no norm after its residual add in a post-norm model"
    return None


def cache_layers(model: ir.Model, structure: TransformerStructure) -> dict[int, int]:
    """Block index → the KV-cache layer number it reads (empty for a model without a cache)."""
    owner = {}
    for block in structure.blocks:
        if block.attention is not None:
            owner[block.attention.scores] = owner[block.attention.context] = block.index
    layers: dict[int, int] = {}
    for past in past_inputs(model):
        layer = int(PAST_PATTERN.match(past.name).group(1))
        frontier, seen = consumers(past), set()
        while frontier and len(seen) < _CACHE_SEARCH_LIMIT:
            node = frontier.pop(0)
            if node in owner:
                layers.setdefault(owner[node], layer)
                break
            if node not in seen:
                seen.add(node)
                frontier.extend(user for out in node.outputs for user in consumers(out))
    return layers

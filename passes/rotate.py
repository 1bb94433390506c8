"""`rotate`: an orthogonal rotation of the residual stream folded into the weights (QuaRot's R1;
Ashkboos et al., 2024). Exact in real arithmetic; it prepares the weights for quantization.

In a pre-norm transformer with RMSNorm the stream x [.., d] is written by the embeddings and by
each sublayer's output projection, and read only by RMSNorms, whose outputs feed linears. For an
orthogonal Q (QQᵀ = I) run the model on x̃ = x·Q instead:

    embedding tables      E' = E·Q                        (each row rotated; Gemma's √d after it commutes)
    writers (o, down)     W' = W·Q,   b' = b·Q            (their outputs land rotated)
    RMSNorm with γ = 1    RMSNorm(x·Q) = RMSNorm(x)·Q     (‖x·Q‖ = ‖x‖)
    readers (q, k, v, gate, up, LM head)   W' = Qᵀ·W      (x·Q·Qᵀ·W = x·W)

so every output is unchanged. A norm's γ does not commute with Q: it is folded into its readers
first (`fold-norms`' fold; a tied LM head is untied for it; when the final norm's γ is already 1 a
tied head stays tied, reading the rotated table). Q is a randomised Hadamard matrix (`hadamard.py`):
every rotated channel is ±1/√d times all the original ones, so an outlier channel — a few input
rows of every reader's W with large activations behind them, or large weights — is spread over
all d, which lowers the error of a per-group weight grid and of a per-tensor activation range.

With `optional` (recipes) a model whose weights lie on a quantization grid (`source_grid`) is
left unrotated: `quantize` keeps that grid exactly, which beats any re-quantization.

Refused, with the reason: post-LN or LayerNorm models (LayerNorm subtracts the mean, which Q
does not preserve; `fold-norms` turns Pre-LN LayerNorm into RMSNorm first), a stream read by
anything but norms, residual adds and `Shape` (what a rotation keeps; TorchScript exports read the
embeddings' shape for the mask) such as a hidden-state output, or a norm read by other than linears.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import const_array, consumers, keeps_last_axis, scalar_factor
from xopt.analysis.patterns import Embedding, Linear, find_linears
from xopt.analysis.structure import TransformerStructure
from xopt.errors import XoptError
from xopt.passes.fold_norms import (
    fold_affine,
    has_affine,
    linear_readers,
    stream_embeddings,
    untie_lm_head,
)
from xopt.passes.hadamard import random_rotation
from xopt.passes.source_grid import ON_GRID, lies_on_grid
from xopt.pipeline import Pass, PassResult, register
from xopt.rewrite import (
    bias_or_zeros,
    drop_if_unused,
    new_initializer,
    owns_weight,
    set_bias,
    set_weight,
    weight_in_out,
)
from xopt.verify import fused_operators


@register
@dataclass
class RotatePass(Pass):
    name = "rotate"
    exact = True
    summary = "rotate the residual stream by a randomised Hadamard matrix folded into the weights (QuaRot R1)"

    seed: int = 0
    optional: bool = False  # a model it cannot rotate passes through unchanged, with the reason (recipes)

    def __call__(self, model: ir.Model) -> PassResult:
        structure = find_transformer_structure(model, heads=False)  # head counts unused: no probe run
        reason = _refusal(model.graph, structure)
        if self.optional and not reason:  # a recipe leaves a quantized source's grid to `quantize`
            reason = _source_grid_reason(model.graph)
        if reason and self.optional:
            return PassResult(model, False, {}, [f"not rotated: {reason}"])
        if reason:
            raise XoptError(f"rotate: {reason}")
        graph = model.graph
        stats: Counter[str] = Counter()
        explain: list[str] = []
        if structure.tied_embeddings and has_affine(structure.final_norm):
            untie_lm_head(graph, structure)
            stats["lm_head_untied"] += 1
            explain.append("untied the LM head: the final norm's γ goes into it")
        for norm in _stream_norms(structure):
            reason = fold_affine(graph, norm, keep_grids=False)
            if reason:  # _refusal checked every reader, so this is a bug, not bad input
                raise RuntimeError(f"rotate: γ of {norm.output.name} could not be folded: {reason}")
            if reason is None:
                stats["norms_folded"] += 1
        structure = find_transformer_structure(model, heads=False)  # the folds replaced weights
        embeddings = stream_embeddings(structure)
        tables = {e.table for e in embeddings}
        width = structure.token_embedding.width
        rotation, kind = random_rotation(width, self.seed)
        for embedding in embeddings:
            _rotate_table(graph, embedding, rotation)
            stats["tables_rotated"] += 1
        for block in structure.blocks:
            for writer in (block.attention.o, block.mlp.down):
                set_weight(graph, writer, weight_in_out(writer) @ rotation)
                if writer.bias is not None:
                    set_bias(graph, writer, bias_or_zeros(writer) @ rotation)
                stats["writers_rotated"] += 1
        for norm in _stream_norms(structure):
            for reader in linear_readers(norm.output):
                if not _reads_rotated_table(reader, tables):
                    set_weight(graph, reader, rotation.T @ weight_in_out(reader))
                stats["readers_rotated"] += 1
        explain.append(f"rotated the residual stream (width {width}) by a {kind} matrix, seed {self.seed}")
        common_passes.RemoveUnusedNodesPass()(model)  # drops the replaced weights too
        return PassResult(model, True, dict(stats), explain)


def _refusal(graph: ir.Graph, structure: TransformerStructure) -> str | None:
    """Why the stream cannot be rotated exactly, or None."""
    fused = fused_operators(graph)
    if fused:
        return f"the graph has {', '.join(fused)} nodes (fused or quantized): rotate runs before `fuse` and `quantize`"
    if not structure.blocks:
        return "no transformer blocks found"
    if any(block.output_norms for block in structure.blocks):
        return "norms between the sublayers' outputs and their residual adds write the stream (OLMo-2, Gemma-2/3)"
    if structure.norm_position != "pre":
        return "not a pre-norm model: post-LN norms sit on the residual stream, which a rotation would change"
    if structure.embedding_norm is not None:
        return "a norm on the embeddings writes the residual stream (Bloom, ModernBERT), which a rotation would change"
    if structure.final_norm is None or any(None in (b.attention_norm, b.mlp_norm) for b in structure.blocks):
        return "a block without both of its norms, or no final norm"
    norms = _stream_norms(structure)
    if any(n.kind != "RMSNorm" for n in norms):
        return "LayerNorm does not commute with a rotation (run `fold-norms` first: it turns Pre-LN into RMSNorm)"
    if structure.lm_head is None:
        return "no LM head: the final hidden state is the output, and a rotation would change it"
    embeddings = stream_embeddings(structure)
    if isinstance(embeddings, str):
        return embeddings
    tables = {e.table for e in embeddings}
    for block in structure.blocks:
        for writer in (block.attention.o, block.mlp.down):
            if not owns_weight(writer):
                return f"the output projection {writer.name} shares its weight"
    for norm in norms:
        readers = linear_readers(norm.output)
        if isinstance(readers, str):
            return f"norm {norm.output.name} is {readers}"
        if any(not owns_weight(r) and not _reads_rotated_table(r, tables) for r in readers):
            return f"a reader of norm {norm.output.name} shares its weight"
    return _stream_readers_unknown(structure, norms, embeddings)


def _source_grid_reason(graph: ir.Graph) -> str | None:
    """Why a recipe should not rotate: the weights came on a quantization grid the rotation leaves."""
    for linear in find_linears(graph):
        if lies_on_grid(weight_in_out(linear)):
            return f"{linear.name} {ON_GRID}: a rotation moves the weights off it, and `quantize` keeps it"
    return None


def _stream_readers_unknown(structure: TransformerStructure, norms, embeddings: list[Embedding]) -> str | None:
    """Why something other than norms and residual adds reads the stream, or None."""
    allowed = {node for n in norms for node in n.nodes} | set(structure.residual_stream)
    stream = [add.outputs[0] for add in structure.residual_stream]
    for embedding in embeddings:
        value = embedding.node.outputs[0]
        stream.append(value)
        for user in consumers(value):  # token + position embeddings summed (or scaled) into the stream
            scaled = scalar_factor(user)
            if (user.op_type in ("Add", "Cast", "Identity") or (scaled and scaled[0] is value)) and user not in allowed:
                allowed.add(user)
                stream.append(user.outputs[0])
    for value in stream:  # grows while it is read: a Reshape that keeps the last axis passes the stream on (OPT)
        if value.is_graph_output():
            return f"the residual stream value {value.name} is a model output"
        for user in consumers(value):
            if user.op_type == "Reshape" and keeps_last_axis(user) and user not in allowed:
                allowed.add(user)
                stream.append(user.outputs[0])
            elif user not in allowed and user.op_type != "Shape":  # what a rotation keeps: its shape
                return f"the residual stream is read by {user.op_type} {user.name}, not only by norms and residual adds"
    return None


def _stream_norms(structure: TransformerStructure) -> list:
    """The norms that read the stream: each block's two (one where a parallel block's sublayers
    share it), and the final one."""
    return [n for b in structure.blocks for n in b.norms] + [structure.final_norm]


def _reads_rotated_table(linear: Linear, tables: set[ir.Value]) -> bool:
    """A tied LM head: its weight is a Transpose of an embedding table, rotated with the table."""
    producer = linear.weight.producer()
    return producer is not None and producer.op_type == "Transpose" and producer.inputs[0] in tables


def _rotate_table(graph: ir.Graph, embedding: Embedding, rotation: np.ndarray) -> None:
    """E' = E·Q for every reader of the table (the Gather, and a tied LM head's Transpose)."""
    old = embedding.table
    array = const_array(old)
    new = new_initializer(graph, f"{old.name}_rotated", array.astype(np.float64) @ rotation, array.dtype)
    old.replace_all_uses_with(new)
    drop_if_unused(graph, old)
    embedding.table = new

"""How an offset grid's per-block offsets reach MatMulNBits (`quantize` with `source_grid`).

A weight on an offset grid (llama.cpp's Q4_1, `source_grid.py`) is, per output column n and block β
of g = 32 input rows,

    Ŵ[k, n] = s[n, β]·(q[k, n] − 2^(b−1)) + c[n, β],

and MatMulNBits holds only integer zero points (ORT's float ones dequantize the whole weight on
every call). Two lowerings, both reading the input's block sums σ_β = Σ_{k∈β} x_k:

- folded (`source_grid=true`, the default): c = s·(2^(b−1) − z) + ρ with the integer zero point
  z = clip(round(2^(b−1) − c/s), 0, L) (L = 2^b − 1), so |ρ| ≤ s/2 unless z is clipped. z goes into
  MatMulNBits' zero points; ρ becomes extra weight rows read by σ appended to the input:
  x' = [x, σ] (K' = K + K/g) and W' = [[Ŵ with c − ρ], [ρᵀ]], the rows of ρᵀ quantized on a b-bit
  grid of their own, asymmetric per block of g rows and column, over a range that holds 0:
  ρ̂ − ρ ≤ range/(2L). One MatMulNBits and its block sums (Reshape, ReduceSum, Concat); at
  accuracy level 4 σ is quantized to int8 in blocks of its own, like every input block.
  SmolLM2 (Q4_1) int4 decode 1.17× faster than the exact form, perplexity 39.28 against 39.25.
- exact (`source_grid=exact`, and the `keep-grids` pass): the same integer zero points z in
  MatMulNBits and the residual ρ kept in float, x·Ŵ = MatMulNBits(x) + σ·ρᵀ, a float MatMul of
  the block sums and an Add after it (Reshape, ReduceSum, MatMul, Add). Ŵ is W to the bit (s and
  m are float16 values in a GGUF file, so s·(q − z) and ρ are exact in float32); only the sum's
  order changes. Taking z out of the float term keeps that term small: with c there in place of ρ
  SmolLM2's logits moved 2.7e-3 at accuracy level 0, with ρ 1.2e-3 (the fused model's own
  reordering: 5e-4).

Where the input's rank is unknown, σ = x·B with B the 0/1 block indicator [K, K/g] (a MatMul,
1.04× slower for SmolLM2's decode than Reshape + ReduceSum).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from xopt.analysis.patterns import PART_OF_QUANTIZED, Linear
from xopt.passes.source_grid import SourceGrid
from xopt.passes.weight_grid import as_blocks, codes_of, fit_blocks, levels
from xopt.rewrite import new_initializer, weight_dtype


def integer_zero_points(grid: SourceGrid) -> tuple[np.ndarray, np.ndarray]:
    """An offset grid's per-block offsets as the nearest integer zero points z and what they leave,
    ρ = c − s·(2^(b−1) − z), both [N, K/g]; |ρ| ≤ s/2 unless z is clipped to [0, L]."""
    middle = 1 << (grid.bits - 1)
    zero = np.clip(np.rint(middle - grid.offset / grid.scale), 0, levels(grid.bits))
    return zero, grid.offset - grid.scale * (middle - zero)


def fold_offsets(grid: SourceGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray, SourceGrid]:
    """The folded lowering of an offset grid: codes [N, K + K/g], scale and zero [N, blocks of K'],
    and the grid with the offsets it computes, s·(2^(b−1) − z) + ρ̂ (its `restored()` is Ŵ)."""
    n = len(grid.codes)
    bits, group, middle = grid.bits, grid.group, 1 << (grid.bits - 1)
    zero, residual = integer_zero_points(grid)
    rows = as_blocks(residual, group)  # [N, ⌈(K/g)/g⌉, g]
    row_scale, row_zero = fit_blocks(rows, bits, "minmax")
    row_codes = codes_of(rows, row_scale, row_zero, bits)
    kept = row_scale[..., None] * (row_codes - row_zero[..., None])  # ρ̂
    offsets = grid.scale * (middle - zero) + kept.reshape(n, -1)[:, : residual.shape[1]]
    codes = np.concatenate([grid.codes, row_codes.reshape(n, -1)[:, : residual.shape[1]]], axis=1)
    scale = np.concatenate([grid.scale, row_scale], axis=1)
    return codes, scale, np.concatenate([zero, row_zero], axis=1), replace(grid, offset=offsets)


def with_block_sums(graph: ir.Graph, linear: Linear, group: int, name: str) -> tuple[ir.Value, int]:
    """[x, σ]: the linear's input with its block sums appended on the last axis, the nodes inserted
    before the linear's node; returns the value and the bytes of new initializers."""
    sums, added = _block_sums(graph, linear, group, name)
    joined = ir.node(
        "Concat",
        [linear.input, sums[-1].outputs[0]],
        attributes={"axis": -1},
        name=f"{name}_with_sums",
        metadata_props=_part_of(linear),
    )
    for node in (*sums, joined):
        graph.insert_before(linear.node, node)
    return joined.outputs[0], added


def with_offset_term(
    graph: ir.Graph, linear: Linear, matmul: ir.Node, offsets: ir.Value, group: int
) -> tuple[ir.Node, int]:
    """The exact lowering: the node adding σ·ρᵀ (`offsets`: ρᵀ [K/g, N], what MatMulNBits' zero
    points leave) to its output; the nodes before it go in ahead of the linear's MatMul. Returns it
    and the bytes of new initializers (the block sums' shape constants, shared between linears)."""
    sums, added = _block_sums(graph, linear, group, matmul.name)
    term = ir.node(
        "MatMul", [sums[-1].outputs[0], offsets], name=f"{matmul.name}_offset_term", metadata_props=_part_of(linear)
    )
    total = ir.node(
        "Add", [matmul.outputs[0], term.outputs[0]], name=f"{matmul.name}_with_offsets", metadata_props=_part_of(linear)
    )
    for node in (matmul, *sums, term):
        graph.insert_before(linear.node, node)
    return total, added


def _block_sums(graph: ir.Graph, linear: Linear, group: int, name: str) -> tuple[list[ir.Node], int]:
    """The nodes computing σ [..., K/g] from the linear's input (not inserted; marked part of the
    linear's quantized form, `PART_OF_QUANTIZED`), and the bytes of new initializers; constants that
    depend only on the shape are shared between linears."""
    k, dtype = linear.in_features, weight_dtype(linear.weight)
    blocks, added = k // group, 0

    def shared(key: str, array: np.ndarray, kind) -> ir.Value:
        nonlocal added
        if key not in graph.initializers:
            added += new_initializer(graph, key, array, kind).const_value.nbytes
        return graph.initializers[key]

    if linear.input.shape is None:
        rows = np.arange(k)[:, None] // group == np.arange(blocks)[None, :]
        indicator = shared(f"block_indicator_{k}x{group}_{dtype.name}", rows, dtype)
        sums = ir.node("MatMul", [linear.input, indicator], name=f"{name}_block_sums", metadata_props=_part_of(linear))
        return [sums], added
    rank = len(linear.input.shape)
    target = np.array([0] * (rank - 1) + [blocks, group])
    shape = shared(f"blocks_shape_{rank}x{blocks}x{group}", target, np.int64)
    split = ir.node("Reshape", [linear.input, shape], name=f"{name}_blocks", metadata_props=_part_of(linear))
    axis = shared("block_sum_axis", np.array([-1]), np.int64)
    total = ir.node(
        "ReduceSum",
        [split.outputs[0], axis],
        attributes={"keepdims": 0},
        name=f"{name}_block_sums",
        metadata_props=_part_of(linear),
    )
    return [split, total], added


def _part_of(linear: Linear) -> dict[str, str]:
    """Node metadata: part of the linear's quantized form, not a linear of the model (a MatMul on a
    constant here is one `find_linears` skips)."""
    return {PART_OF_QUANTIZED: linear.name}

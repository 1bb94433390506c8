"""How an offset grid's per-block offsets reach MatMulNBits (`quantize` with `source_grid`).

A weight on an offset grid (llama.cpp's Q4_1, `source_grid.py`) is, per output column n and block β
of g = 32 input rows,

    Ŵ[k, n] = s[n, β]·(q[k, n] − 2^(b−1)) + c[n, β],

and MatMulNBits holds only integer zero points (ORT's float ones dequantize the whole weight on
every call). Two lowerings, both reading the input's block sums σ_β = Σ_{k∈β} x_k:

- folded (`source_grid=true`, the default): c = s·(2^(b−1) − z) + ρ with the integer zero point
  z = clip(round(2^(b−1) − c/s), 0, L) (L = 2^b − 1), so |ρ| ≤ s/2 unless z is clipped. z goes into
  MatMulNBits' zero points; ρ becomes extra weight rows read by σ appended to the input. The rows
  come in `RESIDUAL_ROW_SETS` = 2 sets, each on a b-bit grid of its own (asymmetric per block of g
  rows and column, over a range that holds 0) fitted to what the sets before it leave:
  ρ̂ = ρ̂₁ + ρ̂₂, |ρ − ρ̂₁| ≤ range/(2L), |ρ − ρ̂| ≤ range/(2L²). Each set reads its own copy of σ,
  every copy but the last padded with zeros to whole blocks, so no block of rows (nor, at accuracy
  level 4, of the int8 input) mixes two sets: x' = [x, σ, 0, σ] and W' = [[Ŵ with c − ρ], [ρ̂₁ᵀ],
  [0], [ρ̂₂ᵀ]]. One MatMulNBits and its block sums (Reshape, ReduceSum, Pad, Concat). SmolLM2
  (Q4_1, its Q8_0 head kept) at accuracy level 4, KL per token from the file's float model over
  8 windows of 512 tokens: 0.00321 with two sets, 0.00465 with one, 0.00317 exact (llama.cpp on
  the file: 0.00328); at level 0 (float arithmetic) two sets and exact are one model (perplexity
  38.681 against 38.683; one set 38.746). The second set's rows (3–5% more weight bytes) cost
  2–3% of decode speed (paired runs against one set; the exact form 5% in the same run).
- exact (`source_grid=exact`, and the `keep-grids` pass): the same integer zero points z in
  MatMulNBits and the residual ρ kept in float, x·Ŵ = MatMulNBits(x) + σ·ρᵀ, a float MatMul of
  the block sums and an Add after it (Reshape, ReduceSum, MatMul, Add). Ŵ is W to the bit (s and
  m are float16 values in a GGUF file, so s·(q − z) and ρ are exact in float32); only the sum's
  order changes. Taking z out of the float term keeps that term small: with c there in place of ρ
  SmolLM2's logits moved 2.7e-3 at accuracy level 0, with ρ 1.2e-3 (the fused model's own
  reordering: 5e-4).

Where the input's rank is unknown, σ's copies come from one MatMul, x·B with B the 0/1 block
indicator [K, K/g] laid out once per copy with its zero padding (1.04× slower for SmolLM2's decode
than Reshape + ReduceSum).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from xopt.analysis.patterns import PART_OF_QUANTIZED, Linear
from xopt.passes.source_grid import SourceGrid
from xopt.passes.weight_grid import as_blocks, codes_of, dequantize, fit_blocks, levels
from xopt.rewrite import new_initializer, weight_dtype

RESIDUAL_ROW_SETS = 2


def integer_zero_points(grid: SourceGrid) -> tuple[np.ndarray, np.ndarray]:
    """An offset grid's per-block offsets as the nearest integer zero points z and what they leave,
    ρ = c − s·(2^(b−1) − z), both [N, K/g]; |ρ| ≤ s/2 unless z is clipped to [0, L]."""
    middle = 1 << (grid.bits - 1)
    zero = np.clip(np.rint(middle - grid.offset / grid.scale), 0, levels(grid.bits))
    return zero, grid.offset - grid.scale * (middle - zero)


def fold_offsets(grid: SourceGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray, SourceGrid]:
    """The folded lowering of an offset grid: codes [N, K + R] (R: the rows of every set), scale
    and zero [N, blocks of K + R], and the grid with the offsets it computes, s·(2^(b−1) − z) + ρ̂
    (its `restored()` is Ŵ). ρ̂ is the sum of `RESIDUAL_ROW_SETS` sets of K/g rows, each on its own
    grid of what the sets before it leave; every set but the last is padded to whole blocks, rows
    that read the zeros padding σ's copies (`with_block_sums`)."""
    zero, residual = integer_zero_points(grid)
    n, m = residual.shape  # m = K/g block sums
    codes, scale, zeros, kept = [grid.codes], [grid.scale], [zero], np.zeros_like(residual)
    for index in range(RESIDUAL_ROW_SETS):
        rows = as_blocks(residual - kept, grid.group)  # [N, ⌈m/g⌉, g]
        row_scale, row_zero = fit_blocks(rows, grid.bits, "minmax")
        row_codes = codes_of(rows, row_scale, row_zero, grid.bits)
        kept += dequantize(row_codes, row_scale, row_zero).reshape(n, -1)[:, :m]
        whole = index < RESIDUAL_ROW_SETS - 1
        codes.append(row_codes.reshape(n, -1)[:, : None if whole else m])
        scale.append(row_scale)
        zeros.append(row_zero)
    offsets = grid.scale * ((1 << (grid.bits - 1)) - zero) + kept
    return np.concatenate(codes, 1), np.concatenate(scale, 1), np.concatenate(zeros, 1), replace(grid, offset=offsets)


def with_block_sums(graph: ir.Graph, linear: Linear, group: int, name: str) -> tuple[ir.Value, int]:
    """[x, σ, 0, …, σ]: the linear's input with `RESIDUAL_ROW_SETS` copies of its block sums
    appended on the last axis, every copy but the last padded with zeros to whole blocks of g (what
    `fold_offsets`' rows read), the nodes inserted before the linear's node; returns the value and
    the bytes of new initializers."""
    sums, pieces, added = _block_sums(graph, linear, group, name, RESIDUAL_ROW_SETS)
    joined = ir.node(
        "Concat",
        [linear.input, *pieces],
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
    sums, (block_sums,), added = _block_sums(graph, linear, group, matmul.name, copies=1)
    term = ir.node("MatMul", [block_sums, offsets], name=f"{matmul.name}_offset_term", metadata_props=_part_of(linear))
    total = ir.node(
        "Add", [matmul.outputs[0], term.outputs[0]], name=f"{matmul.name}_with_offsets", metadata_props=_part_of(linear)
    )
    for node in (matmul, *sums, term):
        graph.insert_before(linear.node, node)
    return total, added


def _block_sums(
    graph: ir.Graph, linear: Linear, group: int, name: str, copies: int
) -> tuple[list[ir.Node], list[ir.Value], int]:
    """The nodes computing `copies` copies of σ [..., K/g] from the linear's input, every copy but
    the last padded with zeros to whole blocks of g (not inserted; marked part of the linear's
    quantized form, `PART_OF_QUANTIZED`), the values holding the copies in order, and the bytes of
    new initializers; constants that depend only on the shape are shared between linears."""
    k, dtype = linear.in_features, weight_dtype(linear.weight)
    blocks, added = k // group, 0
    padding = -blocks % group
    metadata = _part_of(linear)

    def shared(key: str, array: np.ndarray, kind) -> ir.Value:
        nonlocal added
        if key not in graph.initializers:
            added += new_initializer(graph, key, array, kind).const_value.nbytes
        return graph.initializers[key]

    if linear.input.shape is None:  # σ = x·B, B laying out every copy and its padding at once
        rows = np.arange(k)[:, None] // group == np.arange(blocks)[None, :]
        padded = np.concatenate([rows, np.zeros((k, padding), bool)], axis=1)
        layout = np.concatenate([*[padded] * (copies - 1), rows], axis=1)
        indicator = shared(f"block_indicator_{k}x{group}x{copies}_{dtype.name}", layout, dtype)
        sums = ir.node("MatMul", [linear.input, indicator], name=f"{name}_block_sums", metadata_props=metadata)
        return [sums], [sums.outputs[0]], added
    rank = len(linear.input.shape)
    target = np.array([0] * (rank - 1) + [blocks, group])
    shape = shared(f"blocks_shape_{rank}x{blocks}x{group}", target, np.int64)
    split = ir.node("Reshape", [linear.input, shape], name=f"{name}_blocks", metadata_props=metadata)
    axis = shared("block_sum_axis", np.array([-1]), np.int64)
    total = ir.node(
        "ReduceSum",
        [split.outputs[0], axis],
        attributes={"keepdims": 0},
        name=f"{name}_block_sums",
        metadata_props=metadata,
    )
    nodes, block_sums = [split, total], total.outputs[0]
    if copies == 1 or padding == 0:
        return nodes, [block_sums] * copies, added
    pads = shared(f"block_sums_pads_{rank}x{padding}", np.array([0] * (2 * rank - 1) + [padding]), np.int64)
    pad = ir.node("Pad", [block_sums, pads], name=f"{name}_block_sums_padded", metadata_props=metadata)
    return [*nodes, pad], [pad.outputs[0]] * (copies - 1) + [block_sums], added


def _part_of(linear: Linear) -> dict[str, str]:
    """Node metadata: part of the linear's quantized form, not a linear of the model (a MatMul on a
    constant here is one `find_linears` skips)."""
    return {PART_OF_QUANTIZED: linear.name}

"""Embedding tables (Gather on a constant table E [V, d]) quantized to 4 or 8 bits, lowered to
com.microsoft.GatherBlockQuantized (lossy).

Each row of E is quantized in blocks of g consecutive columns on the grid of `weight_grid`
(scale and integer zero point per block), Ê[v, j] = s[v, b]·(q[v, j] − z[v, b]), b = ⌊j / g⌋.
The op gathers the packed rows and dequantizes only those, so the output is Ê[ids] and memory
and file hold d·bits/8 bytes a row plus the block parameters. Layout (ONNX Runtime's CPU kernel,
uint8 data): gather axis 0, quantize axis 1, data [V, d·bits/8] with two 4-bit codes to a byte,
the first in the low nibble; scales [V, d/g]; zero points [V, ⌈(d/g)·bits/8⌉] packed the same
way — the byte layout of MatMulNBits, whose weight rows are output channels as E's rows are.
The kernel reads whole blocks: when the width is not a multiple of g, g is halved until it is
(down to 16; a table whose width is not a multiple of 16 stays in float).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from xopt.analysis.graph_view import const_array
from xopt.analysis.patterns import Embedding
from xopt.passes.source_grid import SOURCE_BLOCK, source_grid
from xopt.passes.weight_grid import as_blocks, codes_of, dequantize, fit_blocks, pack_matmul_nbits
from xopt.rewrite import drop_if_unused, new_initializer, replace_node

CONTRIB = "com.microsoft"


def table_group(embedding: Embedding, group: int) -> int | str:
    """The block size for the table: `group`, halved (down to 16, the kernel's least) until it
    divides the width; or why the table cannot be quantized."""
    table = const_array(embedding.table)
    if table is None or table.dtype != np.float32:
        return "not a float32 constant table"
    block = group
    while table.shape[1] % block and block > 16:
        block //= 2
    return block if table.shape[1] % block == 0 else f"width {table.shape[1]} is not a multiple of 16"


@dataclass
class QuantizedTable:
    """A table's GatherBlockQuantized initializers and what the rounding cost."""

    packed: np.ndarray  # [V, d·bits/8]
    scale: np.ndarray  # [V, d/g]
    packed_zero: np.ndarray  # [V, ⌈(d/g)·bits/8⌉]
    bits: int
    group: int
    error: float  # ‖E − Ê‖ / ‖E‖
    origin: str  # the grid: the table's own, or the fit's


def quantize_table(stored: np.ndarray, bits: int, group: int, fit: str, keep_source: bool = True) -> QuantizedTable:
    """E [V, d] on a `bits`-bit grid in blocks of `group` along each row. With `keep_source` a table
    on a symmetric grid of its own (a GGUF Q8_0 table: `source_grid`) keeps it; the kernel takes
    integer zero points, so an offset grid does not."""
    table = stored.astype(np.float64)
    blocks = as_blocks(table, group)
    grid = source_grid(stored.T, bits) if keep_source and group == SOURCE_BLOCK else None
    if grid is not None and grid.offset is None:
        codes, scale = as_blocks(grid.codes.astype(np.float64), group), grid.scale
        zero, origin = np.full(scale.shape, float(1 << (bits - 1))), f"its own {grid.form} grid"
    else:
        scale, zero = fit_blocks(blocks, bits, fit)
        codes, origin = codes_of(blocks, scale, zero, bits), f"{fit} fit"
    error = float(np.linalg.norm(dequantize(codes, scale, zero).reshape(table.shape) - table) / np.linalg.norm(table))
    packed, packed_zero = pack_matmul_nbits(codes, zero, bits)
    rows = table.shape[0]
    return QuantizedTable(packed.reshape(rows, -1), scale, packed_zero.reshape(rows, -1), bits, group, error, origin)


def lower_gather(graph: ir.Graph, embedding: Embedding, table: QuantizedTable) -> tuple[int, int]:
    """Replace the Gather by GatherBlockQuantized reading `table`; returns (bytes before, bytes after)."""
    name, bits = embedding.table.name or "embedding", table.bits
    stored_bytes = const_array(embedding.table).nbytes
    inputs = [
        new_initializer(graph, f"{name}_q{bits}", table.packed, np.uint8),
        embedding.node.inputs[1],
        new_initializer(graph, f"{name}_scales", table.scale, np.float32),
        new_initializer(graph, f"{name}_zero_points", table.packed_zero, np.uint8),
    ]
    node = ir.node(
        "GatherBlockQuantized",
        inputs,
        attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": table.group, "bits": bits},
        domain=CONTRIB,
        name=f"{embedding.node.name or name}_q{bits}",
    )
    replace_node(graph, embedding.node, node)
    drop_if_unused(graph, embedding.table)
    return stored_bytes, sum(inputs[i].const_value.nbytes for i in (0, 2, 3))

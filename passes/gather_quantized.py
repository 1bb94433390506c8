"""Embedding tables (Gather on a constant table E [V, d]) quantized to 4 or 8 bits (lossy).

Each row of E is quantized in blocks of g consecutive columns on the grid of `weight_grid`
(scale and integer zero point per block), Ê[v, j] = s[v, b]·(q[v, j] − z[v, b]), b = ⌊j / g⌋.
Only the gathered rows are dequantized, so the output is Ê[ids] and memory and file hold
d·bits/8 bytes a row plus the block parameters.

Two lowerings, both gathering the rows first:
- 8 bits: standard ONNX operators on the table stored as [V, d/g, g] codes, scales and zero points
  as [V, d/g, 1]: Gather the codes, Cast to float, Sub the gathered zero points, Mul the gathered
  scales, Reshape to [..., d]. A symmetric grid (z = 128 everywhere: a GGUF Q8_0 table kept as it
  came) stores int8 codes q − 128 and drops the zero points. ONNX Runtime's GatherBlockQuantized
  computes the same rows, but MiniLM's int8 model with it ran 1.017–1.032× the time of the same
  model with these operators (six interleaved runs of 100 rounds at 1×128, both orders, an
  AVX-512 Xeon), though ORT's profile gives the op only 54 µs; with these operators the model is
  within about 1% of the float table's (SmolLM2 int4, prefill and decode: a tie).
  A table tied to an LM head that `quantize` made an 8-bit MatMulNBits holding the same codes,
  scales and zero points (the same grid: a GGUF Q8_0 table kept on its grid, or both rounded
  to nearest) is not stored again: the gather reads the head's initializers, whose rows are the
  table's rows ([V, d/g, g] codes; the [V·d/g] scales and zero points reshaped to [V, d/g, 1];
  absent zero points are MatMulNBits' 128).
- 4 bits, or ids of unknown rank: com.microsoft.GatherBlockQuantized (ONNX Runtime's CPU kernel,
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
    """A table's codes on its grid and what the rounding cost."""

    codes: np.ndarray  # [V, d/g, g] uint8
    scale: np.ndarray  # [V, d/g]
    zero: np.ndarray  # [V, d/g] uint8
    bits: int
    error: float  # ‖E − Ê‖ / ‖E‖
    origin: str  # the grid: the table's own, or the fit's

    @property
    def group(self) -> int:
        return self.codes.shape[2]


def quantize_table(stored: np.ndarray, bits: int, group: int, fit: str, keep_source: bool = True) -> QuantizedTable:
    """E [V, d] on a `bits`-bit grid in blocks of `group` along each row. With `keep_source` a table
    on a symmetric grid of its own (a GGUF Q8_0 table: `source_grid`) keeps it; the lowerings take
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
    return QuantizedTable(codes.astype(np.uint8), scale, zero.astype(np.uint8), bits, error, origin)


@dataclass
class HeadCodes:
    """The initializers of an 8-bit MatMulNBits (a tied LM head) that hold a table's codes on its
    grid: B [V, d/g, g] uint8, scales [V·d/g], zero points [V·d/g] uint8 (None: 128)."""

    codes: ir.Value
    scales: ir.Value
    zero: ir.Value | None


def gathers_with_standard_ops(embedding: Embedding, table: QuantizedTable) -> bool:
    """Whether the table is lowered to standard operators (8 bits, ids of known rank), the lowering
    that can read a tied head's initializers; else GatherBlockQuantized."""
    return table.bits == 8 and embedding.node.inputs[1].shape is not None


def lower_gather(
    graph: ir.Graph, embedding: Embedding, table: QuantizedTable, head: HeadCodes | None = None
) -> tuple[int, int]:
    """Replace the Gather by a gather of the quantized table (8-bit: standard operators, reading
    `head`'s initializers if given; 4-bit: GatherBlockQuantized); returns (bytes before, bytes
    after)."""
    ids = embedding.node.inputs[1]
    name = embedding.table.name or "embedding"
    standard = gathers_with_standard_ops(embedding, table)
    if head is not None and not standard:
        raise ValueError("a table reads a head's codes only at 8 bits, with ids of known rank")
    if standard:
        nodes, stored = _dequantizing_gather(graph, name, ids, table, head)
    else:
        nodes, stored = _gather_block_quantized(graph, name, ids, table)
    for index, node in enumerate(nodes):
        node.name = f"{embedding.node.name or name}_q{table.bits}_{index}"
    graph.insert_before(embedding.node, nodes[:-1])
    stored_bytes = const_array(embedding.table).nbytes
    replace_node(graph, embedding.node, nodes[-1])
    drop_if_unused(graph, embedding.table)
    return stored_bytes, sum(value.const_value.nbytes for value in stored)


def _dequantizing_gather(
    graph: ir.Graph, name: str, ids: ir.Value, table: QuantizedTable, head: HeadCodes | None
) -> tuple[list[ir.Node], list[ir.Value]]:
    """Gather → Cast → (Sub gathered zero points) → Mul gathered scales → Reshape, on [V, d/g, g]."""
    width = table.codes.shape[1] * table.group
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        nodes.append(ir.node(op_type, inputs, attributes=attributes))
        return nodes[-1].outputs[0]

    middle = None  # the zero point of uint8 codes on a symmetric grid, subtracted as a constant
    if head is not None:  # the tied head's initializers, its [V·d/g] vectors read as [V, d/g, 1]
        blocks = new_initializer(graph, f"{name}_block_shape", np.array([*table.scale.shape, 1]), np.int64)
        codes, scales, stored = head.codes, op("Reshape", [head.scales, blocks]), [blocks]
        zero = None if head.zero is None else op("Reshape", [head.zero, blocks])
        if zero is None:
            middle = new_initializer(graph, f"{name}_zero_point", np.array(128.0), np.float32)
            stored.append(middle)
    else:  # a symmetric grid stores int8 q − 128 and no zero points
        symmetric = bool(np.all(table.zero == 128))
        codes = new_initializer(
            graph, f"{name}_q8", table.codes.astype(np.int16) - 128 if symmetric else table.codes,
            np.int8 if symmetric else np.uint8,
        )  # fmt: skip
        scales = new_initializer(graph, f"{name}_scales", table.scale[..., None], np.float32)
        zero = None if symmetric else new_initializer(graph, f"{name}_zero_points", table.zero[..., None], np.uint8)
        stored = [value for value in (codes, scales, zero) if value is not None]
    rows_read = op("Cast", [op("Gather", [codes, ids], axis=0)], to=ir.DataType.FLOAT)
    if zero is not None:
        zero_read = op("Cast", [op("Gather", [zero, ids], axis=0)], to=ir.DataType.FLOAT)
        rows_read = op("Sub", [rows_read, zero_read])
    elif middle is not None:
        rows_read = op("Sub", [rows_read, middle])
    restored = op("Mul", [rows_read, op("Gather", [scales, ids], axis=0)])
    shape = new_initializer(graph, f"{name}_shape", np.array([0] * len(ids.shape) + [width]), np.int64)
    stored.append(shape)
    op("Reshape", [restored, shape])
    return nodes, stored


def _gather_block_quantized(
    graph: ir.Graph, name: str, ids: ir.Value, table: QuantizedTable
) -> tuple[list[ir.Node], list[ir.Value]]:
    rows, bits = len(table.codes), table.bits
    packed, packed_zero = pack_matmul_nbits(table.codes, table.zero, bits)
    stored = [
        new_initializer(graph, f"{name}_q{bits}", packed.reshape(rows, -1), np.uint8),
        new_initializer(graph, f"{name}_scales", table.scale, np.float32),
        new_initializer(graph, f"{name}_zero_points", packed_zero.reshape(rows, -1), np.uint8),
    ]
    node = ir.node(
        "GatherBlockQuantized",
        [stored[0], ids, *stored[1:]],
        attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": table.group, "bits": bits},
        domain=CONTRIB,
    )
    return [node], stored

"""`keep-grids`: store the linears whose weights lie on a 4-bit quantization grid on that grid,
computed in float: an exact pass for models converted from a quantized file (llama.cpp's Q4_0 and
Q4_1 GGUF blocks, which a loader dequantizes to float32).

Such a weight is, per output column n and block β of 32 input rows (`source_grid.py`),

    W[k, n] = s[n, β]·(q[k, n] − z[n, β]) + ρ[n, β],   q ∈ {0, …, 15},  z an integer,

with ρ = 0 on a symmetric grid (Q4_0) and, on an offset grid (Q4_1), what the nearest integer zero
point leaves of the block's float offset, |ρ| ≤ s/2 (`grid_offsets.integer_zero_points`). The
linear becomes MatMulNBits with the codes, scales and zero points at accuracy level 0, which
dequantizes in float32 and multiplies in float32, plus σ·ρᵀ for an offset grid, σ the input's
block sums (Reshape, ReduceSum, MatMul, Add):

    x·W = MatMulNBits(x) + σ·ρᵀ,   σ[β] = Σ_{k∈β} x[k].

s and the block minimum are float16 values in the file, so s·(q − z) and ρ are exact in float32:
the stored weight is W to the bit and only the order of the sums changes (SmolLM2's logits move
1.2e-3, relative 3.8e-5, top-1 unchanged). The file holds half a byte per weight instead of four.

What it trades: a decode step reads an eighth of the weight bytes, a prefill dequantizes every
block again. SmolLM2-135M (its Q4_1 file) after the exact recipe with `fuse(positions=contiguous)`,
2 threads, this Xeon: greedy decode 1.47× faster (65.7 against 44.9 tokens/s, whole generations
of 128 tokens after a 128-token prompt, loads counterbalanced), prefill 1×128 0.88× (177 against
157 ms), file 540 → 197 MB. So it suits generation, and is not in the `exact` recipe, whose
verdicts are timed on prefill as well.

Weights on an 8-bit grid (Q8_0: SmolLM2's tied LM head) stay in float: ORT's MatMulNBits with
8 bits at accuracy level 0 took 91 ms for SmolLM2's head on one decode step against ~5 ms for the
float MatMul. Gemm and weights off any 4-bit grid stay as they are; a model with none on a grid is
refused (nothing to keep). A weight read by several MatMuls is stored once.

The nodes it writes are marked (node metadata) so that a later `quantize` leaves them exact: their
accuracy level stays 0 and the offset terms' MatMuls are not linears to quantize; `quantize` then
takes the linears left in float (the Q8_0 head keeps its own 8-bit grid).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial

import onnx_ir as ir

from xopt.analysis.patterns import Linear, find_linears
from xopt.errors import XoptError
from xopt.passes.quantize import CONTRIB, exact_source_grid_form, float_bytes, lower_on_source_grid, remembered
from xopt.passes.source_grid import source_grid
from xopt.pipeline import Pass, PassResult, register
from xopt.rewrite import WrittenOnce, weight_in_out

GRID_BITS = 4


@register
@dataclass
class KeepGridsPass(Pass):
    name = "keep-grids"
    exact = True
    summary = "store weights that lie on a 4-bit grid (a model from a GGUF file) on it, computed in float"

    def __call__(self, model: ir.Model) -> PassResult:
        graph = model.graph
        own_forms, written = {}, WrittenOnce()  # a weight read by several MatMuls: one form, stored once
        forms, bytes_before, bytes_after = Counter(), {}, 0
        for linear in find_linears(graph):
            if linear.node.op_type != "MatMul":
                continue
            own = remembered(own_forms, linear, (), partial(_own_grid_form, linear))
            if own is None:
                continue
            form, nbits = own
            bytes_before[id(nbits)] = float_bytes(linear)
            bytes_after += lower_on_source_grid(graph, linear, nbits, written)
            forms[form] += 1
        if not forms:
            raise XoptError(
                "keep-grids: no linear's weight lies on a 4-bit grid of 32-row blocks "
                "(it is for models converted from a Q4_0 or Q4_1 file)"
            )
        model.opset_imports.setdefault(CONTRIB, 1)
        explain = [
            f"{count} linear{'s' if count > 1 else ''} → 4-bit on {'their' if count > 1 else 'its'} own {form} grid, "
            f"MatMulNBits at accuracy level 0{', offsets exact' if form == 'offset' else ''}"
            for form, count in forms.items()
        ]
        stats = {
            "linears_kept": sum(forms.values()),
            "bytes_before": sum(bytes_before.values()),
            "bytes_after": bytes_after,
        }
        return PassResult(model, True, stats, explain)


def _own_grid_form(linear: Linear) -> tuple[str, object] | None:
    """The linear's 4-bit grid form (offset or symmetric) and its exact MatMulNBits form, or None."""
    grid = source_grid(weight_in_out(linear), GRID_BITS)
    return None if grid is None else (grid.form, exact_source_grid_form(grid))

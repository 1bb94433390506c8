"""`quantize`: weight-only integer quantization of every linear, lowered to ONNX Runtime's
com.microsoft.MatMulNBits (lossy).

Each MatMul with a constant weight W [K, N] (also one behind a Transpose, such as a tied LM head)
becomes MatMulNBits(x, B, s, z) computing x·Ŵ with Ŵ[k, n] = s[n, b]·(q[k, n] − z[n, b]) on blocks
of `group` input rows (`weight_grid` states the grid and its fits). The codes q come from:
- `rtn`: round to nearest on each block's min/max range;
- `hqq`: HQQ's half-quadratic fit of the grid to the weight, no data needed;
- `gptq`: GPTQ (`gptq.py`) on calibration activations: the second moment Σ x xᵀ of each linear's
  input, gathered in one ONNX Runtime pass over the calibration text (`xopt.calibration`), so
  memory is Σ K² over the distinct inputs; the grid of each group is fitted with HQQ's fit, and
  `act_order` takes the inputs with the most energy first (static groups).
A bias Add after the MatMul stays as it is. The LM head (the linear that writes a graph output)
takes `head_bits` (8 by default: it is the widest matrix of a small LM and the most sensitive;
0 keeps it in float).

MatMulNBits' `accuracy_level` picks its kernel: 0 computes in float, 4 quantizes the activations
to int8 per block and uses integer dot products (faster for decode on CPUs with VNNI, often slower
for long prefill). `accuracy=measure` times the whole model with each (prefill plus decode steps,
`backends/lowering.py`, cached per machine) and keeps the faster; 0 or 4 force one.

Stats: linears quantized, weight bytes before and after, and the mean relative weight error
‖W − Ŵ‖_F / ‖W‖_F over the quantized linears.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import TRANSPARENT_OPS, skip_forward
from xopt.analysis.patterns import Linear, match_linear
from xopt.backends.lowering import LoweringChooser, timed_sequence
from xopt.calibration import calibration_feeds, second_moments
from xopt.errors import XoptError, first_line
from xopt.passes.gptq import gptq
from xopt.passes.weight_grid import as_blocks, codes_of, dequantize, fit_blocks, pack_matmul_nbits
from xopt.pipeline import Pass, PassResult, register
from xopt.rewrite import new_initializer, weight_dtype, weight_in_out

logger = logging.getLogger(__name__)

METHODS = ("rtn", "hqq", "gptq")
ACCURACY_LEVELS = ("measure", "0", "4")
CONTRIB = "com.microsoft"


@register
@dataclass
class QuantizeWeightsPass(Pass):
    name = "quantize"
    exact = False
    summary = "weight-only int4/int8 of every linear → MatMulNBits (rtn, hqq, gptq); kernel chosen by measurement"

    bits: int = 4
    group: int = 32
    method: str = "gptq"
    head_bits: int = 8
    accuracy: str = "measure"
    calibration: str = ""  # text file for gptq; empty: the bundled calibration text
    windows: int = 8  # calibration windows of 512 tokens
    damp: float = 0.01
    act_order: bool = True
    threads: int = 2
    batch: int = 1
    sequence: int = 128

    def __call__(self, model: ir.Model) -> PassResult:
        self._check_options()
        sequence = timed_sequence(find_transformer_structure(model), self.sequence)
        explain: list[str] = []
        linears = self._targets(model, explain)
        if not linears:
            raise XoptError("quantize: the model has no MatMul with a constant weight to quantize")
        model.opset_imports.setdefault(CONTRIB, 1)
        moments = self._moments(model, linears) if self.method == "gptq" else {}
        stats: Counter[str] = Counter()
        errors = []
        for linear, bits in linears:
            w = weight_in_out(linear)
            codes, scale, zero = self._quantize(w.T, moments.get(linear.input.name), bits)
            restored = dequantize(as_blocks(codes, self.group), scale, zero).reshape(len(codes), -1)[:, : w.shape[0]]
            errors.append(np.linalg.norm(restored - w.T) / max(np.linalg.norm(w), 1e-30))
            stats["bytes_before"] += w.size * weight_dtype(linear.weight).itemsize
            stats["bytes_after"] += _lower(model.graph, linear, codes, scale, zero, bits, self.group)
            stats["linears_quantized"] += 1
            shape = f"{w.shape[0]}×{w.shape[1]}"
            explain.append(f"{linear.name}: {shape} → {bits}-bit, relative error {errors[-1]:.4f}")
        stats["mean_relative_error"] = float(np.mean(errors))
        level, note = self._accuracy_level(model, sequence)
        explain.append(note)
        stats["accuracy_level"] = level
        return PassResult(model, True, dict(stats), explain)

    def _check_options(self) -> None:
        if self.bits not in (4, 8):
            raise XoptError(f"quantize: bits={self.bits}: MatMulNBits takes 4 or 8")
        if self.head_bits not in (0, 4, 8):
            raise XoptError(f"quantize: head_bits={self.head_bits}: 4, 8, or 0 to keep the LM head in float")
        if self.group < 16 or self.group & (self.group - 1):
            raise XoptError(f"quantize: group={self.group}: a power of two, at least 16")
        if self.method not in METHODS:
            raise XoptError(f"quantize: unknown method {self.method!r}: one of {', '.join(METHODS)}")
        if str(self.accuracy) not in ACCURACY_LEVELS:
            raise XoptError(f"quantize: accuracy={self.accuracy!r}: one of {', '.join(ACCURACY_LEVELS)}")

    def _targets(self, model: ir.Model, explain: list[str]) -> list[tuple[Linear, int]]:
        """Each linear to quantize with its bit width."""
        outputs = set(model.graph.outputs)
        linears = []
        for node in model.graph:
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            linear = match_linear(node)
            if linear is None:
                continue
            if node.op_type == "Gemm":
                explain.append(f"{linear.name}: not quantized: Gemm (only MatMul is lowered)")
            elif skip_forward(linear.output, TRANSPARENT_OPS | {"Reshape"}) not in outputs:
                linears.append((linear, self.bits))
            elif self.head_bits:
                linears.append((linear, self.head_bits))
            else:
                explain.append(f"{linear.name}: not quantized: LM head (head_bits=0)")
        return linears

    def _moments(self, model: ir.Model, linears: list[Linear]):
        feeds = calibration_feeds(model, self.calibration or None, windows=self.windows)
        return second_moments(model, [linear.input for linear, _ in linears], feeds, threads=self.threads)

    def _quantize(self, w_nk: np.ndarray, moment, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Codes [N, K] and scale, zero [N, blocks] of W [N, K]."""
        if self.method == "gptq":
            return gptq(
                w_nk, moment.matrix, bits=bits, group=self.group, fit="hqq", damp=self.damp, act_order=self.act_order
            )
        blocks = as_blocks(w_nk, self.group)
        scale, zero = fit_blocks(blocks, bits, "minmax" if self.method == "rtn" else "hqq")
        codes = codes_of(blocks, scale, zero, bits).reshape(len(w_nk), -1)[:, : w_nk.shape[1]]
        return codes, scale, zero

    def _accuracy_level(self, model: ir.Model, sequence: int) -> tuple[int, str]:
        if self.accuracy != "measure":
            _set_accuracy(model, int(self.accuracy))
            return int(self.accuracy), f"accuracy_level {self.accuracy} (option)"
        _set_accuracy(model, 0)
        candidate = model.clone()
        _set_accuracy(candidate, 4)
        chooser = LoweringChooser(threads=self.threads, batch=self.batch, sequence=sequence)
        try:
            verdict = chooser.choose("matmulnbits-accuracy-4", _signature(model), model, candidate)
        except Exception as error:  # a kernel ORT cannot run at this shape is not chosen
            return 0, f"accuracy_level 0: level 4 could not be timed ({first_line(error)})"
        level = 4 if verdict.keep else 0
        _set_accuracy(model, level)
        source = "cached" if verdict.cached else "measured"
        return level, f"accuracy_level {level}: level 4 {source} {verdict.speedup:.3f}× against level 0"


def _lower(graph: ir.Graph, linear: Linear, codes, scale, zero, bits: int, group: int) -> int:
    """Replace the linear's MatMul by MatMulNBits; returns the bytes of its new initializers."""
    n, k = codes.shape
    padded = np.zeros((n, scale.shape[1] * group))
    padded[:, :k] = codes
    packed, packed_zero = pack_matmul_nbits(padded.reshape(n, -1, group), zero, bits)
    base = linear.name
    dtype = weight_dtype(linear.weight)
    inputs = [
        linear.input,
        new_initializer(graph, f"{base}_q{bits}", packed, np.uint8),
        new_initializer(graph, f"{base}_scales", scale.reshape(-1), dtype),
        new_initializer(graph, f"{base}_zero_points", packed_zero, np.uint8),
    ]
    node = ir.node(
        "MatMulNBits",
        inputs=inputs,
        attributes={"K": k, "N": n, "bits": bits, "block_size": group, "accuracy_level": 0},
        domain=CONTRIB,
        name=f"{linear.node.name or base}_q{bits}",
    )
    old = linear.node.outputs[0]
    node.outputs[0].name, old.name = old.name, f"{old.name}_float"
    if old.type is not None:
        node.outputs[0].type, node.outputs[0].shape = old.type, old.shape
    graph.insert_after(linear.node, node)
    old.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
    transpose = linear.weight.producer()
    graph.remove(linear.node, safe=True)
    weight = linear.weight
    if transpose is not None and not transpose.outputs[0].uses():
        weight = transpose.inputs[0]
        graph.remove(transpose, safe=True)
    if weight.is_initializer() and not weight.uses() and not weight.is_graph_input():
        graph.initializers.pop(weight.name)  # the float weight goes with its last reader
    return sum(v.const_value.nbytes for v in inputs[1:])


def _set_accuracy(model: ir.Model, level: int) -> None:
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == CONTRIB:
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)


def _signature(model: ir.Model) -> dict:
    shapes = Counter(
        f"{n.attributes.get_int('K')}x{n.attributes.get_int('N')}/{n.attributes.get_int('bits')}/"
        f"{n.attributes.get_int('block_size')}"
        for n in model.graph
        if n.op_type == "MatMulNBits"
    )
    return dict(sorted(shapes.items()))

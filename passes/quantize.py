"""`quantize`: integer quantization of every linear (lossy), in one of two schemes.

`scheme=weight-only` (the default): each MatMul with a constant weight W [K, N] (also one behind a
Transpose, such as a tied LM head) becomes com.microsoft.MatMulNBits(x, B, s, z) computing x·Ŵ
with Ŵ[k, n] = s[n, b]·(q[k, n] − z[n, b]) on blocks of `group` input rows (`weight_grid` states
the grid and its fits), 4 or 8 bits. The codes q come from:
- `rtn`: round to nearest on each block's min/max range;
- `hqq`: HQQ's half-quadratic fit of the grid to the weight, no data needed;
- `gptq`: GPTQ (`gptq.py`) on calibration activations: the second moment Σ x xᵀ of each linear's
  input, gathered in one ONNX Runtime pass over the calibration text (`xopt.calibration`), so
  memory is Σ K² over the distinct inputs; the grid of each group is fitted with HQQ's fit, and
  `act_order` takes the inputs with the most energy first (static groups);
- `awq`: AWQ-style (`awq.py`): per-input-channel scales s searched on the same second moment,
  Ŵ = diag(1/s)·Q(diag(s)·W) with each group's range clipped where that lowers the output error;
  1/s is folded into the op producing the input (a norm's γ), else a Mul.
`symmetric=true` fixes every zero point at 2^(bits−1) (`weight_grid`) and leaves MatMulNBits without
its zero-point input, which ONNX Runtime runs on a faster path on some CPUs (SmolLM2 int4 decode
1.14× on an AVX2 EPYC) for a coarser grid (perplexity 42.14 against 41.30 with zero points).
`source_grid=true` (the default) keeps the grid of a weight that already lies on one of its bit
width, in blocks of 32 (a model converted from a llama.cpp Q4_0, Q4_1 or Q8_0 file): no second
rounding of the codes and scales, whatever the method (`source_grid.py`). A Q4_1 block's float
offset cannot be an integer zero point; it is folded into one (the rest on extra rows that read
the input's block sums in two sets of 4-bit rows, `grid_offsets.py`), or with `source_grid=exact`
kept exactly as a float term of the block sums, 1.05–1.10× slower for SmolLM2's decode (8-bit head;
KL from the float model 0.00317 against 0.00321 folded). `false` re-quantizes such weights.
`symmetric=measure` decides on this machine: the model is timed with both grids, each at its own
best accuracy level (round to nearest stands in for the method: the kernels' time does not depend
on the codes), and the symmetric one is taken only at `SYMMETRIC_MIN_SPEEDUP` or more, a clear
gain for the quality it costs, and near that only if a second measurement reaches it too (the
chooser's `lossy`: the timing noise of one measurement, sd ≈ 0.02, can carry a tie over 1.05×).
MatMulNBits' `accuracy_level` picks its kernel: 0 computes in float, 4 quantizes the activations
to int8 per block and uses integer dot products (faster for decode on CPUs with VNNI, often slower
for long prefill). `accuracy=measure` times the whole model with each (prefill plus decode steps,
`backends/lowering.py`, cached per machine) and keeps the faster (level 4 rounds the activations:
held to `lossy`, like the symmetric grids); 0 or 4 force one. MatMulNBits an exact pass wrote
(`keep-grids`) keep level 0, and their offset terms are not linears to quantize again
(`patterns.PART_OF_QUANTIZED`): after `keep-grids`, `quantize` takes the linears it left in float,
such as a Q8_0 head.

`scheme=dynamic` (8 bits): int8 weights per output channel and activations quantized per tensor
at run time, lowered to DynamicQuantizeMatMul, with smoothing of the activations' outlier
channels chosen per linear on calibration activations (`smoothing`): see `int8_dynamic.py`.

`scheme=static` (8 bits): int8 QDQ with per-column weights and per-tensor activation ranges
fixed from the calibration runs (`activation_range`), by ONNX Runtime's static quantizer: see
`int8_static.py`.

Both int8 schemes store the weight codes as int8 (ORT's u8s8 kernel) or, with `codes=uint8`, as
uint8 q + 128 with zero point 128 (the u8u8 kernel, same grid). `codes=auto` takes uint8 only where
the u8s8 kernel clips pairs of products to 16 bits (x86 without VNNI: `backends/integer_gemm.py`),
so the model computes what the smoothing search simulated; `codes=int8` there is faster and less
accurate (SmolLM2 on an AVX2 EPYC: 1.19× at 1×128, perplexity 41.62 against 40.42, fp32 38.68).

`embedding_bits` 4 or 8 also quantizes the token embedding table (Gather on a constant table)
in blocks of `group` along each row, gathered then dequantized (`gather_quantized.py`: standard
operators at 8 bits, GatherBlockQuantized at 4). A table tied to the LM head, whose 8-bit MatMulNBits
holds the same codes, scales and zero points (a GGUF Q8_0 table kept on its grid by both), is
gathered from the head's initializers: stored once, and its bytes before counted once.

A bias Add after the MatMul stays as it is. The LM head (the linear that writes a graph output)
takes `head_bits` (8 by default: it is the widest matrix of a small LM and the most sensitive;
0 keeps it in float). ORT's `Attention`, which a plain `fuse` gives an encoder, reads its packed
Q/K/V weight itself: no linear holds it, so it stays in float, and the pass says so (a warning,
with its size) and names `fuse(weights=int8|int4)`, which keeps Q/K/V as linears.

`budget` > 0 turns on mixed precision (`mixed_precision.py`): the linears whose quantization
costs the task error most (KL per token for a causal LM, 1 − min sentence cosine for an encoder,
on calibration text: `xopt.task_error`) are kept at higher precision — 8-bit for 4-bit weights,
float for 8-bit ones — until the model's task error is within the budget.

Stats: linears quantized (and protected), weight bytes before and after, and the mean relative
weight error ‖W − Ŵ‖_F / ‖W‖_F over the quantized linears.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import numpy as np
import onnx_ir as ir

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import TRANSPARENT_OPS, const_array, skip_back, skip_forward
from xopt.analysis.patterns import Embedding, Linear, find_linears
from xopt.backends.integer_gemm import u8s8_saturates
from xopt.backends.lowering import LoweringChooser, timed_sequence
from xopt.calibration import activation_samples, calibration_feeds, second_moments
from xopt.errors import XoptError, counted, first_line
from xopt.passes.awq import awq
from xopt.passes.gather_quantized import (
    HeadCodes,
    QuantizedTable,
    gathers_with_standard_ops,
    lower_gather,
    quantize_table,
    table_group,
)
from xopt.passes.gptq import InverseFactor, gptq, inverse_factor
from xopt.passes.grid_offsets import fold_offsets, integer_zero_points, with_block_sums, with_offset_term
from xopt.passes.input_scaling import divide_input
from xopt.passes.int8_dynamic import is_smoothing, lower_dynamic, quantize_dynamic
from xopt.passes.int8_static import CALIBRATIONS, quantize_static_qdq
from xopt.passes.mixed_precision import protect_by_sensitivity
from xopt.passes.source_grid import SourceGrid, source_grid
from xopt.passes.weight_grid import as_blocks, codes_of, fit_blocks, pack_matmul_nbits, restored_in_out
from xopt.pipeline import Pass, PassResult, register
from xopt.progress import progress
from xopt.rewrite import WrittenOnce, new_initializer, replace_linear, set_weight, weight_dtype, weight_in_out
from xopt.task_error import TaskError

logger = logging.getLogger(__name__)

METHODS = ("rtn", "hqq", "gptq", "awq")
SCHEMES = ("weight-only", "dynamic", "static")
ACCURACY_LEVELS = ("measure", "0", "4")
CODE_TYPES = ("auto", "int8", "uint8")
CONTRIB = "com.microsoft"
SYMMETRIC_MIN_SPEEDUP = 1.05
# Node metadata of a MatMulNBits that must compute in float (an exact pass's, `keep-grids`): its
# accuracy_level stays 0 whatever level this pass chooses for its own.
EXACT_LEVEL = "xopt.exact_accuracy_level"


@register
@dataclass
class QuantizeWeightsPass(Pass):
    name = "quantize"
    exact = False
    summary = (
        "int4/int8 linears: weight-only MatMulNBits (rtn, hqq, gptq, awq) or dynamic int8 with smoothing; "
        "mixed precision under a task-error budget"
    )

    bits: int = 4
    group: int = 32
    method: str = "gptq"
    scheme: str = "weight-only"
    smoothing: str = "outliers"  # int8 schemes: outliers, alpha, none, or a SmoothQuant α in [0, 1]
    head_bits: int = 8
    source_grid: bool | Literal["exact"] = True  # weight-only: a weight already on a grid of its bits keeps it
    symmetric: bool | Literal["measure"] = False  # weight-only: zero points fixed at 2^(bits−1), none stored
    embedding_bits: int = 0  # token embedding table: 4 or 8 bits (gather_quantized.py); 0 keeps it float
    budget: float = 0.0  # mixed precision: task error allowed (0: every linear quantized)
    accuracy: str = "measure"
    activation_range: str = "minmax"  # static scheme: minmax or percentile over the calibration runs
    codes: str = "auto"  # int8 schemes' weight codes: int8, uint8 (+128), auto: uint8 where int8 clips
    calibration: str = ""  # text file for gptq, smoothing and sensitivity; empty: the bundled text
    windows: int = 8  # calibration windows of 512 tokens
    damp: float = 0.01
    act_order: bool = True
    threads: int = 2
    batch: int = 1
    sequence: int = 128

    def __call__(self, model: ir.Model) -> PassResult:
        return self.quantize(model)

    def quantize(self, model: ir.Model, shared: SharedForms | None = None) -> PassResult:
        """The pass, reusing (and adding to) `shared`'s forms for the weight tensors it has seen."""
        self._check_options()
        structure = find_transformer_structure(model, heads=False)  # the token table and positions
        sequence = timed_sequence(model, structure, self.sequence)
        explain: list[str] = []
        precision = self._precision(model, explain)
        if not precision:
            raise XoptError("quantize: the model has no MatMul with a constant weight to quantize")
        if self.scheme == "static":
            return self._static(model, precision, explain)
        model.opset_imports.setdefault(CONTRIB, 1)
        symmetric, level = self.symmetric, None  # level: the accuracy level the grid was chosen at
        forms = _Forms(self, model, shared=shared)
        if symmetric == "measure" and all(forms.source_grid(name, bits) for name, bits in precision.items()):
            symmetric = False
            explain.append("symmetric=measure: nothing to choose, every linear keeps its own grid (a quantized source)")
        elif symmetric == "measure":
            symmetric, level = self._measured_symmetry(model, precision, sequence, explain, forms.shared)
        forms.symmetric = symmetric
        smoothing = self.smoothing if self.scheme == "dynamic" else None
        if forms.unsigned:
            explain.append(self._codes_note())
        plan = {name: (bits, smoothing) for name, bits in precision.items()}
        if self.budget > 0:
            plan = self._mixed_precision(model, forms, plan, explain)
        written = WrittenOnce()  # the initializers each form wrote, which a tied table may read
        tied = forms.reading(structure.token_embedding, plan) if self.embedding_bits else []
        stats = forms.lower_all(model.graph, plan, explain, written)
        if self.embedding_bits:
            embedding = structure.token_embedding
            self._quantize_embedding(model.graph, embedding, stats, explain, forms.shared, tied, written)
        stats["linears_protected"] = sum(bits != precision[name] for name, (bits, _) in plan.items())
        if self.scheme == "weight-only":
            stats["symmetric"] = symmetric
        if level is not None:
            _set_accuracy(model, level)
            stats["accuracy_level"] = level
        elif any(map(_level_is_chosen, model.graph)):
            level, note = self._accuracy_level(model, sequence)
            explain.append(note)
            stats["accuracy_level"] = level
        if gathered := _gathered_matmul_weights(model.graph):
            stats["gathered_weights_left"] = sum(v.const_value.size for v in gathered)
            explain.append(
                f"not quantized: {counted(len(gathered), 'weight')} a MatMul reads through a Gather"
                f" ({stats['gathered_weights_left']:,} parameters; a mixture of experts' weights, picked per token)"
            )
        return PassResult(model, True, dict(stats), explain)

    def unsigned_codes(self) -> bool:
        """Whether int8 weights are stored as uint8 q + 128: asked for, or (auto) where this CPU's
        u8s8 GEMM clips pairs of products to 16 bits (`int8_dynamic.py`)."""
        return self.codes == "uint8" or (self.codes == "auto" and u8s8_saturates())

    def _codes_note(self) -> str:
        reason = "codes=uint8" if self.codes == "uint8" else "this CPU's u8s8 GEMM clips pairs of products to 16 bits"
        return f"int8 codes stored as uint8 q + 128, run by the exact u8u8 kernel ({reason})"

    def _check_options(self) -> None:
        if self.scheme not in SCHEMES:
            raise XoptError(f"quantize: unknown scheme {self.scheme!r}: one of {', '.join(SCHEMES)}")
        integer = self.scheme in ("dynamic", "static")
        if self.bits not in (4, 8) or (integer and self.bits != 8):
            raise XoptError(f"quantize: bits={self.bits}: MatMulNBits takes 4 or 8, the {self.scheme} scheme 8")
        if self.embedding_bits not in (0, 4, 8):
            raise XoptError(f"quantize: embedding_bits={self.embedding_bits}: 4, 8, or 0 (tables in float)")
        if self.head_bits not in (0, 4, 8) or (integer and self.head_bits == 4):
            raise XoptError(f"quantize: head_bits={self.head_bits}: 4 (weight-only), 8, or 0 (LM head in float)")
        if self.group < 16 or self.group & (self.group - 1):
            raise XoptError(f"quantize: group={self.group}: a power of two, at least 16")
        if self.method not in METHODS:
            raise XoptError(f"quantize: unknown method {self.method!r}: one of {', '.join(METHODS)}")
        if str(self.accuracy) not in ACCURACY_LEVELS:
            raise XoptError(f"quantize: accuracy={self.accuracy!r}: one of {', '.join(ACCURACY_LEVELS)}")
        if not is_smoothing(self.smoothing):
            raise XoptError(f"quantize: smoothing={self.smoothing!r}: outliers, alpha, none, or a number from 0 to 1")
        if self.budget < 0:
            raise XoptError(f"quantize: budget={self.budget}: a task error, 0 or more")
        if self.codes not in CODE_TYPES:
            raise XoptError(f"quantize: codes={self.codes!r}: one of {', '.join(CODE_TYPES)}")
        if self.scheme == "static" and (self.budget or self.embedding_bits):
            raise XoptError("quantize: the static scheme takes no budget= or embedding_bits= (weight-only, dynamic do)")
        if self.symmetric and self.scheme != "weight-only":
            raise XoptError(
                f"quantize: symmetric={str(self.symmetric).lower()} is for the weight-only scheme "
                "(the int8 schemes' weight grids are symmetric already)"
            )
        if self.activation_range not in CALIBRATIONS:
            raise XoptError(f"quantize: activation_range={self.activation_range!r}: one of {', '.join(CALIBRATIONS)}")

    def _precision(self, model: ir.Model, explain: list[str]) -> dict[str, int]:
        """The bit width of each linear to quantize, by linear name."""
        outputs = set(model.graph.outputs)
        precision = {}
        for linear in find_linears(model.graph):
            if linear.node.op_type == "Gemm":
                explain.append(f"{linear.name}: not quantized: Gemm (only MatMul is lowered)")
            elif weight_dtype(linear.weight) != np.float32 and self.scheme != "weight-only":
                explain.append(f"{linear.name}: not quantized: the {self.scheme} int8 kernels take float32 inputs")
            elif skip_forward(linear.output, TRANSPARENT_OPS | {"Reshape"}) not in outputs:
                precision[linear.name] = self.bits
            elif self.head_bits:
                precision[linear.name] = self.head_bits
            else:
                explain.append(f"{linear.name}: not quantized: LM head (head_bits=0)")
        packed = self._packed_attention_weights(model)
        if packed:
            explain.append(packed)
            logger.warning("%s", packed)
        return precision

    def _packed_attention_weights(self, model: ir.Model) -> str | None:
        """What the ORT `Attention` nodes that read their Q/K/V weights themselves (a plain `fuse`
        packs them) keep in float, with the way out; None when there are none."""
        weights = {
            id(node.inputs[1]): node.inputs[1].const_value.nbytes
            for node in model.graph
            if node.op_type == "Attention" and node.domain == CONTRIB and len(node.inputs) > 1
            if node.inputs[1] is not None and node.inputs[1].const_value is not None
        }
        if not weights:
            return None
        recipe_weights = "int4" if self.scheme == "weight-only" and self.bits == 4 else "int8"
        return (
            f"{counted(len(weights), 'Attention weight')} packed by `fuse` stay in float "
            f"({sum(weights.values()) / 1e6:.1f} MB), out of quantize's reach: `fuse(weights={recipe_weights})` "
            "before `quantize` keeps Q/K/V as linears (the int4 and int8 recipes do)"
        )

    def _quantize_embedding(
        self,
        graph: ir.Graph,
        embedding: Embedding | None,
        stats: Counter,
        explain: list[str],
        shared: SharedForms,
        tied: list[_Form],
        written: WrittenOnce,
    ):
        """The token embedding table → a quantized gather at `embedding_bits` (HQQ's fit; min/max
        for method=rtn). Position tables stay in float (small, and read at every position). `tied`:
        the forms of the linears that read the table (an LM head): its float bytes are counted
        already, and the gather reads the head's codes where they are the table's."""
        if embedding is None:
            explain.append("embedding: not quantized: no token embedding table found")
            return
        shape = "×".join(str(d) for d in embedding.table.shape)
        group = table_group(embedding, self.group)
        if isinstance(group, str):
            explain.append(f"embedding {shape}: not quantized: {group}")
            return
        fit, bits, keep = "minmax" if self.method == "rtn" else "hqq", self.embedding_bits, bool(self.source_grid)
        table = remembered(
            shared.tables, embedding.table, (bits, group, fit, keep),
            lambda: quantize_table(const_array(embedding.table), bits, group, fit, keep_source=keep),
        )  # fmt: skip
        head = _head_codes(tied, table, written) if gathers_with_standard_ops(embedding, table) else None
        before, after = lower_gather(graph, embedding, table, head)
        stats["bytes_before"] += 0 if tied else before
        stats["bytes_after"] += after
        stats["embeddings_quantized"] += 1
        explain.append(
            f"embedding {shape} → {bits}-bit in groups of {group} on {table.origin}, relative error {table.error:.4f}"
            + (", read from the tied LM head's codes (stored once)" if head is not None else "")
        )

    def _static(self, model: ir.Model, precision: dict[str, int], explain: list[str]) -> PassResult:
        """Static int8 QDQ of the chosen linears by ONNX Runtime's quantizer (`int8_static.py`), after
        the same per-linear smoothing as the dynamic scheme, applied in float."""
        linears = [x for x in find_linears(model.graph) if x.name in precision]
        feeds = calibration_feeds(model, self.calibration or None, windows=self.windows)
        before = sum(map(float_bytes, linears))
        if self.smoothing != "none":
            samples = activation_samples(model, [x.input for x in linears], feeds, threads=self.threads)
            labels: Counter = Counter()
            for linear in linears:
                w = weight_in_out(linear)
                form = quantize_dynamic(w, samples[linear.input.name], self.smoothing)
                labels[form.label] += 1
                if form.smoothing is not None:
                    set_weight(model.graph, linear, w * form.smoothing[:, None])
                    linear.node.replace_input_with(0, divide_input(model.graph, linear, form.smoothing))
            explain.append(_smoothing_summary(labels))
        names = [linear.node.name for linear in linears]
        unsigned = self.unsigned_codes()
        if unsigned:
            explain.append(self._codes_note())
        quantized = quantize_static_qdq(model, names, feeds, self.activation_range, unsigned)
        new = [v for name, v in quantized.graph.initializers.items() if name not in model.graph.initializers]
        stats = {
            "linears_quantized": len(linears),
            "bytes_before": before,
            "bytes_after": sum(v.const_value.nbytes for v in new),  # int8 weights, their scales, activation grids
        }
        explain.append(
            f"{len(linears)} linears → static int8 QDQ (per-column {'uint8 ' if unsigned else ''}weights, "
            f"per-tensor activation ranges by {self.activation_range} over {len(feeds)} calibration runs)"
        )
        return PassResult(quantized, True, stats, explain)

    def _mixed_precision(self, model: ir.Model, forms: _Forms, plan: dict, explain: list[str]) -> dict:
        """The plan with the most sensitive linears raised: 4-bit weights to 8 bits, 8-bit ones to float.
        A linear's chosen smoothing also competes with none, on the task error."""
        candidates, fallback = {}, {}
        for name, (bits, smoothing) in plan.items():
            candidates[name] = [(bits, smoothing)]
            if smoothing is not None and forms.form(name, (bits, smoothing)).smoothing != "none":
                candidates[name].append((bits, "none"))
            fallback[name] = (8 if bits == 4 else 0, smoothing)
        error = TaskError(model, self.calibration or None, threads=self.threads)
        build = forms.quantized_copy
        return protect_by_sensitivity(candidates, fallback, build, error, self.budget, explain, error.unit)

    def _measured_symmetry(
        self, model: ir.Model, precision: dict[str, int], sequence: int, explain: list[str], shared: SharedForms
    ) -> tuple[bool, int]:
        """Whether this machine runs the model ≥ SYMMETRIC_MIN_SPEEDUP faster with symmetric grids,
        each grid at its own accuracy level (`_accuracy_level`, on copies rounded to nearest: the
        kernels' time does not depend on the codes), and the accuracy level of the grid taken."""
        rounded = replace(self, method="rtn")
        plan = {name: (bits, None) for name, bits in precision.items()}
        forms, levels = [], []
        for symmetric in (False, True):
            copy = model.clone()
            kept = SharedForms(grids=shared.grids, source_forms=shared.source_forms)
            _Forms(rounded, copy, symmetric, kept).lower_all(copy.graph, plan, [])
            level, note = self._accuracy_level(copy, sequence)
            explain.append(f"{'symmetric' if symmetric else 'zero points'}: {note}")
            forms.append(copy)
            levels.append(level)
        chooser = LoweringChooser(
            threads=self.threads, batch=self.batch, sequence=sequence, min_speedup=SYMMETRIC_MIN_SPEEDUP, lossy=True
        )
        signature = {**_signature(forms[0]), "accuracy_levels": levels}
        verdict = chooser.choose("matmulnbits-symmetric", signature, *forms)
        explain.append(
            f"{'symmetric grids' if verdict.keep else 'zero points kept'}: symmetric at accuracy_level {levels[1]} "
            f"{verdict.source} {verdict.speedup:.3f}× against zero points at accuracy_level {levels[0]} "
            f"(taken at {SYMMETRIC_MIN_SPEEDUP}× or more)"
        )
        return verdict.keep, levels[verdict.keep]

    def _accuracy_level(self, model: ir.Model, sequence: int) -> tuple[int, str]:
        """Sets every MatMulNBits' accuracy_level: the option, or (measure) 4 where it times faster than 0."""
        if self.accuracy != "measure":
            _set_accuracy(model, int(self.accuracy))
            return int(self.accuracy), f"accuracy_level {self.accuracy} (option)"
        _set_accuracy(model, 0)
        candidate = model.clone()
        _set_accuracy(candidate, 4)
        chooser = LoweringChooser(threads=self.threads, batch=self.batch, sequence=sequence, lossy=True)
        try:
            verdict = chooser.choose("matmulnbits-accuracy-4", _signature(model), model, candidate)
        except Exception as error:  # a kernel ORT cannot run at this shape is not chosen
            return 0, f"accuracy_level 0: level 4 could not be timed ({first_line(error)})"
        level = 4 if verdict.keep else 0
        _set_accuracy(model, level)
        return level, f"accuracy_level {level}: level 4 {verdict.source} {verdict.speedup:.3f}× against level 0"


@dataclass
class _Form:
    """A linear quantized one way, computed once and ready to lower into any copy of the model."""

    lower: Callable[..., int]  # (graph, linear, written=WrittenOnce) replaces the linear; returns the new bytes
    relative_error: float  # ‖W − Ŵ‖_F / ‖W‖_F
    detail: str
    smoothing: str | None = None  # the smoothing chosen (dynamic scheme)
    on_source_grid: bool = False  # the weight's own grid, kept (explained once per grid form)
    nbits: _MatMulNBits | None = None  # the MatMulNBits it writes, when that reads the linear's input itself


@dataclass
class SharedForms:
    """Quantized forms kept for the models that read the same weight tensors under the same options
    (copies of one model: fuse times every lowering with its linears quantized, the mixed-precision
    sweep lowers into many copies), so each tensor is quantized once. Keyed by the tensor object
    (copies share it; a rewritten weight is a new one), which is kept alive here so that its id
    cannot come to name another. Source grids, and the forms that keep them, do not depend on the
    method or the symmetry: the symmetry sweep shares them between its two grids and the pass."""

    forms: dict = field(default_factory=dict)  # (tensor, read transposed, symmetric, bits, smoothing) → _Form
    grids: dict = field(default_factory=dict)  # (tensor, read transposed, bits) → SourceGrid | None
    source_forms: dict = field(default_factory=dict)  # (tensor, read transposed, bits) → _Form on its grid
    tables: dict = field(default_factory=dict)  # (table tensor, bits, group, fit, keep source) → QuantizedTable


def remembered(memo: dict, weight: ir.Value | Linear, key: tuple, compute: Callable):
    """`compute()` for this weight and key, computed the first time only (a `SharedForms` memo)."""
    tensor, transposed = _weight_tensor(weight)
    full = (id(tensor), transposed, *key)
    if full not in memo:
        memo[full] = (tensor, compute())
    return memo[full][1]


def _weight_tensor(weight: ir.Value | Linear) -> tuple[object, bool]:
    """The tensor object holding a table or a linear's W (through Identity and a Transpose, as
    `weight_in_out` reads it), and whether W is read transposed."""
    if isinstance(weight, ir.Value):
        value, transposed = skip_back(weight, ("Identity",)), False
    else:
        value = skip_back(weight.weight, ("Identity",))
        transposed = weight.node.op_type == "Gemm" and bool(weight.node.attributes.get_int("transB", 0))
        producer = value.producer()
        if value.const_value is None and producer is not None and producer.op_type == "Transpose":
            value, transposed = skip_back(producer.inputs[0], ("Identity",)), True
    if value.const_value is not None:
        return value.const_value, transposed
    producer = value.producer()
    if producer is not None and "value" in producer.attributes:  # a Constant node's tensor
        return producer.attributes["value"].value, transposed
    return value, transposed  # this model's own value: shared with no copy, still one weight


class _Forms:
    """Each linear's quantized forms (bits, smoothing), computed once (`SharedForms`), calibration
    statistics included."""

    def __init__(
        self, options: QuantizeWeightsPass, model: ir.Model, symmetric: bool = False, shared: SharedForms | None = None
    ):
        self.options = options
        self.symmetric = symmetric  # weight-only grids without zero points
        self.model = model
        self.linears = {linear.name: linear for linear in find_linears(model.graph)}
        self.shared = shared if shared is not None else SharedForms()
        self._statistics: dict = {}  # by input name
        self._factors: dict[str, InverseFactor] = {}  # GPTQ's, by input name
        self.unsigned = options.scheme == "dynamic" and options.unsigned_codes()

    def quantized_copy(self, plan: dict) -> ir.Model:
        copy = self.model.clone()
        self.lower_all(copy.graph, plan, [])
        return copy

    def lower_all(self, graph: ir.Graph, plan: dict, explain: list[str], written: WrittenOnce | None = None) -> Counter:
        """Lower every linear of `graph` named in `plan` in its form (bits, smoothing); 0 bits: left in
        float. A weight read by several linears is stored once (`written`: what each form wrote)."""
        stats: Counter = Counter()
        errors, smoothings, on_source = [], Counter(), {}  # on_source: detail → (count, worst error)
        written, weights_seen = written if written is not None else WrittenOnce(), set()
        planned = [(linear, plan[linear.name]) for linear in find_linears(graph) if plan.get(linear.name, (0,))[0]]
        # every form first: the calibration a form may need runs the model before anything is lowered
        forms = [
            (linear, self.form(linear.name, key))
            for linear, key in progress(planned, unit="linear", description="quantize")
        ]
        for linear, form in forms:
            tensor = _weight_tensor(linear)[0]
            if id(tensor) not in weights_seen:
                weights_seen.add(id(tensor))
                stats["bytes_before"] += float_bytes(linear)
            stats["bytes_after"] += form.lower(graph, linear, written=written)
            stats["linears_quantized"] += 1
            errors.append(form.relative_error)
            if form.smoothing is not None:
                smoothings[form.smoothing] += 1
            if form.on_source_grid:
                count, worst = on_source.get(form.detail, (0, 0.0))
                on_source[form.detail] = (count + 1, max(worst, form.relative_error))
                continue
            shape = f"{linear.in_features}×{linear.out_features}"
            explain.append(f"{linear.name}: {shape} → {form.detail}, relative error {form.relative_error:.4f}")
        for detail, (count, worst) in on_source.items():
            explain.append(f"{counted(count, 'linear')} → {detail}, relative error ≤ {worst:.4f}")
        if errors:
            stats["mean_relative_error"] = float(np.mean(errors))
        if smoothings:
            explain.append(_smoothing_summary(smoothings))
        return stats

    def reading(self, embedding: Embedding | None, plan: dict) -> list[_Form]:
        """The forms of the planned linears whose weight is the token embedding table (a tied LM head)."""
        if embedding is None:
            return []
        table = _weight_tensor(embedding.table)[0]
        planned = [(name, key) for name, key in plan.items() if key[0]]
        return [self.form(name, key) for name, key in planned if _weight_tensor(self.linears[name])[0] is table]

    def source_grid(self, name: str, bits: int) -> SourceGrid | None:
        """The linear's own `bits`-bit grid (`source_grid`) where the options keep one, found once."""
        if self.options.scheme != "weight-only" or not self.options.source_grid:
            return None
        linear = self.linears[name]
        return remembered(self.shared.grids, linear, (bits,), lambda: source_grid(weight_in_out(linear), bits))

    def form(self, name: str, form: tuple[int, str | None]) -> _Form:
        """The linear quantized in `form` (bits, smoothing)."""
        linear = self.linears[name]
        if self.source_grid(name, form[0]) is not None:
            return remembered(self.shared.source_forms, linear, (form[0],), lambda: self._form(linear, *form))
        return remembered(self.shared.forms, linear, (self.symmetric, *form), lambda: self._form(linear, *form))

    def _form(self, linear: Linear, bits: int, smoothing: str | None) -> _Form:
        options, name = self.options, linear.name
        w = weight_in_out(linear)
        grid, nbits = self.source_grid(name, bits), None
        if grid is not None:
            nbits, grid = _source_grid_form(grid, exact=options.source_grid == "exact")
            restored, lower = grid.restored(), partial(_lower, nbits=nbits, input_scale=None)
            detail = f"{bits}-bit on its own {grid.form} grid (a quantized source)"
            if nbits.offsets is not None or nbits.block_sums:
                detail += ", offsets exact" if nbits.offsets is not None else ", offsets folded into zero points"
        elif options.scheme == "dynamic":
            int8 = quantize_dynamic(w, self._statistic(linear, bits), smoothing)
            restored, lower = int8.restored(), partial(lower_dynamic, int8=int8, unsigned=self.unsigned)
            detail = f"{'uint8' if self.unsigned else 'int8'} dynamic, smoothing {int8.label}"
            if int8.simulated_error is not None:
                detail += f" (simulated output error {int8.simulated_error:.2e})"
            smoothing = int8.label
        else:
            restored, nbits, input_scale, detail = self._weight_only(w, linear, bits)
            lower = partial(_lower, nbits=nbits, input_scale=input_scale)
            nbits = nbits if input_scale is None else None  # what a tied table may read: x·Ŵ on x itself
        error = float(np.linalg.norm(restored - w) / max(np.linalg.norm(w), 1e-30))
        return _Form(lower, error, detail, smoothing, on_source_grid=grid is not None, nbits=nbits)

    def _weight_only(
        self, w: np.ndarray, linear: Linear, bits: int
    ) -> tuple[np.ndarray, _MatMulNBits, np.ndarray | None, str]:
        """Ŵ [K, N], its MatMulNBits form, the scale its input is divided by (AWQ) and a description,
        by the pass's method."""
        options, input_scale, detail = self.options, None, f"{bits}-bit"
        statistic = self._statistic(linear, bits)
        if options.method == "awq":
            form = awq(w, statistic.matrix, bits=bits, group=options.group, symmetric=self.symmetric)
            codes, scale, zero, input_scale = form.codes, form.scale, form.zero, form.input_scale
            detail += f", AWQ α {form.alpha:.1f}"
        elif options.method == "gptq":
            factor = self._factors.get(linear.input.name)
            if factor is None:
                factor = inverse_factor(statistic.matrix, damp=options.damp, act_order=options.act_order)
                self._factors[linear.input.name] = factor
            codes, scale, zero = gptq(w.T, factor, bits=bits, group=options.group, fit="hqq", symmetric=self.symmetric)
        else:
            blocks = as_blocks(w.T, options.group)
            fit = "minmax" if options.method == "rtn" else "hqq"
            scale, zero = fit_blocks(blocks, bits, fit, self.symmetric)
            codes = codes_of(blocks, scale, zero, bits).reshape(w.shape[1], -1)[:, : w.shape[0]]
        restored = restored_in_out(codes, scale, zero, options.group)
        if input_scale is not None:
            restored = restored / input_scale[:, None]
        nbits = _MatMulNBits.pack(codes, scale, None if self.symmetric else zero, bits, options.group)
        return restored, nbits, input_scale, detail

    def _statistic(self, linear: Linear, bits: int):
        """The calibration statistic of the linear's input its form needs (None: none). The first
        linear that needs one collects it, in one calibration run, for every linear without a grid
        of its own at `bits` (those whose forms at `bits` will need one too): a model on a quantized
        source runs only for the linears it does not carry on a grid (a GGUF file's Q8_0 head at 4 bits)."""
        options = self.options
        needs = "samples" if options.scheme == "dynamic" and options.smoothing != "none" else None
        if options.scheme == "weight-only" and options.method in ("gptq", "awq"):
            needs = "moments"
        if needs is None:
            return None
        if linear.input.name not in self._statistics:
            feeds = calibration_feeds(self.model, options.calibration or None, windows=options.windows)
            wanted = [linear] + [
                other
                for other in self.linears.values()
                if other.input.name not in self._statistics and self.source_grid(other.name, bits) is None
            ]
            inputs = list({other.input.name: other.input for other in wanted}.values())
            collect = activation_samples if needs == "samples" else second_moments
            self._statistics.update(collect(self.model, inputs, feeds, threads=options.threads))
        return self._statistics[linear.input.name]


@dataclass
class _MatMulNBits:
    """MatMulNBits' initializers for a linear: packed codes [N, blocks, g·bits/8], scales, zero points
    (None: the symmetric grid's 2^(bits−1), MatMulNBits' default); for an offset grid
    (`grid_offsets`), either the grid whose offsets are added as a float term of the input's block
    sums (exact) or `block_sums`: the input gets its block sums appended, read by the last rows."""

    packed: np.ndarray
    scale: np.ndarray
    packed_zero: np.ndarray | None
    k: int
    n: int
    bits: int
    group: int
    offsets: SourceGrid | None = None
    block_sums: bool = False

    @classmethod
    def pack(cls, codes, scale, zero, bits: int, group: int, **offset_form) -> _MatMulNBits:
        n, k = codes.shape
        padded = np.zeros((n, scale.shape[1] * group))
        padded[:, :k] = codes
        packed, packed_zero = pack_matmul_nbits(padded.reshape(n, -1, group), zero, bits)
        return cls(packed, scale.reshape(-1), packed_zero, k, n, bits, group, **offset_form)

    def holds(self, table: QuantizedTable) -> bool:
        """Whether these 8-bit initializers are the table's codes, scales and zero points (the
        table's rows are this weight's output columns: a tied LM head on the table's grid)."""
        if self.bits != 8 or table.bits != 8 or self.offsets is not None or self.block_sums:
            return False
        zero = np.full(self.scale.shape, 128, np.uint8) if self.packed_zero is None else self.packed_zero
        same = (self.packed, table.codes), (self.scale, table.scale.reshape(-1)), (zero, table.zero.reshape(-1))
        return all(ours.shape == theirs.shape and np.array_equal(ours, theirs) for ours, theirs in same)


def _head_codes(tied: list[_Form], table: QuantizedTable, written: WrittenOnce) -> HeadCodes | None:
    """The initializers of a tied LM head's MatMulNBits when they hold the table's codes, or None."""
    for form in tied:
        stored = None if form.nbits is None else written.find(form.nbits)
        if stored is not None and form.nbits.holds(table):
            return HeadCodes(stored[0], stored[1], stored[2] if form.nbits.packed_zero is not None else None)
    return None


def _source_grid_form(grid: SourceGrid, exact: bool) -> tuple[_MatMulNBits, SourceGrid]:
    """The MatMulNBits form of a weight kept on its own grid, and the grid it computes."""
    if grid.offset is None:
        return _MatMulNBits.pack(grid.codes, grid.scale, None, grid.bits, grid.group), grid
    if exact:
        zero, residual = integer_zero_points(grid)
        rest = replace(grid, offset=residual)
        return _MatMulNBits.pack(grid.codes, grid.scale, zero, grid.bits, grid.group, offsets=rest), grid
    codes, scale, zero, computed = fold_offsets(grid)
    return _MatMulNBits.pack(codes, scale, zero, grid.bits, grid.group, block_sums=True), computed


def exact_source_grid_form(grid: SourceGrid) -> _MatMulNBits:
    """A weight on its own grid as MatMulNBits, exactly: integer zero points, offsets kept in float
    (`keep-grids`)."""
    return _source_grid_form(grid, exact=True)[0]


def lower_on_source_grid(graph: ir.Graph, linear: Linear, nbits: _MatMulNBits, written: WrittenOnce) -> int:
    """The linear in `nbits` (`exact_source_grid_form`) at accuracy level 0 (float arithmetic), a
    level that a later `quantize` leaves as it is (`EXACT_LEVEL`); returns the bytes of its new
    initializers (none when `written` holds them already)."""
    return _lower(graph, linear, nbits, None, written, exact_level=True)


def _lower(
    graph: ir.Graph,
    linear: Linear,
    nbits: _MatMulNBits,
    input_scale: np.ndarray | None,
    written: WrittenOnce,
    exact_level: bool = False,
) -> int:
    """Replace the linear's MatMul by MatMulNBits (its input divided by `input_scale` first, if
    any), its initializers written once per form (`written`); returns the bytes of those it added."""
    bits, name = nbits.bits, f"{linear.node.name or linear.name}_q{nbits.bits}"
    stored, added = written.get(nbits, lambda: _stored_form(graph, linear, nbits))
    if nbits.block_sums:
        source, sums_bytes = with_block_sums(graph, linear, nbits.group, name)
        added += sums_bytes
    else:
        source = linear.input if input_scale is None else divide_input(graph, linear, input_scale)
    weights = stored[:-1] if nbits.offsets is not None else stored
    node = ir.node(
        "MatMulNBits",
        inputs=[source, *weights],
        attributes={"K": nbits.k, "N": nbits.n, "bits": bits, "block_size": nbits.group, "accuracy_level": 0},
        domain=CONTRIB,
        name=name,
    )
    if exact_level:
        node.metadata_props[EXACT_LEVEL] = "0"
    if nbits.offsets is not None:
        node, sums_bytes = with_offset_term(graph, linear, node, stored[-1], nbits.group)
        added += sums_bytes
    replace_linear(graph, linear, node)
    return added


def _stored_form(graph: ir.Graph, linear: Linear, nbits: _MatMulNBits) -> list[ir.Value]:
    """A form's initializers: packed codes, scales, zero points if any, then the exact form's
    float offsets [K/g, N] if any."""
    base, dtype = linear.name, weight_dtype(linear.weight)
    values = [
        new_initializer(graph, f"{base}_q{nbits.bits}", nbits.packed, np.uint8),
        new_initializer(graph, f"{base}_scales", nbits.scale, dtype),
    ]
    if nbits.packed_zero is not None:
        values.append(new_initializer(graph, f"{base}_zero_points", nbits.packed_zero, np.uint8))
    if nbits.offsets is not None:
        values.append(new_initializer(graph, f"{base}_offsets", nbits.offsets.offset.T, dtype))
    return values


def float_bytes(linear: Linear) -> int:
    return linear.in_features * linear.out_features * weight_dtype(linear.weight).itemsize


def _smoothing_summary(labels: Counter) -> str:
    return "smoothing chosen: " + ", ".join(f"{label} ×{n}" for label, n in sorted(labels.items()))


def _set_accuracy(model: ir.Model, level: int) -> None:
    for node in filter(_level_is_chosen, model.graph):
        node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)


_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze"})
_GATHERS = frozenset({"Gather", "GatherND"})
_GATHER_SEARCH_DEPTH = 6  # nodes from a weight to its MatMul: layout ops, the Gather, layout ops


def _gathered_matmul_weights(graph: ir.Graph) -> list[ir.Value]:
    """Float weights of rank 3 or more that a MatMul reads through a Gather (a mixture of experts'
    per-token weights): no linear of the quantizer's, so they stay float."""
    return [
        value
        for value in graph.initializers.values()
        if value.dtype in _FLOAT_TYPES and len(value.shape or ()) >= 3 and _gathered_into_matmul(value)
    ]


def _gathered_into_matmul(value: ir.Value) -> bool:
    """Whether a MatMul reads `value` through a Gather, with layout ops around it."""
    frontier = [(value, False)]
    for _ in range(_GATHER_SEARCH_DEPTH):
        reached = []
        for current, gathered in frontier:
            for node, _ in current.uses():
                if node.op_type == "MatMul" and gathered:
                    return True
                if node.op_type in _GATHERS or node.op_type in _LAYOUT_OPS:
                    reached.append((node.outputs[0], gathered or node.op_type in _GATHERS))
        frontier = reached
    return False


def _level_is_chosen(node: ir.Node) -> bool:
    """Whether `node` is a MatMulNBits whose accuracy level this pass chooses (not an exact pass's)."""
    return node.op_type == "MatMulNBits" and node.domain == CONTRIB and EXACT_LEVEL not in node.metadata_props


def _signature(model: ir.Model) -> dict:
    """The MatMulNBits forms the accuracy level is timed on: shape, bits, block, zero points or not."""
    shapes = Counter(
        f"{n.attributes.get_int('K')}x{n.attributes.get_int('N')}/{n.attributes.get_int('bits')}/"
        f"{n.attributes.get_int('block_size')}{'' if len(n.inputs) > 3 and n.inputs[3] is not None else '/symmetric'}"
        for n in filter(_level_is_chosen, model.graph)
    )
    return dict(sorted(shapes.items()))

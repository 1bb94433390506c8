"""Verification: structural validity, output parity, and bisecting a bad pipeline.

Parity compares a candidate's outputs with reference outputs on the same sample inputs. For an
output pair (r, c) we report

    max_abs = max |c − r|,        max_rel = max_abs / max(max |r|, 1)

and, for outputs named `logits` (last axis = vocabulary), the top-1 agreement of argmax over that
axis: the share of all compared positions, pooled over the outputs and input sets (a decode step
of two rows weighs two positions, not as much as a whole prompt). Entries at positions the
inputs' `attention_mask` marks as padding are left out: nothing reads them (every later position
masks them out), and fused attention kernels leave different values there. An exact pass must
keep `max_rel ≤ EXACT_TOLERANCE` on every output: float32 rounding of a reordered computation
stays orders of magnitude below it, while any real change of the function exceeds it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from xopt.backends.onnxruntime import (
    EXTERNAL_DATA_THRESHOLD_BYTES,
    PROTOBUF_LIMIT_BYTES,
    check_session,
    inline_proto,
    model_bytes,
    run,
)
from xopt.errors import XoptError, first_line

logger = logging.getLogger(__name__)

EXACT_TOLERANCE = 1e-4


class VerificationError(XoptError):
    """A model failed a structural check or disagreed with its reference."""


@dataclass(frozen=True)
class Parity:
    """How far a candidate's outputs are from the reference's (worst over all outputs)."""

    max_abs: float
    max_rel: float
    top1_agreed: int = 0  # compared positions whose top-1 token is the reference's
    top1_positions: int = 0  # positions compared (0: no logits among the outputs)

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_agreed / self.top1_positions if self.top1_positions else None

    def within(self, tolerance: float) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= tolerance

    def describe(self) -> str:
        text = f"max abs diff {self.max_abs:.3g} (relative {self.max_rel:.3g})"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {100 * self.top1_agreement:.2f}% of {self.top1_positions} positions"
        return text


# ONNX Runtime contrib ops that ORT registers in the ONNX domain; the onnx checker does not know
# them, so they are checked as custom-domain ops (ORT itself validates them when it loads the model).
ORT_OPS_IN_ONNX_DOMAIN = frozenset({"SimplifiedLayerNormalization"})
# what `fuse` writes in the ONNX domain besides them; the structure analysis does not look into these
_FUSED_ONNX_OPS = frozenset({"Attention", "RotaryEmbedding", "RMSNormalization", *ORT_OPS_IN_ONNX_DOMAIN})


def require_no_opaque_operators(graph: ir.Graph, advice: str) -> None:
    """A one-line error naming the fused operators that hide a block's parts from the structure
    analysis, with `advice` (what to run before them): com.microsoft ones (quantized linears, fused
    attention and norms) and ONNX `Attention` (Q·Kᵀ, the softmax and P·V inside it; read around it,
    an attention sublayer looks like none, so a layer like two)."""
    opaque = {n.op_type for n in graph if n.domain == "com.microsoft" or (n.op_type == "Attention" and not n.domain)}
    if opaque:
        raise XoptError(f"the graph has {', '.join(sorted(opaque))} nodes (fused or quantized): {advice}")


def fused_operators(graph: ir.Graph) -> list[str]:
    """The fused or quantized operator types in `graph`: com.microsoft ones and `fuse`'s ONNX forms."""
    return sorted({n.op_type for n in graph if n.domain == "com.microsoft" or n.op_type in _FUSED_ONNX_OPS})


def check_structure(model: ir.Model) -> None:
    """The onnx checker with strict shape inference; raises VerificationError with the reason.
    The model is unchanged: what the checker reads is `weightless_form(model)`."""
    checked = weightless_form(model)
    try:
        if model_bytes(checked) < PROTOBUF_LIMIT_BYTES - (64 << 20):
            onnx.checker.check_model(inline_proto(checked), full_check=True)
        else:  # over the protobuf limit: the checker reads the model from a file with external data
            with tempfile.TemporaryDirectory(prefix="xopt-check-") as folder:
                path = Path(folder) / "model.onnx"
                ir.save(checked, path, external_data="model.onnx.data")
                onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:
        reason = first_line(error)
        raise VerificationError(f"invalid ONNX graph: {reason}") from error


def weightless_form(model: ir.Model) -> ir.Model:
    """A clone of `model` as the checker is given it: its main-graph weights of
    `EXTERNAL_DATA_THRESHOLD_BYTES` or more declared as graph inputs of their type and shape, not
    carried as data (the checks and shape inference read a weight's type and shape, and values only
    of the small constants that carry shapes, a Reshape's target or a Slice's ends, which stay
    inline; SmolLM2's 551 MB went through the protobuf two or three times per pass, 2.3–6.8 s), and
    ONNX Runtime's contrib ops of the ONNX domain moved to com.microsoft, which the checker takes as
    custom ops."""
    checked = model.clone()
    graph = checked.graph
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes < EXTERNAL_DATA_THRESHOLD_BYTES:
            continue
        graph.initializers.pop(name)
        value.const_value = None
        value.type, value.shape = ir.TensorType(tensor.dtype), ir.Shape(tensor.shape)
        graph.inputs.append(value)
    nodes = [n for n in graph if n.domain in ("", "ai.onnx") and n.op_type in ORT_OPS_IN_ONNX_DOMAIN]
    for node in nodes:
        node.domain = "com.microsoft"
    if nodes:
        checked.opset_imports.setdefault("com.microsoft", 1)
    return checked


def reference_outputs(model: ir.Model, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of `model` in ONNX Runtime with graph optimizations off (the reference)."""
    return references_over(model, [inputs])[0]


def compare(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], padding: np.ndarray | None = None
) -> Parity:
    """Worst-case parity over the outputs, matched by name. When the output sets differ (a pruned
    decoder has fewer cache outputs, renumbered, or narrower ones), only the first outputs are
    compared: the task's logits or hidden state. Logits of the last position only (the
    `last-token-logits` pass) are compared with the reference's last position. `padding` is the
    inputs' attention mask [batch, total]: positions where it is 0 are not compared."""
    reference = {name: _last_positions(array, candidate.get(name)) for name, array in reference.items()}
    if set(reference) != set(candidate) or any(reference[k].shape != candidate[k].shape for k in reference):
        pairs = [(next(iter(reference.items())), next(iter(candidate.values())))]
    else:
        pairs = [((name, reference[name]), candidate[name]) for name in reference]
    max_abs, max_rel, agreements = 0.0, 0.0, []
    for (name, expected), actual in pairs:
        if expected.shape != actual.shape:
            return Parity(float("inf"), float("inf"))
        real = _real_positions(expected, padding)
        if real is not None:
            expected, actual = np.where(real, expected, 0), np.where(real, actual, 0)
        if not np.issubdtype(expected.dtype, np.floating):
            mismatch = float(np.any(expected != actual))
            max_abs, max_rel = max(max_abs, mismatch), max(max_rel, mismatch)
            continue
        expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
        diff = float(np.max(np.abs(actual64 - expected64))) if expected.size else 0.0
        if not np.all(np.isfinite(actual64)) and np.all(np.isfinite(expected64)):
            diff = float("inf")
        scale = max(float(np.max(np.abs(expected64))) if expected.size else 0.0, 1.0)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
        if "logits" in name.lower() and expected.ndim >= 2:  # (batch, sequence, vocabulary)
            agree = expected.argmax(-1) == actual.argmax(-1)
            agreements.append(agree if real is None else agree[real[..., 0]])
    return Parity(max_abs, max_rel, sum(int(a.sum()) for a in agreements), sum(a.size for a in agreements))


def _real_positions(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Where `array` holds values of unpadded tokens, broadcastable to it (None: everywhere).
    Outputs along the sequence are recognised by shape: [batch, heads, total, d] (a KV cache, every
    position of the mask) and [batch, s, …] (logits, hidden states: the mask's last s positions)."""
    if mask is None or mask.ndim != 2 or array.ndim < 3 or array.shape[0] != mask.shape[0] or mask.all():
        return None
    batch, total = mask.shape
    real = mask.astype(bool)
    if array.ndim == 4 and array.shape[2] == total:
        return real[:, None, :, None]
    if array.shape[1] <= total:
        return real[:, total - array.shape[1] :].reshape(batch, array.shape[1], *[1] * (array.ndim - 2))
    return None


def _last_positions(expected: np.ndarray, actual: np.ndarray | None) -> np.ndarray:
    if actual is not None and expected.ndim == actual.ndim == 3 and actual.shape[1] == 1 < expected.shape[1]:
        return expected[:, -1:]
    return expected


def parity(model: ir.Model, inputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Parity:
    """Run `model` on `inputs` and compare with `reference`."""
    return parity_over(model, [inputs], [reference])


def references_over(model: ir.Model, input_sets: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """`reference_outputs` of each input set, from one session."""
    session = check_session(model)
    return [run(session, inputs) for inputs in input_sets]


def parity_over(
    model: ir.Model, input_sets: Sequence[Mapping[str, np.ndarray]], references: Sequence[Mapping[str, np.ndarray]]
) -> Parity:
    """Parity of `model` over several input sets and their references (one session): the largest
    differences, the top-1 agreement over all their positions."""
    return parity_of(outputs_over(model, input_sets), input_sets, references)


def outputs_over(model: ir.Model, input_sets: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The model's outputs on each input set (one session); a model ONNX Runtime cannot run is a
    `VerificationError` naming why."""
    try:
        return references_over(model, input_sets)
    except Exception as error:
        raise VerificationError(f"ONNX Runtime cannot run the model: {first_line(error)}") from error


def parity_of(
    outputs: Sequence[Mapping[str, np.ndarray]],
    input_sets: Sequence[Mapping[str, np.ndarray]],
    references: Sequence[Mapping[str, np.ndarray]],
) -> Parity:
    """Parity of outputs over several input sets against their references: the largest
    differences, the top-1 agreement over all their positions."""
    results = [
        compare(ref, out, inputs.get("attention_mask"))
        for out, inputs, ref in zip(outputs, input_sets, references, strict=True)
    ]
    return Parity(
        max(r.max_abs for r in results),
        max(r.max_rel for r in results),
        sum(r.top1_agreed for r in results),
        sum(r.top1_positions for r in results),
    )


def bisect_passes(
    model: ir.Model,
    passes: Sequence[Callable[[ir.Model], object]],
    inputs: Mapping[str, np.ndarray],
    tolerance: float = EXACT_TOLERANCE,
) -> int | None:
    """Index of the first pass after which `model` no longer agrees with itself, or None.

    Binary search over pipeline prefixes (each run on a fresh clone), assuming a pipeline stays
    broken once a pass has broken it: log2(len(passes)) + 1 pipeline runs instead of one per pass.
    """
    reference = reference_outputs(model, inputs)

    def broken_after(count: int) -> bool:
        candidate = model.clone()
        for step in passes[:count]:
            candidate = step(candidate).model
        try:
            return not parity(candidate, inputs, reference).within(tolerance)
        except VerificationError:
            return True

    if not broken_after(len(passes)):
        return None
    low, high = 0, len(passes)  # invariant: prefix `low` is good, prefix `high` is broken
    while high - low > 1:
        middle = (low + high) // 2
        if broken_after(middle):
            high = middle
        else:
            low = middle
    return high - 1

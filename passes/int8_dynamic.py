"""Dynamic int8 linears (lossy): int8 weights per output channel, activations quantized to uint8
per tensor at run time, with SmoothQuant-style smoothing; lowered to com.microsoft's
DynamicQuantizeMatMul (integer GEMM, then one float rescale).

A bias Add after the MatMul is absorbed into the kernel.

Weights, per output column n of W [K, N] (symmetric): w_n = max_k |W[k, n]| / 127,
q[k, n] = round(W[k, n] / w_n) ∈ [−127, 127].

Activations, per tensor on every run (ONNX DynamicQuantizeLinear): a = (max(0, max x) − min(0, min x)) / 255,
z = round(−min(0, min x) / a), x̂ = a·(clip(round(x / a) + z, 0, 255) − z). One outlier channel sets
a for the whole tensor, so every other channel's error grows with it.

Smoothing moves that range into the weights, exactly in real arithmetic:
x·W = (x·diag(1/s))·(diag(s)·W), with per input channel j, from max|X_j| over calibration data:

- `outliers` (the default): s_j = max(1, max|X_j| / T) with T the range of the (k+1)-th widest
  channel: only the k widest channels are scaled down to T (their weight rows scaled up);
- `alpha` (SmoothQuant, Xiao et al., 2023): s_j = max|X_j|^α / max_n |W[j, n]|^(1−α), α from {0, ¼, ½, ¾};
- a number: SmoothQuant with that α; `none`: s = 1.

Each linear takes the candidate (k ∈ {1, 2, 4, 8, 16, 32} or none; or α) whose simulated output
error ‖X·W − x̂·Ŵ‖² / ‖X·W‖² on calibration activations is smallest: the run-time quantization
above reproduced in numpy with each calibration run's own range (ORT's DynamicQuantizeLinear
rounds half to even, as np.rint does). Why `outliers` is the default, measured on MiniLM (cosine
of sentence embeddings to fp32, min / mean): none 0.9871 / 0.9939, `alpha` 0.9853 / 0.9936 (its
layer errors are lower than none's, its embeddings are not closer), `outliers` with k = 4 for
every linear 0.9943 / 0.9981. On SmolLM2 `alpha` and `outliers` (k = 16) are alike (perplexity
40.76 and 40.74 against 38.68 in float; none: 60.09).

1/s is folded into the op that produces x where it can (`input_scaling`), else a Mul applies it.

The simulation assumes exact integer sums, which the u8s8 kernel does not compute on x86 CPUs
without VNNI: it clips pairs of products to 16 bits (`backends/integer_gemm.py`; measured on an
AVX2 machine, 1.5–4× the simulated error on the unit tests' linears). There `quantize` stores the
codes as uint8 q + 128 with zero point 128 by default (`codes=auto`) — the same grid, run by the
exact u8u8 kernel — so the model computes what was simulated, as it does with VNNI. On that
machine: MiniLM cosine of sentence embeddings to fp32 (min / mean) int8 codes 0.9952 / 0.9981,
uint8 codes 0.9962 / 0.9984, 7-bit int8 codes (ORT's `reduce_range`, which cannot clip)
0.9900 / 0.9971; SmolLM2 perplexity (8 windows; fp32 38.68) int8 codes 41.62 (KL 0.106), uint8
40.42 (KL 0.071), the int8 codes 1.19× faster at 1×128.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from xopt.analysis.graph_view import const_array
from xopt.analysis.patterns import Linear
from xopt.calibration import ActivationSample
from xopt.passes.input_scaling import divide_input
from xopt.rewrite import WrittenOnce, new_initializer, remove_node_keeping_input, replace_linear

CONTRIB = "com.microsoft"
AUTO_ALPHAS = (0.0, 0.25, 0.5, 0.75)
OUTLIER_COUNTS = (1, 2, 4, 8, 16, 32)
SMOOTHINGS = ("outliers", "alpha", "none")
WEIGHT_LEVEL, ACTIVATION_LEVELS = 127, 255
UNSIGNED_ZERO = 128  # the zero point of codes stored as uint8


@dataclass
class DynamicInt8:
    """A linear's int8 form: codes q [K, N], per-column scale [N], smoothing s [K] (None: none)."""

    codes: np.ndarray
    scale: np.ndarray
    smoothing: np.ndarray | None
    label: str  # the smoothing chosen, e.g. "outliers 4" or "α 0.5"
    simulated_error: float | None  # relative output error on calibration activations

    def restored(self) -> np.ndarray:
        """Ŵ in the linear's original basis, [K, N]: diag(1/s)·(q·w)."""
        w = self.codes * self.scale
        return w if self.smoothing is None else w / self.smoothing[:, None]


def quantize_dynamic(w_in_out: np.ndarray, sample: ActivationSample | None, smoothing: str) -> DynamicInt8:
    """The int8 form of W [K, N] with the candidate of `smoothing` (see SMOOTHINGS) whose simulated
    error on `sample` is smallest."""
    if sample is None:
        if smoothing != "none":
            raise ValueError("smoothing needs calibration activations")
        return DynamicInt8(*_weight_codes(w_in_out), None, "none", None)
    best = None
    for label, factors in _candidates(sample.absmax(), w_in_out, smoothing):
        codes, scale = _weight_codes(w_in_out if factors is None else w_in_out * factors[:, None])
        error = simulated_error(sample, w_in_out, codes * scale, factors)
        if best is None or error < best.simulated_error:
            best = DynamicInt8(codes, scale, factors, label, error)
    return best


def is_smoothing(text: str) -> bool:
    """Whether `text` names a smoothing: one of SMOOTHINGS, or an α from 0 to 1."""
    if text in SMOOTHINGS:
        return True
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


def _candidates(absmax: np.ndarray, w: np.ndarray, smoothing: str) -> list[tuple[str, np.ndarray | None]]:
    """(label, s or None) of each smoothing candidate."""
    if smoothing == "none":
        return [("none", None)]
    if smoothing == "outliers":
        ranked = np.sort(absmax)[::-1]
        clipped = [
            (f"outliers {k}", np.maximum(1.0, absmax / max(ranked[k], 1e-12)))
            for k in OUTLIER_COUNTS
            if k < len(ranked)
        ]
        return [("none", None), *clipped]
    alphas = AUTO_ALPHAS if smoothing == "alpha" else (float(smoothing),)
    return [(f"α {a:g}", _alpha_smoothing(absmax, w, a) if a else None) for a in alphas]


def simulated_error(sample: ActivationSample, w: np.ndarray, w_hat: np.ndarray, smoothing: np.ndarray | None) -> float:
    """‖X·W − x̂·Ŵ‖² / ‖X·W‖² over the sampled rows, x̂ quantized with each run's own range."""
    inverse = 1.0 if smoothing is None else 1.0 / smoothing
    error = reference = 0.0
    for rows, low, high in zip(sample.rows, sample.low, sample.high, strict=True):
        x = rows.astype(np.float64)
        exact = x @ w
        smoothed = x * inverse
        step, zero = _activation_grid(float(np.min(low * inverse)), float(np.max(high * inverse)))
        restored = step * (np.clip(np.rint(smoothed / step) + zero, 0, ACTIVATION_LEVELS) - zero)
        error += float(np.sum((exact - restored @ w_hat) ** 2))
        reference += float(np.sum(exact**2))
    return error / max(reference, 1e-30)


def lower_dynamic(
    graph: ir.Graph, linear: Linear, int8: DynamicInt8, unsigned: bool = False, written: WrittenOnce | None = None
) -> int:
    """Replace the linear's MatMul by DynamicQuantizeMatMul (smoothing applied before it), its codes
    stored as int8, or with `unsigned` as uint8 q + 128 with zero point 128, written once per form
    (`written`, shared by the linears of one graph); returns the bytes of the new initializers."""
    x, written = linear.input, written or WrittenOnce()
    if int8.smoothing is not None:
        x = divide_input(graph, linear, int8.smoothing)
    (codes, scale, *zero), added = written.get(int8, lambda: _stored_codes(graph, linear.name, int8, unsigned))
    bias = const_array(linear.bias) if linear.bias_node is not None else None
    absorbed = bias is not None and bias.ndim == 1  # the kernel adds a 1-D bias itself
    inputs = [x, codes, scale, zero[0] if zero else None, linear.bias if absorbed else None]
    while inputs[-1] is None:  # optional inputs left off the end
        inputs.pop()
    node = ir.node("DynamicQuantizeMatMul", inputs, domain=CONTRIB, name=f"{linear.node.name or linear.name}_int8")
    replace_linear(graph, linear, node)
    if absorbed:
        remove_node_keeping_input(graph, linear.bias_node, node.outputs[0])
    return added


def _stored_codes(graph: ir.Graph, base: str, int8: DynamicInt8, unsigned: bool) -> list[ir.Value]:
    """Codes, scales and (uint8 codes) the zero point 128."""
    if unsigned:
        codes = new_initializer(graph, f"{base}_uint8", int8.codes + UNSIGNED_ZERO, np.uint8)
        zero = [new_initializer(graph, f"{base}_uint8_zero", np.asarray(UNSIGNED_ZERO), np.uint8)]
    else:
        codes, zero = new_initializer(graph, f"{base}_int8", int8.codes, np.int8), []
    return [codes, new_initializer(graph, f"{base}_int8_scale", int8.scale, np.float32), *zero]


def _weight_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.abs(w).max(axis=0) / WEIGHT_LEVEL
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.rint(w / scale), -WEIGHT_LEVEL, WEIGHT_LEVEL), scale


def _alpha_smoothing(absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    weight_max = np.abs(w).max(axis=1)
    s = np.maximum(absmax, 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha)
    return np.where((absmax > 0) & (weight_max > 0), s, 1.0)  # a dead channel keeps scale 1


def _activation_grid(low: float, high: float) -> tuple[float, float]:
    low, high = min(low, 0.0), max(high, 0.0)
    step = (high - low) / ACTIVATION_LEVELS or 1.0
    return step, float(np.clip(np.rint(-low / step), 0, ACTIVATION_LEVELS))

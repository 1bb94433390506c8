"""AWQ-style weight-only quantization (Lin et al., 2024): scale the input channels that carry the
most activation energy up before rounding, so their weights land on a finer relative grid, and
clip each group's range where that lowers the layer's output error.

With H = Σ_t x_t x_tᵀ [K, K] the second moment of the linear's calibration inputs (the statistic
GPTQ reads), the output error of any Ŵ is exactly E(Ŵ) = tr((W − Ŵ)ᵀ H (W − Ŵ)) summed over the
calibration tokens. For W [K, N] (y = x·W):

1. Scale search. For α ∈ {0, 0.1, …, 1}: s_j = (H_jj / mean_j H_jj)^(α/2) (the RMS of input
   channel j, relative), normalised so that √(max s · min s) = 1; quantize diag(s)·W on the
   min/max grid (`weight_grid`; the signed-max one if symmetric), Ŵ = diag(1/s)·Q(diag(s)·W),
   keep the α with the smallest E.
   α = 0 is plain round-to-nearest, so the search is never worse than it on calibration data.
2. Clip search. For each group b of output column n, shrink the min/max range by
   r ∈ {1, 0.95, …, 0.55} and keep the r with the smallest error of that group's rows on its own
   block of H: e_{n,b}ᵀ H_bb e_{n,b} (AWQ's per-group clip, with H's diagonal block in place of
   the sampled inputs; cross-group terms are left out, as AWQ leaves them).

The linear then computes (x·diag(1/s))·Q(diag(s)·W): 1/s is folded into the op producing x
(`input_scaling`), a Mul where nothing can absorb it. Float64 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xopt.passes.weight_grid import as_blocks, codes_of, dequantize, fit_blocks, restored_in_out

ALPHAS = tuple(np.linspace(0.0, 1.0, 11))
CLIP_RATIOS = tuple(np.linspace(1.0, 0.55, 10))


@dataclass
class AwqWeights:
    """Codes [N, K], scale and zero [N, ⌈K/g⌉] of diag(s)·W, and the input scale s [K] (None: α = 0)."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    input_scale: np.ndarray | None
    alpha: float

    def restored(self, group: int) -> np.ndarray:
        """Ŵ in the linear's original basis, [K, N]."""
        w = restored_in_out(self.codes, self.scale, self.zero, group)
        return w if self.input_scale is None else w / self.input_scale[:, None]


def awq(w_in_out: np.ndarray, hessian: np.ndarray, *, bits: int, group: int, symmetric: bool = False) -> AwqWeights:
    """The AWQ form of W [K, N] against the input second moment H [K, K]."""
    energy = np.diag(hessian).astype(np.float64)
    live = energy > 0
    relative = np.where(live, energy / max(float(np.mean(energy[live])) if live.any() else 1.0, 1e-30), 1.0)
    best = None
    for alpha in ALPHAS:
        s = None
        if alpha:
            s = np.where(live, relative ** (alpha / 2), 1.0)
            s = s / np.sqrt(s.max() * s.min())
        candidate = _clipped(
            w_in_out if s is None else w_in_out * s[:, None], hessian, s, bits, group, symmetric, clip=False
        )
        error = output_error(w_in_out, candidate.restored(group), hessian)
        if best is None or error < best[0]:
            best = (error, float(alpha), s)
    _, alpha, s = best
    scaled = w_in_out if s is None else w_in_out * s[:, None]
    result = _clipped(scaled, hessian, s, bits, group, symmetric, clip=True)
    result.alpha = alpha
    return result


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """tr((W − Ŵ)ᵀ H (W − Ŵ)): the squared output error over the calibration tokens."""
    delta = w - w_hat
    return float(np.sum(delta * (hessian @ delta)))


def _clipped(
    scaled: np.ndarray, hessian: np.ndarray, s, bits: int, group: int, symmetric: bool, clip: bool
) -> AwqWeights:
    """diag(s)·W [K, N] on a min/max grid per group, each group's range clipped by the ratio that
    minimises its error on H's diagonal block (when `clip`)."""
    blocks = as_blocks(scaled.T, group)  # [N, groups, g]
    ratios = CLIP_RATIOS if clip else (1.0,)
    k = scaled.shape[0]
    diagonal = _diagonal_blocks(hessian if s is None else hessian / np.outer(s, s), k, group)  # H in the scaled basis
    best_error = np.full(blocks.shape[:2], np.inf)
    scale = np.zeros(blocks.shape[:2])
    zero = np.zeros(blocks.shape[:2])
    for ratio in ratios:
        candidate_scale, candidate_zero = fit_blocks(blocks * ratio, bits, "minmax", symmetric)
        residual = blocks - dequantize(
            codes_of(blocks, candidate_scale, candidate_zero, bits), candidate_scale, candidate_zero
        )
        by_block = residual.transpose(1, 0, 2)  # [groups, N, g]
        error = np.sum(by_block @ diagonal * by_block, axis=-1).T  # e_{n,b}ᵀ H_bb e_{n,b}
        better = error < best_error
        best_error = np.where(better, error, best_error)
        scale, zero = np.where(better, candidate_scale, scale), np.where(better, candidate_zero, zero)
    codes = codes_of(blocks, scale, zero, bits).reshape(len(blocks), -1)[:, :k]
    return AwqWeights(codes, scale, zero, s, 0.0)


def _diagonal_blocks(hessian: np.ndarray, k: int, group: int) -> np.ndarray:
    """H's [g, g] diagonal blocks, [groups, g, g]; a short last block padded with zeros (its
    padded rows multiply nothing)."""
    groups = -(-k // group)
    padded = np.zeros((groups * group, groups * group))
    padded[:k, :k] = hessian
    return np.stack([padded[b * group : (b + 1) * group, b * group : (b + 1) * group] for b in range(groups)])

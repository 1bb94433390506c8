"""GPTQ (Frantar et al., 2023): quantize a linear's weight column by column, each step's error
compensated by the columns not yet quantized, so that the layer's output on calibration inputs
changes least.

With the weight as rows of output channels, W [N, K], and H = Σ_t x_t x_tᵀ [K, K] the second moment
of the layer's inputs on calibration data, GPTQ minimises ‖(W − Ŵ)·X‖² one input column at a time:

    H ← H + λ·mean(diag H)·I                    (dampening; dead inputs, H_kk = 0, get H_kk = 1, W[:, k] = 0)
    U = chol(H⁻¹)ᵀ                               (upper triangular: J·L⁻¹·J with J·H·J = L·Lᵀ, J the reversal)
    for k = 0 … K−1:  ŵ_k = grid(w_k);  e = (w_k − ŵ_k)/U_kk;  W[:, k+1:] −= e · U[k, k+1:]

done lazily at two levels: within a block of B columns in steps of S (each column updates the rest
of its step at once, the rest of the block once per step, one matrix product), and the columns
after the block once per block. The same sums as the column-by-column loop, grouped; W is held as
[K, N] so that a column is a contiguous row.
The grid of each group of g columns (scale and integer zero point per output channel, or a
fixed zero point when `symmetric`, see `weight_grid`) is fitted when the loop enters the group,
on the group's columns as updated so far, so it sees the compensation of earlier groups.

`act_order`: columns are quantized in order of decreasing H_kk (the inputs with the most energy
first, while the most columns remain to absorb their error). Groups must stay contiguous in the
stored order, as MatMulNBits reads them, so their grids are fitted up front on the unquantized
weight ("static groups") and each column uses the grid of the group it is stored in.
Float64 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg.lapack import dtrtri

from xopt.passes.weight_grid import codes_of, fit_blocks

BLOCK_COLUMNS = 128  # B: the columns whose updates to the rest of W wait for one product
STEP_COLUMNS = 32  # S: the columns whose updates to the rest of the block wait (gcd(g, S) of them)


@dataclass(frozen=True)
class InverseFactor:
    """What GPTQ takes from an input moment H, computed once per input (the linears that read one
    input, such as Q, K and V, share it): the order the columns are quantized in, U = chol(H⁻¹)ᵀ of
    the dampened H in that order, and the dead inputs (H_kk = 0)."""

    order: np.ndarray
    upper: np.ndarray
    dead: np.ndarray
    act_order: bool


def inverse_factor(hessian: np.ndarray, *, damp: float = 0.01, act_order: bool = False) -> InverseFactor:
    """The factor of input moment H [K, K] (dampened by λ = `damp`)."""
    k = len(hessian)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    reversed_h = h[np.ix_(order[::-1], order[::-1])]  # J·H·J, J the reversal
    inverse_lower, info = dtrtri(np.linalg.cholesky(reversed_h), lower=1)  # L⁻¹ of J·H·J = L·Lᵀ
    if info:
        raise np.linalg.LinAlgError(f"the Cholesky factor of the input moment is singular (dtrtri info {info})")
    return InverseFactor(order, np.ascontiguousarray(inverse_lower[::-1, ::-1]), dead, act_order)  # J·L⁻¹·J


def gptq(
    w_nk: np.ndarray, factor: InverseFactor, *, bits: int, group: int, fit: str, symmetric: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [N, K], and scale, zero [N, ⌈K/g⌉] of W [N, K] quantized against the input moment
    whose `inverse_factor` is given."""
    n, k = w_nk.shape
    order, upper, act_order = factor.order, factor.upper, factor.act_order
    weight = np.array(w_nk.T, dtype=np.float64, order="C")  # [K, N]: one pass when w_nk is a view of it
    weight[factor.dead] = 0.0
    groups = -(-k // group)
    scale, zero = np.zeros((groups, n)), np.zeros((groups, n))
    if act_order:
        for g in range(groups):
            members = weight[g * group : (g + 1) * group].T[:, None, :]
            scale[g], zero[g] = (a[:, 0] for a in fit_blocks(members, bits, fit, symmetric))
        weight = weight[order]  # in the order quantized

    codes = np.zeros((k, n))
    block = max(BLOCK_COLUMNS // group, 1) * group  # whole groups per block
    step = math.gcd(group, STEP_COLUMNS)  # a group starts at a step: its columns have every earlier update
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = np.zeros((end - start, n))
        for first in range(start, end, step):
            last = min(first + step, end)
            for i in range(first, last):
                g = order[i] // group
                if not act_order and i % group == 0:
                    members = weight[i : i + group].T[:, None, :]
                    scale[g], zero[g] = (a[:, 0] for a in fit_blocks(members, bits, fit, symmetric))
                codes[i] = codes_of(weight[i][:, None], scale[g], zero[g], bits)[:, 0]
                error = (weight[i] - scale[g] * (codes[i] - zero[g])) / upper[i, i]
                weight[i + 1 : last] -= upper[i, i + 1 : last, None] * error
                errors[i - start] = error
            weight[last:end] -= upper[first:last, last:end].T @ errors[first - start : last - start]
        weight[end:] -= upper[start:end, end:].T @ errors
    codes_nk = np.empty((n, k))
    codes_nk[:, order] = codes.T
    return codes_nk, scale.T.copy(), zero.T.copy()

"""Hadamard matrices of the widths transformers use, and the randomised orthogonal rotation built on them.

A Hadamard matrix H of order n has entries ±1 and H·Hᵀ = n·I. Orders here are n = 2^a·m with
- m = 1 or 2: Sylvester's construction, H_2n = [[H_n, H_n], [H_n, −H_n]] (the Kronecker power of H_2);
- m = q + 1, q a prime ≡ 3 (mod 4): Paley's first construction,
      H = I + [[0, 1ᵀ], [−1, J]],   J_ij = χ(j − i),
  χ the quadratic character mod q (1 on non-zero squares, −1 on the rest, 0 at 0); J is skew
  for such q, which makes H Hadamard;
and H_n = H_m ⊗ H_{2^a} (the Kronecker product of Hadamard matrices is Hadamard). This covers the
hidden sizes of common models: 384 = 12·32, 576 = 72·8, 768 = 12·64, 896 = 224·4, 960 = 60·16,
and every power of two.

The rotation is Q = diag(σ)·H/√n with random signs σ (fixed seed): orthogonal, QᵀQ = I, and every
entry of Q is ±1/√n, so each rotated channel mixes all the input channels with equal weight
(which is what spreads an outlier channel over the whole vector). Without a Hadamard matrix of
the order, a random orthogonal matrix (QR of a Gaussian matrix) stands in.
"""

from __future__ import annotations

import numpy as np


def hadamard(order: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of `order` (float64), or None when none is built for it."""
    for power in range(order.bit_length() - 1, -1, -1):
        if order % (1 << power):
            continue
        base = _paley(order >> power) if order >> power > 2 else _sylvester((order >> power) - 1)
        if base is not None:
            return np.kron(base, _sylvester(power))
    return None


def random_rotation(order: int, seed: int) -> tuple[np.ndarray, str]:
    """An orthogonal [order, order] matrix and what it is: a randomised Hadamard matrix, or a
    random orthogonal one when no Hadamard matrix of that order is built."""
    generator = np.random.default_rng(seed)
    matrix = hadamard(order)
    if matrix is None:
        q, r = np.linalg.qr(generator.standard_normal((order, order)))
        return q * np.sign(np.diag(r)), f"random orthogonal (no Hadamard matrix of order {order})"
    signs = generator.choice([-1.0, 1.0], size=order)
    return signs[:, None] * matrix / np.sqrt(order), "randomised Hadamard"


def _sylvester(power: int) -> np.ndarray:
    matrix = np.ones((1, 1))
    for _ in range(power):
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def _paley(order: int) -> np.ndarray | None:
    q = order - 1
    if q < 3 or q % 4 != 3 or any(q % p == 0 for p in range(2, int(q**0.5) + 1)):
        return None
    squares = {(i * i) % q for i in range(1, q)}
    character = np.array([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)])
    index = np.arange(q)
    skew = np.zeros((order, order))
    skew[0, 1:], skew[1:, 0] = 1.0, -1.0
    skew[1:, 1:] = character[(index[None, :] - index[:, None]) % q]
    return skew + np.eye(order)

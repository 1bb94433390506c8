"""Weights that already lie on a block quantization grid: a model converted from a quantized file,
such as llama.cpp's GGUF Q4_0, Q4_1 or Q8_0, whose loader dequantized the blocks to float.

Quantizing such a weight again on a grid of its own choosing rounds it a second time (SmolLM2's
Q4_1 weights: perplexity 42.14 after GPTQ on rotated weights, against 38.68 in float); keeping the
grid it came on costs nothing. Each output column of W [K, N] is read in blocks of g = 32
consecutive input rows (GGUF's block, and MatMulNBits'), and a block w lies on a b-bit grid when
one of these reproduces every value to within a hundredth of a grid step:

- offset grid (Q4_1):  w = s·q + m,  q ∈ {0, …, L},  L = 2^b − 1,  s = (max w − min w)/L,  m = min w
  (the block's least and greatest values are its grid's ends, as in llama.cpp's quantizer);
- symmetric grid (Q4_0): w = s·(q − 2^(b−1)) with the value of largest magnitude at code 0
  (`weight_grid`'s symmetric fit);
- restricted symmetric grid (Q8_0): w = s·c,  c ∈ {−(2^(b−1) − 1), …, 2^(b−1) − 1},  s = max |w| / (2^(b−1) − 1).

A weight takes the first form that holds for all its blocks. Every form is written for MatMulNBits
without zero points, Ŵ[k, n] = s[n, β]·(q[k, n] − 2^(b−1)) + c[n, β] (β = ⌊k/g⌋), where the offset
c is m + 2^(b−1)·s for an offset grid and 0 otherwise: the offset's share of x·Ŵ is
Σ_β c[n, β]·Σ_{k∈β} x_k, a product of the input's block sums with the small matrix c (`quantize`
lowers it so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xopt.passes.weight_grid import as_blocks, codes_of, fit_blocks, levels

ON_GRID = "lies on a quantization grid (a quantized source)"
SOURCE_BLOCK = 32  # GGUF's block of weights along the input dimension
STEP_TOLERANCE = 1e-2  # a value is on the grid within this fraction of the block's grid step
SAMPLE_COLUMNS = 8  # output columns tried before the whole weight


@dataclass
class SourceGrid:
    """A weight's own grid in MatMulNBits' symmetric form plus a per-block offset."""

    form: str  # "offset", "symmetric" or "restricted symmetric"
    bits: int
    codes: np.ndarray  # [N, K] in {0, …, 2^bits − 1}, zero point 2^(bits−1)
    scale: np.ndarray  # [N, K/32]
    offset: np.ndarray | None  # [N, K/32]: c above; None when every block's c is 0

    @property
    def group(self) -> int:
        return SOURCE_BLOCK

    def restored(self) -> np.ndarray:
        """Ŵ [K, N]."""
        n, k = self.codes.shape
        centred = as_blocks(self.codes.astype(np.float64), SOURCE_BLOCK) - (1 << (self.bits - 1))
        blocks = self.scale[..., None] * centred
        if self.offset is not None:
            blocks += self.offset[..., None]
        return blocks.reshape(n, k).T


def source_grid(w_in_out: np.ndarray, bits: int) -> SourceGrid | None:
    """The `bits`-bit grid the weight W [K, N] lies on (see the module docstring), or None."""
    k, n = w_in_out.shape
    if k % SOURCE_BLOCK or bits not in (4, 8):
        return None
    blocks = as_blocks(np.asarray(w_in_out, np.float64).T, SOURCE_BLOCK)  # [N, K/32, 32]
    middle = 1 << (bits - 1)
    for form in ("offset", "symmetric", "restricted symmetric"):
        if not _holds(blocks[:SAMPLE_COLUMNS], bits, form):  # most weights fail on their first columns
            continue
        scale, zero = _fit(blocks, bits, form)
        codes = codes_of(blocks, scale, zero, bits)
        if _on_grid(blocks, codes, scale, zero):
            offset = scale * (middle - zero) if form == "offset" else None
            return SourceGrid(form, bits, codes.reshape(n, k).astype(np.uint8), scale, offset)
    return None


def lies_on_grid(w_in_out: np.ndarray) -> bool:
    """Whether the weight lies on a 4- or 8-bit grid of 32-row blocks."""
    return any(source_grid(w_in_out, bits) is not None for bits in (4, 8))


def _holds(blocks: np.ndarray, bits: int, form: str) -> bool:
    scale, zero = _fit(blocks, bits, form)
    return _on_grid(blocks, codes_of(blocks, scale, zero, bits), scale, zero)


def _on_grid(blocks: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> bool:
    step = np.maximum(np.abs(scale), np.finfo(np.float32).tiny)[..., None]
    return bool(np.all(np.abs(scale[..., None] * (codes - zero[..., None]) - blocks) <= STEP_TOLERANCE * step))


def _fit(blocks: np.ndarray, bits: int, form: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) per block; the offset form's zero is the real −m/s, not an integer."""
    if form == "offset":
        low, high = blocks.min(axis=-1), blocks.max(axis=-1)
        scale = np.where(high > low, (high - low) / levels(bits), 1.0)
        return scale, -low / scale
    if form == "symmetric":
        return fit_blocks(blocks, bits, "minmax", symmetric=True)
    largest = np.abs(blocks).max(axis=-1)
    scale = np.where(largest > 0, largest / (levels(bits - 1)), 1.0)
    return scale, np.full(scale.shape, float(1 << (bits - 1)))

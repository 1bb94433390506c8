"""Block-wise integer grids for weight-only quantization, their fits, and the MatMulNBits layout.

A linear's weight W [K, N] (y = x·W) is quantized per output column n in blocks of g consecutive
input rows (the layout of ONNX Runtime's com.microsoft.MatMulNBits):

    Ŵ[k, n] = s[n, b] · (q[k, n] − z[n, b]),   b = ⌊k / g⌋,   q, z ∈ {0, …, L},  L = 2^bits − 1

with an integer zero point z: ONNX Runtime's fast CPU kernels take only uint8 zero points (a float
zero point falls back to dequantizing the whole weight on every call, ~30× slower for a decode
step on the machines measured). Given (s, z) the codes are q = clip(round(w/s + z), 0, L).

A symmetric grid fixes z = 2^(bits−1) (MatMulNBits' default when it has no zero-point input, which
takes a faster kernel path: SmolLM2 int4 decode 1.14× on an AVX2 EPYC) and leaves one degree of
freedom per block, the scale, which may be negative: as in llama.cpp's Q4_0 the value of largest
magnitude m maps to the lowest code, s = −m / 2^(bits−1), so the grid spans [−|m|, |m|·(1 − 2^(1−bits))]
on the side of m's sign. HQQ's fit then updates only s.

Fits of (s, z) per block, on the block's values w:
- `minmax` (round to nearest, RTN): over the block's range widened to hold 0, [lo, hi] =
  [min(min w, 0), max(max w, 0)], s = (hi − lo)/L, z = round(−lo / s) (a block of one sign would
  otherwise need a zero point outside 0…L).
- `hqq`: Half-Quadratic Quantization (Badri & Shaji, 2023) minimises ‖w − Ŵ‖_p^p with p < 1
  (robust to outliers) by alternating a proximal step on the error, e = shrink_p(w − Ŵ, β) with
  shrink_p(x) = sign(x)·relu(|x| − |x|^(p−1)/β), and closed-form updates of the grid on the
  target w − e: the zero point z = round(mean(q − (w − e)/s)) (kept on the integer grid
  MatMulNBits stores) and, beyond the original HQQ, the least-squares scale
  s = Σ (w − e)(q − z) / Σ (q − z)². β grows by κ each step; each block keeps the iterate with
  the smallest squared error ‖w − Ŵ‖², so it is never worse than `minmax`, where it starts.

Blocks are fitted as arrays [..., g] (leading axes: output channel, block); a last block shorter
than g (K not a multiple of g) is padded for the fit by repeating its own values, which leaves
its min and max unchanged, and its padded codes multiply nothing (MatMulNBits reads K rows).
"""

from __future__ import annotations

import numpy as np

FITS = ("minmax", "hqq")
HQQ_ITERATIONS, HQQ_P, HQQ_BETA, HQQ_KAPPA = 20, 0.7, 10.0, 1.01
HQQ_CHUNK_BLOCKS = 1024


def levels(bits: int) -> int:
    return (1 << bits) - 1


def fit_blocks(blocks: np.ndarray, bits: int, fit: str, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) of each block of `blocks` [..., g] (float64); zero is integer-valued, and
    2^(bits−1) everywhere when `symmetric`."""
    if fit == "minmax":
        return _fit_symmetric(blocks, bits) if symmetric else _fit_minmax(blocks, levels(bits))
    if fit == "hqq":
        return _fit_hqq(blocks, bits, symmetric)
    raise ValueError(f"unknown grid fit {fit!r}")


def _symmetric_zero(bits: int) -> int:
    return 1 << (bits - 1)


def codes_of(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """q = clip(round(w/s + z), 0, L) for blocks [..., g] and per-block scale, zero [...]; each step
    in place where numpy's promotion allows (a head's 49152×576 in float64 is 226 MB per temporary)."""
    codes = _promoted(np.add, blocks / scale[..., None], zero[..., None])
    np.rint(codes, out=codes)
    return np.clip(codes, 0, levels(bits), out=codes)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """s·(q − z), in place where numpy's promotion allows."""
    return _promoted(np.multiply, codes - zero[..., None], scale[..., None])


def _promoted(ufunc: np.ufunc, array: np.ndarray, operand: np.ndarray) -> np.ndarray:
    """`ufunc(array, operand)` with numpy's promotion, written into `array` (a temporary) when the
    result has its dtype."""
    in_place = array.dtype == np.result_type(array, operand)
    return ufunc(array, operand, out=array if in_place else None)


def restored_in_out(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    """Ŵ [K, N] from codes [N, K] and per-block scale, zero [N, ⌈K/g⌉]."""
    k = codes.shape[1]
    return dequantize(as_blocks(codes, group), scale, zero).reshape(len(codes), -1)[:, :k].T


def _fit_minmax(blocks: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    low, high = np.minimum(blocks.min(axis=-1), 0), np.maximum(blocks.max(axis=-1), 0)
    scale = (high - low) / top
    scale = np.where(scale > 0, scale, np.maximum(np.abs(high), 1e-12))  # a constant block: any s, q − z = w/s
    zero = np.clip(np.rint(-low / scale), 0, top)
    return scale, zero


def _fit_symmetric(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """s = −m / 2^(bits−1) with m the block's value of largest magnitude; z = 2^(bits−1)."""
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scale = np.where(largest != 0, -largest / _symmetric_zero(bits), 1e-12)  # a zero block: any s, q − z = 0
    return scale, np.full(scale.shape, float(_symmetric_zero(bits)))


def _fit_hqq(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """HQQ's fit of each block, `HQQ_CHUNK_BLOCKS` blocks at a time: the blocks are independent, and
    a chunk's temporaries stay in the core's cache through the iterations (a 49152×1×32 group of
    blocks, the shape GPTQ fits for SmolLM2's head: 0.55 s against 1.09 s in one pass per iteration)."""
    flat = blocks.reshape(-1, blocks.shape[-1])
    scale, zero = np.empty(len(flat)), np.empty(len(flat))
    for start in range(0, len(flat), HQQ_CHUNK_BLOCKS):
        chunk = slice(start, start + HQQ_CHUNK_BLOCKS)
        scale[chunk], zero[chunk] = _fit_hqq_blocks(flat[chunk], bits, symmetric)
    return scale.reshape(blocks.shape[:-1]), zero.reshape(blocks.shape[:-1])


def _fit_hqq_blocks(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    top = levels(bits)
    scale, zero = _fit_symmetric(blocks, bits) if symmetric else _fit_minmax(blocks, top)
    best_scale, best_zero = scale.copy(), zero.copy()
    best_error = np.full(scale.shape, np.inf)
    beta = HQQ_BETA
    for _ in range(HQQ_ITERATIONS):
        q = codes_of(blocks, scale, zero, bits)
        residual = blocks - dequantize(q, scale, zero)
        error = np.square(residual).sum(axis=-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
        magnitude = np.abs(residual)
        shrunk = np.sign(residual) * np.maximum(magnitude - np.power(magnitude + 1e-8, HQQ_P - 1) / beta, 0)
        target = blocks - shrunk
        if not symmetric:
            zero = np.clip(np.rint(np.mean(q - target / scale[..., None], axis=-1)), 0, top)
        offset = q - zero[..., None]
        denominator = np.square(offset).sum(axis=-1)
        refit = np.sum(target * offset, axis=-1) / np.where(denominator > 0, denominator, 1)
        scale = np.where((denominator > 0) & (refit * scale > 0), refit, scale)  # the scale keeps its sign
        beta *= HQQ_KAPPA
    return best_scale, best_zero


def as_blocks(w_nk: np.ndarray, group: int) -> np.ndarray:
    """[N, K] → [N, ⌈K/g⌉, g]; a short last block is padded by repeating its own values."""
    n, k = w_nk.shape
    padding = -k % group
    if padding:
        tail = w_nk[:, k - (k % group) :]
        w_nk = np.concatenate([w_nk, np.resize(tail, (n, padding)) if tail.size else tail], axis=1)
    return w_nk.reshape(n, -1, group)


def pack_matmul_nbits(codes: np.ndarray, zero: np.ndarray | None, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """MatMulNBits' B [N, blocks, g·bits/8] and packed uint8 zero points from codes [N, blocks, g]
    and zero [N, blocks] (None: none, the symmetric grid): 4-bit values two to a byte, the first
    in the low nibble; each row's 4-bit zero points padded to whole bytes."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes, None if zero is None else zero.astype(np.uint8).reshape(-1)
    if bits != 4:
        raise ValueError(f"{bits}-bit packing is not supported")
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    if zero is None:
        return packed, None
    zero = zero.astype(np.uint8)
    if zero.shape[1] % 2:
        zero = np.concatenate([zero, np.zeros((zero.shape[0], 1), np.uint8)], axis=1)
    packed_zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return packed, packed_zero.reshape(-1)

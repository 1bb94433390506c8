"""The CUDA kernels as Python functions on torch CUDA tensors (ctypes over the built library).

Each function checks what the kernel assumes (device, dtype, contiguity, sizes), allocates the
output, launches on torch's current stream (so CUDA graph capture records it) and raises on a
launch error with CUDA's message.
"""

from __future__ import annotations

import ctypes
import math
from functools import cache

import torch

from xopt.backends.cuda.build import shared_library
from xopt.errors import XoptError

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GEMV_MAX_ROWS = 16  # up to this many rows the weight is dequantized in registers; beyond, once for cuBLAS
DECODE_KEYS_PER_SPLIT = 256
NORM_MAX_COLS = 12 * 1024 - 32  # norm_residual.cu keeps a row in 48 KiB of shared memory
MAX_HEAD_DIM = 256  # warp_attention.cuh: 8 dimensions a lane

_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_int64
_F = ctypes.c_float
SIGNATURES = {
    "xopt_norm_residual": [_I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _F, _I, _P],
    "xopt_bias_gelu": [_I, _P, _P, _P, _L, _I, _I, _P],
    "xopt_glu": [_I, _P, _P, _L, _I, _I, _P],
    "xopt_rope": [_I, _P, _P, _P, _P, _L, _I, _I, _I, _L, _I, _P],
    "xopt_nbits_gemv": [_I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P],
    "xopt_dequantize_nbits": [_I, _P, _P, _P, _P, _I, _I, _I, _I, _P],
    "xopt_decode_attention": [_I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _L, _L, _F, _P],
    "xopt_packed_attention": [_I, _P, _P, _P, _P, _P, _I, _I, _I, _I, _L, _F, _P],
}


@cache
def _library() -> ctypes.CDLL:
    major, minor = torch.cuda.get_device_capability()
    library = ctypes.CDLL(str(shared_library(f"sm_{major}{minor}")))
    for name, arguments in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = _I
    library.xopt_error_string.argtypes = [_I]
    library.xopt_error_string.restype = ctypes.c_char_p
    return library


def _launch(name: str, *arguments) -> None:
    library = _library()
    code = getattr(library, name)(*arguments, _stream())
    if code != 0:
        raise RuntimeError(f"{name}: {library.xopt_error_string(code).decode()}")


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _dtype_code(tensor: torch.Tensor) -> int:
    if tensor.device.type != "cuda" or tensor.dtype not in DTYPE_CODES:
        raise XoptError(
            f"CUDA kernels take float32/float16/bfloat16 CUDA tensors, not {tensor.dtype} on {tensor.device}"
        )
    return DTYPE_CODES[tensor.dtype]


def _contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def norm_residual(
    x: torch.Tensor,
    gamma: torch.Tensor,
    eps: float,
    *,
    skip: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    centred: bool = False,
    want_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + skip + bias), x + skip + bias or None) over the last axis; RMSNorm unless centred.
    A skip that broadcasts to x (e.g. [1, S, H]) is expanded; parameters are cast to x's dtype."""
    if skip is not None and skip.shape != x.shape:
        skip = skip.expand_as(x)
    gamma, beta, bias = (None if t is None else t.to(x.dtype) for t in (gamma, beta, bias))
    x, skip, bias, gamma, beta = _contiguous(x, skip, bias, gamma, beta)
    cols = x.shape[-1]
    y = torch.empty_like(x)
    total = torch.empty_like(x) if want_sum else None
    _launch(
        "xopt_norm_residual",
        _dtype_code(x),
        *map(_pointer, (x, skip, bias, gamma, beta, y, total)),
        x.numel() // cols,
        cols,
        eps,
        int(centred),
    )
    return y, total


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, tanh_form: bool = False) -> torch.Tensor:
    x, bias = _contiguous(x, None if bias is None else bias.to(x.dtype))
    y = torch.empty_like(x)
    _launch(
        "xopt_bias_gelu",
        _dtype_code(x),
        x.data_ptr(),
        _pointer(bias),
        y.data_ptr(),
        x.numel(),
        x.shape[-1],
        int(tanh_form),
    )
    return y


GLU_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # activations.cu's XOPT_GLU_* codes


def glu(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(first half) · second half of the last axis (SwiGLU with silu, GeGLU with a GELU)."""
    (gate_up,) = _contiguous(gate_up)
    width = gate_up.shape[-1] // 2
    y = torch.empty((*gate_up.shape[:-1], width), dtype=gate_up.dtype, device=gate_up.device)
    rows = gate_up.numel() // (2 * width)
    _launch(
        "xopt_glu", _dtype_code(gate_up), gate_up.data_ptr(), y.data_ptr(), rows, width, GLU_ACTIVATIONS[activation]
    )
    return y


def rope_(
    rows: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    head_dim: int,
    interleaved: bool,
) -> None:
    """Rotate, in place, the first `heads` heads of each row of `rows` (a [tokens, width] view
    whose rows may be strided, e.g. the Q or K part of packed QKV); cos/sin [positions, R/2]
    rotate the first R dimensions of each head."""
    if rows.stride(-1) != 1:
        raise XoptError("rope_ needs rows with unit stride along the last axis")
    cos, sin = _contiguous(cos.to(rows.dtype), sin.to(rows.dtype))
    positions = positions.to(device=rows.device, dtype=torch.int64).contiguous()
    _launch(
        "xopt_rope",
        _dtype_code(rows),
        rows.data_ptr(),
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        rows.shape[0],
        heads,
        head_dim,
        cos.shape[-1],
        rows.stride(0),
        int(interleaved),
    )


def nbits_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    n: int,
    bits: int,
    block_size: int,
) -> torch.Tensor:
    """A [..., K] times the MatMulNBits weight: a GEMV kernel for few rows, else Wᵀ once and cuBLAS."""
    a, scales, bias = _contiguous(a, scales.to(a.dtype), None if bias is None else bias.to(a.dtype))
    rows = a.numel() // k
    code = _dtype_code(a)
    if rows <= GEMV_MAX_ROWS:
        y = torch.empty((*a.shape[:-1], n), dtype=a.dtype, device=a.device)
        _launch(
            "xopt_nbits_gemv",
            code,
            a.data_ptr(),
            b.data_ptr(),
            scales.data_ptr(),
            _pointer(zeros),
            _pointer(bias),
            y.data_ptr(),
            rows,
            k,
            n,
            bits,
            block_size,
        )
        return y
    w_transposed = torch.empty((n, k), dtype=a.dtype, device=a.device)
    _launch(
        "xopt_dequantize_nbits",
        code,
        b.data_ptr(),
        scales.data_ptr(),
        _pointer(zeros),
        w_transposed.data_ptr(),
        k,
        n,
        bits,
        block_size,
    )
    y = a @ w_transposed.t()
    return y + bias if bias is not None else y


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] (each row's heads contiguous), caches
    [B, kv_heads, capacity, D], lengths int32 [B]; bias [B, capacity] or None → [B, H, D]."""
    batch, heads, head_dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        raise XoptError("decode_attention needs each query row's heads contiguous")
    k_cache, v_cache, bias = _contiguous(k_cache, v_cache, bias)
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    splits = max(1, min(64, math.ceil(capacity / DECODE_KEYS_PER_SPLIT)))
    workspace = torch.empty((batch, heads, splits, head_dim + 2), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    _launch(
        "xopt_decode_attention",
        _dtype_code(q),
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        lengths.data_ptr(),
        _pointer(bias),
        workspace.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        kv_heads,
        head_dim,
        capacity,
        splits,
        q.stride(0),
        bias.stride(0) if bias is not None else 0,
        scale,
    )
    return out


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, longest: int, heads: int, scale: float
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence: q, k, v [tokens, heads·D] views with one
    row stride → [tokens, heads, D]."""
    tokens, width = q.shape
    head_dim = width // heads
    if not (q.stride(0) == k.stride(0) == v.stride(0)) or q.stride(1) != 1:
        raise XoptError("packed_attention needs q, k and v rows with one stride and unit column stride")
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    _launch(
        "xopt_packed_attention",
        _dtype_code(q),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        cu_seqlens.data_ptr(),
        out.data_ptr(),
        cu_seqlens.numel() - 1,
        longest,
        heads,
        head_dim,
        q.stride(0),
        scale,
    )
    return out

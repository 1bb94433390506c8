"""ONNX Runtime's fused norm, activation and quantized operators in torch, and their CUDA fast paths.

- (Skip)SimplifiedLayerNormalization: h = x + skip (+ bias), y = h / sqrt(mean(h²) + eps) · γ;
  (Skip)LayerNormalization: y = (h − mean h) / sqrt(var h + eps) · γ + β; the skip forms also
  output h (input_skip_bias_sum, their fourth output).
- BiasGelu: gelu(x + b) (erf form); FastGelu: the tanh form, bias optional; ONNX's Gelu.
- A gated activation act(g)·u over the halves of the merged gate/up projection (glu_fusion.py).
- MatMulNBits: Y = A·W (+ bias), W[k, n] = (q[k, n] − z)·s per block of `block_size` rows,
  4- or 8-bit codes (layout in kernels/nbits_gemv.cu; zero point 2^(bits−1) when absent).
- GatherBlockQuantized: rows of a table quantized the same way along its columns, gathered then
  dequantized.

Statistics are computed in float32 whatever the dtype, as ONNX Runtime does (stash_type 1).
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from xopt.backends.cuda import kernels
from xopt.backends.cuda.op_context import OpContext
from xopt.backends.cuda.standard_ops import Inputs
from xopt.errors import XoptError


def _norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, eps: float, centred: bool) -> torch.Tensor:
    h = x.float()
    if centred:
        h = h - h.mean(dim=-1, keepdim=True)
    y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps) * gamma.float()
    return (y + beta.float() if beta is not None else y).to(x.dtype)


def _fast(context: OpContext, x: torch.Tensor) -> bool:
    return context.use_kernels and x.is_cuda and x.dtype in kernels.DTYPE_CODES and x.numel() > 0


def _simplified_layer_norm(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    x, gamma = inputs[:2]
    if node.attributes.get_int("axis", -1) not in (-1, x.dim() - 1):
        raise XoptError("the CUDA backend normalizes the last axis only")
    eps = node.attributes.get_float("epsilon", 1e-5)
    if _fast(context, x) and x.shape[-1] <= kernels.NORM_MAX_COLS:
        return [kernels.norm_residual(x, gamma, eps)[0]]
    return [_norm(x, gamma, None, eps, centred=False)]


def _layer_norm(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    x, gamma = inputs[:2]
    beta = inputs[2] if len(inputs) > 2 else None
    eps = node.attributes.get_float("epsilon", 1e-5)
    axis = node.attributes.get_int("axis", -1) % x.dim()
    if axis == x.dim() - 1 and _fast(context, x) and x.shape[-1] <= kernels.NORM_MAX_COLS:
        return [kernels.norm_residual(x, gamma, eps, beta=beta, centred=True)[0]]
    return [torch.nn.functional.layer_norm(x, x.shape[axis:], gamma, beta, eps)]


def _skip_norm(centred: bool):
    def run(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
        x, skip, gamma = inputs[:3]
        beta = inputs[3] if centred and len(inputs) > 3 else None
        bias = inputs[4 if centred else 3] if len(inputs) > (4 if centred else 3) else None
        eps = node.attributes.get_float("epsilon", 1e-5)
        want_sum = len(node.outputs) > 3 and (bool(node.outputs[3].uses()) or node.outputs[3].is_graph_output())
        if _fast(context, x) and x.shape[-1] <= kernels.NORM_MAX_COLS:
            y, total = kernels.norm_residual(
                x, gamma, eps, skip=skip, bias=bias, beta=beta, centred=centred, want_sum=want_sum
            )
        else:
            total = x + skip if bias is None else x + skip + bias
            y = _norm(total, gamma, beta, eps, centred)
        return [y, None, None, total]

    return run


def _bias_gelu(tanh_form: bool):
    def run(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
        x = inputs[0]
        bias = inputs[1] if len(inputs) > 1 else None
        if _fast(context, x):
            return [kernels.bias_gelu(x, bias, tanh_form)]
        shifted = x + bias if bias is not None else x
        return [torch.nn.functional.gelu(shifted, approximate="tanh" if tanh_form else "none")]

    return run


def gated_activation(activation: str):
    """act(first half) · second half of the last axis: the CUDA executor's step for a matched
    Split → activation → Mul (glu_fusion.py)."""
    torch_activation = {
        "silu": torch.nn.functional.silu,
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
    }[activation]

    def run(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
        (gate_up,) = inputs
        width = gate_up.shape[-1]
        if _fast(context, gate_up) and width % 2 == 0:
            return [kernels.glu(gate_up, activation)]
        first = -(-width // 2)  # Split's halves: the first one larger when the width is odd
        return [torch_activation(gate_up[..., :first]) * gate_up[..., first:]]

    return run


def _gelu(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    tanh_form = node.attributes.get_string("approximate", "none") == "tanh"
    if _fast(context, inputs[0]):
        return [kernels.bias_gelu(inputs[0], None, tanh_form)]
    return [torch.nn.functional.gelu(inputs[0], approximate="tanh" if tanh_form else "none")]


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes → codes along the last axis (4 bits: low nibble first)."""
    if bits == 8:
        return packed
    if bits != 4:
        raise XoptError(f"the CUDA backend reads 4- and 8-bit codes, not {bits}-bit")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def dequantize_blocks(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, width: int
) -> torch.Tensor:
    """codes [R, blocks, g] with scales [R, blocks] and packed zero points → values [R, width]."""
    rows, blocks = scales.shape
    if zeros is None:
        zero = torch.full((rows, blocks), float(1 << (bits - 1)), device=scales.device)
    else:
        zero = unpack_codes(zeros.reshape(rows, -1), bits)[:, :blocks].float()
    values = (codes.float() - zero.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return values.reshape(rows, -1)[:, :width].to(scales.dtype)


def _matmul_nbits(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    a, b, scales = inputs[:3]
    zeros, g_idx, bias = (inputs + [None] * 6)[3:6]
    if g_idx is not None:
        raise XoptError("the CUDA backend's MatMulNBits takes no g_idx")
    if zeros is not None and zeros.dtype != torch.uint8:
        raise XoptError("the CUDA backend's MatMulNBits reads packed uint8 zero points only")
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    bits, block = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size")
    if _fast(context, a):
        return [kernels.nbits_matmul(a, b, scales, zeros, bias, k, n, bits, block)]
    codes = unpack_codes(b, bits)  # [N, blocks, g]
    weight = dequantize_blocks(codes, scales.reshape(n, -1), zeros, bits, k)  # [N, K]
    y = torch.matmul(a, weight.t().to(a.dtype))
    return [y + bias if bias is not None else y]


def _gather_block_quantized(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    data, indices, scales = inputs[:3]
    zeros = inputs[3] if len(inputs) > 3 else None
    if node.attributes.get_int("gather_axis", 0) != 0 or node.attributes.get_int("quantize_axis", 1) != 1:
        raise XoptError("the CUDA backend's GatherBlockQuantized gathers rows of row-quantized tables only")
    if data.dtype != torch.uint8:
        raise XoptError("the CUDA backend's GatherBlockQuantized reads uint8 data only")
    bits, block = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size", 128)
    ids = indices.to(data.device).long().reshape(-1)
    codes = unpack_codes(data[ids], bits)  # [rows, width]
    width = codes.shape[1]
    rows = dequantize_blocks(
        codes.reshape(len(ids), -1, block), scales[ids], None if zeros is None else zeros[ids], bits, width
    )
    return [rows.reshape(*indices.shape, width)]


FUSED_OPS = {
    ("", "Gelu"): _gelu,
    ("", "LayerNormalization"): _layer_norm,
    ("", "SimplifiedLayerNormalization"): _simplified_layer_norm,
    ("com.microsoft", "SimplifiedLayerNormalization"): _simplified_layer_norm,
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): _skip_norm(centred=False),
    ("com.microsoft", "SkipLayerNormalization"): _skip_norm(centred=True),
    ("com.microsoft", "BiasGelu"): _bias_gelu(tanh_form=False),
    ("com.microsoft", "FastGelu"): _bias_gelu(tanh_form=True),
    ("com.microsoft", "MatMulNBits"): _matmul_nbits,
    ("com.microsoft", "GatherBlockQuantized"): _gather_block_quantized,
}

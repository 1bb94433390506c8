"""Attention operators in torch, with ONNX Runtime's semantics, and their CUDA fast paths.

- RotaryEmbedding (ONNX opset 23): x₁' = x₁·cos − x₂·sin, x₂' = x₂·cos + x₁·sin on the first
  rotary_dim dimensions of each head (halves, or neighbour pairs when interleaved).
- Attention (ONNX opset 23): softmax(softcap(Q·Kᵀ·scale) + mask)·V with K, V the past cache
  concatenated with the new keys (the present outputs), KV heads repeated for grouped queries,
  causality aligned bottom-right (a query at row i of S sees keys ≤ i + T − S).
- GroupQueryAttention (com.microsoft): the same over packed or separate Q/K/V, causal, with the
  query of row s of sequence b at position p = seqlens_k[b] + 1 − S + s (rotated there when
  do_rotary), keys t ≤ p and t ≤ seqlens_k[b] visible, plus the optional additive bias. On a
  `StaticCache` (op_context.py) the lengths come from the cache instead, the new keys and values
  are written into its buffers, and the bias is not read (rows without padding).
- Attention (com.microsoft, encoders): QKV = X·W + b, bidirectional, plus the additive bias.
- MultiHeadAttention (com.microsoft, encoders): the same on separate Q, K, V (the projections
  left to linears, as `fuse` does when they are quantized), each plus its part of the bias input.

On CUDA tensors with the kernels loaded: RoPE runs in place on the packed rows, a decode step
(one query token) of GroupQueryAttention runs the split-KV kernel, and encoder attention whose
bias is a key-padding mask [B, 1, 1, T] packs the real tokens and runs the padding-free kernel.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch

from xopt.backends.cuda import kernels
from xopt.backends.cuda.op_context import OpContext
from xopt.backends.cuda.standard_ops import Inputs
from xopt.errors import XoptError

MASKED = -1e4  # an additive bias at or below this hides the key (the models use the dtype's minimum)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE of x [..., D] with cos/sin [..., R/2] broadcast over x's leading axes; dims ≥ R unchanged."""
    rotary = 2 * cos.shape[-1]
    part, rest = x[..., :rotary].float(), x[..., rotary:]
    if interleaved:
        x1, x2 = part[..., 0::2], part[..., 1::2]
    else:
        x1, x2 = part[..., : rotary // 2], part[..., rotary // 2 :]
    cos, sin = cos.float(), sin.float()
    first, second = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.stack((first, second), dim=-1).flatten(-2) if interleaved else torch.cat((first, second), dim=-1)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


def _rotary_embedding(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    x, cos_cache, sin_cache = inputs[:3]
    positions = inputs[3] if len(inputs) > 3 else None
    interleaved = bool(node.attributes.get_int("interleaved", 0))
    if node.attributes.get_int("rotary_embedding_dim", 0):
        raise XoptError("the CUDA backend's RotaryEmbedding rotates whole heads (rotary_embedding_dim=0)")
    if positions is not None:  # caches [max position, R/2] indexed by position ids [B, S]
        positions = positions.to(cos_cache.device).long()
        cos, sin = cos_cache[positions], sin_cache[positions]
    else:  # caches already [B, S, R/2]
        cos, sin = cos_cache, sin_cache
    if x.dim() == 4:  # [B, H, S, D]
        return [rotate(x, cos.unsqueeze(1), sin.unsqueeze(1), interleaved)]
    heads = node.attributes.get_int("num_heads", 0)
    batch, sequence, width = x.shape
    split = x.reshape(batch, sequence, heads, width // heads)
    return [rotate(split, cos.unsqueeze(2), sin.unsqueeze(2), interleaved).reshape(batch, sequence, width)]


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H·D] → [B, H, S, D]; 4-D input is already heads-first."""
    if x.dim() == 4:
        return x
    batch, sequence, width = x.shape
    return x.reshape(batch, sequence, heads, width // heads).transpose(1, 2)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float = 0.0
) -> torch.Tensor:
    """softmax(softcap(q·kᵀ·scale) + bias)·v over [B, H, S, D] (KV heads repeated to H), in float32;
    a query row with every key masked gives zeros."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.float()
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(weights, v.float()).to(q.dtype)


def _onnx_attention(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    q, k, v = inputs[:3]
    mask, past_key, past_value = (inputs + [None] * 6)[3:6]
    if node.attributes.get_int("qk_matmul_output_mode", 0):
        raise XoptError("the CUDA backend's Attention gives no QK output (qk_matmul_output_mode=0 only)")
    three_d = q.dim() == 3
    q_heads = node.attributes.get_int("q_num_heads", 0) or q.shape[1]
    kv_heads = node.attributes.get_int("kv_num_heads", 0) or k.shape[1]
    q, k, v = _heads_first(q, q_heads), _heads_first(k, kv_heads), _heads_first(v, kv_heads)
    past = 0
    if past_key is not None:
        past = past_key.shape[2]
        k, v = torch.cat((past_key, k), dim=2), torch.cat((past_value, v), dim=2)
    sequence, total = q.shape[2], k.shape[2]
    bias = None
    if mask is not None:
        if mask.shape[-1] < total:  # a mask shorter than the keys hides the rest
            pad = torch.zeros((*mask.shape[:-1], total - mask.shape[-1]), dtype=mask.dtype, device=mask.device)
            mask = torch.cat((mask, pad if mask.dtype == torch.bool else pad - math.inf), dim=-1)
        bias = torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask
    if node.attributes.get_int("is_causal", 0):
        rows = torch.arange(sequence, device=q.device).unsqueeze(1) + past
        causal = torch.where(torch.arange(total, device=q.device) <= rows, 0.0, -math.inf)
        bias = causal if bias is None else bias + causal
    scale = node.attributes.get_float("scale", 0.0) or 1.0 / math.sqrt(q.shape[-1])
    out = attend(q, k, v, bias, scale, node.attributes.get_float("softcap", 0.0))
    if three_d:
        out = out.transpose(1, 2).reshape(out.shape[0], sequence, -1)
    return [out, k, v]


def _group_query_attention(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    query, key, value, past_key, past_value, seqlens_k, _total, cos_cache, sin_cache = (inputs + [None] * 11)[:9]
    position_ids, bias = (inputs + [None] * 11)[9:11]
    heads = node.attributes.get_int("num_heads")
    kv_heads = node.attributes.get_int("kv_num_heads")
    if position_ids is not None or node.attributes.get_int("local_window_size", -1) > 0:
        raise XoptError("the CUDA backend's GroupQueryAttention takes no position_ids and no local window")
    batch, sequence, width = query.shape
    if key is None:  # packed QKV
        head_dim = width // (heads + 2 * kv_heads)
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        packed = (
            query.clone(memory_format=torch.contiguous_format) if node.attributes.get_int("do_rotary", 0) else query
        )
        q, k, v = packed[..., :q_width], packed[..., q_width : q_width + kv_width], packed[..., q_width + kv_width :]
    else:
        head_dim = width // heads
        q, k, v = (
            query.clone(memory_format=torch.contiguous_format),
            key.clone(memory_format=torch.contiguous_format),
            value,
        )
    static = context.static_cache
    if static is not None:  # fixed buffers: lengths come from the cache, the graph's mask inputs are not read
        lengths, bias = static.lengths, None
    else:
        lengths = seqlens_k.to(query.device).long() + 1  # keys visible to the last query of each row
    positions = lengths.unsqueeze(1) - sequence + torch.arange(sequence, device=query.device)  # [B, S]
    if node.attributes.get_int("do_rotary", 0):
        interleaved = bool(node.attributes.get_int("rotary_interleaved", 0))
        if context.use_kernels and query.is_cuda:
            for part, part_heads in ((q, heads), (k, kv_heads)):
                kernels.rope_(
                    _rows(part),
                    positions.reshape(-1),
                    cos_cache,
                    sin_cache,
                    part_heads,
                    head_dim,
                    interleaved,
                )
        else:
            cos, sin = cos_cache[positions].unsqueeze(2), sin_cache[positions].unsqueeze(2)
            q = rotate(q.reshape(batch, sequence, heads, head_dim), cos, sin, interleaved).reshape(q.shape)
            k = rotate(k.reshape(batch, sequence, kv_heads, head_dim), cos, sin, interleaved).reshape(k.shape)
    k_new, v_new = _heads_first(k, kv_heads), _heads_first(v, kv_heads)
    if static is not None:  # every row holds the same length: write the new positions in place
        present_key, present_value = static.keys[node.inputs[3].name], static.values[node.inputs[4].name]
        present_key.index_copy_(2, positions[0], k_new.to(present_key.dtype))
        present_value.index_copy_(2, positions[0], v_new.to(present_value.dtype))
    else:
        present_key = torch.cat((past_key, k_new), dim=2) if past_key is not None else k_new.contiguous()
        present_value = torch.cat((past_value, v_new), dim=2) if past_value is not None else v_new.contiguous()
    total = present_key.shape[2]
    scale = node.attributes.get_float("scale", 0.0) or 1.0 / math.sqrt(head_dim)
    softcap = node.attributes.get_float("softcap", 0.0)
    decode_kernel = sequence == 1 and softcap == 0 and head_dim <= kernels.MAX_HEAD_DIM and batch <= 65535
    if context.use_kernels and query.is_cuda and decode_kernel and (bias is None or _is_key_bias(bias, total)):
        key_bias = None if bias is None else bias.reshape(bias.shape[0], total).expand(batch, total).to(query.dtype)
        out = kernels.decode_attention(
            q.reshape(batch, heads, head_dim), present_key, present_value, lengths, scale, key_bias
        )
        return [out.reshape(batch, 1, heads * head_dim), present_key, present_value]
    keys = torch.arange(total, device=query.device)
    visible = (keys <= positions.unsqueeze(-1)) & (keys < lengths.view(batch, 1, 1))  # [B, S, T]
    mask = torch.where(visible, 0.0, -math.inf).unsqueeze(1)
    if bias is not None:
        mask = mask + bias.float()
    out = attend(_heads_first(q, heads), present_key, present_value, mask, scale, softcap)
    return [out.transpose(1, 2).reshape(batch, sequence, heads * head_dim), present_key, present_value]


def _rows(part: torch.Tensor) -> torch.Tensor:
    """A [B, S, W] part of Q/K/V as [B·S, W] rows viewing the same memory (the RoPE kernel rotates
    in place), the packed row stride kept."""
    rows = part.flatten(0, 1)
    if rows.data_ptr() != part.data_ptr() or rows.stride(-1) != 1:
        raise XoptError("rotary rows must be a view of the query (a copy would not be rotated)")
    return rows


def _is_key_bias(bias: torch.Tensor, total: int) -> bool:
    """A bias of one row per sequence ([B or 1, 1, 1, T]), what the decode kernel adds per key."""
    return bias.dim() == 4 and bias.shape[1] == 1 and bias.shape[2] == 1 and bias.shape[-1] == total


def _contrib_attention(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    x, weight, bias_qkv, mask_index, past, bias = (inputs + [None] * 6)[:6]
    if mask_index is not None or past is not None or node.attributes.get_int("unidirectional", 0):
        raise XoptError("the CUDA backend's com.microsoft.Attention takes no mask_index, past or unidirectional")
    sizes = node.attributes.get_ints("qkv_hidden_sizes") or [weight.shape[1] // 3] * 3
    qkv = torch.matmul(x, weight)
    if bias_qkv is not None:
        qkv = qkv + bias_qkv
    q, k, v = torch.split(qkv, list(sizes), dim=-1)
    return [_bidirectional(q, k, v, node, bias, context, packed=qkv)]


def _contrib_multi_head_attention(node: ir.Node, inputs: Inputs, context: OpContext) -> list[torch.Tensor]:
    query, key, value, bias_qkv, key_padding_mask, bias = (inputs + [None] * 6)[:6]
    separate = key is not None and value is not None and query.dim() == key.dim() == value.dim() == 3
    extra = key_padding_mask is not None or any(x is not None for x in inputs[6:])
    if not separate or extra or node.attributes.get_int("unidirectional", 0):
        raise XoptError(
            "the CUDA backend's com.microsoft.MultiHeadAttention takes separate [batch, sequence, hidden] "
            "query, key and value, and no key_padding_mask, past or unidirectional"
        )
    if bias_qkv is not None:  # [bias of Q | of K | of V]
        q_width, k_width = query.shape[-1], key.shape[-1]
        query, key = query + bias_qkv[:q_width], key + bias_qkv[q_width : q_width + k_width]
        value = value + bias_qkv[q_width + k_width :]
    return [_bidirectional(query, key, value, node, bias, context)]


def _bidirectional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    node: ir.Node,
    bias: torch.Tensor | None,
    context: OpContext,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """An encoder's softmax(Q·Kᵀ·scale + bias)·V over [B, S, N·D] projections, heads and scale from
    the node's attributes; on CUDA, with a key-padding bias, over the real tokens only (`packed`:
    [Q | K | V] as one tensor already, else concatenated)."""
    heads, (batch, sequence, width) = node.attributes.get_int("num_heads"), q.shape
    head_dim = width // heads
    scale = node.attributes.get_float("scale", 0.0) or 1.0 / math.sqrt(head_dim)
    alike = q.shape == k.shape == v.shape
    if context.use_kernels and q.is_cuda and alike and head_dim <= kernels.MAX_HEAD_DIM:
        packing = _packing(bias, batch, sequence, context)
        if packing is not None:
            qkv = packed if packed is not None else torch.cat([q, k, v], dim=-1)
            return _packed_encoder_attention(qkv, packing, heads, scale)
    out = attend(_heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads), bias, scale)
    return out.transpose(1, 2).reshape(batch, sequence, v.shape[-1])


def _packing(
    bias: torch.Tensor | None, batch: int, sequence: int, context: OpContext
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(indices of the real tokens in the flattened batch, cu_seqlens, longest) when `bias` is a
    key-padding mask (0 or at most MASKED; [B, 1, 1, T], or [B, 1, S, T] with every query row alike; padding anywhere:
    each row's real tokens stay together when packed); None otherwise. Computed once per run for
    the bias tensor every layer shares."""
    if bias is None or bias.dim() != 4 or bias.shape[1] != 1 or bias.shape[-1] != sequence:
        return None
    key = ("packing", bias.data_ptr(), tuple(bias.shape))
    if key not in context.memo:
        rows = bias[:, 0, :1, :]  # [B, 1, T]
        real = rows[:, 0] > MASKED
        counts = real.sum(dim=1)
        alike = torch.equal(bias[:, 0], rows.expand(batch, bias.shape[2], sequence))
        if not alike or bool(rows[:, 0][real].any()) or int(counts.max()) == 0 or batch > 65535:
            context.memo[key] = None  # not a pure key-padding mask (or nothing real): the reference path
        else:
            cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=bias.device)
            cu_seqlens[1:] = torch.cumsum(counts, 0)
            context.memo[key] = (real.reshape(-1).nonzero().squeeze(1), cu_seqlens, int(counts.max()))
    return context.memo[key]


def _packed_encoder_attention(
    qkv: torch.Tensor, packing: tuple[torch.Tensor, torch.Tensor, int], heads: int, scale: float
) -> torch.Tensor:
    """Attention over the real tokens only: pack their QKV rows, run the padding-free kernel,
    scatter back (padded positions get zeros, which nothing downstream reads)."""
    index, cu_seqlens, longest = packing
    batch, sequence, three_width = qkv.shape
    width = three_width // 3
    packed = qkv.reshape(batch * sequence, three_width)[index]  # [tokens, 3W]
    out = kernels.packed_attention(
        packed[:, :width], packed[:, width : 2 * width], packed[:, 2 * width :], cu_seqlens, longest, heads, scale
    )
    full = torch.zeros((batch * sequence, width), dtype=qkv.dtype, device=qkv.device)
    full[index] = out.reshape(-1, width)
    return full.reshape(batch, sequence, width)


ATTENTION_OPS = {
    ("", "RotaryEmbedding"): _rotary_embedding,
    ("", "Attention"): _onnx_attention,
    ("com.microsoft", "GroupQueryAttention"): _group_query_attention,
    ("com.microsoft", "Attention"): _contrib_attention,
    ("com.microsoft", "MultiHeadAttention"): _contrib_multi_head_attention,
}

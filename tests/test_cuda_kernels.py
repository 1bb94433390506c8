"""Each CUDA kernel against the torch reference of its operator, over shapes and dtypes, and
whole optimized models on the GPU against ONNX Runtime on the CPU. Needs a CUDA GPU (skipped
without one); the references themselves are tested against ONNX Runtime in test_cuda_executor.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xopt.passes.weight_grid import as_blocks, codes_of, fit_blocks, pack_matmul_nbits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to the output's scale


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() or 1.0
    assert error <= TOLERANCE[dtype] * scale * 4, (error, scale)


@pytest.fixture(scope="module")
def kernels():
    from xopt.backends.cuda import kernels

    return kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(1, 576), (7, 1000), (3, 4096)])
@pytest.mark.parametrize("centred", [False, True])
def test_norm_with_the_residual_add(kernels, dtype, rows, cols, centred):
    from xopt.backends.cuda.fused_ops import _norm

    g = torch.Generator(device="cuda").manual_seed(rows)
    x, skip = (torch.randn(rows, cols, device="cuda", generator=g).to(dtype) for _ in range(2))
    bias, gamma, beta = (torch.randn(cols, device="cuda", generator=g).to(dtype) for _ in range(3))
    y, total = kernels.norm_residual(
        x, gamma, 1e-5, skip=skip, bias=bias, beta=beta if centred else None, centred=centred, want_sum=True
    )
    expected_total = x.float() + skip.float() + bias.float()
    close(total, expected_total, dtype)
    close(y, _norm(expected_total, gamma, beta if centred else None, 1e-5, centred), dtype)
    plain, none = kernels.norm_residual(x, gamma, 1e-5)
    assert none is None
    close(plain, _norm(x.float(), gamma, None, 1e-5, False), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tanh_form", [False, True])
def test_bias_gelu(kernels, dtype, tanh_form):
    x = torch.randn(5, 3072, device="cuda").to(dtype)
    bias = torch.randn(3072, device="cuda").to(dtype)
    expected = torch.nn.functional.gelu(x.float() + bias.float(), approximate="tanh" if tanh_form else "none")
    close(kernels.bias_gelu(x, bias, tanh_form), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_activation_of_the_merged_gate_up(kernels, dtype, activation):
    gate_up = torch.randn(3, 7, 2 * 1536, device="cuda").to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = {
        "silu": torch.nn.functional.silu(gate),
        "gelu": torch.nn.functional.gelu(gate),
        "gelu_tanh": torch.nn.functional.gelu(gate, approximate="tanh"),
    }[activation]
    close(kernels.glu(gate_up, activation), act * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary", [64, 32])  # whole heads, and the first half of each (partial rotary)
def test_rope_in_place_on_packed_qkv(kernels, dtype, interleaved, rotary):
    from xopt.backends.cuda.attention_ops import rotate

    tokens, heads, kv_heads, head_dim = 11, 9, 3, 64
    packed = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda").to(dtype)
    angles = torch.rand(128, rotary // 2, device="cuda") * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.randint(0, 128, (tokens,), device="cuda")
    expected = packed.clone()
    for begin, count in ((0, heads), (heads * head_dim, kv_heads)):
        part = packed[:, begin : begin + count * head_dim].reshape(tokens, count, head_dim)
        rotated = rotate(part, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1), interleaved)
        expected[:, begin : begin + count * head_dim] = rotated.reshape(tokens, -1)
    kernels.rope_(packed[:, : heads * head_dim], positions, cos, sin, heads, head_dim, interleaved)
    kernels.rope_(packed[:, heads * head_dim :], positions, cos, sin, kv_heads, head_dim, interleaved)
    close(packed, expected, dtype)


def _quantized_weight(k: int, n: int, bits: int, group: int, symmetric: bool):
    rng = np.random.default_rng(k + n)
    w_nk = rng.standard_normal((n, k))
    blocks = as_blocks(w_nk, group)
    scale, zero = fit_blocks(blocks, bits, "minmax", symmetric=symmetric)
    packed, packed_zero = pack_matmul_nbits(codes_of(blocks, scale, zero, bits), None if symmetric else zero, bits)
    return packed, scale, packed_zero


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 4, 5, 33])  # GEMV kernel up to 16 rows, dequantize + cuBLAS beyond
@pytest.mark.parametrize(("bits", "k", "symmetric"), [(4, 576, False), (4, 100, True), (8, 1536, False)])
def test_nbits_matmul_reads_the_matmulnbits_layout(kernels, dtype, rows, bits, k, symmetric):
    from xopt.backends.cuda.fused_ops import dequantize_blocks, unpack_codes

    n, group = 200, 32
    packed, scale, packed_zero = _quantized_weight(k, n, bits, group, symmetric)
    b = torch.from_numpy(packed).cuda()
    scales = torch.from_numpy(scale.astype(np.float32)).cuda().to(dtype)
    zeros = None if packed_zero is None else torch.from_numpy(packed_zero).cuda()
    bias = torch.randn(n, device="cuda").to(dtype)
    a = torch.randn(rows, k, device="cuda").to(dtype)
    weight = dequantize_blocks(unpack_codes(b, bits), scales.float(), zeros, bits, k)  # [N, K]
    expected = a.float() @ weight.t() + bias.float()
    close(kernels.nbits_matmul(a, b, scales, zeros, bias, k, n, bits, group), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "capacity"), [(1, 40), (3, 700), (2, 4096)])
def test_split_kv_decode_attention(kernels, dtype, batch, capacity):
    from xopt.backends.cuda.attention_ops import attend

    heads, kv_heads, head_dim = 9, 3, 64
    q = torch.randn(batch, heads, head_dim, device="cuda").to(dtype)
    k_cache, v_cache = (torch.randn(batch, kv_heads, capacity, head_dim, device="cuda").to(dtype) for _ in range(2))
    lengths = torch.tensor([capacity - 7 * b for b in range(batch)], dtype=torch.int32, device="cuda")
    bias = torch.zeros(batch, capacity, device="cuda")
    bias[:, 3] = -math.inf  # one padded key in every row
    scale = 1 / math.sqrt(head_dim)
    got = kernels.decode_attention(q, k_cache, v_cache, lengths, scale, bias.to(dtype))
    visible = torch.arange(capacity, device="cuda") < lengths.unsqueeze(1)
    mask = (bias + torch.where(visible, 0.0, -math.inf)).view(batch, 1, 1, capacity)
    close(got, attend(q.unsqueeze(2), k_cache, v_cache, mask, scale).squeeze(2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("left_padded", [False, True])
def test_padding_free_encoder_attention(kernels, dtype, left_padded):
    from xopt.backends.cuda.attention_ops import _packed_encoder_attention, _packing, attend
    from xopt.backends.cuda.op_context import OpContext

    batch, sequence, heads, head_dim = 4, 128, 12, 32
    qkv = torch.randn(batch, sequence, 3 * heads * head_dim, device="cuda").to(dtype)
    lengths = torch.tensor([128, 5, 77, 1], device="cuda")
    positions = torch.arange(sequence, device="cuda")
    real = positions >= sequence - lengths.unsqueeze(1) if left_padded else positions < lengths.unsqueeze(1)
    bias = torch.where(real, 0.0, torch.finfo(torch.float32).min).view(batch, 1, 1, sequence)
    bias = bias.expand(batch, 1, sequence, sequence).contiguous()  # as the exported graphs give it
    scale = 1 / math.sqrt(head_dim)
    packing = _packing(bias, batch, sequence, OpContext(use_kernels=True))
    assert packing is not None and packing[2] == 128 and packing[1].tolist() == [0, 128, 133, 210, 211]
    got = _packed_encoder_attention(qkv, packing, heads, scale)

    def split(x):
        return x.reshape(batch, sequence, heads, head_dim).transpose(1, 2)

    q, k, v = qkv.chunk(3, dim=-1)
    expected = attend(split(q), split(k), split(v), bias, scale).transpose(1, 2).reshape(batch, sequence, -1)
    keep = real.unsqueeze(-1)
    close(got * keep, expected * keep, dtype)
    causal = torch.triu(torch.full((sequence, sequence), -math.inf, device="cuda"), 1).expand(batch, 1, -1, -1)
    assert _packing(causal.contiguous(), batch, sequence, OpContext(use_kernels=True)) is None  # not key padding


@pytest.mark.parametrize(
    ("name", "form"), [("bert", "exact"), ("bert", "int4-recipe-fusion"), ("llama", "exact"), ("llama", "int4")]
)
def test_whole_models_on_the_gpu_match_onnx_runtime_on_the_cpu(tiny_model, name, form):
    from test_cuda_executor import PASSES, WORKLOADS

    import xopt
    from xopt.backends.cuda import GraphExecutor
    from xopt.inputs import sample_inputs
    from xopt.verify import compare, reference_outputs

    model = xopt.optimize(tiny_model(name), passes=PASSES[form], verify=False)[0]
    executor = GraphExecutor(model, "cuda")
    for workload in WORKLOADS[:1] if name == "bert" else WORKLOADS:
        feeds = sample_inputs(model, seed=4, **workload)
        got = {key: value.cpu().numpy() for key, value in executor.run(feeds).items()}
        parity = compare(reference_outputs(model, feeds), got, feeds["attention_mask"])
        assert parity.max_rel <= 1e-4, (workload, parity)


def test_decode_steps_replayed_as_a_cuda_graph_generate_the_transformers_tokens(gqa_llama):
    import transformers
    from helpers import transformers_greedy

    from xopt.backends.cuda import GraphExecutor
    from xopt.generate import Decoder
    from xopt.runnable import Runnable

    folder, model = gqa_llama
    prompt = [5, 17, 42, 9, 3]
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    expected = transformers_greedy(reference, prompt, 24)
    executor = GraphExecutor(model, "cuda", static_cache=True)
    decoder = Decoder(Runnable("tiny", model, executor, "causal-lm", tokenizer_source=None))
    assert decoder.generate(prompt, 24).tokens == expected
    assert decoder.static.graph is not None  # the decode steps ran as a replayed CUDA graph

"""The CUDA backend's graph executor, run on the CPU with its torch reference operators, agrees
with ONNX Runtime on the optimized models (every fused form, int4 with and without zero points,
GroupQueryAttention with rotary), prefill of a padded batch and decode steps; the same operator
semantics are what the GPU kernels are tested against (test_cuda_kernels.py)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import xopt
from xopt.backends.cuda import GraphExecutor
from xopt.errors import XoptError
from xopt.inputs import sample_inputs
from xopt.verify import compare, reference_outputs

WORKLOADS = [
    dict(batch=2, sequence=9, padded=True),  # prefill of a right-padded batch
    dict(batch=2, sequence=1, past=6, padded=True),  # one decode step
    dict(batch=1, sequence=4, past=5),  # several new tokens on a past
]


def assert_parity(model: ir.Model, workloads: list[dict]) -> None:
    executor = GraphExecutor(model, "cpu")
    for workload in workloads:
        feeds = sample_inputs(model, seed=3, **workload)
        got = {name: tensor.numpy() for name, tensor in executor.run(feeds).items()}
        parity = compare(reference_outputs(model, feeds), got, feeds["attention_mask"])
        assert parity.max_rel <= 2e-5 and parity.top1_agreement in (None, 1.0), (workload, parity)


FUSED = "cleanup,fold-norms,fuse(lowering=all)"  # every fused form, none left out by a timing
INT4 = "quantize(method=rtn,head_bits=4,embedding_bits=8,accuracy=0"  # level 0: ORT multiplies in float too
PASSES = {
    "exact": FUSED,
    "int4": f"{FUSED},{INT4})",
    "int4-symmetric": f"{FUSED},{INT4},symmetric=true)",
    # fused as the int4 recipe fuses: an encoder's attention in MultiHeadAttention after its linears
    "int4-recipe-fusion": f"cleanup,fold-norms,fuse(lowering=all,weights=int4),{INT4})",
    # the same with Q, K, V apart: their biases go into MultiHeadAttention's bias input
    "int4-unmerged": f"cleanup,fold-norms,fuse(lowering=all,weights=int4,skip=merge-qkv),{INT4})",
}


@pytest.mark.parametrize(
    ("name", "form"),
    [
        ("bert", "exact"),
        ("gpt2", "exact"),
        ("llama", "exact"),
        ("qwen2", "exact"),
        ("gemma", "exact"),
        ("llama", "int4"),
        ("gpt2", "int4-symmetric"),
        ("bert", "int4-recipe-fusion"),
        ("bert", "int4-unmerged"),
    ],
)
def test_reference_operators_match_onnx_runtime(tiny_model, name, form):
    optimized, _ = xopt.optimize(tiny_model(name), passes=PASSES[form], verify=False)
    assert_parity(optimized, WORKLOADS[:1] if name == "bert" else WORKLOADS)


@pytest.mark.parametrize("offsets", ["true", "exact"])
def test_a_model_on_its_gguf_grids_matches_onnx_runtime(tiny_model, offsets):
    """Q4_1 linears kept on their grids: the offsets folded into zero points and rows read by the
    input's block sums (Concat, K not a multiple of the block), or added as a float term (ReduceSum,
    MatMul, Add)."""
    from helpers import gguf_like

    from xopt.analysis.patterns import find_linears
    from xopt.rewrite import set_weight, weight_in_out

    model = tiny_model("qwen2").clone()  # every linear's input width a multiple of GGUF's 32
    for linear in find_linears(model.graph):
        set_weight(model.graph, linear, gguf_like(weight_in_out(linear).astype(np.float32), "Q4_1"))
    passes = f"{FUSED},quantize(head_bits=4,accuracy=0,source_grid={offsets})"
    optimized, _ = xopt.optimize(model, passes=passes, verify=False)
    nbits = [node for node in optimized.graph if node.op_type == "MatMulNBits"]
    widened = [node.inputs[0].producer().op_type == "Concat" for node in nbits]
    assert widened == [offsets == "true"] * len(nbits)
    assert_parity(optimized, WORKLOADS)


@pytest.mark.parametrize(("name", "activation"), [("llama", "silu"), ("qwen2", "silu"), ("gemma", "gelu_tanh")])
def test_the_gated_mlp_activation_is_one_step(tiny_model, name, activation):
    from xopt.backends.cuda.glu_fusion import find_gated_activations

    optimized, _ = xopt.optimize(tiny_model(name), passes=FUSED, verify=False)
    matches = find_gated_activations(optimized.graph)
    layers = sum(node.op_type in ("Attention", "GroupQueryAttention") for node in optimized.graph)
    assert len(matches) == layers and {match.activation for match in matches} == {activation}
    planned = {step.node for step in GraphExecutor(optimized, "cpu").steps}
    folded = {node for match in matches for node in (match.split, *match.inner)}
    assert not planned & folded and {match.product for match in matches} <= planned


def test_group_query_attention_with_rotary_matches_onnx_runtime(gqa_llama):
    _, model = gqa_llama
    assert any(node.op_type == "GroupQueryAttention" for node in model.graph)
    assert_parity(model, WORKLOADS)


def test_the_static_cache_generates_the_transformers_tokens(gqa_llama):
    import transformers
    from helpers import transformers_greedy

    from xopt.backends.cuda.static_decode import StaticDecodeCache
    from xopt.generate import Decoder
    from xopt.runnable import Runnable

    folder, model = gqa_llama
    prompt = [5, 17, 42, 9, 3]
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    expected = transformers_greedy(reference, prompt, 20)
    executor = GraphExecutor(model, "cpu", static_cache=True)
    assert "attention_mask" not in executor.inputs_read  # the mask prologue is left out of the plan
    assert len(executor.steps) < len(GraphExecutor(model, "cpu").steps)
    runnable = Runnable("tiny", model, executor, "causal-lm", tokenizer_source=None)
    assert Decoder(runnable).generate(prompt, 20).tokens == expected
    cache = StaticDecodeCache(executor, model, capacity=4)
    with pytest.raises(XoptError, match="holds 4 positions, 5 asked for"):
        cache.run({"input_ids": np.array([prompt]), "attention_mask": np.ones((1, 5), np.int64)})
    with pytest.raises(XoptError, match="without padding"):
        cache.run({"input_ids": np.array([[1, 2]]), "attention_mask": np.array([[1, 0]])})


def test_the_static_cache_needs_group_query_attention_on_the_past(tiny_model):
    with pytest.raises(XoptError, match=r"needs GroupQueryAttention to read past_key_values\.0\.key"):
        GraphExecutor(tiny_model("llama"), "cpu", static_cache=True)


def test_an_operator_it_cannot_run_is_named(tiny_model):
    int8, _ = xopt.optimize(tiny_model("llama"), recipe="int8", verify=False)
    with pytest.raises(XoptError, match=r"cannot run com\.microsoft\.DynamicQuantizeMatMul"):
        GraphExecutor(int8, "cpu")


def test_feeds_that_do_not_match_the_inputs_are_refused(tiny_model):
    executor = GraphExecutor(tiny_model("bert"), "cpu")
    with pytest.raises(XoptError, match="missing"):
        executor.run({"input_ids": sample_inputs(tiny_model("bert"))["input_ids"]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_the_cuda_device_is_refused_in_one_line(tiny_model):
    with pytest.raises(XoptError, match="needs a CUDA GPU"):
        GraphExecutor(tiny_model("bert"), "cuda")


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_the_decoder_on_the_executor_generates_the_transformers_tokens(tiny_folder, tiny_model, tmp_path, name):
    import transformers
    from helpers import transformers_greedy

    from xopt.generate import Decoder
    from xopt.runnable import Runnable

    prompt = [5, 17, 42, 9, 3]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder(name), attn_implementation="eager")
    expected = transformers_greedy(reference.eval(), prompt, 16)
    optimized, _ = xopt.optimize(tiny_model(name))
    runnable = Runnable("tiny", optimized, GraphExecutor(optimized, "cpu"), "causal-lm", tokenizer_source=None)
    generation = Decoder(runnable).generate(prompt, 16)
    assert generation.tokens == expected and generation.decode_tokens_per_s > 0


def test_bench_times_the_executor(tiny_model):
    from xopt import bench

    model = tiny_model("bert")
    runner = bench.executor_runner(GraphExecutor(model, "cpu"), sample_inputs(model, batch=2, sequence=8))
    (timing,) = bench.time_interleaved({"executor": runner}, rounds=3, warmup=1)
    assert timing.runs == 3 and timing.median_ms > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("command", [["generate", "--prompt", "she was"], ["bench", "--rounds", "1"]])
def test_cli_backend_cuda_without_a_gpu_is_one_line(tiny_model, tmp_path, capsys, command):
    from xopt.cli import main

    xopt.save(tiny_model("llama"), tmp_path / "m")
    verb, *options = command
    assert main([verb, str(tmp_path / "m"), *options, "--backend", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "xopt: error: the CUDA backend needs a CUDA GPU: torch sees none"


def test_inputs_move_to_the_device_only_where_device_data_is_read(tiny_model):
    """The placement rule, with torch's meta device standing in for a GPU: host inputs stay on the
    CPU, a step fed only by host arithmetic stays there, and a CPU value joining device data is
    copied once per memo (constants once per executor)."""
    from xopt.backends.cuda.executor import _Step

    executor = GraphExecutor(tiny_model("bert"), "cpu")
    executor.device = torch.device("meta")
    executor.constants["small"] = torch.tensor([1, 2])

    def step(inputs: list[str], host: frozenset[int] = frozenset()) -> _Step:
        return _Step(None, None, inputs, [], host, [])

    values = {"device": torch.ones(2, device="meta"), "host": torch.tensor([3, 4])}
    on_device, shape = executor._inputs(step(["device", "host"], frozenset({1})), values, None)
    assert on_device.device.type == "meta" and shape.device.type == "cpu"  # a host input stays
    assert all(t.device.type == "cpu" for t in executor._inputs(step(["host", "small"]), values, None))
    memo: dict[str, torch.Tensor] = {}
    first = executor._inputs(step(["device", "host", "small"]), values, memo)
    again = executor._inputs(step(["device", "host", "small"]), values, memo)
    assert all(t.device.type == "meta" for t in first)
    assert first[1] is again[1] and first[2] is again[2] and set(memo) == {"host"}
    assert set(executor.device_constants) == {"small"}

"""Runs an optimized ONNX model (onnx-ir) op by op with torch, on a CUDA GPU or on the CPU.

The executor walks the graph in its (topological) order with a table of operator functions:
ONNX's standard operators (`standard_ops.py`), ONNX Runtime's fused ones (`fused_ops.py`) and
the attention family (`attention_ops.py`); a gated MLP activation (Split → SiLU/GELU → Mul,
`glu_fusion.py`) becomes one step. On a CUDA device with `use_kernels` the fused ones
take xopt's CUDA kernels (`kernels/`) and the large products go to cuBLAS through torch; on the
CPU, or without kernels, every operator runs its torch reference, which is how the operator
semantics are tested against ONNX Runtime where there is no GPU.

Weights are moved to the device once. Each value is dropped after its last reader. Small int64
constants and every `Shape` stay on the CPU, so shape arithmetic never waits on the GPU.

`static_cache=True` plans the model for a fixed-buffer KV cache (op_context.StaticCache): every
attention must be GroupQueryAttention reading the past cache inputs, whose mask-derived inputs
(seqlens_k, total_sequence_length, attention_bias) are then not read, and the nodes that only
computed them are left out. `run(..., host_memo=dict)` keeps the device copies of host-computed
values between calls of one shape, so a run replayed as a CUDA graph copies nothing to the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from xopt import kv_cache
from xopt.backends.cuda.attention_ops import ATTENTION_OPS
from xopt.backends.cuda.fused_ops import FUSED_OPS, gated_activation
from xopt.backends.cuda.glu_fusion import find_gated_activations
from xopt.backends.cuda.op_context import OpContext, StaticCache
from xopt.backends.cuda.standard_ops import HOST_INPUTS, STANDARD_OPS
from xopt.errors import XoptError

HOST_CONSTANT_LIMIT = 64  # int64 constants up to this many elements are shape arithmetic: kept on the CPU
FUSED_TABLE = {**FUSED_OPS, **ATTENTION_OPS}
MASK_INPUTS_OF_GQA = (5, 6, 10)  # seqlens_k, total_sequence_length, attention_bias
FUSED_HOST_INPUTS = {("com.microsoft", "GroupQueryAttention"): frozenset({6})}  # total length: a host scalar


def _key(node: ir.Node) -> tuple[str, str]:
    return ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)


def supported(node: ir.Node) -> bool:
    domain, op_type = _key(node)
    return (domain, op_type) in FUSED_TABLE or (domain == "" and op_type in STANDARD_OPS)


@dataclass
class _Step:
    node: ir.Node
    op: Callable[[ir.Node, list, OpContext], list[torch.Tensor]]
    inputs: list[str | None]
    outputs: list[str]
    host_inputs: frozenset[int]
    release: list[str]  # values whose last reader is this step


class GraphExecutor:
    """`GraphExecutor(model, device)` then `run(feeds)` → {output name: torch tensor}."""

    def __init__(
        self,
        model: ir.Model,
        device: str | torch.device = "cuda",
        use_kernels: bool | None = None,
        static_cache: bool = False,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise XoptError("the CUDA backend needs a CUDA GPU: torch sees none")
        if self.device.type == "cuda" and self.device.index is None:  # tensors report cuda:N, never bare cuda
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.use_kernels = self.device.type == "cuda" if use_kernels is None else use_kernels
        graph = model.graph
        missing = sorted({f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in graph if not supported(n)})
        if missing:
            raise XoptError(f"the CUDA backend cannot run {', '.join(missing)}")
        self.static_cache = static_cache
        self.past_names = [value.name for value in kv_cache.past_inputs(model)] if static_cache else []
        if static_cache and (refusal := static_cache_refusal(model)):
            raise XoptError(refusal)
        self.input_names = [value.name for value in graph.inputs if value.name not in self.past_names]
        self.output_names = [value.name for value in graph.outputs]
        self.constants = {
            name: self._constant(value) for name, value in graph.initializers.items() if value.const_value is not None
        }
        self.device_constants: dict[str, torch.Tensor] = {}
        self.steps = self._plan(graph)
        self.inputs_read = {name for step in self.steps for name in step.inputs if name in self.input_names}

    def _constant(self, value: ir.Value) -> torch.Tensor:
        array = value.const_value.numpy()
        tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
        if tensor.dtype == torch.int64 and tensor.numel() <= HOST_CONSTANT_LIMIT:
            return tensor
        return tensor.to(self.device)

    def _plan(self, graph: ir.Graph) -> list[_Step]:
        gated = {match.product: match for match in find_gated_activations(graph)}
        folded = {node for match in gated.values() for node in (match.split, *match.inner)}
        steps = []
        for node in graph:
            if node in folded:
                continue
            names = [value.name if value is not None else None for value in node.inputs]
            outputs = [value.name for value in node.outputs]
            if node in gated:  # Split → activation → Mul as one step on the merged gate/up
                match = gated[node]
                steps.append(
                    _Step(
                        node, gated_activation(match.activation), [match.split.inputs[0].name], outputs, frozenset(), []
                    )
                )
                continue
            if self.static_cache and node.op_type == "GroupQueryAttention":
                names = [
                    None if i in MASK_INPUTS_OF_GQA or names[i] in self.past_names else n for i, n in enumerate(names)
                ]
            if _key(node) in FUSED_TABLE:
                host = FUSED_HOST_INPUTS.get(_key(node), frozenset())
                steps.append(_Step(node, FUSED_TABLE[_key(node)], names, outputs, host, []))
            else:
                host = HOST_INPUTS.get(node.op_type, frozenset())
                steps.append(_Step(node, _standard(STANDARD_OPS[node.op_type]), names, outputs, host, []))
        needed = set(self.output_names)
        kept = []
        for step in reversed(steps):  # leave out the nodes nothing needed reads
            if any(name in needed for name in step.outputs):
                kept.append(step)
                needed.update(name for name in step.inputs if name)
        steps = kept[::-1]
        last_reader: dict[str, int] = {}
        for index, step in enumerate(steps):
            for name in step.inputs:
                if name and name not in self.constants:
                    last_reader[name] = index
        for name, index in last_reader.items():
            if name not in self.output_names:
                steps[index].release.append(name)
        return steps

    def to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
        return tensor.to(self.device)

    def run(
        self,
        feeds: Mapping[str, np.ndarray | torch.Tensor],
        cache: StaticCache | None = None,
        host_memo: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The model's outputs on `feeds` (numpy arrays or tensors). A model planned with
        `static_cache` takes its KV cache as `cache` instead of past inputs."""
        unknown = set(feeds) - set(self.input_names)
        absent = [name for name in self.input_names if name not in feeds]
        if unknown or absent:
            raise XoptError(f"feeds do not match the model's inputs (missing {absent}, unknown {sorted(unknown)})")
        if self.static_cache != (cache is not None):
            raise XoptError("a static-cache plan runs with a StaticCache, any other without one")
        values = {name: self.to_device(array) for name, array in feeds.items()}
        context = OpContext(self.use_kernels, cache)
        with torch.inference_mode():
            for step in self.steps:
                inputs = self._inputs(step, values, host_memo)
                outputs = step.op(step.node, inputs, context)
                for name, tensor in zip(step.outputs, outputs, strict=False):
                    if name and tensor is not None:
                        values[name] = tensor
                for name in step.release:
                    values.pop(name, None)
        return {name: values[name] for name in self.output_names}

    def _inputs(
        self, step: _Step, values: dict[str, torch.Tensor], host_memo: dict[str, torch.Tensor] | None
    ) -> list[torch.Tensor | None]:
        """The step's inputs: host inputs on the CPU; the others on the device when any of them is
        there (a step fed by shape arithmetic alone stays on the CPU, so its result can feed a
        host input later without a copy back)."""
        inputs = [
            None if not name else values[name] if name in values else self.constants[name] for name in step.inputs
        ]
        on_device = any(
            tensor is not None and tensor.device == self.device and position not in step.host_inputs
            for position, tensor in enumerate(inputs)
        )
        for position, (name, tensor) in enumerate(zip(step.inputs, inputs, strict=True)):
            if tensor is None:
                continue
            if position in step.host_inputs:
                inputs[position] = tensor.cpu()
            elif on_device and tensor.device != self.device:
                inputs[position] = self._moved(name, tensor, values, host_memo)
        return inputs

    def _moved(
        self,
        name: str,
        tensor: torch.Tensor,
        values: dict[str, torch.Tensor],
        host_memo: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """`tensor` on the device: constants copied once, host-computed values once per memo."""
        memo = host_memo if name in values else self.device_constants
        if memo is None:
            return tensor.to(self.device)
        if name not in memo:
            memo[name] = tensor.to(self.device)
        return memo[name]


def _standard(op: Callable[[ir.Node, list], list[torch.Tensor]]):
    return lambda node, inputs, context: op(node, inputs)


def static_cache_refusal(model: ir.Model) -> str | None:
    """Why `model` cannot run on a fixed-buffer KV cache, or None when it can: every past input
    must be read by GroupQueryAttention alone (the `fuse(positions=contiguous)` form)."""
    pasts = kv_cache.past_inputs(model)
    if not pasts:
        return "a static KV cache needs a decoder with past_key_values.* inputs"
    for past in pasts:
        readers = {use.node.op_type for use in past.uses()}
        if readers != {"GroupQueryAttention"}:
            found = ", ".join(sorted(readers)) or "nothing"
            needed = f"a static KV cache needs GroupQueryAttention to read {past.name}"
            return f"{needed} (fuse with positions=contiguous), not {found}"
    return None

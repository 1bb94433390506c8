"""Runs an optimized ONNX model (onnx-ir) op by op with torch, on a CUDA GPU or on the CPU.

The executor walks the graph in its (topological) order with a table of operator functions:
ONNX's standard operators (`standard_ops.py`), ONNX Runtime's fused ones (`fused_ops.py`) and
the attention family (`attention_ops.py`). On a CUDA device with `use_kernels` the fused ones
take xopt's CUDA kernels (`kernels/`) and the large products go to cuBLAS through torch; on the
CPU, or without kernels, every operator runs its torch reference, which is how the operator
semantics are tested against ONNX Runtime where there is no GPU.

Weights are moved to the device once. Each value is dropped after its last reader. Small int64
constants and every `Shape` stay on the CPU, so shape arithmetic never waits on the GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from xopt.backends.cuda.attention_ops import ATTENTION_OPS
from xopt.backends.cuda.fused_ops import FUSED_OPS
from xopt.backends.cuda.standard_ops import HOST_INPUTS, STANDARD_OPS
from xopt.errors import XoptError

HOST_CONSTANT_LIMIT = 64  # int64 constants up to this many elements are shape arithmetic: kept on the CPU
FUSED_TABLE = {**FUSED_OPS, **ATTENTION_OPS}


def supported(node: ir.Node) -> bool:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return (domain, node.op_type) in FUSED_TABLE or (domain == "" and node.op_type in STANDARD_OPS)


@dataclass
class _Step:
    node: ir.Node
    inputs: list[str | None]
    outputs: list[str]
    host_inputs: frozenset[int]
    fused: bool
    release: list[str]  # values whose last reader is this step


class GraphExecutor:
    """`GraphExecutor(model, device)` then `run(feeds)` → {output name: torch tensor}."""

    def __init__(self, model: ir.Model, device: str | torch.device = "cuda", use_kernels: bool | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise XoptError("the CUDA backend needs a CUDA GPU: torch sees none")
        self.use_kernels = self.device.type == "cuda" if use_kernels is None else use_kernels
        graph = model.graph
        missing = sorted({f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in graph if not supported(n)})
        if missing:
            raise XoptError(f"the CUDA backend cannot run {', '.join(missing)}")
        self.input_names = [value.name for value in graph.inputs]
        self.output_names = [value.name for value in graph.outputs]
        self.constants = {
            name: self._constant(value) for name, value in graph.initializers.items() if value.const_value is not None
        }
        self.steps = self._plan(graph)

    def _constant(self, value: ir.Value) -> torch.Tensor:
        array = value.const_value.numpy()
        tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
        if tensor.dtype == torch.int64 and tensor.numel() <= HOST_CONSTANT_LIMIT:
            return tensor
        return tensor.to(self.device)

    def _plan(self, graph: ir.Graph) -> list[_Step]:
        steps = []
        for node in graph:
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            fused = (domain, node.op_type) in FUSED_TABLE
            steps.append(
                _Step(
                    node,
                    [value.name if value is not None else None for value in node.inputs],
                    [value.name for value in node.outputs],
                    HOST_INPUTS.get(node.op_type, frozenset()) if not fused else frozenset(),
                    fused,
                    [],
                )
            )
        last_reader: dict[str, int] = {}
        for index, step in enumerate(steps):
            for name in step.inputs:
                if name and name not in self.constants:
                    last_reader[name] = index
        for name, index in last_reader.items():
            if name not in self.output_names:
                steps[index].release.append(name)
        return steps

    def run(self, feeds: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        unknown = set(feeds) - set(self.input_names)
        absent = [name for name in self.input_names if name not in feeds]
        if unknown or absent:
            raise XoptError(f"feeds do not match the model's inputs (missing {absent}, unknown {sorted(unknown)})")
        values = {name: self.to_device(array) for name, array in feeds.items()}
        with torch.inference_mode():
            for step in self.steps:
                inputs = [
                    self._input(values, name, position in step.host_inputs) for position, name in enumerate(step.inputs)
                ]
                node = step.node
                if step.fused:
                    domain = "" if node.domain in ("", "ai.onnx") else node.domain
                    outputs = FUSED_TABLE[(domain, node.op_type)](node, inputs, self.use_kernels)
                else:
                    outputs = STANDARD_OPS[node.op_type](node, inputs)
                for name, tensor in zip(step.outputs, outputs, strict=False):
                    if name and tensor is not None:
                        values[name] = tensor
                for name in step.release:
                    values.pop(name, None)
        return {name: values[name] for name in self.output_names}

    def to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
        return tensor.to(self.device)

    def _input(self, values: dict[str, torch.Tensor], name: str | None, host: bool) -> torch.Tensor | None:
        if not name:
            return None
        tensor = values[name] if name in values else self.constants[name]
        if host:
            return tensor.cpu()
        return tensor.to(self.device) if tensor.device != self.device else tensor

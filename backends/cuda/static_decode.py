"""Generation on xopt's CUDA backend with the KV cache in fixed buffers and, on a GPU, every decode
step replayed as one CUDA graph.

The cache holds `capacity` = prompt + new tokens positions per layer (op_context.StaticCache), so
a decode step's tensors have the same shapes at every step: the new token's id and the filled
length are written into device buffers the step reads, and the step itself (hundreds of kernel
launches) is captured once, after two warm-up runs on a side stream, then replayed; Python no
longer runs per operator. Prefill (S prompt tokens) runs op by op on the same buffers. The
contract of the fixed buffers: rows without padding, positions contiguous (what
`fuse(positions=contiguous)` already assumes); the model's attention mask is only checked.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from xopt import kv_cache
from xopt.backends.cuda.executor import GraphExecutor
from xopt.backends.cuda.op_context import StaticCache
from xopt.backends.cuda.standard_ops import torch_dtype
from xopt.errors import XoptError


class StaticDecodeCache:
    """The `xopt.generate.Decoder` cache for a `GraphExecutor` planned with `static_cache=True`."""

    def __init__(self, executor: GraphExecutor, model: ir.Model, capacity: int, batch: int = 1):
        if not executor.static_cache:
            raise XoptError("StaticDecodeCache needs a GraphExecutor planned with static_cache=True")
        self.executor, self.capacity = executor, capacity
        device = executor.device
        self.cache = StaticCache(lengths=torch.zeros(batch, dtype=torch.int64, device=device))
        for past in kv_cache.past_inputs(model):
            shape = kv_cache.cache_shape(past, batch, capacity)
            buffer = torch.zeros(shape, dtype=torch_dtype(past.dtype), device=device)
            (self.cache.keys if past.name.endswith(".key") else self.cache.values)[past.name] = buffer
        self.use_graph = device.type == "cuda" and "attention_mask" not in executor.inputs_read
        self.graph: torch.cuda.CUDAGraph | None = None
        self.step_ids = torch.zeros((batch, 1), dtype=torch.int64, device=device)
        self.step_mask = torch.ones((batch, 1), dtype=torch.int64, device=device)  # not read: shape only
        self.graph_logits: torch.Tensor | None = None
        self.host_memo: dict[str, torch.Tensor] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits [batch, 1, vocab] of the last position of one step on `feeds` (input_ids and
        attention_mask; the mask's width is the length after this step)."""
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        length = mask.shape[1]
        if length > self.capacity:
            raise XoptError(f"the cache holds {self.capacity} positions, {length} asked for")
        if not np.all(mask):
            raise XoptError("the static KV cache takes rows without padding")
        self.cache.lengths.fill_(length)
        if ids.shape[1] == 1 and self.use_graph:
            self.step_ids.copy_(torch.from_numpy(ids))
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.graph_logits
        else:
            logits = self.executor.run(feeds, self.cache)["logits"]
        return logits[:, -1:].float().cpu().numpy()

    def _capture(self) -> None:
        feeds = {"input_ids": self.step_ids, "attention_mask": self.step_mask}
        memo = self.host_memo  # kept alive with the graph: replays read these device copies
        side = torch.cuda.Stream(self.executor.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: allocations settle, host values reach the memo
            for _ in range(2):
                self.executor.run(feeds, self.cache, memo)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self.executor.run(feeds, self.cache, memo)["logits"]

"""What an operator of the CUDA backend is told besides its inputs: whether to use xopt's kernels,
the fixed-buffer KV cache when the decoder runs on one, and a memo of facts computed once per run.

A `StaticCache` holds each layer's keys and values in buffers of a fixed `capacity` positions,
[batch, kv_heads, capacity, head_size], and `lengths`, the filled positions of each row after the
step being run (a device tensor). GroupQueryAttention then writes its new keys and values into the
buffers at lengths − S … lengths − 1 and attends to the first `lengths` positions; no tensor's shape
depends on the step, which is what lets the decode step be captured once as a CUDA graph and
replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StaticCache:
    lengths: torch.Tensor  # int64 [batch] on the device
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # past-key input name → buffer
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # past-value input name → buffer


@dataclass
class OpContext:
    use_kernels: bool
    static_cache: StaticCache | None = None
    memo: dict = field(default_factory=dict)  # facts computed once per run (e.g. the packing of a padded batch)

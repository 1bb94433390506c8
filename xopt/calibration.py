"""Calibration data and activation statistics for lossy passes.

Calibration text (the bundled opening of *Emma* unless the user gives a file; never the
evaluation text) is tokenized with the model's own tokenizer and cut into the first `windows`
non-overlapping windows of `window` tokens (shorter when the model's context is), each fed as
one unpadded sequence (an empty KV cache for a decoder). Statistics come from running the model
in ONNX Runtime with the values of interest added as graph outputs; for a value x of width d,
over every token t of every window:

    M(x) = Σ_t x_t x_tᵀ   [d, d], accumulated in float64,   n = number of tokens

the second moment of a linear's input, from which GPTQ's Hessian (2M/n) and SVD-LLM's whitening
are formed. Memory is Σ d² per value asked for, whatever the amount of text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from xopt.backends.onnxruntime import create_session, run
from xopt.capture.huggingface import source_context_length, source_tokenizer
from xopt.errors import XoptError
from xopt.inputs import text_feeds
from xopt.text import read_text

logger = logging.getLogger(__name__)

DEFAULT_WINDOW, DEFAULT_WINDOWS = 512, 8


@dataclass
class SecondMoment:
    matrix: np.ndarray  # Σ x xᵀ, float64 [d, d]
    tokens: int


def calibration_feeds(
    model: ir.Model,
    text_file: str | Path | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    windows: int = DEFAULT_WINDOWS,
) -> list[dict[str, np.ndarray]]:
    """Model inputs for the first `windows` windows of the calibration text (fewer if it is short)."""
    text = read_text(Path(text_file) if text_file else None, "calibration")
    tokenizer = source_tokenizer(model)
    window = min(window, source_context_length(model) or window)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    count = min(windows, len(ids) // window)
    if count == 0:
        raise XoptError(f"the calibration text has {len(ids)} tokens, fewer than one window of {window}")
    feeds = []
    for start in range(0, count * window, window):
        tokens = ids[start : start + window][None, :]
        feeds.append(text_feeds(model, {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}))
    return feeds


def second_moments(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]], *, threads: int | None = None
) -> dict[str, SecondMoment]:
    """Σ x xᵀ over the calibration tokens of each value in `values` (by value name)."""
    names = list(dict.fromkeys(_named(value) for value in values))
    probe = model.clone()
    by_name = {v.name: v for node in probe.graph for v in node.outputs}
    by_name.update({v.name: v for v in probe.graph.inputs})
    existing = {v.name for v in probe.graph.outputs}
    for name in names:
        if name not in existing:
            probe.graph.outputs.append(by_name[name])
    session = create_session(probe, threads=threads)
    moments: dict[str, SecondMoment] = {}
    for feed in feeds:
        outputs = run(session, feed, names)
        for name, array in outputs.items():
            x = array.reshape(-1, array.shape[-1]).astype(np.float64)
            if name not in moments:
                moments[name] = SecondMoment(np.zeros((x.shape[1], x.shape[1])), 0)
            moments[name].matrix += x.T @ x
            moments[name].tokens += x.shape[0]
    return moments


def _named(value: ir.Value) -> str:
    if not value.name:
        raise XoptError("a value to calibrate has no name; run cleanup first")
    return value.name

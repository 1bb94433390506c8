"""Calibration data and activation statistics for lossy passes.

Calibration text (the bundled opening of *Emma* unless the user gives a file; never the
evaluation text) is tokenized with the model's own tokenizer. A causal LM reads the first
`windows` non-overlapping windows of `window` tokens (shorter when the model's context is), each
fed as one unpadded sequence (an empty KV cache). An encoder reads what it serves: padded batches
of 32 sentences (up to 128 tokens), `windows` of them — padding rows take part in a run-time
quantization range, so they must be there when that range is simulated (on MiniLM, int8 with
smoothing calibrated on 512-token windows: sentence cosine to fp32 min 0.9945, mean 0.9980; on
sentence batches: 0.9959, 0.9984). Statistics come from running the model
in ONNX Runtime with the values of interest added as graph outputs; for a value x of width d,
over every token t of every window:

    M(x) = Σ_t x_t x_tᵀ   [d, d], accumulated in float64,   n = number of tokens

the second moment of a linear's input, from which GPTQ's Hessian (2M/n) and SVD-LLM's whitening
are formed. Memory is Σ d² per value asked for, whatever the amount of text. For simulating
run-time activation quantization, `activation_samples` keeps per run each channel's range (the
run's quantization range follows from it) and a fixed-seed random subset of the run's token rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from scipy.linalg.blas import dsyrk

from xopt.backends.onnxruntime import create_session, run
from xopt.capture.huggingface import TASK_CAUSAL_LM, source_context_length, source_tokenizer
from xopt.errors import XoptError, counted
from xopt.evaluate import SENTENCE_BATCH, sentence_batches
from xopt.inputs import text_feeds
from xopt.runnable import model_task
from xopt.text import note_calibration_text, read_text, split_sentences

logger = logging.getLogger(__name__)

DEFAULT_WINDOW, DEFAULT_WINDOWS = 512, 8
SAMPLE_ROWS = 128


@dataclass
class SecondMoment:
    matrix: np.ndarray  # Σ x xᵀ, float64 [d, d]
    absolute: np.ndarray  # Σ |x|, float64 [d]
    tokens: int


@dataclass
class ActivationSample:
    """A value's activations, per calibration run (one window): each channel's min and max over
    the run, and a random subset of the run's token rows."""

    low: list[np.ndarray]  # [d] per run
    high: list[np.ndarray]  # [d] per run
    rows: list[np.ndarray]  # [≤ SAMPLE_ROWS, d] per run

    def absmax(self) -> np.ndarray:
        """max |x_j| over all runs, per channel j."""
        return np.max([np.maximum(-low, high) for low, high in zip(self.low, self.high, strict=True)], axis=0)


def calibration_feeds(
    model: ir.Model,
    text_file: str | Path | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    windows: int = DEFAULT_WINDOWS,
) -> list[dict[str, np.ndarray]]:
    """Model inputs for the first `windows` windows of the calibration text (fewer if it is short);
    for an encoder, the first `windows` padded batches of its sentences."""
    text = read_text(Path(text_file) if text_file else None, "calibration")
    tokenizer = source_tokenizer(model)
    if model_task(model) != TASK_CAUSAL_LM:
        sentences = split_sentences(text)[: windows * SENTENCE_BATCH]
        note_calibration_text(text, read=" ".join(sentences))
        return [text_feeds(model, batch) for batch in sentence_batches(tokenizer, sentences)]
    window = min(window, source_context_length(model) or window)
    fast = getattr(tokenizer, "is_fast", False)  # only a fast tokenizer tells where each token came from
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    count = min(windows, len(ids) // window)
    if count == 0:
        raise XoptError(f"the calibration text has {counted(len(ids), 'token')}, fewer than one window of {window}")
    note_calibration_text(text, read=text[: encoded["offset_mapping"][count * window - 1][1]] if fast else text)
    feeds = []
    for start in range(0, count * window, window):
        tokens = ids[start : start + window][None, :]
        feeds.append(text_feeds(model, {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}))
    return feeds


def second_moments(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]], *, threads: int | None = None
) -> dict[str, SecondMoment]:
    """Σ x xᵀ and Σ |x| over the calibration tokens of each value in `values` (by value name). The
    sums of products go through BLAS's symmetric rank-k update (one triangle, half a matrix
    product's work), mirrored once at the end."""
    moments: dict[str, SecondMoment] = {}
    for outputs in probe_values(model, values, feeds, threads=threads):
        for name, array in outputs.items():
            x = array.reshape(-1, array.shape[-1]).astype(np.float64)
            if name not in moments:
                moments[name] = SecondMoment(np.zeros((x.shape[1], x.shape[1]), order="F"), np.zeros(x.shape[1]), 0)
            moment = moments[name]
            moment.matrix = dsyrk(1.0, x.T, beta=1.0, c=moment.matrix, overwrite_c=True)  # upper: Σ x xᵀ
            moment.absolute += np.abs(x).sum(axis=0)
            moment.tokens += x.shape[0]
    for moment in moments.values():
        moment.matrix = np.triu(moment.matrix) + np.triu(moment.matrix, 1).T
    return moments


def activation_samples(
    model: ir.Model,
    values: Sequence[ir.Value],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    rows: int = SAMPLE_ROWS,
    threads: int | None = None,
) -> dict[str, ActivationSample]:
    """Per calibration run, each value's channel ranges and `rows` of its tokens drawn at random."""
    generator = np.random.default_rng(0)
    samples: dict[str, ActivationSample] = {}
    for outputs in probe_values(model, values, feeds, threads=threads):
        for name, array in outputs.items():
            x = array.reshape(-1, array.shape[-1])
            sample = samples.setdefault(name, ActivationSample([], [], []))
            sample.low.append(x.min(axis=0))
            sample.high.append(x.max(axis=0))
            sample.rows.append(x[np.sort(generator.choice(len(x), min(rows, len(x)), replace=False))])
    return samples


def probe_values(
    model: ir.Model, values: Sequence[ir.Value], feeds: Sequence[dict[str, np.ndarray]], *, threads: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the arrays of `values` (by name) in one ONNX Runtime run of the model."""
    names = list(dict.fromkeys(_named(value) for value in values))
    probe = model.clone()
    by_name = {v.name: v for node in probe.graph for v in node.outputs}
    by_name.update({v.name: v for v in probe.graph.inputs})
    existing = {v.name for v in probe.graph.outputs}
    for name in names:
        if name not in existing:
            probe.graph.outputs.append(by_name[name])
    session = create_session(probe, threads=threads)
    for feed in feeds:
        yield run(session, feed, names)


def _named(value: ir.Value) -> str:
    if not value.name:
        raise XoptError("a value to calibrate has no name; run cleanup first")
    return value.name

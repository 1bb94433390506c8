"""Quality metrics of the task, on text: what `xopt eval` measures.

Causal LM, over non-overlapping windows of W tokens (default 512) of the text, predicting tokens
2..W of each window from the ones before (N predicted tokens in all):

    perplexity = exp( −(1/N) Σ log p(xₜ | x<ₜ) )
    KL         = (1/N) Σ Σᵥ p_ref(v | x<ₜ) · (log p_ref(v | x<ₜ) − log p(v | x<ₜ))   (against a reference)
    top-1      = (1/N) Σ [argmax p = argmax p_ref]

Log-probabilities are taken in float64 from the float32 logits, `ROWS_AT_ONCE` positions at a time
rather than a whole window at once (200 MB per float64 array for SmolLM2's [511, 49152]): its
int4 quality line (4 windows, the input's logits and the output's) took 13.1–14.7 s with whole
windows, 10.4–10.7 s in blocks (three runs each, alternating), the same figures to 1e-15.

Encoder: sentence embeddings are the mean of the last hidden state over the attention mask (as
sentence-transformers does); against a reference, the cosine of each sentence's two embeddings,
min and mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from xopt.backends.onnxruntime import create_session, run
from xopt.capture.huggingface import TASK_CAUSAL_LM, source_folder
from xopt.errors import XoptError, counted
from xopt.generate import logits_output, logits_row
from xopt.inputs import text_feeds
from xopt.kv_cache import context_limit
from xopt.runnable import Runnable, model_task
from xopt.text import split_sentences

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 512
DEFAULT_MAX_SENTENCES = 256
COST_WINDOWS, COST_SENTENCES = 4, 64  # what a lossy pipeline's cost is measured on (`quality_cost`)
SENTENCE_BATCH, SENTENCE_MAX_TOKENS = 32, 128
ROWS_AT_ONCE = 64  # positions whose log-probabilities are computed together (SmolLM2's: 25 MB of float64)


@dataclass
class Quality:
    """The JSON of `xopt eval`; metrics that do not apply are None."""

    task: str
    tokens: int
    perplexity: float | None = None
    reference_perplexity: float | None = None  # the reference's, on the same windows
    kl: float | None = None
    top1_agreement: float | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    windows: int | None = None
    sentences: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: Runnable,
    text: str,
    reference: Runnable | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    max_windows: int | None = None,
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    progress: Callable[[Iterator, int], Iterator] = lambda items, total: items,
) -> Quality:
    """Measure `model` on `text`, and against `reference` when given: a causal LM on the text's
    first `max_windows` windows (all when None), an encoder on its first `max_sentences` sentences."""
    if reference is not None and reference.task != model.task:
        raise XoptError(f"{model.label} is a {model.task} model but the reference is a {reference.task} model")
    if model.task == TASK_CAUSAL_LM:
        return _causal_lm_quality(model, text, reference, window, max_windows, progress)
    if reference is None:
        raise XoptError(
            f"{model.label}: an embedding model is measured against a reference model: give --reference "
            "(a model without a `logits` output is taken for one)"
        )
    return _encoder_quality(model, text, reference, max_sentences, progress)


def _causal_lm_quality(model, text, reference, window, max_windows, progress) -> Quality:
    if window < 2:
        raise XoptError(f"window of {window} tokens: need at least 2")
    if max_windows is not None and max_windows < 1:
        raise XoptError(f"at most {max_windows} windows: need at least 1")
    ids = np.asarray(model.tokenizer()(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    count = len(ids) // window
    if count == 0:
        raise XoptError(f"the text has {counted(len(ids), 'token')}, fewer than one window of {window}")
    count = count if max_windows is None else min(count, max_windows)
    ids = ids[: count * window]  # only what is measured is checked against the model's limits
    for runnable in (model, reference) if reference is not None else (model,):
        _check_runs_on(runnable, ids, window)
    scores = WindowScores()
    for start in progress(range(0, count * window, window), count):
        tokens = ids[start : start + window]
        logits, reference_logits = causal_logits(model, tokens), None
        if reference is not None:
            reference_logits = causal_logits(reference, tokens)
            if reference_logits.shape != logits.shape:
                raise XoptError(_differs(reference, "vocabulary", reference_logits.shape[-1], model, logits.shape[-1]))
        scores.add(tokens, logits, reference_logits)
    return scores.quality()


@dataclass
class WindowScores:
    """The causal-LM metrics' running sums, window by window: also for a model outside ONNX
    Runtime (the decode benchmark's llama.cpp) scored against an ONNX reference."""

    nll: float = 0.0
    reference_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    predicted: int = 0
    windows: int = 0
    against_reference: bool = False

    def add(self, tokens: np.ndarray, logits: np.ndarray, reference_logits: np.ndarray | None = None) -> None:
        """One window: its token ids [W] and the logits [W−1, vocabulary] predicting tokens 2..W
        (and a reference model's, of the same shape, for KL and top-1), or log-probabilities
        (which log-softmax leaves as they are); `ROWS_AT_ONCE` positions at a time."""
        targets = tokens[1:]
        for start in range(0, len(targets), ROWS_AT_ONCE):
            rows = slice(start, start + ROWS_AT_ONCE)
            log_probs, picked = log_softmax(logits[rows]), targets[rows, None]
            self.nll -= float(np.take_along_axis(log_probs, picked, -1).sum())
            if reference_logits is not None:
                reference = log_softmax(reference_logits[rows])
                self.reference_nll -= float(np.take_along_axis(reference, picked, -1).sum())
                self.kl += kl_sum(reference, log_probs)
                self.agree += int(np.sum(reference.argmax(-1) == log_probs.argmax(-1)))
        self.predicted += len(targets)
        self.windows += 1
        self.against_reference |= reference_logits is not None

    def quality(self) -> Quality:
        quality = Quality(
            TASK_CAUSAL_LM, self.predicted, perplexity=float(np.exp(self.nll / self.predicted)), windows=self.windows
        )
        if self.against_reference:
            quality.kl, quality.top1_agreement = self.kl / self.predicted, self.agree / self.predicted
            quality.reference_perplexity = float(np.exp(self.reference_nll / self.predicted))
        return quality


def quality_cost(before: ir.Model, after: ir.Model, text: str, *, threads: int | None = None) -> Quality:
    """What a lossy pipeline cost: `after` measured against `before` on `text` (the bundled
    evaluation text, disjoint from the calibration text), with the tokenizer of the folder
    `before` was captured from. A causal LM on its first `COST_WINDOWS` windows (both perplexities, KL and
    top-1 from `before`), an encoder on its first `COST_SENTENCES` sentences (embedding cosine)."""
    source = source_folder(before)
    if source is None:
        raise XoptError("no tokenizer: the model was not captured from a Hugging Face folder here")
    gguf_file = before.metadata_props.get("xopt.gguf_file")
    before_run, after_run = (
        Runnable(label, model, create_session(model, threads=threads), model_task(model), source, gguf_file=gguf_file)
        for label, model in (("the input", before), ("the output", after))
    )
    window = min([DEFAULT_WINDOW, *(limit for limit, _ in map(context_limit, (before, after)) if limit)])
    return evaluate(after_run, text, before_run, window=window, max_windows=COST_WINDOWS, max_sentences=COST_SENTENCES)


def causal_logits(model: Runnable, tokens: np.ndarray) -> np.ndarray:
    """The logits [W−1, vocabulary] of a causal LM on one window of token ids [W], predicting tokens 2..W."""
    feeds = {"input_ids": tokens[None, :], "attention_mask": np.ones_like(tokens)[None, :]}
    return _logits(model, feeds)[0, :-1]


def _check_runs_on(model: Runnable, ids: np.ndarray, window: int) -> None:
    """Windows within the model's positions, token ids within its vocabulary (ONNX Runtime would
    fail on an out-of-range Gather index, or read past a rotary table)."""
    limit, source = context_limit(model.model)
    if limit is not None and window > limit:
        raise XoptError(f"a window of {window} tokens: {model.label}: {source} {limit} positions; give a smaller one")
    logits = logits_output(model.model)
    if logits is not None and logits.shape is not None and len(logits.shape) == 2:
        raise XoptError(
            f"{model.label} returns logits of shape {logits.shape}, one row per sequence (a classifier): "
            "xopt eval measures language models (perplexity) and encoders (embedding cosine)"
        )
    row = logits_row(model.model)
    if row is not None and int(ids.max()) >= row[0]:
        raise XoptError(f"the tokenizer gives id {int(ids.max())}, outside {model.label}'s vocabulary of {row[0]}")


def _differs(reference: Runnable, what: str, theirs: int, model: Runnable, ours: int) -> str:
    return f"the reference {reference.label}'s {what} ({theirs}) differs from {model.label}'s ({ours})"


def _logits(model: Runnable, feeds: dict[str, np.ndarray]) -> np.ndarray:
    names = [o.name for o in model.session.get_outputs()]
    wanted = [n for n in names if "logits" in n.lower()][:1] or names[:1]
    logits = run(model.session, _text_feeds(model, feeds), wanted)[wanted[0]]
    if logits.shape[1] != feeds["input_ids"].shape[1]:
        raise XoptError(
            f"{model.label} returns logits for {logits.shape[1]} of {feeds['input_ids'].shape[1]} positions "
            "(last-token-logits): perplexity needs every position; evaluate the model before that pass"
        )
    return logits


def _text_feeds(model: Runnable, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        return text_feeds(model.model, feeds)
    except XoptError as error:
        raise XoptError(f"{model.label}: {error}") from None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64 (computed `ROWS_AT_ONCE` rows at a time in the output)."""
    out = np.empty(logits.shape, dtype=np.float64)
    for block, source in zip(_row_blocks(out), _row_blocks(logits), strict=True):
        block[:] = source
        block -= block.max(axis=-1, keepdims=True)
        block -= np.log(np.exp(block).sum(axis=-1, keepdims=True))
    return out


def kl_sum(reference_log_probs: np.ndarray, log_probs: np.ndarray) -> float:
    """Σ over every position of KL(p_ref ‖ p) = Σᵥ p_ref·(log p_ref − log p), the last axis the
    vocabulary (`ROWS_AT_ONCE` rows at a time)."""
    blocks = zip(_row_blocks(reference_log_probs), _row_blocks(log_probs), strict=True)
    return sum(float(np.sum(np.exp(reference) * (reference - model))) for reference, model in blocks)


def _row_blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    """Views of `ROWS_AT_ONCE` rows each of `array` as rows of its last axis."""
    rows = array.reshape(-1, array.shape[-1])
    return (rows[start : start + ROWS_AT_ONCE] for start in range(0, len(rows), ROWS_AT_ONCE))


def _encoder_quality(model, text, reference, max_sentences, progress) -> Quality:
    batches = sentence_batches(model.tokenizer(), split_sentences(text)[:max_sentences])
    cosines, tokens = [], 0
    for feeds in progress(iter(batches), len(batches)):
        tokens += int(feeds["attention_mask"].sum())
        ours, theirs = _embed(model, feeds), _embed(reference, feeds)
        if ours.shape != theirs.shape:
            raise XoptError(_differs(reference, "hidden size", theirs.shape[-1], model, ours.shape[-1]))
        cosines.append(cosine(ours, theirs))
    quality = Quality(model.task, tokens, sentences=sum(len(feeds["input_ids"]) for feeds in batches))
    all_cosines = np.concatenate(cosines)
    quality.cosine_min, quality.cosine_mean = float(all_cosines.min()), float(all_cosines.mean())
    return quality


def sentence_batches(tokenizer, sentences: list[str]) -> list[dict[str, np.ndarray]]:
    """`sentences` (`text.split_sentences`), tokenized in padded batches."""
    if not sentences:
        raise XoptError("the text has no sentence of four words or more")
    batches = []
    for start in range(0, len(sentences), SENTENCE_BATCH):
        encoded = tokenizer(
            sentences[start : start + SENTENCE_BATCH],
            padding=True,
            truncation=True,
            max_length=SENTENCE_MAX_TOKENS,
            return_tensors="np",
        )
        batches.append({k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    return batches


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [n, d] arrays."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed(model: Runnable, feeds: dict[str, np.ndarray]) -> np.ndarray:
    hidden = next(iter(run(model.session, _text_feeds(model, feeds)).values())).astype(np.float64)
    return mean_pool(hidden, feeds["attention_mask"])


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: mean over unmasked tokens."""
    weights = mask[..., None].astype(hidden.dtype)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)

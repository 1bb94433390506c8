"""Text generation with a KV-cache decoder in ONNX Runtime (or xopt's CUDA backend): what `xopt generate` runs.

Prefill runs the whole prompt on an empty cache (past length 0) and yields the first new token;
each decode step feeds that token alone, the attention mask grown by one, and the cache: the
previous step's `present.*` outputs as `past_key_values.*` (the convention of `xopt.kv_cache`),
kept as ONNX Runtime values so they never pass through numpy; or, when the model updates its
cache in place (`kv_cache.shares_buffers`), one preallocated buffer per layer of prompt +
max-new-tokens positions bound as both past and present, so no step copies the cache (and a
decode step's logits are written into a numpy array bound as the output). Greedy
decoding takes argmax of the last position's logits; with temperature T > 0 the next token is
drawn from softmax(logits / T) with a seeded generator, so a run is reproducible.

Reported: prefill latency (prompt → first token's logits) and decode throughput, the new tokens
after the first divided by the time of the decode steps (the same split transformers,
onnxruntime-genai and llama.cpp report).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from xopt import kv_cache
from xopt.errors import XoptError, counted
from xopt.kv_cache import POSITION_IDS
from xopt.runnable import Runnable


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    prefill_ms: float = 0.0
    decode_seconds: float = 0.0
    stopped_at_eos: bool = False

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.tokens),
            "prefill_ms": self.prefill_ms,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "stopped_at_eos": self.stopped_at_eos,
        }


class CopiedCache:
    """Each step's presents fed back as the next step's pasts, kept as ONNX Runtime values."""

    def __init__(self, session: ort.InferenceSession, model, batch: int = 1):
        self.session = session
        self.pasts = [v.name for v in kv_cache.past_inputs(model)]
        self.output_names = ["logits", *(kv_cache.present_for(name) for name in self.pasts)]
        self.values = {name: _ort(array) for name, array in kv_cache.empty_cache(model, batch).items()}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits of one step on `feeds` (the inputs other than the cache)."""
        values = {**{name: _ort(array) for name, array in feeds.items()}, **self.values}
        logits, *presents = self.session.run_with_ort_values(self.output_names, values)
        self.values = dict(zip(self.pasts, presents, strict=True))
        return logits.numpy()


class InPlaceCache:
    """One buffer of `capacity` positions per layer, bound as both past and present, which the
    model updates in place (`kv_cache.shares_buffers`): nothing is copied between steps."""

    def __init__(self, session: ort.InferenceSession, model, capacity: int, batch: int = 1):
        self.session, self.capacity = session, capacity
        self.logits_row = logits_row(model)  # (vocab, dtype) where the model states its vocabulary
        self.binding = session.io_binding()
        self.binding.bind_output("logits")  # first, so it is get_outputs()[0]
        self.buffers = []
        for past in kv_cache.past_inputs(model):
            try:
                zeros = np.zeros(kv_cache.cache_shape(past, batch, capacity), past.dtype.numpy())
            except MemoryError:
                raise XoptError(f"a cache of {capacity} positions does not fit in memory") from None
            self.buffers.append(buffer := _ort(zeros))
            self.binding.bind_ortvalue_input(past.name, buffer)
            self.binding.bind_ortvalue_output(kv_cache.present_for(past.name), buffer)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits of one step on `feeds` (the inputs other than the cache)."""
        length = feeds["attention_mask"].shape[1]
        if length > self.capacity:
            raise XoptError(f"the cache holds {self.capacity} positions, {length} asked for")
        for name, array in feeds.items():
            self.binding.bind_cpu_input(name, array)
        batch, sequence = feeds["input_ids"].shape
        if sequence == 1 and self.logits_row is not None:
            # a decode step writes its [batch, 1, vocab] logits into a numpy array bound as the
            # output: reading them back through get_outputs() would wrap every bound present too
            vocab, dtype = self.logits_row
            logits = np.empty((batch, 1, vocab), dtype)
            self.binding.bind_output("logits", "cpu", 0, logits.dtype.type, logits.shape, logits.ctypes.data)
            self.session.run_with_iobinding(self.binding)
            return logits
        self.binding.bind_output("logits")
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()


def logits_output(model):
    """The graph output named `logits`, if any."""
    return next((value for value in model.graph.outputs if value.name == "logits"), None)


def logits_row(model) -> tuple[int, np.dtype] | None:
    """The vocabulary size and dtype of the `logits` output, or None where its last dim is symbolic."""
    logits = logits_output(model)
    vocab = logits.shape[-1] if logits is not None and logits.shape is not None else None
    return (vocab, logits.dtype.numpy()) if isinstance(vocab, int) else None


class ExecutorCache:
    """Each step's presents fed back as the next step's pasts, kept as torch tensors on the
    device of xopt's CUDA backend (`GraphExecutor`); only the last position's logits come back."""

    def __init__(self, executor, model, batch: int = 1):
        self.executor = executor
        self.pasts = [v.name for v in kv_cache.past_inputs(model)]
        self.values = {name: executor.to_device(array) for name, array in kv_cache.empty_cache(model, batch).items()}

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Logits [batch, 1, vocab] of the last position of one step on `feeds` (the inputs other than the cache)."""
        outputs = self.executor.run({**feeds, **self.values})
        self.values = {past: outputs[kv_cache.present_for(past)] for past in self.pasts}
        return outputs["logits"][:, -1:].float().cpu().numpy()


def _ort(array: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(array)


class Decoder:
    """Runs a KV-cache causal LM session token by token, with its cache updated in place when the
    model allows it (`kv_cache.shares_buffers`) and copied from step to step otherwise."""

    def __init__(self, runnable: Runnable):
        if not kv_cache.has_kv_cache(runnable.model):
            raise XoptError(f"{runnable.label}: not a decoder with a KV cache (no past_key_values.* inputs)")
        self.runnable = runnable
        self.session = runnable.session
        self.on_executor = not isinstance(self.session, ort.InferenceSession)
        declared = set(self.session.input_names) if self.on_executor else {i.name for i in self.session.get_inputs()}
        fed = {"input_ids", "attention_mask", POSITION_IDS}
        unknown = declared - fed - {v.name for v in kv_cache.past_inputs(runnable.model)}
        if unknown:
            raise XoptError(f"{runnable.label}: cannot feed input {sorted(unknown)[0]!r} when generating")
        self.takes_positions = POSITION_IDS in declared  # Hugging Face Optimum's exports do
        self.in_place = kv_cache.shares_buffers(runnable.model)
        self.static = None  # the CUDA backend's fixed-buffer cache, kept for generations of the same length
        self.position_limit, self.limit_source = kv_cache.context_limit(runnable.model)
        row = logits_row(runnable.model)
        self.vocab = row[0] if row is not None else None

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        eos_token_id: int | None = None,
        on_token: Callable[[int], None] = lambda token: None,
    ) -> Generation:
        """Generate up to `max_new_tokens` after `prompt_ids`, stopping at `eos_token_id` if given."""
        if not prompt_ids:
            raise XoptError("the prompt is empty")
        if max_new_tokens < 1:
            raise XoptError(f"--max-new-tokens {max_new_tokens}: need at least 1")
        if not 0 <= temperature < float("inf"):
            raise XoptError(f"--temperature {temperature}: must be a finite number, not negative")
        if seed < 0:
            raise XoptError(f"--seed {seed}: must not be negative")
        limit = self.position_limit
        if limit is not None and len(prompt_ids) + max_new_tokens > limit:
            asked = f"{counted(len(prompt_ids), 'prompt token')} + {counted(max_new_tokens, 'new one')}"
            raise XoptError(f"{asked}: {self.limit_source} {limit} positions")
        vocab = self.vocab
        if vocab is not None and not 0 <= min(prompt_ids) <= max(prompt_ids) < vocab:
            outside = next(i for i in prompt_ids if not 0 <= i < vocab)
            raise XoptError(f"prompt token id {outside} is outside {self.runnable.label}'s vocabulary of {vocab}")
        rng = np.random.default_rng(seed)
        result = Generation(prompt_tokens=len(prompt_ids))
        model = self.runnable.model
        if self.on_executor and self.session.static_cache:
            cache = self._static_cache(len(prompt_ids) + max_new_tokens)
        elif self.on_executor:
            cache = ExecutorCache(self.session, model)
        elif self.in_place:
            cache = InPlaceCache(self.session, model, capacity=len(prompt_ids) + max_new_tokens)
        else:
            cache = CopiedCache(self.session, model)
        new_ids = prompt_ids
        decode_start = None
        for step in range(max_new_tokens):
            start = time.perf_counter()
            length = len(prompt_ids) + len(result.tokens)
            ids, mask = np.asarray([new_ids], dtype=np.int64), np.ones((1, length), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask}
            if self.takes_positions:
                feeds[POSITION_IDS] = np.arange(length - len(new_ids), length, dtype=np.int64)[None]
            logits = cache.run(feeds)
            if step == 0:
                result.prefill_ms = 1000 * (time.perf_counter() - start)
                decode_start = time.perf_counter()
            token = _next_token(logits[0, -1], temperature, rng)
            result.tokens.append(token)
            on_token(token)
            if token == eos_token_id:
                result.stopped_at_eos = True
                break
            new_ids = [token]
        result.decode_seconds = time.perf_counter() - decode_start
        return result

    def _static_cache(self, capacity: int):
        """The CUDA backend's fixed-buffer cache of `capacity` positions: reused while the capacity
        is the same (positions past the filled length are never read), so its CUDA graph is
        captured once, not per generation."""
        from xopt.backends.cuda.static_decode import StaticDecodeCache

        if self.static is None or self.static.capacity != capacity:
            self.static = StaticDecodeCache(self.session, self.runnable.model, capacity)
        return self.static


def _next_token(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probabilities = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probabilities), p=probabilities / probabilities.sum()))

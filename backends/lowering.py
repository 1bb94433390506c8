"""Lowering chosen by measurement: time a candidate lowering against the current form on this
machine's ONNX Runtime, once, and remember the verdict.

Which form of a subgraph runs fastest depends on the operator, the shapes, the ORT build and the
CPU (a fused contrib op can be several times slower than the standard ops it replaces on one
machine and faster on another), so it is measured, not assumed. Both models run in sessions of
this process with the same thread count, spinning off, on the same sample inputs, in interleaved
rounds (median of `rounds` after `warmup`, in two halves: see below); the candidate is kept only
when `median(current) / median(candidate) ≥ min_speedup`: a tie keeps the standard form. The two
medians are kept with the verdict (a report shows the time before and after). For a decoder
with a KV cache the time compared is that of a generation: prefill of S tokens plus S decode
steps of one token on a past of S (`t_prefill + S · t_step`), since a lowering can speed one
and slow the other; a model that can update its cache in place is timed so (one buffer per layer
bound as past and present, as `xopt generate` runs it). A first
ratio within `NEAR_TIE` of the threshold is measured again over twice the rounds and each form's
two medians are averaged, weighted by rounds, so that a verdict rests on more samples where noise
could flip it. A candidate that costs accuracy (`lossy`: `quantize`'s symmetric grids and its
accuracy level 4, `low-rank`'s factored pairs) is held to more: near the threshold, each of the
two measurements must reach it (the verdict and the times cached are those of the one with the
lower speedup), since a keep that noise made would cost quality for good, cached. On SmolLM2's
int4 model, where symmetric and zero-point grids differ only in the LM head, four cold
measurements read 0.981–1.035× (sd 0.022) against the 1.05× asked; earlier builds had read 0.975×
and 1.054×, and the 1.054× took the symmetric head (KL per token 0.0175 against 0.0147).

A `context` times both forms as a later pass will leave them (`fuse(weights=int4)`: the linears
quantized to int4 as the int4 recipe runs them): a lowering's share of the time depends on what
the rest of the model costs (SmolLM2's GroupQueryAttention, measured 1.02× on fp32 linears, matters
more next to int4 ones).

A measurement taken while other processes competed for the cores (`xopt.cpu_load`: their CPU
time over the span above what the cores the timing leaves free can absorb) is taken again once
they have gone quiet (a passing job: a build, a test run), a process waiting up to
`WAIT_BUDGET.seconds` in all, whatever number of choosers it makes. A verdict still measured
under load holds for this run only: it is not cached, the verdict says so, and a warning tells
the user once per chooser; the next run on a quieter machine times it again. (A test suite
running beside `xopt optimize` on two cores made every fused form measure 0.83–0.97× and would
have kept that for good.)

Of two sessions of one model created one after the other, the first runs slower: SmolLM2 int4
timed against itself read 1.026× (sd 0.014, 5 pairs) with the first session as the current form
and 0.965× (sd 0.019) with the order swapped, about the 1.03× a family must win by. So each
measurement has two halves: the second times a new session of the form whose session is the
older, and each form's time is the mean of its two medians, weighted by rounds.

A chooser keeps the sessions of its last verdict's two forms, and a form passed to the next
verdict unchanged (the same object) is not serialized and loaded again: `fuse` times each family
against the form the previous verdict kept or rejected, which saves a session of the whole model
per verdict (about 2 s for SmolLM2 in fp32). A caller must therefore not change a model it has
passed and pass it again to the same chooser.

Verdicts are cached in a JSON file keyed by the family, the model's shape signature, the operator
counts of both forms (so a changed lowering, or a different set of families kept before it, is
timed anew), the context's name, the sample shape, the thread count, the ORT version and the CPU
(name, model number, cache size, vector flags), so a model is timed once per machine.
`XOPT_CACHE_DIR` (else `$XDG_CACHE_HOME/xopt`, else `~/.cache/xopt`) holds the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from xopt.analysis.graph_view import const_array, skip_back
from xopt.analysis.patterns import Embedding
from xopt.analysis.structure import TransformerStructure
from xopt.backends.onnxruntime import create_session, run
from xopt.cache import cache_dir as default_cache_dir
from xopt.cpu_load import OtherLoad, wait_until_quiet
from xopt.kv_cache import context_limit, has_kv_cache, past_inputs, shares_buffers

logger = logging.getLogger(__name__)

CACHE_FILE = "lowering.json"
NEAR_TIE = 0.03  # a first speedup within this of the threshold is re-measured with twice the rounds
PREFILL_ROUND_SHARE = 3  # a decoder's prefill is timed in one round of this many (its steps in every one)


@dataclass
class WaitBudget:
    """How long a process may wait, in all, for other processes to go quiet before timing again."""

    seconds: float = 60.0
    spent: float = 0.0


WAIT_BUDGET = WaitBudget()


@dataclass
class Verdict:
    keep: bool
    current_ms: float  # median time of the current form (a generation's total for a KV-cache model)
    candidate_ms: float
    cached: bool
    under_load: str = ""  # measured while other work competed for the cores: how much (not cached)

    @property
    def source(self) -> str:
        """Where the times come from, for a report line."""
        if self.cached:
            return "cached"
        return f"measured under load ({self.under_load}; not cached)" if self.under_load else "measured"

    @property
    def speedup(self) -> float:
        """current / candidate: above 1, the candidate is faster."""
        return self.current_ms / self.candidate_ms


def timed_sequence(model: ir.Model, structure: TransformerStructure, wanted: int) -> int:
    """The timing sequence length S, capped so that every position timed, a prefill of S tokens
    and a decode step at position S, has a row in a learned position table (GPT-2, BERT) and lies
    within the model's context (MPT's ALiBi table, rotary tables inside GroupQueryAttention). A
    table read at one row whatever the position (BERT's token types) caps nothing."""
    tables = [e.rows for e in structure.embeddings if e is not structure.token_embedding and not _one_row(e)]
    context, _ = context_limit(model)
    limits = [*tables, context] if context else tables
    return min([wanted, *(rows - 1 for rows in limits)])


# Ops that select or reshape their first input's values without computing new ones
_SELECTIONS = frozenset({"Slice", "Expand", "Gather", "GatherElements", "Unsqueeze", "Squeeze", "Reshape", "Cast"})


def _one_row(embedding: Embedding) -> bool:
    """Whether the table is read at one row only: its indices select from a constant holding one
    value (a zeros buffer), or are a token-type input (the samples feed zeros there)."""
    value = skip_back(embedding.node.inputs[1], _SELECTIONS)
    if value.is_graph_input():
        return "token_type" in value.name.lower()
    array = const_array(value)
    return array is not None and array.size > 0 and bool(np.all(array == array.flat[0]))


class _TimedForm(NamedTuple):
    """A form a chooser timed: the model given, the copy timed (`context` applied), its session
    (None: to be made anew)."""

    model: ir.Model
    timed: ir.Model
    session: ort.InferenceSession | None


@dataclass
class LoweringChooser:
    """Decides, by timing on this machine, whether a candidate lowering replaces the current form."""

    threads: int = 2
    batch: int = 1
    sequence: int = 128
    rounds: int = 9
    warmup: int = 2
    min_speedup: float = 1.03
    lossy: bool = False  # the candidate costs accuracy: near the threshold, both measurements must reach it
    cache_dir: Path | None = None
    context: Callable[[ir.Model], ir.Model] | None = None  # applied to a copy of each form before timing
    context_name: str = ""  # what `context` does (part of the cache key)
    _warned: bool = field(default=False, init=False, repr=False)  # about timings under load
    # the last verdict's forms, in the order their sessions were made, by id(model); holding the
    # model keeps its id its own
    _sessions: dict[int, _TimedForm] = field(default_factory=dict, init=False, repr=False)

    def choose(self, family: str, signature: dict, current: ir.Model, candidate: ir.Model) -> Verdict:
        key = self._key(family, signature, current, candidate)
        known = self._cached(key)
        if known is not None:
            return known
        with OtherLoad(self.threads) as load:
            current_ms, candidate_ms = self._measure(current, candidate)
        if load.contended and self._quiet_again(load.describe()):
            with OtherLoad(self.threads) as load:
                current_ms, candidate_ms = self._measure(current, candidate)
        if load.contended:
            self._warn_once(load.describe())
        else:
            cache = self._read_cache()
            cache[key] = [current_ms, candidate_ms]
            self._write_cache(cache)
        keep = current_ms / candidate_ms >= self.min_speedup
        return Verdict(
            keep, current_ms, candidate_ms, cached=False, under_load=load.describe() if load.contended else ""
        )

    def _quiet_again(self, load: str) -> bool:
        """Whether other processes went quiet within what is left of this process's wait budget."""
        left = WAIT_BUDGET.seconds - WAIT_BUDGET.spent
        if left <= 0:
            return False
        logger.warning("timing the lowerings while %s: waiting up to %.0f s for them to finish", load, left)
        quiet, waited = wait_until_quiet(self.threads, left)
        WAIT_BUDGET.spent += waited
        return quiet

    def _warn_once(self, load: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "timing the lowerings while %s: these choices hold for this run only (not cached); "
                "run again on a quiet machine for choices that last",
                load,
            )

    def _measure(self, current: ir.Model, candidate: ir.Model) -> tuple[float, float]:
        """Median times (ms) of the current and the candidate form."""
        from xopt.bench import time_interleaved
        from xopt.inputs import sample_inputs

        self._sessions = {
            key: kept for key, kept in self._sessions.items() if kept.model is current or kept.model is candidate
        }
        timed_current = self._session(current)[0]
        # workload → (inputs, times it counts in the total, timed in one round of this many)
        prefill = sample_inputs(timed_current, batch=self.batch, sequence=self.sequence)
        if has_kv_cache(timed_current):
            step = sample_inputs(timed_current, batch=self.batch, sequence=1, past=self.sequence)
            workloads = {"prefill": (prefill, 1, PREFILL_ROUND_SHARE), "step": (step, self.sequence, 1)}
        else:
            workloads = {"prefill": (prefill, 1, 1)}

        def times(rounds: int, renew_older: bool) -> np.ndarray:
            """Each form's time over `rounds`; `renew_older`: the form whose session is the older
            gets a new one first (sessions are kept in the order they were created)."""
            if renew_older:
                older = next(iter(self._sessions))
                self._sessions[older] = self._sessions.pop(older)._replace(session=None)
            sessions = {"current": self._session(current), "candidate": self._session(candidate)}
            medians = {}
            for workload, (feeds, _, share) in workloads.items():
                runners = {
                    f"{label} {workload}": _runner(session, model, feeds)
                    for label, (model, session) in sessions.items()
                }
                timed = time_interleaved(runners, rounds=math.ceil(rounds / share), warmup=self.warmup)
                medians.update({t.label: t.median_ms for t in timed})
            return np.array(
                [
                    sum(count * medians[f"{label} {w}"] for w, (_, count, _) in workloads.items())
                    for label in ("current", "candidate")
                ]
            )

        def both_orders(rounds: int, renew_first: bool) -> np.ndarray:
            if rounds < 2:
                return times(rounds, renew_first)
            first = (rounds + 1) // 2
            halves = first * times(first, renew_first) + (rounds - first) * times(rounds - first, True)
            return halves / rounds

        medians = both_orders(self.rounds, renew_first=False)
        if abs(medians[0] / medians[1] - self.min_speedup) < NEAR_TIE:  # a verdict that noise could flip: look longer
            again = both_orders(2 * self.rounds, renew_first=True)
            if self.lossy:
                medians = min(medians, again, key=lambda pair: pair[0] / pair[1])
            else:
                medians = (medians + 2 * again) / 3  # weighted by rounds
        return float(medians[0]), float(medians[1])

    def _session(self, model: ir.Model) -> tuple[ir.Model, ort.InferenceSession]:
        """The form as timed (`context` applied to a copy) and its session, kept from the last
        verdict when `model` was one of its forms."""
        kept = self._sessions.get(id(model))
        if kept is None:
            kept = _TimedForm(model, self.context(model.clone()) if self.context is not None else model, None)
        if kept.session is None:
            kept = kept._replace(session=create_session(kept.timed, threads=self.threads, spinning=False))
            self._sessions.pop(id(model), None)
            self._sessions[id(model)] = kept
        return kept.timed, kept.session

    def cached(self, family: str, signature: dict, current: ir.Model, candidate: ir.Model) -> Verdict | None:
        """The verdict `choose` would return from the cache, or None where it would time the forms."""
        return self._cached(self._key(family, signature, current, candidate))

    def _cached(self, key: str) -> Verdict | None:
        times = self._read_cache().get(key)
        if times is None:
            return None
        current_ms, candidate_ms = times
        return Verdict(current_ms / candidate_ms >= self.min_speedup, current_ms, candidate_ms, cached=True)

    def _key(self, family: str, signature: dict, current: ir.Model, candidate: ir.Model) -> str:
        """The cache key of a verdict: the signature, both forms' operator counts, the context, the
        timed shape and threads, the ORT version and the CPU."""
        counts = {"current": _op_counts(current), "candidate": _op_counts(candidate)}
        facts = {
            "family": family,
            "signature": {**signature, **counts, **({"context": self.context_name} if self.context else {})},
            **({"lossy": True} if self.lossy else {}),  # a verdict held to both measurements
            "cache_format": 2,  # [current ms, candidate ms]
            "batch": self.batch,
            "sequence": self.sequence,
            "threads": self.threads,
            "onnxruntime": ort.__version__,
            "cpu": _cpu_name(),
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir or default_cache_dir()) / CACHE_FILE

    def _read_cache(self) -> dict[str, list[float]]:
        """The cached timings. A file that is not a JSON object, or an entry that is not two positive
        times (a damaged cache), is ignored: those are measured again and written over."""
        try:
            cache = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(cache, dict):
            return {}
        return {key: times for key, times in cache.items() if _are_timings(times)}

    def _write_cache(self, cache: dict[str, list[float]]) -> None:
        """Atomic replace; a cache that cannot be written only costs a re-measurement later."""
        path = self.cache_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
                json.dump(cache, file, indent=1, sort_keys=True)
            os.replace(file.name, path)
        except OSError:
            pass


def _are_timings(times: object) -> bool:
    """Whether a cache entry is [current ms, candidate ms], both positive and finite."""
    return (
        isinstance(times, list)
        and len(times) == 2
        and all(type(t) in (int, float) and math.isfinite(t) and t > 0 for t in times)
    )


def _runner(session: ort.InferenceSession, model: ir.Model, feeds: dict) -> Callable[[], object]:
    """A call running `feeds` as a generation would: through one in-place cache buffer per layer
    when the model can update its cache in place (the sample past's values aside, the same work)."""
    from xopt.bench import session_runner
    from xopt.generate import InPlaceCache

    if not shares_buffers(model):
        run(session, feeds)
        return session_runner(session, feeds)
    pasts = {v.name for v in past_inputs(model)}
    inputs = {name: array for name, array in feeds.items() if name not in pasts}
    cache = InPlaceCache(session, model, capacity=inputs["attention_mask"].shape[1], batch=len(inputs["input_ids"]))
    cache.run(inputs)
    return lambda: cache.run(inputs)


def _cpu_name() -> str:
    """This machine's CPU as `cpu_identity` names it."""
    try:
        return cpu_identity(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or platform.machine()


def cpu_identity(cpuinfo: str) -> str:
    """The CPU of a /proc/cpuinfo text: its model name, family/model/stepping, cache size and vector
    ISA flags (what the timing depends on). A VM often reports one generic name ("Intel(R) Xeon(R)
    Processor") for several generations of chips; the model number and cache size tell them apart."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    numbers = "/".join(fields.get(key, "") for key in ("cpu family", "model", "stepping", "cache size"))
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx")) or f == "fma")
    return " ".join([fields.get("model name") or platform.machine(), numbers, *flags])


def _op_counts(model: ir.Model) -> dict[str, int]:
    """How many nodes a model has of each operator with each set of attribute names."""
    counts = Counter(f"{n.domain}:{n.op_type}:{','.join(sorted(n.attributes))}" for n in model.graph)
    return dict(sorted(counts.items()))

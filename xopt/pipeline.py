"""Passes, the pass registry, named recipes and the PassManager that runs them verified.

A pass is a dataclass whose fields are its options; `__call__(model)` rewrites the model in
place through onnx-ir's use-def-keeping operations and returns a `PassResult`. The PassManager
works on a clone (tensors are shared, never mutated: a pass that changes a weight creates a new
tensor), so the caller's model is never modified. With verification on, every pass is followed
by the onnx checker with strict shape inference and an output-parity check against the input
model on generated sample inputs; an exact pass that breaks parity stops the pipeline with the
pass named.

Recipes (the order is the design: cleanup → canonicalize → exact folds → lossy passes →
fusion/lowering → cleanup) live here, in `RECIPES`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from xopt.errors import XoptError, first_line, require_model
from xopt.inputs import fit_inputs, verification_inputs
from xopt.report import ModelStats, PassRecord, Report, stopwatch
from xopt.text import calibration_texts_read, record_calibration_texts
from xopt.verify import (
    EXACT_TOLERANCE,
    Parity,
    VerificationError,
    check_structure,
    outputs_over,
    parity_of,
)

logger = logging.getLogger(__name__)

RECIPES: dict[str, list[str]] = {
    # Changes no output beyond float rounding.
    "exact": ["cleanup", "fold-norms", "fuse"],
    # The exact recipe, then int4 weights (GPTQ, groups of 32), the LM head too: on SmolLM2 a 4-bit
    # head decodes 6% faster than an 8-bit one for 1% more perplexity (42.15 against 41.74).
    # Quantizing after the merges is the same as before them (each output column has its own grid)
    # and leaves one MatMulNBits per merged linear. The token table goes to 8 bits: SmolLM2's file
    # 200 → 119 MB at the same perplexity (42.14; a 4-bit table: 105 MB, 42.61). The residual
    # stream is rotated first where the model allows it (pre-norm RMSNorm): SmolLM2 perplexity
    # 39.70 against 40.79 unrotated (KL to fp32 0.091 against 0.140, on the whole evaluation text).
    # Symmetric grids (no zero points) where they time ≥ 1.05× faster on this machine: SmolLM2 on an
    # AVX2 EPYC decodes 1.14× faster with them, at perplexity 42.14 against 41.30.
    # Weights that came on a grid (a model converted from a GGUF file) keep it (`source_grid`):
    # fold-norms leaves γ in the norms, the rotation steps aside, quantize keeps the codes and
    # scales and folds Q4_1's float offsets into zero points (`grid_offsets`). SmolLM2 from its
    # Q4_1 file: perplexity 39.29 against 42.14 re-quantized; decode 1.17× the exact offsets' form
    # (39.25) in a scratch A/B. `quantize(source_grid=exact)` keeps the offsets exactly, `false` re-quantizes.
    "int4": [
        "cleanup",
        "fold-norms",
        "rotate(optional=true)",
        "fuse(weights=int4)",  # each fusion timed next to int4 linears, as this recipe runs them
        "quantize(head_bits=4,embedding_bits=8,symmetric=measure)",
    ],
    # The exact recipe, its fusions timed next to dynamic int8 linears, then dynamic int8
    # (per-channel weights, run-time activations, smoothing chosen per linear on calibration
    # activations); mixed precision is opt-in (`budget=`): its sweep is one candidate model per linear.
    # The token table goes to 8 bits: MiniLM 58.9 → 25.4 MB (sentence cosine to fp32 min / mean
    # 0.9947 / 0.9981 against 0.9942 / 0.9981), SmolLM2 249 → 168 MB (its GGUF Q8_0 table kept
    # exactly: perplexity unchanged); a tie in speed on both.
    "int8": ["cleanup", "fold-norms", "fuse(weights=int8)", "quantize(scheme=dynamic,bits=8,embedding_bits=8)"],
}
DEFAULT_RECIPE = "exact"


@dataclass
class PassResult:
    """What a pass returns: the model (usually the same object), whether it changed, and facts."""

    model: ir.Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    explain: list[str] = field(default_factory=list)


class Pass:
    """Base of every pass. Subclasses are dataclasses; their fields are the pass's options."""

    name: ClassVar[str]
    exact: ClassVar[bool]
    summary: ClassVar[str]

    def __call__(self, model: ir.Model) -> PassResult:
        raise NotImplementedError

    @classmethod
    def options(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) of each option."""
        hints = typing.get_type_hints(cls)
        return [(f.name, _type_name(hints[f.name]), f.default) for f in dataclasses.fields(cls)]


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name (`--passes`, recipes, `xopt passes`)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register takes a Pass subclass that is a dataclass, not {cls!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes named {cls.name!r}: {_REGISTRY[cls.name].__name__}, {cls.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (importing xopt.passes registers the built-in ones)."""
    importlib.import_module("xopt.passes")
    return dict(sorted(_REGISTRY.items()))


def make_pass(name: str, options: Mapping[str, str | Any] | None = None) -> Pass:
    """Instantiate pass `name`; string option values are converted to the option's type."""
    passes = registered_passes()
    if name not in passes:
        raise XoptError(f"unknown pass {name!r} (known: {', '.join(passes)})")
    cls = passes[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in (options or {}).items():
        if key not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise XoptError(f"pass {name!r} has no option {key!r} (options: {listed})")
        kwargs[key] = _convert(name, key, raw, hints[key]) if isinstance(raw, str) else raw
    return cls(**kwargs)


def parse_spec(spec: str) -> list[Pass]:
    """Parse `cleanup,prune-layers(n=4,method=replaceme)` into pass objects."""
    passes = []
    for item in _split_top_level(spec):
        match = re.fullmatch(r"\s*([A-Za-z0-9_\-]+)\s*(?:\((.*)\))?\s*", item)
        if not match:
            raise XoptError(f"cannot parse pass {item!r}: write name or name(key=value,...)")
        name, arguments = match.group(1), match.group(2)
        options = {}
        for argument in filter(str.strip, (arguments or "").split(",")):
            key, sep, value = argument.partition("=")
            if not sep or not key.strip():
                raise XoptError(f"cannot parse option {argument.strip()!r} of pass {name!r}: write key=value")
            if key.strip() in options:
                raise XoptError(f"option {key.strip()!r} of pass {name!r} is given twice")
            options[key.strip()] = value.strip()
        passes.append(make_pass(name, options))
    if not passes:
        raise XoptError("empty pass list")
    return passes


def resolve_passes(recipe: str | None = None, passes: str | Iterable[str | Pass] | None = None) -> list[Pass]:
    """The pass list of a recipe, or `passes` (a spec string, names or pass objects) instead."""
    if passes is not None:
        if isinstance(passes, str):
            return parse_spec(passes)
        if isinstance(passes, Pass):
            return [passes]
        resolved = [_one_pass(p) for p in passes]
        if not resolved:
            raise XoptError("empty pass list")
        return resolved
    recipe = DEFAULT_RECIPE if recipe is None else recipe
    if not isinstance(recipe, str) or recipe not in RECIPES:  # a list here is the passes, misplaced
        hint = " (a list of passes goes in passes=)" if not isinstance(recipe, str) else ""
        raise XoptError(f"unknown recipe {recipe!r}{hint} (known: {', '.join(RECIPES)})")
    return [step for spec in RECIPES[recipe] for step in parse_spec(spec)]


def check_options(step: Pass) -> None:
    """Each option of a pass built in Python has its declared type (a spec's strings are converted
    by `make_pass`): a wrong type would fail deep inside the pass, or silently act as another value."""
    hints = typing.get_type_hints(type(step))
    for option in dataclasses.fields(step):
        value = getattr(step, option.name)
        if not _fits(value, hints[option.name]):
            raise XoptError(
                f"pass {step.name!r}: option {option.name}={value!r} is not a valid {_type_name(hints[option.name])}"
            )


def _fits(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if typing.get_args(hint):  # X | None
        return any(_fits(value, member) for member in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _one_pass(item: str | Pass) -> Pass:
    if isinstance(item, Pass):
        return item
    if not isinstance(item, str):
        raise XoptError(f"cannot use a {type(item).__name__} as a pass: give a Pass or a spec such as 'cleanup'")
    steps = parse_spec(item)
    if len(steps) != 1:
        raise XoptError(f"{item!r}: one pass per list item (give a whole spec string as `passes=` itself)")
    return steps[0]


@dataclass
class _References:
    """The verification inputs and the outputs each pass is checked against: the input model's,
    which every pass's reported parity is against, and those of the model before the pass, which an
    exact pass must keep (the same until a lossy pass has run: an exact pass after pruning is
    checked against the pruned model)."""

    inputs: list[Mapping[str, np.ndarray]]
    original: list[dict[str, np.ndarray]]
    previous: list[dict[str, np.ndarray]]

    def verify(self, step: Pass, model: ir.Model) -> Parity:
        """`step`'s output checked (runs in ONNX Runtime; an exact pass within `EXACT_TOLERANCE` of
        the model before it); its parity with the input model."""
        try:
            check_structure(model)
            fitted = [fit_inputs(model, feeds) for feeds in self.inputs]
            outputs = outputs_over(model, fitted)
        except VerificationError as error:
            raise VerificationError(f"after pass {step.name!r}: {error}") from error
        parity = parity_of(outputs, fitted, self.original)
        kept = parity if self.previous is self.original else parity_of(outputs, fitted, self.previous)
        if step.exact and not kept.within(EXACT_TOLERANCE):
            raise VerificationError(
                f"exact pass {step.name!r} changed the model's outputs: {kept.describe()} "
                f"(tolerance {EXACT_TOLERANCE:g} relative)"
            )
        if not step.exact:
            self.previous = outputs
        return parity


class PassManager:
    """Runs passes in order on a clone of the model, verifying after each one."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: bool = True,
        inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
        on_pass: Callable[[Pass], None] | None = None,
    ):
        self.passes = list(passes)
        for step in self.passes:
            if not isinstance(step, Pass):
                kind = type(step).__name__
                raise XoptError(f"PassManager runs Pass objects, not a {kind} (resolve_passes turns specs into passes)")
            check_options(step)
        if inputs is not None and not isinstance(inputs, Mapping):
            inputs = list(inputs)
            if not inputs:
                raise XoptError("inputs: give at least one set of feeds (or None for xopt's own)")
        self.verify = verify
        self.inputs = inputs
        self.on_pass = on_pass

    def __call__(self, model: ir.Model) -> tuple[ir.Model, Report]:
        require_model("PassManager", model)
        working = model.clone()
        report = Report(input=ModelStats.of(model), output=ModelStats.of(model), verified=self.verify)
        report.structure = input_structure(model)
        references = None
        if self.verify:
            inputs = verification_inputs(model) if self.inputs is None else self.inputs
            inputs = [inputs] if isinstance(inputs, Mapping) else list(inputs)
            with stopwatch() as elapsed:
                try:
                    original = outputs_over(model, inputs)
                except VerificationError as error:
                    given = "xopt's sample inputs" if self.inputs is None else "the given inputs"
                    raise XoptError(f"the input model fails on {given}: {error}") from None
            references = _References(inputs, original, original)
            report.seconds["reference outputs"] = elapsed.seconds
        with calibration_texts_read() as calibration_texts:
            for step in self.passes:
                working = self._run(step, working, report, references)
        if calibration_texts:  # `xopt eval` refuses to measure the model on these texts
            record_calibration_texts(working.metadata_props, calibration_texts)
        if self.verify and any(not step.exact for step in self.passes):
            with stopwatch() as elapsed:
                report.quality = _quality_cost(model, working)
            report.seconds["quality"] = elapsed.seconds
        return working, report

    def _run(self, step: Pass, working: ir.Model, report: Report, references: _References | None) -> ir.Model:
        """One pass on `working`, verified against `references` (None: not verified); its record
        goes into `report`."""
        if self.on_pass is not None:
            self.on_pass(step)
        before = report.output
        try:
            with stopwatch() as elapsed:
                result = step(working)
        except XoptError as error:  # named once: many passes start their messages with their name
            reason = str(error).removeprefix(f"{step.name}: ")
            raise type(error)(f"pass {step.name!r}: {reason}") from error
        seconds = elapsed.seconds
        record = PassRecord(
            name=step.name,
            exact=step.exact,
            modified=result.modified,
            seconds=seconds,
            before=before,
            after=ModelStats.of(result.model),
            stats=result.stats,
            explain=result.explain,
        )
        if references is not None:
            with stopwatch() as elapsed:
                record.parity = references.verify(step, result.model)
            record.check_seconds = elapsed.seconds
        report.passes.append(record)
        report.output = record.after
        logger.info("%s: %d → %d nodes in %.2f s", step.name, before.nodes, record.after.nodes, seconds)
        return result.model


def _quality_cost(before: ir.Model, after: ir.Model) -> dict[str, Any]:
    """The lossy pipeline's cost in quality on the bundled evaluation text (`quality_cost`), or
    why it was not measured: a report line, never a failed run. A text the passes calibrated on
    is refused as `xopt eval` refuses it (`calibration_overlap` on the output's record)."""
    from xopt.evaluate import quality_cost
    from xopt.text import calibration_overlap, read_text

    text = read_text(None, "evaluation")
    overlap = calibration_overlap(after.metadata_props, text)
    if overlap is not None:
        return {"not_measured": f"the output {overlap}"}
    try:
        return quality_cost(before, after, text).to_dict()
    except Exception as error:  # no tokenizer, a text the model cannot run on, a failed session
        return {"not_measured": first_line(error)}


def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside parentheses."""
    items, depth, current = [], 0, []
    for char in spec:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise XoptError(f"unbalanced parentheses in pass spec {spec!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise XoptError(f"unbalanced parentheses in pass spec {spec!r}")
    items.append("".join(current))
    return [item for item in items if item.strip()]


def _convert(pass_name: str, key: str, raw: str, hint: Any) -> Any:
    """Convert an option string to `hint` (bool, int, float, str, Literal[...] or X | None)."""
    if raw.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    literal = typing.get_origin(hint) is typing.Literal
    candidates = [hint] if literal else [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for target in candidates:
        if typing.get_origin(target) is typing.Literal:
            if raw in [str(choice) for choice in typing.get_args(target)]:
                return type(typing.get_args(target)[0])(raw)
            continue
        try:
            if target is bool:
                if raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    return raw.lower() in ("1", "true", "yes", "on")
                continue
            return target(raw)
        except (TypeError, ValueError):
            continue
    raise XoptError(f"option {key}={raw!r} of pass {pass_name!r} is not a valid {_type_name(hint)}")


def input_structure(model: ir.Model) -> dict[str, Any]:
    """The input model's transformer facts for the report (fused operators hide them afterwards)."""
    from xopt.analysis import find_transformer_structure

    summary = find_transformer_structure(model).summary()
    return {k: v for k, v in summary.items() if k not in ("ops", "blocks")}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(hint))
    if typing.get_args(hint):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))

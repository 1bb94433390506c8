"""What each pass changed: nodes, op types, parameters, bytes, time, parity; and where a run's time went.

A `Report` is plain data: `to_dict()` gives the JSON written by `--report`, `format_table()` the
summary the CLI prints. Its seconds are taken with `stopwatch`.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import onnx_ir as ir

from xopt.verify import Parity


@dataclass(frozen=True)
class ModelStats:
    """Size facts of one model: node count, op-type histogram, parameters and weight bytes.

    Parameters count the elements of the constants a model learned or quantized: float tensors
    and integer ones of at most 8 bits (int8 weights, packed 4-bit codes, zero points) with more
    than one element, in initializers and Constant nodes alike, so lifting a constant from one to
    the other changes nothing. Shapes, axes and indices (wider integers, booleans) are structure
    and single numbers (an epsilon, 1/√d) arithmetic, not parameters: passes that fold them leave
    the count alone (MiniLM: 22,565,376, the BERT model's own count without its pooler). Bytes
    count every constant.
    """

    nodes: int
    ops: dict[str, int]
    params: int
    bytes: int

    @classmethod
    def of(cls, model: ir.Model) -> ModelStats:
        nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
        ops = Counter(_op_name(node) for node in nodes)
        tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
        tensors += [n.attributes["value"].value for n in nodes if n.op_type == "Constant" and "value" in n.attributes]
        return cls(
            nodes=sum(ops.values()),
            ops=dict(sorted(ops.items())),
            params=sum(t.size for t in tensors if t.size > 1 and _is_parameter(t.dtype)),
            bytes=sum(t.nbytes for t in tensors),
        )


@dataclass
class PassRecord:
    """One pass of a pipeline run."""

    name: str
    exact: bool
    modified: bool
    seconds: float
    before: ModelStats
    after: ModelStats
    parity: Parity | None = None
    check_seconds: float = 0.0  # the structure check and parity run after the pass
    stats: dict[str, Any] = field(default_factory=dict)
    explain: list[str] = field(default_factory=list)

    def op_changes(self) -> dict[str, int]:
        """Op type → change in count (only the op types whose count changed)."""
        keys = set(self.before.ops) | set(self.after.ops)
        changes = {k: self.after.ops.get(k, 0) - self.before.ops.get(k, 0) for k in sorted(keys)}
        return {k: v for k, v in changes.items() if v}


@dataclass
class Report:
    """A pipeline run: the input and output models' stats and one record per pass."""

    input: ModelStats
    output: ModelStats
    passes: list[PassRecord] = field(default_factory=list)
    verified: bool = True
    structure: dict[str, Any] = field(default_factory=dict)  # the input's transformer facts
    # a lossy pipeline's cost on the bundled evaluation text (`xopt.evaluate.Quality`, the output
    # against the input), or {"not_measured": reason}; empty when every pass is exact or unverified
    quality: dict[str, Any] = field(default_factory=dict)
    # seconds of the steps around the passes, in the order they ran: the input's reference outputs
    # and the quality line (`PassManager`), capture and saving (added by whoever ran those)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for record, raw in zip(self.passes, data["passes"], strict=True):
            raw["op_changes"] = record.op_changes()
            if record.parity is not None:
                raw["parity"]["top1_agreement"] = record.parity.top1_agreement
        return data

    def format_table(self) -> str:
        """A fixed-width table: one row per pass, then the totals."""
        header = f"{'pass':<16}{'nodes':>14}{'params':>24}{'MB':>16}{'time s':>9}  parity"
        lines = [header, "-" * len(header)]
        for record in self.passes:
            lines.append(
                f"{record.name:<16}"
                f"{_change(record.before.nodes, record.after.nodes):>14}"
                f"{_change(record.before.params, record.after.params):>24}"
                f"{_change(record.before.bytes / 1e6, record.after.bytes / 1e6, '.1f'):>16}"
                f"{record.seconds:>9.2f}  {record.parity.describe() if record.parity else 'not verified'}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<16}{_change(self.input.nodes, self.output.nodes):>14}"
            f"{_change(self.input.params, self.output.params):>24}"
            f"{_change(self.input.bytes / 1e6, self.output.bytes / 1e6, '.1f'):>16}"
        )
        if self.quality:
            lines.append(self.describe_quality())
        if self.seconds:
            lines.append(self.describe_time())
        return "\n".join(lines)

    def add_capture_and_save(self, capture_seconds: float, save_seconds: float) -> None:
        """The steps around a `PassManager` run that its caller ran: capture first, saving last."""
        self.seconds = {"capture": capture_seconds, **self.seconds, "save": save_seconds}

    def describe_time(self) -> str:
        """One line: the seconds of each step of the run, the passes and their checks summed."""
        steps = dict(self.seconds)
        steps["passes"] = sum(record.seconds for record in self.passes)
        steps["their checks"] = sum(record.check_seconds for record in self.passes)
        order = ["capture", "reference outputs", "passes", "their checks"]
        names = [name for name in order if name in steps] + [name for name in steps if name not in order]
        parts = ", ".join(f"{name} {steps[name]:.1f}" for name in names)
        return f"time s: {parts}; {sum(steps.values()):.1f} in all"

    def describe_quality(self) -> str:
        """One line: what the lossy passes cost on the bundled evaluation text."""
        quality = self.quality
        if "not_measured" in quality:
            return f"quality: not measured ({quality['not_measured']})"
        if quality["perplexity"] is not None:
            return (
                f"quality on {quality['windows']} windows of the bundled evaluation text ({quality['tokens']} "
                f"tokens): perplexity {quality['reference_perplexity']:.2f} → {quality['perplexity']:.2f}, "
                f"KL from the input {quality['kl']:.4f} per token, top-1 agreement {quality['top1_agreement']:.1%}"
            )
        return (
            f"quality on {quality['sentences']} sentences of the bundled evaluation text: embedding cosine to "
            f"the input min {quality['cosine_min']:.4f}, mean {quality['cosine_mean']:.4f}"
        )


def _change(before: float, after: float, fmt: str = "d") -> str:
    return f"{before:{fmt}}→{after:{fmt}}" if before != after else f"{after:{fmt}}"


def _is_parameter(dtype: ir.DataType) -> bool:
    """Float values and integer codes of at most 8 bits; not shapes, axes, indices or flags."""
    return dtype.is_floating_point() or (dtype.is_integer() and dtype.bitwidth <= 8)


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


@contextlib.contextmanager
def stopwatch() -> Iterator[SimpleNamespace]:
    """Times the block: the namespace it yields gets the block's `seconds` when the block ends
    without an error."""
    elapsed = SimpleNamespace(seconds=0.0)
    start = time.perf_counter()
    yield elapsed
    elapsed.seconds = time.perf_counter() - start

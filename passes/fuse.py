"""`fuse`: lower transformer subgraphs to merged linears and fused ONNX Runtime operators, keeping
each family of rewrites only where it measures faster on this machine.

Every rewrite computes the same values up to float rounding:
- `merge-qkv`: the Q, K and V linears read one input X, so
      [Q | K | V] = X·[W_q | W_k | W_v] + [b_q | b_k | b_v],
  one MatMul (+ Add) and a Split on the last axis instead of three GEMMs (a missing bias is 0).
- `merge-gate-up`: the same for a gated MLP's gate and up projections.
- `norm`: a decomposed LayerNorm (x − μ)/√(σ² + ε)·γ + β becomes one `LayerNormalization`, a
  decomposed RMSNorm x/√(mean(x²) + ε)·γ one `SimplifiedLayerNormalization` (γ = 1 when the scale
  was folded away; a shift β, which `fold-norms` keeps where the norm's output is also a model
  output, is added after it).
- `skip-norm`: a norm of a residual sum, Norm(a + b), becomes one `Skip(Simplified)LayerNormalization`
  (com.microsoft) computing the sum and its norm in one pass; its fourth output is a + b for the
  other readers of the residual stream (ONNX Runtime does not fuse these itself when the shapes
  are symbolic, as in every KV-cache export).
- `residual-sum`: the residual Add under a norm becomes a Sum of the same two operands, which
  ONNX Runtime's session optimizer does not fuse into SkipLayerNormalization (slower on some CPUs)
  behind the measurement's back (`residual_sum.py`); `skip-norm` then fuses Sum or Add alike.
- `rotary`: x·cos + rotate_half(x)·sin, or the same on interleaved pairs → ONNX `RotaryEmbedding`
  (opset 23) on the graph's own cos/sin tables (`rotary.py`; any positions).
- `cached-attention`: a KV-cache decoder's Concat(past, K/V) → head repeats → softmax(s·Q·Kᵀ + M)·V
  → ONNX `Attention` (opset 23) with past and present (`cached_attention.py`; any mask), on merged
  heads where Q, K and V come from one projection whose columns interleave the heads, reordered to
  [Q | K | V] (`head_columns.py`).
- `group-query-attention`: that `Attention` → com.microsoft `GroupQueryAttention` with the mask as
  its attention bias, whose past and present can be one buffer updated in place by the decoder
  (`group_query_attention.py`; any mask).
- `rotary-attention`, only with `positions=contiguous`: the RotaryEmbedding of Q and K before a
  `GroupQueryAttention` → its own rotation (`do_rotary`), on packed QKV where Q, K and V are split
  from one projection, and its attention bias dropped where that is only the causal/padding mask
  its kernel applies itself (`rotary_attention.py`). ONNX Runtime's kernel rotates at positions
  P..P+S−1, so the model then assumes inputs without left padding, as onnxruntime-genai's models do.
- `attention`: softmax(Q·Kᵀ·s + mask)·V with its head reshapes → `Attention` (projections packed),
  `MultiHeadAttention` or `GroupQueryAttention`. With quantized weights (`weights=int4|int8`) the
  projections are not packed: `Attention` reads its weight in float, where no quantization
  reaches it (MiniLM's int8 model kept 10.6 MB of them on a machine where it timed faster), so
  the attention is a `MultiHeadAttention` after linears that `quantize` lowers; merge-qkv is
  tried first there, so that it reads the Split of one linear (MiniLM int8 at 1×128: 0.96× the
  time of the merged linear without MultiHeadAttention, 0.92× that of three linears before it).
- `gelu`: the erf/tanh GELU expansions (+ bias) → `Gelu`, `FastGelu`, `BiasGelu` (the tanh form
  however its products are written: `tanh_gelu.py`).
The merges, the norm and the cached attention are found by xopt's structure analysis (so
whatever the exporter), the rotary embedding by xopt's own matcher; the encoder attention and
GELU patterns by onnxscript's ORT fusion rules.

Lowering (`lowering` option): "measure" times each family that matched, applied on top of what
was kept so far, against the model without it (`backends/lowering.py`, cached per machine), and
keeps it only if faster; "all" keeps every family that matched (used by parity tests); a family
can also be switched off by listing it in `skip`. A candidate's outputs are checked against the
given model's before it is timed (`_Faithfulness`); one whose verdict is cached is not timed, nor
checked alone: the pass's output is checked once, and where a form a cached verdict kept breaks
it, the pass runs again checking each form. `weights=int4` (the int4 recipe) times both
forms with their linears quantized as that recipe runs them (round to nearest stands in for the
method: the kernels' time does not depend on the codes), since a family's share of the time
depends on what the linears cost: SmolLM2's GroupQueryAttention measured 1.02× next to fp32
linears, under the 1.03× a family must win by, and is what int4 decode wants. `weights=int8`
(the int8 recipe) does the same with dynamic int8 linears, without smoothing: its search would run
the model on calibration text for every form timed (the copies then lack the Mul that applies
1/s before a linear no norm feeds, 60 small nodes on SmolLM2).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from xopt.analysis import find_transformer_structure
from xopt.analysis.patterns import Linear, Norm, read_outside
from xopt.analysis.structure import TransformerStructure
from xopt.backends.lowering import LoweringChooser, Verdict, timed_sequence
from xopt.errors import XoptError, first_line
from xopt.inputs import verification_inputs
from xopt.kv_cache import has_kv_cache
from xopt.passes.cached_attention import lower_cached_attention
from xopt.passes.group_query_attention import lower_group_query_attention
from xopt.passes.residual_sum import pin_residual_sums
from xopt.passes.rotary import lower_rotary
from xopt.passes.rotary_attention import lower_rotary_attention
from xopt.passes.tanh_gelu import lower_tanh_gelu
from xopt.pipeline import Pass, PassResult, register
from xopt.progress import progress
from xopt.rewrite import (
    bias_or_zeros,
    new_initializer,
    owns_weight,
    replace_value,
    split_linear,
    weight_dtype,
    weight_in_out,
)

# Order: each family runs while the graph still has the forms it matches: onnxscript's encoder
# attention rules want separate Q/K/V to pack them into one Attention (with quantized weights,
# which an Attention cannot take, merge-qkv comes first: `_appliers`); the merges need xopt's
# structure analysis, which no longer sees Q/K/V once a cached attention is one operator;
# skip-norm absorbs the residual Adds that the analysis finds blocks by, so it comes last, after
# residual-sum (the form it is weighed against).
FAMILIES = (
    "norm",
    "rotary",
    "attention",
    "gelu",
    "merge-qkv",
    "merge-gate-up",
    "cached-attention",
    "group-query-attention",
    "rotary-attention",
    "residual-sum",
    "skip-norm",
)
LOWERINGS = ("measure", "all")
POSITIONS = ("mask", "contiguous")
# The linears each family is timed next to: `quantize`'s options for the copies timed (int4: round
# to nearest in place of the recipe's method) and their name in the lowering cache's key.
WEIGHTS = {
    "float": None,
    "int4": (
        {"method": "rtn", "head_bits": 4, "embedding_bits": 8, "accuracy": "4"},
        "int4 rtn, head 4, embedding 8, level 4",
    ),
    "int8": ({"scheme": "dynamic", "bits": 8, "smoothing": "none"}, "int8 dynamic, no smoothing"),
}
# A family that rewrites what others make matches only once they are kept; when they were not
# (each too small a win alone), it is timed together with them: GroupQueryAttention with RoPE
# inside pays in decode where GroupQueryAttention alone sits below the threshold.
PREREQUISITES = {
    "group-query-attention": ("cached-attention",),
    "rotary-attention": ("rotary", "cached-attention", "group-query-attention"),
}
# A family timed against another's form of the same subgraph, which it replaces: one that lost to
# its alternative kept alone stays out of the families tried together (it would undo the winner).
ALTERNATIVES = {"skip-norm": "residual-sum"}


@register
@dataclass
class FusePass(Pass):
    name = "fuse"
    exact = True
    summary = "merge QKV and gate/up linears; norms, RoPE, attention, GELU → fused ORT ops, kept where faster"

    lowering: str = "measure"
    skip: str = ""  # families to leave alone, separated by "+" (or "," from Python)
    positions: str = "mask"  # "contiguous": positions P..P+S−1 in every row (no left padding)
    weights: str = "float"  # "int4", "int8": timed with the linears quantized as that recipe runs them
    threads: int = 2
    batch: int = 1
    sequence: int = 128

    def __call__(self, model: ir.Model) -> PassResult:
        if self.lowering not in LOWERINGS:
            raise XoptError(f"fuse: unknown lowering {self.lowering!r}: one of {', '.join(LOWERINGS)}")
        if self.positions not in POSITIONS:
            raise XoptError(f"fuse: unknown positions {self.positions!r}: one of {', '.join(POSITIONS)}")
        if self.weights not in WEIGHTS:
            raise XoptError(f"fuse: unknown weights {self.weights!r}: one of {', '.join(WEIGHTS)}")
        if min(self.threads, self.batch, self.sequence) < 1:
            raise XoptError("fuse: threads, batch and sequence (the timed shape) must be at least 1")
        skipped = {name.strip() for name in re.split(r"[+,]", self.skip) if name.strip()}
        unknown = skipped - set(FAMILIES)
        if unknown:
            raise XoptError(f"fuse: unknown family {sorted(unknown)[0]!r} in skip: families are {', '.join(FAMILIES)}")
        structure = find_transformer_structure(model)
        sequence = timed_sequence(model, structure, self.sequence)
        chooser = LoweringChooser(threads=self.threads, batch=self.batch, sequence=sequence)
        if WEIGHTS[self.weights] is not None:
            options, chooser.context_name = WEIGHTS[self.weights]
            chooser.context = _Quantized(options)
        signature, faithfulness = _signature(structure), _Faithfulness(model)
        result = self._fuse(model, skipped, chooser, signature, faithfulness)
        if faithfulness.deferred and result.modified:
            broken = faithfulness.breakage(result.model)
            if broken:  # a form that a cached verdict kept unchecked broke the outputs: check each one
                faithfulness.trust_cached = False
                result = self._fuse(model, skipped, chooser, signature, faithfulness)
                result.explain.insert(0, f"the forms kept by cached verdicts, checked once together: {broken}")
        return result

    def _fuse(
        self,
        model: ir.Model,
        skipped: set[str],
        chooser: LoweringChooser,
        signature: dict,
        faithfulness: _Faithfulness,
    ) -> PassResult:
        """Each family in turn, kept where it checks out and wins; then those not kept alone, together."""
        apply = _appliers(self.weights)
        stats: Counter[str] = Counter()
        explain: list[str] = []
        # sound: family → matches, for families that check out or whose verdict is cached
        modified, sound = False, {}
        unmatched = []  # families that found nothing alone, and may once others are applied
        for family in progress(apply, unit="family", description="fuse"):  # FAMILIES, in the order for these weights
            if family in skipped:
                explain.append(f"{family}: skipped (option)")
                continue
            if family == "rotary-attention" and self.positions == "mask":
                explain.append(f"{family}: off (positions=mask; positions=contiguous allows it, without left padding)")
                continue
            candidate = model.clone()
            count, notes = apply[family](candidate)
            explain += [f"{family}: {note}" for note in notes]
            if count == 0:
                explain.append(f"{family}: no match")
                chained = None
                if self.lowering == "measure" and any(p not in stats for p in PREREQUISITES.get(family, ())):
                    chained = _with_prerequisites(
                        family, model, stats, skipped, chooser, signature, faithfulness, explain, apply
                    )
                if chained is None:
                    unmatched.append(family)
                    continue
                model, counts = chained
                modified = True
                stats.update(counts)
                continue
            if self.lowering == "measure":
                try:
                    verdict = _faithful_verdict(
                        faithfulness, chooser, family, {**signature, "count": count}, model, candidate
                    )
                except Exception as error:  # a form ORT cannot time at this shape is not kept
                    explain.append(f"{family}: {count} matched, reverted: timing failed ({first_line(error)})")
                    continue
                if isinstance(verdict, str):
                    explain.append(f"{family}: {count} matched, reverted: {verdict}")
                    continue
                sound[family] = count
                outcome = "kept" if verdict.keep else "reverted (not faster)"
                explain.append(f"{family}: {count} matched, {verdict.source} speedup {verdict.speedup:.3f}×: {outcome}")
                stats[f"{family} speedup"] = round(verdict.speedup, 3)
                if not verdict.keep:
                    continue
            else:
                broken = faithfulness.breakage(candidate)
                if broken:
                    explain.append(f"{family}: {count} matched, reverted: {broken}")
                    continue
                sound[family] = count
                explain.append(f"{family}: {count} matched, kept")
            stats[family] = count
            model, modified = candidate, True
        kept_alone = [family for family in sound if family in stats]
        if self.lowering == "measure" and len(sound) > 1 and len(kept_alone) < len(sound):
            lost = {f for f, alternative in ALTERNATIVES.items() if alternative in stats and f not in stats}
            # the sound families, those kept only after their prerequisites, and those that matched
            # nothing alone: the candidate is built from the original, so a family left out is lost
            tried = [f for f in apply if (f in sound or f in stats or f in unmatched) and f not in lost]
            together = _together(faithfulness, model, tried, chooser, signature, explain, apply)
            if together is not None:
                model, counts = together
                modified = True
                for family in apply:  # built from the original, the candidate's counts are all there is
                    stats.pop(family, None)
                stats.update(counts)
        return PassResult(model, modified, dict(stats), explain)


def _together(
    faithfulness: _Faithfulness,
    current: ir.Model,
    families: list[str],
    chooser: LoweringChooser,
    signature: dict,
    explain: list[str],
    apply: dict[str, Applier],
) -> tuple[ir.Model, dict[str, int]] | None:
    """`families` (the sound ones, and those that matched nothing alone) at once, timed against the
    kept ones: families too small to win one at a time (a norm, a rotary embedding) can win
    together, and a family that builds on another (skip-norm on the lowered norms) matches only
    then. Returns the model and counts if it wins."""
    candidate, counts = faithfulness.original.clone(), {}
    for family in families:
        count, _ = apply[family](candidate)
        if count:
            counts[family] = count
    label = "+".join(counts)
    if _wins(f"{label} together", counts, faithfulness, current, candidate, chooser, signature, explain, against=True):
        return candidate, counts
    return None


def _with_prerequisites(
    family: str,
    current: ir.Model,
    kept: Counter[str],
    skipped: set[str],
    chooser: LoweringChooser,
    signature: dict,
    faithfulness: _Faithfulness,
    explain: list[str],
    apply: dict[str, Applier],
) -> tuple[ir.Model, dict[str, int]] | None:
    """`family` applied after those of its prerequisites not kept yet, timed against `current`.
    Returns the model and counts if it wins."""
    chain = [*(p for p in PREREQUISITES[family] if p not in kept), family]
    if skipped.intersection(chain):
        explain.append(f"{family}: needs {', '.join(sorted(skipped.intersection(chain)))}, skipped (option)")
        return None
    candidate, counts = current.clone(), {}
    for name in chain:
        count, _ = apply[name](candidate)
        if count == 0:
            explain.append(f"{family} after {', '.join(chain[:-1])}: {name} matched nothing there, not timed")
            return None
        counts[name] = count
    label = f"{family} with {', '.join(name for name in counts if name != family)}"
    if _wins(label, counts, faithfulness, current, candidate, chooser, signature, explain):
        return candidate, counts
    return None


def _wins(
    label: str,
    counts: dict[str, int],
    faithfulness: _Faithfulness,
    current: ir.Model,
    candidate: ir.Model,
    chooser: LoweringChooser,
    signature: dict,
    explain: list[str],
    against: bool = False,
) -> bool:
    """Whether `candidate` (several families applied, `counts`) keeps the original's outputs and
    times faster than `current`; explains the verdict under `label` (`against`: says it was timed
    against the families kept alone)."""
    try:
        verdict = _faithful_verdict(
            faithfulness, chooser, "+".join(counts), {**signature, "count": counts}, current, candidate
        )
    except Exception as error:
        explain.append(f"{label}: reverted: timing failed ({first_line(error)})")
        return False
    if isinstance(verdict, str):
        explain.append(f"{label}: reverted: {verdict}")
        return False
    baseline = " over the families kept alone" if against else ""
    outcome = "kept" if verdict.keep else "not kept"
    explain.append(f"{label}: {verdict.source} speedup {verdict.speedup:.3f}×{baseline}: {outcome}")
    return verdict.keep


def _faithful_verdict(
    faithfulness: _Faithfulness,
    chooser: LoweringChooser,
    family: str,
    signature: dict,
    current: ir.Model,
    candidate: ir.Model,
) -> Verdict | str:
    """The chooser's verdict on `candidate` against `current`, or why the candidate is not faithful.
    A candidate is checked before it is timed; one whose verdict is cached is not timed, and is
    checked only where `faithfulness` says so: one that a cached verdict rejects never (it is not
    kept), one that it keeps while `faithfulness` trusts the cache not alone, but in the pass's
    output, once (`deferred`). A check is a session of the whole model: SmolLM2's warm int4 `fuse`
    took 12.0 s checking its six kept forms one by one, 5.1 s checking its output once."""
    known = chooser.cached(family, signature, current, candidate)
    if known is not None and (not known.keep or faithfulness.trust_cached):
        faithfulness.deferred |= known.keep
        return known
    broken = faithfulness.breakage(candidate)
    if broken:
        return broken
    return known if known is not None else chooser.choose(family, signature, current, candidate)


class _Faithfulness:
    """Checks that a candidate computes what the model given to `fuse` computes, on small padded
    inputs, within the exact tolerance: the pass manager's check of the whole pass, applied to
    each family (alone, chained or together) before it is timed, since pattern rules from a
    library can misfire on a graph form they were not written for (a rewrite that runs on one
    exporter's output can break another's). The given model's outputs are computed once.

    While `trust_cached`, a form that a cached verdict keeps is not checked alone (it was, when it
    was timed); `deferred` then says that the pass's output is to be checked before it is returned,
    and the pass is run again checking each form where that output breaks."""

    def __init__(self, original: ir.Model):
        self.original = original
        self.trust_cached = True
        self.deferred = False
        self._inputs: list | None = None
        self._references: list | None = None

    def breakage(self, candidate: ir.Model) -> str | None:
        """Why `candidate` is not a faithful rewrite of the original, or None."""
        from xopt.verify import EXACT_TOLERANCE, VerificationError, parity_over, references_over

        if self._references is None:
            self._inputs = verification_inputs(self.original)
            self._references = references_over(self.original, self._inputs)
        try:
            result = parity_over(candidate, self._inputs, self._references)
        except VerificationError as error:
            return str(error)
        return None if result.within(EXACT_TOLERANCE) else f"outputs differ (max rel {result.max_rel:.1e})"


def _signature(structure: TransformerStructure) -> dict:
    """What a lowering's speed depends on besides the machine and the operators: the dimensions."""
    summary = structure.summary()
    keys = ("num_blocks", "hidden_size", "num_heads", "num_kv_heads", "head_size", "intermediate_size", "vocab_size")
    return {k: summary[k] for k in keys}


# ----------------------------------------------------------------------------- merged linears


def _merge_qkv(model: ir.Model) -> tuple[int, list[str]]:
    structure = find_transformer_structure(model, heads=False)  # no head counts needed: no probe run
    groups = [(b.index, [b.attention.q, b.attention.k, b.attention.v]) for b in structure.blocks if b.attention]
    return _merge_groups(model, groups, "Q/K/V")


def _merge_gate_up(model: ir.Model) -> tuple[int, list[str]]:
    structure = find_transformer_structure(model, heads=False)  # no head counts needed: no probe run
    groups = [(b.index, [b.mlp.gate, b.mlp.up]) for b in structure.blocks if b.mlp and b.mlp.gate is not None]
    return _merge_groups(model, groups, "gate/up")


def _merge_groups(model: ir.Model, groups: list[tuple[int, list[Linear]]], what: str) -> tuple[int, list[str]]:
    count, notes = 0, []
    for index, linears in groups:
        reason = _merge_refusal(linears)
        if reason:
            notes.append(f"block {index} {what}: {reason}")
            continue
        _merge(model.graph, linears)
        count += 1
    common_passes.RemoveUnusedNodesPass()(model)
    return count, notes


def _merge_refusal(linears: list[Linear]) -> str | None:
    if len(set(map(id, linears))) < len(linears):
        return "already one linear"
    if any(linear.input is not linears[0].input for linear in linears):
        return "the projections read different inputs"
    if not all(owns_weight(linear) for linear in linears):
        return "a weight is shared with another node"
    if len({weight_dtype(linear.weight) for linear in linears}) != 1:
        return "the weights differ in dtype"
    return None


def _merge(graph: ir.Graph, linears: list[Linear]) -> None:
    """X·[W₁|…|Wₖ] + [b₁|…|bₖ] → Split into the k original outputs."""
    first = min((linear.node for linear in linears), key=list(graph).index)
    stacked = np.concatenate([weight_in_out(x) for x in linears], 1)
    biased = any(linear.bias is not None for linear in linears)
    bias = np.concatenate([bias_or_zeros(x) for x in linears]) if biased else None
    sizes = [x.out_features for x in linears]
    base = (linears[0].weight.name or "linear") + "_merged"
    nodes = split_linear(graph, linears[0].input, stacked, bias, sizes, weight_dtype(linears[0].weight), base)
    graph.insert_before(first, nodes)
    for linear, part in zip(linears, nodes[-1].outputs, strict=True):
        part.dtype, part.shape = linear.output.dtype, linear.output.shape
        replace_value(linear.output, part)


# ----------------------------------------------------------------------------- norms


def _lower_norms(model: ir.Model) -> tuple[int, list[str]]:
    structure = find_transformer_structure(model, heads=False)  # no head counts needed: no probe run
    norms = [n for b in structure.blocks for n in (*b.norms, *b.output_norms)]
    norms += [n for n in (structure.embedding_norm, structure.final_norm) if n is not None]
    count, notes = 0, []
    opset = model.opset_imports.get("", 1)
    for norm in norms:
        if len(norm.nodes) == 1:
            continue  # already one operator
        reason = _norm_refusal(norm, opset)
        if reason:
            notes.append(f"{norm.kind} at {norm.output.name}: {reason}")
            continue
        _replace_norm(model.graph, norm)
        count += 1
    common_passes.RemoveUnusedNodesPass()(model)
    return count, notes


def _norm_refusal(norm: Norm, opset: int) -> str | None:
    if norm.kind == "LayerNorm" and opset < 17:
        return f"LayerNormalization needs opset 17 (the model has {opset})"
    if any(node.op_type == "Cast" for node in norm.nodes):
        return "the norm casts (mixed precision)"
    if (shared := read_outside(norm)) is not None:
        return f"an intermediate ({shared.name}) is read outside the norm"
    if norm.input.shape is None or not isinstance(norm.input.shape[-1], int) or norm.input.dtype is None:
        return "unknown hidden size or dtype"
    return None


def _replace_norm(graph: ir.Graph, norm: Norm) -> None:
    width = norm.input.shape[-1]
    dtype = norm.input.dtype.numpy()  # known: see _norm_refusal
    scale = norm.scale if norm.scale is not None else new_initializer(graph, "norm_ones", np.ones(width), dtype)
    attributes = {"axis": -1, "epsilon": norm.epsilon, "stash_type": 1}
    if norm.kind == "LayerNorm":
        inputs = [norm.input, scale] + ([norm.shift] if norm.shift is not None else [])
        nodes = [ir.node("LayerNormalization", inputs, attributes=attributes)]
    else:  # an RMSNorm's shift β (a recentred LayerNorm's that fold-norms could not fold) follows it
        nodes = [ir.node("SimplifiedLayerNormalization", [norm.input, scale], attributes=attributes)]
        if norm.shift is not None:
            nodes.append(ir.node("Add", [nodes[0].outputs[0], norm.shift]))
    graph.insert_after(norm.nodes[-1], nodes)
    for node in nodes:
        node.outputs[0].dtype, node.outputs[0].shape = norm.input.dtype, norm.output.shape
    replace_value(norm.output, nodes[-1].outputs[0])


_SKIP_NORMS = {
    "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization",
    "LayerNormalization": "SkipLayerNormalization",
}


def _fuse_skip_norms(model: ir.Model) -> tuple[int, list[str]]:
    count, notes = 0, []
    for norm in [n for n in model.graph if n.op_type in _SKIP_NORMS and n.domain == ""]:
        add = norm.inputs[0].producer()
        if add is None or add.op_type not in ("Add", "Sum") or add.domain != "" or len(add.inputs) != 2:
            continue
        reason = _skip_norm_refusal(norm, add)
        if reason:
            notes.append(f"{norm.op_type} at {norm.outputs[0].name}: {reason}")
            continue
        _replace_skip_norm(model.graph, norm, add)
        count += 1
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    common_passes.RemoveUnusedNodesPass()(model)
    return count, notes


def _skip_norm_refusal(norm: ir.Node, add: ir.Node) -> str | None:
    shapes = [value.shape for value in add.inputs]
    if any(shape is None or len(shape) != 3 for shape in shapes) or list(shapes[0]) != list(shapes[1]):
        return "the residual Add's operands are not two [batch, sequence, hidden] tensors of one shape"
    if norm.attributes.get_int("axis", -1) not in (-1, 2):
        return "the norm is not over the last axis"
    if any(output.uses() or output.is_graph_output() for output in norm.outputs[1:]):
        return "the norm's mean or inverse deviation is read"
    if any(value is not None and value.producer() is not None for value in norm.inputs[1:]):
        return "the scale or shift is computed, not stored"
    return None


def _replace_skip_norm(graph: ir.Graph, norm: ir.Node, add: ir.Node) -> None:
    """Norm(a + b) → Skip…Normalization(a, b, γ[, β]) with outputs (y, -, -, a + b)."""
    epsilon = norm.attributes.get_float("epsilon", 1e-5)
    outputs = [ir.Value(name="") for _ in range(4)]  # y, mean, inverse deviation, a + b
    node = ir.Node(
        "com.microsoft",
        _SKIP_NORMS[norm.op_type],
        [*add.inputs, *norm.inputs[1:]],
        attributes=[ir.AttrFloat32("epsilon", epsilon)],
        outputs=outputs,
    )
    graph.insert_after(add, node)  # where the sum was: its readers may precede the norm
    for new, old in ((outputs[0], norm.outputs[0]), (outputs[3], add.outputs[0])):
        new.name, new.dtype, new.shape = f"{old.name}_fused", old.dtype, old.shape
        replace_value(old, new)


# ----------------------------------------------------------------------------- onnxscript's rules


def _onnxscript_family(
    names: tuple[str, ...], produces: frozenset[str], first: Callable[[ir.Model], int] | None = None
) -> Callable[[ir.Model], tuple[int, list[str]]]:
    """Apply onnxscript ORT fusion functions in order, after xopt's rewrite `first` of the forms
    their rules miss. Intermediate fusion ops that no later rule lowered (a RotaryEmbedding whose
    cos/sin cache did not match) are inlined back to standard ops; the count is the ORT operators
    of `produces` that remain."""

    def apply(model: ir.Model) -> tuple[int, list[str]]:
        from onnxscript.rewriter import ort_fusions

        if first is not None:
            first(model)
        common_passes.ShapeInferencePass()(model)
        for name in names:
            getattr(ort_fusions._core, name)(model)
        common_passes.InlinePass()(model)
        _drop_unused(model)
        return sum(node.op_type in produces for node in model.graph), []

    return apply


def _apply_attention(model: ir.Model, pack_projections: bool = True) -> tuple[int, list[str]]:
    """The encoder attention → ORT's fused operators; without `pack_projections` the Q, K and V
    projections stay linears before a MultiHeadAttention instead of packed into an Attention."""
    from onnxscript.optimizer import fold_constants_ir
    from onnxscript.rewriter import ort_fusions

    if has_kv_cache(model):
        return 0, ["a KV-cache decoder's attention is cached-attention's"]
    common_passes.ShapeInferencePass()(model)
    fusions = ort_fusions._core
    count = fusions.fuse_sdpa(model, apply_shape_inference=True)
    if count == 0:
        return 0, []
    if fusions.fuse_gqa(model):
        fusions.fuse_qkv_gqa(model)
    if fusions.fuse_mha1(model) + fusions.fuse_mha2(model):
        fusions.fuse_mha_scale(model)
        fusions.fuse_mha_bias(model)
        if pack_projections:
            fusions.fuse_attention(model)
    fusions.replace_sdpa_by_mha(model)
    common_passes.InlinePass()(model)  # an SDPA no rule lowered goes back to standard ops
    # the Q, K, V weights and biases come stacked by Concats of constants: stored as initializers
    fold_constants_ir(model, should_fold=lambda node: node.op_type == "Concat" and node.domain == "")
    _drop_unused(model)
    ops = Counter(node.op_type for node in model.graph if node.domain == "com.microsoft")
    notes = [f"lowered to {', '.join(f'{n}× {op}' for op, n in sorted(ops.items()) if 'Attention' in op)}"]
    return sum(n for op, n in ops.items() if "Attention" in op), notes


def _drop_unused(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)


Applier = Callable[[ir.Model], tuple[int, list[str]]]  # a family's rewrite: (matches, notes)
_APPLY: dict[str, Applier] = {
    "norm": _lower_norms,
    "residual-sum": pin_residual_sums,
    "skip-norm": _fuse_skip_norms,
    "rotary": lower_rotary,
    "cached-attention": lower_cached_attention,
    "group-query-attention": lower_group_query_attention,
    "rotary-attention": lower_rotary_attention,
    "attention": _apply_attention,
    "gelu": _onnxscript_family(
        ("fuse_erfgelu", "fuse_gelu", "fuse_bias_gelu"), frozenset({"Gelu", "FastGelu", "BiasGelu"}), lower_tanh_gelu
    ),
    "merge-qkv": _merge_qkv,
    "merge-gate-up": _merge_gate_up,
}


def _appliers(weights: str) -> dict[str, Applier]:
    """Each family's rewrite, in the order they are tried, for a recipe whose linears are `weights`.
    One that quantizes them keeps the encoder's Q, K and V projections as linears (an `Attention`
    would hold them in float), merged first: the MultiHeadAttention then reads the Split of one
    quantized linear, which quantizes its input once, not three times."""
    if WEIGHTS[weights] is None:
        return {family: _APPLY[family] for family in FAMILIES}
    quantized = {**_APPLY, "attention": partial(_apply_attention, pack_projections=False)}
    order = [family for family in FAMILIES if family != "merge-qkv"]
    order.insert(order.index("attention"), "merge-qkv")
    return {family: quantized[family] for family in order}


class _Quantized:
    """Quantizes a model's linears with `quantize`'s `options`, to time a family next to them as a
    recipe lowers them. Every form timed is a copy of one model, so each weight tensor is quantized
    once (`SharedForms`), not once per form timed."""

    def __init__(self, options: dict):
        from xopt.passes.quantize import QuantizeWeightsPass, SharedForms

        self.quantizer = QuantizeWeightsPass(**options)
        self.shared = SharedForms()

    def __call__(self, model: ir.Model) -> ir.Model:
        return self.quantizer.quantize(model, self.shared).model

"""`prune-width`: narrow every MLP by an interpolative decomposition of its hidden activations,
and with `heads=R` every attention by its heads (STAT; Flynn et al., 2024): lossy,
training-free, and the result is dense and smaller. The head math is in `attention_heads`.

For one MLP y = Z·W_down + b with hidden activations Z = act(x·W_gate) ⊙ (x·W_up) (or act(x·W_up))
of width m, over the calibration tokens (rows of Z), keep k = round((1 − ratio)·m) neurons S and
write every neuron as a combination of the kept ones:

    Z ≈ Z[:, S]·C,   C = (Z_Sᵀ Z_S)⁻¹ Z_Sᵀ Z  (k × m, C[:, S] = I)

so y ≈ Z_S·(C·W_down) + b: W_up and W_gate keep their columns S (and biases), W_down becomes
C·W_down (k × d). S is chosen by column-pivoted QR of Z (greedily the neuron least explained by
those already kept). Everything comes from the Gram matrix G = ZᵀZ accumulated in float64
(`xopt.calibration.second_moments`): with G = RᵀR (Cholesky), the pivoted QR of R picks the same
columns as that of Z, and C = G[S,S]⁻¹ G[S,:]. Reported per MLP: the relative output error on
calibration, tr(W_downᵀ (G − G[:,S] G[S,S]⁻¹ G[S,:]) W_down) / tr(W_downᵀ G W_down).

Reshapes between the up and down projections whose constant shape names the width m (GPT-2's
Conv1D flattens to [-1, m] where `cleanup` has not made its Gemms MatMuls) are rewritten to k; a
width computed any other way is refused. A fused gate/up projection of width 2m split into two
halves (Phi-3's [gate | up]) keeps columns S of each half: S and m + S.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import scipy.linalg

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import const_array, consumers
from xopt.analysis.structure import MLP, TransformerStructure
from xopt.calibration import SecondMoment, calibration_feeds, second_moments
from xopt.errors import XoptError
from xopt.passes.attention_heads import (
    HeadCounts,
    HeadPlan,
    attention_region,
    head_groups,
    narrow_attention,
    plan_shape_rewrites,
    select_heads,
)
from xopt.pipeline import Pass, PassResult, register
from xopt.rewrite import (
    ShapeRewrite,
    bias_or_zeros,
    owns_weight,
    region_after,
    set_bias,
    set_weight,
    shape_owner,
    weight_in_out,
)
from xopt.verify import require_no_opaque_operators

logger = logging.getLogger(__name__)

Moments = dict[str, SecondMoment]
JITTER = 1e-10  # added to G's diagonal, relative to its mean, so that dead neurons do not stop Cholesky


@dataclass
class MLPPlan:
    """One MLP's pruning, checked before anything changes."""

    mlp: MLP
    keep: int  # hidden neurons kept
    region: list[ir.Node]  # the nodes between its up/gate and down projections
    rewrites: list[ShapeRewrite]  # reshape constants naming the width
    halves: bool  # one projection [gate | up] of width 2m, split in two (Phi-3)


@register
@dataclass
class PruneWidthPass(Pass):
    name = "prune-width"
    exact = False
    summary = "remove MLP neurons and attention heads by interpolative decomposition of activations (STAT)"

    ratio: float = 0.0  # fraction of each MLP's hidden neurons removed
    heads: float = 0.0  # fraction of each attention's query heads removed (equal in every KV group)
    calibration: str = ""  # text file; empty: the bundled calibration text
    windows: int = 8  # calibration windows of 512 tokens
    threads: int = 2

    def __call__(self, model: ir.Model) -> PassResult:
        for option in ("ratio", "heads"):
            if not 0 <= getattr(self, option) < 1:
                raise XoptError(f"{option}={getattr(self, option):g} must be between 0 and 1")
        if not (self.ratio or self.heads):
            raise XoptError("ratio=0 and heads=0: give ratio (MLP neurons) or heads between 0 and 1")
        require_no_opaque_operators(model.graph, "run prune-width before fuse")
        structure = find_transformer_structure(model)
        mlps = self._plan_mlps(structure) if self.ratio else []
        attentions = self._plan_attentions(structure) if self.heads else []
        feeds = calibration_feeds(model, self.calibration or None, windows=self.windows)
        probed = [plan.mlp.down.input for plan in mlps] + [plan.attention.o.input for plan in attentions]
        moments = second_moments(model, probed, feeds, threads=self.threads)
        explain: list[str] = []
        stats = _prune_heads(model.graph, attentions, moments, explain)
        stats |= _prune_mlps(model.graph, mlps, moments, explain)
        common_passes.RemoveUnusedNodesPass()(model)  # the old weights
        return PassResult(model, True, stats, explain)

    def _plan_mlps(self, structure: TransformerStructure) -> list[MLPPlan]:
        """Every MLP with its kept width and shape rewrites, checked before anything changes."""
        mlps = [b.mlp for b in structure.blocks if b.mlp is not None]
        if not mlps:
            raise XoptError("no MLP found")
        plans = []
        for mlp in mlps:
            region = _width_region(mlp)
            if isinstance(region, str):
                raise XoptError(f"MLP {mlp.down.name}: {region}")
            if not all(owns_weight(x) for x in mlp.linears):
                raise XoptError(f"MLP {mlp.down.name}: a projection shares its weight")
            halves = _split_in_halves(mlp)
            if isinstance(halves, str):
                raise XoptError(f"MLP {mlp.down.name}: {halves}")
            keep = max(1, round((1 - self.ratio) * mlp.down.in_features))
            plans.append(MLPPlan(mlp, keep, region, _width_rewrites(region, mlp.down.in_features, keep), halves))
        return plans

    def _plan_attentions(self, structure: TransformerStructure) -> list[HeadPlan]:
        """Every attention with its head counts and shape rewrites, checked before anything changes."""
        attentions = [b.attention for b in structure.blocks if b.attention is not None]
        if not attentions:
            raise XoptError("no attention found")
        plans = []
        for attention in attentions:
            where = f"attention {attention.o.name}"
            if not attention.num_heads or not attention.num_kv_heads:
                raise XoptError(f"{where}: its head count is unknown")
            if not all(owns_weight(x) for x in attention.linears):
                raise XoptError(f"{where}: a projection shares its weight")
            groups = head_groups(attention)
            keep_per_group = max(1, round((1 - self.heads) * len(groups[0])))
            if keep_per_group == len(groups[0]):
                raise XoptError(
                    f"heads={self.heads:g} removes no head: {where} keeps its {len(groups[0])} query heads "
                    f"per {'KV head' if len(groups) > 1 else 'attention'}"
                )
            region = attention_region(attention)
            if isinstance(region, str):
                raise XoptError(f"{where}: {region}")
            counts = HeadCounts(
                heads=attention.num_heads,
                repeat=attention.num_heads // attention.num_kv_heads,
                head_size=attention.head_size,
                fused_width=attention.q.out_features if attention.fused_qkv else 0,
                kept_heads=keep_per_group * len(groups),
            )
            rewrites = plan_shape_rewrites(region, counts, attention)
            if isinstance(rewrites, str):
                raise XoptError(f"{where}: {rewrites}")
            plans.append(HeadPlan(attention, counts, keep_per_group, region, rewrites))
        return plans


def _prune_heads(graph: ir.Graph, plans: list[HeadPlan], moments: Moments, explain: list[str]) -> dict:
    errors = []
    for index, plan in enumerate(plans):
        attention, counts = plan.attention, plan.counts
        gram = moments[attention.o.input.name].matrix
        groups = head_groups(attention)
        kept, rows, error = select_heads(
            gram, weight_in_out(attention.o), counts.head_size, groups, plan.keep_per_group
        )
        narrow_attention(graph, attention, kept, rows, plan.region, plan.rewrites, counts)
        errors.append(error)
        explain.append(
            f"attention {index}: {counts.heads} → {len(kept)} heads (kept {kept.tolist()}), "
            f"relative output error {error:.4f} (calibration)"
        )
    if not plans:
        return {}
    return {"heads_kept": plans[0].counts.kept_heads, "heads": plans[0].counts.heads, "head_error": _rounded(errors)}


def _prune_mlps(graph: ir.Graph, plans: list[MLPPlan], moments: Moments, explain: list[str]) -> dict:
    errors = []
    for index, plan in enumerate(plans):
        width = plan.mlp.down.in_features
        gram = moments[plan.mlp.down.input.name].matrix
        kept, interpolation = interpolative_decomposition(gram, plan.keep)
        down = weight_in_out(plan.mlp.down)
        error = output_error(gram, kept, interpolation, down)
        _narrow(graph, plan, kept, interpolation @ down)
        errors.append(error)
        explain.append(f"MLP {index}: {width} → {plan.keep} neurons, relative output error {error:.4f} (calibration)")
    if not plans:
        return {}
    return {"neurons_kept": plans[0].keep, "neurons": width, "output_error": _rounded(errors)}


def _rounded(errors: list[float]) -> list[float]:
    return [round(e, 6) for e in errors]


def interpolative_decomposition(gram: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` columns S of Z chosen by column-pivoted QR, and C with Z ≈ Z[:, S]·C, from G = ZᵀZ."""
    width = len(gram)
    jitter = JITTER * max(np.trace(gram) / width, 1e-30)
    factor = scipy.linalg.cholesky(gram + jitter * np.eye(width), lower=False)
    _, pivots = scipy.linalg.qr(factor, mode="r", pivoting=True)
    kept = np.sort(pivots[:keep])
    interpolation = np.linalg.solve(gram[np.ix_(kept, kept)] + jitter * np.eye(keep), gram[kept])
    return kept, interpolation


def output_error(gram: np.ndarray, kept: np.ndarray, interpolation: np.ndarray, down: np.ndarray) -> float:
    """tr(Wᵀ (G − G[:,S]·C) W) / tr(Wᵀ G W), C = G[S,S]⁻¹ G[S,:] as solved (with its jitter, which a
    neuron silent on the calibration text needs: ReLU MLPs have them)."""
    explained = gram[:, kept] @ interpolation
    total = np.sum(down * (gram @ down))
    return float(np.sum(down * ((gram - explained) @ down)) / max(total, 1e-30))


def _narrow(graph: ir.Graph, plan: MLPPlan, kept: np.ndarray, down: np.ndarray) -> None:
    """Keep columns `kept` of up/gate, store the new down weight, and make the region's shapes say k."""
    mlp, width, keep = plan.mlp, plan.mlp.down.in_features, len(kept)
    columns = np.concatenate([kept, width + kept]) if plan.halves else kept
    for linear in (mlp.up, mlp.gate):
        if linear is None:
            continue
        bias = bias_or_zeros(linear)
        set_weight(graph, linear, weight_in_out(linear)[:, columns])
        if linear.bias is not None:
            set_bias(graph, linear, bias[columns])
        linear.out_features = len(columns)
    set_weight(graph, mlp.down, down)
    mlp.down.in_features = keep
    for rewrite in plan.rewrites:
        rewrite.apply(graph)
    narrowed = {width: keep, 2 * width: 2 * keep} if plan.halves else {width: keep}
    for node in plan.region:
        for value in node.outputs:
            if value.shape is not None:
                value.shape = ir.Shape([narrowed.get(dim, dim) for dim in value.shape])


def _split_in_halves(mlp: MLP) -> bool | str:
    """Whether the MLP's one projection [gate | up] of width 2m is split into its two halves on
    the last axis; a reason where its width is neither m nor that."""
    width = mlp.down.in_features
    if mlp.gate is not None or mlp.up.out_features == width:
        return False
    readers = consumers(mlp.up.output)
    split = readers[0] if len(readers) == 1 and readers[0].op_type == "Split" else None
    if mlp.up.out_features == 2 * width and split is not None and len(split.outputs) == 2:
        axis, rank = split.attributes.get_int("axis", 0), len(mlp.up.output.shape or ())
        sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if axis in (-1, rank - 1) and (sizes is None or sizes.reshape(-1).tolist() == [width, width]):
            return True
    return f"its up projection is {mlp.up.out_features} wide for a down projection reading {width}"


def _width_region(mlp: MLP) -> list[ir.Node] | str:
    """The nodes from the up/gate projections up to the down projection's input (the hidden
    activations of width m), or why the width cannot be changed there."""
    starts = [x for x in (mlp.up, mlp.gate) if x is not None]
    region = region_after(starts, mlp.down.node, 64)
    if region is None:
        return "the MLP's hidden activations reach beyond its down projection"
    if any(node.op_type == "Reshape" and shape_owner(node) is None for node in region):
        return "a Reshape with a computed shape sits between its up and down projections"
    return region


def _width_rewrites(region: list[ir.Node], width: int, keep: int) -> list[ShapeRewrite]:
    """The Reshapes (and Split sizes) in the region whose constants name the width, with k in its place."""
    rewrites = []
    for node in (node for node in region if node.op_type in ("Reshape", "Split")):
        owner = node if node.op_type == "Split" else shape_owner(node)
        constants = {}
        for index in [1] if owner is node else range(len(owner.inputs)):
            array = const_array(owner.inputs[index]) if index < len(owner.inputs) else None
            if array is not None and width in array.reshape(-1).tolist():
                constants[index] = np.where(array == width, keep, array).astype(array.dtype)
        if constants:
            rewrites.append(ShapeRewrite(node, owner, constants))
    return rewrites

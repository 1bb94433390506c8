"""`low-rank`: replace a linear's weight W [n in, m out] by two matrices of rank k, x·W ≈ (x·A)·B
with A [n, k] and B [k, m] (lossy). In every method the factors come from a truncated SVD of a
transformed weight, in float64:

- `svd`: W = UΣVᵀ, A = U_kΣ_k, B = V_kᵀ; minimises ‖W − AB‖_F.
- `asvd` (ASVD; Yuan et al., 2023): s_j = mean_t|x_tj|^α over the calibration tokens (α = `alpha`),
  SVD of diag(s)·W, A = diag(1/s)·U_kΣ_k: the input channels that carry large activations are
  kept more faithfully.
- `svdllm` (SVD-LLM; Wang et al., 2024): with XᵀX = S·Sᵀ (Cholesky, X the calibration inputs,
  damped by 1e-6 of its mean diagonal), SVD of Sᵀ·W, A = S⁻ᵀ·U_kΣ_k, B = V_kᵀ. Since X·S⁻ᵀ has
  orthonormal columns, ‖X·W − X·A·B‖_F = ‖Sᵀ·W − U_kΣ_kV_kᵀ‖_F: the truncation error is exactly
  the output error on the calibration tokens, Σ_{i>k} σ_i².

Rank: `energy=E` keeps, per matrix, the fewest components with Σ_{i≤k} σ_i² ≥ E·Σ σ_i² (of the
transformed matrix). `ratio=R` removes a fraction R of the targeted matrices' parameters: every
component i of matrix j costs e_ij = σ_ij² / Σ_i σ_ij² (its share of the matrix's output energy
under `svdllm`, a proxy under the others) and the components below a common threshold τ go,
τ found by bisection so that the parameters saved reach R; the budget is spent where the
calibration error it causes is smallest. That error is local: with `allocation=sensitivity` each
matrix's costs are weighted by how much the task loss (`block_gates.CalibrationLoss`: next-token
NLL, or 1 − min embedding cosine) moves per unit of it. Matrix j alone is truncated to the rank
that saves the fraction R of its own parameters, relative error ε_j = Σ_{i>k} e_ij; with ΔL_j the
loss increase on `SENSITIVITY_WINDOWS` calibration windows, the cost becomes w_j·e_ij with
w_j = ΔL_j / ε_j (first order: ΔL ≈ Σ_j w_j ε_j; a ΔL_j ≤ 0 counts as the smallest positive one).
All L + 1 runs share one ONNX Runtime session of a copy in which each matrix is switched between
its dense and its truncated form (`block_gates.add_switch`). A matrix is factored only when k(n + m) < n·m (fewer
parameters); with `objective=speed` (the default) also only where ONNX Runtime runs the pair of
MatMuls faster than the dense one at the target batch and sequence (timed on this machine, cached,
held to `lossy`: near the threshold both measurements must show it; `backends/lowering.py`);
`objective=size` factors wherever it saves parameters. The explain lists every matrix: rank,
parameters saved, the measured time of the dense and the factored form, and the decision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import scipy.linalg

from xopt.analysis import find_transformer_structure
from xopt.analysis.patterns import Linear
from xopt.backends.lowering import LoweringChooser, Verdict
from xopt.backends.onnxruntime import create_session
from xopt.calibration import SecondMoment, calibration_feeds, second_moments
from xopt.capture.huggingface import TASK_CAUSAL_LM
from xopt.errors import XoptError
from xopt.passes.block_gates import CalibrationLoss, add_switch, switch_name
from xopt.pipeline import Pass, PassResult, register
from xopt.progress import progress
from xopt.rewrite import drop_if_unused, new_initializer, owns_weight, replace_linear, weight_dtype, weight_in_out
from xopt.runnable import model_task
from xopt.verify import require_no_opaque_operators

logger = logging.getLogger(__name__)

DAMP = 1e-6
MIN_SPEEDUP = 1.03  # the factored pair must be this much faster than the dense MatMul (objective=speed)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SENSITIVITY_WINDOWS = 1


@dataclass
class Factors:
    label: str  # block and role, e.g. "block 3 down"
    linear: Linear
    left: np.ndarray  # [n, r] transformed left factor A·diag(σ)… for the full rank r
    right: np.ndarray  # [r, m]
    energy: np.ndarray  # σ_i² of the transformed matrix, descending
    rank: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.linear.in_features, self.linear.out_features

    def saved(self, rank: int) -> int:
        n, m = self.shape
        return n * m - rank * (n + m) if rank * (n + m) < n * m else 0


@register
@dataclass
class LowRankPass(Pass):
    name = "low-rank"
    exact = False
    summary = "factor linear weights into two low-rank matrices (SVD, ASVD, SVD-LLM) where it pays"

    ratio: float = 0.0  # fraction of the targeted matrices' parameters removed
    energy: float = 0.0  # or: per matrix, the fraction of Σσ² kept
    method: Literal["svd", "asvd", "svdllm"] = "svdllm"
    targets: str = "q+k+v+o+gate+up+down"  # which linears of each block, joined by '+'
    objective: Literal["speed", "size"] = "speed"
    allocation: Literal["energy", "sensitivity"] = "energy"  # how ratio= spends its budget (module doc)
    alpha: float = 0.5  # ASVD's exponent
    calibration: str = ""  # text file; empty: the bundled calibration text
    windows: int = 8  # calibration windows of 512 tokens
    threads: int = 2
    batch: int = 1  # the shape the factored pair is timed at (objective=speed)
    sequence: int = 128

    def __call__(self, model: ir.Model) -> PassResult:
        if not 0 <= self.ratio < 1 or not 0 <= self.energy <= 1:
            raise XoptError("ratio must lie in (0, 1) and energy in (0, 1]")
        if (self.ratio > 0) == (self.energy > 0):
            raise XoptError(
                "give exactly one of ratio=R in (0, 1) (parameters removed) or energy=E in (0, 1] (spectrum kept)"
            )
        if self.allocation == "sensitivity" and not self.ratio:
            raise XoptError("allocation=sensitivity spends a ratio=R budget; energy=E sets every rank itself")
        linears, explain = self._targets(model)
        statistics = {}
        feeds = []
        if self.method != "svd" or self.allocation == "sensitivity":
            feeds = calibration_feeds(model, self.calibration or None, windows=self.windows)
        if self.method != "svd":
            statistics = second_moments(model, [linear.input for _, linear in linears], feeds, threads=self.threads)
        factors = [
            Factors(
                label,
                linear,
                *factor_weight(weight_in_out(linear), self.method, statistics.get(linear.input.name), self.alpha),
            )
            for label, linear in progress(linears, unit="linear", description="factorize")
        ]
        if self.energy:
            for f in factors:
                f.rank = int(np.searchsorted(np.cumsum(f.energy) / f.energy.sum(), self.energy - 1e-12) + 1)
        elif self.allocation == "sensitivity":
            weights = self._sensitivities(model, factors, feeds)
            _allocate(factors, self.ratio, weights / weights.max())
            explain.append(
                f"sensitivity (loss per unit of relative error) from {min(len(feeds), SENSITIVITY_WINDOWS)} "
                f"calibration runs: min {weights.min():.3g}, median {np.median(weights):.3g}, max {weights.max():.3g}"
            )
        else:
            _allocate(factors, self.ratio, np.ones(len(factors)))
        verdicts = self._timed(factors) if self.objective == "speed" else {}
        graph, saved, factored = model.graph, 0, 0
        for f in factors:
            n, m = f.shape
            verdict = verdicts.get((n, m, f.rank))
            timing = ""
            if verdict is not None:
                timing = (
                    f", {verdict.source} {verdict.current_ms:.3f} ms dense → {verdict.candidate_ms:.3f} ms factored "
                    f"({verdict.speedup:.2f}×)"
                )
            if f.saved(f.rank) == 0:
                explain.append(f"{f.label}: kept dense: rank {f.rank} of {n}×{m} saves no parameters")
            elif verdict is not None and not verdict.keep:
                explain.append(f"{f.label}: kept dense: rank {f.rank} is not faster{timing}")
            else:
                _factor_linear(graph, f)
                saved += f.saved(f.rank)
                factored += 1
                explain.append(f"{f.label}: rank {f.rank} of {n}×{m}, {f.saved(f.rank)} parameters saved{timing}")
        total = sum(f.shape[0] * f.shape[1] for f in factors)
        share = saved / max(total, 1)
        explain.insert(0, f"{factored} of {len(factors)} matrices factored, {share:.1%} of their parameters saved")
        stats = {"factored": factored, "matrices": len(factors), "params_saved": saved, "target_params": total}
        return PassResult(model, factored > 0, stats, explain)

    def _targets(self, model: ir.Model) -> tuple[list[tuple[str, Linear]], list[str]]:
        wanted = set(self.targets.split("+"))
        unknown = wanted - set(TARGETS)
        if unknown:
            raise XoptError(f"targets: unknown {sorted(unknown)} (choose from {'+'.join(TARGETS)})")
        require_no_opaque_operators(model.graph, "run low-rank before fuse")
        structure = find_transformer_structure(model)
        if not structure.blocks:
            raise XoptError("no transformer blocks found")
        linears, explain = [], []
        for block in structure.blocks:
            parts = {}
            if block.attention is not None and not block.attention.fused_qkv:
                a = block.attention
                parts.update(q=a.q, k=a.k, v=a.v, o=a.o)
            if block.mlp is not None:
                parts.update(gate=block.mlp.gate, up=block.mlp.up, down=block.mlp.down)
            for role, linear in parts.items():
                if role not in wanted or linear is None:
                    continue
                label = f"block {block.index} {role}"
                if linear.node.op_type != "MatMul" or not owns_weight(linear):
                    explain.append(f"{label}: not factored: a Gemm or a shared weight")
                    continue
                linears.append((label, linear))
        if not linears:
            why = f": the {len(explain)} that match are Gemms or share their weights (as ALBERT's layers do)"
            raise XoptError(f"no linear that can be factored matches targets={self.targets}{why * bool(explain)}")
        return linears, explain

    def _sensitivities(self, model: ir.Model, factors: list[Factors], feeds) -> np.ndarray:
        """w_j = ΔL_j / ε_j for each matrix truncated alone to save `ratio` of its parameters."""
        switched = model.clone()
        linears = dict(self._targets(switched)[0])
        probes = []
        for index, f in enumerate(factors):
            n, m = f.shape
            rank = max(1, int((1 - self.ratio) * n * m / (n + m)))
            probes.append(float(f.energy[rank:].sum() / max(f.energy.sum(), 1e-300)))
            linear = linears[f.label]
            first, second = _factor_nodes(switched.graph, linear, f.left[:, :rank], f.right[:rank])
            add_switch(switched.graph, linear.node.outputs[0], second.outputs[0], [first, second], index)
        causal_lm = model_task(model) == TASK_CAUSAL_LM
        session = create_session(switched, threads=self.threads)
        loss = CalibrationLoss(session, feeds[:SENSITIVITY_WINDOWS], causal_lm)
        base = loss({})
        rises = np.array([loss({switch_name(j): 1.0}) - base for j in range(len(factors))])
        floor = rises[rises > 0].min() if np.any(rises > 0) else 1.0
        return np.maximum(rises, floor) / np.maximum(probes, 1e-12)

    def _timed(self, factors: list[Factors]) -> dict[tuple[int, int, int], Verdict]:
        """The factored pair timed against the dense MatMul, per distinct (n, m, k)."""
        chooser = LoweringChooser(
            threads=self.threads, batch=self.batch, sequence=self.sequence, min_speedup=MIN_SPEEDUP, lossy=True
        )
        verdicts = {}
        for f in factors:
            n, m = f.shape
            key = (n, m, f.rank)
            if key in verdicts or f.saved(f.rank) == 0:
                continue
            signature = {"n": n, "m": m, "k": f.rank}
            verdicts[key] = chooser.choose(
                "low-rank", signature, _matmul_model(n, m, None), _matmul_model(n, m, f.rank)
            )
        return verdicts


def factor_weight(
    weight: np.ndarray, method: str, statistics: SecondMoment | None, alpha: float = 0.5, damp: float = DAMP
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left [n, r], right [r, m], σ² descending) with weight ≈ left[:, :k]·right[:k] at rank k;
    `statistics` (Σ xxᵀ, Σ|x|, tokens of the input) for asvd and svdllm; svdllm adds
    `damp` · mean diag(XᵀX) to the diagonal before its Cholesky factor."""
    if method == "svd":
        u, sigma, vt = np.linalg.svd(weight, full_matrices=False)
        return u * sigma, vt, sigma**2
    gram = statistics.matrix
    if method == "asvd":
        scale = np.maximum(statistics.absolute / statistics.tokens, 1e-8) ** alpha
        u, sigma, vt = np.linalg.svd(scale[:, None] * weight, full_matrices=False)
        return (u * sigma) / scale[:, None], vt, sigma**2
    shift = damp * max(np.trace(gram) / len(gram), 1e-30)
    factor = scipy.linalg.cholesky(gram + shift * np.eye(len(gram)), lower=True)  # XᵀX = S·Sᵀ
    u, sigma, vt = np.linalg.svd(factor.T @ weight, full_matrices=False)
    return scipy.linalg.solve_triangular(factor.T, u * sigma, lower=False), vt, sigma**2  # S⁻ᵀ·U·Σ


def _allocate(factors: list[Factors], ratio: float, weights: np.ndarray) -> None:
    """Ranks that save `ratio` of the parameters, dropping the components of least weighted relative
    energy w_j·e_ij (weights in (0, 1])."""
    shares = [w * f.energy / max(f.energy.sum(), 1e-300) for f, w in zip(factors, weights, strict=True)]
    target = ratio * sum(f.shape[0] * f.shape[1] for f in factors)

    def ranks(threshold: float) -> list[int]:
        return [int(np.count_nonzero(share > threshold)) for share in shares]

    def saved(threshold: float) -> int:
        return sum(f.saved(k) for f, k in zip(factors, ranks(threshold), strict=True))

    low, high = 0.0, 1.0  # saved(high) is everything that can be saved
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if saved(middle) < target else (low, middle)
    for f, k in zip(factors, ranks(high), strict=True):
        f.rank = max(k, 1)


def _factor_nodes(graph: ir.Graph, linear: Linear, left: np.ndarray, right: np.ndarray) -> tuple[ir.Node, ir.Node]:
    """The MatMuls (x·A)·B for a linear's input x (not inserted), A and B stored in its weight's dtype."""
    dtype = weight_dtype(linear.weight)
    base = linear.name
    first = ir.node("MatMul", inputs=[linear.input, new_initializer(graph, f"{base}_lowrank_a", left, dtype)])
    second = ir.node("MatMul", inputs=[first.outputs[0], new_initializer(graph, f"{base}_lowrank_b", right, dtype)])
    hidden = first.outputs[0]
    hidden.dtype = linear.input.dtype
    if linear.input.shape is not None:
        hidden.shape = ir.Shape([*list(linear.input.shape)[:-1], left.shape[1]])
    return first, second


def _factor_linear(graph: ir.Graph, f: Factors) -> None:
    """x·W → (x·A)·B with A = left[:, :k], B = right[:k] (the bias, if any, stays after)."""
    linear, k = f.linear, f.rank
    first, second = _factor_nodes(graph, linear, f.left[:, :k], f.right[:k])
    graph.insert_before(linear.node, first)
    weight = linear.weight
    replace_linear(graph, linear, second)
    drop_if_unused(graph, weight)


def _matmul_model(n: int, m: int, rank: int | None) -> ir.Model:
    """x [batch, sequence, n] · W [n, m], or · A [n, k] · B [k, m] (random weights: timing only)."""
    generator = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "sequence", n]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="matmul")
    shapes = [(n, m)] if rank is None else [(n, rank), (rank, m)]
    value = x
    for index, shape in enumerate(shapes):
        weight = new_initializer(graph, f"w{index}", generator.standard_normal(shape) / np.sqrt(shape[0]), np.float32)
        node = ir.node("MatMul", inputs=[value, weight])
        graph.append(node)
        value = node.outputs[0]
    value.name, value.dtype, value.shape = "y", ir.DataType.FLOAT, ir.Shape(["batch", "sequence", m])
    graph.outputs.append(value)
    return ir.Model(graph, ir_version=10)

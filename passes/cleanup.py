"""`cleanup`: constant folding, dead code, common subexpressions, no-op and shape simplification.

Exact: every rewrite replaces a subgraph by one that computes the same values.
- Values an exporter left without a shape get one from symbolic shape inference
  (`missing_shapes.py`: TorchScript exports store none).
- Constant folding evaluates nodes whose inputs are all constants (including `Shape` of values
  whose shape is static, and the static dims of others: `shape_dims.py`) and replaces them by
  initializers: f(c₁, …, cₖ) → c. A Reshape target's dim read from a shape where the input has
  that dim becomes 0, "copy" (`shape_dims.py`).
- Layout ops on weights (`Transpose`, `Cast`, `Reshape`, `(Un)Squeeze` of an initializer) are
  folded whatever the weight's size: W' = Wᵀ is stored once instead of computed every run. A
  weight with other readers (a tied embedding table) is left alone: folding would store it twice.
- Rewrite rules remove no-ops (`Identity`, `x + 0`, `x · 1` with exact scalar constants:
  `exact_no_ops.py`, `Reshape` to the same shape,
  `Cast` to the same type, `Expand` to the same shape) and collapse chains (`Reshape∘Reshape`,
  `Cast∘Cast`, `Transpose∘Transpose`, `Unsqueeze∘Unsqueeze`, full-range `Slice`).
- Dead code: nodes none of whose outputs reach a graph output are removed.
- CSE: two nodes with the same op, attributes and inputs compute the same value; keep one.
- Duplicate initializers with equal contents are merged; one that is another transposed (a tied
  head TorchScript stored as its own Eᵀ) is read as Transpose(E) (`transposed_duplicates.py`).
- Gemm linears become MatMul (+ Add), their flatten/restore Reshapes dropped (`gemm_linears.py`).
- An Add or Mul of (constant, x) is written (x, constant), the order pattern rules match
  (`constant_operands.py`).
- A parallel block's (a + m) + h is written (h + a) + m, two residual adds
  (`parallel_residual.py`).

The work is done by onnxscript's constant folder and rewrite rules and onnx-ir's common passes,
sequenced as onnxscript's `optimize_ir` does, with exact no-op rules in place of its
approximate ones, and minus one rule: `SlicesSplit` matches a pattern
with several output nodes by scanning the whole graph per candidate, O(N²), which took 95% of a
4-minute cleanup of SmolLM2's 6,540-node export and changes nothing a later pass needs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter import _DEFAULT_REWRITE_RULES, RewritePass

from xopt.errors import XoptError
from xopt.passes.constant_operands import put_constants_second
from xopt.passes.exact_no_ops import APPROXIMATE_NO_OP_RULES, EXACT_NO_OP_RULES
from xopt.passes.gemm_linears import gemm_linears_to_matmul
from xopt.passes.missing_shapes import infer_missing_shapes
from xopt.passes.parallel_residual import reassociate_parallel_residuals
from xopt.passes.shape_dims import copy_dims_in_reshape_targets, fold_static_shape_dims
from xopt.passes.transposed_duplicates import share_transposed_duplicates
from xopt.pipeline import Pass, PassResult, register

_QUADRATIC_RULES = frozenset({"SlicesSplit"})
_REWRITE_RULES = (
    *EXACT_NO_OP_RULES.rules,
    *(
        rule
        for rule in _DEFAULT_REWRITE_RULES
        if rule.name not in _QUADRATIC_RULES and rule not in APPROXIMATE_NO_OP_RULES
    ),
)
_SMALL_CONSTANT = 1024  # elements
_LAYOUT_OPS = frozenset({"Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity"})


@register
@dataclass
class CleanupPass(Pass):
    name = "cleanup"
    exact = True
    summary = "constant folding, dead code, CSE, no-op and shape-computation simplification"

    iterations: int = 2
    fold_input_limit: int = 8192  # elements: larger constant inputs are not folded (weights' layout ops are)

    def __call__(self, model: ir.Model) -> PassResult:
        if self.iterations < 1 or self.fold_input_limit < 0:
            raise XoptError("cleanup: iterations must be at least 1 and fold_input_limit not negative")
        ops_before = Counter(node.op_type for node in model.graph)
        initializers_before = len(model.graph.initializers)
        common_passes.InlinePass()(model)
        shapes = infer_missing_shapes(model)
        gemms = gemm_linears_to_matmul(model.graph)
        dims = copies = 0
        for _ in range(self.iterations):
            copies += copy_dims_in_reshape_targets(model.graph)
            dims += fold_static_shape_dims(model.graph)
            folded = fold_constants_ir(
                model,
                onnx_shape_inference=True,
                input_size_limit=self.fold_input_limit,
                should_fold=_fold_weight_layout,
            )
            rewritten = RewritePass(_REWRITE_RULES)(model)
            common_passes.RemoveUnusedNodesPass()(model)
            if not (folded.modified or rewritten.modified):
                break
        swapped = put_constants_second(model.graph)
        parallel = reassociate_parallel_residuals(model)
        transposed = share_transposed_duplicates(model.graph)
        for step in (
            common_passes.RemoveUnusedNodesPass(),
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common_passes.DeduplicateInitializersPass(),
            common_passes.CommonSubexpressionEliminationPass(),
            common_passes.IdentityEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedOpsetsPass(),
            common_passes.TopologicalSortPass(),
        ):
            step(model)
        ops_after = Counter(node.op_type for node in model.graph)
        removed = {op: count - ops_after[op] for op, count in ops_before.items() if count > ops_after[op]}
        stats = {
            "nodes_removed": sum(ops_before.values()) - sum(ops_after.values()),
            "removed_by_op": dict(sorted(removed.items(), key=lambda kv: -kv[1])),
            **({"shapes_inferred": shapes} if shapes else {}),
            **({"static_shape_dims_folded": dims} if dims else {}),
            **({"reshape_dims_copied": copies} if copies else {}),
            **({"gemm_linears_to_matmul": gemms} if gemms else {}),
            **({"constant_operands_put_second": swapped} if swapped else {}),
            **({"parallel_residuals_reassociated": parallel} if parallel else {}),
            **({"transposed_duplicates_shared": transposed} if transposed else {}),
        }
        reordered = parallel + swapped > 0
        modified = ops_before != ops_after or initializers_before != len(model.graph.initializers) or reordered
        return PassResult(model, modified, stats)


def _fold_weight_layout(node: ir.Node) -> bool | None:
    """Fold layout ops on constants regardless of size, unless a large constant has other readers:
    folding Transpose(E) of a tied embedding table would store the table twice. Small shared
    constants (a Slice axis, a shape) fold as usual: later pattern rules need them constant."""
    if node.domain in ("", "ai.onnx") and node.op_type in _LAYOUT_OPS:
        shared = any(len(v.uses()) > 1 and _elements(v) > _SMALL_CONSTANT for v in node.inputs if v is not None)
        return not shared
    return None


def _elements(value: ir.Value) -> float:
    """Element count of a value (infinite when unknown)."""
    if value.const_value is not None:
        return value.const_value.size
    if value.shape is not None and value.shape.is_static():
        return math.prod(value.shape.numpy())
    return math.inf

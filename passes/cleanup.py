"""`cleanup`: constant folding, dead code, common subexpressions, no-op and shape simplification.

Exact: every rewrite replaces a subgraph by one that computes the same values.
- Constant folding evaluates nodes whose inputs are all constants (including `Shape` of values
  whose shape is static) and replaces them by initializers: f(c₁, …, cₖ) → c.
- Rewrite rules remove no-ops (`Identity`, `x + 0`, `x · 1`, `Reshape` to the same shape,
  `Cast` to the same type, `Expand` to the same shape) and collapse chains (`Reshape∘Reshape`,
  `Cast∘Cast`, `Transpose∘Transpose`, `Unsqueeze∘Unsqueeze`, full-range `Slice`).
- Dead code: nodes none of whose outputs reach a graph output are removed.
- CSE: two nodes with the same op, attributes and inputs compute the same value; keep one.
- Duplicate initializers with equal contents are merged.
- Layout ops on weights (`Transpose`, `Cast`, `Reshape`, `(Un)Squeeze` of an initializer) are
  folded whatever the weight's size: W' = Wᵀ is stored once instead of computed every run.

The work is onnxscript's optimizer (`optimize_ir`) and onnx-ir's common passes; this pass only
sequences them and reports what changed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize_ir

from xopt.pipeline import Pass, PassResult, register


@register
@dataclass
class CleanupPass(Pass):
    name = "cleanup"
    exact = True
    summary = "constant folding, dead code, CSE, no-op and shape-computation simplification"

    iterations: int = 2
    fold_input_limit: int = 8192  # elements: larger constant inputs are not folded

    def __call__(self, model: ir.Model) -> PassResult:
        ops_before = Counter(node.op_type for node in model.graph)
        initializers_before = len(model.graph.initializers)
        optimize_ir(
            model,
            num_iterations=self.iterations,
            input_size_limit=self.fold_input_limit,
            should_fold=_fold_weight_layout,
        )
        common_passes.IdentityEliminationPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.TopologicalSortPass()(model)
        ops_after = Counter(node.op_type for node in model.graph)
        removed = {op: ops_before[op] - ops_after.get(op, 0) for op in ops_before if ops_before[op] > ops_after[op]}
        stats = {
            "nodes_removed": sum(ops_before.values()) - sum(ops_after.values()),
            "removed_by_op": dict(sorted(removed.items(), key=lambda kv: -kv[1])),
        }
        modified = ops_before != ops_after or initializers_before != len(model.graph.initializers)
        return PassResult(model, modified, stats)


_LAYOUT_OPS = frozenset({"Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity"})


def _fold_weight_layout(node: ir.Node) -> bool | None:
    """Fold layout ops whose inputs are all constants regardless of size; default rules otherwise."""
    if node.domain in ("", "ai.onnx") and node.op_type in _LAYOUT_OPS:
        return True
    return None

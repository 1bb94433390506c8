"""`residual-sum`, a family of `fuse`: the residual Add under a norm, Norm(a + b), becomes
Norm(Sum(a, b)).

Sum of two tensors is Add: the same values, bit for bit. What changes is what ONNX Runtime makes
of the graph when it opens a session: its SkipLayerNormFusion rewrites Add + LayerNormalization
(where the hidden size is static) into com.microsoft SkipLayerNormalization, and on some CPUs that
kernel is slower than the two it replaces (ONNX Runtime 1.32 on a Xeon: MiniLM's 12 took 1.45 ms
of an 11 ms run at 1×128, against 0.76 ms for the LayerNormalizations, their bias Adds and the
Sums). The fusion matches Add only, so a Sum keeps the two apart. Whether that pays is measured
by `fuse` like every family; `skip-norm`, timed after it, weighs the fused operator against this
form, which ONNX Runtime no longer rewrites behind the measurement's back.
"""

from __future__ import annotations

import onnx_ir as ir

from xopt.rewrite import replace_value

NORMS = ("LayerNormalization", "SimplifiedLayerNormalization")


def pin_residual_sums(model: ir.Model) -> tuple[int, list[str]]:
    """Each Add (two operands) read by a norm → Sum of the same operands; returns the count."""
    count = 0
    for norm in [n for n in model.graph if n.op_type in NORMS and n.domain == ""]:
        add = norm.inputs[0].producer()
        if add is None or add.op_type != "Add" or add.domain != "":
            continue
        total = ir.node("Sum", list(add.inputs), name=f"{add.name}_sum")
        model.graph.insert_after(add, total)
        old, new = add.outputs[0], total.outputs[0]
        new.name, new.dtype, new.shape = f"{old.name}_sum", old.dtype, old.shape
        replace_value(old, new)
        model.graph.remove(add, safe=True)
        count += 1
    return count, []

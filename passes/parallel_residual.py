"""Parallel residual blocks in one form, for `cleanup`.

GPT-NeoX (Pythia), GPT-J, Phi-2 and Falcon run a block's attention and MLP side by side on the
same stream h (each through its own norm, or one shared norm) and add both outputs at once:

    h' = (a + m) + h,   a = attn(norm₁(h)),  m = mlp(norm₂(h))

The sum of the two sublayer outputs is no residual add of either, so the structure analysis would
find no skip connection for the attention or the MLP. The same sum associated the other way,

    h' = (h + a) + m,

computes h' up to float rounding (the order of two additions), and reads as two residual adds:
the attention's, with skip h, and the MLP's, with skip h + a. The analysis then knows the block
as parallel because its MLP's norm reads the block's input h, not the attention's sum
(`Block.parallel`), and every pass reads the block through the usual residual adds: its input is
h (the attention's skip), its output h' (the MLP's residual add).
"""

from __future__ import annotations

import onnx_ir as ir

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import consumers, is_constant
from xopt.analysis.structure import sublayer_output
from xopt.rewrite import replace_value


def reassociate_parallel_residuals(model: ir.Model) -> int:
    """Rewrite each (a + m) + h of a parallel block as (h + a) + m; returns how many."""
    graph = model.graph
    count = 0
    for block in find_transformer_structure(model, heads=False).blocks:
        attention, mlp = block.attention, block.mlp
        if attention is None or mlp is None or attention.residual is None or attention.residual is not mlp.residual:
            continue
        join = attention.residual  # a + m: both sublayers found it as their residual add
        outer = consumers(join.outputs[0])
        if len(outer) != 1 or outer[0].op_type != "Add":
            continue
        stream = next((v for v in outer[0].inputs if v is not join.outputs[0]), None)
        if stream is None or is_constant(stream):
            continue
        with_attention = ir.node("Add", [stream, sublayer_output(attention)])
        with_mlp = ir.node("Add", [with_attention.outputs[0], sublayer_output(mlp)])
        graph.insert_before(outer[0], [with_attention, with_mlp])
        old = outer[0].outputs[0]
        for new in (with_attention.outputs[0], with_mlp.outputs[0]):
            new.dtype, new.shape = old.dtype, old.shape
        replace_value(old, with_mlp.outputs[0])
        graph.remove([outer[0], join], safe=True)
        count += 1
    return count

"""`last-token-logits`: a causal LM returns the logits of its last position only, which is all
that generation reads (transformers' generate asks for the same with `logits_to_keep=1`).

The LM head and whatever follows it (a bias, a logit soft-cap) act on each position alone, so

    logits[:, −1:, :] = head(h)[:, −1:, :] = head(h[:, −1:, :])

and a Slice of the head's input to the last position gives the same numbers for that position,
without the V×d product on the other S − 1 rows of a prompt: on SmolLM2-135M (V = 49,152,
d = 576) the head is 28 M of 134 M weights, about a fifth of a prefill's multiply-adds.

The output's sequence axis becomes 1: `xopt generate` reads the last position as before, but
perplexity, which needs every position, cannot be measured on the result (`xopt eval` says so).
Rows of a right-padded batch end in padding; batch decoders pad on the left. Preconditions: the
LM head writes a graph output and reads a [batch, sequence, hidden] value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from xopt.analysis import find_transformer_structure
from xopt.analysis.graph_view import const_array
from xopt.errors import XoptError
from xopt.pipeline import Pass, PassResult, register
from xopt.rewrite import new_initializer

logger = logging.getLogger(__name__)

LAST = np.iinfo(np.int64).max


@register
@dataclass
class LastTokenLogitsPass(Pass):
    name = "last-token-logits"
    exact = True
    summary = "compute the LM head for the last position only (what generation reads)"

    def __call__(self, model: ir.Model) -> PassResult:
        head = find_transformer_structure(model).lm_head
        if head is None:
            raise XoptError("no LM head found (the linear that writes the logits)")
        hidden = head.input
        if hidden.shape is None or len(hidden.shape) != 3:
            raise XoptError(f"the LM head {head.name} does not read a [batch, sequence, hidden] value")
        if _is_last_position(hidden.producer()):
            return PassResult(model, False, {}, ["the LM head already reads one position"])
        graph = model.graph
        constants = [new_initializer(graph, name, np.array([v]), np.int64) for name, v in _SLICE.items()]
        last = ir.node("Slice", inputs=[hidden, *constants])
        last.outputs[0].dtype = hidden.dtype
        last.outputs[0].shape = ir.Shape([hidden.shape[0], 1, hidden.shape[2]])
        graph.insert_before(head.node, last)
        head.node.replace_input_with(0, last.outputs[0])
        _one_position_downstream(head.node)
        return PassResult(model, True, {"positions": 1}, [f"LM head {head.name} reads the last position only"])


_SLICE = {"last_position_start": -1, "last_position_end": LAST, "last_position_axis": 1}


def _is_last_position(node: ir.Node | None) -> bool:
    """Whether `node` is this pass's Slice (a raw export may slice the full range there)."""
    if node is None or node.op_type != "Slice" or len(node.inputs) < 4:
        return False
    bounds = [const_array(v) for v in node.inputs[1:4]]
    return all(b is not None for b in bounds) and [b.reshape(-1).tolist() for b in bounds] == [[-1], [LAST], [1]]


def _one_position_downstream(start: ir.Node) -> None:
    """Set the sequence axis of every value from the head to the graph outputs to 1."""
    frontier, seen = [start], set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for value in node.outputs:
            if value.shape is not None and len(value.shape) == 3:
                value.shape = ir.Shape([value.shape[0], 1, value.shape[2]])
            frontier.extend(user for user, _ in value.uses())

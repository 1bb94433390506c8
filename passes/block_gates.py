"""A gated copy of a transformer, so that one ONNX Runtime session evaluates many block removals.

Every block l's output becomes

    h_out' = h_in + g_l · (h_out − h_in),    g_l a float input `xopt_block_gate.l` (shape [1]):

g_l = 1 is the block as it is, g_l = 0 is h_in exactly: the block removed (`greedy` in
`block_scores.py`). Given a map T_l for block l (ReplaceMe, `prune_layers.py`), its MLP output M
becomes

    M' = M + s_l · (M·T_l − M),    s_l a float input `xopt_switch.l`:

s_l = 0 is the block as it is, s_l = 1 writes M·T_l, as the down projection W·T_l would.
`add_switch` puts such a switch on any value (`low_rank.py` switches a linear to its factored form).

`CalibrationLoss` runs such a session over fixed calibration feeds at given gates and switches
(every gate open and every switch off unless given): the next-token cross-entropy (nats/token) of
a causal LM, or 1 − the smallest cosine between an encoder's mean-pooled embeddings and those of
the full model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from xopt.analysis import find_transformer_structure
from xopt.analysis.block_boundaries import block_input, block_output
from xopt.analysis.structure import sublayer_output
from xopt.backends.onnxruntime import run
from xopt.evaluate import cosine, log_softmax, mean_pool
from xopt.rewrite import new_initializer, replace_value

GATE_PREFIX = "xopt_block_gate."
SWITCH_PREFIX = "xopt_switch."


def gate_name(block: int) -> str:
    return f"{GATE_PREFIX}{block}"


def switch_name(block: int) -> str:
    return f"{SWITCH_PREFIX}{block}"


def gated_model(model: ir.Model, maps: Mapping[int, np.ndarray] | None = None) -> ir.Model:
    """A copy of `model` with a gate on every block's output and a switched map T on the MLP output
    of each block in `maps` (block index → T [d, d])."""
    gated = model.clone()
    graph = gated.graph
    structure = find_transformer_structure(gated)
    for index, transform in (maps or {}).items():
        output = sublayer_output(structure.blocks[index].mlp)
        weight = new_initializer(graph, f"xopt_map.{index}", transform, np.float32)
        mapped = ir.node("MatMul", inputs=[output, weight])
        add_switch(graph, output, mapped.outputs[0], [mapped], index)
    for block in structure.blocks:
        h_in, h_out = block_input(block), block_output(block, structure)  # h_in: the previous gated output
        _blend(graph, h_out, base=h_in, other=h_out, weight=_control(graph, gate_name(block.index)))
    return gated


def add_switch(graph: ir.Graph, value: ir.Value, other: ir.Value, first: Sequence[ir.Node], index: int) -> None:
    """Readers of `value` read value + s·(other − value) instead, s the input `switch_name(index)`;
    the nodes `first` compute `other` from what `value`'s producer reads or from `value`."""
    _blend(graph, value, base=value, other=other, weight=_control(graph, switch_name(index)), first=first)


def _control(graph: ir.Graph, name: str) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    graph.inputs.append(value)
    return value


def _blend(
    graph: ir.Graph,
    replaced: ir.Value,
    *,
    base: ir.Value,
    other: ir.Value,
    weight: ir.Value,
    first: Sequence[ir.Node] = (),
) -> None:
    """Every reader of `replaced` reads base + weight·(other − base) instead; the nodes `first`
    (which compute `other`) and the blend go right after `replaced`'s producer."""
    delta = ir.node("Sub", inputs=[other, base])
    scaled = ir.node("Mul", inputs=[delta.outputs[0], weight])
    total = ir.node("Add", inputs=[base, scaled.outputs[0]])
    producer = replaced.producer()
    replace_value(replaced, total.outputs[0])
    for node in (*first, delta, total):  # they read the value the blend replaces
        for index, value in enumerate(node.inputs):
            if value is total.outputs[0]:
                node.replace_input_with(index, replaced)
    graph.insert_after(producer, [*first, delta, scaled, total])


class CalibrationLoss:
    """The loss of a gated model's session over fixed feeds, at given gates and switches."""

    def __init__(self, session, feeds: Sequence[dict[str, np.ndarray]], causal_lm: bool):
        self.session, self.feeds, self.causal_lm = session, list(feeds), causal_lm
        self.output = session.get_outputs()[0].name
        controls = [i.name for i in session.get_inputs()]
        self.defaults = {name: np.ones(1, np.float32) for name in controls if name.startswith(GATE_PREFIX)}
        self.defaults |= {name: np.zeros(1, np.float32) for name in controls if name.startswith(SWITCH_PREFIX)}
        self.reference = None if causal_lm else self._embeddings({})

    def _run(self, feed: dict[str, np.ndarray], controls: Mapping[str, float]) -> np.ndarray:
        settings = {name: np.full(1, value, np.float32) for name, value in controls.items()}
        return run(self.session, {**feed, **self.defaults, **settings}, [self.output])[self.output]

    def _embeddings(self, controls: Mapping[str, float]) -> list[np.ndarray]:
        return [mean_pool(self._run(f, controls).astype(np.float64), f["attention_mask"]) for f in self.feeds]

    def __call__(self, controls: Mapping[str, float]) -> float:
        """The loss with `controls` (input name → value; `gate_name`, `switch_name`) set."""
        if not self.causal_lm:
            cosines = [cosine(a, b) for a, b in zip(self.reference, self._embeddings(controls), strict=True)]
            return float(1.0 - np.min(np.concatenate(cosines)))
        total, count = 0.0, 0
        for feed in self.feeds:
            logp = log_softmax(self._run(feed, controls))[:, :-1]
            targets = feed["input_ids"][:, 1:]
            total -= float(np.take_along_axis(logp, targets[..., None], axis=-1).sum())
            count += targets.size
        return total / count

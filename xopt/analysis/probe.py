"""Concrete shapes of intermediate values, by one run in ONNX Runtime.

Exporters annotate most values with shapes, but not all (TorchScript exports leave them out, a
third-party file may strip them). When a needed dimension is unknown, the values are exposed as
extra graph outputs of a clone and the clone is run once on a sample input with batch 1 and a
prime sequence length (7), so no model dimension is mistaken for the sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx_ir as ir

from xopt.backends.onnxruntime import check_session, run
from xopt.inputs import sample_inputs

logger = logging.getLogger(__name__)

PROBE_BATCH, PROBE_SEQUENCE = 1, 7


def probe_shapes(model: ir.Model, values: Sequence[ir.Value]) -> dict[str, tuple[int, ...]]:
    """Run a clone of `model` once with `values` exposed as outputs; their shapes by name."""
    wanted = [v.name for v in values if v.name]
    if not wanted:
        return {}
    clone = model.clone()
    by_name = {v.name: v for node in clone.graph for v in node.outputs if v.name}
    existing = {v.name for v in clone.graph.outputs}
    for name in wanted:
        if name not in existing and name in by_name:
            clone.graph.outputs.append(by_name[name])
    feeds = sample_inputs(model, batch=PROBE_BATCH, sequence=PROBE_SEQUENCE)
    names = [name for name in wanted if name in by_name or name in existing]
    outputs = run(check_session(clone), feeds, names)
    logger.debug("probed %d shapes with one run", len(outputs))
    return {name: tuple(array.shape) for name, array in outputs.items()}

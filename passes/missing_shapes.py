"""Shapes for the values an exporter left without one, by ONNX Runtime's symbolic shape inference.

TorchScript exports (Hugging Face Optimum's among them) store no shapes of intermediate values,
and where a `Reshape`'s target is computed from `Shape` ops ONNX's own inference loses the output's
rank: nothing downstream has a shape, so `Gather(Shape(q), 3)` (a head size) cannot fold and the
matchers read no layout. ONNX Runtime's `SymbolicShapeInference` carries shapes through such
computations as sympy expressions of the input dims (`past_sequence_length + sequence_length`).
It reads weights only for their shape and small constants for their values, so it is given the
model with its large weights declared as graph inputs (`verify.weightless_form`). A value that has
a shape keeps it; a model the inference fails on is left as it was (its shapes stay unknown, as
before), with the reason logged.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from xopt.errors import first_line
from xopt.verify import weightless_form

logger = logging.getLogger(__name__)


def infer_missing_shapes(model: ir.Model) -> int:
    """Annotate the main graph's values that have no shape; returns how many got one."""
    missing = {v.name: v for node in model.graph for v in node.outputs if v.shape is None and v.name}
    if not missing:
        return 0
    try:
        inferred = SymbolicShapeInference.infer_shapes(ir.to_proto(weightless_form(model)), auto_merge=True)
    except Exception as error:  # an operator it does not know, a shape it cannot merge
        logger.info("symbolic shape inference failed (%s); shapes left unknown", first_line(error))
        return 0
    annotated = 0
    for info in inferred.graph.value_info:
        value = missing.get(info.name)
        if value is None or not info.type.HasField("tensor_type"):
            continue
        typed = ir.serde.deserialize_type_proto_for_type(info.type)
        shape = ir.serde.deserialize_type_proto_for_shape(info.type)
        if shape is None:
            continue
        value.shape = shape
        if value.type is None:
            value.type = typed
        annotated += 1
    return annotated

"""Capture an ONNX file from any exporter into an `ir.Model`.

Weights stay where they are: external data is memory-mapped by onnx-ir, never copied or
rewritten, so the input file is never modified. Before handing the model on we check what a
later pass would otherwise trip over half-way: the protobuf parses, there is a graph, and every
external tensor lies inside a file that exists and is long enough.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx_ir as ir

from xopt.errors import XoptError, first_line

logger = logging.getLogger(__name__)


def load_onnx_file(path: Path) -> ir.Model:
    """Load `path` (an ONNX protobuf, with or without external data) without reading weights."""
    if not path.is_file():
        raise XoptError(f"{path}: no such file")
    try:
        model = ir.load(path)
    except Exception as error:  # protobuf raises DecodeError, RuntimeError, ValueError...
        reason = first_line(error)
        hint = "" if path.suffix == ".onnx" else "; xopt reads .onnx and .pt2 files and Hugging Face folders"
        raise XoptError(f"{path}: not a readable ONNX model ({reason}){hint}") from None
    if model.ir_version < 3 or (len(model.graph) == 0 and not model.graph.outputs):
        raise XoptError(f"{path}: not an ONNX model (no graph in the file)")
    _check_external_data(model, path)
    logger.info("loaded %s: %d nodes, %d initializers", path, len(model.graph), len(model.graph.initializers))
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data_file = Path(tensor.base_dir) / tensor.location
        if not data_file.is_file():
            raise XoptError(f"{path}: external data file {tensor.location!r} is missing")
        needed = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
        if data_file.stat().st_size < needed:
            raise XoptError(
                f"{path}: external data file {tensor.location!r} is truncated "
                f"(tensor {value.name!r} needs {needed} bytes, file has {data_file.stat().st_size})"
            )

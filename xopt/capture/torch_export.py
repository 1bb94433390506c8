"""Capture PyTorch programs into an `ir.Model` through torch.export (torch.fx).

`torch.onnx.export(..., dynamo=True)` traces the module with torch.export into an FX graph,
decomposes it to core ATen and translates every FX node into ONNX, producing onnx-ir directly.
Each ONNX node keeps the module path it came from (metadata `pkg.torch.onnx.name_scopes`), which
the structure analysis reads as a hint. The exporter's own graph optimizer is left off: the
`cleanup` pass does that work, measured and verified, so capture stays a faithful translation.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from xopt.errors import XoptError, first_line

logger = logging.getLogger(__name__)


def export_to_ir(
    program: Any,
    example_inputs: Sequence[Any] = (),
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    retry_dynamic_shapes: Mapping[str, Any] | None = None,
) -> ir.Model:
    """Export an `nn.Module` (with example inputs) or an `ExportedProgram` to onnx-ir.

    A module torch.onnx cannot trace is traced once more by torch.export without the exporter's
    `backed_size_oblivious` setting, which reads every dynamic axis as possibly 0 or 1: MPT's
    `max(0, 1 - query_length)` then has no provable value and its guards turn out inconsistent,
    where axes of at least 2 (the examples' sizes) prove it 0. The retry takes the same axes with
    maxima where the caller gives them (`retry_dynamic_shapes`): GPT-Neo and XGLM slice rows
    [P, P + S) of a causal-mask table of L rows, which holds only for P + S ≤ L, a relation of two
    axes torch.export takes only as bounds on each. The graph is the same translation (its Slices
    are computed at run time); its axes get the names the dynamic shapes give them, as the module
    path names them."""
    import torch

    try:
        model = _onnx_export(program, example_inputs, input_names, output_names, dynamic_shapes).model
    except XoptError as error:
        if not isinstance(program, torch.nn.Module):
            raise
        first_failure = error
    else:
        _warn_of_fixed_axes(model, dynamic_shapes)
        return model
    shapes, output = retry_dynamic_shapes if retry_dynamic_shapes is not None else dynamic_shapes, io.StringIO()
    try:
        with _quiet_export(output):
            exported = torch.export.export(program, tuple(example_inputs), dynamic_shapes=shapes, strict=False)
    except Exception:
        logger.debug("torch.export said:\n%s", output.getvalue())
        raise first_failure from None
    onnx_program = _onnx_export(exported, (), input_names, output_names, None)
    declared = _declared_axes(onnx_program.model, shapes)  # the exporter names them s25, s70, …
    onnx_program.rename_axes(
        {value.shape[axis].value: name for value, axis, name in declared if _symbolic(value, axis)}
    )
    _warn_of_fixed_axes(onnx_program.model, shapes)
    return onnx_program.model


def _onnx_export(program, example_inputs, input_names, output_names, dynamic_shapes):
    import torch

    output = io.StringIO()
    try:
        with _quiet_export(output):
            onnx_program = torch.onnx.export(
                program,
                tuple(example_inputs),
                dynamo=True,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                dynamic_shapes=dynamic_shapes,
                optimize=False,
                verbose=False,
            )
    except Exception as error:
        raise XoptError(f"torch.export could not capture the model: {_export_reason(error)}") from error
    logger.debug("torch.onnx.export said:\n%s", output.getvalue())
    return onnx_program


def _warn_of_fixed_axes(model: ir.Model, dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None) -> None:
    """torch.onnx fixes an axis the module's code needs at one size without an error: say so."""
    for value, axis, name in _declared_axes(model, dynamic_shapes):
        if isinstance(size := value.shape[axis], int):
            logger.warning(
                "%s: axis %d (%s) is fixed at %s: the module's code needs that size", value.name, axis, name, size
            )


def _symbolic(value: ir.Value, axis: int) -> bool:
    dim = value.shape[axis]
    return isinstance(dim, ir.SymbolicDim) and bool(dim.value)


def _declared_axes(model: ir.Model, dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None) -> list:
    """(graph input, axis, name) for every input axis that `dynamic_shapes` gives a `torch.export.Dim`;
    none when the inputs do not line up with the shapes (a module with non-tensor arguments)."""
    import torch
    import torch.utils._pytree as pytree

    if dynamic_shapes is None:
        return []
    per_input = pytree.tree_leaves(
        list(dynamic_shapes.values()) if isinstance(dynamic_shapes, Mapping) else list(dynamic_shapes),
        is_leaf=lambda axes: isinstance(axes, dict) or axes is None,
    )
    if len(per_input) != len(model.graph.inputs):
        return []
    return [
        (value, axis, dim.__name__)
        for value, axes in zip(model.graph.inputs, per_input, strict=True)
        for axis, dim in (axes or {}).items()
        if isinstance(dim, torch.export.Dim) and value.shape is not None
    ]


@dataclass
class ExportCall:
    """A module called on example inputs, and the names and dynamic axes the graph gives them."""

    module: Any
    inputs: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Mapping[str, Any] | None = None
    bounded_dynamic_shapes: Mapping[str, Any] | None = None  # with the maxima the model's tables allow

    def export(self) -> ir.Model:
        return export_to_ir(
            self.module,
            self.inputs,
            input_names=self.input_names,
            output_names=self.output_names,
            dynamic_shapes=self.dynamic_shapes,
            retry_dynamic_shapes=self.bounded_dynamic_shapes,
        )

    def feeds(self) -> dict[str, np.ndarray]:
        """The example inputs as the graph takes them, by input name."""
        import torch.utils._pytree as pytree

        return dict(zip(self.input_names, _arrays(pytree.tree_leaves(self.inputs)), strict=True))

    def outputs(self) -> dict[str, np.ndarray]:
        """What the module returns on the example inputs, by output name."""
        import torch
        import torch.utils._pytree as pytree

        with torch.no_grad():
            returned = self.module(*self.inputs)
        return dict(zip(self.output_names, _arrays(pytree.tree_leaves(returned)), strict=True))


def _arrays(tensors) -> list[np.ndarray]:
    return [tensor.detach().numpy() for tensor in tensors]


def export_module(
    module: Any,
    example_inputs: Sequence[Any] | None,
    *,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
) -> ir.Model:
    """Capture `module(*example_inputs)`; shapes are static unless `dynamic_shapes` says otherwise."""
    if example_inputs is None:
        raise XoptError("capturing an nn.Module needs example_inputs (a tuple of tensors)")
    if not isinstance(example_inputs, tuple | list):
        example_inputs = (example_inputs,)
    module.eval()
    return export_to_ir(module, example_inputs, dynamic_shapes=dynamic_shapes)


def load_exported_program(path: Path) -> ir.Model:
    """Load a `.pt2` file written by `torch.export.save` and translate it to ONNX."""
    import torch

    if not path.is_file():
        raise XoptError(f"{path}: no such file")
    try:
        with _quiet_loggers():  # torch logs the whole traceback of a file it cannot read
            exported = torch.export.load(path)
    except Exception as error:
        raise XoptError(f"{path}: not a readable torch.export program ({type(error).__name__})") from None
    return export_to_ir(exported)


def _export_reason(error: BaseException) -> str:
    """The first line of the innermost cause: torch.onnx wraps the real failure in a banner
    ("Failed to export the model with torch.export. This is step 1/3…"), with colour codes."""
    while error.__cause__ is not None:
        error = error.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(error))


@contextlib.contextmanager
def _quiet_export(output: io.StringIO) -> Iterator[None]:
    """What an export prints goes to `output` (a data-dependent guard prints the whole traced
    graph on stderr), its warnings nowhere, its loggers' tracebacks nowhere."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        warnings.simplefilter("ignore")
        with _quiet_loggers():
            yield


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter logs every optional op library it skips, and tracebacks of what fails: keep
    them out of xopt's output (a failure comes back as the exception, which xopt reports)."""
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx", "torch.export", "torch._dynamo")
    names += ("torch._subclasses.fake_tensor",)  # logs the traceback of an op that fails on fake tensors
    names += ("torch._guards",)  # logs the traceback of a guard that contradicts the dynamic shapes
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

"""Static dims read out of a shape: `Gather(Shape(x), i)` → the constant x.shape[i], and
`Slice(Shape(x), a, b)` → x.shape[a:b].

Exact: where the dims it selects are numbers in x's shape (the rest of the shape may be
symbolic), the Gather or Slice computes those numbers on every run. onnxscript's constant folder
folds a Gather with a 1-D index only, and no Slice; TorchScript exports read each dim with a
scalar index (`x.size(3)`, a head size, halved for a rotary `Slice`) or a slice (GPT-2's
`1/√d` from `Shape(q)[-1:]`), so until it is a constant the `Slice` ends, `Reshape` targets,
scales and their readers stay computed and no matcher reads them.

A `Reshape(x, Concat(…, [y.shape[i]], …))` whose target takes a dim read from some y's shape at
an axis j where x's own dim is the same (the same number, or the same symbol after shape
inference) has that part replaced by 0, ONNX's "copy the input's dim j" (`allowzero` = 0):
`x.view(x.size(0), x.size(1), H, d)` becomes Reshape(x, [0, 0, H, d]), a constant, and the
`Shape` reads that kept the head split and merge from looking like one go. A part that slices
several dims, y.shape[a:b], is replaced where each is x's own or a number: `x.flatten(-2)`,
Reshape(x, Concat(x.shape[:-2], [-1])), becomes Reshape(x, [0, …, 0, -1]).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from xopt.analysis.graph_view import const_array


def fold_static_shape_dims(graph: ir.Graph) -> int:
    """Replace each such Gather or Slice by a Constant node; returns how many were replaced."""
    folded = 0
    for node in list(graph):
        dims = _static_dims(node)
        if dims is None or node.outputs[0].is_graph_output():
            continue
        node.outputs[0].replace_all_uses_with(_constant_before(graph, node, dims))
        folded += 1
    return folded


def copy_dims_in_reshape_targets(graph: ir.Graph) -> int:
    """Give each such Reshape its target with the copied dims as 0; returns how many changed."""
    changed = 0
    for node in list(graph):
        target = _copying_target(node)
        if target is None:
            continue
        parts = [
            part if array is None else _constant_before(graph, node, array)
            for part, array in zip(node.inputs[1].producer().inputs, target, strict=True)
        ]
        concat = ir.node("Concat", parts, attributes={"axis": 0})
        graph.insert_before(node, concat)
        node.replace_input_with(1, concat.outputs[0])
        changed += 1
    return changed


def _copying_target(reshape: ir.Node) -> list[np.ndarray | None] | None:
    """Per part of the Reshape's Concat target: [0] where the part reads a dim x has at that axis,
    None for a part kept; None when no part changes."""
    if reshape.op_type != "Reshape" or reshape.domain not in ("", "ai.onnx"):
        return None
    if reshape.attributes.get_int("allowzero", 0):
        return None
    x, concat = reshape.inputs[0], reshape.inputs[1].producer()
    if x.shape is None or concat is None or concat.op_type != "Concat" or concat.attributes.get_int("axis", 0) != 0:
        return None
    parts, axis = [], 0
    for part in concat.inputs:
        constant = const_array(part)
        if constant is not None and constant.ndim == 1:
            parts.append(None)
            axis += constant.size
            continue
        dims = _read_dims(part)
        if dims is None:
            return None  # a part of unknown length: the axes after it are unknown
        copied = [axis + k < len(x.shape) and _same_dim(x.shape[axis + k], dim) for k, dim in enumerate(dims)]
        kept = all(copied[k] or isinstance(dim, int) for k, dim in enumerate(dims)) and any(copied)
        parts.append(np.array([0 if c else d for c, d in zip(copied, dims, strict=True)], np.int64) if kept else None)
        axis += len(dims)
    return parts if any(p is not None for p in parts) else None


def _read_dims(part: ir.Value) -> list[int | ir.SymbolicDim] | None:
    """y.shape[i] when `part` = Unsqueeze(Gather(Shape(y), i), [0]) or Gather(Shape(y), [i]), and
    y.shape[a:b] when it is Slice(Shape(y), a, b) (`x.flatten(-2)`: x.shape[:-2] + [-1])."""
    node = part.producer()
    unsqueezed = node is not None and node.op_type == "Unsqueeze" and _is_zero_axes(node)
    if unsqueezed:
        node = node.inputs[0].producer()
    if node is None or node.op_type not in ("Gather", "Slice") or (dims := _shape_read(node.inputs[0])) is None:
        return None
    if node.op_type == "Slice":
        selected = None if unsqueezed else _sliced(node, dims)
        return None if selected is None else list(selected)
    selected = _gathered(node, dims)  # one dim of the target: a scalar index unsqueezed, or [i]
    if selected is None or selected.shape != (() if unsqueezed else (1,)):
        return None
    return [selected.reshape(-1)[0]]


def _is_zero_axes(unsqueeze: ir.Node) -> bool:
    axes = const_array(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    return axes is not None and axes.reshape(-1).tolist() == [0]


def _same_dim(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _constant_before(graph: ir.Graph, node: ir.Node, array: np.ndarray) -> ir.Value:
    constant = ir.node("Constant", [], attributes={"value": ir.tensor(array)})
    graph.insert_before(node, constant)
    return constant.outputs[0]


def _static_dims(node: ir.Node) -> np.ndarray | None:
    if node.op_type not in ("Gather", "Slice") or node.domain not in ("", "ai.onnx") or not node.inputs:
        return None
    dims = _shape_read(node.inputs[0])
    if dims is None:
        return None
    selected = _gathered(node, dims) if node.op_type == "Gather" else _sliced(node, dims)
    if selected is None or not all(isinstance(d, int) for d in selected.reshape(-1).tolist()):
        return None
    return selected.astype(np.int64)


def _shape_read(value: ir.Value | None) -> list[int | ir.SymbolicDim] | None:
    """The dims in `value` = Shape(y) (from its start to its end), when y's shape is known."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Shape" or node.inputs[0].shape is None:
        return None
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
    return list(node.inputs[0].shape)[start:end]


def _gathered(gather: ir.Node, dims: list) -> np.ndarray | None:
    index = const_array(gather.inputs[1])
    if gather.attributes.get_int("axis", 0) or index is None or index.ndim > 1:
        return None
    if not all(-len(dims) <= int(i) < len(dims) for i in index.reshape(-1)):
        return None
    return np.array([dims[int(i)] for i in index.reshape(-1)], dtype=object).reshape(index.shape)


def _sliced(slice_node: ir.Node, dims: list) -> np.ndarray | None:
    bounds = [const_array(v) for v in slice_node.inputs[1:]]
    if len(bounds) < 2 or any(b is None or b.size != 1 for b in bounds):
        return None
    start, end, *rest = (int(b.reshape(-1)[0]) for b in bounds)
    axis, step = rest[0] if rest else 0, rest[1] if len(rest) > 1 else 1
    if axis not in (0, -1) or step != 1:
        return None
    return np.array(dims[start:end], dtype=object)

"""ONNX standard operators in torch, with ONNX's semantics (numpy broadcasting, int64 shapes).

Each function takes the node, its inputs as torch tensors (None for an omitted optional input)
and returns its outputs. Shape arithmetic stays on the CPU: `Shape` answers a CPU tensor, and the
inputs listed in HOST_INPUTS (sizes, axes, slice bounds) are read on the host, so Reshape, Expand,
Range and Slice never wait on the GPU; the executor brings every other input to the model's device.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch

from xopt.errors import XoptError

Inputs = list["torch.Tensor | None"]
Op = Callable[[ir.Node, Inputs], list[torch.Tensor]]

TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}


def torch_dtype(data_type: int | ir.DataType) -> torch.dtype:
    dtype = TORCH_DTYPES.get(ir.DataType(data_type))
    if dtype is None:
        raise XoptError(f"the CUDA backend has no tensors of type {ir.DataType(data_type).name}")
    return dtype


def _ints(tensor: torch.Tensor) -> list[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _elementwise(function: Callable[..., torch.Tensor]) -> Op:
    return lambda node, inputs: [function(*inputs)]


def _variadic(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    def run(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
        result = inputs[0]
        for other in inputs[1:]:
            result = function(result, other)
        return [result]

    return run


def _cast(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0].to(torch_dtype(node.attributes.get_int("to")))]


def _cast_like(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0].to(inputs[1].dtype)]


def _shape(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    shape = list(inputs[0].shape)
    rank = len(shape)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    return [torch.tensor(shape[slice(start, end)], dtype=torch.int64)]


def _reshape(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data, shape = inputs[0], _ints(inputs[1])
    if not node.attributes.get_int("allowzero", 0):
        shape = [data.shape[i] if size == 0 else size for i, size in enumerate(shape)]
    return [data.reshape(shape)]


def _expand(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data, shape = inputs[0], _ints(inputs[1])
    target = torch.broadcast_shapes(tuple(data.shape), tuple(shape))
    return [data.expand(target)]


def _axes(node: ir.Node, inputs: Inputs) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return _ints(inputs[1])
    axes = node.attributes.get_ints("axes")
    return list(axes) if axes is not None else None


def _squeeze(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    axes = _axes(node, inputs)
    data = inputs[0]
    if axes is None:
        return [data.squeeze()]
    return [data.squeeze(tuple(a % data.dim() for a in axes))]


def _unsqueeze(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data = inputs[0]
    rank = data.dim() + len(_axes(node, inputs))
    for axis in sorted(a % rank for a in _axes(node, inputs)):
        data = data.unsqueeze(axis)
    return [data]


def _concat(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.cat([t for t in inputs if t is not None], dim=node.attributes.get_int("axis"))]


def _split(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data, axis = inputs[0], node.attributes.get_int("axis", 0)
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = _ints(inputs[1])
    elif "split" in node.attributes:  # sizes as an attribute before opset 13
        sizes = list(node.attributes.get_ints("split"))
    else:
        parts = node.attributes.get_int("num_outputs", len(node.outputs))
        chunk = -(-data.shape[axis] // parts)
        sizes = [min(chunk, data.shape[axis] - i * chunk) for i in range(parts)]
    return list(torch.split(data, sizes, dim=axis))


def _pad(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    """Pad in constant mode: `pads` holds every padded axis' begins, then their ends (negative:
    cropped), on all axes or on `axes`."""
    mode = node.attributes.get_string("mode", "constant")
    if mode != "constant":
        raise XoptError(f"Pad {node.name!r}: the CUDA backend pads in constant mode only, not {mode!r}")
    data, pads = inputs[0], _ints(inputs[1])
    value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(data.dim()))
    widths = [0] * (2 * data.dim())  # torch: (begin, end) pairs from the last axis back
    for axis, begin, end in zip(axes, pads[: len(axes)], pads[len(axes) :], strict=True):
        position = data.dim() - 1 - axis % data.dim()
        widths[2 * position : 2 * position + 2] = [begin, end]
    fill = 0 if value is None else value.reshape(-1)[0].item()
    return [torch.nn.functional.pad(data, widths, value=fill)]


def _slice(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        size = data.shape[axis]
        if step > 0:
            index[axis % data.dim()] = slice(*slice(start, end, step).indices(size))
        else:  # torch has no negative steps: slice the reversed range, then flip
            first, last, _ = slice(start, end, step).indices(size)
            index[axis % data.dim()] = slice(last + 1, first + 1, -step)
            flips.append(axis % data.dim())
    result = data[tuple(index)]
    return [result.flip(flips) if flips else result]


def _transpose(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    perm = node.attributes.get_ints("perm")
    data = inputs[0]
    return [data.permute(*(perm if perm is not None else reversed(range(data.dim()))))]


def _gather(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data, indices = inputs
    axis = node.attributes.get_int("axis", 0) % data.dim()
    indices = indices.to(data.device).long()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    flat = torch.index_select(data, axis, indices.reshape(-1))
    return [flat.reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])]


def _gather_elements(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data, indices = inputs
    axis = node.attributes.get_int("axis", 0) % data.dim()
    indices = indices.to(data.device).long()
    return [torch.gather(data, axis, torch.where(indices < 0, indices + data.shape[axis], indices))]


def _gather_nd(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data, indices = inputs
    if node.attributes.get_int("batch_dims", 0):
        raise XoptError("the CUDA backend's GatherND takes batch_dims=0 only")
    indices = indices.to(data.device).long()
    depth = indices.shape[-1]
    flat = indices.reshape(-1, depth)
    picked = data[tuple(flat[:, i] for i in range(depth))]
    return [picked.reshape(*indices.shape[:-1], *data.shape[depth:])]


def _range(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    start, limit, delta = (t.item() for t in inputs)
    return [torch.arange(start, limit, delta, dtype=inputs[0].dtype, device=inputs[0].device)]


def _cumsum(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    data, axis = inputs[0], int(inputs[1].item())
    if node.attributes.get_int("reverse", 0):
        data = data.flip(axis)
    total = torch.cumsum(data, dim=axis).to(data.dtype)
    if node.attributes.get_int("exclusive", 0):
        total = total - data
    return [total.flip(axis) if node.attributes.get_int("reverse", 0) else total]


def _clip(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    result = inputs[0]
    if low is not None:
        result = torch.maximum(result, low.to(result.device))
    if high is not None:
        result = torch.minimum(result, high.to(result.device))
    return [result]


def _where(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    condition, x, y = inputs
    return [torch.where(condition, x, y)]


def _matmul(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.matmul(inputs[0], inputs[1])]


def _gemm(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    a, b = inputs[0], inputs[1]
    if node.attributes.get_int("transA", 0):
        a = a.t()
    if node.attributes.get_int("transB", 0):
        b = b.t()
    result = node.attributes.get_float("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        result = result + node.attributes.get_float("beta", 1.0) * inputs[2]
    return [result]


def _softmax(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    return [torch.softmax(inputs[0], dim=node.attributes.get_int("axis", -1))]


def _reduce(reduction: Callable[..., torch.Tensor]) -> Op:
    def run(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
        axes, data = _axes(node, inputs), inputs[0]
        if not axes and node.attributes.get_int("noop_with_empty_axes", 0):
            return [data]
        keep = bool(node.attributes.get_int("keepdims", 1))
        return [reduction(data, dim=tuple(axes) if axes else tuple(range(data.dim())), keepdim=keep).to(data.dtype)]

    return run


def _constant_of_shape(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    value = node.attributes.get_tensor("value")
    fill = torch.from_numpy(value.numpy().copy()).reshape(()) if value is not None else torch.tensor(0.0)
    return [torch.full(_ints(inputs[0]), fill.item(), dtype=fill.dtype)]


def _constant(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    tensor = node.attributes.get_tensor("value")
    if tensor is not None:
        return [torch.from_numpy(tensor.numpy().copy())]
    for name, dtype in (
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
    ):
        if name in node.attributes:
            return [torch.tensor(node.attributes[name].value, dtype=dtype)]
    raise XoptError(f"Constant {node.name!r}: the CUDA backend reads value, value_int(s) and value_float(s) only")


def _trilu(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    k = int(inputs[1].item()) if len(inputs) > 1 and inputs[1] is not None else 0
    upper = node.attributes.get_int("upper", 1)
    return [torch.triu(inputs[0], k) if upper else torch.tril(inputs[0], k)]


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.pow(a, b).to(a.dtype)


def _identity(node: ir.Node, inputs: Inputs) -> list[torch.Tensor]:
    return [inputs[0]]


# op → positions of inputs read as host integers (kept on the CPU by the executor)
HOST_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}),
    "Expand": frozenset({1}),
    "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Split": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Pad": frozenset({1, 3}),
    "Range": frozenset({0, 1, 2}),
    "CumSum": frozenset({1}),
    "ConstantOfShape": frozenset({0}),
    "Trilu": frozenset({1}),
    "ReduceMean": frozenset({1}),
    "ReduceSum": frozenset({1}),
}

STANDARD_OPS: dict[str, Op] = {
    "Add": _elementwise(torch.add),
    "Sub": _elementwise(torch.sub),
    "Mul": _elementwise(torch.mul),
    "Div": _elementwise(lambda a, b: torch.div(a, b, rounding_mode="trunc") if not a.is_floating_point() else a / b),
    "Pow": _elementwise(_pow),
    "Neg": _elementwise(torch.neg),
    "Sqrt": _elementwise(torch.sqrt),
    "Reciprocal": _elementwise(torch.reciprocal),
    "Exp": _elementwise(torch.exp),
    "Log": _elementwise(torch.log),
    "Tanh": _elementwise(torch.tanh),
    "Sigmoid": _elementwise(torch.sigmoid),
    "Erf": _elementwise(torch.erf),
    "Relu": _elementwise(torch.relu),
    "Cos": _elementwise(torch.cos),
    "Sin": _elementwise(torch.sin),
    "Not": _elementwise(torch.logical_not),
    "And": _elementwise(torch.logical_and),
    "Or": _elementwise(torch.logical_or),
    "Equal": _elementwise(torch.eq),
    "Less": _elementwise(torch.lt),
    "LessOrEqual": _elementwise(torch.le),
    "Greater": _elementwise(torch.gt),
    "GreaterOrEqual": _elementwise(torch.ge),
    "Sum": _variadic(torch.add),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Cast": _cast,
    "CastLike": _cast_like,
    "Shape": _shape,
    "Reshape": _reshape,
    "Expand": _expand,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Pad": _pad,
    "Transpose": _transpose,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "Range": _range,
    "CumSum": _cumsum,
    "Clip": _clip,
    "Where": _where,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Softmax": _softmax,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ConstantOfShape": _constant_of_shape,
    "Constant": _constant,
    "Trilu": _trilu,
    "Identity": _identity,
}

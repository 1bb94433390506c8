"""What ONNX Runtime's integer GEMM computes on this CPU: whether its u8s8 kernel saturates.

DynamicQuantizeMatMul (and the QLinearMatMul of QDQ models) multiplies uint8 activation codes u
by int8 weight codes q. On x86 CPUs without VNNI, MLAS forms the products with VPMADDUBSW, which
adds each pair u[2i]·q[2i] + u[2i+1]·q[2i+1] into a signed 16-bit lane with saturation: with
full-range codes a pair reaches 2·255·127 = 64770 and is clipped to 32767, so an output is off by
whatever its pairs lost. VNNI (VPDPBUSD) sums the products in 32 bits, and the u8u8 kernel (uint8
weights with a zero point) widens both operands to 16 bits before multiplying: both are exact.

`u8s8_saturates` runs one such pair (u = 255, q = 127, twice) through DynamicQuantizeMatMul once per
process and says whether this CPU clips it. Measured on an AMD EPYC (AVX2, no VNNI): it does, and
the uint8 form of the same weights is 1.1–1.2× slower at 128 rows, 1.3–1.8× at one row.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from xopt.backends.onnxruntime import create_session

PAIR_PRODUCT = 2 * 255 * 127  # one exact pair; the 16-bit lane holds at most 32767


@functools.cache
def u8s8_saturates() -> bool:
    """Whether this CPU's u8s8 GEMM clips a product pair to 16 bits (x86 without VNNI)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2]))
    codes = ir.Value(name="codes", const_value=ir.tensor(np.full((2, 1), 127, np.int8), name="codes"))
    scale = ir.Value(name="scale", const_value=ir.tensor(np.ones(1, np.float32), name="scale"))
    node = ir.node("DynamicQuantizeMatMul", [x, codes, scale], domain="com.microsoft")
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([1, 1])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[codes, scale], opset_imports={"": 21, "com.microsoft": 1})
    session = create_session(ir.Model(graph, ir_version=10), threads=1)
    # x = [255, 255] quantizes to codes 255 with step 1 and zero point 0
    (output,) = session.run(["y"], {"x": np.full((1, 2), 255.0, np.float32)})
    return float(output.reshape(-1)[0]) < PAIR_PRODUCT - 0.5

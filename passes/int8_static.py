"""Static int8 linears (lossy) in QDQ form, by ONNX Runtime's own static quantizer.

Each chosen MatMul x·W becomes DequantizeLinear(QuantizeLinear(x))·DequantizeLinear(q_W):
- weights int8 per output column, symmetric: w_n = max_k |W[k, n]| / 127;
- activations uint8 per tensor with a range fixed ahead of time from the calibration runs:
  a = (max(0, hi) − min(0, lo)) / 255, z = round(−min(0, lo) / a), with [lo, hi] the min/max of
  x over all calibration runs (`minmax`) or the 0.01%/99.99% percentiles of |x| (`percentile`,
  which gives up the few largest values for a finer grid on the rest).
ONNX Runtime fuses the QDQ pairs into integer kernels (QLinearMatMul / MatMulIntegerToFloat) when
it loads the model. Where its u8s8 kernel clips pairs of products to 16 bits (x86 without VNNI,
`backends/integer_gemm.py`) the weights are stored as uint8 on the same grid (zero point 128), which
runs the exact u8u8 kernel: the tiny Llama's output error on calibration inputs 0.11 with int8
weights there, against 0.010 with VNNI. Unlike the dynamic scheme no range is computed at run
time, and the same range serves every input, so a calibration set that misses an input's
extremes clips them.

The calibration runs are xopt's (`xopt.calibration`: windows of the calibration text for a
causal LM, padded sentence batches for an encoder, here padded to one length), fed to
onnxruntime.quantization.quantize_static through its CalibrationDataReader interface; the
quantized model is read back into the IR.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

CALIBRATIONS = ("minmax", "percentile")


def quantize_static_qdq(
    model: ir.Model,
    node_names: Sequence[str],
    feeds: Sequence[dict[str, np.ndarray]],
    calibration: str,
    unsigned: bool = False,
) -> ir.Model:
    """`model` with the MatMul nodes named in `node_names` in static int8 QDQ form; with `unsigned`
    the weights are uint8 on the same symmetric grid (zero point 128)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Feeds(CalibrationDataReader):
        def __init__(self):
            self.pending = iter(_same_length(feeds))

        def get_next(self):
            return next(self.pending, None)

    method = CalibrationMethod.Percentile if calibration == "percentile" else CalibrationMethod.MinMax
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run ORT's pre-processing: xopt's passes have run instead
    try:
        with tempfile.TemporaryDirectory(prefix="xopt-static-int8-") as scratch:
            output = Path(scratch) / "static.onnx"
            quantize_static(
                ir.to_proto(model),
                output,
                _Feeds(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=list(node_names),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                calibrate_method=method,
                extra_options={"CalibTensorRangeSymmetric": False, "WeightSymmetric": True},
            )
            quantized = ir.from_proto(onnx.load(output))
    finally:
        root.setLevel(level)
    quantized.metadata_props.update(model.metadata_props)
    return quantized


def _same_length(feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Sentence batches padded (zeros: masked positions) to one sequence length: ONNX Runtime's
    histogram calibrators stack every run's values into one array."""
    length = max(array.shape[1] for feed in feeds for array in feed.values() if array.ndim == 2)
    return [
        {name: np.pad(a, ((0, 0), (0, length - a.shape[1]))) if a.ndim == 2 else a for name, a in feed.items()}
        for feed in feeds
    ]

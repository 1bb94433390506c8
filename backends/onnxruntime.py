"""ONNX Runtime: sessions, running by input name, and the load-back check of a saved model.

This is also xopt's reference runtime: verification and the structure probe run models here, in
sessions that skip graph optimizations and, unless it changes the results, weight packing
(`check_session`). An in-memory model reaches ORT as a skeleton: its graph serialized with each
weight of 1 KB or more written as an external-data reference, and the weights themselves handed over
as OrtValues on the model's own arrays (`SessionOptions.add_external_initializers`, which ORT copies
in before any optimization). Serializing the weights into the protobuf and parsing them back cost
more than the session itself: the 18 sessions of SmolLM2-135M's `exact` recipe (verification,
probes) took 64 s, now 21–22 s, and `xopt optimize` 180–184 s, now 136–137 s (this Xeon, 2 threads).
Weights of a type numpy and ORT do not share (bfloat16, 4-bit, float8) and weights no node reads
stay inline; a skeleton that would still pass protobuf's 2 GB goes through a temporary file. A model
of less than 16 MB of weights is serialized whole, as cloning its graph would cost more.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from xopt.errors import XoptError, first_line

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_THRESHOLD_BYTES = 1024  # tensors smaller than this stay inline (ONNX's convention)
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    threads: int | None = None, optimization: str = "all", spinning: bool = True, prepacking: bool = True
) -> ort.SessionOptions:
    """Options with a fixed intra-op thread count (None: ORT's default) and optimization level.

    `spinning=False` makes idle intra-op threads sleep instead of busy-waiting. Benchmarks that
    interleave several sessions in one process need it: each session owns a thread pool, and a
    pool left spinning after its run takes cores from the next session (measured here: a 3.5 ms
    attention block timed at 12 ms when four spinning sessions alternate on two cores).

    `prepacking=False` keeps the kernels from repacking constant weights into their own layouts
    when the session starts: for a session run once on small inputs (a check, a probe) the packing
    costs more than it saves (SmolLM2's fused model: 0.24–0.89 s per session against 0.71–1.45 s,
    runs 0.30–0.48 s against 0.28–0.40 s).

    ONNX Runtime's logger is kept to fatal messages: each failure of a session comes back as an
    exception, which xopt reports in one line; the logger would print the same message before it."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise XoptError(f"unknown ORT optimization level {optimization!r}: one of {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def create_session(
    model: ir.Model | str | Path,
    *,
    threads: int | None = None,
    optimization: str = "all",
    providers: Sequence[str] = ("CPUExecutionProvider",),
    spinning: bool = True,
    prepacking: bool = True,
) -> ort.InferenceSession:
    """An inference session for a model in memory or on disk."""
    options = session_options(threads, optimization, spinning, prepacking)
    if isinstance(model, str | Path):
        return ort.InferenceSession(str(model), options, providers=list(providers))
    if model_bytes(model) < SKELETON_MIN_BYTES:
        return ort.InferenceSession(inline_proto(model).SerializeToString(), options, providers=list(providers))
    skeleton, inline_bytes, names, weights = _skeleton(model)
    if inline_bytes < PROTOBUF_LIMIT_BYTES - (64 << 20):
        options.add_external_initializers(names, weights)
        return ort.InferenceSession(ir.to_proto(skeleton).SerializeToString(), options, providers=list(providers))
    with tempfile.TemporaryDirectory(prefix="xopt-session-") as folder:
        path = Path(folder) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=list(providers))


# Operators whose results depend on weight packing: MatMulNBits packs its weights for MLAS's kernel
# that quantizes the activations to int8 (accuracy level 4); unpacked, it dequantizes the weights
# and multiplies in float (SmolLM2 int4, max abs logit difference from fp32 8.87 packed, 4.1 not).
PACKING_DEPENDENT_OPS = frozenset({"MatMulNBits"})


def check_session(model: ir.Model) -> ort.InferenceSession:
    """A session for runs once on small inputs (references, checks, probes): graph optimizations
    off, and the weights left unpacked (`prepacking=False`) unless packing changes what the model
    computes (`PACKING_DEPENDENT_OPS`), so that a check runs the arithmetic the model deploys with."""
    packed = any(node.op_type in PACKING_DEPENDENT_OPS for graph in model.graphs() for node in graph)
    return create_session(model, optimization="disable", prepacking=packed)


# Below this the weights are serialized with the graph: cloning a graph of many nodes costs more
# than serializing a few MB (the unit tests' small models ran 1.16× slower through the skeleton).
SKELETON_MIN_BYTES = 16 << 20

# numpy dtypes an OrtValue can wrap as they are
_SHARED_DTYPES = frozenset(
    np.dtype(name) for name in ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
)
_SKELETON_LOCATION = "xopt-weights-in-memory"  # never read: ORT replaces every such tensor first


def _skeleton(model: ir.Model) -> tuple[ir.Model, int, list[str], list[ort.OrtValue]]:
    """A clone of `model` whose main-graph weights of 1 KB or more that a node reads are
    external-data references, every other weight in memory; the bytes left inline; the names of
    the referenced weights and OrtValues on their arrays (the model's own memory, not copied)."""
    skeleton = model.clone()
    inline_bytes, names, weights = 0, [], []
    for graph in skeleton.graphs():
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None:
                continue
            # ORT replaces only initializers it keeps: those of the main graph that a node reads
            large = graph is skeleton.graph and tensor.nbytes >= EXTERNAL_DATA_THRESHOLD_BYTES and bool(value.uses())
            array = tensor.numpy() if large or isinstance(tensor, ir.ExternalTensor) else None
            if large and array.dtype in _SHARED_DTYPES:
                names.append(name)
                weights.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
                value.const_value = ir.ExternalTensor(
                    _SKELETON_LOCATION, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name
                )
                continue
            inline_bytes += tensor.nbytes
            if array is not None and isinstance(tensor, ir.ExternalTensor):  # a copy, not a view of its file
                value.const_value = ir.Tensor(np.array(array), dtype=tensor.dtype, name=name)
    return skeleton, inline_bytes, names, weights


def inline_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a protobuf with every weight inline (neither ORT nor the checker can follow
    external data references from memory); external tensors are read into a clone, the model is
    unchanged."""
    return ir.to_proto(with_weights_in_memory(model))


def with_weights_in_memory(model: ir.Model) -> ir.Model:
    """`model`, or a clone of it with its external tensors read into memory."""
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        return ir.external_data.load_to_model(model.clone())
    return model


# What ONNX Runtime raises when a run fails on its inputs (out of memory, an index past a table)
RUN_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
    MemoryError,
)


def run(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run by input name; only the inputs the session declares are fed. Returns outputs by name."""
    declared = [i.name for i in session.get_inputs()]
    missing = [name for name in declared if name not in feeds]
    if missing:
        raise XoptError(f"missing model inputs: {', '.join(missing)}")
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    values = session.run(names, {name: feeds[name] for name in declared})
    return dict(zip(names, values, strict=True))


def check_loads(path: Path) -> None:
    """Load a saved model in a fresh ORT session: the final check before reporting success."""
    try:
        create_session(path, threads=1, optimization="disable")
    except Exception as error:
        reason = first_line(error)
        raise XoptError(f"{path}: ONNX Runtime cannot load the saved model ({reason})") from error


def model_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (what the weights weigh on disk)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)

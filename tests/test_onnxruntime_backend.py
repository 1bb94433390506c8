"""`create_session` on an in-memory model: the weights reach ONNX Runtime as OrtValues on the
model's own arrays, not serialized into the protobuf, and the session computes what the model says."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import model_from_text

from xopt.backends import onnxruntime as backend
from xopt.verify import references_over

# y = x·W + Cast(V) reshaped, with W float32 (read by MatMul), V bfloat16 (a type an OrtValue does
# not wrap), a small shape, and a large initializer nothing reads.
MIXED_MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
mixed (float[2, 64] x) => (float[2, 64] y)
<int64[2] shape = {2, 64}>
{
    m = MatMul (x, w)
    c = Cast <to = 1> (v)
    r = Reshape (c, shape)
    y = Add (m, r)
}
"""


def _mixed_model(rng) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    model = model_from_text(MIXED_MODEL)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    v = rng.standard_normal((128,)).astype(ml_dtypes.bfloat16)
    for name, array in (("w", w), ("v", v), ("unread", np.ones((64, 64), np.float32))):
        value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        value.type, value.shape = ir.TensorType(value.const_value.dtype), value.const_value.shape
        model.graph.register_initializer(value)
    model.graph.node(0).replace_input_with(1, model.graph.initializers["w"])
    model.graph.node(1).replace_input_with(0, model.graph.initializers["v"])
    return model, w, v.astype(np.float32)


@pytest.fixture(autouse=True)
def every_model_through_the_skeleton(monkeypatch):
    """These models are small; the skeleton is what is tested."""
    monkeypatch.setattr(backend, "SKELETON_MIN_BYTES", 0)


def test_weights_are_handed_over_not_serialized(monkeypatch):
    rng = np.random.default_rng(0)
    model, w, v = _mixed_model(rng)
    tensors = {name: value.const_value for name, value in model.graph.initializers.items()}
    sizes = []
    real_session = ort.InferenceSession

    def recording(model_bytes, *args, **kwargs):
        sizes.append(len(model_bytes))
        return real_session(model_bytes, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    session = backend.create_session(model)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(backend.run(session, {"x": x})["y"], x @ w + v.reshape(2, 64), rtol=1e-5, atol=1e-5)
    (size,) = sizes
    inline = tensors["unread"].nbytes + tensors["v"].nbytes  # the unread weight and bfloat16 V, not W
    assert inline < size < inline + 1024, (size, inline)
    assert {name: value.const_value for name, value in model.graph.initializers.items()} == tensors  # untouched


def test_weights_read_from_an_external_file_are_released_after_the_session(tmp_path):
    rng = np.random.default_rng(1)
    model, w, v = _mixed_model(rng)
    ir.save(model, tmp_path / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    loaded = ir.load(tmp_path / "m.onnx")
    session = backend.create_session(loaded)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(backend.run(session, {"x": x})["y"], x @ w + v.reshape(2, 64), rtol=1e-5, atol=1e-5)
    for value in loaded.graph.initializers.values():  # no view of the mapped file outlives create_session
        value.const_value.release()


def test_a_subgraph_weight_in_an_external_file_is_read_in(tmp_path):
    """An If branch's own initializer stays in the skeleton, read from its file into memory (ORT
    cannot follow a file reference in a model given as bytes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 64])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 64])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
        "choice",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
    )
    path = tmp_path / "if.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]),
        path,
        save_as_external_data=True,
        location="if.onnx.data",
        size_threshold=0,
    )
    session = backend.create_session(ir.load(path))
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x, "c": np.array(True)})[0], x @ w, rtol=1e-6)


def test_check_sessions_leave_weights_unpacked_unless_packing_changes_the_results(monkeypatch):
    """Verification sessions (run once, on small inputs) ask the kernels not to repack weights,
    except for a model whose results depend on the packing (MatMulNBits' int8 kernel)."""
    options = []
    real_session = ort.InferenceSession

    def recording(model_bytes, session_options, *args, **kwargs):
        options.append(_config_entry(session_options, "session.disable_prepacking"))
        return real_session(model_bytes, session_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    rng = np.random.default_rng(1)
    model, w, v = _mixed_model(rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    (reference,) = references_over(model, [{"x": x}])
    packed = backend.run(backend.create_session(model), {"x": x})
    assert options == ["1", None]
    np.testing.assert_allclose(reference["y"], packed["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reference["y"], x @ w + v.reshape(2, 64), rtol=1e-5, atol=1e-5)

    quantized = model_from_text(MATMUL_NBITS_MODEL)
    for name, array in (("b", rng.integers(0, 256, (4, 1, 16), dtype=np.uint8)), ("s", np.ones(4, np.float32))):
        value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        value.type, value.shape = ir.TensorType(value.const_value.dtype), value.const_value.shape
        quantized.graph.register_initializer(value)
        quantized.graph.node(0).replace_input_with(1 if name == "b" else 2, value)
    backend.check_session(quantized)
    assert options[-1] is None


MATMUL_NBITS_MODEL = """
<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>
nbits (float[2, 32] x) => (float[2, 4] y)
{
    y = com.microsoft.MatMulNBits <K = 32, N = 4, bits = 4, block_size = 32, accuracy_level = 4> (x, b, s)
}
"""


def _config_entry(options: ort.SessionOptions, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # not set
        return None

"""int8 on real weights: MiniLM through xopt's `int8` recipe against ONNX Runtime's own
`quantize_dynamic` (per-channel int8 weights) applied to the same exact-optimized model, both
measured against that fp32 model on evaluation sentences (disjoint from the calibration text)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

import xopt
from xopt.analysis.patterns import find_linears
from xopt.bench import size_on_disk_mb
from xopt.evaluate import evaluate
from xopt.runnable import open_runnable
from xopt.text import read_text

pytestmark = pytest.mark.slow

SENTENCES = 256


def _onnxruntime_dynamic(model: ir.Model, scratch) -> ir.Model:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ir.save(model, scratch / "source.onnx")
    quantize_dynamic(scratch / "source.onnx", scratch / "dynamic.onnx", per_channel=True, weight_type=QuantType.QInt8)
    quantized = ir.load(scratch / "dynamic.onnx")
    quantized.metadata_props.update(model.metadata_props)  # the tokenizer's whereabouts
    return quantized


def test_minilm_int8_recipe_is_closer_to_fp32_than_onnxruntime_quantize_dynamic(minilm, tmp_path):
    exact, _ = xopt.optimize(minilm, recipe="exact", verify=False)
    ours, report = xopt.optimize(minilm, recipe="int8", verify=False)
    # Which linears exist depends on fuse's verdicts on this machine (merge-qkv leaves one linear
    # for Q, K and V): whichever were kept, every linear is quantized, Q, K and V too.
    kernels = sum(node.op_type == "DynamicQuantizeMatMul" for node in ours.graph)
    assert not find_linears(ours.graph) and report.passes[-1].stats["linears_quantized"] == kernels >= 24
    assert not any(node.op_type == "Attention" for node in ours.graph)
    assert report.passes[-1].stats["embeddings_quantized"] == 1
    theirs = _onnxruntime_dynamic(exact, tmp_path)
    folders = {}
    for label, model in (("fp32", exact), ("xopt", ours), ("onnxruntime", theirs)):
        folders[label] = tmp_path / label
        xopt.save(model, folders[label])
    text = read_text(None, "evaluation")
    reference = open_runnable(folders["fp32"], threads=2)
    quality = {
        label: evaluate(open_runnable(folders[label], threads=2), text, reference, max_sentences=SENTENCES)
        for label in ("xopt", "onnxruntime")
    }
    # Measured: xopt min 0.9947, mean 0.9981 with Q/K/V merged (24 linears) and the token table in
    # 8 bits (0.9942 / 0.9981 with it in float); 0.9943 / 0.9982 with Q, K, V apart (36 linears,
    # with or without MultiHeadAttention); 0.9963 / 0.9985 when Q/K/V stayed in float inside an
    # Attention (18 linears, 33.3 MB: no longer a form fuse makes for int8); ONNX Runtime min
    # 0.9845, mean 0.9934.
    assert quality["xopt"].cosine_min >= 0.993 and quality["xopt"].cosine_mean >= 0.998
    assert quality["xopt"].cosine_min > quality["onnxruntime"].cosine_min
    assert quality["xopt"].cosine_mean > quality["onnxruntime"].cosine_mean
    # Measured: 25.4 MB against ONNX Runtime's 30.9 (its token table in int8 per tensor, xopt's in
    # 8 bits per 32 columns); 58.9 MB with xopt's table in float.
    sizes = {label: size_on_disk_mb(folders[label] / "model.onnx") for label in folders}
    assert sizes["xopt"] < sizes["onnxruntime"] < 0.6 * sizes["fp32"], sizes

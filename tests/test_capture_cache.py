"""The capture caches. A folder captured again gives the same model without tracing, and any doubt
about a cached graph (changed folder, damaged file, unmatched weights) means a new capture; a GGUF
file's tokenizer and config are parsed once, then read in their saved form, which gives the same."""

from __future__ import annotations

import json
import shutil
from typing import ClassVar

import onnx
import onnx_ir as ir
import pytest
from helpers import LINEAR_MODEL, model_from_text

import xopt
from xopt.capture import gguf_conversions, graph_cache, huggingface, torch_export


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of the test's own."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("XOPT_CACHE_DIR", str(folder))
    return folder / graph_cache.FOLDER


@pytest.fixture
def exports(monkeypatch):
    """The modules torch.export traced during the test."""
    traced = []
    export = torch_export.export_to_ir

    def traced_export(module, *args, **kwargs):
        traced.append(module)
        return export(module, *args, **kwargs)

    monkeypatch.setattr(torch_export, "export_to_ir", traced_export)
    return traced


def _copy(tiny_folder, name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(tiny_folder(name), folder)
    return folder


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _ops(model: ir.Model) -> list[str]:
    """The graph's operators in order (two exports differ in the exporter's metadata)."""
    return [node.op_type for node in model.graph]


@pytest.mark.parametrize("name", ["llama", "qwen2", "bert"])  # tied embeddings; untied; buffers outside the state dict
def test_a_folder_captured_again_is_the_same_model_without_tracing(tiny_folder, tmp_path, cache, exports, name):
    folder = _copy(tiny_folder, name, tmp_path)
    first = xopt.load(folder)
    assert len(exports) == 1
    second = xopt.load(folder)
    assert len(exports) == 1  # read from the cache
    assert _bytes(second) == _bytes(first)
    (stored,) = cache.glob("*.onnx")
    initializers = onnx.load(stored, load_external_data=False).graph.initializer
    references = [t for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL]
    assert references and all(t.external_data[0].value.startswith(graph_cache.REFERENCE) for t in references)
    assert not any(t.raw_data for t in references)  # parameters are kept as references, not bytes
    parameters = {v.name for v in first.graph.initializers.values() if v.name.split(".")[-1] in ("weight", "bias")}
    assert {t.name for t in references} == parameters


def test_a_changed_folder_is_captured_anew_and_a_trace_can_be_asked_for(tiny_folder, tmp_path, cache, exports):
    folder = _copy(tiny_folder, "llama", tmp_path)
    xopt.load(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    changed = xopt.load(folder)
    assert len(exports) == 2
    assert len(list(cache.glob("*.onnx"))) == 2
    assert xopt.load(folder) is not changed and len(exports) == 2
    xopt.load(folder, capture_cache=False)  # a benchmark timing the trace asks for one
    assert len(exports) == 3


def _damage_reference(path):
    proto = onnx.load(path, load_external_data=False)
    reference = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    reference.external_data[0].value = graph_cache.REFERENCE + "no.such.weight"
    onnx.save(proto, path)


def _resize_reference(path):
    proto = onnx.load(path, load_external_data=False)
    reference = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    reference.dims[0] += 1
    onnx.save(proto, path)


def _garble(path):
    path.write_bytes(b"\x00not a graph")


def test_a_cached_graph_in_doubt_is_captured_anew_and_written_over(tiny_folder, tmp_path, cache, exports):
    """An unreadable file, a reference to a weight the model lacks, one of another shape."""
    folder = _copy(tiny_folder, "llama", tmp_path)
    first = xopt.load(folder)
    (stored,) = cache.glob("*.onnx")
    for count, damage in enumerate((_garble, _damage_reference, _resize_reference), start=2):
        damage(stored)
        again = xopt.load(folder)
        assert len(exports) == count and _ops(again) == _ops(first), damage.__name__
        assert _bytes(xopt.load(folder)) == _bytes(again) and len(exports) == count  # the new capture was cached


def test_a_cache_that_cannot_be_written_only_costs_time(tiny_folder, tmp_path, monkeypatch, exports):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("XOPT_CACHE_DIR", str(blocked))
    folder = _copy(tiny_folder, "llama", tmp_path)
    captured = xopt.load(folder)
    assert len(exports) == 1 and captured.graph.outputs[0].name == "logits"
    assert blocked.read_text() == "not a folder"


def test_the_least_recently_used_graphs_are_dropped(cache, monkeypatch):
    monkeypatch.setattr(graph_cache, "KEEP", 2)
    model = model_from_text(LINEAR_MODEL)
    for key in ("a", "b", "c"):
        graph_cache.store(key, model, {})
        if key == "b":
            assert graph_cache.load("a", {}) is not None  # used: now more recent than b
    assert sorted(path.stem for path in cache.glob("*")) == ["a", "c"]


class RecordingTokenizer:
    """AutoTokenizer that records where it loads from, and reads a folder's own files where asked
    for a GGUF file (the tiny folders have none)."""

    loads: ClassVar[list[tuple[str, dict]]] = []

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        import transformers

        cls.loads.append((path, dict(kwargs)))
        kwargs.pop("gguf_file", None)
        return transformers.AutoTokenizer.from_pretrained(path, **kwargs)


def _saved_files(tokenizer, folder):
    tokenizer.save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_a_gguf_tokenizer_is_converted_once_then_read_in_its_saved_form(tiny_folder, tmp_path, cache, monkeypatch):
    folder = _copy(tiny_folder, "llama", tmp_path)
    RecordingTokenizer.loads = []
    first = gguf_conversions.load(RecordingTokenizer, folder, "model.gguf")
    again = gguf_conversions.load(RecordingTokenizer, folder, "model.gguf")
    (converted,) = (tmp_path / "cache" / gguf_conversions.FOLDER).iterdir()
    assert RecordingTokenizer.loads == [(str(folder), {"gguf_file": "model.gguf"}), (str(converted), {})]
    text = "the quick brown fox"
    assert again(text)["input_ids"] == first(text)["input_ids"]
    assert _saved_files(again, tmp_path / "again") == _saved_files(first, tmp_path / "first")

    (converted / "tokenizer_config.json").write_text("{ damaged")
    gguf_conversions.load(RecordingTokenizer, folder, "model.gguf")
    assert RecordingTokenizer.loads[-2:] == [(str(converted), {}), (str(folder), {"gguf_file": "model.gguf"})]
    gguf_conversions.load(RecordingTokenizer, folder, "model.gguf")  # converted anew, and kept
    assert RecordingTokenizer.loads[-1] == (str(converted), {})

    (folder / "model.gguf").write_bytes(b"a new file")  # the folder changed: converted anew
    gguf_conversions.load(RecordingTokenizer, folder, "model.gguf")
    assert RecordingTokenizer.loads[-1] == (str(folder), {"gguf_file": "model.gguf"})
    assert len(list((tmp_path / "cache" / gguf_conversions.FOLDER).iterdir())) == 2


@pytest.mark.slow
def test_smollm2_s_converted_tokenizer_and_config_are_what_its_gguf_file_gives(smollm2_folder, tmp_path, cache):
    import transformers

    from xopt.text import read_text

    gguf_file = huggingface.find_gguf_file(smollm2_folder)
    for auto in (transformers.AutoTokenizer, transformers.AutoConfig):
        parsed = gguf_conversions.load(auto, smollm2_folder, gguf_file)
        saved = gguf_conversions.load(auto, smollm2_folder, gguf_file)
        assert _saved_files(saved, tmp_path / f"{auto.__name__}-saved") == _saved_files(
            parsed, tmp_path / f"{auto.__name__}-parsed"
        )
        if auto is transformers.AutoTokenizer:
            text = read_text(None, "evaluation") + read_text(None, "calibration")
            assert saved(text)["input_ids"] == parsed(text)["input_ids"]
        else:
            assert saved.to_diff_dict() == parsed.to_diff_dict()

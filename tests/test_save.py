"""Saving: atomic writes, external data, folder outputs with tokenizer and config, load-back check."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import LINEAR_MODEL, model_from_text, wide_linear_model

import xopt
import xopt.saving as save_module
from xopt.backends.onnxruntime import create_session, run
from xopt.errors import XoptError


def test_onnx_file_output_loads_back_with_same_outputs(tmp_path):
    model = model_from_text(LINEAR_MODEL)
    written = xopt.save(model, tmp_path / "out.onnx")
    assert written == tmp_path / "out.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    x = {"x": np.ones((2, 4), np.float32)}
    np.testing.assert_array_equal(run(create_session(written), x)["y"], run(create_session(model), x)["y"])


def test_external_data_on_request(tmp_path):
    written = xopt.save(wide_linear_model(), tmp_path / "out.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    reloaded = ir.load(written)
    assert isinstance(reloaded.graph.initializers["w"].const_value, ir.ExternalTensor)


def test_folder_output_replaces_an_old_folder_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    xopt.save(model_from_text(LINEAR_MODEL), target)
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_load_back_leaves_nothing_behind(tmp_path, monkeypatch):
    def refuse(path):
        raise XoptError(f"{path}: ONNX Runtime cannot load the saved model (simulated)")

    monkeypatch.setattr(save_module, "check_loads", refuse)
    with pytest.raises(XoptError, match="simulated"):
        xopt.save(model_from_text(LINEAR_MODEL), tmp_path / "out.onnx")
    with pytest.raises(XoptError, match="simulated"):
        xopt.save(model_from_text(LINEAR_MODEL), tmp_path / "folder")
    assert list(tmp_path.iterdir()) == []


def test_output_over_the_models_own_weights_is_refused(tmp_path):
    source = tmp_path / "in.onnx"
    ir.save(model_from_text(LINEAR_MODEL), source, external_data="in.onnx.data", size_threshold_bytes=0)
    data_before = (tmp_path / "in.onnx.data").read_bytes()
    model = xopt.load(source)
    with pytest.raises(XoptError, match="would overwrite the input model's weights"):
        xopt.save(model, source)
    with pytest.raises(XoptError, match="would overwrite the input model's weights"):
        xopt.save(model, tmp_path)
    assert (tmp_path / "in.onnx.data").read_bytes() == data_before


def test_missing_parent_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(XoptError, match="does not exist"):
        xopt.save(model_from_text(LINEAR_MODEL), tmp_path / "no" / "out.onnx")


def test_hugging_face_folder_output_carries_tokenizer_and_config(tiny_folder, tiny_model, tmp_path):
    import transformers

    source = tiny_folder("bert")
    transformers.BertTokenizerFast(vocab=_tiny_vocab(source)).save_pretrained(source)
    written = xopt.save(tiny_model("bert"), tmp_path / "out")
    names = {p.name for p in written.parent.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json"} <= names
    saved = ir.load(written)
    assert "xopt.hf_folder" not in saved.metadata_props
    assert saved.metadata_props["xopt.task"] == "feature-extraction"


def _tiny_vocab(folder):
    path = folder / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(206)]]))
    return str(path)

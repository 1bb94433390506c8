"""Saving: atomic writes, external data, folder outputs with tokenizer and config, load-back check."""

from __future__ import annotations

import os
import stat

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


def test_folder_output_replaces_an_old_model_folder_whole(tmp_path):
    target = tmp_path / "out"
    xopt.save(model_from_text(LINEAR_MODEL), target)
    (target / "stale.txt").write_text("old")
    xopt.save(model_from_text(LINEAR_MODEL), target)
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # as mkdir makes it, not 0700


def test_a_folder_that_holds_no_model_is_never_replaced(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("precious")
    with pytest.raises(XoptError, match=r"holds no model\.onnx"):
        xopt.save(model_from_text(LINEAR_MODEL), busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert xopt.save(model_from_text(LINEAR_MODEL), empty) == empty / "model.onnx"


def test_the_current_folder_is_not_an_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in (".", "..", ""):
        with pytest.raises(XoptError, match="current folder"):
            xopt.save(model_from_text(LINEAR_MODEL), name)
    assert list(tmp_path.iterdir()) == []


def test_a_symlinked_output_folder_is_replaced_where_it_points(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    xopt.save(model_from_text(LINEAR_MODEL), real)
    link.symlink_to(real)
    xopt.save(model_from_text(LINEAR_MODEL), link)
    assert link.is_symlink() and link.resolve() == real and (real / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_folder_holding_the_source_folder_is_refused(tmp_path):
    source = tmp_path / "holder" / "source"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    model = model_from_text(LINEAR_MODEL)
    model.metadata_props["xopt.hf_folder"] = str(source)
    for target in (tmp_path / "holder", source):
        with pytest.raises(XoptError, match="would replace the folder the model was read from"):
            xopt.save(model, target)
    assert (source / "config.json").read_text() == "{}"


def test_weights_kept_in_an_external_file_are_copied_into_the_output(tmp_path):
    source = tmp_path / "in" / "in.onnx"
    source.parent.mkdir()
    ir.save(model_from_text(LINEAR_MODEL), source, external_data="in.onnx.data", size_threshold_bytes=0)
    model = xopt.load(source)
    optimized, _ = xopt.optimize(model, passes="cleanup")  # verified: checker and parity on the external weights
    inline = xopt.save(optimized, tmp_path / "inline.onnx")
    external = xopt.save(optimized, tmp_path / "external.onnx", external_data=True)
    x = {"x": np.ones((2, 4), np.float32)}
    expected = run(create_session(model), x)["y"]
    (tmp_path / "in" / "in.onnx.data").unlink()  # the outputs must not read the input's weights
    for written in (inline, external):
        np.testing.assert_array_equal(run(create_session(written), x)["y"], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["external.onnx", "external.onnx.data", "in", "inline.onnx"]


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


def test_output_over_the_model_file_it_was_read_from_is_refused(tmp_path):
    source = tmp_path / "in.onnx"
    ir.save(model_from_text(LINEAR_MODEL), source)
    before = source.read_bytes()
    optimized, _ = xopt.optimize(xopt.load(str(source)), passes="cleanup")
    with pytest.raises(XoptError, match="would overwrite the input model"):
        xopt.save(optimized, source)
    with pytest.raises(XoptError, match="would overwrite the input model"):
        xopt.save(optimized, tmp_path)  # the folder holding it would be replaced whole
    assert source.read_bytes() == before
    assert "xopt.source_file" not in ir.load(xopt.save(optimized, tmp_path / "out.onnx")).metadata_props


def test_a_folder_named_like_an_onnx_file_is_refused_before_writing(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(XoptError, match=r"dir\.onnx: is a folder"):
        xopt.save(model_from_text(LINEAR_MODEL), tmp_path / "dir.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx"]


def test_an_output_named_like_another_kind_of_file_is_refused(tmp_path):
    model = model_from_text(LINEAR_MODEL)
    with pytest.raises(XoptError, match=r"out\.pt: names a \.pt file; the output is an \.onnx file or a folder"):
        xopt.save(model, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "v1.txt").mkdir()  # an existing folder so named is the user's choice
    assert xopt.save(model, tmp_path / "v1.txt") == tmp_path / "v1.txt" / "model.onnx"
    assert xopt.save(model, tmp_path / "smollm2-1.5") == tmp_path / "smollm2-1.5" / "model.onnx"


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

"""Capture: ONNX files (with external data), nn.Module, ExportedProgram / .pt2, Hugging Face folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import LINEAR_MODEL, model_from_text

import xopt
from xopt.backends.onnxruntime import create_session, run
from xopt.capture import huggingface
from xopt.capture.huggingface import load_tokenizer
from xopt.errors import XoptError, first_line
from xopt.kv_cache import empty_cache


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 6)
        self.norm = torch.nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(torch.relu(self.linear(x)))


def _saved_with_external_data(tmp_path):
    path = tmp_path / "linear.onnx"
    ir.save(model_from_text(LINEAR_MODEL), path, external_data="linear.onnx.data", size_threshold_bytes=0)
    return path


def test_onnx_file_with_external_data_is_memory_mapped(tmp_path):
    path = _saved_with_external_data(tmp_path)
    model = xopt.load(path)
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    x = np.ones((2, 4), np.float32)
    (y,) = run(create_session(model), {"x": x}).values()
    np.testing.assert_allclose(y, np.maximum(x @ np.arange(1, 13).reshape(4, 3) + [0.5, -0.5, 0.25], 0))


def test_missing_or_truncated_external_data_is_a_one_line_error(tmp_path):
    path = _saved_with_external_data(tmp_path)
    data = tmp_path / "linear.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(XoptError, match="is truncated"):
        xopt.load(path)
    data.unlink()
    with pytest.raises(XoptError, match="is missing"):
        xopt.load(path)


def test_nn_module_capture_matches_torch():
    module = TinyNet().eval()
    x = torch.randn(3, 8)
    model = xopt.load(module, (x,))
    (y,) = run(create_session(model), {model.graph.inputs[0].name: x.numpy()}).values()
    np.testing.assert_allclose(y, module(x).detach().numpy(), atol=1e-5)
    assert any(n.metadata_props.get("pkg.torch.onnx.name_scopes") for n in model.graph)


def test_a_failed_export_names_torch_s_own_reason(capfd):
    with pytest.raises(XoptError) as raised:
        xopt.load(TinyNet(), (torch.randn(3, 5),))  # 5 features into Linear(8, 6)
    assert str(raised.value).startswith("torch.export could not capture the model: ")
    assert "[3, 5]" in str(raised.value) and "\x1b" not in str(raised.value) and "step 1/3" not in str(raised.value)
    assert capfd.readouterr().err == ""  # torch's fake-tensor logger prints no traceback


def test_a_reason_that_announces_the_next_line_keeps_it():
    inconsistent = ValueError("The following inconsistencies were found:\n  Eq(s70, 1) is inconsistent!\n")
    assert first_line(inconsistent) == "The following inconsistencies were found: Eq(s70, 1) is inconsistent!"
    assert first_line(ValueError("bad shape\nat line 3")) == "bad shape"
    assert first_line(ValueError("  ")) == "ValueError"


@pytest.mark.parametrize(
    ("config", "model", "kwargs", "message"),
    [
        (
            "ViTConfig",
            "ViTModel",
            {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "image_size": 16,
                "patch_size": 8,
            },
            "vit takes no token ids",
        ),
        (
            "T5Config",
            "T5Model",
            {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4},
            "t5 is an encoder-decoder model",
        ),
        (
            "MambaConfig",
            "MambaForCausalLM",
            {"vocab_size": 64, "hidden_size": 32, "state_size": 4, "num_hidden_layers": 1, "intermediate_size": 64},
            "mamba has no key/value cache",
        ),
    ],
)
def test_an_unsupported_architecture_is_a_one_line_error(tmp_path, config, model, kwargs, message):
    import transformers

    torch.manual_seed(0)
    getattr(transformers, model)(getattr(transformers, config)(**kwargs)).save_pretrained(tmp_path)
    with pytest.raises(XoptError, match=f"^{tmp_path}: {message}"):
        xopt.load(tmp_path)


def test_nn_module_without_example_inputs_is_refused():
    with pytest.raises(XoptError, match="needs example_inputs"):
        xopt.load(TinyNet())


def test_exported_program_and_pt2_file_capture(tmp_path):
    module = TinyNet().eval()
    x = torch.randn(3, 8)
    exported = torch.export.export(module, (x,))
    path = tmp_path / "tiny.pt2"
    torch.export.save(exported, path)
    for source in (exported, path):
        model = xopt.load(source)
        (y,) = run(create_session(model), {model.graph.inputs[0].name: x.numpy()}).values()
        np.testing.assert_allclose(y, module(x).detach().numpy(), atol=1e-5)


def test_unreadable_pt2_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(XoptError, match=r"not a readable torch\.export program"):
        xopt.load(path)


def test_hugging_face_encoder_exports_dynamic_axes_and_matches_torch(tiny_folder, tiny_model):
    import transformers

    model = tiny_model("bert")
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    assert [v.name for v in model.graph.outputs] == ["last_hidden_state"]
    assert model.metadata_props["xopt.task"] == "feature-extraction"
    reference = transformers.AutoModel.from_pretrained(tiny_folder("bert"), attn_implementation="eager").eval()
    session = create_session(model)
    rng = np.random.default_rng(1)
    for batch, sequence in ((1, 5), (3, 11)):
        ids = rng.integers(0, 211, (batch, sequence))
        mask = np.ones_like(ids)
        mask[-1, sequence - 2 :] = 0  # right padding on the last row
        got = run(session, {"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
        with torch.no_grad():
            expected = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()
        valid = mask.astype(bool)
        np.testing.assert_allclose(got[valid], expected[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "mpt", "gpt_neo"])
def test_causal_lm_exports_a_kv_cache_model_that_matches_torch(tiny_folder, tiny_model, name):
    """Prefill on an empty cache, then the rest of the sequence fed on the returned presents,
    gives transformers' logits for the whole sequence; left padding included. MPT is traced
    without the exporter's size-oblivious axes (its ALiBi slice has no bound with them): its
    axes keep their names all the same."""
    import transformers

    model = tiny_model(name)
    layers = 2
    pasts = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask", *pasts]
    presents = [p.replace("past_key_values", "present") for p in pasts]
    assert [v.name for v in model.graph.outputs] == ["logits", *presents]
    for value in model.graph.inputs[2:]:
        assert [str(d) for d in value.shape][::2] == ["batch", "past_sequence"]
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "sequence"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder(name), attn_implementation="eager")
    session = create_session(model)
    rng = np.random.default_rng(1)
    for batch, sequence, split in ((1, 5, 3), (3, 11, 7)):
        ids = rng.integers(0, 211, (batch, sequence))
        mask = np.ones_like(ids)
        mask[-1, :2] = 0  # left padding on the last row
        positions = torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0))  # as transformers' generate does
        with torch.no_grad():
            expected = reference.eval()(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=positions
            )
        first = run(
            session, {"input_ids": ids[:, :split], "attention_mask": mask[:, :split], **empty_cache(model, batch)}
        )
        second = run(
            session,
            {
                "input_ids": ids[:, split:],
                "attention_mask": mask,
                **{past: first[present] for past, present in zip(pasts, presents, strict=True)},
            },
        )
        got = np.concatenate([first["logits"], second["logits"]], axis=1)
        valid = mask.astype(bool)
        np.testing.assert_allclose(got[valid], expected.logits.numpy()[valid], atol=2e-5, rtol=1e-4)
        assert second["present.0.key"].shape[2] == sequence


def test_a_capture_retried_on_bounded_axes_runs_the_whole_context(tiny_folder, tiny_model):
    """GPT-Neo is captured on the retry, with the sequence and past axes bounded by 32, half its
    64 positions (torch.export takes P + S ≤ 64 no other way): the graph still runs a prompt of 60
    tokens and then 4 more on its cache, as transformers does."""
    model = tiny_model("gpt_neo")
    reference = huggingface.load_hf_model(tiny_folder("gpt_neo"))
    ids = np.random.default_rng(4).integers(0, 211, (1, 64))
    session = create_session(model)
    first = run(
        session, {"input_ids": ids[:, :60], "attention_mask": np.ones((1, 60), np.int64), **empty_cache(model, 1)}
    )
    pasts = {v.name: first[v.name.replace("past_key_values", "present")] for v in model.graph.inputs[2:]}
    second = run(session, {"input_ids": ids[:, 60:], "attention_mask": np.ones((1, 64), np.int64), **pasts})
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.concatenate([first["logits"], second["logits"]], axis=1)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_mpt_s_context_is_the_length_of_its_alibi_table(tiny_model):
    """MPT's config names its limit `max_seq_len` (its ALiBi table's columns): calibration, eval
    and generate stay within it (past it, the bias fails to broadcast inside ONNX Runtime)."""
    from xopt.kv_cache import context_limit

    assert context_limit(tiny_model("mpt")) == (64, "the model's config allows")


SLIDING_WINDOW_CONFIGS = {  # a window of 4 positions: every layer (Mistral), every other one (Gemma-2)
    "mistral": ("MistralConfig", {"sliding_window": 4}, "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", {"sliding_window": 4, "head_dim": 16}, "Gemma2ForCausalLM"),
}


@pytest.mark.parametrize("name", sorted(SLIDING_WINDOW_CONFIGS))
def test_sliding_window_decoders_keep_the_whole_cache_and_mask_beyond_the_window(name, tmp_path):
    """A sliding-window layer's cache is exported whole (present = past + new, as for every layer)
    and the window applied by the mask: prefill, then one token at a time well past the window,
    gives transformers' logits (its own cache drops what falls out of the window)."""
    from conftest import build_folder

    config_class, window, model_class = SLIDING_WINDOW_CONFIGS[name]
    sizes = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    folder = build_folder(config_class, {**sizes, "num_key_value_heads": 2, **window}, model_class, tmp_path)
    model = xopt.load(folder)
    session = create_session(model)
    ids = np.random.default_rng(2).integers(0, 211, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(-1) - 1, 0)}
    with torch.no_grad():
        expected = huggingface.load_hf_model(folder)(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    step = run(session, {"input_ids": ids[:, :5], "attention_mask": mask[:, :5], **empty_cache(model, 2)})
    logits = [step["logits"]]
    for end in range(6, 13):
        pasts = {v.name: step[v.name.replace("past_key_values", "present")] for v in model.graph.inputs[2:]}
        step = run(session, {"input_ids": ids[:, end - 1 : end], "attention_mask": mask[:, :end], **pasts})
        logits.append(step["logits"])
    assert step["present.0.key"].shape[2] == 12
    valid = mask.astype(bool)
    got = np.concatenate(logits, axis=1)
    np.testing.assert_allclose(got[valid], expected.logits.numpy()[valid], atol=2e-5, rtol=1e-4)


def test_a_folder_s_tokenizer_is_loaded_once_until_its_files_change(tiny_folder, tmp_path):
    """A GGUF file's tokenizer takes seconds to parse and a run reads it several times: it is
    loaded once per process, and again when a file in the folder changes."""
    folder = tmp_path / "llama"
    shutil.copytree(tiny_folder("llama"), folder)
    first = load_tokenizer(folder)
    assert load_tokenizer(folder) is first
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    changed = load_tokenizer(folder)
    assert changed is not first and changed.model_max_length == 77
    assert load_tokenizer(folder) is changed
    remembered = [key for key in huggingface._LOADED if key[1] == str(folder.resolve())]
    assert len(remembered) == 1  # the older files' tokenizer is not kept


def test_capture_parses_the_config_that_later_steps_read(tiny_folder, tmp_path, monkeypatch):
    """A GGUF file's config takes seconds to parse: capture loads it through the same memo the
    context length and the output folder read, so a run parses it once."""
    import transformers

    folder = tmp_path / "llama"
    shutil.copytree(tiny_folder("llama"), folder)
    loads = []
    load = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(
        transformers.AutoConfig, "from_pretrained", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs)
    )
    captured = xopt.load(folder)
    config = huggingface._source_config(captured)
    assert len(loads) == 1 and config.model_type == "llama"
    assert config is not huggingface._source_config(captured)  # each reader gets its own copy


def test_gguf_files_are_read_without_gguf_py_s_repeated_work_while_a_gguf_model_loads(tmp_path):
    """transformers rebuilds gguf's tensor-name map for every module of a GGUF model (397 times
    for SmolLM2), and gguf's reader slices an np.memmap once per metadata value (2.2 M times for
    SmolLM2's tokenizer); while xopt loads one the map is built once per architecture and layer
    count, and the reader reads a plain view of the map: the same fields and tensors."""
    import gguf
    import gguf.gguf_reader

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_token_list([f"token{i}" for i in range(300)])
    writer.add_token_scores([float(i) / 7 for i in range(300)])
    writer.add_tensor("token_embd.weight", np.arange(96, dtype=np.float32).reshape(8, 12))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def contents(reader):
        fields = {
            name: (field.types, [bytes(field.parts[i]) for i in field.data]) for name, field in reader.fields.items()
        }
        return fields, [(t.name, t.tensor_type, t.data.tobytes()) for t in reader.tensors]

    build, numpy = gguf.get_tensor_name_map, gguf.gguf_reader.np
    plain = gguf.GGUFReader(path)
    with huggingface._fast_gguf_reads("model.gguf"):
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not first
        fast = gguf.GGUFReader(path)
    assert type(plain.data) is np.memmap and type(fast.data) is np.ndarray
    assert contents(fast) == contents(plain) and len(contents(plain)[0]["tokenizer.ggml.tokens"][1]) == 300
    assert gguf.get_tensor_name_map is build and gguf.gguf_reader.np is numpy
    with huggingface._fast_gguf_reads(None):  # a folder without GGUF: nothing changes
        assert gguf.get_tensor_name_map is build and gguf.gguf_reader.np is numpy


def test_an_axis_the_exporter_fixes_is_named_in_a_warning(caplog):
    """torch.onnx fixes a dynamic axis that the module's code needs at one size, without an error."""

    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return x + torch.ones(2, 4)  # the batch axis must be 2

    with caplog.at_level("WARNING", logger="xopt"):
        model = xopt.load(FixedBatch(), (torch.ones(2, 4),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    assert list(model.graph.inputs[0].shape) == [2, 4]
    assert "x: axis 0 (batch) is fixed at 2: the module's code needs that size" in caplog.messages


def test_a_failed_capture_prints_nothing_but_its_error(tmp_path, capfd):
    """DBRX's experts loop over the experts a batch hit (a data-dependent count): torch.export
    stops, and on the way prints the whole traced graph on stderr and logs guards' tracebacks."""
    from conftest import build_folder

    attention = {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}
    experts = {"moe_num_experts": 4, "moe_top_k": 2, "ffn_hidden_size": 32}
    config = dict(d_model=48, n_heads=4, n_layers=1, vocab_size=211, attn_config=attention, ffn_config=experts)
    folder = build_folder("DbrxConfig", config, "DbrxForCausalLM", tmp_path)
    capfd.readouterr()
    with pytest.raises(XoptError, match="could not capture the model: Could not guard on data-dependent expression"):
        xopt.load(folder)
    assert capfd.readouterr().err == ""

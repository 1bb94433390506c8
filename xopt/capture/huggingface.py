"""Capture a Hugging Face model folder (config.json + weights, or a single GGUF file).

Encoders export their last hidden state (feature extraction: `input_ids, attention_mask ->
last_hidden_state`). Causal LMs export one model that does both prefill and decode with a KV
cache (`xopt.kv_cache` states the convention): position ids are computed in the graph from the
attention mask (`cumsum(mask) − 1`, so left padding works), and the cache is handed to the model
as a transformers `DynamicCache` of whole layers (a sliding-window layer's too: the mask applies
its window). Batch, sequence and past length are dynamic axes. A model of alike layers is
traced with one period of its layer kinds and the next layer, and the others are stamped from
those (`layer_stamping`).

Attention is loaded as transformers' "eager" implementation, so the graph holds the plain
`softmax(QKᵀ/√d + mask)·V` that the structure analysis and fusions recognise, rather than an
SDPA expansion.

The folder path is recorded in the model's metadata (`xopt.hf_folder`, `xopt.task`), so that a
folder output can carry the tokenizer and config along.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from xopt import kv_cache
from xopt.capture import gguf_conversions, graph_cache
from xopt.capture.graph_cache import folder_files
from xopt.capture.layer_stamping import export_with_stamped_layers
from xopt.capture.torch_export import ExportCall
from xopt.errors import XoptError, first_line

logger = logging.getLogger(__name__)

TASK_CAUSAL_LM = "causal-lm"
TASK_FEATURE_EXTRACTION = "feature-extraction"

# Example shapes used for tracing: batch, sequence and past length must differ from each other
# and from 0 and 1, so that torch.export does not specialise any axis.
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 16, 3


def find_gguf_file(folder: Path) -> str | None:
    """The single GGUF file in a folder without config.json, if there is exactly one."""
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict, or a one-line error naming what is wrong with it."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise XoptError(f"{path}: not a readable JSON config ({first_line(error)})") from None
    if not isinstance(config, dict):
        raise XoptError(f"{path}: not a model config (a JSON object is expected)")
    return config


def hf_task(folder: Path, gguf_file: str | None = None) -> str:
    """`causal-lm` for architectures with a language-model head, else `feature-extraction`."""
    if gguf_file is not None:
        return TASK_CAUSAL_LM  # GGUF files hold decoder LLMs
    config = read_config(folder)
    architectures = config.get("architectures") or []
    is_lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return TASK_CAUSAL_LM if is_lm else TASK_FEATURE_EXTRACTION


def load_hf_model(folder: Path, gguf_file: str | None = None):
    """The transformers model in fp32 with eager attention, in eval mode; a mixture of experts
    gathers each token's experts' weights for batched MatMuls (`grouped_mm` has no ONNX form)."""
    import torch
    import transformers

    task = hf_task(folder, gguf_file)
    auto = transformers.AutoModelForCausalLM if task == TASK_CAUSAL_LM else transformers.AutoModel
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager", "experts_implementation": "batched_mm"}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:  # GGUF dequantization draws its own progress bar on stderr; xopt reports the step itself
        with contextlib.redirect_stderr(io.StringIO()):
            # the config the later steps read (`_source_config`), parsed once from a GGUF file
            config = copy.deepcopy(_loaded_once(transformers.AutoConfig, folder, **_gguf_kwargs(gguf_file)))
            with _fast_gguf_reads(gguf_file):
                model = auto.from_pretrained(str(folder), config=config, **kwargs)
    except Exception as error:
        reason = first_line(error)
        raise XoptError(f"{folder}: transformers could not load the model ({reason})") from None
    if gguf_file is not None:  # weights are dequantized to fp32: a plain checkpoint from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval()


@contextlib.contextmanager
def _fast_gguf_reads(gguf_file: str | None) -> Iterator[None]:
    """While transformers reads a GGUF file, two costs of gguf-py that repeat the same work go:
    - gguf's tensor-name map (architecture, layer count → every tensor's names) is built once:
      transformers builds it anew for each of the model's modules as it recurses through them
      (`get_tensor_name_map`: 397 times for SmolLM2, 4.4 s of its 13.3 s load). It is a function
      of its two arguments only, and is read, never changed.
    - `GGUFReader` reads the file through a plain ndarray view of its memory map, not the
      `np.memmap` itself: the reader slices the map once per value of each metadata array
      (SmolLM2: 49 152 token strings with their scores and types, 48 900 merges; 2.2 M slices),
      and each slice of an `np.memmap` passes through its Python-level `__getitem__` and
      `__array_finalize__`: 2.8 s per reader against 0.7 s, for the same fields and tensors (the
      view keeps the map open). A model load builds one reader; converting the tokenizer and
      the config (`gguf_conversions`, once per machine) one more each."""
    if gguf_file is None:
        yield
        return
    import gguf
    import gguf.gguf_reader

    build, numpy = gguf.get_tensor_name_map, gguf.gguf_reader.np
    gguf.get_tensor_name_map = functools.cache(build)
    gguf.gguf_reader.np = _NumpyWithPlainMemoryMaps()
    try:
        yield
    finally:
        gguf.get_tensor_name_map, gguf.gguf_reader.np = build, numpy


class _NumpyWithPlainMemoryMaps:
    """numpy, for gguf's reader, whose `memmap` returns a plain ndarray view of the map."""

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def memmap(*args, **kwargs) -> np.ndarray:
        return np.memmap(*args, **kwargs).view(np.ndarray)


def load_hf_folder(folder: Path, *, capture_cache: bool = True) -> ir.Model:
    """Export the model in `folder` to onnx-ir with dynamic batch and sequence axes; the graph
    captured before, if cached (`graph_cache`) and `capture_cache` allows reading it."""
    if not folder.is_dir():
        raise XoptError(f"{folder}: no such folder")
    gguf_file = None
    if not (folder / "config.json").is_file():
        gguf_file = find_gguf_file(folder)
        if gguf_file is None:
            raise XoptError(f"{folder}: no config.json (not a Hugging Face model folder)")
    task = hf_task(folder, gguf_file)
    model = load_hf_model(folder, gguf_file)
    kind = model.config.model_type
    if getattr(model.config.get_text_config(decoder=task == TASK_CAUSAL_LM), "vocab_size", None) is None:
        raise XoptError(f"{folder}: {kind} takes no token ids (no vocab_size in its config); xopt captures text models")
    if getattr(model.config, "is_encoder_decoder", False):
        raise XoptError(f"{folder}: {kind} is an encoder-decoder model; xopt captures encoders and decoders")
    weights, key = model.state_dict(), graph_cache.capture_key(folder, gguf_file)
    captured = graph_cache.load(key, weights) if capture_cache else None
    if captured is not None:
        return captured
    try:
        if task == TASK_CAUSAL_LM:
            captured = export_with_stamped_layers(model, _causal_lm_call)
            _name_total_sequence(captured)
        else:
            captured = export_with_stamped_layers(model, _encoder_call)
    except XoptError as error:
        raise XoptError(f"{folder}: {error}") from None
    except (AttributeError, TypeError, KeyError, ValueError) as error:  # an architecture the wrappers do not fit
        raise XoptError(f"{folder}: {kind} is not supported ({first_line(error)})") from None
    captured.metadata_props["xopt.task"] = task
    captured.metadata_props["xopt.hf_folder"] = str(folder.resolve())
    captured.metadata_props["xopt.model_type"] = str(model.config.model_type)
    if gguf_file is not None:
        captured.metadata_props["xopt.gguf_file"] = gguf_file
    graph_cache.store(key, captured, weights)
    return captured


def save_tokenizer_and_config(model: ir.Model, folder: Path) -> bool:
    """Write the source model's tokenizer and config into `folder`; False if it has none."""
    source = source_folder(model)
    if source is None:
        return False
    try:
        source_tokenizer(model).save_pretrained(folder)
    except XoptError as error:
        logger.warning("the output folder gets no tokenizer: %s", error)
    config = _source_config(model)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    return True


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a Hugging Face tokenizer's files."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path | str, gguf_file: str | None = None):
    """The Hugging Face tokenizer in `folder` (or in its GGUF file), loaded once per process while
    the folder's files are unchanged (`_loaded_once`); callers share it and must not change it."""
    import transformers

    transformers.logging.set_verbosity_error()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return _loaded_once(transformers.AutoTokenizer, Path(folder), **kwargs)
    except (OSError, ValueError) as error:
        raise XoptError(f"{folder}: cannot load a tokenizer ({first_line(error)})") from None


def _source_config(model: ir.Model):
    """A copy of the source folder's transformers config (its own to change), or None."""
    import transformers

    source = source_folder(model)
    if source is None:
        return None
    gguf_file = model.metadata_props.get("xopt.gguf_file")
    return copy.deepcopy(_loaded_once(transformers.AutoConfig, source, **_gguf_kwargs(gguf_file)))


_LOADED: dict[tuple, tuple[tuple, object]] = {}  # (class, folder, kwargs) → (the folder's files, what loaded)


def _loaded_once(auto, folder: Path, **kwargs):
    """`auto.from_pretrained(folder, **kwargs)`, remembered while the folder's files (names, sizes,
    modification times) are unchanged: an int4 run reads the tokenizer 3 times (calibration, the
    quality line, the output folder) and the config 3 times (capture, the context length, the
    output folder). A GGUF file's tokenizer and config, parsed from it in Python (2.4 s and 1.2 s
    for SmolLM2's), are read in their saved form after the first time on a machine
    (`gguf_conversions`). One entry per folder: a reload replaces what the folder's older files
    gave."""
    files = folder_files(folder)
    key = (auto.__name__, str(folder.resolve()), tuple(sorted(kwargs.items())))
    remembered = _LOADED.get(key)
    if remembered is None or remembered[0] != files:
        gguf_file = kwargs.get("gguf_file")
        if gguf_file:  # parsed from the file once per machine, then read in its saved form
            with _fast_gguf_reads(gguf_file):
                loaded = gguf_conversions.load(auto, folder, gguf_file)
        else:
            loaded = auto.from_pretrained(str(folder), **kwargs)
        _LOADED[key] = remembered = (files, loaded)
    return remembered[1]


def source_tokenizer(model: ir.Model):
    """The tokenizer of the Hugging Face folder the model was captured from."""
    source = source_folder(model)
    if source is None:
        raise XoptError("the model was not captured from a Hugging Face folder here, so xopt has no tokenizer for it")
    return load_tokenizer(source, model.metadata_props.get("xopt.gguf_file"))


def source_context_length(model: ir.Model) -> int | None:
    """The longest sequence the source model's config allows, if known."""
    try:
        config = _source_config(model)
    except (OSError, ValueError):
        return None
    return config_context_length(config)


def config_context_length(config) -> int | None:
    """The longest sequence `config` allows: its position table, or MPT's ALiBi table of
    `max_seq_len` entries."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "max_seq_len", None)


def source_folder(model: ir.Model) -> Path | None:
    """The folder the model was captured from (recorded in its metadata), if it is still there."""
    source = model.metadata_props.get("xopt.hf_folder")
    return Path(source) if source and Path(source).is_dir() else None


def _gguf_kwargs(gguf_file: str | None) -> dict[str, str]:
    return {"gguf_file": gguf_file} if gguf_file else {}


def _example_ids(model):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, int(model.config.vocab_size), (_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE), generator=generator)


def _encoder_call(model) -> ExportCall:
    """`input_ids, attention_mask -> last_hidden_state`."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    input_ids = _example_ids(model)
    batch, sequence = torch.export.Dim(kv_cache.BATCH), torch.export.Dim(kv_cache.SEQUENCE)
    dynamic = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    return ExportCall(
        LastHiddenState(model).eval(),
        (input_ids, torch.ones_like(input_ids)),
        ["input_ids", "attention_mask"],
        ["last_hidden_state"],
        dynamic,
    )


def _causal_lm_call(model) -> ExportCall:
    """`input_ids, attention_mask, past_key_values.* -> logits, present.*` (see `xopt.kv_cache`)."""
    import torch
    from transformers import DynamicCache

    layers = int(model.config.get_text_config(decoder=True).num_hidden_layers)

    class WithKVCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, past):
            pairs = list(zip(past[0::2], past[1::2], strict=True))
            # without the config, every layer's cache is a whole one (present = past + new), also
            # where the config asks for a sliding window: the mask applies the window, and the
            # exported cache keeps one shape in every layer (a sliding one, cropped to the window,
            # made torch.export specialise the past length to below it)
            cache = DynamicCache(ddp_cache_data=pairs)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            output = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            presents = [t for layer in output.past_key_values.layers for t in (layer.keys, layer.values)]
            return (output.logits, *presents)

    input_ids = _example_ids(model)
    attention_mask = torch.ones(_EXAMPLE_BATCH, _EXAMPLE_PAST + _EXAMPLE_SEQUENCE, dtype=torch.int64)
    with torch.no_grad():  # the cache's shape per layer: run one step on an empty cache
        empty = getattr(model(input_ids=input_ids[:, :1], use_cache=True), "past_key_values", None)
    if not hasattr(empty, "layers"):
        raise XoptError(f"{model.config.model_type} has no key/value cache (not an attention decoder)")
    generator = torch.Generator().manual_seed(0)  # the same example every time: `layer_stamping` checks on it
    past = tuple(
        torch.randn(_EXAMPLE_BATCH, t.shape[1], _EXAMPLE_PAST, t.shape[3], generator=generator)
        for layer in empty.layers
        for t in (layer.keys, layer.values)
    )
    if len(past) != 2 * layers:
        raise XoptError(f"{model.config.model_type}: the cache has {len(past) // 2} layers, the config {layers}")

    def dynamic(most: int | None) -> dict:
        batch = torch.export.Dim(kv_cache.BATCH)
        sequence = torch.export.Dim(kv_cache.SEQUENCE, max=most)
        past_sequence = torch.export.Dim(kv_cache.PAST_SEQUENCE, max=most)
        return {
            "input_ids": {0: batch, 1: sequence},
            "attention_mask": {0: batch, 1: torch.export.Dim.DYNAMIC},
            "past": tuple({0: batch, 2: past_sequence} for _ in past),
        }

    # P + S ≤ L as bounds on each axis, for a retry of the capture (see `export_to_ir`)
    half = (config_context_length(model.config) or 0) // 2
    bounded = dynamic(half) if half >= max(_EXAMPLE_SEQUENCE, _EXAMPLE_PAST) else None
    names = [(kv_cache.past_name(i, k), kv_cache.present_name(i, k)) for i in range(layers) for k in ("key", "value")]
    return ExportCall(
        WithKVCache(model).eval(),
        (input_ids, attention_mask, past),
        ["input_ids", "attention_mask", *(p for p, _ in names)],
        ["logits", *(p for _, p in names)],
        dynamic(None),
        bounded,
    )


def _name_total_sequence(model: ir.Model) -> None:
    """The exporter names the mask's length and the presents' length after its own symbols."""
    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    mask.shape = ir.Shape([mask.shape[0], kv_cache.TOTAL_SEQUENCE])
    for value in model.graph.outputs:
        if value.name.startswith("present."):
            dims = list(value.shape)
            dims[2] = kv_cache.TOTAL_SEQUENCE
            value.shape = ir.Shape(dims)

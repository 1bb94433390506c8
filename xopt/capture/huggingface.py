"""Capture a Hugging Face model folder (config.json + weights, or a single GGUF file).

Encoders export their last hidden state (feature extraction: `input_ids, attention_mask ->
last_hidden_state`); causal LMs export logits (`input_ids, attention_mask -> logits`). Batch and
sequence are dynamic axes. Attention is loaded as transformers' "eager" implementation, so the
graph holds the plain `softmax(QKᵀ/√d + mask)·V` that the structure analysis and fusions
recognise, rather than an SDPA expansion.

The folder path is recorded in the model's metadata (`xopt.hf_folder`, `xopt.task`), so that a
folder output can carry the tokenizer and config along.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import onnx_ir as ir

from xopt.capture.torch_export import export_to_ir
from xopt.errors import XoptError, first_line

logger = logging.getLogger(__name__)

TASK_CAUSAL_LM = "causal-lm"
TASK_FEATURE_EXTRACTION = "feature-extraction"

# Example shapes used for tracing: batch and sequence must differ from each other and from 1,
# so that torch.export does not specialise either axis.
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE = 2, 16


def find_gguf_file(folder: Path) -> str | None:
    """The single GGUF file in a folder without config.json, if there is exactly one."""
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def hf_task(folder: Path, gguf_file: str | None = None) -> str:
    """`causal-lm` for architectures with a language-model head, else `feature-extraction`."""
    if gguf_file is not None:
        return TASK_CAUSAL_LM  # GGUF files hold decoder LLMs
    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or []
    is_lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return TASK_CAUSAL_LM if is_lm else TASK_FEATURE_EXTRACTION


def load_hf_model(folder: Path, gguf_file: str | None = None):
    """The transformers model in fp32 with eager attention, in eval mode."""
    import torch
    import transformers

    task = hf_task(folder, gguf_file)
    auto = transformers.AutoModelForCausalLM if task == TASK_CAUSAL_LM else transformers.AutoModel
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager"}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:  # GGUF dequantization draws its own progress bar on stderr; xopt reports the step itself
        with contextlib.redirect_stderr(io.StringIO()):
            model = auto.from_pretrained(str(folder), **kwargs)
    except Exception as error:
        reason = first_line(error)
        raise XoptError(f"{folder}: transformers could not load the model ({reason})") from None
    if gguf_file is not None:  # weights are dequantized to fp32: a plain checkpoint from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval()


def load_hf_folder(folder: Path) -> ir.Model:
    """Export the model in `folder` to onnx-ir with dynamic batch and sequence axes."""
    import torch

    if not folder.is_dir():
        raise XoptError(f"{folder}: no such folder")
    gguf_file = None
    if not (folder / "config.json").is_file():
        gguf_file = find_gguf_file(folder)
        if gguf_file is None:
            raise XoptError(f"{folder}: no config.json (not a Hugging Face model folder)")
    task = hf_task(folder, gguf_file)
    model = load_hf_model(folder, gguf_file)
    vocab = int(model.config.vocab_size)

    output_name = "logits" if task == TASK_CAUSAL_LM else "last_hidden_state"
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    captured = export_to_ir(
        _single_output(model, task),
        (input_ids, attention_mask),
        input_names=["input_ids", "attention_mask"],
        output_names=[output_name],
        dynamic_shapes=dynamic,
    )
    captured.metadata_props["xopt.task"] = task
    captured.metadata_props["xopt.hf_folder"] = str(folder.resolve())
    captured.metadata_props["xopt.model_type"] = str(model.config.model_type)
    if gguf_file is not None:
        captured.metadata_props["xopt.gguf_file"] = gguf_file
    return captured


def save_tokenizer_and_config(model: ir.Model, folder: Path) -> bool:
    """Write the source model's tokenizer and config into `folder`; False if it has none."""
    import transformers

    source = model.metadata_props.get("xopt.hf_folder")
    if not source or not Path(source).is_dir():
        return False
    kwargs = {}
    if gguf_file := model.metadata_props.get("xopt.gguf_file"):
        kwargs["gguf_file"] = gguf_file
    transformers.logging.set_verbosity_error()
    try:
        transformers.AutoTokenizer.from_pretrained(source, **kwargs).save_pretrained(folder)
    except (OSError, ValueError) as error:
        logger.warning("%s has no usable tokenizer; the output folder gets none (%s)", source, first_line(error))
    config = transformers.AutoConfig.from_pretrained(source, **kwargs)

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    return True


def _single_output(model, task: str):
    """Wrap `model` so that forward(input_ids, attention_mask) returns one tensor, no KV cache."""
    import torch

    class SingleOutput(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            if task == TASK_CAUSAL_LM:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return SingleOutput(model).eval()

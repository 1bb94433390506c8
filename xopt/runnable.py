"""A model ready to run on text: an ONNX Runtime session, its tokenizer, and its task.

`open_runnable` accepts what `xopt eval` and `xopt bench` are given: an `xopt optimize` output
folder (model.onnx + tokenizer + config), an `.onnx` file (tokenizer from `tokenizer=` or from
files beside it), or a Hugging Face folder / GGUF folder (captured first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from xopt.backends.onnxruntime import create_session
from xopt.capture.huggingface import TASK_CAUSAL_LM, TASK_FEATURE_EXTRACTION, has_tokenizer, load_tokenizer
from xopt.errors import XoptError
from xopt.saving import MODEL_FILE

logger = logging.getLogger(__name__)


@dataclass
class Runnable:
    label: str
    model: ir.Model
    session: Any  # onnxruntime.InferenceSession, or xopt.backends.cuda.GraphExecutor
    task: str
    tokenizer_source: Path | None
    onnx_file: Path | None = None  # the file it was loaded from (None: captured from a folder)
    gguf_file: str | None = None

    def tokenizer(self):
        """The Hugging Face tokenizer (loaded on first use)."""
        if self.tokenizer_source is None:
            raise XoptError(f"{self.label}: no tokenizer found; pass --tokenizer FOLDER")
        return load_tokenizer(self.tokenizer_source, self.gguf_file)


BACKENDS = ("onnxruntime", "cuda")


def open_runnable(
    path: Path,
    *,
    tokenizer: Path | None = None,
    threads: int | None = None,
    spinning: bool = True,
    backend: str = "onnxruntime",
) -> Runnable:
    """Load `path` for running: capture it if it is not ONNX yet, and find its tokenizer.
    `spinning=False` for sessions timed side by side (see `session_options`). With
    `backend="cuda"` the session is xopt's CUDA `GraphExecutor` instead of ONNX Runtime."""
    import xopt

    if backend not in BACKENDS:
        raise XoptError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if not path.exists():
        raise XoptError(f"{path}: no such file or folder")
    onnx_file = path / MODEL_FILE if path.is_dir() and (path / MODEL_FILE).is_file() else path
    model = xopt.load(path)  # an output folder: its config travels in the metadata
    if onnx_file.is_dir():
        onnx_file = None
    gguf_file = model.metadata_props.get("xopt.gguf_file")
    if tokenizer is not None and not tokenizer.is_dir():
        raise XoptError(f"--tokenizer {tokenizer}: no such folder")
    if tokenizer is None:
        tokenizer = path if path.is_dir() else path.parent
        if not gguf_file and not has_tokenizer(tokenizer):
            tokenizer = None
    return Runnable(
        label=str(path),
        model=model,
        session=_cuda_executor(model)
        if backend == "cuda"
        else create_session(model, threads=threads, spinning=spinning),
        task=model_task(model),
        tokenizer_source=tokenizer,
        onnx_file=onnx_file,
        gguf_file=gguf_file,
    )


def _cuda_executor(model: ir.Model):
    from xopt.backends.cuda import GraphExecutor
    from xopt.backends.cuda.executor import static_cache_refusal

    return GraphExecutor(model, "cuda", static_cache=static_cache_refusal(model) is None)


def model_task(model: ir.Model) -> str:
    """`causal-lm` or `feature-extraction`, from xopt's metadata or the output's name."""
    if task := model.metadata_props.get("xopt.task"):
        return task
    names = [v.name.lower() for v in model.graph.outputs]
    return TASK_CAUSAL_LM if any("logits" in n for n in names) else TASK_FEATURE_EXTRACTION

"""Front-ends: everything a user can hand xopt becomes one `ir.Model`.

- an `.onnx` file from any exporter (external data memory-mapped, never rewritten);
- a torch `nn.Module` with example inputs, or an `ExportedProgram` / saved `.pt2` file
  (torch.export → torch.onnx);
- a Hugging Face model folder (config.json + weights, or one GGUF file);
- an `xopt optimize` output folder (model.onnx beside the tokenizer and config it keeps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from xopt.capture.huggingface import has_tokenizer, load_hf_folder
from xopt.capture.onnx_file import load_onnx_file
from xopt.capture.torch_export import export_module, export_to_ir, load_exported_program
from xopt.errors import XoptError
from xopt.saving import MODEL_FILE

__all__ = ["load"]


def load(
    source: str | Path | Any,
    example_inputs: Sequence[Any] | None = None,
    *,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    capture_cache: bool = True,
) -> ir.Model:
    """Capture `source` (a path, an nn.Module, an ExportedProgram or a model) into onnx-ir.
    `capture_cache=False`: a Hugging Face folder is traced even where its captured graph is cached
    (`capture/graph_cache.py`; the new graph is kept), as a benchmark timing a first capture wants."""
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return ir.serde.deserialize_model(source)
    if isinstance(source, str | Path):
        if not str(source).strip():
            raise XoptError("empty path: give a file or folder to load")
        return _load_path(Path(source), capture_cache)
    torch = _torch_if_loaded()
    if torch is not None and isinstance(source, torch.export.ExportedProgram):
        return export_to_ir(source)
    if torch is not None and isinstance(source, torch.nn.Module):
        return export_module(source, example_inputs, dynamic_shapes=dynamic_shapes)
    raise XoptError(f"cannot capture a {type(source).__name__}: give a path, an nn.Module or an ExportedProgram")


def _load_path(path: Path, capture_cache: bool) -> ir.Model:
    if not path.exists():
        raise XoptError(f"{path}: no such file or folder")
    if path.is_dir() and (path / MODEL_FILE).is_file():  # an `xopt optimize` output folder
        return _read_from(load_onnx_file(path / MODEL_FILE), path / MODEL_FILE)
    if path.is_dir():
        return load_hf_folder(path, capture_cache=capture_cache)
    if path.suffix == ".pt2":
        return load_exported_program(path)
    return _read_from(load_onnx_file(path), path)


def _read_from(model: ir.Model, file: Path) -> ir.Model:
    """Record where an ONNX model was read from (saving refuses to overwrite it); for xopt's own
    output (its metadata says its task) and for a file in a folder laid out as Hugging Face
    Optimum writes one (its config and tokenizer beside it), that folder is the model's source:
    calibration and `xopt eval` read its tokenizer, and its config and tokenizer travel on to the
    next output."""
    model.metadata_props["xopt.source_file"] = str(file.resolve())
    folder = file.parent
    beside = (folder / "config.json").is_file() and ("xopt.task" in model.metadata_props or has_tokenizer(folder))
    if beside:
        model.metadata_props["xopt.hf_folder"] = str(folder.resolve())
    return model


def _torch_if_loaded():
    """torch, if the caller could have built a torch object (it is then already imported)."""
    import sys

    return sys.modules.get("torch")

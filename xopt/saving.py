"""Saving a model, atomically, and checking that ONNX Runtime loads what was written.

OUTPUT is an `.onnx` file or a folder (`model.onnx` inside; for a Hugging Face source also the
tokenizer and config, so `eval` and `generate` work on it); a new name ending like another kind of
file (`out.pt`, `out.txt`) is refused as a mistyped file name. Everything is written into a
temporary sibling folder first, loaded back in ONNX Runtime, and only then moved into place:
a failure at any step leaves no partial output. An existing folder is replaced whole, so only
an empty one or a model folder (one holding `model.onnx`) is; never one the model was read from.
Weights go to external data when they would not fit in one protobuf (2 GB) or on request;
weights the input kept in external data are copied, not referenced.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from xopt.backends.onnxruntime import (
    EXTERNAL_DATA_THRESHOLD_BYTES,
    PROTOBUF_LIMIT_BYTES,
    check_loads,
    model_bytes,
    with_weights_in_memory,
)
from xopt.capture.huggingface import save_tokenizer_and_config
from xopt.errors import XoptError, first_line, require_model

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"

# Suffixes of files that are not a model folder: an output named so is a mistyped file name.
_OTHER_FILE_SUFFIXES = frozenset(
    (".bin", ".data", ".gguf", ".json", ".npy", ".npz", ".ort", ".pb", ".pt", ".pt2", ".pth", ".safetensors", ".txt")
)

# Paths of the source model, used while capturing; they do not belong in a deployed artifact.
_SOURCE_METADATA = ("xopt.hf_folder", "xopt.gguf_file", "xopt.source_file")


def is_folder_output(path: Path) -> bool:
    """Whether `save` writes `path` as a folder (model.onnx, its weights, tokenizer and config):
    every name but one ending in .onnx, which is a file."""
    return path.suffix.lower() != ".onnx"


def save(model: ir.Model, path: str | Path, *, external_data: bool | None = None) -> Path:
    """Write `model` to `path` (file or folder) atomically; returns the .onnx file written."""
    require_model("save", model)
    path = Path(path)
    as_folder = is_folder_output(path)
    _refuse_overwriting_sources(model, path, as_folder)
    check_output(path)
    onnx_name = MODEL_FILE if as_folder else path.name
    parent = path.resolve().parent
    if external_data is None:
        external_data = model_bytes(model) >= PROTOBUF_LIMIT_BYTES - (64 << 20)

    artifact = model.clone() if external_data else with_weights_in_memory(model.clone())
    for key in _SOURCE_METADATA:
        artifact.metadata_props.pop(key, None)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as error:
        raise XoptError(f"{path}: cannot write in {parent} ({first_line(error)})") from None
    try:
        ir.save(
            artifact,
            staging / onnx_name,
            external_data=f"{onnx_name}.data" if external_data else None,
            size_threshold_bytes=EXTERNAL_DATA_THRESHOLD_BYTES,
        )
        check_loads(staging / onnx_name)
        if as_folder:
            save_tokenizer_and_config(model, staging)
            os.chmod(staging, 0o777 & ~_umask())  # a folder as `mkdir` makes it, not mkdtemp's 0700
            replace_folder(staging, path.resolve())
            return path / onnx_name
        for produced in sorted(staging.iterdir(), key=lambda p: p.suffix == ".onnx"):  # .onnx last
            os.replace(produced, parent / produced.name)
        return path
    except OSError as error:
        raise XoptError(f"{path}: cannot write ({first_line(error)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_output(path: Path) -> None:
    """Refuse, before any work, an output `save` could not write: the current folder, a folder named
    .onnx, a mistyped file name, a parent that is missing or read-only, a folder holding no model."""
    if path.resolve() == Path.cwd() or path.resolve() in Path.cwd().parents:
        raise XoptError(f"{path}: is the current folder or holds it; give the output a name of its own")
    as_folder = is_folder_output(path)
    if as_folder and path.suffix.lower() in _OTHER_FILE_SUFFIXES and not path.is_dir():
        raise XoptError(f"{path}: names a {path.suffix} file; the output is an .onnx file or a folder")
    if not as_folder and path.is_dir():
        raise XoptError(f"{path}: is a folder; an .onnx output is a file")
    check_writable(path)
    if as_folder:
        check_replaceable_folder(path)


def check_writable(path: Path) -> Path:
    """The folder `path` will be written in, after proving a file can be created there."""
    parent = path.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise XoptError(f"{path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise XoptError(f"{path}: folder {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise XoptError(f"{path}: cannot write in {parent} ({first_line(error)})") from None
    return parent


def write_text_atomically(path: Path, text: str) -> None:
    """A small text file (a report) written whole or not at all, with the mode `open` would give it."""
    with tempfile.NamedTemporaryFile("w", dir=path.resolve().parent, delete=False, suffix=".tmp") as file:
        file.write(text)
    os.chmod(file.name, 0o666 & ~_umask())
    os.replace(file.name, path)


def check_replaceable_folder(path: Path) -> None:
    """Refuse a folder output that would delete something other than a previous model folder."""
    if not path.exists():
        return
    if not path.is_dir():
        raise XoptError(f"{path}: exists and is not a folder")
    if any(path.iterdir()) and not (path / MODEL_FILE).is_file():
        raise XoptError(
            f"{path}: folder exists and holds no {MODEL_FILE}; an output folder is replaced whole, "
            "so give a new or empty folder"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_folder(staging: Path, target: Path) -> None:
    """Move the finished folder into place; an existing target is swapped out, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _refuse_overwriting_sources(model: ir.Model, path: Path, as_folder: bool) -> None:
    """Refuse an output that would replace the file the model was read from or one it still reads
    its weights from, or (a folder) the Hugging Face folder it was captured from."""
    target = path.resolve()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        source = Path(tensor.path).resolve()
        inside = target in source.parents if as_folder else source in (target, Path(f"{target}.data"))
        if inside:
            raise XoptError(f"{path}: output would overwrite the input model's weights ({source.name})")
    source_file = model.metadata_props.get("xopt.source_file")
    if source_file and (target in Path(source_file).parents if as_folder else target == Path(source_file)):
        raise XoptError(f"{path}: output would overwrite the input model ({source_file})")
    folder = model.metadata_props.get("xopt.hf_folder")
    if as_folder and folder and (target == Path(folder) or target in Path(folder).parents):
        raise XoptError(f"{path}: output would replace the folder the model was read from ({folder})")

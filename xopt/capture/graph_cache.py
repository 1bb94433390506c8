"""The captured-graph cache: a Hugging Face folder's export, kept without its weights.

Capturing traces the model twice (torch.export, then the decomposition to core ATen): SmolLM2's
capture takes 16–17 s with two layers traced and the others stamped (`layer_stamping`), 55–59 s
with every layer traced. What it gives depends only on the folder's files and on the code that
captured it, so the captured ONNX graph is kept in the cache folder (`xopt.cache`), each
initializer that is one of the model's own parameters (the same tensor as a state-dict entry)
stored as a reference instead of its bytes: external data whose location is `state_dict:<key>`.
Buffers the state dict lacks (rotary inverse frequencies, position-id tables) are stored as they
are. A later capture of the same folder loads the model's weights as before (they are needed
either way), reads the graph (a few MB) and points each reference at its parameter: the model
the export gave, without tracing.

Key: the folder (resolved path; each file's name, size and modification time), the GGUF file,
the versions of Python, torch, transformers, onnxscript and onnx-ir, and a hash of the capture
code (`xopt/capture/*.py`, `xopt/kv_cache.py`). At most `KEEP` graphs are kept, the least
recently used dropped first. A graph that cannot be read, or whose references the weights do not
match, is captured anew as if it were not there; a cache that cannot be written costs only the
next capture's time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path

import onnx
import onnx_ir as ir

from xopt.cache import cache_dir, drop_least_recent

logger = logging.getLogger(__name__)

FOLDER = "captures"  # under the cache folder
KEEP = 8  # graphs kept (SmolLM2's: 13 MB, MiniLM's: 1 MB)
REFERENCE = "state_dict:"  # an external-data location naming the state-dict entry that holds the tensor
_CODE = (*sorted(Path(__file__).parent.glob("*.py")), Path(__file__).parents[1] / "kv_cache.py")
_LIBRARIES = ("torch", "transformers", "onnxscript", "onnx-ir")
# torch dtypes of the parameters kept as references: those numpy has (`load` hands the tensor's
# memory to ir.Tensor as a numpy array; a bfloat16 one is stored as it is)
_AS_NUMPY = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


def folder_files(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """The files of `folder` as (name, size, modification time): what says it is unchanged."""
    stats = ((p.name, p.stat()) for p in folder.iterdir() if p.is_file())
    return tuple(sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats))


def capture_key(folder: Path, gguf_file: str | None) -> str:
    """What the captured graph of `folder` depends on, hashed."""
    code = hashlib.sha256(b"".join(path.read_bytes() for path in _CODE)).hexdigest()
    versions = [metadata.version(name) for name in _LIBRARIES]
    parts = (str(folder.resolve()), gguf_file, folder_files(folder), sys.version_info[:2], versions, code)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def load(key: str, state_dict: Mapping[str, object]) -> ir.Model | None:
    """The graph captured under `key`, its references pointed at `state_dict`'s tensors; None if
    there is none, or it cannot be read, or a reference finds no tensor of its shape and type."""
    path = _path(key)
    if not path.is_file():
        return None
    try:
        model = ir.serde.deserialize_model(onnx.load(path, load_external_data=False))
        for value in model.graph.initializers.values():
            stored = value.const_value
            if isinstance(stored, ir.ExternalTensor) and str(stored.location).startswith(REFERENCE):
                value.const_value = _parameter(stored, state_dict)
        os.utime(path)  # recently used
    except Exception as error:  # a damaged or stale file is captured anew and written over
        logger.debug("the cached graph %s is not used: %s", path, error)
        return None
    logger.info("captured graph read from the cache (%s)", path)
    return model


def store(key: str, model: ir.Model, state_dict: Mapping[str, object]) -> None:
    """Keep `model` (just exported from the module whose `state_dict` is given) under `key`, its
    parameters as references; `model` is left as it was."""
    path = _path(key)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _parameters_as_references(model, state_dict):
            data = ir.serde.serialize_model(model).SerializeToString()
        path.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(data)
        os.replace(staged, path)
        drop_least_recent(path.parent.glob("*.onnx"), KEEP)
    except Exception as error:  # caching is best effort: the capture itself succeeded
        logger.debug("the captured graph is not cached: %s", error)
    finally:
        with contextlib.suppress(OSError):
            staged.unlink(missing_ok=True)


def _path(key: str) -> Path:
    return cache_dir() / FOLDER / f"{key}.onnx"


def _parameter(stored: ir.ExternalTensor, state_dict: Mapping[str, object]) -> ir.Tensor:
    name = str(stored.location).removeprefix(REFERENCE)
    tensor = state_dict.get(name)
    if tensor is None:
        raise KeyError(f"no state-dict entry {name}")
    array = tensor.detach().numpy()
    if ir.DataType.from_numpy(array.dtype) != stored.dtype or array.shape != stored.shape.numpy():
        raise ValueError(f"{name} is {array.dtype}{list(array.shape)}, the graph wants {stored.dtype}{stored.shape}")
    return ir.Tensor(array, name=stored.name)


@contextlib.contextmanager
def _parameters_as_references(model: ir.Model, state_dict: Mapping[str, object]) -> Iterator[None]:
    """Within the block, each initializer that is a state-dict tensor (same storage, shape,
    strides and type: the exporter wraps the parameters without copying them) is a reference."""
    import torch

    entries = {}
    for name, tensor in state_dict.items():
        if str(tensor.dtype).removeprefix("torch.") in _AS_NUMPY:
            entries.setdefault((tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype), name)
    swapped = []
    try:
        for value in model.graph.initializers.values():
            raw = getattr(value.const_value, "raw", None)
            if not isinstance(raw, torch.Tensor):
                continue
            name = entries.get((raw.data_ptr(), raw.shape, raw.stride(), raw.dtype))
            if name is None:
                continue
            stored = value.const_value
            swapped.append((value, stored))
            reference = REFERENCE + name
            value.const_value = ir.ExternalTensor(
                reference, offset=0, length=stored.nbytes, dtype=stored.dtype, shape=stored.shape, name=value.name
            )
        yield
    finally:
        for value, stored in swapped:
            value.const_value = stored

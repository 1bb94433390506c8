"""Sample inputs generated from a model's graph inputs, for verification and probing.

Symbolic axes are bound by name where they have one (`*past*` → the past length P, `*total*` →
P + S, `*batch*` → the batch, a sum of such names or numbers → its sum), otherwise by position:
the first is the batch, the others the sequence S. Values follow the input's name: `*mask*` →
ones (with right padding on all but the first row when `padded`), `*position*` → P..P+S−1,
`*token_type*` → zeros, other integers → token ids drawn below the vocabulary size of the
embedding table they index, floats (a KV cache's past keys and values too) → standard normal.

`verification_inputs` are what the pipeline checks a pass on: a padded batch; for a decoder with
a KV cache, the three workloads it runs: prefill of a padded batch on an empty cache, one decode
step of that batch on a short past, and several new tokens of one sequence on a past (batch 1:
ONNX Runtime's GroupQueryAttention refuses several new tokens on a past for a larger batch).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from xopt import kv_cache
from xopt.errors import XoptError

DEFAULT_BATCH, DEFAULT_SEQUENCE = 2, 16
VERIFY_PAST = 3


def verification_inputs(model: ir.Model) -> list[dict[str, np.ndarray]]:
    """The input sets a pass is checked on (a past of `VERIFY_PAST` tokens where there is one)."""
    if not kv_cache.has_kv_cache(model):
        return [sample_inputs(model, padded=True)]
    return [
        sample_inputs(model, padded=True),
        sample_inputs(model, padded=True, sequence=1, past=VERIFY_PAST),
        sample_inputs(model, batch=1, past=VERIFY_PAST),
    ]


def fit_inputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` for a model a pass has changed: inputs it no longer has are left out, and an axis
    it narrowed (the KV cache of an attention that lost heads) keeps its first entries."""
    fitted = {}
    for value in model.graph.inputs:
        if value.name not in feeds:
            continue
        array = feeds[value.name]
        if value.shape is not None and len(value.shape) == array.ndim:
            dims = zip(value.shape, array.shape, strict=True)
            cut = tuple(slice(0, d) if isinstance(d, int) and d < n else slice(None) for d, n in dims)
            array = array[cut]
        fitted[value.name] = array
    return fitted


def sample_inputs(
    model: ir.Model,
    *,
    batch: int = DEFAULT_BATCH,
    sequence: int = DEFAULT_SEQUENCE,
    past: int = 0,
    padded: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One array per graph input, reproducible for a given seed."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        shape = _concrete_shape(value, batch, sequence, past)
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        name = value.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in name:
            feeds[value.name] = _mask(shape, dtype, padded)
        elif "position" in name:
            positions = np.arange(past, past + shape[-1], dtype=dtype)
            feeds[value.name] = np.broadcast_to(positions, shape).copy()
        elif "token_type" in name or dtype == np.bool_:
            feeds[value.name] = np.zeros(shape, dtype) if dtype != np.bool_ else np.ones(shape, dtype)
        else:
            feeds[value.name] = rng.integers(0, _index_bound(value), size=shape).astype(dtype)
    return feeds


def text_feeds(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Complete `input_ids` and `attention_mask` of tokenized text into the model's inputs: an
    empty KV cache, position ids 0..S−1 and zero token types when it asks for them; any other
    unknown input is refused."""
    filled = {**kv_cache.empty_cache(model, len(feeds["input_ids"])), **feeds}
    for value in model.graph.inputs:
        if value.name in filled:
            continue
        if "position" in value.name:
            sequence = feeds["input_ids"].shape[1]
            filled[value.name] = np.broadcast_to(np.arange(sequence, dtype=np.int64), feeds["input_ids"].shape).copy()
        elif "token_type" in value.name:
            filled[value.name] = np.zeros_like(feeds["input_ids"])
        else:
            raise XoptError(f"cannot feed input {value.name!r} from text")
    return filled


def _concrete_shape(value: ir.Value, batch: int, sequence: int, past: int) -> tuple[int, ...]:
    if value.shape is None:
        return (batch, sequence)
    dims, seen_symbolic = [], 0
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
            continue
        name = str(dim.value).lower() if dim.value else ""
        unnamed = batch if seen_symbolic == 0 else sequence
        dims.append(sum(_term_size(term.strip(), unnamed, batch, sequence, past) for term in name.split("+")))
        seen_symbolic += 1
    return tuple(dims)


def _term_size(term: str, unnamed: int, batch: int, sequence: int, past: int) -> int:
    """The size of one term of a symbolic dim's name (Optimum names the mask's axis
    `past_sequence_length + sequence_length`)."""
    if term.isdigit():
        return int(term)
    if "past" in term:
        return past
    if "total" in term:
        return past + sequence
    if "batch" in term:
        return batch
    return unnamed


def _mask(shape: tuple[int, ...], dtype: np.dtype, padded: bool) -> np.ndarray:
    mask = np.ones(shape, dtype)
    if padded and len(shape) == 2 and shape[1] > 2:
        for row in range(1, shape[0]):
            mask[row, shape[1] - max(1, shape[1] * row // (2 * shape[0])) :] = 0
    return mask


_INDEX_PRESERVING_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity"})


def _index_bound(value: ir.Value) -> int:
    """The row count of the smallest constant table this input gathers from, also through
    reshapes and casts (GPT-2 views its ids first); 100 when it indexes no table."""
    bounds, pending = [], [value]
    while pending:
        current = pending.pop()
        for node, index in current.uses():
            if node.op_type in _INDEX_PRESERVING_OPS and index == 0:
                pending.append(node.outputs[0])
            elif node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
                table = node.inputs[0].const_value
                if table is not None and len(table.shape) >= 1:
                    bounds.append(int(table.shape[0]))
    return min(bounds, default=100)

"""A weight stored twice, once transposed, is stored once: B = Aᵀ is read as Transpose(A).

A tied LM head shares the embedding table E [vocab, d]; TorchScript writes the head's weight out
as its own initializer Eᵀ [d, vocab] (Hugging Face Optimum's SmolLM2: 113 MB of a 651 MB file).
Exact: Transpose(E) holds the same values as the copy, and the file keeps one table; ONNX Runtime
folds the Transpose when it loads the model (as for xopt's own captures of tied models, and
`cleanup` leaves a Transpose of a weight with other readers unfolded). A pair is compared in full
only when a row of one equals a column of the other, and only for non-square weights of at least
`MIN_ELEMENTS`; the one kept is the taller (the table a Gather reads).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MIN_ELEMENTS = 1024


def share_transposed_duplicates(graph: ir.Graph) -> int:
    """Replace each wide weight that is the transpose of a tall one; returns how many."""
    tall: dict[tuple[tuple[int, int], ir.DataType], list[ir.Value]] = {}
    wide = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or len(tensor.shape) != 2 or tensor.size < MIN_ELEMENTS:
            continue
        rows, columns = tensor.shape
        if rows > columns:
            tall.setdefault(((rows, columns), tensor.dtype), []).append(value)
        elif rows < columns:
            wide.append(value)
    shared = 0
    for copy in wide:
        rows, columns = copy.const_value.shape
        candidates = tall.get(((columns, rows), copy.const_value.dtype), [])
        source = next((t for t in candidates if _transposed(copy, t)), None)
        if source is None or copy.is_graph_output() or copy in graph.inputs or not copy.uses():
            continue
        transpose = ir.node("Transpose", [source], attributes={"perm": [1, 0]})
        graph.insert_before(next(iter(graph)), transpose)
        copy.replace_all_uses_with(transpose.outputs[0])
        graph.initializers.pop(copy.name)
        shared += 1
    return shared


def _transposed(copy: ir.Value, source: ir.Value) -> bool:
    b, a = copy.const_value.numpy(), source.const_value.numpy()
    return bool(np.array_equal(b[0], a[:, 0]) and np.array_equal(b, a.T))

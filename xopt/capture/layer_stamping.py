"""Capture a deep model by tracing its first layers and stamping copies of them for the others.

torch.export traces every layer of a model, and its decomposition to core ATen traces them again
(SmolLM2's 30 layers: ~50 s of a ~57 s capture), though most transformers run the same code in
every layer on weights of their own. Where a model's layers are one `nn.ModuleList` of alike
modules (one class; the same parameter and buffer names, shapes and types) whose kinds in the
config's `layer_types` (sliding or full attention) repeat with a period p (1 where all are of one
kind; Gemma-2: 2; Gemma-3: 6), the model cut to its first p + 1 layers is traced, and layers
p+1…L−1 are copies of layers 1…p's parts of that graph, layer i of layer ((i − 1) mod p) + 1's:

- layer j's part: the nodes that depend on one of its own inputs (the hidden state layer j−1
  hands it, its weights, its cache inputs `past_key_values.j.*`) and that one of its own outputs
  depends on (the hidden state it hands on, `present.j.*`); a node that reads only the shape of
  such a value is not one of them (alike layers have inputs of one shape). What else those nodes
  read (the masks and rotary tables of the layer's kind, constants, shapes) is shared by every
  layer that copies it.
- layer i is that part reading layer i−1's hidden state, layer i's weights (the model's own
  parameter tensors, as the exporter holds them) and `past_key_values.i.*`, and giving
  `present.i.*`; the module paths in its nodes' metadata name layer i.
- what read layer p's hidden state (the final norm) reads layer L−1's.

A trace of the cut model that fails is the model's failure (every layer traced fails alike), but
a failure of the stamping itself (a graph it does not foresee) falls back to the whole trace.

The stamped graph is kept only if it computes what the model does: on the example inputs, each of
its outputs in ONNX Runtime must match the module's own within a relative RMS difference of
`TOLERANCE` = 1e-4 (float rounding: SmolLM2's logits 1.4e-5, where their largest difference is
4.7e-5 of their largest magnitude; a layer whose code depends on its index, such as GPT-2's
`scale_attn_by_inverse_layer_idx`, moved a random 3-layer model's logits by 1.4e-3). Otherwise,
and wherever the layers are not alike, every layer is traced.

SmolLM2 (`xopt.load(folder, capture_cache=False)`, two fresh processes per form, alternated):
16–17 s against 55–59 s with every layer traced; its outputs on padded inputs with a cache equal
the whole trace's to the bit, and `xopt optimize` gives the same operators and weights. MiniLM's
6 layers: 8.1 s against 9.2 s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from xopt import kv_cache
from xopt.capture.torch_export import ExportCall
from xopt.errors import first_line

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # relative RMS difference of an output from the module's
# ops that read only their input's shape: the shape of a layer's own input (its hidden state, a
# weight, a cache input) is the same in every layer of alike layers, so what such a node computes
# is shared (the whole trace computes the total length once, not per layer)
_SHAPE_READERS = frozenset({"Shape", "Size"})
_SCOPES = "pkg.torch.onnx.name_scopes"  # the module paths a node came from, as the exporter records them


class _NotStampable(Exception):
    """Why the traced layers cannot stand for the others."""


@dataclass(frozen=True)
class _Layers:
    path: str  # of the ModuleList in the model
    modules: Any  # the ModuleList
    period: int  # of their kinds: layer i is of layer i − period's


def export_with_stamped_layers(model: Any, call_of: Callable[[Any], ExportCall]) -> ir.Model:
    """The graph of `call_of(model)`: traced with one period of layers and the next and stamped
    where the model's layers are alike and the stamped graph matches the module, else traced whole."""
    layers = _alike_layers(model)
    if layers is None:
        return call_of(model).export()
    with _cut_to(model, layers, layers.period + 1):
        traced = call_of(model).export()
    whole = call_of(model)
    try:
        stamped = _stamp(traced, whole, layers)
        error = _checked_error(stamped, whole)
    except _NotStampable as reason:
        logger.info("every layer traced: the copies of the traced layers do not stand for them (%s)", reason)
        return whole.export()
    except Exception as error:  # a graph the stamping does not foresee; tracing every layer still captures it
        logger.warning("every layer traced: stamping failed (%s: %s)", type(error).__name__, first_line(error))
        return whole.export()
    traced_layers = "layer 1" if layers.period == 1 else f"layers 1-{layers.period}"
    logger.info(
        "layers %d-%d stamped from the trace of %s (outputs within %.2g of the module's, relative RMS)",
        layers.period + 1,
        len(layers.modules) - 1,
        traced_layers,
        error,
    )
    return stamped


def _alike_layers(model: Any) -> _Layers | None:
    """The model's list of alike layers, if it has one, and more layers than one period of their
    kinds and the layer after it."""
    import torch

    config = model.config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        return None
    kinds = list(getattr(config, "layer_types", None) or [None] * count)
    period = next(p for p in range(1, count + 1) if kinds[p:] == kinds[:-p])  # count itself: no repetition
    if period + 1 >= count:
        return None
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        return None
    path, modules = found[0]
    signatures = {(type(m), _signature(m.named_parameters()), _signature(m.named_buffers())) for m in modules}
    return _Layers(path, modules, period) if len(signatures) == 1 else None


def _signature(tensors: Iterable[tuple[str, Any]]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in tensors)


@contextlib.contextmanager
def _cut_to(model: Any, layers: _Layers, keep: int) -> Iterator[None]:
    """Within the block, the model has only its first `keep` layers (its config says so too)."""
    import torch

    parent_path, _, attribute = layers.path.rpartition(".")
    parent, config = model.get_submodule(parent_path), model.config.get_text_config()
    count, kinds = config.num_hidden_layers, getattr(config, "layer_types", None)
    setattr(parent, attribute, torch.nn.ModuleList(list(layers.modules)[:keep]))
    config.num_hidden_layers = keep
    if kinds is not None:
        config.layer_types = kinds[:keep]
    try:
        yield
    finally:
        setattr(parent, attribute, layers.modules)
        config.num_hidden_layers = count
        if kinds is not None:
            config.layer_types = kinds


@dataclass
class _LayerPart:
    """A traced layer's part of the graph: its own inputs, its own outputs and the nodes between them."""

    layer: int
    hidden_in: ir.Value  # from the layer before
    weights: list[ir.Value]
    pasts: dict[str, ir.Value]  # by kind (key, value); none in an encoder
    hidden_out: ir.Value  # to what comes after the layers
    presents: dict[str, ir.Value]
    nodes: list[ir.Node]  # in graph order


def _stamp(traced: ir.Model, whole: ExportCall, layers: _Layers) -> ir.Model:
    """`traced` (the model cut to layers 0…p) grown to every layer by copies of layers 1…p's parts."""
    path = next(p for p, m in whole.module.named_modules() if m is layers.modules)  # in the exported module
    tensors = dict(whole.module.named_parameters(remove_duplicate=False))
    tensors.update(whole.module.named_buffers(remove_duplicate=False))
    graph = traced.graph
    parts = [_layer_part(graph, path, j) for j in range(1, layers.period + 1)]
    last = parts[-1]
    tail = [(user, index) for user, index in last.hidden_out.uses() if user not in last.nodes]
    layer_indices = [re.compile(rf"(?<={re.escape(path)}\.){part.layer}(?![0-9])") for part in parts]
    hidden = last.hidden_out
    for layer in range(layers.period + 1, len(layers.modules)):
        j = (layer - 1) % layers.period
        hidden = _add_copy(graph, parts[j], hidden, layer, functools.partial(layer_indices[j].sub, str(layer)), tensors)
    for user, index in tail:
        user.replace_input_with(index, hidden)
    if last.hidden_out.is_graph_output():  # an encoder's last hidden state
        name, last.hidden_out.name = last.hidden_out.name, None
        graph.outputs[graph.outputs.index(last.hidden_out)], hidden.name = hidden, name
    graph.sort()
    return traced


def _add_copy(
    graph: ir.Graph, part: _LayerPart, hidden: ir.Value, layer: int, renamed: Callable[[str], str], tensors: dict
) -> ir.Value:
    """Add layer `layer`, a copy of `part` reading `hidden`, to `graph`; its hidden state out.
    `renamed` turns the traced layer's module paths into this layer's."""
    mapping: dict[ir.Value, ir.Value] = {part.hidden_in: hidden}
    for weight in part.weights:
        mapping[weight] = _stamped_weight(graph, weight, renamed(weight.name), tensors)
    for kind, past in part.pasts.items():
        mapping[past] = _value_like(past, kv_cache.past_name(layer, kind))
        graph.inputs.append(mapping[past])
    for node in part.nodes:
        outputs = [_value_like(v, f"{v.name}_layer{layer}") for v in node.outputs]
        mapping.update(zip(node.outputs, outputs, strict=True))
        graph.append(
            ir.Node(
                node.domain,
                node.op_type,
                [mapping.get(v, v) if v is not None else None for v in node.inputs],
                [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                overload=node.overload,
                outputs=outputs,
                version=node.version,
                name=f"{node.name}_layer{layer}",
                doc_string=node.doc_string,
                metadata_props={key: renamed(text) for key, text in node.metadata_props.items()},
            )
        )
    for kind, present in part.presents.items():
        mapping[present].name = kv_cache.present_name(layer, kind)
        graph.outputs.append(mapping[present])
    return mapping[part.hidden_out]


def _layer_part(graph: ir.Graph, path: str, layer: int) -> _LayerPart:
    """Layer `layer`'s part of `graph`: the nodes that depend on one of its own inputs and that one
    of its own outputs depends on. Its nodes (by the module paths the exporter records) read one
    value that the layer before computes, and give one that is read after them or is the graph's
    output."""

    def in_layer(node: ir.Node, index: int) -> bool:
        return f"'{path}.{index}'" in node.metadata_props.get(_SCOPES, "")

    pasts = _cache_values(graph.inputs, kv_cache.PAST_PATTERN, layer)
    presents = _cache_values(graph.outputs, kv_cache.PRESENT_PATTERN, layer)
    computed = [n for n in graph if in_layer(n, layer) and n.inputs]  # not its constants
    hidden_in = _one(
        {v for n in computed for v in n.inputs if (p := v and v.producer()) and p.inputs and in_layer(p, layer - 1)},
        f"values of layer {layer - 1} that layer {layer} reads",
    )
    feeding_the_layer = _ancestors(computed)
    hidden_out = _one(
        {
            v
            for n in computed
            for v in n.outputs
            if v not in presents.values()
            and (v.is_graph_output() or any(u not in feeding_the_layer for u, _ in v.uses()))
        },
        f"values of layer {layer} read after it",
    )
    weights = [v for name, v in graph.initializers.items() if name.startswith(f"{path}.{layer}.")]
    between = _descendants([hidden_in, *weights, *pasts.values()])
    between &= _ancestors(v.producer() for v in (hidden_out, *presents.values()))
    nodes = [n for n in graph if n in between]
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in nodes for a in n.attributes.values()):
        raise _NotStampable(f"layer {layer} holds a subgraph")
    return _LayerPart(layer, hidden_in, weights, pasts, hidden_out, presents, nodes)


def _cache_values(values: Iterable[ir.Value], pattern: re.Pattern, layer: int) -> dict[str, ir.Value]:
    """A layer's cache inputs or outputs by kind (key, value); none in an encoder."""
    matches = ((pattern.match(v.name or ""), v) for v in values)
    return {m.group(2): v for m, v in matches if m and m.group(1) == str(layer)}


def _stamped_weight(graph: ir.Graph, weight: ir.Value, name: str, tensors: dict[str, Any]) -> ir.Value:
    """An initializer `name` holding the module's tensor of that name, as the exporter holds one."""
    import torch

    tensor, held = tensors.get(name), weight.const_value
    if tensor is None or not isinstance(getattr(held, "raw", None), torch.Tensor):
        raise _NotStampable(f"{name} is not a tensor of the module")
    stamped = type(held)(tensor, name=name)
    if stamped.dtype != held.dtype or stamped.shape != held.shape:
        raise _NotStampable(f"{name} is {stamped.dtype}{stamped.shape}, the traced layer's {held.dtype}{held.shape}")
    value = ir.Value(name=name, shape=ir.Shape(stamped.shape), type=ir.TensorType(stamped.dtype), const_value=stamped)
    graph.register_initializer(value)
    return value


def _value_like(value: ir.Value, name: str) -> ir.Value:
    shape = ir.Shape(value.shape) if value.shape is not None else None
    return ir.Value(name=name, shape=shape, type=value.type, metadata_props=dict(value.metadata_props))


def _one(values: set[ir.Value], what: str) -> ir.Value:
    if len(values) != 1:
        raise _NotStampable(f"{len(values)} {what}, not one")
    return next(iter(values))


def _descendants(values: Iterable[ir.Value]) -> set[ir.Node]:
    """The nodes that read `values`' contents, and the nodes that read theirs (not their shape)."""
    found: set[ir.Node] = set()
    pending = list(values)
    while pending:
        for user, _ in pending.pop().uses():
            if user not in found and user.op_type not in _SHAPE_READERS:
                found.add(user)
                pending.extend(user.outputs)
    return found


def _ancestors(nodes: Iterable[ir.Node | None]) -> set[ir.Node]:
    found: set[ir.Node] = set()
    pending = [n for n in nodes if n is not None]
    while pending:
        node = pending.pop()
        if node in found:
            continue
        found.add(node)
        pending.extend(p for v in node.inputs if v is not None and (p := v.producer()) is not None)
    return found


def _checked_error(stamped: ir.Model, whole: ExportCall) -> float:
    """The largest relative RMS difference of an output of `stamped` in ONNX Runtime from the
    module's on the example inputs, ‖got − want‖ / ‖want‖; raises over `TOLERANCE`."""
    from xopt.verify import reference_outputs

    expected = whole.outputs()
    actual = reference_outputs(stamped, whole.feeds())
    worst = 0.0
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or got.shape != want.shape:
            raise _NotStampable(f"{name} is missing or of another shape")
        error = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), np.finfo(np.float32).tiny))
        if error > TOLERANCE:
            raise _NotStampable(f"{name} differs from the module's by {error:.3g} of its norm")
        worst = max(worst, error)
    return worst

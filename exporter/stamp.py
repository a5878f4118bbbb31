"""Deep decoders traced once at two layers, then the second layer stamped out for the rest.

torch.export's symbolic-shape tracing costs ~3 s per layer on this machine (1.5 min for SmolLM2's
30 layers), while every layer of the decoder is the same computation with other weights. So the
exporter traces a two-layer copy and clones layer 1's nodes for layers 2..N-1, renaming:

- tensors made inside layer 1 get a ``__layers.{i}`` suffix (``present.1.*`` becomes ``present.{i}.*``);
- layer 1's input (the residual stream out of layer 0) becomes layer ``i-1``'s output;
- ``layers.1.*`` weights become ``layers.{i}.*``, built from the torch parameters by the rule that
  reproduces layer 1's traced weights byte for byte (``*.weight_t`` = the parameter transposed);
- ``past_key_values.1.*`` becomes ``past_key_values.{i}.*``; everything else (RoPE cos/sin, the
  attention bias, shape constants) is shared, as in a full trace.

Anything the rules do not explain (a layer-1 constant not named ``layers.1.*``, a weight whose bytes
differ from the rule's) makes :func:`stamp_layers` return ``False`` and the caller traces in full.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from gptedge.exporter.model import Decoder
from gptedge.runtime import contract
from gptedge.runtime.graph import GraphIndex, sort_graph
from gptedge.runtime.onnx_io import SharedWeightsWriter

log = logging.getLogger(__name__)

TRACED_LAYERS = 2


class _Layer:
    """Layer ``index``'s nodes in the two-layer graph and the tensors crossing its border."""

    def __init__(self, graph: onnx.GraphProto, index: int):
        prefix = f"/layers.{index}/"
        self.nodes = [node for node in graph.node if node.name.startswith(prefix)]
        self._absorb_unscoped(graph)
        self.made = {out for node in self.nodes for out in node.output}
        self.reads = {name for node in self.nodes for name in node.input if name and name not in self.made}
        # the residual stream enters through the block's first norm (the Pow / LayerNormalization input)
        inputs = [name for node in self.nodes if node.name.startswith(prefix + "attn_norm/")
                  for name in node.input[:1] if name not in self.made]
        self.stream_in = inputs[0] if inputs and len(set(inputs)) == 1 else None

    def _absorb_unscoped(self, graph: onnx.GraphProto) -> None:
        """Add the nodes torch left without a module scope (``/Split_2`` of a layer's ``chunk``)
        that read only this layer's tensors (or constants) and feed only this layer."""
        index = GraphIndex(graph.node)
        while True:
            members = {node.name for node in self.nodes}
            made = {out for node in self.nodes for out in node.output}
            extra = [node for node in graph.node if node.name not in members and _unscoped(node)
                     and any(name in made for name in node.input)
                     and all(name in made or name not in index.producer for name in node.input)
                     and all({n.name for n in index.readers(out)} <= members for out in node.output)]
            if not extra:
                return
            self.nodes.extend(extra)


def _unscoped(node: onnx.NodeProto) -> bool:
    return node.name.count("/") == 1  # "/Split_2": no module path before the op name


def first_layers(decoder: Decoder, count: int = TRACED_LAYERS) -> Decoder:
    """A shallow copy of ``decoder`` keeping its first ``count`` layers (the weights are shared)."""
    small = copy.copy(decoder)
    small._modules = dict(decoder._modules)  # copy.copy shares the module dict; keep the original intact
    small.layers = torch.nn.ModuleList(list(decoder.layers)[:count])
    small.arch = dataclasses.replace(decoder.arch, num_layers=count)
    return small


def stamp_layers(model: onnx.ModelProto, params: dict[str, torch.Tensor], num_layers: int,
                 writer: SharedWeightsWriter | None) -> bool:
    """Grow the traced two-layer ``model`` to ``num_layers`` layers in place (see module docstring).

    ``params``: the full decoder's state dict (fp32). Returns ``False``, leaving ``model`` as it
    was, when the graph does not follow the stamping rules."""
    graph = model.graph
    first, second = _Layer(graph, 0), _Layer(graph, 1)
    stream_out = _stream_out(graph, second)
    inits = {init.name: init for init in graph.initializer}
    weights = sorted(name for name in second.reads if name.startswith("layers.1."))
    unexplained = [name for name in second.reads if name in inits and name not in weights
                   and name not in first.reads]
    if second.stream_in is None or stream_out is None or unexplained:
        log.info("layer stamping not possible (%s); tracing every layer", unexplained or "no stream tensors")
        return False
    if any(not _rule_matches(inits[name], _weight(params, name, 1), writer) for name in weights):
        log.info("layer stamping rule does not reproduce layer 1's weights; tracing every layer")
        return False
    inside = {node.name for node in second.nodes}
    final_readers = [node for node in graph.node if stream_out in node.input and node.name not in inside]
    previous_out = stream_out
    for layer in range(TRACED_LAYERS, num_layers):
        rename = _renames(second, layer, previous_out)
        graph.node.extend(_clone(node, rename, layer) for node in second.nodes)
        for name in weights:
            graph.initializer.append(_stored(_weight(params, name, layer), rename[name], writer))
        previous_out = rename[stream_out]
    for node in final_readers:  # the final norm now reads the last stamped layer's output
        node.input[:] = [previous_out if name == stream_out else name for name in node.input]
    _contract_io(graph, num_layers)
    sort_graph(graph)
    return True


def _stream_out(graph: onnx.GraphProto, layer: _Layer) -> str | None:
    """The tensor layer 1 makes that the rest of the graph (the final norm) reads."""
    inside = {node.name for node in layer.nodes}
    read_outside = {name for node in graph.node if node.name not in inside for name in node.input}
    outputs = {value.name for value in graph.output}
    candidates = (layer.made & read_outside) - outputs
    return candidates.pop() if len(candidates) == 1 else None


def _renames(layer: _Layer, index: int, stream_in: str) -> dict[str, str]:
    assert layer.stream_in is not None  # stamp_layers stops before stamping a layer without one
    rename = {layer.stream_in: stream_in}
    for name in layer.made:
        rename[name] = name.replace("present.1.", f"present.{index}.") if name.startswith("present.1.") \
            else f"{name}__layers.{index}"
    for name in layer.reads:
        if name.startswith("layers.1."):
            rename[name] = f"layers.{index}." + name.removeprefix("layers.1.")
        elif name.startswith("past_key_values.1."):
            rename[name] = name.replace("past_key_values.1.", f"past_key_values.{index}.")
    return rename


def _clone(node: onnx.NodeProto, rename: dict[str, str], index: int) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = (f"/layers.{index}" + node.name if _unscoped(node)
                 else node.name.replace("/layers.1/", f"/layers.{index}/", 1))
    copy.input[:] = [rename.get(name, name) for name in node.input]
    copy.output[:] = [rename.get(name, name) for name in node.output]
    return copy


def _weight(params: dict[str, torch.Tensor], name: str, index: int) -> np.ndarray:
    """The traced initializer ``name`` (a ``layers.1.*`` name) for layer ``index``, from torch."""
    key = f"layers.{index}." + name.removeprefix("layers.1.")
    if key.endswith(".weight_t"):
        return params[key.removesuffix("_t")].detach().t().contiguous().numpy()
    return params[key].detach().numpy()


def _rule_matches(traced: onnx.TensorProto, value: np.ndarray, writer: SharedWeightsWriter | None) -> bool:
    if list(traced.dims) != list(value.shape) or traced.data_type != onnx.TensorProto.FLOAT:
        return False
    if traced.data_location == onnx.TensorProto.EXTERNAL:
        where = {entry.key: entry.value for entry in traced.external_data}
        stored = writer.find(value.astype(np.float32).tobytes(), traced.data_type) if writer else None
        return stored == (int(where.get("offset", 0)), int(where["length"]))
    return np.array_equal(numpy_helper.to_array(traced), value)


def _stored(value: np.ndarray, name: str, writer: SharedWeightsWriter | None) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(value.astype(np.float32), name)
    if writer is not None:
        writer.externalize(tensor)
    return tensor


def _contract_io(graph: onnx.GraphProto, num_layers: int) -> None:
    """Graph inputs/outputs for ``num_layers`` layers, in the contract's order."""
    inputs = {value.name: value for value in graph.input}
    outputs = {value.name: value for value in graph.output}
    for layer in range(TRACED_LAYERS, num_layers):
        for kind in ("key", "value"):
            inputs[contract.past_name(layer, kind)] = _renamed(inputs[contract.past_name(1, kind)],
                                                               contract.past_name(layer, kind))
            outputs[contract.present_name(layer, kind)] = _renamed(outputs[contract.present_name(1, kind)],
                                                                   contract.present_name(layer, kind))
    graph.ClearField("input")
    graph.input.extend(inputs[name] for name in contract.input_names(num_layers))
    graph.ClearField("output")
    graph.output.extend(outputs[name] for name in contract.output_names(num_layers))


def _renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy

"""Small helpers over ONNX graphs: find the linear layers, read/replace initializers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from gptedge.runtime.graph import GraphIndex
from gptedge.runtime.onnx_io import external_info, read_external_bytes


@dataclass(frozen=True)
class Linear:
    """A linear layer in the graph: ``MatMul(x, W)`` with ``W`` a 2-D float initializer [in, out]."""

    node: str  # node name, e.g. /layers.0/attn/qkv/MatMul
    activation: str  # input tensor name
    weight: str  # initializer name, e.g. layers.0.attn.qkv.weight_t
    output: str


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def linear_layers(model: onnx.ModelProto) -> list[Linear]:
    """Every MatMul whose second input is a 2-D float/fp16 initializer, in graph order.

    These are the model's linear layers (qkv, out, up/gate_up, down and the LM head); the
    attention-score MatMuls multiply two activations and are not listed.
    """
    inits = initializers(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if len(weight.dims) == 2 and weight.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            found.append(Linear(node.name, node.input[0], node.input[1], node.output[0]))
    return found


def untie_linear_weights(model: onnx.ModelProto) -> list[str]:
    """Give every other consumer of a linear layer's weight its own copy, so that quantizing or
    pruning the layer leaves them intact (a tied embedding table is both the LM head's weight and
    the lookup table of a Gather). Returns the weights that were untied."""
    inits = initializers(model)
    users = GraphIndex(model.graph.node)
    untied = []
    for linear in linear_layers(model):
        others = [node for node in users.readers(linear.weight) if node.name != linear.node]
        if not others:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[linear.weight])
        copy.name = f"{linear.weight}.untied"
        model.graph.initializer.append(copy)
        for node in others:
            node.input[:] = [copy.name if name == linear.weight else name for name in node.input]
        untied.append(linear.weight)
    return untied


def get_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    return tensor_array(initializers(model)[name])


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of ``tensor``; an external one (an absolute location, see
    :func:`gptedge.quantize.graph_io.load_graphs`) is read from its file, this tensor alone."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    info = external_info(tensor)
    if dtype.kind in "fiub" and tensor.data_type not in _PACKED:
        count = int(np.prod(tensor.dims, dtype=np.int64))
        values = np.fromfile(info["location"], dtype=dtype.newbyteorder("<"), count=count,
                             offset=int(info.get("offset", 0)))
        return values.astype(dtype, copy=False).reshape(tuple(tensor.dims))
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = read_external_bytes(tensor)
    return numpy_helper.to_array(inline)


_PACKED = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.BFLOAT16)


def set_array(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace (or add) the initializer ``name`` with ``value`` (shape may change)."""
    tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(tensor)
            return
    model.graph.initializer.append(tensor)


def remove_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    keep = [init for init in model.graph.initializer if init.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def opset_version(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def set_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset. Our graphs' ops keep their semantics from 18 to 21 (the
    later versions only add types), so bumping the number is enough; checker + ORT verify it."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, version)


def float_outputs_of(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the float tensors ``names`` (for calibration)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return copy

"""Fusions onnxruntime's own optimizer misses on a gptedge graph, for :mod:`gptedge.runtime.ort.variant`.

Each one matches the exact subgraph the gptedge exporter writes and replaces it with one
``com.microsoft`` kernel; a subgraph that differs (an fp16 graph with Casts around the norm
statistics, say) is left as it is, so a fusion can only make the variant faster, never wrong.

- residual ``Add`` + RMSNorm (``Pow, ReduceMean, Add, Sqrt, Div, Mul``) -> ``SkipSimplifiedLayerNormalization``
- residual ``Add`` + ``LayerNormalization`` -> ``SkipLayerNormalization`` (a bias ``Add`` on the
  branch folds into the kernel's ``bias`` input)
- the tanh GELU (``Pow`` ... ``Tanh`` ... ``Mul``, 8 nodes) -> ``FastGelu`` (with the linear's bias)
- a lookup in an int8 table (``DequantizeLinear`` -> ``Gather``) -> gather int8, then scale
  (:func:`int8_lookup`; standard ops, but the portable graph keeps the form TensorRT wants)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.runtime.graph import GraphIndex
from gptedge.runtime.tolerances import GELU_CONSTANT_RTOL

MS_DOMAIN = "com.microsoft"


class PatternIndex(GraphIndex):
    """:class:`GraphIndex` plus the graph's constant initializers and outputs, for pattern matching."""

    def __init__(self, nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> None:
        super().__init__(nodes)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def only_consumer(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        users = self.readers(tensor)
        if len(users) == 1 and users[0].op_type == op_type and tensor not in self.outputs:
            return users[0]
        return None

    def made_by(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def scalar(self, tensor: str) -> float | None:
        init = self.initializers.get(tensor)
        if init is None:
            return None
        value = numpy_helper.to_array(init)
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def is_vector(self, tensor: str) -> bool:
        init = self.initializers.get(tensor)
        return init is not None and len(init.dims) == 1


def fuse_all(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], dict[str, int]]:
    """Apply every fusion to ``nodes`` (``graph`` supplies initializers and outputs); returns the
    new node list and how many of each fusion were made."""
    counts = {}
    for name, match in (("skip_rmsnorm", _skip_rmsnorm), ("skip_layernorm", _skip_layernorm),
                        ("fast_gelu", _fast_gelu)):
        counts[name] = 0
        while True:  # one match at a time: each fusion changes what the next one sees
            index = PatternIndex(nodes, graph)
            found = next(filter(None, (match(index, node) for node in nodes)), None)
            if found is None:
                break
            nodes = _replace(nodes, *found)
            counts[name] += 1
    return nodes, counts


def _replace(nodes: list[onnx.NodeProto], dead: list[onnx.NodeProto], new: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``nodes`` with ``new`` where the first of ``dead`` was and without any of ``dead``."""
    ids = {id(node) for node in dead}
    position = min(i for i, node in enumerate(nodes) if id(node) in ids)
    kept = [node for node in nodes if id(node) not in ids]
    kept.insert(position, new)
    return kept


def _rmsnorm_at(index: PatternIndex, x: str) -> tuple[list[onnx.NodeProto], str, float] | None:
    """The RMSNorm chain reading ``x``: (its nodes, gamma, epsilon), or None."""
    pow_ = next((n for n in index.readers(x) if n.op_type == "Pow"), None)
    if pow_ is None or index.scalar(pow_.input[1]) != 2.0:
        return None
    mean = index.only_consumer(pow_.output[0], "ReduceMean")
    add = mean and index.only_consumer(mean.output[0], "Add")
    sqrt = add and index.only_consumer(add.output[0], "Sqrt")
    div = sqrt and index.only_consumer(sqrt.output[0], "Div")
    mul = div and index.only_consumer(div.output[0], "Mul")
    if not (mean and add and sqrt and div and mul) or div.input[0] != x or mul.input[0] != div.output[0] or not index.is_vector(mul.input[1]):
        return None
    epsilon = index.scalar(add.input[1])
    users = {id(n) for n in index.readers(x)}
    if epsilon is None or not {id(pow_), id(div)} <= users:
        return None
    return [pow_, mean, add, sqrt, div, mul], mul.input[1], epsilon


def _skip_rmsnorm(index: PatternIndex, residual: onnx.NodeProto):
    if residual.op_type != "Add" or any(name in index.initializers for name in residual.input):
        return None
    found = _rmsnorm_at(index, residual.output[0])
    if found is None:
        return None
    nodes, gamma, epsilon = found
    fused = helper.make_node(
        "SkipSimplifiedLayerNormalization", [residual.input[0], residual.input[1], gamma],
        [nodes[-1].output[0], "", "", residual.output[0]], domain=MS_DOMAIN, epsilon=epsilon,
        name=nodes[-1].name.rsplit("/", 1)[0] + "/SkipSimplifiedLayerNormalization")
    return [residual, *nodes], fused


def _skip_layernorm(index: PatternIndex, residual: onnx.NodeProto):
    if residual.op_type != "Add" or any(name in index.initializers for name in residual.input):
        return None
    norm = next((n for n in index.readers(residual.output[0])
                 if n.op_type == "LayerNormalization" and len(n.input) == 3 and _axis_of(n, -1) == -1), None)
    if norm is None:
        return None
    dead, skip, bias = [residual, norm], residual.input[1], ""
    branch = index.made_by(skip, "Add")
    if branch is not None and index.is_vector(branch.input[1]) and len(index.consumers[skip]) == 1:
        dead.append(branch)
        skip, bias = branch.input[0], branch.input[1]
    inputs = [residual.input[0], skip, norm.input[1], norm.input[2]] + ([bias] if bias else [])
    fused = helper.make_node(
        "SkipLayerNormalization", inputs, [norm.output[0], "", "", residual.output[0]], domain=MS_DOMAIN,
        epsilon=_attr(norm, "epsilon", 1e-5), name=norm.name.rsplit("/", 1)[0] + "/SkipLayerNormalization")
    return dead, fused


def _fast_gelu(index: PatternIndex, tanh: onnx.NodeProto):
    found = _tanh_gelu_nodes(index, tanh) if tanh.op_type == "Tanh" else None
    if found is None:
        return None
    nodes, x = found
    inputs, dead = [x], list(nodes)
    bias_add = index.made_by(x, "Add")
    if bias_add is not None and index.is_vector(bias_add.input[1]) and \
            {id(n) for n in index.consumers[x]} <= {id(n) for n in nodes}:
        inputs, dead = [bias_add.input[0], bias_add.input[1]], [bias_add, *nodes]
    fused = helper.make_node("FastGelu", inputs, [nodes[-1].output[0]], domain=MS_DOMAIN,
                             name=nodes[-1].name.rsplit("/", 1)[0] + "/FastGelu")
    return dead, fused


def _tanh_gelu_nodes(index: PatternIndex, tanh: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str] | None:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) as the exporter writes it."""
    scale = index.made_by(tanh.input[0], "Mul")
    inner = scale and index.made_by(_other(scale, index), "Add")
    cube_mul = inner and index.made_by(inner.input[1], "Mul")
    cube = cube_mul and index.made_by(_other(cube_mul, index), "Pow")
    if not (scale and inner and cube_mul and cube) or index.scalar(cube.input[1]) != 3.0 or inner.input[0] != cube.input[0]:
        return None
    x = cube.input[0]
    plus_one = index.only_consumer(tanh.output[0], "Add")
    half = plus_one and index.only_consumer(plus_one.output[0], "Mul")
    out = half and index.only_consumer(half.output[0], "Mul")
    if not (plus_one and half and out) or x not in out.input:
        return None
    if not np.isclose(index.scalar(_const_input(half, index)) or 0, 0.5) or \
            not np.isclose(index.scalar(_const_input(scale, index)) or 0, np.sqrt(2 / np.pi), rtol=GELU_CONSTANT_RTOL):
        return None
    return [cube, cube_mul, inner, scale, tanh, plus_one, half, out], x


def _other(node: onnx.NodeProto, index: PatternIndex) -> str:
    """The non-constant input of a binary Mul (the one that is not an initializer)."""
    names = [name for name in node.input if name not in index.initializers]
    return names[0] if len(names) == 1 else ""


def _const_input(node: onnx.NodeProto, index: PatternIndex) -> str:
    names = [name for name in node.input if name in index.initializers]
    return names[0] if names else ""


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def unpacked_lm_head(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Give the fp32 LM head's weight a leading 1 ([C, V] -> [1, C, V], same bytes): onnxruntime
    pre-packs only 2-D MatMul weights, and for this one matrix packing costs memory, not speed.

    A tied table is read by the token lookup too, so onnxruntime kept the plain table AND a packed
    copy (GPT-2 small: +154 MB, 1.44x the weights). Measured here for x[1, 768] @ W[768, 50257]:
    4.1 ms unpacked vs 4.9 ms packed per call; at 768 x 2048 packing wins, so only the LM head
    changes. The lookup (``Gather(axis=1)`` of the tied [C, V] table) reads the 3-D table at
    axis 2 and reshapes back. Unknown readers of the weight leave the graph unchanged.
    """
    index = PatternIndex(nodes, graph)
    head = index.made_by("logits", "MatMul")
    weight = index.initializers.get(head.input[1]) if head is not None else None
    if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
        return nodes
    readers = [n for n in index.consumers[weight.name] if n is not head]
    if any(n.op_type != "Gather" or _axis_of(n, 0) != 1 for n in readers):
        return nodes
    rows = weight.dims[0]
    shape = f"{weight.name}.lookup_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape))
    out = list(nodes)
    for gather in readers:
        flat = gather.output[0]
        gather.output[0] = f"{flat}_3d"
        for attr in gather.attribute:
            if attr.name == "axis":
                attr.i = 2
        position = next(i for i, node in enumerate(out) if node is gather)
        out.insert(position + 1, helper.make_node("Reshape", [gather.output[0], shape], [flat],
                                                           name=f"{gather.name}_Reshape"))
    weight.dims[:] = [1, *weight.dims]
    return out


def _axis_of(node: onnx.NodeProto, default: int) -> int:
    return int(_attr(node, "axis", default))


def int8_lookup(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], int]:
    """``DequantizeLinear(int8 table [C, V], scale [V], axis=1) -> Gather(axis=1)`` (the portable
    form of a lookup in a quantized tied table) -> ``Gather`` of the int8 columns and of their
    scales, ``Cast``, ``Mul``. onnxruntime does not fold a dequantize of a constant, so the portable
    form dequantizes the whole table per call (SmolLM2: ~100 ms); this reads only the rows asked for
    (~20 us). The gathers read *aliases* of the table and scale: initializers of their own name whose
    external data points at the same bytes of the data file (nothing is stored twice), because
    onnxruntime fuses the head's ``DequantizeLinear -> MatMul`` into an 8-bit ``MatMulNBits`` (3 ms
    instead of ~40 ms per step) only when nothing else reads its initializers. Returns the new node
    list and how many lookups were rewritten."""
    index = PatternIndex(nodes, graph)
    out, count = list(nodes), 0
    for gather in [n for n in nodes if n.op_type == "Gather" and _axis_of(n, 0) == 1]:
        dq = index.made_by(gather.input[0], "DequantizeLinear")
        if dq is None or len(index.readers(dq.output[0])) != 1 or len(dq.input) > 2 and dq.input[2]:
            continue
        table, scale = index.initializers.get(dq.input[0]), index.initializers.get(dq.input[1])
        if (table is None or scale is None or table.data_type != onnx.TensorProto.INT8 or len(table.dims) != 2
                or list(scale.dims) != [table.dims[1]] or _axis_of(dq, 1) != 1):
            continue
        name, ids = gather.output[0], gather.input[1]
        table_alias, scale_alias = _alias(graph, table), _alias(graph, scale)
        new = [helper.make_node("Gather", [table_alias, ids], [f"{name}/int8"], axis=1, name=f"{gather.name}/int8"),
               helper.make_node("Gather", [scale_alias, ids], [f"{name}/scale"], axis=0, name=f"{gather.name}/scale"),
               helper.make_node("Cast", [f"{name}/int8"], [f"{name}/float"], to=onnx.TensorProto.FLOAT,
                                name=f"{gather.name}/Cast"),
               helper.make_node("Mul", [f"{name}/float", f"{name}/scale"], [name], name=f"{gather.name}/Mul")]
        position = next(i for i, node in enumerate(out) if node is dq)
        out = [node for node in out if node is not dq and node is not gather]
        out[position:position] = new
        count += 1
    return out, count


def _alias(graph: onnx.GraphProto, tensor: onnx.TensorProto) -> str:
    """A second initializer ``<name>.lookup`` with the same content; for a tensor in external data
    (the variant is built without loading its weights) only the file reference is copied."""
    name = f"{tensor.name}.lookup"
    if not any(init.name == name for init in graph.initializer):
        alias = onnx.TensorProto()
        alias.CopyFrom(tensor)
        alias.name = name
        graph.initializer.append(alias)
    return name

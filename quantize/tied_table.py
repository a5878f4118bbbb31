"""The token table quantized once: one int8 copy serves the embedding lookup and the LM head.

A tied table is the LM head's weight ``[hidden, vocab]`` and the lookup table of a
``Gather(axis=1)`` (followed by a ``Transpose`` to ``[tokens, hidden]``); ``quantize()`` unties it
first (the Gather then reads ``<weight>.untied``). These functions put both back on one quantized
tensor, in two forms (measured on SmolLM2, one decode step, 2 threads):

- ``matmulnbits`` (onnxruntime-only bundles): the head becomes an 8-bit ``MatMulNBits`` (blocks
  along ``hidden``, uint8 zero points, accuracy level 4: 3 ms; level 0 has no 8-bit fast kernel,
  280 ms) and the lookup a ``GatherBlockQuantized`` reading the very same uint8 tensor (6 us).
- ``qdq`` (portable, TensorRT): symmetric int8 with one scale per vocabulary row,
  ``DequantizeLinear(axis=1) -> MatMul`` for the head (onnxruntime fuses it: 5 ms) and a second
  ``DequantizeLinear`` of the same int8 initializer -> ``Gather`` for the lookup (static ``int8``
  shares its head's per-channel int8 weight the same way: :func:`share_lookup`). onnxruntime does
  not fold that one (it dequantizes the whole table per call, ~100 ms); its generation graph
  (``model_ort.onnx``) gathers int8 rows and scales them instead (see
  ``gptedge.runtime.ort.variant``), so only the portable graph's ORT runs pay it.

An untied model's separate embedding table (``Gather(axis=0)`` on ``[vocab, hidden]``) is left in float.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.quantize.block_writers import MS_DOMAIN, replace_with_matmulnbits
from gptedge.quantize.blockquant import Blocks, symmetric_rows
from gptedge.quantize.graph_utils import Linear, remove_initializers, tensor_array
from gptedge.runtime.graph import GraphIndex


def head_of(model: onnx.ModelProto, layers: list[Linear]) -> Linear | None:
    """The linear layer that writes the graph's ``logits`` output (the LM head), or None."""
    outputs = {o.name for o in model.graph.output}
    return next((lin for lin in layers if lin.output in outputs), None)


def tied_lookup(model: onnx.ModelProto, head: Linear) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(Gather, Transpose) of the lookup that reads the head's untied copy, or None (not tied)."""
    index = GraphIndex(model.graph.node)
    for node in index.readers(f"{head.weight}.untied"):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        users = index.readers(node.output[0])
        if node.op_type == "Gather" and axis == 1 and len(users) == 1 and users[0].op_type == "Transpose":
            return node, users[0]
    return None


def tie_matmulnbits(model: onnx.ModelProto, head: Linear, blocks: Blocks, accuracy_level: int) -> bool:
    """Head -> 8-bit MatMulNBits; tied lookup -> GatherBlockQuantized on the same tensors. Returns
    whether a tied lookup was found (the head is quantized either way)."""
    data = replace_with_matmulnbits(model, head, blocks, accuracy_level)
    found = tied_lookup(model, head)
    if found is None:
        return False
    gather, transpose = found
    hidden, vocab = blocks.rows, blocks.q.shape[1]
    nb = blocks.scale.shape[0]
    shape3, flat = f"{head.weight}_shape3", f"{head.weight}_rows"
    model.graph.initializer.extend([numpy_helper.from_array(np.array([vocab, nb, 1], np.int64), shape3),
                                    numpy_helper.from_array(np.array([-1, nb * blocks.block], np.int64), flat)])
    base = head.weight
    nodes = [
        # one scale / zero point per block of the [vocab, blocks, block] table, as the op wants them
        helper.make_node("Reshape", [f"{base}_scale", shape3], [f"{base}_scale3"], name="/embed/scale/Reshape"),
        helper.make_node("Reshape", [f"{base}_zp", shape3], [f"{base}_zp3"], name="/embed/zp/Reshape"),
        helper.make_node("GatherBlockQuantized", [data, gather.input[1], f"{base}_scale3", f"{base}_zp3"],
                         ["/embed/rows"], domain=MS_DOMAIN, name="/embed/GatherBlockQuantized",
                         gather_axis=0, quantize_axis=2, block_size=blocks.block, bits=8),
        helper.make_node("Reshape", ["/embed/rows", flat], ["/embed/padded"], name="/embed/Reshape"),
    ]
    if nb * blocks.block == hidden:
        nodes[-1].output[0] = transpose.output[0]
    else:  # the last block's padding columns
        ends = f"{head.weight}_hidden"
        model.graph.initializer.extend([numpy_helper.from_array(np.array([hidden], np.int64), ends),
                                        numpy_helper.from_array(np.array([0], np.int64), f"{ends}_start"),
                                        numpy_helper.from_array(np.array([1], np.int64), f"{ends}_axis")])
        nodes.append(helper.make_node("Slice", ["/embed/padded", f"{ends}_start", ends, f"{ends}_axis"],
                                      [transpose.output[0]], name="/embed/Slice"))
    _splice(model, [gather, transpose], nodes)
    remove_initializers(model, {f"{head.weight}.untied"})
    return True


def tie_qdq(model: onnx.ModelProto, head: Linear, table: tuple[np.ndarray, np.ndarray] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Head -> ``DequantizeLinear(int8 [hidden, vocab], scale [vocab], axis=1) -> MatMul``; the tied
    lookup reads its own ``DequantizeLinear`` of the same int8 tensor. ``table``: the (int8, scale)
    pair already computed for another graph of the bundle. Returns it."""
    inits = {init.name: init for init in model.graph.initializer}
    if table is None:
        table = symmetric_rows(tensor_array(inits[head.weight]).astype(np.float32), axis=1)
    q, scale = table
    name = head.weight
    model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                    numpy_helper.from_array(scale, f"{name}_scale")])
    head_dq = helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [f"{name}_dequantized"],
                               axis=1, name="/lm_head/weight/DequantizeLinear")
    node = next(n for n in model.graph.node if n.name == head.node)
    node.input[1] = f"{name}_dequantized"
    model.graph.node.insert(list(model.graph.node).index(node), head_dq)
    share_lookup(model, head, f"{name}_int8", f"{name}_scale")
    remove_initializers(model, {name})
    return table


def share_lookup(model: onnx.ModelProto, head: Linear, int8: str, scale: str) -> bool:
    """Point the tied lookup of ``head`` (reading its untied float copy) at a second
    ``DequantizeLinear(int8, scale, axis=1)`` of the head's own int8 [hidden, vocab] tensor (one
    scale per vocabulary row, zero-point 0) and drop the float copy. Returns whether the model
    had a tied lookup."""
    found = tied_lookup(model, head)
    if found is None:
        return False
    gather = found[0]
    lookup_dq = helper.make_node("DequantizeLinear", [int8, scale], [f"{head.weight}_table"],
                                 axis=1, name="/embed/weight/DequantizeLinear")
    gather.input[0] = f"{head.weight}_table"
    model.graph.node.insert(list(model.graph.node).index(gather), lookup_dq)
    remove_initializers(model, {f"{head.weight}.untied"})
    return True


def _splice(model: onnx.ModelProto, old: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
    """Replace the ``old`` nodes by ``new`` at the position of the first of them."""
    nodes = list(model.graph.node)
    position = nodes.index(old[0])
    gone = {tuple(o.output) for o in old}
    kept = [n for n in nodes if tuple(n.output) not in gone]
    kept[position:position] = new
    del model.graph.node[:]
    model.graph.node.extend(kept)

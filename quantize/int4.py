"""Weight-only int4, symmetric, blocks of ``block_size`` input channels.

``matmulnbits``: onnxruntime's ``MatMulNBitsQuantizer`` -> ``com.microsoft.MatMulNBits`` (CPU only).
``qdq``: standard ONNX, opset 21: ``DequantizeLinear(W_int4 [in, out], scale [in/B, out],
axis=0, block_size=B) -> MatMul`` — the form TensorRT runs as INT4 weight-only. It needs a
TensorRT whose parser reads opset 21 and documents blocked int4 DQ: the "10.x" row (newer than
10.3) of gptedge.runtime.trt.support's table; JetPack 6's TensorRT 10.3 (opset <= 20) cannot. Either way every linear layer (LM head included) must come out quantized, or this raises.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.quantize.config import Int4Config
from gptedge.quantize.graph_utils import initializers, linear_layers, remove_initializers, set_opset
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler
from gptedge.runtime.errors import BundleError

TENSORRT_MIN_VERSION = "10.x"  # key of gptedge.runtime.trt.support.SUPPORT: newer than 10.3, block_quant
QDQ_OPSET = 21  # DequantizeLinear with int4 and block_size


@handler(Int4Config)
def to_int4(job: Job, config: Int4Config) -> None:
    job.require_source_precision("int4")
    job.record["layers_quantized"] = [lin.weight for lin in linear_layers(job.graphs["model"])]
    block = fitted_block(job.graphs["model"], config.block_size) if config.format == "matmulnbits" \
        else config.block_size
    job.record.update(block_size=block, format=config.format)
    for role, model in job.graphs.items():
        if config.format == "matmulnbits":
            job.graphs[role] = matmulnbits(model, config)
        else:
            blocked_qdq(model, config.block_size)
        left = [lin.weight for lin in linear_layers(job.graphs[role])]
        if left:
            raise BundleError(f"int4 left linear layers in float: {left}; report this with the bundle")
    job.precision.update(weights="int4", weight_block_size=block)
    if config.format == "matmulnbits":
        job.precision.update(cpu_only=True, accuracy_level=config.accuracy_level)
        job.record["accuracy_level"] = config.accuracy_level
    else:
        job.precision.update(cpu_only=False, tensorrt_min_version=TENSORRT_MIN_VERSION)


def _import_quietly():
    """Import onnxruntime's MatMulNBitsQuantizer without its module-level ``logging.basicConfig(INFO)``
    taking over the embedding app's root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return MatMulNBitsQuantizer


def matmulnbits(model: onnx.ModelProto, config: Any, bits: int = 4) -> onnx.ModelProto:
    """Every linear layer -> ``MatMulNBits`` (``bits``; ``config.block_size`` as fitted by
    :func:`fitted_block`, ``config.accuracy_level``)."""
    MatMulNBitsQuantizer = _import_quietly()
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=fitted_block(model, config.block_size),
                                     is_symmetric=True,
                                     accuracy_level=config.accuracy_level,
                                     nodes_to_include=[lin.node for lin in linear_layers(model)])
    quantizer.process()
    return quantizer.model.model


def fitted_block(model: onnx.ModelProto, block: int) -> int:
    """``block``, halved (down to 16) until it fits the narrowest linear layer's input: a wider
    block would be padded with zeros, and MatMulNBits stores the padding (tiny models)."""
    inits = initializers(model)
    narrowest = min((inits[lin.weight].dims[0] for lin in linear_layers(model)), default=block)
    while block > 16 and block > narrowest:
        block //= 2
    return block


def quantize_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 of ``weight`` [in, out] in blocks along ``in`` -> (int8 values in [-7, 7]
    [in, out], scale [ceil(in/block), out])."""
    k, n = weight.shape
    pad = -k % block
    padded = np.concatenate([weight, np.zeros((pad, n), weight.dtype)]) if pad else weight
    blocks = padded.reshape(-1, block, n)
    scale = (np.abs(blocks).max(axis=1) / 7.0).astype(np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -7, 7).astype(np.int8)
    return q.reshape(-1, n)[:k], scale


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX INT4 raw layout: two values per byte, the first in the low nibble."""
    flat = values.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = (flat & 0x0F).astype(np.uint8)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def blocked_qdq(model: onnx.ModelProto, block: int) -> None:
    """Replace every linear layer's float weight by int4 + blocked DequantizeLinear (opset 21)."""
    set_opset(model, QDQ_OPSET)
    inits = {init.name: init for init in model.graph.initializer}
    targets = {lin.node: lin.weight for lin in linear_layers(model)}
    new_nodes, dropped = [], set()
    for node in model.graph.node:
        name = targets.get(node.name)
        if name is not None:
            q, scale = quantize_blocks(numpy_helper.to_array(inits[name]).astype(np.float32), block)
            model.graph.initializer.append(helper.make_tensor(name + "_int4", onnx.TensorProto.INT4, q.shape,
                                                              pack_int4(q), raw=True))
            model.graph.initializer.append(numpy_helper.from_array(scale, name + "_scale"))
            new_nodes.append(helper.make_node("DequantizeLinear", [name + "_int4", name + "_scale"],
                                              [name + "_dequantized"], axis=0, block_size=block,
                                              name=node.name + "/weight/DequantizeLinear"))
            node.input[1] = name + "_dequantized"
            dropped.add(name)
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_initializers(model, dropped)


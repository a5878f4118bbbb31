"""Write :class:`~gptedge.quantize.blockquant.Blocks` into a graph: ``MatMulNBits`` or blocked
``DequantizeLinear`` + ``MatMul``, each replacing one linear layer's float ``MatMul``.

Zero points:
- ``MatMulNBits`` takes them as integers (uint4/uint8, packed) — its fast kernels need integer zero
  points (a float zero point runs 50x slower on the CPU: 5.2 ms vs 0.1 ms for a 576x3072 matrix);
- TensorRT's ``DequantizeLinear`` wants zero-point 0, so the QDQ form stores signed values
  ``q - 2**(bits-1)`` and carries the rest of the zero point as a float *offset path*:
  ``W = s * (q - z) = s * q_signed + s * (2**(bits-1) - z)``, and the second term is constant over
  a block, so ``x @ W = x @ DQ(q_signed) + (x @ P) @ M`` with ``P`` [in, blocks] the 0/1 block
  indicator (x @ P sums each block of inputs) and ``M = s * (2**(bits-1) - z)`` [blocks, out]:
  two MatMuls 1/``block`` the size of the layer, standard ops that TensorRT and every runtime run.
  ``P`` and ``M`` are stored with a leading 1 (3-D), so they are not mistaken for linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.quantize.blockquant import Blocks
from gptedge.quantize.graph_utils import Linear

MS_DOMAIN = "com.microsoft"


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values along the last axis -> one byte each, the first in the low nibble
    (the layout of MatMulNBits and of ONNX INT4/UINT4). The last axis is padded to even."""
    v = values.astype(np.uint8) & 0x0F
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_arrays(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B [out, blocks, bytes per block] uint8, scales [out * blocks], zero points uint8) in
    MatMulNBits' layout; integer zero points (rounded if they are not)."""
    kp, n = blocks.q.shape
    nb = kp // blocks.block
    q = blocks.q.T.reshape(n, nb, blocks.block)
    zero = np.clip(np.rint(blocks.zero.T), 0, 2 ** blocks.bits - 1).astype(np.uint8)  # [out, blocks]
    if blocks.bits == 4:
        return pack_nibbles(q), blocks.scale.T.reshape(-1).copy(), pack_nibbles(zero).reshape(-1)
    return q.copy(), blocks.scale.T.reshape(-1).copy(), zero.reshape(-1)


def replace_with_matmulnbits(model: onnx.ModelProto, lin: Linear, blocks: Blocks, accuracy_level: int,
                             integer_zero: bool = True) -> str:
    """Swap ``lin``'s MatMul for a MatMulNBits node reading initializers ``<weight>_q/_scale[/_zp]``
    (added unless already present: two graphs of a bundle share them). ``integer_zero=False``: no
    zero-point input (the kernel's default, ``2**(bits-1)``) and the float zero points go to the
    offset path. Returns the B tensor name."""
    prefix = lin.weight
    names = [f"{prefix}_q", f"{prefix}_scale", f"{prefix}_zp"][:3 if integer_zero else 2]
    existing = {init.name for init in model.graph.initializer}
    if names[0] not in existing:
        for name, array in zip(names, matmulnbits_arrays(blocks), strict=False):
            model.graph.initializer.append(numpy_helper.from_array(array, name))
    k, n = blocks.rows, blocks.q.shape[1]
    node = _node(model, lin.node)
    output = lin.output if integer_zero else f"{lin.output}/main"
    new = helper.make_node("MatMulNBits", [lin.activation, *names], [output], domain=MS_DOMAIN,
                           name=lin.node.replace("MatMul", "MatMulNBits"), K=k, N=n, bits=blocks.bits,
                           block_size=blocks.block, accuracy_level=accuracy_level)
    node.CopyFrom(new)
    _ms_opset(model)
    if not integer_zero:
        _insert_after(model, node, _offset_path(model, lin, blocks, output))
    return names[0]


def replace_with_blocked_dq(model: onnx.ModelProto, lin: Linear, blocks: Blocks) -> None:
    """Swap ``lin``'s float weight for ``DequantizeLinear(int4, scale, axis=0, block_size)`` (zero-point
    0) plus the float offset path that carries the zero points (module docstring)."""
    k, n = blocks.rows, blocks.q.shape[1]
    half = 2 ** (blocks.bits - 1)
    signed = blocks.q[:k].astype(np.int16) - half
    dtype = onnx.TensorProto.INT4 if blocks.bits == 4 else onnx.TensorProto.INT8
    data = pack_nibbles(signed).tobytes() if blocks.bits == 4 else signed.astype(np.int8).tobytes()
    name = lin.weight
    model.graph.initializer.extend([
        helper.make_tensor(f"{name}_int{blocks.bits}", dtype, [k, n], data, raw=True),
        numpy_helper.from_array(blocks.scale, f"{name}_scale"),
    ])
    dq = helper.make_node("DequantizeLinear", [f"{name}_int{blocks.bits}", f"{name}_scale"],
                          [f"{name}_dequantized"], axis=0, block_size=blocks.block,
                          name=f"{lin.node}/weight/DequantizeLinear")
    node = _node(model, lin.node)
    node.input[1] = f"{name}_dequantized"
    model.graph.node.insert(list(model.graph.node).index(node), dq)
    node.output[0] = f"{lin.output}/main"
    _insert_after(model, node, _offset_path(model, lin, blocks, node.output[0]))


def _offset_path(model: onnx.ModelProto, lin: Linear, blocks: Blocks, main: str) -> list[onnx.NodeProto]:
    """``main + (x @ P) @ M`` -> ``lin.output`` (module docstring). ``M`` is stored in float16 (it
    is a small correction: half the bytes, 1e-3 relative rounding) and cast back at load time."""
    k = blocks.rows
    offset = (blocks.scale * (2 ** (blocks.bits - 1) - blocks.zero)).astype(np.float16)
    name = lin.weight
    if not any(init.name == f"{name}_offset16" for init in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(offset[None], f"{name}_offset16"))
    indicator = _block_indicator(model, k, blocks.block)
    out = lin.output
    return [helper.make_node("Cast", [f"{name}_offset16"], [f"{name}_offset"], to=onnx.TensorProto.FLOAT,
                             name=f"{lin.node}/offset/Cast"),
            helper.make_node("MatMul", [lin.activation, indicator], [f"{out}/block_sums"],
                             name=f"{lin.node}/offset/BlockSum"),
            helper.make_node("MatMul", [f"{out}/block_sums", f"{name}_offset"], [f"{out}/offset"],
                             name=f"{lin.node}/offset/MatMul"),
            helper.make_node("Add", [main, f"{out}/offset"], [out], name=f"{lin.node}/offset/Add")]


def _insert_after(model: onnx.ModelProto, node: onnx.NodeProto, extra: list[onnx.NodeProto]) -> None:
    position = list(model.graph.node).index(node) + 1
    for i, new in enumerate(extra):
        model.graph.node.insert(position + i, new)


def _block_indicator(model: onnx.ModelProto, k: int, block: int) -> str:
    """The shared [1, k, ceil(k/block)] 0/1 matrix that sums each block of an input row."""
    name = f"block_sum_{k}x{block}"
    if not any(init.name == name for init in model.graph.initializer):
        blocks = -(-k // block)
        indicator = np.kron(np.eye(blocks, dtype=np.float32), np.ones((block, 1), np.float32))[:k]
        model.graph.initializer.append(numpy_helper.from_array(indicator[None], name))
    return name


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _ms_opset(model: onnx.ModelProto) -> None:
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


@dataclass(frozen=True)
class Float16Weight:
    """A linear weight [in, out] kept in float16 (``Cast`` to float32 before its ``MatMul``)."""

    weight: np.ndarray


EIGHT_BIT_ACCURACY_LEVEL = 4  # 8-bit MatMulNBits has a fast kernel only with int8 compute


def write_high(model: onnx.ModelProto, lin: Linear, form: Blocks | Float16Weight) -> None:
    """Write a layer kept above int4: 8-bit ``MatMulNBits`` blocks (integer zero points), or in a
    portable graph float16 weights (``Cast -> MatMul``: standard ops TensorRT folds; TensorRT
    documents block quantization for int4 weights only, and a per-channel int8 weight lost +1.2 %
    on the mixed-precision test's outlier row, where every layer failing int4 has such rows)."""
    if isinstance(form, Float16Weight):
        name = lin.weight
        model.graph.initializer.append(numpy_helper.from_array(form.weight.astype(np.float16), f"{name}_fp16"))
        node = _node(model, lin.node)
        node.input[1] = f"{name}_fp16_as_fp32"
        cast = helper.make_node("Cast", [f"{name}_fp16"], [node.input[1]], to=onnx.TensorProto.FLOAT,
                                name=f"{lin.node}/weight/Cast")
        model.graph.node.insert(list(model.graph.node).index(node), cast)
    else:
        replace_with_matmulnbits(model, lin, form, EIGHT_BIT_ACCURACY_LEVEL, integer_zero=True)

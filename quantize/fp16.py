"""FP16: weights and compute in half precision, sensitive ops in FP32, logits FP32, KV cache FP16.

Uses onnxruntime's ``convert_float_to_float16`` with an op block list (norm statistics, softmax,
exponentials) plus a node block list for the RoPE angle path (position * inv_freq -> cos/sin: in
FP16 the angle of position 2000 would be off by a whole unit) and for whole RMSNorm statistics
chains (x^2 -> mean -> + eps -> sqrt -> x / rms): real models carry "massive activations" (SmolLM2's
residual stream reaches 25,000, whose square overflows FP16), so the chain must stay FP32 from the
square to the division. The converter casts every blocked node's output to FP16 and back even
between two blocked nodes; those lossy round trips are folded away afterwards. The converter turns
every float graph input/output into FP16; ``logits`` is then cast back to FP32 so the contract's
logits dtype never changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnxruntime.transformers.float16 as ort_float16
from onnx import numpy_helper
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from gptedge.quantize.config import Fp16Config
from gptedge.quantize.graph_utils import tensor_array
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler
from gptedge.runtime import contract
from gptedge.runtime.errors import BundleError
from gptedge.runtime.graph import GraphIndex, sort_graph

_FP16_MAX = 65504.0


@handler(Fp16Config)
def to_fp16(job: Job, config: Fp16Config) -> None:
    job.require_source_precision("fp16")
    for role, model in job.graphs.items():
        job.graphs[role] = convert_graph(model, config)
    arch = job.architecture
    job.precision.update(weights="float16", kv_cache_dtype="float16", compute="float16")
    job.io = contract.io_description(arch.num_layers, arch.num_kv_heads, arch.head_dim, arch.vocab_size,
                                     kv_dtype="float16")
    job.record["kept_fp32_ops"] = list(config.keep_fp32)


def convert_graph(model: onnx.ModelProto, config: Fp16Config) -> onnx.ModelProto:
    """An FP16 copy of ``model`` following the rules in the module docstring."""
    check_fp16_range(model)
    block_ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(config.keep_fp32))
    keep_nodes = rope_angle_nodes(model) + norm_statistics_nodes(model)
    with _shapes_from_dims():
        converted = convert_float_to_float16(model, keep_io_types=False, op_block_list=block_ops,
                                             node_block_list=keep_nodes,
                                             disable_shape_infer=model.ByteSize() > 1_800_000_000)
    _convert_lazy_tensors(converted)
    fold_cast_round_trips(converted, set(block_ops), set(keep_nodes))
    _logits_back_to_fp32(converted)
    sort_graph(converted.graph)
    check_no_nonfinite(converted)
    return converted


@contextmanager
def _shapes_from_dims() -> Iterator[None]:
    """Let the converter take an initializer's shape from its dims: its own helper reads the whole
    array for it, which a lazily loaded (external) weight does not have in memory."""
    original = ort_float16.make_value_info_from_tensor
    ort_float16.make_value_info_from_tensor = lambda t: onnx.helper.make_tensor_value_info(
        t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        ort_float16.make_value_info_from_tensor = original


def _convert_lazy_tensors(model: onnx.ModelProto) -> None:
    """The converter marks external initializers FLOAT16 without touching their (float32) bytes,
    which stay in the source file; read and convert them here, one tensor at a time."""
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type != onnx.TensorProto.FLOAT16:
            continue
        tensor.data_type = onnx.TensorProto.FLOAT
        values = ort_float16.convert_np_to_float16(tensor_array(tensor))
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), tensor.name))


def rope_angle_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes computing the inputs of Cos/Sin (back to the graph inputs)."""
    made_by = GraphIndex(model.graph.node).producer
    todo = [name for node in model.graph.node if node.op_type in ("Cos", "Sin") for name in node.input]
    seen: set[str] = set()
    while todo:
        node = made_by.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        todo.extend(node.input)
    return sorted(seen | {n.name for n in model.graph.node if n.op_type in ("Cos", "Sin")})


# The ops between a norm's square and its division by the root mean square.
_NORM_CHAIN_OPS = frozenset({"ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Mul"})


def norm_statistics_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of every RMSNorm statistics chain: ``Pow(x, 2)`` and its consumers up to
    and including the node that divides (or multiplies) ``x`` by the root mean square."""
    index = GraphIndex(model.graph.node)
    chain: set[str] = set()
    for power in (node for node in model.graph.node if node.op_type == "Pow"):
        normalized = power.input[0]
        chain.add(power.name)
        todo = list(power.output)
        for _ in range(8):  # a norm chain is 4-6 nodes; bound the walk on unexpected graphs
            if not todo:
                break
            after = []
            for node in (n for name in todo for n in index.readers(name) if n.op_type in _NORM_CHAIN_OPS):
                chain.add(node.name)
                if normalized not in node.input:  # the division by the rms ends the chain
                    after.extend(node.output)
            todo = after
    return sorted(chain)


def fold_cast_round_trips(model: onnx.ModelProto, kept_ops: set[str], kept_nodes: set[str]) -> None:
    """Let consumers of ``Cast(Cast(x, fp16), fp32)`` read the FP32 ``x`` directly.

    The converter emits such pairs between two nodes it keeps in FP32 (``kept_ops`` op types,
    ``kept_nodes`` node names); the round trip would round (or overflow) the very value that was
    kept in FP32 on purpose."""
    made_by = GraphIndex(model.graph.node).producer
    rename: dict[str, str] = {}
    for node in model.graph.node:
        first = made_by.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if (first is not None and first.op_type == "Cast" and _cast_to(node) == onnx.TensorProto.FLOAT
                and _cast_to(first) == onnx.TensorProto.FLOAT16 and _computes_fp32(made_by.get(first.input[0]), kept_ops, kept_nodes)):
            rename[node.output[0]] = first.input[0]
    if not rename:
        return
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    _drop_unused_casts(model)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((attr.i for attr in node.attribute if attr.name == "to"), None)


def _computes_fp32(node: onnx.NodeProto | None, kept_ops: set[str], kept_nodes: set[str]) -> bool:
    return node is not None and (node.op_type in kept_ops or node.name in kept_nodes)


def _drop_unused_casts(model: onnx.ModelProto) -> None:
    """Remove Cast nodes whose output nobody reads: the folded pairs, second Cast first."""
    while True:
        read = {name for node in model.graph.node for name in node.input} | {v.name for v in model.graph.output}
        kept = [node for node in model.graph.node if node.op_type != "Cast" or node.output[0] in read]
        if len(kept) == len(model.graph.node):
            return
        del model.graph.node[:]
        model.graph.node.extend(kept)


def _logits_back_to_fp32(model: onnx.ModelProto) -> None:
    graph = model.graph
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == contract.LOGITS:
                node.output[i] = "logits_fp16"
    graph.node.append(onnx.helper.make_node("Cast", ["logits_fp16"], [contract.LOGITS],
                                            to=onnx.TensorProto.FLOAT, name="/lm_head/CastLogitsFp32"))
    for value in graph.output:
        if value.name == contract.LOGITS:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def check_fp16_range(model: onnx.ModelProto) -> None:
    """Refuse graphs whose float constants exceed FP16's range (a -inf / -3.4e38 attention mask
    would become NaN after softmax): the exporter uses -65504 for the mask."""
    bad = []
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and np.prod(tensor.dims, dtype=np.int64) <= 16:
            values = numpy_helper.to_array(tensor)
            if not np.all(np.isfinite(values)) or np.abs(values).max(initial=0.0) > _FP16_MAX:
                bad.append(tensor.name)
    if bad:
        raise BundleError(f"constants {bad} do not fit FP16 (|x| > 65504 or inf); re-export the bundle with "
                          "a current gptedge (its attention mask uses -65504)")


def check_no_nonfinite(model: onnx.ModelProto) -> None:
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT16:
            values = numpy_helper.to_array(tensor)
            if not np.all(np.isfinite(values)):
                raise BundleError(f"FP16 conversion produced non-finite values in {tensor.name}; "
                                  "the weights exceed FP16's range (|x| > 65504): keep this model in float32")

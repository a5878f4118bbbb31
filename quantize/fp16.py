"""FP16: weights and compute in half precision, sensitive ops in FP32, logits FP32, KV cache FP16.

Uses onnxruntime's ``convert_float_to_float16`` with an op block list (norm statistics, softmax,
exponentials) plus a node block list for the RoPE angle path (position * inv_freq -> cos/sin: in
FP16 the angle of position 2000 would be off by a whole unit). The converter turns every float
graph input/output into FP16; ``logits`` is then cast back to FP32 so the contract's logits
dtype never changes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from gptedge.quantize.config import Fp16Config
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
    converted = convert_float_to_float16(model, keep_io_types=False, op_block_list=block_ops,
                                         node_block_list=rope_angle_nodes(model),
                                         disable_shape_infer=model.ByteSize() > 1_800_000_000)
    _logits_back_to_fp32(converted)
    sort_graph(converted.graph)
    check_no_nonfinite(converted)
    return converted


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

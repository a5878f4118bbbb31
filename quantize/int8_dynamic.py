"""Int8 weights for the ORT CPU, activations quantized to int8 at run time.

``kernel="matmulnbits"`` (default): 8-bit ``MatMulNBits`` with asymmetric blocks (uint8 zero
points) from :mod:`gptedge.quantize.weight_only`, accuracy level 4 (int8 compute: the activations
are quantized per block at run time); the LM head included, and a tied table serves the lookup
from the same uint8 tensor. ``kernel="matmulinteger"``: onnxruntime's ``quantize_dynamic``
restricted to our linear layers (per-channel int8, ``MatMulInteger``). Every listed layer must come
out quantized, or this raises.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from gptedge.quantize.config import Int8DynamicConfig
from gptedge.quantize.graph_io import load_weights
from gptedge.quantize.graph_utils import linear_layers
from gptedge.quantize.int4 import fitted_block
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler
from gptedge.quantize.weight_only import Plan, quantize_weights
from gptedge.runtime.errors import BundleError


@handler(Int8DynamicConfig)
def to_int8_dynamic(job: Job, config: Int8DynamicConfig) -> None:
    job.require_source_precision("int8-dynamic")
    job.record["layers_quantized"] = [lin.weight for lin in linear_layers(job.graphs["model"])]
    block = fitted_block(job.graphs["model"], config.block_size)
    if config.kernel == "matmulnbits":
        plan = Plan(bits=8, block=block, form="matmulnbits", accuracy_level=config.accuracy_level,
                    algorithm=config.algorithm)
        job.record.update(quantize_weights(job, plan))
        job.precision.update(weight_block_size=block, accuracy_level=config.accuracy_level,
                             weight_zero_points=True)
    else:
        for role, model in job.graphs.items():
            job.graphs[role] = quantize_graph(model, config)
    job.precision.update(weights="int8", activations="int8-dynamic", cpu_only=True)


def quantize_graph(model: onnx.ModelProto, config: Int8DynamicConfig) -> onnx.ModelProto:
    layers = linear_layers(model)
    load_weights(model)  # quantize_dynamic reads the weights from the proto
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        root.setLevel(logging.ERROR)  # ORT logs a generic "consider pre-processing" hint on the root logger
        try:
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"],
                             nodes_to_quantize=[lin.node for lin in layers], per_channel=config.per_channel,
                             weight_type=QuantType.QInt8, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(out), load_external_data=True)
    left = [lin.weight for lin in linear_layers(quantized)]
    if left:
        raise BundleError(f"int8-dynamic left linear layers in float: {left}; report this with the bundle")
    return quantized

"""Dynamic int8 for the ORT CPU: per-channel int8 weights, activations quantized at run time.

onnxruntime's ``quantize_dynamic`` restricted to our linear layers (LM head included). Our graphs
keep the LM head untied (``lm_head.weight_t`` is its own initializer), so it is quantized like
any layer instead of dequantizing a full matrix every step. Every listed layer must come out
quantized, or this raises.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from gptedge.quantize.config import Int8DynamicConfig
from gptedge.quantize.graph_utils import linear_layers
from gptedge.quantize.int4 import fitted_block, matmulnbits
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler
from gptedge.runtime.errors import BundleError


@handler(Int8DynamicConfig)
def to_int8_dynamic(job: Job, config: Int8DynamicConfig) -> None:
    job.require_source_precision("int8-dynamic")
    job.record["layers_quantized"] = [lin.weight for lin in linear_layers(job.graphs["model"])]
    block = fitted_block(job.graphs["model"], config.block_size)
    for role, model in job.graphs.items():
        if config.kernel == "matmulnbits":
            job.graphs[role] = _matmulnbits8(model, config)
        else:
            job.graphs[role] = quantize_graph(model, config)
    job.precision.update(weights="int8", activations="int8-dynamic", cpu_only=True)
    if config.kernel == "matmulnbits":
        job.precision.update(weight_block_size=block, accuracy_level=config.accuracy_level)


def _matmulnbits8(model: onnx.ModelProto, config: Int8DynamicConfig) -> onnx.ModelProto:
    quantized = matmulnbits(model, config, bits=8)
    left = [lin.weight for lin in linear_layers(quantized)]
    if left:
        raise BundleError(f"int8-dynamic left linear layers in float: {left}; report this with the bundle")
    return quantized


def quantize_graph(model: onnx.ModelProto, config: Int8DynamicConfig) -> onnx.ModelProto:
    layers = linear_layers(model)
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

"""Weight-only int4: asymmetric blocks of ``block_size`` input channels, an activation-aware
search, and the LM head / tied table in int8 (:mod:`gptedge.quantize.weight_only`).

``matmulnbits``: ``com.microsoft.MatMulNBits`` with uint4 zero points (onnxruntime, CPU only).
``qdq``: standard ONNX, opset 21: ``DequantizeLinear(int4 [in, out], scale [in/B, out], axis=0,
block_size=B) -> MatMul`` with zero-point 0 (TensorRT wants 0) and the zero points carried by a small
float offset path (:mod:`gptedge.quantize.block_writers`) — the form TensorRT runs as INT4
weight-only. It needs a TensorRT whose parser reads opset 21 and documents blocked int4 DQ: the
"10.x" row (newer than 10.3) of gptedge.runtime.trt.support's table; JetPack 6's TensorRT 10.3
(opset <= 20) cannot. Either way every linear layer (LM head included) comes out quantized, or this raises.
"""

from __future__ import annotations

from typing import Any

import onnx

from gptedge.quantize.config import Int4Config
from gptedge.quantize.graph_utils import initializers, linear_layers, set_opset
from gptedge.quantize.job import Job
from gptedge.quantize.registry import handler
from gptedge.quantize.weight_only import Plan, Prepared, quantize_weights

TENSORRT_MIN_VERSION = "10.x"  # key of gptedge.runtime.trt.support.SUPPORT: newer than 10.3, block_quant
QDQ_OPSET = 21  # DequantizeLinear with int4 and block_size


@handler(Int4Config)
def to_int4(job: Job, config: Int4Config) -> None:
    apply_int4(job, config, int4_plan(job, config))


def int4_plan(job: Job, config: Int4Config) -> Plan:
    """The weight-only plan of ``config`` for ``job``'s graphs (a ``qdq`` format raises their opset)."""
    job.require_source_precision("int4")
    block = fitted_block(job.graphs["model"], config.block_size)
    if config.format == "qdq":
        for model in job.graphs.values():
            set_opset(model, QDQ_OPSET)
    return Plan(bits=4, block=block, form=config.format, accuracy_level=config.accuracy_level,
                algorithm=config.algorithm, calib_windows=config.calib_windows,
                integer_zero=config.zero_points == "integer")


def apply_int4(job: Job, config: Int4Config, plan: Plan, prepared: Prepared | None = None,
               high: dict[str, Any] | None = None) -> None:
    """Write ``plan`` into ``job``'s graphs (``prepared``/``high``: see ``quantize_weights``)."""
    job.record["layers_quantized"] = [lin.weight for lin in linear_layers(job.graphs["model"])]
    job.record.update(quantize_weights(job, plan, prepared, high))
    job.precision.update(weights="int4", weight_block_size=plan.block, weight_zero_points=True, lm_head="int8")
    if config.format == "matmulnbits":
        job.precision.update(cpu_only=True, accuracy_level=config.accuracy_level)
        job.record["accuracy_level"] = config.accuracy_level
    else:
        job.precision.update(cpu_only=False, tensorrt_min_version=TENSORRT_MIN_VERSION)


def fitted_block(model: onnx.ModelProto, block: int) -> int:
    """``block``, halved (down to 16) until it fits the narrowest linear layer's input: a wider
    block would be padded with zeros, and MatMulNBits stores the padding (tiny models)."""
    inits = initializers(model)
    narrowest = min((inits[lin.weight].dims[0] for lin in linear_layers(model)), default=block)
    while block > 16 and block > narrowest:
        block //= 2
    return block

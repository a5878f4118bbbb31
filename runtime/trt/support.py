"""What TensorRT's ONNX parser accepts, per TensorRT version (data, no logic beyond a lookup).

Sources (checked 2026-11-26; re-check when a new TensorRT ships):
- onnx-tensorrt ``docs/operators.md`` "Supported ONNX Operators" for TensorRT 10.15 (opset 9..24) — the
  operator list and dtypes below; the 10.0..10.3 pages say "opset 9 to opset 20".
- TensorRT 10.3 (JetPack 6.1/6.2) parser is built with ONNX 1.16 -> IR version <= 10, opset <= 20.
  Operators of opsets 21..24 (Attention, RMSNormalization, RotaryEmbedding, TensorScatter) are not
  in it; an int4 ``DequantizeLinear`` with ``block_size`` needs opset 21, so on 10.3 it is refused.
- TensorRT 11.x: "ONNX Opset Guide" (ONNX 1.20 -> IR <= 13), release notes 11.0 (Swish added),
  11.2 (DFT added), 11.5 (opset 25, ONNX 1.22). We take opset <= 24 so that every 11.x parses it.
  11.x removed weak typing (BuilderFlag.FP16/INT8/..., calibrators): precision comes from the graph.
  JetPack does not ship 11.x (migration guide, 11.3/11.4): on a Jetson use ``--trt 10.3``.
- "10.x" means the newest 10.x table (10.15, opset <= 24); its IR limit is kept at 10, the one every
  10.x parser reads, because we could not confirm the ONNX release each later 10.x was built with.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

# Operators marked "Y" in the TensorRT 10.15 table that TensorRT 10.3 also parses.
_OPS_10 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
_OPS_10_LATEST = _OPS_10 | {"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"}
_OPS_11 = _OPS_10_LATEST | {"Swish", "DFT"}

# Operators a quantizer or exporter commonly emits that TensorRT refuses, with the fix.
KNOWN_UNSUPPORTED: dict[str, str] = {
    "DynamicQuantizeLinear": "runtime (dynamic) activation quantization is not supported; quantize "
                             "with static symmetric Q/DQ (or weight-only int8/int4 DequantizeLinear)",
    "MatMulInteger": "integer matmul (onnxruntime quantize_dynamic output) is not supported; use Q/DQ "
                     "around a float MatMul",
    "ConvInteger": "integer conv is not supported; use Q/DQ around a float Conv",
    "QLinearMatMul": "QOperator format is not supported; quantize to the QDQ format",
    "QLinearConv": "QOperator format is not supported; quantize to the QDQ format",
    "Bernoulli": "not supported", "BitShift": "not supported", "Compress": "not supported",
    "Unique": "not supported", "Multinomial": "not supported; sample on the host",
    "Optional": "optional types are not supported",
}

# Types TensorRT has no tensors for at all (STRING, complex, wide unsigned).
FORBIDDEN_DTYPES = frozenset({TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.COMPLEX128,
                              TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64})
# "Quantized types": only as the input of DequantizeLinear / output of QuantizeLinear.
QUANTIZED_DTYPES = frozenset({TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN})
# Types that exist in TensorRT only as network inputs/outputs (UINT8) or are cast down (DOUBLE).
UNSIGNED_QUANT = frozenset({TensorProto.UINT8, TensorProto.UINT4})
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


@dataclass(frozen=True)
class TrtVersionSupport:
    """What one TensorRT release's ONNX parser reads.

    ``min_opset``/``max_opset``: inclusive range of the default-domain opset; ``max_ir_version``:
    the highest ONNX IR version its ONNX release knows; ``ops``: supported default-domain operators;
    ``block_quant``: int4 weights through block-quantized DequantizeLinear are documented;
    ``weak_typing``: BuilderFlag.FP16/INT8 still exist (10.x); gptedge never uses them.
    """

    name: str
    label: str
    min_opset: int
    max_opset: int
    max_ir_version: int
    ops: frozenset[str]
    block_quant: bool
    weak_typing: bool


SUPPORT: dict[str, TrtVersionSupport] = {
    "10.3": TrtVersionSupport("10.3", "TensorRT 10.3 (JetPack 6.1/6.2)", 9, 20, 10, _OPS_10,
                              block_quant=False, weak_typing=True),
    "10.x": TrtVersionSupport("10.x", "TensorRT 10.15 (newest 10.x, desktop)", 9, 24, 10, _OPS_10_LATEST,
                              block_quant=True, weak_typing=True),
    "11": TrtVersionSupport("11", "TensorRT 11.x (desktop; not in JetPack)", 9, 24, 13, _OPS_11,
                            block_quant=True, weak_typing=False),
}


def support_for(version: str) -> TrtVersionSupport:
    """The table for ``version`` (``"10.3"``, ``"10.x"``, ``"11"``; a full version like ``"10.3.0.30"``
    or ``"11.2.0"`` maps to the nearest table)."""
    from gptedge.runtime.errors import InputError

    if version in SUPPORT:
        return SUPPORT[version]
    parts = version.split(".")
    if parts[0] == "11":
        return SUPPORT["11"]
    if parts[0] == "10" and len(parts) > 1 and parts[1].isdigit():
        return SUPPORT["10.3"] if int(parts[1]) <= 3 else SUPPORT["10.x"]
    raise InputError(f"--trt {version}: unknown TensorRT version; choose one of {', '.join(SUPPORT)}")


def dtype_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()

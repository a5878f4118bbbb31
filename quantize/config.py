"""Quantization and pruning options: frozen dataclasses that validate themselves.

Each config is written verbatim (``asdict``) into the output manifest's ``history``, so a bundle
says how it was made. ``default_budget`` is the perplexity increase (percent) the quality gate
allows when the caller gives none (None: the caller must give one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from gptedge.runtime.errors import InputError
from gptedge.runtime.tolerances import QUALITY_BUDGET_PERCENT

# Numerically sensitive ops kept in FP32 inside FP16 graphs (norm statistics, softmax, exponentials).
FP16_KEEP_FP32 = ("LayerNormalization", "SimplifiedLayerNormalization", "ReduceMean", "Pow", "Sqrt",
                  "Reciprocal", "Div", "Softmax", "Exp", "Range", "CumSum")
CALIB_METHODS = ("minmax", "percentile", "entropy")
PRUNE_METHODS = ("magnitude", "wanda", "2:4", "structured")
INT4_FORMATS = ("matmulnbits", "qdq")
INT8_KERNELS = ("matmulinteger", "matmulnbits")
WEIGHT_ALGORITHMS = ("activation-mse", "mse", "rtn")  # gptedge.quantize.weight_only


def _fail(problems: list[str], what: str) -> None:
    if problems:
        raise InputError(f"invalid {what}: " + "; ".join(problems))


@dataclass(frozen=True)
class Fp16Config:
    """Weights and compute in FP16; ops in ``keep_fp32`` (and the RoPE angle path) stay FP32.

    Logits stay FP32 (the graph output dtype); the KV cache (past/present) becomes FP16.
    """

    keep_fp32: tuple[str, ...] = FP16_KEEP_FP32
    mode: ClassVar[str] = "fp16"
    default_budget: ClassVar[float | None] = QUALITY_BUDGET_PERCENT["fp16"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))
        _fail([f"keep_fp32 entry {op!r} is not an ONNX op type name" for op in self.keep_fp32
               if not isinstance(op, str) or not op.isidentifier()], "Fp16Config")


@dataclass(frozen=True)
class Int8DynamicConfig:
    """Int8 weights, activations quantized to int8 at run time (ORT CPU only).

    ``kernel="matmulnbits"`` (default): ``com.microsoft.MatMulNBits`` with 8 bits, asymmetric blocks
    of ``block_size`` input channels (uint8 zero points) and ``accuracy_level`` 4 (int8 compute: the
    VNNI/AMX kernels; 8-bit MatMulNBits has no fast fp32-compute kernel). ``block_size`` 32: on
    SmolLM2 +0.46 % perplexity at 73 tok/s, where 128 costs +1.09 % at 104 tok/s (README). The LM
    head is included; a tied embedding table reads the head's own uint8 tensor.
    ``algorithm``: see :mod:`gptedge.quantize.weight_only` (at 8 bits plain rounding is enough).
    ``kernel="matmulinteger"``: per-channel (``per_channel``) int8 weights through onnxruntime's
    ``quantize_dynamic`` (``MatMulInteger``/``DynamicQuantizeMatMul``). The bundle is CPU-only.
    """

    per_channel: bool = True
    kernel: str = "matmulnbits"
    block_size: int = 32
    accuracy_level: int = 4
    algorithm: str | None = "rtn"
    mode: ClassVar[str] = "int8-dynamic"
    default_budget: ClassVar[float | None] = QUALITY_BUDGET_PERCENT["int8-dynamic"]

    def __post_init__(self) -> None:
        problems = []
        if self.kernel not in INT8_KERNELS:
            problems.append(f"kernel={self.kernel!r} is not one of {INT8_KERNELS}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            problems.append(f"block_size={self.block_size!r} must be a power of two >= 16")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            problems.append(f"accuracy_level={self.accuracy_level!r} must be 0-4")
        if self.algorithm is not None and self.algorithm not in WEIGHT_ALGORITHMS:
            problems.append(f"algorithm={self.algorithm!r} must be one of {WEIGHT_ALGORITHMS} or None")
        _fail(problems, "Int8DynamicConfig")


@dataclass(frozen=True)
class Int8Config:
    """Static (calibrated) int8 in QDQ form for TensorRT and CPU.

    Symmetric, zero-point 0 everywhere: activations per tensor, weights per output channel. Only the
    inputs of linear layers (MatMul with a weight initializer, the LM head included) are quantized;
    attention-score MatMuls and the mask path stay in float.

    - ``calib_method``: ``minmax``, ``percentile`` (``percentile`` of |x|) or ``entropy`` (KL).
    - ``calib_windows`` sequences of ``calib_seq_len`` tokens (None: half the context, at most 256) are run as a
      prefill and then ``calib_decode_steps`` real decode steps each, so decode ranges are seen.
    - ``smoothquant_alpha``: migrate activation outliers into the preceding norm (None: off). 0.5 by
      default: the SmolLM2 table's int8 row (+0.07 %) was measured with it.
    - ``float_search_budget``: percent perplexity increase (on ``search_windows`` calibration
      windows of ``search_seq_len`` tokens) the int8 activations may cost; the most sensitive
      linear inputs, measured one by one, stay float until the rest fit (their weights stay
      int8). None: every linear input is int8 (see quantize/int8_search.py).
    """

    calib_method: str = "minmax"
    percentile: float = 99.99
    calib_windows: int = 16
    calib_seq_len: int | None = None
    calib_decode_steps: int = 8
    smoothquant_alpha: float | None = 0.5
    float_search_budget: float | None = 0.0
    search_windows: int = 4
    # 128-token windows under-measured SmolLM2's loss (later positions are more sensitive): the
    # search windows are as long as the windows perplexity is judged on.
    search_seq_len: int = 256
    mode: ClassVar[str] = "int8"
    default_budget: ClassVar[float | None] = QUALITY_BUDGET_PERCENT["int8"]

    def __post_init__(self) -> None:
        problems = []
        if self.calib_method not in CALIB_METHODS:
            problems.append(f"calib_method={self.calib_method!r} must be one of {CALIB_METHODS}")
        if not 50.0 < self.percentile <= 100.0:
            problems.append(f"percentile={self.percentile} must be in (50, 100]")
        for name in ("calib_windows", "calib_decode_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a non-negative integer")
        if self.calib_windows == 0:
            problems.append("calib_windows must be at least 1")
        if self.calib_seq_len is not None and self.calib_seq_len < 2:
            problems.append(f"calib_seq_len={self.calib_seq_len} must be at least 2")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            problems.append(f"smoothquant_alpha={self.smoothquant_alpha} must be in [0, 1]")
        if self.float_search_budget is not None and not self.float_search_budget >= 0.0:
            problems.append(f"float_search_budget={self.float_search_budget} must be >= 0 (percent) or None")
        if not isinstance(self.search_windows, int) or self.search_windows < 1:
            problems.append(f"search_windows={self.search_windows!r} must be a positive integer")
        if not isinstance(self.search_seq_len, int) or self.search_seq_len < 2:
            problems.append(f"search_seq_len={self.search_seq_len!r} must be an integer >= 2")
        _fail(problems, "Int8Config")


@dataclass(frozen=True)
class Int4Config:
    """Weight-only int4 in asymmetric blocks of ``block_size`` input channels; the LM head (and a
    tied embedding table with it) in int8.

    ``format="matmulnbits"``: onnxruntime's ``MatMulNBits`` (com.microsoft, CPU-only);
    ``accuracy_level`` is its compute type (4 = int8 activations). ``format="qdq"``: standard
    ONNX blocked ``DequantizeLinear`` (int4, opset 21, zero-point 0) + ``MatMul``, which TensorRT
    runs as weight-only INT4; the zero points ride on a small float offset path.
    ``algorithm``: ``activation-mse`` (needs calibration text), ``mse``, ``rtn``; None picks
    ``activation-mse`` when calibration text is given, else ``mse``
    (:mod:`gptedge.quantize.weight_only`). ``calib_windows``: windows for the activation statistics.
    ``zero_points="float"``: exact float zero points through the offset path (a GGUF Q4_1 grid comes
    back exactly); ``"integer"`` (``matmulnbits`` only): uint4 zero points inside MatMulNBits, no
    offset path (fewer nodes per layer, but a float-minimum grid is only approximated).
    """

    block_size: int = 32
    accuracy_level: int = 4
    format: str = "matmulnbits"
    algorithm: str | None = None
    calib_windows: int = 16
    zero_points: str = "float"
    mode: ClassVar[str] = "int4"
    default_budget: ClassVar[float | None] = QUALITY_BUDGET_PERCENT["int4"]

    def __post_init__(self) -> None:
        problems = []
        if self.block_size not in (16, 32, 64, 128, 256):
            problems.append(f"block_size={self.block_size} must be 16, 32, 64, 128 or 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            problems.append(f"accuracy_level={self.accuracy_level} must be 0..4")
        if self.format not in INT4_FORMATS:
            problems.append(f"format={self.format!r} must be one of {INT4_FORMATS}")
        if self.algorithm is not None and self.algorithm not in WEIGHT_ALGORITHMS:
            problems.append(f"algorithm={self.algorithm!r} must be one of {WEIGHT_ALGORITHMS} or None")
        if self.zero_points not in ("float", "integer"):
            problems.append(f"zero_points={self.zero_points!r} must be 'float' or 'integer'")
        elif self.zero_points == "integer" and self.format == "qdq":
            problems.append("zero_points='integer' needs format='matmulnbits' (TensorRT's DequantizeLinear "
                            "wants zero-point 0)")
        if not isinstance(self.calib_windows, int) or self.calib_windows < 1:
            problems.append(f"calib_windows={self.calib_windows!r} must be a positive integer")
        _fail(problems, "Int4Config")


PrecisionConfig = Fp16Config | Int8DynamicConfig | Int8Config | Int4Config

@dataclass(frozen=True)
class PruneConfig:
    """One-shot pruning of the transformer blocks' linear layers (the LM head is left dense).

    - ``magnitude``: zero the ``sparsity`` fraction of smallest |W| in every matrix.
    - ``wanda``: score |W| * ||X|| (input-channel activation norm from calibration), prune per output.
    - ``2:4``: in every group of 4 consecutive input weights keep the 2 best (Wanda score when
      calibration text is given, else |W|); ``sparsity`` must be 0.5.
    - ``structured``: remove whole MLP neurons (the matrices really shrink, decode gets faster).
    ``then``: a precision config applied after pruning (e.g. ``Int8Config()``).
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    then: PrecisionConfig | None = None
    calib_windows: int = 16
    mode: ClassVar[str] = "prune"
    default_budget: ClassVar[float | None] = None

    def __post_init__(self) -> None:
        problems = []
        if self.method not in PRUNE_METHODS:
            problems.append(f"method={self.method!r} must be one of {PRUNE_METHODS}")
        if not 0.0 < self.sparsity < 1.0:
            problems.append(f"sparsity={self.sparsity} must be in (0, 1)")
        if self.method == "2:4" and self.sparsity != 0.5:
            problems.append("2:4 pruning has sparsity 0.5 exactly; pass sparsity=0.5")
        if self.then is not None and not isinstance(self.then, PrecisionConfig.__args__):
            problems.append(f"then={self.then!r} must be a precision config (Fp16Config, Int8Config, ...)")
        _fail(problems, "PruneConfig")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "wanda" or isinstance(self.then, Int8Config)


@dataclass(frozen=True)
class MixedConfig:
    """Budget-driven mixed precision over ``base`` (:mod:`gptedge.quantize.mixed`).

    Each unit's sensitivity (``Int4Config``: every linear layer but the LM head; ``Int8Config``:
    every linear input) is the KL divergence of the next-token distributions, on ``search_windows``
    calibration windows of ``search_seq_len`` tokens, when that unit alone is at the low precision
    (as the perplexity increase it predicts). The most sensitive
    stay at the higher one (int4 -> int8 weights, int4-qdq -> float16 weights; int8 static -> float
    activations, int8 weights)
    until the increase measured on the evaluation text, in windows of ``eval_window`` tokens each
    scored from its own start, is at most ``max_ppl_increase`` percent. Needs calibration text.
    """

    base: Int4Config | Int8Config
    max_ppl_increase: float
    search_windows: int = 2
    search_seq_len: int = 256
    eval_window: int = 256
    mode: ClassVar[str] = "mixed"

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.base, Int4Config | Int8Config):
            problems.append(f"base={self.base!r} must be Int4Config or Int8Config")
        if not isinstance(self.max_ppl_increase, int | float) or not self.max_ppl_increase >= 0:
            problems.append(f"max_ppl_increase={self.max_ppl_increase!r} must be >= 0 (percent)")
        for name in ("search_windows", "search_seq_len", "eval_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "search_windows" else 2):
                problems.append(f"{name}={value!r} must be a positive integer (sequence lengths >= 2)")
        _fail(problems, "MixedConfig")

    @property
    def default_budget(self) -> float:
        """The quality gate's budget is the plan's own."""
        return float(self.max_ppl_increase)


QuantConfig = PrecisionConfig | PruneConfig | MixedConfig

# Perplexity increase (%) each mode's defaults measured on SmolLM2-135M-Instruct (README: wikitext-2
# test windows, calibrated on wiki.valid.raw); told to users who give no evaluation text.
SMOLLM2_MEASURED_PCT = {"fp16": 0.01, "int8-dynamic": 0.46, "int8": 0.07, "int4": 0.50, "int4-qdq": 0.55}


def mode_name(config: PrecisionConfig) -> str:
    """The CLI's ``--mode`` for ``config`` (``int4-qdq`` for a QDQ :class:`Int4Config`)."""
    return "int4-qdq" if isinstance(config, Int4Config) and config.format == "qdq" else config.mode


def ungated_note(config: QuantConfig) -> str:
    """What to tell a caller whose bundle was written without a quality gate (no evaluation text):
    the figure this mode measured on the reference model, and how to measure theirs."""
    if isinstance(config, PruneConfig):
        return ("quality gate skipped: pruning's cost depends on the model and the sparsity; pass --eval TEXT "
                "and --max-ppl-increase PCT to measure and bound it")
    if isinstance(config, MixedConfig):  # always gated in practice: its evaluation text defaults to --calib's tail
        config = config.base
    mode = mode_name(config)
    return (f"quality gate skipped (no --eval or --calib text): on SmolLM2-135M-Instruct {mode} measured "
            f"{SMOLLM2_MEASURED_PCT[mode]:+.2f} % perplexity with these defaults (budget {config.default_budget:g} %); "
            "pass --eval TEXT to measure yours")


def config_record(config: QuantConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict with its mode (for the manifest history)."""
    data = asdict(config)
    if isinstance(config, PruneConfig) and config.then is not None:
        data["then"] = config_record(config.then)
    if isinstance(config, MixedConfig):
        data["base"] = config_record(config.base)
    return {"mode": config.mode, "type": type(config).__name__, **data}

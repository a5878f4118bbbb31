"""``gptedge plan``: will this bundle fit the target's memory, and how long a context can it hold?

All numbers are bytes unless named otherwise. The estimate is deliberately simple and shown term by
term, so a user can see which part to shrink:

    total = weights + KV cache + activations + workspace

- weights: every initializer of the generation graph, by its stored dtype (int4 = 0.5 byte); for the
  other precisions the same parameters re-priced (2-D matrices at the precision's width plus their
  scales, everything else fp16; fp32 keeps everything fp32).
- KV cache: ``batch x context x layers x 2 x kv_heads x head_dim x bytes(kv_cache_dtype)``, times
  ``KV_BUFFERS`` because the TensorRT backend alternates two preallocated buffers (present of step t
  is written where the past of step t+1 is read: no copy, but twice the memory).
- activations: one layer's worth at the worst shape (prefill of ``context`` tokens; TensorRT reuses
  activation memory across layers): hidden/MLP tensors plus the ``heads x seq x total`` attention
  scores, plus the logits output.
- workspace: the builder's tactic scratch limit (``--workspace``), held by the execution context.

Usable memory: a Jetson shares its RAM between the OS, CUDA/TensorRT libraries and the model; we
reserve ``JETSON_RESERVE_GB`` (so an 8 GB Orin Nano leaves ~5 GB for a model). A desktop GPU keeps
``DESKTOP_RESERVE_GB`` for the CUDA context and display.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from gptedge.runtime.bundle import Architecture, Bundle, load_bundle
from gptedge.runtime.errors import InputError

GB = 1024**3
MB = 1024**2
KV_BUFFERS = 2
JETSON_RESERVE_GB = 3.0
DESKTOP_RESERVE_GB = 1.0
DEFAULT_WORKSPACE_MB = 512
INT4_BLOCK = 128  # elements per fp16 scale in block-quantized int4 weights

_DTYPE_BYTES: dict[int, float] = {TensorProto.FLOAT: 4.0, TensorProto.FLOAT16: 2.0, TensorProto.BFLOAT16: 2.0,
                TensorProto.DOUBLE: 8.0, TensorProto.INT64: 8.0, TensorProto.INT32: 4.0,
                TensorProto.INT8: 1.0, TensorProto.UINT8: 1.0, TensorProto.INT4: 0.5,
                TensorProto.UINT4: 0.5, TensorProto.FLOAT8E4M3FN: 1.0, TensorProto.BOOL: 1.0}
KV_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
PRECISIONS = ("fp32", "fp16", "int8", "int4")
_MANIFEST_PRECISION = {"float32": "fp32", "float16": "fp16", "int8": "int8", "int4": "int4"}


@dataclass(frozen=True)
class Target:
    """A device class. ``memory_gb``: allowed memory sizes (first = default); ``reserve_gb``: memory
    not available to the model; ``compute_capability``: SM version (None = any desktop GPU)."""

    name: str
    label: str
    memory_gb: tuple[float, ...]
    reserve_gb: float
    compute_capability: str | None
    trt: str

    def usable_bytes(self, memory_gb: float | None = None) -> int:
        total = self.memory_gb[0] if memory_gb is None else memory_gb
        if self.compute_capability and memory_gb is not None and memory_gb not in self.memory_gb:
            sizes = " or ".join(f"{m:g}" for m in sorted(self.memory_gb))
            raise InputError(f"--memory-gb {memory_gb:g}: {self.label} comes with {sizes} GB")
        if total <= self.reserve_gb:
            raise InputError(f"--memory-gb {total:g}: must exceed the {self.reserve_gb:g} GB reserve")
        return int((total - self.reserve_gb) * GB)


TARGETS: dict[str, Target] = {
    "jetson-orin-nano": Target("jetson-orin-nano", "Jetson Orin Nano", (8, 4), JETSON_RESERVE_GB, "8.7", "10.3"),
    "jetson-orin-nx": Target("jetson-orin-nx", "Jetson Orin NX", (16, 8), JETSON_RESERVE_GB, "8.7", "10.3"),
    "jetson-orin-agx": Target("jetson-orin-agx", "Jetson AGX Orin", (64, 32), JETSON_RESERVE_GB, "8.7", "10.3"),
    "desktop": Target("desktop", "desktop GPU", (8,), DESKTOP_RESERVE_GB, None, "10.x"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise InputError(f"--target {name}: unknown; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


@dataclass(frozen=True)
class WeightTensor:
    name: str
    dims: tuple[int, ...]
    dtype: int
    is_qparam: bool = False  # a Q/DQ scale or zero-point: overhead of the stored format only

    @property
    def numel(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def ndim(self) -> int:
        return len(self.dims)


def weight_inventory(model: onnx.ModelProto) -> list[WeightTensor]:
    """Every initializer (and Constant value) of ``model`` with its element count and dtype."""
    out: dict[str, WeightTensor] = {}
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    qparams = {name for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for name in n.input[1:]}
    for t in tensors:
        out[t.name or f"const{len(out)}"] = WeightTensor(t.name, tuple(int(d) for d in t.dims), t.data_type,
                                                         t.name in qparams)
    return list(out.values())


def weights_bytes(inventory: list[WeightTensor], precision: str | None = None) -> int:
    """Bytes of weights as stored (``precision=None``) or re-priced at ``fp32|fp16|int8|int4``."""
    total = 0.0
    for w in inventory:
        if precision is None:
            total += w.numel * _DTYPE_BYTES.get(w.dtype, 4.0)
        elif w.is_qparam:
            continue  # re-priced precisions add their own scales
        elif w.dtype in (TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL):
            total += w.numel * _DTYPE_BYTES[w.dtype]  # shape constants stay what they are
        elif precision == "fp32":
            total += w.numel * 4
        elif w.ndim == 2 and precision == "int8":
            total += w.numel * 1 + w.dims[-1] * 4  # + one fp32 scale per output channel ([in, out])
        elif w.ndim == 2 and precision == "int4":
            total += w.numel * 0.5 + w.numel / INT4_BLOCK * 2  # + fp16 scale per block
        else:
            total += w.numel * 2
    return int(total)


def kv_bytes(arch: Architecture, batch: int, context: int, kv_dtype: str, buffers: int = KV_BUFFERS) -> int:
    """KV cache: batch x context x layers x 2 x kv_heads x head_dim x bytes, times ``buffers``."""
    return buffers * batch * context * arch.kv_bytes_per_token(KV_DTYPE_BYTES.get(kv_dtype, 4))


def activation_bytes(arch: Architecture, batch: int, context: int, act_bytes: int,
                     full_logits: bool = False) -> int:
    """One layer's activations at a prefill of ``context`` tokens, plus the logits output (fp32)."""
    per_token = 4 * arch.hidden_size + 2 * arch.intermediate_size + 3 * arch.num_heads * arch.head_dim
    scores = 2 * arch.num_heads * context * context  # attention scores + softmax output
    logits_rows = context if full_logits else 1
    return batch * ((per_token * context + scores) * act_bytes + logits_rows * arch.vocab_size * 4)


@dataclass(frozen=True)
class PlanRow:
    """One precision: each term in bytes at (batch, context), whether it fits, and the longest
    context (tokens, capped at the model's max_context) that still fits at that batch."""

    precision: str
    weights: int
    kv: int
    activations: int
    workspace: int
    largest_context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.workspace


@dataclass
class MemoryPlan:
    target: Target
    usable: int
    batch: int
    context: int
    kv_dtype: str
    as_built: str
    rows: list[PlanRow] = field(default_factory=list)

    def row(self, precision: str) -> PlanRow:
        return next(r for r in self.rows if r.precision == precision)

    def fits(self, precision: str | None = None) -> bool:
        return self.row(precision or self.as_built).total <= self.usable


def _largest_context(fixed: int, arch: Architecture, batch: int, kv_dtype: str, act_bytes: int,
                     full_logits: bool, usable: int) -> int:
    def total(n: int) -> int:
        return (fixed + kv_bytes(arch, batch, n, kv_dtype)
                + activation_bytes(arch, batch, n, act_bytes, full_logits))

    lo, hi = 0, arch.max_context
    while lo < hi:  # total(n) grows with n: find the largest n with total(n) <= usable
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= usable else (lo, mid - 1)
    return lo


def generation_graph(bundle: Bundle) -> tuple[str, Path]:
    """(role, path) of the graph to build for generation: model_last when present and portable."""
    entry = bundle.manifest.files.get("model_last")
    if entry and entry.get("portable", True) and (bundle.path / entry["path"]).is_file():
        return "model_last", bundle.path / entry["path"]
    return "model", bundle.model_path


def plan_memory(bundle_dir: str | os.PathLike[str], target: str | Target, max_context: int | None = None,
                max_batch: int = 1, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                memory_gb: float | None = None, role: str | None = None) -> MemoryPlan:
    """The memory plan of a bundle on ``target`` for every precision (see the module docstring)."""
    bundle = load_bundle(bundle_dir)
    arch = bundle.manifest.architecture
    context = max_context or arch.max_context
    if not 1 <= context <= arch.max_context:
        raise InputError(f"--max-context {context}: must be 1..{arch.max_context} (the bundle's max_context)")
    if max_batch < 1:
        raise InputError(f"--max-batch {max_batch}: must be >= 1")
    tgt = target if isinstance(target, Target) else get_target(target)
    usable = tgt.usable_bytes(memory_gb)
    role, path = (role, bundle.path / bundle.manifest.files[role]["path"]) if role else generation_graph(bundle)
    inventory = weight_inventory(onnx.load(str(path), load_external_data=False))
    kv_dtype = bundle.manifest.kv_cache_dtype
    act = KV_DTYPE_BYTES.get(kv_dtype, 4)
    full = role == "model"
    as_built = _MANIFEST_PRECISION.get(str(bundle.manifest.precision.get("weights", "float32")), "as built")
    plan = MemoryPlan(tgt, usable, max_batch, context, kv_dtype, as_built)
    workspace = workspace_mb * MB
    priced = [(p, weights_bytes(inventory, p)) for p in PRECISIONS]
    if as_built not in PRECISIONS:
        priced.append((as_built, weights_bytes(inventory)))
    for precision, weights in priced:
        if precision == as_built:
            weights = weights_bytes(inventory)  # the real stored bytes for the bundle's own precision
        largest = _largest_context(weights + workspace, arch, max_batch, kv_dtype, act, full, usable)
        plan.rows.append(PlanRow(precision, weights, kv_bytes(arch, max_batch, context, kv_dtype),
                                 activation_bytes(arch, max_batch, context, act, full), workspace, largest))
    return plan


def describe_misfit(plan: MemoryPlan, precision: str | None = None) -> str:
    """One line with the numbers, for EngineError messages."""
    r = plan.row(precision or plan.as_built)
    return (f"{r.precision} needs {r.total / GB:.2f} GB (weights {r.weights / GB:.2f} + KV {r.kv / GB:.2f} "
            f"+ activations {r.activations / GB:.2f} + workspace {r.workspace / GB:.2f}) at batch "
            f"{plan.batch}, context {plan.context}, but {plan.target.label} has {plan.usable / GB:.2f} GB "
            f"usable; the largest context that fits is {r.largest_context}")

"""Parity: the exported graph on onnxruntime CPU against the source model in torch.

A batch of two prompts of different lengths (left padding) is prefilled, then four decode steps
feed ``present.*`` back as ``past_key_values.*``. ``logits`` and every ``present.*`` are compared at
every step, on the positions that are not padding.

The criterion separates float noise from bugs: the source model runs twice on the same inputs, in
float64 (the reference) and in float32. float32 torch's own distance to the float64 reference is
the noise a correct float32 graph may show; the ONNX graph fails an output when its distance to the
reference exceeds ``noise_ratio`` times that noise plus ``noise_floor`` (see
:class:`~gptedge.exporter.config.ExportConfig`). A fixed max-abs cannot do this: a 30-layer model
with logits near ±30 shows ~1e-3 of pure float32 noise, while a tiny model shows ~1e-6.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from gptedge.quantize.graph_io import release_freed_memory
from gptedge.runtime import contract
from gptedge.runtime.bundle import MODEL_NAME, Architecture
from gptedge.runtime.errors import ParityError
from gptedge.runtime.tolerances import EXPORT_PARITY_NOISE_FLOOR, EXPORT_PARITY_NOISE_RATIO

log = logging.getLogger(__name__)

PROMPT_LENGTHS = (7, 4)
DECODE_STEPS = 4


def parity_inputs(arch: Architecture, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded prompts: ids [2, L], mask [2, L], positions [2, L] (padding at position 0)."""
    rng = np.random.default_rng(seed)
    length = max(PROMPT_LENGTHS)
    ids = rng.integers(0, arch.vocab_size, size=(len(PROMPT_LENGTHS), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        mask[row, length - n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def check_parity(bundle_dir: Path, reference: torch.nn.Module | Callable[[], torch.nn.Module], arch: Architecture,
                 noise_ratio: float = EXPORT_PARITY_NOISE_RATIO,
                 noise_floor: float = EXPORT_PARITY_NOISE_FLOOR) -> dict[str, Any]:
    """Compare ``bundle_dir/model.onnx`` with ``reference`` (a torch module called like the Decoder,
    or a function building one: it is then built only once onnxruntime's session is freed).

    ``reference`` runs in float32 as given and in float64. Returns the report stored in the
    manifest; raises :class:`ParityError` naming every output whose max-abs distance to the float64
    reference exceeds ``noise_ratio`` x float32 torch's own distance + ``noise_floor``.

    Memory: onnxruntime runs every step first and its session is freed before torch runs; the
    float64 pass converts one module's weights at a time (and back, exactly), so the peak stays
    near one float32 copy of the weights plus the onnxruntime session, never three copies.
    """
    steps = _onnx_steps(Path(bundle_dir) / MODEL_NAME, arch)
    release_freed_memory()
    if not isinstance(reference, torch.nn.Module):
        reference = reference()
    stats: dict[str, dict[str, float]] = {}
    for feeds, past, outputs in steps:
        want32 = _torch_outputs(reference, feeds, past, arch, torch.float32)
        with _float64_one_module_at_a_time(reference):
            want64 = _torch_outputs(reference, feeds, past, arch, torch.float64)
        ids, mask = feeds[contract.INPUT_IDS], feeds[contract.ATTENTION_MASK]
        query_valid = mask[:, -ids.shape[1]:].astype(bool)[..., None]  # B, S, 1
        key_valid = mask.astype(bool)[:, None, :, None]  # B, 1, T, 1
        for name, want in want64.items():
            valid = query_valid if name == contract.LOGITS else key_valid
            _compare(stats, name, outputs[name], want32[name], want, valid)
        _count_top1(stats[contract.LOGITS], outputs[contract.LOGITS], want64[contract.LOGITS], query_valid[..., 0])
    return _report(stats, noise_ratio, noise_floor)


def _onnx_steps(model_path: Path, arch: Architecture) -> list[tuple[dict, dict, dict]]:
    """(feeds, past, outputs) of a prefill and ``DECODE_STEPS`` decode steps on onnxruntime; each
    step's past is the previous step's present (torch is later fed the same ONNX cache)."""
    options = ort.SessionOptions()
    # A handful of tiny batches: MLAS's prepacked weight copies and the arena would only raise the
    # export's peak memory by another copy of the weights.
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ids, mask, positions = parity_inputs(arch)
    rng = np.random.default_rng(1)
    kv_shape = (ids.shape[0], arch.num_kv_heads, 0, arch.head_dim)
    past = {n: np.zeros(kv_shape, np.float32) for n in contract.past_names(arch.num_layers)}
    steps = []
    for _step in range(DECODE_STEPS + 1):
        feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask, contract.POSITION_IDS: positions}
        outputs = dict(zip(names, session.run(None, {**feeds, **past})))
        steps.append((feeds, past, outputs))
        past = {contract.past_name(i, k): outputs[contract.present_name(i, k)]
                for i in range(arch.num_layers) for k in ("key", "value")}
        ids = rng.integers(0, arch.vocab_size, size=(ids.shape[0], 1), dtype=np.int64)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return steps


@contextlib.contextmanager
def _float64_one_module_at_a_time(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in float64 without a float64 copy of it: buffers (RoPE frequencies) become
    float64 for the whole pass, each module's own parameters just for its forward call. The
    float32 tensors are put back as they were (not converted back): a model loaded through a
    memory map (transformers' safetensors) would otherwise get an anonymous copy of every weight
    while the mapped file stays resident, twice the weights at the end of the pass. Tied
    parameters stay one object. Plain ``Linear`` and ``Embedding`` modules (the LM head and the
    token table are the largest) never hold a float64 copy of their weight (see
    :func:`_float64_forward`)."""
    originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}

    def to64(module, _args):
        for param in module.parameters(recurse=False):
            if id(param) not in originals:
                originals[id(param)] = (param, param.data)
                param.data = param.data.double()

    def to32(module, _args, _output):
        for param in module.parameters(recurse=False):
            if id(param) in originals:
                param.data = originals.pop(id(param))[1]

    direct = [m for m in model.modules()
              if type(m) in (torch.nn.Linear, torch.nn.Embedding) and "forward" not in vars(m)]
    owners = [m for m in model.modules() if any(p.is_floating_point() for p in m.parameters(recurse=False))
              and not any(m is d for d in direct)]
    hooks = [h for m in owners for h in (m.register_forward_pre_hook(to64), m.register_forward_hook(to32))]
    for module in direct:
        module.forward = functools.partial(_float64_forward, module)
    buffers = [(m, name, b) for m in model.modules() for name, b in m.named_buffers(recurse=False)
               if b is not None and b.dtype == torch.float32]
    for module, name, buffer in buffers:
        setattr(module, name, buffer.double())
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module in direct:
            del module.forward
        for module, name, buffer in buffers:
            setattr(module, name, buffer)
        for param, data in originals.values():  # a forward that raised leaves its module in float64
            param.data = data


FLOAT64_CHUNK = 1 << 22  # weight elements converted at once: 32 MB of float64


def _float64_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s forward in float64 with its float32 weight converted a slice at a time: an
    embedding looks its float32 rows up and converts only those (the same values); a linear
    layer multiplies by row blocks of its weight (a block of output features each)."""
    if isinstance(module, torch.nn.Embedding):
        return torch.nn.functional.embedding(x, module.weight, module.padding_idx, module.max_norm,
                                             module.norm_type, module.scale_grad_by_freq, module.sparse).double()
    assert isinstance(module, torch.nn.Linear)
    weight, bias = module.weight, module.bias
    rows = max(1, FLOAT64_CHUNK // max(int(weight.shape[1]), 1))
    parts = [torch.nn.functional.linear(x, weight[i:i + rows].double(),
                                        None if bias is None else bias[i:i + rows].double())
             for i in range(0, weight.shape[0], rows)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _torch_outputs(reference, feeds: dict[str, np.ndarray], past: dict[str, np.ndarray],
                   arch: Architecture, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """``reference``'s logits and presents, as float64 numpy, keyed by the ONNX output names."""
    cache = [tuple(torch.from_numpy(past[contract.past_name(i, k)]).to(dtype) for k in ("key", "value"))
             for i in range(arch.num_layers)]
    with torch.no_grad():
        logits, presents = reference(*(torch.from_numpy(feeds[n]) for n in
                                       (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS)), cache)
    result = {contract.LOGITS: logits.double().numpy()}
    for i, pair in enumerate(presents):
        for kind, tensor in zip(("key", "value"), pair):
            result[contract.present_name(i, kind)] = tensor.double().numpy()
    return result


def _compare(stats: dict[str, dict[str, float]], name: str, got: np.ndarray, want32: np.ndarray,
             want64: np.ndarray, valid: np.ndarray) -> None:
    """Fold one step's distances (ONNX and float32 torch, each to float64) into ``stats[name]``."""
    if got.shape != want64.shape:
        raise ParityError(f"parity: output {name} has shape {got.shape}, the source model {want64.shape}")
    valid = np.broadcast_to(valid, got.shape)
    diff = np.where(valid, np.abs(got.astype(np.float64) - want64), 0.0)
    noise = np.where(valid, np.abs(want32 - want64), 0.0)
    entry = stats.setdefault(name, {"max_abs": 0.0, "fp32_max_abs": 0.0, "sum_abs": 0.0, "count": 0})
    entry["max_abs"] = max(entry["max_abs"], float(np.nan_to_num(diff, nan=np.inf).max()))
    entry["fp32_max_abs"] = max(entry["fp32_max_abs"], float(np.nan_to_num(noise, nan=np.inf).max()))
    entry["sum_abs"] += float(diff.sum())
    entry["count"] += int(valid.sum())


def _count_top1(entry: dict[str, float], got: np.ndarray, want: np.ndarray, valid: np.ndarray) -> None:
    """Count the valid positions [B, S] where ONNX and the float64 reference pick the same token."""
    same = got.argmax(-1) == want.argmax(-1)
    entry["top1_same"] = entry.get("top1_same", 0) + int((same & valid).sum())
    entry["top1_positions"] = entry.get("top1_positions", 0) + int(valid.sum())


def _judge(entry: dict[str, float], noise_ratio: float, noise_floor: float) -> dict[str, Any]:
    """One output's figures for the manifest: distances, their ratio, the allowance and the verdict."""
    allowed = noise_ratio * entry["fp32_max_abs"] + noise_floor
    figures = {"max_abs": entry["max_abs"], "mean_abs": entry["sum_abs"] / max(entry["count"], 1),
               "fp32_max_abs": entry["fp32_max_abs"],
               "ratio": entry["max_abs"] / entry["fp32_max_abs"] if entry["fp32_max_abs"] > 0 else None,
               "allowed": allowed, "passed": bool(np.isfinite(allowed) and entry["max_abs"] <= allowed)}
    if "top1_positions" in entry:
        figures["top1_agreement"] = entry["top1_same"] / max(entry["top1_positions"], 1)
        figures["top1_positions"] = entry["top1_positions"]
    return figures


def _report(stats: dict[str, dict[str, float]], noise_ratio: float, noise_floor: float) -> dict[str, Any]:
    outputs = {name: _judge(entry, noise_ratio, noise_floor) for name, entry in stats.items()}
    worst = max(outputs, key=lambda n: outputs[n]["max_abs"] / outputs[n]["allowed"])
    failed = sorted(n for n, v in outputs.items() if not v["passed"])
    logits = outputs[contract.LOGITS]
    report = {"criterion": "max-abs to float64 source <= noise_ratio * float32 source's max-abs + noise_floor",
              "noise_ratio": noise_ratio, "noise_floor": noise_floor,
              "prompt_lengths": list(PROMPT_LENGTHS), "decode_steps": DECODE_STEPS,
              "max_abs": max(v["max_abs"] for v in outputs.values()), "worst_output": worst,
              "mean_abs": float(np.mean([v["mean_abs"] for v in outputs.values()])),
              "top1_agreement": logits["top1_agreement"], "passed": not failed, "outputs": outputs}
    if failed:
        listing = ", ".join(f"{n} (max-abs {outputs[n]['max_abs']:.3g} vs float64, allowed "
                            f"{outputs[n]['allowed']:.3g} = {noise_ratio:g} x float32 noise "
                            f"{outputs[n]['fp32_max_abs']:.3g} + {noise_floor:g})" for n in failed)
        raise ParityError(f"parity failed: {len(failed)} of {len(outputs)} outputs exceed float32 noise: "
                          f"{listing}; top-1 agreement {logits['top1_agreement']:.2%}. The export does not "
                          "reproduce the source model; report this with the checkpoint config")
    log.info("parity passed: worst %s max-abs %.3g (allowed %.3g), top-1 agreement %.2f%%", worst,
             outputs[worst]["max_abs"], outputs[worst]["allowed"], 100 * logits["top1_agreement"])
    return report

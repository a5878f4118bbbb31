"""Parity: the exported graph on onnxruntime CPU against the source model in torch.

A batch of two prompts of different lengths (left padding) is prefilled, then four decode steps
feed ``present.*`` back as ``past_key_values.*``. ``logits`` and every ``present.*`` are compared at
every step, on the positions that are not padding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from gptedge.runtime import contract
from gptedge.runtime.bundle import MODEL_NAME, Architecture
from gptedge.runtime.errors import ParityError

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


def check_parity(bundle_dir: Path, reference: Any, arch: Architecture, tolerance: float = 1e-4) -> dict[str, Any]:
    """Compare ``bundle_dir/model.onnx`` with ``reference`` (same call convention as the Decoder).

    Returns the report stored in the manifest; raises :class:`ParityError` naming every output
    whose max-abs difference exceeds ``tolerance``.
    """
    session = ort.InferenceSession(str(Path(bundle_dir) / MODEL_NAME), providers=["CPUExecutionProvider"])
    ids, mask, positions = parity_inputs(arch)
    rng = np.random.default_rng(1)
    kv_shape = (ids.shape[0], arch.num_kv_heads, 0, arch.head_dim)
    past_onnx = {n: np.zeros(kv_shape, np.float32) for n in contract.past_names(arch.num_layers)}
    past_torch = [(torch.zeros(kv_shape), torch.zeros(kv_shape)) for _ in range(arch.num_layers)]
    stats: dict[str, list[float]] = {}
    for _step in range(DECODE_STEPS + 1):
        feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: mask, contract.POSITION_IDS: positions}
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {**feeds, **past_onnx})))
        with torch.no_grad():
            logits, presents = reference(torch.from_numpy(ids), torch.from_numpy(mask),
                                         torch.from_numpy(positions), past_torch)
        query_valid = mask[:, -ids.shape[1]:].astype(bool)  # B, S
        _compare(stats, contract.LOGITS, outputs[contract.LOGITS], logits.float().numpy(), query_valid[..., None])
        key_valid = mask.astype(bool)[:, None, :, None]  # B, 1, T, 1
        for i, (key, value) in enumerate(presents):
            for kind, tensor in (("key", key), ("value", value)):
                name = contract.present_name(i, kind)
                _compare(stats, name, outputs[name], tensor.float().numpy(), key_valid)
        past_onnx = {contract.past_name(i, k): outputs[contract.present_name(i, k)]
                     for i in range(arch.num_layers) for k in ("key", "value")}
        past_torch = [(torch.from_numpy(past_onnx[contract.past_name(i, "key")]),
                       torch.from_numpy(past_onnx[contract.past_name(i, "value")])) for i in range(arch.num_layers)]
        ids = rng.integers(0, arch.vocab_size, size=(ids.shape[0], 1), dtype=np.int64)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return _report(stats, tolerance)


def _compare(stats: dict[str, list[float]], name: str, got: np.ndarray, want: np.ndarray, valid: np.ndarray) -> None:
    if got.shape != want.shape:
        raise ParityError(f"parity: output {name} has shape {got.shape}, the source model {want.shape}")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    diff = np.where(np.broadcast_to(valid, diff.shape), diff, 0.0)
    count = max(int(np.broadcast_to(valid, diff.shape).sum()), 1)
    entry = stats.setdefault(name, [0.0, 0.0, 0.0])
    max_abs = float(np.nan_to_num(diff, nan=np.inf).max())
    entry[0] = max(entry[0], max_abs)
    entry[1] += float(diff.sum()) / count
    entry[2] += 1


def _report(stats: dict[str, list[float]], tolerance: float) -> dict[str, Any]:
    outputs = {name: {"max_abs": v[0], "mean_abs": v[1] / v[2]} for name, v in stats.items()}
    worst = max(outputs, key=lambda n: outputs[n]["max_abs"])
    failed = sorted(n for n, v in outputs.items() if not v["max_abs"] <= tolerance)
    report = {"tolerance": tolerance, "prompt_lengths": list(PROMPT_LENGTHS), "decode_steps": DECODE_STEPS,
              "max_abs": outputs[worst]["max_abs"], "worst_output": worst,
              "mean_abs": float(np.mean([v["mean_abs"] for v in outputs.values()])),
              "passed": not failed, "outputs": outputs}
    if failed:
        listing = ", ".join(f"{n} (max-abs {outputs[n]['max_abs']:.3g})" for n in failed)
        raise ParityError(f"parity failed: {len(failed)} outputs exceed max-abs {tolerance:g}: {listing}. "
                          "The export does not reproduce the source model; report this with the checkpoint config")
    log.info("parity passed: max-abs %.3g (%s), tolerance %g", report["max_abs"], worst, tolerance)
    return report

"""Optimization profiles (min/opt/max shapes per input) for a bundle's engine.

Two profiles, not one. TensorRT picks kernels (tactics) per profile, tuned at the profile's ``opt``
shape. One profile covering ``seq 1..N`` would be tuned at one middle point, so the decode step —
``seq = 1``, run once per generated token, the hot path — would run GEMM tactics chosen for a long
prompt. With two profiles the prefill profile is tuned for a prompt (``seq`` up to N, ``past 0``)
and the decode profile for ``seq = 1`` with a half-full cache. The price: the build takes about
twice as long and the backend keeps one execution context per profile (the decode context's
activation memory is tiny). Weights are stored once in the engine, shared by both profiles.

Profile 0 = prefill: batch 1..B, seq 1..N, past 0..N-1, total (attention_mask) 1..N.
Profile 1 = decode:  batch 1..B, seq 1,    past 0..N-1, total 1..N.
``past`` may be > 0 in prefill too (a prompt continued on a filled cache). TensorRT profiles are
boxes, so ``seq + past <= N`` is enforced by the backend, not by the profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptedge.runtime import contract
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError

Shape = tuple[int, ...]
PREFILL, DECODE = 0, 1


@dataclass(frozen=True)
class Profile:
    """``shapes[name] = (min, opt, max)`` for every engine input."""

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in sorted(self.shapes.items())}}


def _min_opt_max(shapes: list[Shape]) -> tuple[Shape, Shape, Shape]:
    low, opt, high = shapes
    return low, opt, high


def _kv(arch: Architecture, batch: tuple[int, int, int], past: tuple[int, int, int]) -> tuple[Shape, Shape, Shape]:
    return _min_opt_max([(b, arch.num_kv_heads, p, arch.head_dim) for b, p in zip(batch, past)])


def _profile(name: str, arch: Architecture, batch: tuple[int, int, int], seq: tuple[int, int, int],
             past: tuple[int, int, int], total: tuple[int, int, int]) -> Profile:
    ids = _min_opt_max([(b, s) for b, s in zip(batch, seq)])
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {
        contract.INPUT_IDS: ids,
        contract.POSITION_IDS: ids,
        contract.ATTENTION_MASK: _min_opt_max([(b, t) for b, t in zip(batch, total)]),
    }
    for name_ in contract.past_names(arch.num_layers):
        shapes[name_] = _kv(arch, batch, past)
    return Profile(name, shapes)


def engine_profiles(arch: Architecture, max_batch: int = 1, max_context: int | None = None) -> list[Profile]:
    """[prefill, decode] profiles for ``max_batch`` rows and contexts up to ``max_context`` tokens."""
    n = arch.max_context if max_context is None else max_context
    if not 1 <= n <= arch.max_context:
        raise InputError(f"--max-context {n}: must be 1..{arch.max_context} (the bundle's max_context)")
    if max_batch < 1:
        raise InputError(f"--max-batch {max_batch}: must be >= 1")
    batch = (1, max_batch, max_batch)
    prompt_opt = max(1, min(n, 128))  # a typical prompt; the tactic choice is not critical here
    past_max = max(n - 1, 0)
    prefill = _profile("prefill", arch, batch, seq=(1, prompt_opt, n), past=(0, 0, past_max),
                       total=(1, prompt_opt, n))
    half = past_max // 2
    decode = _profile("decode", arch, batch, seq=(1, 1, 1), past=(0, half, past_max), total=(1, half + 1, n))
    return [prefill, decode]


def profile_for(seq_len: int) -> int:
    """Index of the profile a step of ``seq_len`` new tokens runs in."""
    return DECODE if seq_len == 1 else PREFILL


def profiles_signature(profiles: list[Profile]) -> list[dict[str, Any]]:
    """A JSON-able description (part of the engine cache key)."""
    return [p.to_dict() for p in profiles]

"""RoPE inverse frequencies for every scaling the decoder implements, as transformers computes them.

``Architecture.rope_scaling`` holds a normalised HF dict (see ``checkpoints/hf_rope.py``): every value
the formulas read is resolved there, so these functions read no defaults of their own.
"""

from __future__ import annotations

import math

import torch

from gptedge.runtime.bundle import Architecture


def rope_kind(arch: Architecture) -> str:
    """The RoPE scaling type: ``default``, ``linear``, ``llama3``, ``yarn`` or ``longrope``."""
    scaling = arch.rope_scaling or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def attention_factor(arch: Architecture) -> float:
    """The factor cos and sin are multiplied by (yarn and longrope; 1 otherwise)."""
    return float((arch.rope_scaling or {}).get("attention_factor", 1.0))


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Unscaled inverse frequencies [dim/2] for base ``theta`` (float64)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def rope_inv_freq(arch: Architecture, theta: float | None = None, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [D/2] (float32) with ``arch.rope_scaling`` applied; ``theta`` overrides the
    base (Gemma 3's local layers, which transformers leaves unscaled); ``long`` picks longrope's
    long factors."""
    dim = arch.rotary_dim or arch.head_dim
    if theta is not None:
        return base_inv_freq(theta, dim).float()
    inv_freq = base_inv_freq(arch.rope_theta, dim)
    scaling = arch.rope_scaling or {}
    kind = rope_kind(arch)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq = _yarn(arch.rope_theta, dim, scaling)
    elif kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        inv_freq = inv_freq / factors
    return inv_freq.float()


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_context / low, old_context / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(base: float, dim: int, scaling: dict) -> torch.Tensor:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between."""
    factor, old_context = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(float(scaling["beta_fast"])), correction_dim(float(scaling["beta_slow"]))
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = base_inv_freq(base, dim)
    return extrapolation / factor * ramp + extrapolation * (1 - ramp)

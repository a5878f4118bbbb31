"""Checks of the Architecture's family switches (sliding windows, norms, scales ...), kept apart
from ``bundle.py`` so the manifest module stays small."""

from __future__ import annotations

import math
from typing import Any

QK_NORMS = ("none", "head", "all", "per_head")
NORM_PLACEMENTS = ("pre", "pre_post", "post", "post_residual")
PARALLEL_RESIDUALS = ("none", "shared_norm", "two_norms")


def family_problems(arch: Any) -> list[str]:
    """What is wrong with ``arch``'s family switches (see :class:`~gptedge.runtime.bundle.Architecture`)."""
    problems = []
    for name, allowed in (("qk_norm", QK_NORMS), ("norm_placement", NORM_PLACEMENTS),
                          ("parallel_residual", PARALLEL_RESIDUALS)):
        if getattr(arch, name) not in allowed:
            problems.append(f"{name}={getattr(arch, name)!r} must be one of {allowed}")
    if arch.rotary_dim is not None and not (_whole(arch.rotary_dim) and 2 <= arch.rotary_dim <= arch.head_dim
                                            and arch.rotary_dim % 2 == 0):
        problems.append(f"rotary_dim={arch.rotary_dim!r} must be an even number of features up to head_dim or null")
    if arch.sliding_window is not None and not (_whole(arch.sliding_window) and arch.sliding_window >= 1):
        problems.append(f"sliding_window={arch.sliding_window!r} must be a positive integer or null")
    for name in ("sliding_layers", "nope_layers"):
        layers = getattr(arch, name)
        if layers is not None and (not isinstance(layers, list) or
                                   not all(isinstance(i, int) and 0 <= i < arch.num_layers for i in layers)):
            problems.append(f"{name}={layers!r} must list layer indices below num_layers")
    for name in ("rope_interleaved", "norm_affine", "final_norm", "alibi_scaled", "embed_norm"):
        if not isinstance(getattr(arch, name), bool):
            problems.append(f"{name}={getattr(arch, name)!r} must be true or false")
    if not arch.norm_affine and arch.norm != "layernorm":
        problems.append("norm_affine=false needs norm='layernorm'")
    if arch.embed_proj_dim is not None and not (_whole(arch.embed_proj_dim) and arch.embed_proj_dim >= 1):
        problems.append(f"embed_proj_dim={arch.embed_proj_dim!r} must be a positive integer or null")
    optional = ("rope_local_theta", "attn_scale", "attn_softcap", "logit_softcap", "qkv_clip")
    for name in ("embed_scale", "residual_scale", "logit_divisor", *optional):
        value = getattr(arch, name)
        if not (value is None and name in optional) and not _positive(value):
            problems.append(f"{name}={value!r} must be a positive number" + (" or null" if name in optional else ""))
    if not isinstance(arch.norm_offset, (int, float)) or isinstance(arch.norm_offset, bool):
        problems.append(f"norm_offset={arch.norm_offset!r} must be a number")
    return problems


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0

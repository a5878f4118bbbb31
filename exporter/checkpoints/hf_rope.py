"""HF ``rope_scaling`` → the normalised dict the decoder reads (``gptedge.exporter.rope``).

Every value transformers would default or derive (YaRN's attention factor and betas, LongRoPE's
original context and attention factor) is resolved here, so the bundle's manifest states exactly
what the graph computes. ``dynamic`` (NTK) changes the frequencies only once a sequence outgrows
``max_position_embeddings``, and then from the history of calls; within that context it is the
unscaled RoPE, beyond it it is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import refuse
from gptedge.runtime.errors import InputError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "su", "dynamic")
_NEEDS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
          "longrope": ("short_factor", "long_factor")}


def rope_scaling(cfg: dict[str, Any], where: Path, context: int) -> dict[str, Any] | None:
    """The normalised scaling of ``cfg`` for a bundle of ``context`` tokens, None when unscaled."""
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        refuse(where, "rope_scaling", scaling, "expected a JSON object or null")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        refuse(where, "rope_scaling", kind, f"RoPE scaling types the decoder implements: {sorted(ROPE_TYPES)}")
    kind = "longrope" if kind == "su" else kind
    if kind == "default":
        return None
    missing = [k for k in _NEEDS[kind] if k not in scaling]
    if missing:
        raise InputError(f"{where}: rope_scaling of type {kind!r} lacks {missing}")
    if kind == "dynamic":
        if context > cfg["max_position_embeddings"]:
            refuse(where, "rope_scaling", "dynamic", "dynamic NTK scaling recomputes the frequencies from the "
                   "longest sequence seen so far, which one graph cannot hold; export with --max-context "
                   f"{cfg['max_position_embeddings']} or less (where it equals unscaled RoPE)")
        return None
    if kind == "yarn":
        return _yarn(cfg, scaling)
    if kind == "longrope":
        return _longrope(cfg, scaling, where)
    return {"rope_type": kind, **{k: scaling[k] for k in _NEEDS[kind]}}


def _yarn(cfg: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    factor = float(scaling["factor"])
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    return {"rope_type": "yarn", "factor": factor, "attention_factor": float(attention_factor),
            "beta_fast": float(scaling.get("beta_fast") or 32), "beta_slow": float(scaling.get("beta_slow") or 1),
            "truncate": bool(scaling.get("truncate", True)),
            "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings")
                                                    or cfg["max_position_embeddings"])}


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _longrope(cfg: dict[str, Any], scaling: dict[str, Any], where: Path) -> dict[str, Any]:
    """LongRoPE: short factors while a call's longest position fits the original context, long ones
    past it (transformers decides per forward call from ``max(position_ids) + 1``)."""
    original = cfg.get("original_max_position_embeddings")  # Phi-3 keeps it beside rope_scaling
    factor = scaling.get("factor")
    if original:
        factor = cfg["max_position_embeddings"] / original
    else:
        original = cfg["max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if factor is None:
            raise InputError(f"{where}: rope_scaling longrope needs 'factor' or a top-level "
                             "original_max_position_embeddings to derive its attention factor")
        factor = float(factor)
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    half = (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) // 2
    for key in ("short_factor", "long_factor"):
        if not isinstance(scaling[key], list) or len(scaling[key]) != half:
            raise InputError(f"{where}: rope_scaling {key} must list {half} numbers (head_dim / 2)")
    return {"rope_type": "longrope", "short_factor": [float(v) for v in scaling["short_factor"]],
            "long_factor": [float(v) for v in scaling["long_factor"]], "attention_factor": float(attention_factor),
            "original_max_position_embeddings": int(original)}

"""HF ``olmo`` (OLMo 1, 1B / 7B): Llama with LayerNorms that have no weight or bias (eps 1e-5) and
``clip_qkv`` clamping q, k and v after their projections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, RULES, SKIP, llama_keywords
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    keywords = llama_keywords(cfg, where, context)
    bias = bool(cfg.get("attention_bias", False))
    clip = cfg.get("clip_qkv")
    keywords.update(norm="layernorm", norm_eps=1e-5, norm_affine=False, norm_bias=False, qkv_bias=bias,
                    attn_out_bias=bias, qkv_clip=None if clip is None else float(clip))
    return Architecture(**keywords)


def olmo_type(model_type: str) -> str:
    """onnxruntime-genai runs OLMo under model.type "olmo"."""
    return "olmo"


FAMILIES = (Family(model_types=("olmo",), required=REQUIRED, architecture=_architecture, rules=RULES, skip=SKIP,
                   genai_type=olmo_type),)

"""HF ``helium`` (Kyutai Helium-1): Llama with RoPE on adjacent feature pairs (``rope_interleaved``),
optional q/k/v biases (``attention_bias``, never on ``o_proj``) and optional MLP biases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, RULES, SKIP, llama_keywords
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    keywords = llama_keywords(cfg, where, context)
    keywords.update(qkv_bias=bool(cfg.get("attention_bias", False)), attn_out_bias=False,
                    mlp_bias=bool(cfg.get("mlp_bias", False)), rope_interleaved=True)
    return Architecture(**keywords)


FAMILIES = (Family(model_types=("helium",), required=REQUIRED, architecture=_architecture, rules=RULES, skip=SKIP),)

"""HF ``granite``: Llama with four multipliers — embeddings, each sub-block's residual contribution,
the attention scores (in place of 1/sqrt(head_dim)) and the logits (divided by ``logits_scaling``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, RULES, SKIP, llama_keywords, same_type
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    keywords = llama_keywords(cfg, where, context)
    bias = bool(cfg.get("attention_bias", False))
    keywords.update(qkv_bias=bias, attn_out_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
                    embed_scale=float(cfg.get("embedding_multiplier", 1.0)),
                    residual_scale=float(cfg.get("residual_multiplier", 1.0)),
                    attn_scale=float(cfg.get("attention_multiplier", 1.0)),
                    logit_divisor=float(cfg.get("logits_scaling", 1.0)))
    return Architecture(**keywords)


FAMILIES = (Family(model_types=("granite",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   skip=SKIP, genai_type=same_type),)

"""HF ``olmo2``: norms after (not before) attention and MLP, and q/k RMSNorm over all heads' features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, SKIP, llama_keywords
from gptedge.exporter.checkpoints.hf_llama import RULES as LLAMA_RULES
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    keywords = llama_keywords(cfg, where, context)
    bias = bool(cfg.get("attention_bias", False))
    keywords.update(qkv_bias=bias, attn_out_bias=bias, norm_placement="post", qk_norm="all")
    return Architecture(**keywords)


RULES: tuple[Rule, ...] = (
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.attn_post_norm.weight", None, False),
    (r"layers\.(\d+)\.post_feedforward_layernorm\.weight", r"layers.\1.mlp_post_norm.weight", None, False),
    *LLAMA_RULES,  # first match wins: post_attention_layernorm follows attention here
)

FAMILIES = (Family(model_types=("olmo2",), required=REQUIRED, architecture=_architecture, rules=RULES, skip=SKIP),)

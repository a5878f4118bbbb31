"""HF ``phi3``: Llama with fused ``qkv_proj`` and ``gate_up_proj`` (already in the decoder's layout),
LongRoPE (``longrope`` / ``su``) scaling and a sliding window in every layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, llama_keywords, same_type
from gptedge.exporter.checkpoints.hf_llama import RULES as LLAMA_RULES
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    return Architecture(**llama_keywords(cfg, where, context))


RULES: tuple[Rule, ...] = (
    (r"layers\.(\d+)\.self_attn\.qkv_proj\.weight", r"layers.\1.attn.qkv.weight", None, False),
    (r"layers\.(\d+)\.mlp\.gate_up_proj\.weight", r"layers.\1.mlp.gate_up.weight", None, False),
    *LLAMA_RULES,
)

FAMILIES = (Family(model_types=("phi3",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   genai_type=same_type),)

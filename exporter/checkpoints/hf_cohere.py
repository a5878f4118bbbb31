"""HF ``cohere`` (Command R, Aya): attention and MLP in parallel on one LayerNorm without bias, SwiGLU,
RoPE rotating interleaved pairs, optional q/k LayerNorm per head with a weight per head
(``use_qk_norm``), logits multiplied by ``logit_scale``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, full_rotary, llama_sizes
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, SILU, SKIP
from gptedge.exporter.checkpoints.hf_llama import RULES as LLAMA_RULES
from gptedge.exporter.checkpoints.hf_rope import rope_scaling
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    full_rotary(cfg, where)
    bias = bool(cfg.get("attention_bias", False))
    return Architecture(
        **llama_sizes(cfg, where), norm="layernorm", norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), norm_bias=False,
        position="rope", rope_scaling=rope_scaling(cfg, where, context), rope_interleaved=True,
        activation=activation({"hidden_act": "silu", **cfg}, where, "hidden_act", SILU),
        qkv_bias=bias, attn_out_bias=bias, mlp_bias=False, parallel_residual="shared_norm",
        qk_norm="per_head" if cfg.get("use_qk_norm") else "none",
        logit_divisor=1.0 / float(cfg.get("logit_scale", 0.0625)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


RULES: tuple[Rule, ...] = LLAMA_RULES  # q_norm / k_norm weights are [heads, head_dim]

FAMILIES = (Family(model_types=("cohere",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   skip=SKIP),)

"""HF ``gemma``, ``gemma2``, ``gemma3_text``: GeGLU (tanh GELU), ``(1 + w)`` RMSNorm, embeddings
scaled by sqrt(hidden); Gemma 2/3 add norms after each sub-block, a query scale from
``query_pre_attn_scalar`` and alternating sliding / global layers; Gemma 2 soft-caps attention scores
and logits; Gemma 3 normalises q/k per head and gives its sliding layers their own RoPE base."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, llama_sizes, refuse, sliding
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, same_type
from gptedge.exporter.checkpoints.hf_llama import RULES as LLAMA_RULES
from gptedge.exporter.checkpoints.hf_rope import rope_scaling
from gptedge.runtime.bundle import Architecture

TANH_GELU = {"gelu_pytorch_tanh": "geglu_tanh", "gelu_new": "geglu_tanh"}


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    model_type = cfg["model_type"]
    if cfg.get("use_bidirectional_attention"):
        refuse(where, "use_bidirectional_attention", True, "the decoder is causal (this is an embedding model)")
    if cfg.get("attention_bias"):
        refuse(where, "attention_bias", True, "Gemma projections have no biases in the decoder's mapping")
    key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    keywords: dict[str, Any] = dict(
        **llama_sizes(cfg, where), norm="rmsnorm", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), norm_bias=False,
        norm_offset=1.0, position="rope", rope_scaling=rope_scaling(cfg, where, context),
        activation=activation({key: "gelu_pytorch_tanh", **cfg}, where, key, TANH_GELU),
        qkv_bias=False, attn_out_bias=False, mlp_bias=False, embed_scale=math.sqrt(cfg["hidden_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))
    if model_type == "gemma":
        return Architecture(**keywords)
    scalar = cfg.get("query_pre_attn_scalar")
    keywords.update(norm_placement="pre_post", attn_scale=float(scalar) ** -0.5 if scalar else None,
                    attn_softcap=cfg.get("attn_logit_softcapping"), logit_softcap=cfg.get("final_logit_softcapping"))
    if model_type == "gemma2":
        keywords.update(sliding(cfg, context, layers_default=list(range(0, cfg["num_hidden_layers"], 2))))
        return Architecture(**keywords)
    local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
    pattern = int(cfg.get("sliding_window_pattern", 6))
    local_layers = [i for i in range(cfg["num_hidden_layers"]) if (i + 1) % pattern]
    # the local RoPE base follows the sliding layers even where their window cannot cut the context
    window = sliding(cfg, context, layers_default=local_layers, keep=True)
    keywords.update(qk_norm="head", rope_local_theta=local_theta, **window)
    return Architecture(**keywords)


RULES: tuple[Rule, ...] = (
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.attn_post_norm.weight", None, False),
    (r"layers\.(\d+)\.pre_feedforward_layernorm\.weight", r"layers.\1.mlp_norm.weight", None, False),
    (r"layers\.(\d+)\.post_feedforward_layernorm\.weight", r"layers.\1.mlp_post_norm.weight", None, False),
    *LLAMA_RULES,  # first match wins: post_attention_layernorm means the post-attention norm here
)

FAMILIES = (
    Family(model_types=("gemma",), required=REQUIRED, architecture=_architecture, rules=LLAMA_RULES,
           genai_type=same_type),
    Family(model_types=("gemma2", "gemma3_text"), required=REQUIRED, architecture=_architecture, rules=RULES,
           genai_type=same_type),
)

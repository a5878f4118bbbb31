"""HF ``nemotron`` (Nemotron-3/4, Minitron): LayerNorm1P (LayerNorm with weight ``1 + w`` and a bias),
a squared-ReLU MLP without gate (``up_proj`` / ``down_proj``), partial rotary
(``partial_rotary_factor``), grouped-query attention. transformers' Nemotron always uses the
default RoPE, whatever ``rope_scaling`` says, and so does the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, llama_sizes
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, SKIP, same_type
from gptedge.exporter.checkpoints.hf_llama import RULES as LLAMA_RULES
from gptedge.exporter.checkpoints.hf_phi import rotary_dim
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    cfg = {"partial_rotary_factor": 0.5, **cfg}
    sizes = llama_sizes(cfg, where)
    bias = bool(cfg.get("attention_bias", False))
    return Architecture(
        **sizes, norm="layernorm", norm_eps=float(cfg.get("norm_eps", 1e-5)), norm_bias=True, norm_offset=1.0,
        position="rope", rotary_dim=rotary_dim(cfg, sizes["head_dim"]),
        activation=activation({"hidden_act": "relu2", **cfg}, where, "hidden_act", {"relu2": "relu2"}),
        qkv_bias=bias, attn_out_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


RULES: tuple[Rule, ...] = (
    (r"layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"layers.\1.mlp.up.\2", None, False),
    (r"norm\.(weight|bias)", r"norm.\1", None, False),
    *LLAMA_RULES,
)

FAMILIES = (Family(model_types=("nemotron",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   skip=SKIP, genai_type=same_type),)

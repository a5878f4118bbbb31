"""HF ``starcoder2``: biases everywhere (``use_bias``), LayerNorm, a plain GELU MLP (``c_fc`` /
``c_proj``), RoPE and a sliding window in every layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, full_rotary, llama_sizes, sliding
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, SKIP
from gptedge.exporter.checkpoints.hf_llama import RULES as LLAMA_RULES
from gptedge.exporter.checkpoints.hf_rope import rope_scaling
from gptedge.runtime.bundle import Architecture

GELUS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    full_rotary(cfg, where)
    bias = bool(cfg.get("use_bias", True))
    return Architecture(
        **llama_sizes(cfg, where), norm="layernorm", norm_eps=float(cfg.get("norm_epsilon", 1e-5)), norm_bias=True,
        position="rope", rope_scaling=rope_scaling(cfg, where, context),
        activation=activation({"hidden_act": "gelu_pytorch_tanh", **cfg}, where, "hidden_act", GELUS),
        qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **sliding(cfg, context))


RULES: tuple[Rule, ...] = (
    (r"layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"layers\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"layers.\1.mlp.up.\2", None, False),
    (r"layers\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
    (r"norm\.(weight|bias)", r"norm.\1", None, False),
    *LLAMA_RULES,
)

FAMILIES = (Family(model_types=("starcoder2",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   skip=SKIP),)

"""HF ``phi`` (Phi-1, Phi-1.5, Phi-2): partial rotary, attention and MLP in parallel on one
LayerNorm's output, biases everywhere (the LM head too), GELU MLP (``fc1`` / ``fc2``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, llama_sizes, refuse
from gptedge.exporter.checkpoints.hf_llama import REQUIRED
from gptedge.exporter.checkpoints.hf_rope import rope_scaling
from gptedge.exporter.checkpoints.hf_starcoder2 import GELUS
from gptedge.runtime.bundle import Architecture


def rotary_dim(cfg: dict[str, Any], head_dim: int, key: str = "partial_rotary_factor") -> int | None:
    """Features of each head RoPE rotates (HF: ``int(head_dim * factor)``), None for all of them."""
    dim = int(head_dim * float(cfg.get(key) or 1.0))
    return None if dim == head_dim else dim


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    if cfg.get("qk_layernorm"):
        refuse(where, "qk_layernorm", True, "per-head LayerNorm on q/k is not in the decoder (it has RMSNorm)")
    sizes = llama_sizes(cfg, where)
    return Architecture(
        **sizes, norm="layernorm", norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), norm_bias=True,
        position="rope", rope_scaling=rope_scaling(cfg, where, context), rotary_dim=rotary_dim(cfg, sizes["head_dim"]),
        activation=activation({"hidden_act": "gelu_new", **cfg}, where, "hidden_act", GELUS),
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, parallel_residual="shared_norm", lm_head_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


RULES: tuple[Rule, ...] = (
    (r"embed_tokens\.weight", "embed.weight", None, False),
    (r"layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 0, False),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 1, False),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 2, False),
    (r"layers\.(\d+)\.self_attn\.dense\.(weight|bias)", r"layers.\1.attn.out.\2", None, False),
    (r"layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"layers.\1.mlp.up.\2", None, False),
    (r"layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
    (r"final_layernorm\.(weight|bias)", r"norm.\1", None, False),
    (r"lm_head\.(weight|bias)", r"lm_head.\1", None, False),
)

FAMILIES = (Family(model_types=("phi",), required=REQUIRED, architecture=_architecture, rules=RULES),)

"""HF ``gpt_neox`` (Pythia, GPT-NeoX-20B): per-head fused QKV, partial rotary (``rotary_pct``),
LayerNorm, GELU MLP, and with ``use_parallel_residual`` attention and MLP in parallel, each on its
own LayerNorm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, grouped_qkv, llama_sizes
from gptedge.exporter.checkpoints.hf_llama import REQUIRED
from gptedge.exporter.checkpoints.hf_phi import rotary_dim
from gptedge.exporter.checkpoints.hf_rope import rope_scaling
from gptedge.exporter.checkpoints.hf_starcoder2 import GELUS
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    cfg = {"rope_theta": cfg.get("rotary_emb_base", 10000.0), **cfg}
    sizes = {**llama_sizes(cfg, where), "num_kv_heads": cfg["num_attention_heads"]}  # no grouped-query attention
    bias = bool(cfg.get("attention_bias", True))
    return Architecture(
        **sizes, norm="layernorm", norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), norm_bias=True,
        position="rope", rope_scaling=rope_scaling(cfg, where, context),
        rotary_dim=rotary_dim(cfg, sizes["head_dim"], "rotary_pct"),
        activation=activation({"hidden_act": "gelu", **cfg}, where, "hidden_act", GELUS),
        qkv_bias=bias, attn_out_bias=bias, mlp_bias=True,
        parallel_residual="two_norms" if cfg.get("use_parallel_residual", True) else "none",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


RULES: tuple[Rule, ...] = (
    (r"embed_in\.weight", "embed.weight", None, False),
    (r"layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"layers\.(\d+)\.attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv.\2", None, False),
    (r"layers\.(\d+)\.attention\.dense\.(weight|bias)", r"layers.\1.attn.out.\2", None, False),
    (r"layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up.\2", None, False),
    (r"layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
    (r"final_layer_norm\.(weight|bias)", r"norm.\1", None, False),
    (r"embed_out\.weight", "lm_head.weight", None, False),
)

FAMILIES = (Family(model_types=("gpt_neox",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   prefix="gpt_neox.", convert=grouped_qkv,
                   # causal-mask buffers and cached rotary tables of older checkpoints
                   skip=r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"),)

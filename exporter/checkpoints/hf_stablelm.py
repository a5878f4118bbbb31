"""HF ``stablelm`` (StableLM 2 / 3B): Llama with LayerNorm, partial rotary, optional q/k/v biases,
and with ``use_parallel_residual`` attention and MLP in parallel on one LayerNorm's output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, llama_sizes, refuse
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, SILU, SKIP
from gptedge.exporter.checkpoints.hf_llama import RULES as LLAMA_RULES
from gptedge.exporter.checkpoints.hf_phi import rotary_dim
from gptedge.exporter.checkpoints.hf_rope import rope_scaling
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    if cfg.get("qk_layernorm"):
        refuse(where, "qk_layernorm", True, "per-head LayerNorm on q/k is not in the decoder (it has RMSNorm)")
    sizes = llama_sizes(cfg, where)
    return Architecture(
        **sizes, norm="layernorm", norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), norm_bias=True,
        position="rope", rope_scaling=rope_scaling(cfg, where, context), rotary_dim=rotary_dim(cfg, sizes["head_dim"]),
        activation=activation({"hidden_act": "silu", **cfg}, where, "hidden_act", SILU),
        qkv_bias=bool(cfg.get("use_qkv_bias", False)), attn_out_bias=False, mlp_bias=False,
        parallel_residual="shared_norm" if cfg.get("use_parallel_residual") else "none",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


RULES: tuple[Rule, ...] = (
    (r"layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"norm\.(weight|bias)", r"norm.\1", None, False),
    *LLAMA_RULES,
)

FAMILIES = (Family(model_types=("stablelm",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   skip=SKIP),)

"""HF ``llama``, ``mistral``, ``qwen2``, ``qwen3``: RMSNorm, SwiGLU, RoPE, grouped-query attention.

Mistral slides its window in every layer; Qwen2/3 only with ``use_sliding_window``, in the layers
``layer_types`` marks (or, without that list, from ``max_window_layers`` on). Qwen3 RMS-normalises
q and k per head. The q/k/v and gate/up projections are fused into ``attn.qkv`` / ``mlp.gate_up``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, full_rotary, llama_sizes, sliding
from gptedge.exporter.checkpoints.hf_rope import rope_scaling
from gptedge.runtime.bundle import Architecture

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")
SILU = {"silu": "swiglu"}


def llama_window(cfg: dict[str, Any], context: int) -> dict[str, Any]:
    """The sliding-window keywords of a Llama-style config (Qwen's opt-in rules included)."""
    if cfg["model_type"] in ("qwen2", "qwen3"):
        first = int(cfg.get("max_window_layers", 28))
        return sliding(cfg, context, list(range(first, cfg["num_hidden_layers"])),
                       enabled=bool(cfg.get("use_sliding_window", False)))
    return sliding(cfg, context)


def llama_keywords(cfg: dict[str, Any], where: Path, context: int) -> dict[str, Any]:
    """Architecture keywords shared by every Llama-style family (they may override any of them)."""
    cfg = {"hidden_act": "silu", **cfg}
    full_rotary(cfg, where)
    model_type = cfg["model_type"]
    bias = bool(cfg.get("attention_bias", False)) if model_type in ("llama", "qwen3") else False
    return dict(
        **llama_sizes(cfg, where), norm="rmsnorm", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), norm_bias=False,
        position="rope", rope_scaling=rope_scaling(cfg, where, context),
        activation=activation(cfg, where, "hidden_act", SILU),
        qkv_bias=True if model_type == "qwen2" else bias, attn_out_bias=bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), **llama_window(cfg, context))


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    keywords = llama_keywords(cfg, where, context)
    if cfg["model_type"] == "qwen3":
        keywords["qk_norm"] = "head"
    return Architecture(**keywords)


RULES: tuple[Rule, ...] = (
    (r"embed_tokens\.weight", "embed.weight", None, False),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight", None, False),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 0, False),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 1, False),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 2, False),
    (r"layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"layers.\1.attn.out.\2", None, False),
    (r"layers\.(\d+)\.self_attn\.([qk]_norm)\.weight", r"layers.\1.attn.\2.weight", None, False),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight", None, False),
    (r"layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"layers.\1.mlp.gate_up.\2", 0, False),
    (r"layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"layers.\1.mlp.gate_up.\2", 1, False),
    (r"layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
    (r"norm\.weight", "norm.weight", None, False),
    (r"lm_head\.weight", "lm_head.weight", None, False),
)
# Old Llama checkpoints saved the RoPE inverse frequencies; the decoder derives them from the config.
SKIP = r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"


def same_type(model_type: str) -> str:
    """onnxruntime-genai knows this family under its own model_type."""
    return model_type


FAMILIES = (Family(model_types=("llama", "mistral", "qwen2", "qwen3"), required=REQUIRED,
                   architecture=_architecture, rules=RULES, skip=SKIP, genai_type=same_type),)

"""HF ``falcon`` (Falcon 7B/40B/180B, RefinedWeb): one fused ``query_key_value``, LayerNorm, a GELU
MLP, RoPE or ALiBi (``alibi``: added before the score scale), optional biases (``bias``).

Three attention layouts (transformers' ``FalconAttention._split_heads``):
- ``new_decoder_architecture`` (40B/180B): rows grouped per kv head, [K, H/K + 2, D] (that group's
  queries, its key, its value), attention and MLP in parallel on ``ln_attn`` / ``ln_mlp`` (or one
  ``input_layernorm`` with ``num_ln_in_parallel_attn`` 1). transformers caches each key H/K times;
  the bundle caches the K kv heads once (``hf_reference`` compares the two).
- ``multi_query`` (7B): [H + 2, D], the H queries, then one key and one value head.
- neither: per head, [H, 3, D].
The old architecture is parallel on one ``input_layernorm`` (``parallel_attn``) or sequential with a
``post_attention_layernorm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, grouped_qkv, refuse
from gptedge.exporter.checkpoints.hf_rope import rope_scaling
from gptedge.exporter.checkpoints.hf_starcoder2 import GELUS
from gptedge.runtime.bundle import Architecture

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _parallel(cfg: dict[str, Any], where: Path) -> str:
    if cfg.get("new_decoder_architecture"):
        if not cfg.get("parallel_attn", True):
            refuse(where, "parallel_attn", False, "transformers' Falcon runs the new decoder architecture in "
                   "parallel only (its sequential path has no norm to use)")
        return "shared_norm" if cfg.get("num_ln_in_parallel_attn") == 1 else "two_norms"
    return "shared_norm" if cfg.get("parallel_attn", True) else "none"


def _kv_heads(cfg: dict[str, Any], where: Path) -> int:
    heads = cfg["num_attention_heads"]
    if not cfg.get("new_decoder_architecture"):
        return 1 if cfg.get("multi_query", True) else heads
    kv_heads = cfg.get("num_kv_heads") or heads
    if heads % kv_heads:
        refuse(where, "num_kv_heads", kv_heads, f"num_attention_heads={heads} must be a multiple of it")
    return int(kv_heads)


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    if hidden % heads:
        refuse(where, "hidden_size", hidden, f"it must be a multiple of num_attention_heads={heads}")
    alibi, bias = bool(cfg.get("alibi", False)), bool(cfg.get("bias", False))
    return Architecture(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=_kv_heads(cfg, where), head_dim=hidden // heads,
        intermediate_size=int(cfg.get("ffn_hidden_size") or 4 * hidden), max_context=context,
        norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), norm_bias=True,
        position="alibi" if alibi else "rope", alibi_scaled=alibi, rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=None if alibi else rope_scaling(cfg, where, context),
        activation=activation({"activation": "gelu", **cfg}, where, "activation", GELUS),
        qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias, parallel_residual=_parallel(cfg, where),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def reference_attention(cfg: dict[str, Any]) -> str:
    """transformers' attention code to compare with: with ALiBi its eager path (4.57) adds the bias
    twice, once in the scores and once more inside the causal mask; "sdpa" adds it once, as the
    original Falcon (RefinedWeb) code does, and so does the bundle."""
    return "sdpa" if cfg.get("alibi") else "eager"


RULES: tuple[Rule, ...] = (
    (r"word_embeddings\.weight", "embed.weight", None, False),
    (r"h\.(\d+)\.(?:input_layernorm|ln_attn)\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"h\.(\d+)\.(?:post_attention_layernorm|ln_mlp)\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"h\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv.\2", None, False),
    (r"h\.(\d+)\.self_attention\.dense\.(weight|bias)", r"layers.\1.attn.out.\2", None, False),
    (r"h\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up.\2", None, False),
    (r"h\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
    (r"ln_f\.(weight|bias)", r"norm.\1", None, False),
    (r"lm_head\.weight", "lm_head.weight", None, False),
)

FAMILIES = (Family(model_types=("falcon",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   prefix="transformer.", convert=grouped_qkv, reference_attention=reference_attention,
                   skip=r"h\.\d+\.self_attention\.(rotary_emb\.inv_freq|maybe_rotary\.inv_freq)"),)

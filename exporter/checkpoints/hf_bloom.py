"""HF ``bloom`` (BLOOM, BLOOMZ): ALiBi position bias (added after the score scale), a LayerNorm on the
embeddings (``word_embeddings_layernorm``), per-head fused ``query_key_value`` ([H, 3, D] rows),
biases everywhere, and a GELU MLP of 4 x hidden in BLOOM's tanh approximation. ALiBi has no
position table: the bundle's context is ``seq_length`` (the training length) or ``--max-context``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, grouped_qkv, refuse
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    if cfg.get("apply_residual_connection_post_layernorm"):
        refuse(where, "apply_residual_connection_post_layernorm", True,
               "the decoder adds each sub-block to its input, not to the normalised input")
    heads, hidden = cfg["n_head"], cfg["hidden_size"]
    if hidden % heads:
        refuse(where, "hidden_size", hidden, f"it must be a multiple of n_head={heads}")
    return Architecture(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["n_layer"], num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=4 * hidden, max_context=context,
        norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), norm_bias=True, embed_norm=True,
        position="alibi", activation="gelu_tanh",  # BLOOM's bloom_gelu_forward is the tanh approximation
        qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


RULES: tuple[Rule, ...] = (
    (r"word_embeddings\.weight", "embed.weight", None, False),
    (r"word_embeddings_layernorm\.(weight|bias)", r"embed_norm.\1", None, False),
    (r"h\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"h\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"h\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv.\2", None, False),
    (r"h\.(\d+)\.self_attention\.dense\.(weight|bias)", r"layers.\1.attn.out.\2", None, False),
    (r"h\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", r"layers.\1.mlp.up.\2", None, False),
    (r"h\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
    (r"ln_f\.(weight|bias)", r"norm.\1", None, False),
    (r"lm_head\.weight", "lm_head.weight", None, False),
)

FAMILIES = (Family(model_types=("bloom",), required=("vocab_size", "hidden_size", "n_layer", "n_head"),
                   architecture=_architecture, rules=RULES, prefix="transformer.", convert=grouped_qkv,
                   context_key="seq_length"),)

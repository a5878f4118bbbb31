"""HF ``gpt2``: learned positions, LayerNorm, GELU MLP, Conv1D weights stored ``[in, out]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation, refuse
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gpt2_architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    cfg = {"activation_function": "gelu_new", **cfg}
    act = activation(cfg, where, "activation_function", GPT2_ACTIVATIONS)
    if not cfg.get("scale_attn_weights", True):
        refuse(where, "scale_attn_weights", False, "the decoder always scales attention by 1/sqrt(head_dim)")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        refuse(where, "scale_attn_by_inverse_layer_idx", True, "per-layer attention scaling is not implemented")
    if cfg.get("add_cross_attention", False):
        refuse(where, "add_cross_attention", True, "only decoder-only models are exported")
    hidden, heads = cfg["n_embd"], cfg["n_head"]
    if hidden % heads:
        raise InputError(f"{where}: n_embd={hidden} is not a multiple of n_head={heads}")
    return Architecture(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["n_layer"], num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=cfg.get("n_inner") or 4 * hidden,
        max_context=cfg["n_positions"], norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        norm_bias=True, position="learned", activation=act, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


RULES: tuple[Rule, ...] = (
    (r"wte\.weight", "embed.weight", None, False),
    (r"wpe\.weight", "pos_embed.weight", None, False),
    (r"h\.(\d+)\.ln_1\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"h\.(\d+)\.attn\.c_attn\.weight", r"layers.\1.attn.qkv.weight", None, True),
    (r"h\.(\d+)\.attn\.c_attn\.bias", r"layers.\1.attn.qkv.bias", None, False),
    (r"h\.(\d+)\.attn\.c_proj\.weight", r"layers.\1.attn.out.weight", None, True),
    (r"h\.(\d+)\.attn\.c_proj\.bias", r"layers.\1.attn.out.bias", None, False),
    (r"h\.(\d+)\.ln_2\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"h\.(\d+)\.mlp\.c_fc\.weight", r"layers.\1.mlp.up.weight", None, True),
    (r"h\.(\d+)\.mlp\.c_fc\.bias", r"layers.\1.mlp.up.bias", None, False),
    (r"h\.(\d+)\.mlp\.c_proj\.weight", r"layers.\1.mlp.down.weight", None, True),
    (r"h\.(\d+)\.mlp\.c_proj\.bias", r"layers.\1.mlp.down.bias", None, False),
    (r"ln_f\.(weight|bias)", r"norm.\1", None, False),
    (r"lm_head\.weight", "lm_head.weight", None, False),
)

FAMILIES = (Family(
    model_types=("gpt2",), required=("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
    architecture=gpt2_architecture, rules=RULES, prefix="transformer.", context_key="n_positions",
    # causal-mask buffers older GPT-2 checkpoints carry; the decoder builds its mask from attention_mask
    skip=r"h\.\d+\.attn\.(bias|masked_bias)"),)

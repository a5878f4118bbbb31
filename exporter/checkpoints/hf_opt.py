"""HF ``opt`` (OPT-125m ... 66b): learned positions stored with an offset of 2, ReLU MLP (``fc1`` /
``fc2``), LayerNorm before each sub-block or, with ``do_layer_norm_before: false`` (OPT-350m), on
the residual sum after it; with ``word_embed_proj_dim`` != ``hidden_size`` the embeddings and the
tied LM head are narrower and ``project_in`` / ``project_out`` map to and from the hidden size.

transformers derives positions from ``cumsum(attention_mask) - 1`` (+ 2 into the table); the
runtime feeds the same positions to every real token of a left-padded row, so batches match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
            "max_position_embeddings")
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh"}
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding: rows 0 and 1 precede position 0


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if hidden % heads:
        raise InputError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    pre_norm = bool(cfg.get("do_layer_norm_before", True))
    embed_dim = cfg.get("word_embed_proj_dim") or hidden
    bias = bool(cfg.get("enable_bias", True))
    return Architecture(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=cfg["ffn_dim"],
        max_context=cfg["max_position_embeddings"], norm="layernorm", norm_eps=1e-5,  # nn.LayerNorm's default
        norm_affine=bool(cfg.get("layer_norm_elementwise_affine", True)), position="learned",
        activation=activation({"activation_function": "relu", **cfg}, where, "activation_function", ACTIVATIONS),
        qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias, norm_placement="pre" if pre_norm else "post_residual",
        final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
        embed_proj_dim=None if embed_dim == hidden else int(embed_dim),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def drop_position_offset(arch: Architecture, name: str, tensor: Any) -> Any:
    """The position table without its two leading rows, so row p is position p."""
    return tensor[POSITION_OFFSET:] if name == "pos_embed.weight" else tensor


RULES: tuple[Rule, ...] = (
    (r"embed_tokens\.weight", "embed.weight", None, False),
    (r"embed_positions\.weight", "pos_embed.weight", None, False),
    (r"project_(in|out)\.weight", r"project_\1.weight", None, False),
    (r"layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 0, False),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 1, False),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2", 2, False),
    (r"layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"layers.\1.attn.out.\2", None, False),
    (r"layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"layers.\1.mlp_norm.\2", None, False),
    (r"layers\.(\d+)\.fc1\.(weight|bias)", r"layers.\1.mlp.up.\2", None, False),
    (r"layers\.(\d+)\.fc2\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
    (r"final_layer_norm\.(weight|bias)", r"norm.\1", None, False),
    (r"lm_head\.weight", "lm_head.weight", None, False),
)

FAMILIES = (Family(model_types=("opt",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   prefix="model.decoder.", convert=drop_position_offset),)

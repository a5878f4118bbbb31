"""HF ``gptj`` (GPT-J-6B): attention and MLP in parallel on one LayerNorm's output, partial rotary
(``rotary_dim``) on adjacent feature pairs (``rope_interleaved``), q/k/v/out without biases, a GELU
MLP with biases and an untied LM head with a bias. ``codegen`` reuses this mapping (hf_codegen.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, activation
from gptedge.exporter.checkpoints.hf_gpt2 import GPT2_ACTIVATIONS
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError

# rotary_dim is required: without it transformers rotates n_embd features of each head-sized slice
REQUIRED = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "rotary_dim")


def gptj_architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    """GPT-J's and CodeGen's config (the same keys) as the decoder's architecture."""
    hidden, heads = cfg["n_embd"], cfg["n_head"]
    if hidden % heads:
        raise InputError(f"{where}: n_embd={hidden} is not a multiple of n_head={heads}")
    head_dim = hidden // heads
    if not 2 <= cfg["rotary_dim"] <= head_dim or cfg["rotary_dim"] % 2:
        raise InputError(f"{where}: rotary_dim={cfg['rotary_dim']} must be even and at most the head size "
                         f"{head_dim} (n_embd / n_head)")
    return Architecture(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["n_layer"], num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, intermediate_size=cfg.get("n_inner") or 4 * hidden,
        max_context=cfg["n_positions"], norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        position="rope", rotary_dim=None if cfg["rotary_dim"] == head_dim else cfg["rotary_dim"],
        rope_interleaved=True,
        activation=activation({"activation_function": "gelu_new", **cfg}, where, "activation_function",
                              GPT2_ACTIVATIONS),
        qkv_bias=False, attn_out_bias=False, mlp_bias=True, lm_head_bias=True, parallel_residual="shared_norm",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def gptj_rules(attention: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """GPT-J's weight names around the family's own ``attention`` rules."""
    return (
        (r"wte\.weight", "embed.weight", None, False),
        (r"h\.(\d+)\.ln_1\.(weight|bias)", r"layers.\1.attn_norm.\2", None, False),
        *attention,
        (r"h\.(\d+)\.attn\.out_proj\.weight", r"layers.\1.attn.out.weight", None, False),
        (r"h\.(\d+)\.mlp\.fc_in\.(weight|bias)", r"layers.\1.mlp.up.\2", None, False),
        (r"h\.(\d+)\.mlp\.fc_out\.(weight|bias)", r"layers.\1.mlp.down.\2", None, False),
        (r"ln_f\.(weight|bias)", r"norm.\1", None, False),
        (r"lm_head\.(weight|bias)", r"lm_head.\1", None, False),
    )


RULES = gptj_rules((
    (r"h\.(\d+)\.attn\.q_proj\.weight", r"layers.\1.attn.qkv.weight", 0, False),
    (r"h\.(\d+)\.attn\.k_proj\.weight", r"layers.\1.attn.qkv.weight", 1, False),
    (r"h\.(\d+)\.attn\.v_proj\.weight", r"layers.\1.attn.qkv.weight", 2, False),
))
# causal-mask buffers of older checkpoints; the decoder builds its mask from attention_mask
SKIP = r"h\.\d+\.attn\.(bias|masked_bias)"

FAMILIES = (Family(model_types=("gptj",), required=REQUIRED, architecture=gptj_architecture, rules=RULES,
                   skip=SKIP, prefix="transformer.", context_key="n_positions"),)

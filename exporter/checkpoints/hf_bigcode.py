"""HF ``gpt_bigcode`` (SantaCoder, StarCoder 1): GPT-2 with ``nn.Linear`` weights and multi-query
attention (one key/value head); without ``multi_query`` its fused QKV is stored per head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, Rule, grouped_qkv, refuse
from gptedge.exporter.checkpoints.hf_gpt2 import GPT2_ACTIVATIONS, gpt2_architecture
from gptedge.exporter.checkpoints.hf_gpt2 import RULES as GPT2_RULES
from gptedge.runtime.bundle import Architecture


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    cfg = {"activation_function": "gelu_pytorch_tanh", **cfg}
    if cfg["activation_function"] not in GPT2_ACTIVATIONS:
        refuse(where, "activation_function", cfg["activation_function"],
               f"the decoder implements {sorted(GPT2_ACTIVATIONS)}")
    arch = gpt2_architecture(cfg, where, context)
    if cfg.get("multi_query", True):
        return Architecture(**{**arch.to_dict(), "num_kv_heads": 1})
    return arch


def _convert(arch: Architecture, name: str, tensor: Any) -> Any:
    return grouped_qkv(arch, name, tensor) if arch.num_kv_heads == arch.num_heads else tensor


# nn.Linear weights: GPT-2's names without its Conv1D transposes
RULES: tuple[Rule, ...] = tuple((pattern, target, part, False) for pattern, target, part, _ in GPT2_RULES)

FAMILIES = (Family(
    model_types=("gpt_bigcode",), required=("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
    architecture=_architecture, rules=RULES, prefix="transformer.", context_key="n_positions",
    skip=r"h\.\d+\.attn\.(bias|masked_bias)", convert=_convert),)

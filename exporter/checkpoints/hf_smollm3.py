"""HF ``smollm3``: Llama whose ``no_rope_layers`` (0 = no position encoding, NoPE) skip RoPE; with
``use_sliding_window`` the layers ``layer_types`` marks slide their window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family, sliding
from gptedge.exporter.checkpoints.hf_llama import REQUIRED, RULES, SKIP, llama_keywords, same_type
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    count = cfg["num_hidden_layers"]
    interval = int(cfg.get("no_rope_layer_interval", 4))
    uses_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(count)]
    if not isinstance(uses_rope, list) or len(uses_rope) != count:
        raise InputError(f"{where}: no_rope_layers must list one 0/1 flag per layer ({count})")
    nope = [i for i, flag in enumerate(uses_rope) if not flag]
    keywords = llama_keywords(cfg, where, context)
    bias = bool(cfg.get("attention_bias", False))
    keywords.update(qkv_bias=bias, attn_out_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
                    nope_layers=nope or None, sliding_window=None, sliding_layers=None)
    keywords.update(sliding(cfg, context, layers_default=nope, enabled=bool(cfg.get("use_sliding_window"))))
    return Architecture(**keywords)


FAMILIES = (Family(model_types=("smollm3",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   skip=SKIP, genai_type=same_type),)

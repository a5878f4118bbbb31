"""HF ``codegen`` (CodeGen, CodeGen2 mono/multi): GPT-J's block (see hf_gptj.py) with one fused
``qkv_proj`` whose rows come in ``mp_num = 4`` blocks, each holding that block's q, v, k heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints.hf_family import Family
from gptedge.exporter.checkpoints.hf_gptj import REQUIRED, SKIP, gptj_architecture, gptj_rules
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError

MP_NUM = 4  # fixed in transformers' CodeGenAttention (the model-parallel shards it was trained with)


def _architecture(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    if cfg["n_head"] % MP_NUM:
        raise InputError(f"{where}: n_head={cfg['n_head']} is not a multiple of {MP_NUM}, which CodeGen's fused "
                         "qkv_proj layout needs")
    return gptj_architecture(cfg, where, context)


def qkv_from_blocks(arch: Architecture, name: str, tensor: Any) -> Any:
    """CodeGen's ``qkv_proj`` rows [mp_num, (q, v, k), C/mp_num] in the decoder's [q, k, v] order."""
    if not name.endswith("attn.qkv.weight"):
        return tensor
    blocks = tensor.reshape(MP_NUM, 3, -1, tensor.shape[-1])[:, [0, 2, 1]]  # mp, (q, k, v), C/mp, C
    return blocks.transpose(0, 1).reshape(tensor.shape).contiguous()


RULES = gptj_rules(((r"h\.(\d+)\.attn\.qkv_proj\.weight", r"layers.\1.attn.qkv.weight", None, False),))

FAMILIES = (Family(model_types=("codegen",), required=REQUIRED, architecture=_architecture, rules=RULES,
                   skip=SKIP, prefix="transformer.", context_key="n_positions", convert=qkv_from_blocks),)

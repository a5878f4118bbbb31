"""HF ``config.json`` → :class:`Architecture` through the family mapping of its ``model_type``.

Each family file (``hf_<family>.py``) maps its keys or refuses them by name: a config that asks for
behaviour the decoder lacks (partial rotary, unknown RoPE scaling, mixture of experts ...) would
otherwise export a model that silently computes something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptedge.exporter.checkpoints import (
    hf_bigcode,
    hf_bloom,
    hf_codegen,
    hf_cohere,
    hf_falcon,
    hf_gemma,
    hf_gpt2,
    hf_gptj,
    hf_granite,
    hf_helium,
    hf_llama,
    hf_nemotron,
    hf_neox,
    hf_olmo,
    hf_olmo2,
    hf_opt,
    hf_phi,
    hf_phi3,
    hf_smollm3,
    hf_stablelm,
    hf_starcoder2,
)
from gptedge.exporter.checkpoints.hf_family import Family, require
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError, UnsupportedModelError

FAMILY_MODULES = (hf_gpt2, hf_llama, hf_gemma, hf_phi3, hf_granite, hf_olmo2, hf_smollm3, hf_starcoder2,
                  hf_bigcode, hf_phi, hf_neox, hf_stablelm,
                  hf_falcon, hf_bloom, hf_cohere, hf_nemotron,
                  hf_gptj, hf_codegen, hf_opt, hf_olmo, hf_helium)
FAMILIES: dict[str, Family] = {t: f for m in FAMILY_MODULES for f in m.FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# Mixture-of-experts families: a router sends each token to a few of many expert MLPs.
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "phimoe", "olmoe", "granitemoe", "deepseek_v3")


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF folder (InputError when it is unreadable)."""
    return read_json_object(folder / "config.json", "; is the download complete?")


def read_json_object(path: Path, hint: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object (InputError naming the file otherwise)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read it as JSON ({exc}){hint}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def export_context(cfg: dict[str, Any], requested: int | None) -> int:
    """Tokens the bundle will support: ``requested`` (``--max-context``) or the model's own."""
    family = FAMILIES.get(cfg.get("model_type"))  # type: ignore[arg-type]
    key = family.context_key if family else "max_position_embeddings"
    own = requested if requested is not None else cfg.get(key)
    if own is None:
        raise InputError(f"config.json has no {key!r}, so the model's context is unknown; pass --max-context N")
    return int(own)


def family_of(cfg: dict[str, Any], where: Path) -> Family:
    """The :class:`Family` mapping of ``cfg``'s ``model_type`` (refused by name when there is none)."""
    model_type = cfg.get("model_type")
    if model_type in MOE_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is a mixture-of-experts model, which gptedge does not export "
            "(its decoder has one dense MLP per layer, not a router over experts); gptedge exports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; gptedge exports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (and nanoGPT / llama2.c checkpoints)")
    return FAMILIES[model_type]


def architecture_from_config(cfg: dict[str, Any], where: Path, requested_context: int | None = None) -> Architecture:
    """Map an HF config dict (read from ``where``) onto the decoder's :class:`Architecture`.

    ``requested_context`` is ``ExportConfig.max_context``: a sliding window only matters when the
    bundle's context is longer than the window.
    """
    family = family_of(cfg, where)
    require(cfg, where, family.required)
    return family.architecture(cfg, where, export_context(cfg, requested_context))

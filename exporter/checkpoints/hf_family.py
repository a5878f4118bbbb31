"""What one HF family mapping is (:class:`Family`) and the config helpers the mappings share.

A family file (``hf_llama.py``, ``hf_gemma.py`` ...) says, for its ``model_type`` values, how
``config.json`` becomes an :class:`Architecture` (refusing by name every key whose behaviour the
decoder lacks) and how the checkpoint's weight names become the decoder's. Imports no torch: the
export preflight maps configs before torch is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError, UnsupportedModelError

# (pattern on the checkpoint name, decoder name template, part index for fused tensors or None,
#  transpose): GPT-2's Conv1D stores [in, out], the decoder's Linear [out, in].
Rule = tuple[str, str, int | None, bool]
# (HF config, where it was read, the bundle's context in tokens) -> the decoder's architecture
ArchitectureFn = Callable[[dict[str, Any], Path, int], Architecture]


def unchanged(arch: Architecture, name: str, tensor: Any) -> Any:
    """The default :attr:`Family.convert`: the tensor as the rules produced it."""
    return tensor


def grouped_qkv(arch: Architecture, name: str, tensor: Any) -> Any:
    """A fused QKV stored in groups, one per kv head, of rows [K, H/K + 2, D] (the group's query
    heads, then its key and value head; K = H is the per-head [H, 3, D] layout of GPT-NeoX, BLOOM and
    GPTBigCode without multi-query; Falcon stores all three of its layouts so) in the decoder's
    [q (H), k (K), v (K)] row order (a torch tensor; this module itself stays torch-free)."""
    if not name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return tensor
    groups, width = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads + 2
    order = [g * width + j for g in range(groups) for j in range(width - 2)]
    order += [g * width + width - 2 for g in range(groups)] + [g * width + width - 1 for g in range(groups)]
    heads = tensor.reshape(groups * width, arch.head_dim, *tensor.shape[1:])
    return heads[order].reshape(tensor.shape).contiguous()


@dataclass(frozen=True)
class Family:
    """One HF family: its ``model_type`` values, required integer keys, config mapping, weight-name
    rules (on names without ``prefix``), names to skip, onnxruntime-genai's ``model.type`` for it
    (None: genai has no pipeline for it) and ``convert`` (arch, decoder name, tensor) -> tensor
    for layouts a rename cannot fix; ``reference_attention`` (config -> transformers'
    ``attn_implementation``) picks the parity reference's attention code where eager is wrong."""

    model_types: tuple[str, ...]
    required: tuple[str, ...]
    architecture: ArchitectureFn
    rules: tuple[Rule, ...]
    skip: str = r"(?!)"
    prefix: str = "model."
    genai_type: Callable[[str], str | None] = lambda model_type: None
    context_key: str = "max_position_embeddings"
    convert: Callable[[Architecture, str, Any], Any] = unchanged
    reference_attention: Callable[[dict[str, Any]], str] = lambda cfg: "eager"

    def skip_pattern(self) -> re.Pattern[str]:
        return re.compile(self.skip)


def refuse(where: Path, key: str, value: Any, why: str) -> NoReturn:
    raise UnsupportedModelError(f"{where}: {key}={value!r} is not supported: {why}")


def require(cfg: dict[str, Any], where: Path, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if not isinstance(cfg.get(k), int)]
    if missing:
        raise InputError(f"{where}: missing or non-integer keys {missing} for model_type "
                         f"{cfg.get('model_type')!r}; the config.json is incomplete")


def head_sizes(cfg: dict[str, Any], where: Path) -> dict[str, int]:
    """num_heads, num_kv_heads and head_dim of a Llama-style config."""
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if not cfg.get("head_dim") and cfg["hidden_size"] % heads:
        raise InputError(f"{where}: hidden_size={cfg['hidden_size']} is not a multiple of num_attention_heads={heads}")
    if heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": int(head_dim)}


def llama_sizes(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """The Architecture keywords every Llama-style config spells the same way."""
    return dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                intermediate_size=cfg["intermediate_size"], max_context=cfg["max_position_embeddings"],
                rope_theta=float(cfg.get("rope_theta", 10000.0)), **head_sizes(cfg, where))


def full_rotary(cfg: dict[str, Any], where: Path) -> None:
    factor = cfg.get("partial_rotary_factor", 1.0)
    if factor not in (None, 1, 1.0):
        refuse(where, "partial_rotary_factor", factor, "the decoder rotates the whole head (factor 1.0)")


def activation(cfg: dict[str, Any], where: Path, key: str, allowed: dict[str, str]) -> str:
    """The decoder's name for the config's activation ``key`` (refused when not in ``allowed``)."""
    value = cfg.get(key)
    if value not in allowed:
        refuse(where, key, value, f"this family's decoder implements {sorted(allowed)}")
    return allowed[value]


def sliding(cfg: dict[str, Any], context: int, layers_default: list[int] | None = None,
            enabled: bool = True, keep: bool = False) -> dict[str, Any]:
    """``sliding_window`` / ``sliding_layers`` keywords: the window of ``cfg`` applied to the layers
    its ``layer_types`` marks ``sliding_attention`` (without that list: ``layers_default``, None
    meaning every layer). A window that cannot cut inside ``context`` tokens is left out, unless
    ``keep`` (the family needs to know its sliding layers anyway)."""
    window = cfg.get("sliding_window")
    if not enabled or window is None:
        return {}
    count = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if isinstance(types, list):
        layers: list[int] | None = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    else:
        layers = layers_default
    if layers == [] or (int(window) >= context and not keep):
        return {}
    return {"sliding_window": int(window), "sliding_layers": None if layers is None or len(layers) == count else layers}

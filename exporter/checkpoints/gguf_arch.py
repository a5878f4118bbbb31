"""GGUF architectures → the HF family mapping that exports them.

A GGUF file is an HF checkpoint converted by llama.cpp's ``convert_hf_to_gguf.py``: its metadata
``{arch}.*`` are the HF config's keys under other names, its tensor names come from the ``gguf``
package's own table (:func:`gguf.get_tensor_name_map`). So a GGUF file exports by going back: the
metadata become an HF config dict, every tensor gets the HF name the table lists for it (the one the
family's rules accept first), llama.cpp's few layout changes are undone, and the family mapping of
``hf_<family>.py`` does the rest. This is what transformers' own GGUF loader does
(``modeling_gguf_pytorch_utils``), and it is the parity reference of the tests.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from gptedge.exporter.checkpoints.hf_family import Family
from gptedge.runtime.errors import InputError, UnsupportedModelError

# GGUF general.architecture -> HF model_type, for the families both the decoder and transformers'
# GGUF loader know (mistral models are written as "llama" by llama.cpp).
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2",
               "gemma3": "gemma3_text", "stablelm": "stablelm", "starcoder2": "starcoder2", "gpt2": "gpt2"}
SUPPORTED_ARCHS = tuple(MODEL_TYPES)
# metadata key (without "{arch}.") -> HF config key, as llama.cpp's convert script writes them
LLAMA_KEYS = {"block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
              "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
              "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
              "attention.key_length": "head_dim", "rope.freq_base": "rope_theta", "vocab_size": "vocab_size",
              "attention.layer_norm_rms_epsilon": "rms_norm_eps", "attention.layer_norm_epsilon": "layer_norm_eps",
              "attention.sliding_window": "sliding_window"}
KEY_OVERRIDES = {
    "gpt2": {"block_count": "n_layer", "context_length": "n_positions", "embedding_length": "n_embd",
             "feed_forward_length": "n_inner", "attention.head_count": "n_head",
             "attention.layer_norm_epsilon": "layer_norm_epsilon"},
    "starcoder2": {"attention.layer_norm_epsilon": "norm_epsilon"},
    "gemma2": {"attn_logit_softcapping": "attn_logit_softcapping",
               "final_logit_softcapping": "final_logit_softcapping"},
    "gemma3": {"final_logit_softcapping": "final_logit_softcapping"},
}
REQUIRED = ("block_count", "embedding_length", "attention.head_count", "context_length")
# llama.cpp picks Gemma's query scale by model size: 1/sqrt(hidden/heads) for the 27B models (these
# layer counts), 1/sqrt(head_dim) otherwise (llama-model.cpp, LLM_ARCH_GEMMA2/GEMMA3).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# GPT-2's convert script stores its Conv1D weights as [out, in]; the HF family expects Conv1D's [in, out]
GPT2_TRANSPOSED = re.compile(r"blk\.\d+\.(attn_qkv|attn_output|ffn_up|ffn_down)\.weight")


def hf_config(meta: dict[str, Any], tensor_names: set[str], where: Path) -> dict[str, Any]:
    """The HF ``config.json`` dict the GGUF metadata ``meta`` stand for (refusing unknown architectures)."""
    arch = meta.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise UnsupportedModelError(f"{where}: GGUF architecture {arch!r} is not supported; gptedge exports GGUF "
                                    f"architectures {', '.join(SUPPORTED_ARCHS)}")
    missing = [f"{arch}.{k}" for k in REQUIRED if not isinstance(meta.get(f"{arch}.{k}"), int)]
    if missing:
        raise InputError(f"{where}: GGUF metadata lacks {missing}; the file is incomplete")
    names = {**LLAMA_KEYS, **KEY_OVERRIDES.get(arch, {})}
    cfg: dict[str, Any] = {"model_type": MODEL_TYPES[arch],
                           "tie_word_embeddings": "output.weight" not in tensor_names}
    cfg.update({hf_key: meta[f"{arch}.{key}"] for key, hf_key in names.items() if f"{arch}.{key}" in meta})
    if "vocab_size" not in cfg:
        cfg["vocab_size"] = len(meta.get("tokenizer.ggml.tokens") or [])
    cfg.update(_rope(meta, arch, cfg, where))
    cfg.update(_family_keys(arch, cfg, tensor_names))
    return cfg


def _rope(meta: dict[str, Any], arch: str, cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """partial_rotary_factor and rope_scaling from ``rope.dimension_count`` / ``rope.scaling.*``."""
    out: dict[str, Any] = {}
    if arch == "gpt2":
        return out
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    dims = meta.get(f"{arch}.rope.dimension_count")
    if isinstance(dims, int) and dims != head_dim:
        out["partial_rotary_factor"] = dims / head_dim
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    elif kind != "none":
        raise UnsupportedModelError(f"{where}: {arch}.rope.scaling.type={kind!r} is not supported; gptedge reads "
                                    "GGUF files with linear or no RoPE scaling (export the HF folder instead: "
                                    "its config.json carries every parameter of this scaling)")
    return out


def _family_keys(arch: str, cfg: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """Config keys llama.cpp does not store but its tensors or its model-size rules imply."""
    if arch == "stablelm":  # as transformers' GGUF loader infers them
        return {"use_qkv_bias": "blk.0.attn_q.bias" in tensor_names,
                "use_parallel_residual": "blk.0.ffn_norm.weight" not in tensor_names}
    if arch == "starcoder2":
        return {"use_bias": "blk.0.attn_q.bias" in tensor_names}
    if arch in GEMMA_27B_LAYERS:
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        big = cfg["num_hidden_layers"] == GEMMA_27B_LAYERS[arch]
        scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if big else head_dim
        keys: dict[str, Any] = {"query_pre_attn_scalar": scalar}
        if arch == "gemma2":  # llama.cpp's defaults when the file does not say
            keys.update(attn_logit_softcapping=cfg.get("attn_logit_softcapping", 50.0),
                        final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0))
        else:
            keys.update(rope_local_base_freq=10000.0, sliding_window_pattern=6)
        return keys
    return {}


def hf_tensor_names(arch: str, num_layers: int, names: list[str], family: Family, where: Path) -> dict[str, str]:
    """GGUF tensor name -> the HF name the family's rules expect, through gguf's own name table.

    The table lists many HF spellings per GGUF name (one per model family that llama.cpp converts);
    the one matched by the family's earliest rule wins, as rules go from family-specific to shared.
    """
    import gguf

    enum = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    table: dict[str, list[str]] = {}
    for hf_name, (_, gguf_name) in gguf.get_tensor_name_map(enum, num_layers).mapping.items():
        table.setdefault(gguf_name, []).append(hf_name)
    rules = [re.compile(rule[0]) for rule in family.rules]
    skip = family.skip_pattern()
    out, unknown = {}, []
    for name in names:
        base, _, suffix = name.rpartition(".")
        ranked = []
        for candidate in table.get(base, []):
            full = f"{candidate}.{suffix}"
            short = full[len(family.prefix):] if full.startswith(family.prefix) else full
            rank = next((i for i, rule in enumerate(rules) if rule.fullmatch(short)), None)
            if rank is None and skip.fullmatch(short):
                rank = len(rules)
            if rank is not None:
                ranked.append((rank, full))
        if ranked:
            out[name] = min(ranked)[1]
        else:
            unknown.append(name)
    if unknown:
        raise UnsupportedModelError(f"{where}: GGUF tensors {sorted(unknown)[:5]} have no place in a {arch} decoder "
                                    "(e.g. rope_freqs / rope_factors: RoPE scaling stored as tensors, which "
                                    "gptedge does not read from GGUF); export the model's HF folder instead")
    return out


def undo_llamacpp_layout(arch: str, name: str, value: np.ndarray, heads: tuple[int, int]) -> np.ndarray:
    """Put one tensor back into the HF layout: llama's q/k rows are stored interleaved for RoPE,
    Gemma's (1 + w) norm weights with the 1 added, GPT-2's Conv1D weights transposed."""
    if arch == "llama" and re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", name):
        count = heads[0] if ".attn_q." in name else heads[1]
        # rows h*D + 2j + p -> h*D + p*D/2 + j within each head (biases too)
        split = value.reshape(count, value.shape[0] // count // 2, 2, *value.shape[1:]).swapaxes(1, 2)
        return np.ascontiguousarray(split.reshape(value.shape))
    if arch in GEMMA_27B_LAYERS and name.endswith("norm.weight"):
        return value - 1.0
    if arch == "gpt2" and GPT2_TRANSPOSED.fullmatch(name):
        return np.ascontiguousarray(value.T)
    return value

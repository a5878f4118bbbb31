"""HF ``config.json`` → :class:`Architecture`, refusing every key the decoder does not implement.

A key is either mapped, known to be harmless (dropout, dtype, ...), or refused by name: a config
that asks for behaviour the decoder lacks (sliding windows, partial rotary, unknown RoPE scaling)
would otherwise export a model that silently computes something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptedge.runtime.bundle import Architecture
from gptedge.runtime.errors import InputError, UnsupportedModelError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = ("gpt2", *LLAMA_FAMILY)
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# rope_scaling types whose inverse frequencies the decoder reproduces (see model.rope_inv_freq).
ROPE_TYPES = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


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
    key = "n_positions" if cfg.get("model_type") == "gpt2" else "max_position_embeddings"
    own = requested if requested is not None else cfg.get(key)
    if own is None:
        raise InputError(f"config.json has no {key!r}, so the model's context is unknown; pass --max-context N")
    return int(own)


def architecture_from_config(cfg: dict[str, Any], where: Path, requested_context: int | None = None) -> Architecture:
    """Map an HF config dict (read from ``where``) onto the decoder's :class:`Architecture`.

    ``requested_context`` is ``ExportConfig.max_context``: a sliding window only matters when the
    bundle's context is longer than the window.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; gptedge exports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (and nanoGPT / llama2.c checkpoints)")
    _require(cfg, where, _REQUIRED[model_type])
    if model_type == "gpt2":
        return _gpt2(cfg, where)
    return _llama_family(cfg, where, export_context(cfg, requested_context))


_REQUIRED = {
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
    **{t: ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "max_position_embeddings") for t in LLAMA_FAMILY},
}


def _require(cfg: dict[str, Any], where: Path, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if not isinstance(cfg.get(k), int)]
    if missing:
        raise InputError(f"{where}: missing or non-integer keys {missing} for model_type "
                         f"{cfg.get('model_type')!r}; the config.json is incomplete")


def _refuse(where: Path, key: str, value: Any, why: str) -> None:
    raise UnsupportedModelError(f"{where}: {key}={value!r} is not supported: {why}")


def _gpt2(cfg: dict[str, Any], where: Path) -> Architecture:
    activation = cfg.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        _refuse(where, "activation_function", activation, f"the decoder implements {sorted(GPT2_ACTIVATIONS)}")
    if not cfg.get("scale_attn_weights", True):
        _refuse(where, "scale_attn_weights", False, "the decoder always scales attention by 1/sqrt(head_dim)")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        _refuse(where, "scale_attn_by_inverse_layer_idx", True, "per-layer attention scaling is not implemented")
    if cfg.get("add_cross_attention", False):
        _refuse(where, "add_cross_attention", True, "only decoder-only models are exported")
    hidden, heads = cfg["n_embd"], cfg["n_head"]
    if hidden % heads:
        raise InputError(f"{where}: n_embd={hidden} is not a multiple of n_head={heads}")
    return Architecture(
        vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["n_layer"], num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=cfg.get("n_inner") or 4 * hidden,
        max_context=cfg["n_positions"], norm="layernorm", norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        norm_bias=True, position="learned", activation=GPT2_ACTIVATIONS[activation],
        qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _llama_family(cfg: dict[str, Any], where: Path, context: int) -> Architecture:
    model_type = cfg["model_type"]
    if cfg.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", cfg["hidden_act"], "the Llama-family decoder implements SwiGLU with silu only")
    factor = cfg.get("partial_rotary_factor", 1.0)
    if factor not in (None, 1, 1.0):
        _refuse(where, "partial_rotary_factor", factor, "the decoder rotates the whole head (factor 1.0)")
    _check_sliding_window(cfg, where, context)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if not cfg.get("head_dim") and cfg["hidden_size"] % heads:
        raise InputError(f"{where}: hidden_size={cfg['hidden_size']} is not a multiple of num_attention_heads={heads}")
    if heads % kv_heads:
        raise InputError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    attention_bias = bool(cfg.get("attention_bias", False)) if model_type == "llama" else False
    qkv_bias = True if model_type == "qwen2" else attention_bias
    mlp_bias = bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False
    return Architecture(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
        intermediate_size=cfg["intermediate_size"], max_context=cfg["max_position_embeddings"],
        norm="rmsnorm", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), norm_bias=False, position="rope",
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rope_scaling=_rope_scaling(cfg, where),
        activation="swiglu", qkv_bias=qkv_bias, attn_out_bias=attention_bias, mlp_bias=mlp_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _check_sliding_window(cfg: dict[str, Any], where: Path, context: int) -> None:
    """Refuse a sliding window that would actually cut attention inside the exported context."""
    window = cfg.get("sliding_window")
    if cfg["model_type"] == "qwen2" and not _qwen2_window_active(cfg):
        return
    if window is not None and int(window) < context:
        _refuse(where, "sliding_window", window,
                f"the decoder attends to the whole context; export with --max-context {window} or less")


def _qwen2_window_active(cfg: dict[str, Any]) -> bool:
    """Qwen2 carries a sliding_window value but uses it only with ``use_sliding_window``, and then
    only in the layers listed as ``sliding_attention`` (or from ``max_window_layers`` on)."""
    if not cfg.get("use_sliding_window", False):
        return False
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list):
        return "sliding_attention" in layer_types
    return cfg["num_hidden_layers"] > int(cfg.get("max_window_layers", 28))


def _rope_scaling(cfg: dict[str, Any], where: Path) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        _refuse(where, "rope_scaling", scaling, "expected a JSON object or null")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        _refuse(where, "rope_scaling", kind, f"RoPE scaling types the decoder implements: {sorted(ROPE_TYPES)}")
    if kind == "default":
        return None
    missing = [k for k in ROPE_TYPES[kind] if k not in scaling]
    if missing:
        raise InputError(f"{where}: rope_scaling of type {kind!r} lacks {missing}")
    return {"rope_type": kind, **{k: scaling[k] for k in ROPE_TYPES[kind]}}

"""``genai_config.json``: lets onnxruntime-genai (``og.Model(bundle_dir)``) run a bundle of a family it knows.

The bundle graph already keeps onnxruntime-genai's default I/O names (see
``gptedge.runtime.contract``), so the file only names them and states the model's sizes. Format:
onnxruntime-genai's "Configuration reference" (genai_config.json, ``model.decoder`` and ``search``).
"""

from __future__ import annotations

import json
from typing import Any

from gptedge.runtime import contract
from gptedge.runtime.bundle import MODEL_NAME, Architecture, TokenizerInfo

GENAI_CONFIG_NAME = "genai_config.json"
# model.type values onnxruntime-genai (0.18) runs as a decoder-only pipeline over our I/O names.
GENAI_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "gemma3_text",
                     "granite", "phi3", "nemotron", "olmo")


def genai_config(arch: Architecture, model_type: str, context_length: int,
                 tokenizer: TokenizerInfo | None, filename: str = MODEL_NAME) -> dict[str, Any]:
    """The genai_config.json dict for a bundle of ``arch`` whose graph is ``filename``.

    ``context_length`` is the bundle's max context in tokens (prompt + generated); the search's
    ``max_length`` defaults to it. Greedy search is the default, as in ``gptedge generate``.
    """
    if model_type not in GENAI_MODEL_TYPES:
        raise ValueError(f"genai_config: model type {model_type!r} is not one of {GENAI_MODEL_TYPES}")
    info = tokenizer or TokenizerInfo()
    eos: int | list[int] | None = list(info.eos_ids) if len(info.eos_ids) > 1 else (
        info.eos_ids[0] if info.eos_ids else None)
    model: dict[str, Any] = {
        "type": model_type,
        "vocab_size": arch.vocab_size,
        "context_length": context_length,
        "bos_token_id": info.bos_id if info.bos_id is not None else 0,
        "eos_token_id": eos if eos is not None else 0,
        # Without a pad id onnxruntime-genai pads batches with EOS, as transformers' generate does.
        "pad_token_id": info.pad_id if info.pad_id is not None else (info.eos_ids[0] if info.eos_ids else 0),
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": filename,
            "head_size": arch.head_dim,
            "hidden_size": arch.hidden_size,
            "num_attention_heads": arch.num_heads,
            "num_key_value_heads": arch.num_kv_heads,
            "num_hidden_layers": arch.num_layers,
            "inputs": {
                "input_ids": contract.INPUT_IDS,
                "attention_mask": contract.ATTENTION_MASK,
                "position_ids": contract.POSITION_IDS,
                "past_key_names": contract.past_name(0, "key").replace(".0.", ".%d."),
                "past_value_names": contract.past_name(0, "value").replace(".0.", ".%d."),
            },
            "outputs": {
                "logits": contract.LOGITS,
                "present_key_names": contract.present_name(0, "key").replace(".0.", ".%d."),
                "present_value_names": contract.present_name(0, "value").replace(".0.", ".%d."),
            },
        },
    }
    search = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context_length,
        "min_length": 0, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0,
        "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True,
        # Our graphs concatenate past and new keys (present is past + seq long), so the KV
        # buffers cannot be shared in place.
        "past_present_share_buffer": False,
    }
    return {"model": model, "search": search}


def genai_config_bytes(*args: Any, **kwargs: Any) -> bytes:
    """:func:`genai_config` serialised as indented UTF-8 JSON (what goes into the bundle)."""
    return (json.dumps(genai_config(*args, **kwargs), indent=4) + "\n").encode("utf-8")

"""The ONNX I/O contract every bundle graph keeps (the de-facto one of Optimum and onnxruntime-genai).

Inputs: ``input_ids [batch, seq]``, ``attention_mask [batch, total]``, ``position_ids [batch, seq]``
(int64) and ``past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]``. Outputs: ``logits
[batch, seq, vocab]`` (fp32; ``[batch, 1, vocab]`` in the last-position variant) and
``present.{i}.key|value [batch, kv_heads, total, head_dim]`` where ``total = past + seq``.
"""

from __future__ import annotations

from typing import Any

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "total"
# Manifest role of the onnxruntime-only generation graph (same I/O, contrib ops; see gptedge.runtime.ort.variant).
ORT_VARIANT_ROLE = "model_ort"


def past_name(layer: int, kind: str) -> str:
    """``past_key_values.{layer}.{kind}`` with kind ``key`` or ``value``."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def past_names(num_layers: int) -> list[str]:
    return [past_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [present_name(i, kind) for i in range(num_layers) for kind in ("key", "value")]


def input_names(num_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]


def io_description(num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int,
                   kv_dtype: str = "float32") -> dict[str, Any]:
    """The manifest's ``io`` section: every input and output with dtype and symbolic shape."""
    kv_in = [BATCH, num_kv_heads, PAST, head_dim]
    kv_out = [BATCH, num_kv_heads, TOTAL, head_dim]
    inputs = [
        {"name": INPUT_IDS, "dtype": "int64", "shape": [BATCH, SEQ]},
        {"name": ATTENTION_MASK, "dtype": "int64", "shape": [BATCH, TOTAL]},
        {"name": POSITION_IDS, "dtype": "int64", "shape": [BATCH, SEQ]},
    ] + [{"name": n, "dtype": kv_dtype, "shape": kv_in} for n in past_names(num_layers)]
    outputs = [{"name": LOGITS, "dtype": "float32", "shape": [BATCH, SEQ, vocab_size]}]
    outputs += [{"name": n, "dtype": kv_dtype, "shape": kv_out} for n in present_names(num_layers)]
    return {"inputs": inputs, "outputs": outputs}
